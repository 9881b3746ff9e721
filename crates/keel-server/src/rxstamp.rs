//! Kernel receive timestamps on TCP sockets (Linux): the time the bytes a read returns
//! reached the socket, so overload control can see how long a request waited in the receive
//! buffer while every worker was busy (`crate::overload`, "queueing delay").
//!
//! `SO_TIMESTAMPNS` makes the kernel date each received segment with the wall clock
//! (`CLOCK_REALTIME`, taken where the packet enters the stack) and return, with every
//! `recvmsg`, the date of the last segment that read consumed. The cost, measured for
//! BENCH.md, is a `recvmsg` in place of a `read` (the same one system call) plus one clock
//! read per request to turn the date into a delay. Elsewhere, or if the option is refused,
//! reads are plain reads and no delay is known.
//!
//! Linux switches dating on for the whole system lazily: the first socket to ask schedules
//! the switch on a kernel work queue and segments arriving before it runs carry no date. A
//! server therefore asks on its listening sockets (accepted sockets inherit the option, and
//! the listeners keep the switch on while it serves); an undated read counts as "delay
//! unknown", never as a delay.

use std::io;

/// Ask the kernel to date segments received on `fd`. `false` if the system does not offer it.
#[cfg(target_os = "linux")]
pub(crate) fn enable(fd: std::os::fd::RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call, and
    // the option value is a c_int that lives across it, as setsockopt(2) requires.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// See the Linux version: no receive timestamps here.
#[cfg(not(target_os = "linux"))]
pub(crate) fn enable(_fd: std::os::fd::RawFd) -> bool {
    false
}

/// Read into `buf` from `fd` (non-blocking); the number of bytes and the receive date of the
/// last segment read, in nanoseconds since the Unix epoch (0 when the kernel gave none).
#[cfg(target_os = "linux")]
pub(crate) fn recv(
    fd: std::os::fd::RawFd,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> io::Result<(usize, u64)> {
    // Room for one `cmsghdr` carrying a `timespec`, 8-byte aligned as cmsg data must be.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iovecs, no control" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at an iovec covering `buf` (writable, uninitialised bytes are fine
    // for the kernel to fill) and at `control`; all three outlive the call.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = 0;
    // SAFETY: the kernel filled `msg.msg_control`/`msg_controllen` with well-formed cmsgs
    // inside `control`; CMSG_FIRSTHDR/NXTHDR stay within that length, and a SCM_TIMESTAMPNS
    // cmsg's data is one `timespec` (read unaligned to be independent of the buffer's layout).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                stamp = u64::try_from(ts.tv_sec)
                    .unwrap_or(0)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// Nanoseconds since the Unix epoch now, on the clock the kernel dates segments with.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Enable dating on a listener and wait until the kernel has switched it on: a probe
    /// connection writes until a read comes back dated (the switch is deferred to a kernel
    /// work queue when no other socket in the system holds it).
    fn dated_listener() -> std::net::TcpListener {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(enable(listener.as_raw_fd()));
        let mut probe = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        for _ in 0..500 {
            probe.write_all(b"x").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            if let Ok((1, stamp)) = recv(accepted.as_raw_fd(), &mut buf) {
                if stamp != 0 {
                    return listener;
                }
            }
        }
        panic!("the kernel never dated a segment within a second of SO_TIMESTAMPNS");
    }

    #[test]
    fn a_segment_that_waited_in_the_buffer_is_dated_when_it_arrived() {
        let listener = dated_listener();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // The connection and its bytes wait, not yet accepted, while "every worker is busy".
        std::thread::sleep(std::time::Duration::from_millis(30));
        // No option set on the accepted socket: it inherits the listener's, from before
        // `accept`.
        let (server, _) = listener.accept().unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let (n, stamp) = recv(server.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(n, 18);
        assert_ne!(stamp, 0, "the kernel dated the segment");
        let waited = now_ns().saturating_sub(stamp);
        assert!(
            (30_000_000..5_000_000_000).contains(&waited),
            "waited {waited} ns"
        );
        // Nothing left: the non-blocking read says so instead of waiting.
        let err = recv(server.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_socket_that_never_asked_gets_no_dates() {
        // Dating is on in the system (the listener above holds it), yet a listener that did
        // not ask passes no date to its connections: the option, not the system switch,
        // decides.
        let _held = dated_listener();
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (server, _) = plain.accept().unwrap();
        client.write_all(b"ping").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let (n, stamp) = recv(server.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((n, stamp), (4, 0));
    }
}
