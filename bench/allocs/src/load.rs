//! The load generator: blocking keep-alive HTTP/1.1 connections, one thread each, sending a
//! fixed request and reading the answer with a minimal parser (status line and
//! `Content-Length`). These threads are not opted in to counting, so nothing here shows up
//! in a system's counts; plain `std::net` keeps the generator itself simple enough to trust.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// What to send and what to expect back.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) addr: SocketAddr,
    pub(crate) connections: usize,
    /// Requests per connection before the counters are reset.
    pub(crate) warmup_per_conn: usize,
    /// Requests per connection that are counted.
    pub(crate) measured_per_conn: usize,
    /// The complete request, serialised once.
    pub(crate) request: Vec<u8>,
    /// The body every answer must carry (checked so that a stray process on the port, or a
    /// wrong route, cannot pass as a result); `None` checks the status only.
    pub(crate) expect_body: Option<Vec<u8>>,
}

/// Run `plan`: every connection warms up, then `between` runs (with no request in flight),
/// then the measured requests are sent. Returns the measured window's duration.
pub(crate) fn run(plan: &Plan, between: impl FnOnce()) -> Result<Duration, String> {
    // The main thread is the extra party: it runs `between` while every connection waits.
    let barrier = Barrier::new(plan.connections + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.connections)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || {
                    // A failure still walks through both barriers, or the others would wait
                    // forever; it is reported after the run.
                    let warm = Conn::open(plan.addr).and_then(|mut c| {
                        for _ in 0..plan.warmup_per_conn {
                            c.round_trip(plan)?;
                        }
                        Ok(c)
                    });
                    barrier.wait();
                    barrier.wait();
                    let mut c = warm?;
                    for _ in 0..plan.measured_per_conn {
                        c.round_trip(plan)?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        barrier.wait();
        between();
        barrier.wait();
        let start = Instant::now();
        let mut first_error = None;
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err("a load thread panicked".into()));
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(start.elapsed()),
        }
    })
}

/// The bytes of a request for `path`: `GET`, or `POST` with `post_bytes` of body.
pub(crate) fn request_bytes(path: &str, post_bytes: Option<usize>) -> (Vec<u8>, Option<Vec<u8>>) {
    match post_bytes {
        None => (
            format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").into_bytes(),
            None,
        ),
        Some(n) => {
            // A JSON-looking body, like BENCH.md S1's 1 KiB JSON echo.
            let mut body = b"{\"pad\":\"".to_vec();
            body.resize(n.saturating_sub(2).max(body.len()), b'x');
            body.extend_from_slice(b"\"}");
            body.truncate(n);
            let mut req = format!(
                "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            (req, Some(body))
        }
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream =
            TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        // The request goes out in one write; without NODELAY nothing changes, but a server
        // answering in two writes would meet Nagle + delayed ACK on the way back.
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        // A hung server fails the run instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
        })
    }

    fn round_trip(&mut self, plan: &Plan) -> Result<(), String> {
        self.stream
            .write_all(&plan.request)
            .map_err(|e| format!("write: {e}"))?;
        let mut len = 0;
        let head_end = loop {
            if let Some(i) = find(&self.buf[..len], b"\r\n\r\n") {
                break i + 4;
            }
            len += self.read_more(len)?;
        };
        let head = &self.buf[..head_end];
        if !head.starts_with(b"HTTP/1.1 200 ") {
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(format!(
                "expected 200, got {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        let content_length = header(head, b"content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
            .ok_or("answer has no Content-Length (chunked answers are not parsed here)")?;
        let total = head_end + content_length;
        while len < total {
            len += self.read_more(len)?;
        }
        if len != total {
            // Requests are never pipelined, so nothing may follow the answer.
            return Err(format!("{} unexpected bytes after an answer", len - total));
        }
        if let Some(expect) = &plan.expect_body {
            if &self.buf[head_end..total] != expect.as_slice() {
                return Err(format!(
                    "unexpected body {:?}",
                    String::from_utf8_lossy(&self.buf[head_end..total])
                ));
            }
        }
        Ok(())
    }

    /// Read into the buffer after `len` bytes, growing it when full.
    fn read_more(&mut self, len: usize) -> Result<usize, String> {
        if len == self.buf.len() {
            self.buf.resize(len * 2, 0);
        }
        match self.stream.read(&mut self.buf[len..]) {
            Ok(0) => Err("server closed the connection".into()),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` (lower case) in a response head.
fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (k, v) = line.split_at(colon);
        k.eq_ignore_ascii_case(name).then(|| v[1..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_is_case_insensitive() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nx: y\r\n\r\n";
        assert_eq!(header(head, b"content-length"), Some(&b"16"[..]));
        assert_eq!(header(head, b"missing"), None);
    }

    #[test]
    fn post_body_has_the_asked_size() {
        for n in [0, 1, 5, 1024] {
            let (_, body) = request_bytes("/echo", Some(n));
            assert_eq!(body.map(|b| b.len()), Some(n));
        }
    }
}
