//! Dev-only helpers for Keel's tests: free ports, child processes that are always reaped,
//! raw-socket HTTP, hyper clients for HTTP/1.1 and h2c, an upstream that records the headers
//! it receives, and `/proc/net/tcp` readers.
//!
//! Tests bind to ports chosen at run time (other programs share the machine) and wait for
//! conditions with deadlines instead of sleeping fixed amounts.

pub mod fault;
pub mod grpc;
pub mod otlp;
pub mod recorder;
pub mod tansu;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A loopback port that was free a moment ago, and never handed out before in this process.
///
/// The kernel may give the port it just released to the next bind, so two calls in a row
/// (a service's port and its admin port) could return the same one: it happened under the
/// full suite. Remembering what was handed out rules that out within a test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return port;
        }
    }
    panic!("no ephemeral port left that this process has not handed out already");
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Poll `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A child process killed and reaped on drop, so a failing test never leaks a server.
#[derive(Debug)]
pub struct ChildGuard {
    /// The child; tests may signal or wait on it.
    pub child: Option<Child>,
}

impl ChildGuard {
    /// Spawn `program` with `env` added, stdout/stderr inherited (so failures show the logs).
    pub fn spawn(program: &str, args: &[&str], env: &[(&str, String)]) -> ChildGuard {
        Self::spawn_with(program, args, env, Stdio::inherit())
    }

    /// Like [`ChildGuard::spawn`], with stderr written to `log` so tests can read the logs.
    pub fn spawn_logged(
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> ChildGuard {
        let file =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        Self::spawn_with(program, args, env, Stdio::from(file))
    }

    fn spawn_with(
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
        stderr: Stdio,
    ) -> ChildGuard {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        ChildGuard { child: Some(child) }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Send a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and own; no memory is involved.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait up to `timeout` for exit; returns the exit code (None if it did not exit or died
    /// from a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let end = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st.code());
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True once something accepts TCP connections on `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Send raw bytes, read until the peer closes or `timeout`; returns what was read.
pub fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The status code of the first response in `raw` (an HTTP/1 byte stream).
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(raw.get(..raw.len().min(64))?).ok()?;
    s.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A hyper client speaking HTTP/1.1 with keep-alive.
pub fn http1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A hyper client speaking HTTP/2 with prior knowledge (h2c).
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `url`, returning status and body text.
pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sockets in LISTEN state on `port` (IPv4 and IPv6), from `/proc/net/tcp{,6}`.
pub fn listening_sockets(port: u16) -> usize {
    tcp_entries(port).filter(|st| st == "0A").count()
}

/// The state column ("01" ESTABLISHED, "06" TIME_WAIT, "0A" LISTEN, …) of every socket whose
/// local port is `port`.
pub fn tcp_entries(port: u16) -> impl Iterator<Item = String> {
    let want = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|l| {
                    let mut cols = l.split_whitespace();
                    let local = cols.nth(1)?;
                    let st = cols.nth(1)?;
                    Some((local.rsplit(':').next()?.to_string(), st.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .filter(move |(p, _)| *p == want)
        .map(|(_, st)| st)
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
