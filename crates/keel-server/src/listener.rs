//! Listening sockets: `SO_REUSEPORT` groups, `TCP_NODELAY`, TCP Fast Open, kernel keepalive,
//! backlog.
//!
//! One socket per runtime shard lets the kernel hash new connections across the sockets, so
//! accept never funnels through one queue and one waking thread. All sockets of a group share
//! one port: when the configured port is 0, the first socket picks it and the rest join it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

/// Options for a listener group.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// Sockets in the group.
    pub count: usize,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// TCP Fast Open queue length; 0 = off.
    pub fastopen_queue: u32,
    /// Kernel keepalive for the accepted sockets; `None` = off.
    pub keepalive: Option<Keepalive>,
}

/// Kernel keepalive settings (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe.
    pub idle: std::time::Duration,
    /// Time between unanswered probes.
    pub interval: std::time::Duration,
    /// Unanswered probes before the connection is closed.
    pub probes: u32,
}

/// Bind `opts.count` `SO_REUSEPORT` sockets to `addr`. The returned sockets are non-blocking
/// std listeners, ready to hand to whichever runtime (shard) will accept on them.
pub fn bind_group(addr: SocketAddr, opts: ListenOptions) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(opts.count.max(1));
    let mut addr = addr;
    for _ in 0..opts.count.max(1) {
        let l = bind_one(addr, opts)?;
        // Port 0 means "pick one": the rest of the group must join the port the first got.
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR lets a restarted process bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if opts.fastopen_queue > 0 {
        enable_fastopen(&socket, opts.fastopen_queue);
    }
    if let Some(k) = opts.keepalive {
        // Set on the listener, the options are copied into every socket it accepts (Linux
        // clones the listener's socket for each connection): no system call per connection.
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.probes),
        )?;
    }
    socket.bind(&addr.into())?;
    let backlog = i32::try_from(opts.backlog).unwrap_or(i32::MAX);
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

static TFO_WARNED: AtomicBool = AtomicBool::new(false);

/// Ask for a TCP Fast Open queue. TFO is an optimisation: when the kernel refuses it (or has
/// server-side TFO disabled by sysctl) we say so once and serve without it.
fn enable_fastopen(socket: &Socket, qlen: u32) {
    let q = libc::c_int::try_from(qlen).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a valid open socket owned by `socket` for the duration of the call,
    // and we pass a pointer to a live c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&q as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if !TFO_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %err, "TCP Fast Open refused by the kernel; serving without it");
        }
        return;
    }
    // The option is accepted even when server-side TFO is off system-wide; the sysctl's bit 1
    // is what actually enables it.
    if let Ok(v) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen") {
        if let Ok(flags) = v.trim().parse::<u32>() {
            if flags & 2 == 0 && !TFO_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    net_ipv4_tcp_fastopen = flags,
                    "TCP Fast Open queue set, but the kernel has server-side TFO disabled \
                     (sysctl net.ipv4.tcp_fastopen lacks bit 2); serving without it"
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn group_shares_one_port() {
        let ls = bind_group(
            "127.0.0.1:0".parse().unwrap(),
            ListenOptions {
                count: 3,
                backlog: 128,
                fastopen_queue: 16,
                keepalive: None,
            },
        )
        .unwrap();
        assert_eq!(ls.len(), 3);
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    /// The socket `listener` accepts for a fresh connection to it (kept open by the caller).
    fn accepted(listener: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn accepted_sockets_inherit_the_listeners_keepalive_and_none_is_off() {
        let keepalive = Keepalive {
            idle: std::time::Duration::from_secs(7),
            interval: std::time::Duration::from_secs(3),
            probes: 4,
        };
        let opts = |keepalive| ListenOptions {
            count: 1,
            backlog: 16,
            fastopen_queue: 0,
            keepalive,
        };
        let on = bind_group("127.0.0.1:0".parse().unwrap(), opts(Some(keepalive))).unwrap();
        let (_client, server) = accepted(&on[0]);
        let s = socket2::SockRef::from(&server);
        assert!(
            s.keepalive().unwrap(),
            "SO_KEEPALIVE on the accepted socket"
        );
        assert_eq!(s.tcp_keepalive_time().unwrap(), keepalive.idle);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), keepalive.interval);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), keepalive.probes);

        let off = bind_group("127.0.0.1:0".parse().unwrap(), opts(None)).unwrap();
        let (_client, server) = accepted(&off[0]);
        assert!(!socket2::SockRef::from(&server).keepalive().unwrap());
    }
}
