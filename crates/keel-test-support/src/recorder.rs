//! An upstream that keeps the headers of every request it receives, so a test can check what
//! a client really put on the wire (the sent deadline, trace headers, B3 form) rather than
//! what it meant to send. HTTP/1.1 and h2c on one loopback port.
//!
//! Plain requests get `200 ok`. gRPC requests (`content-type: application/grpc…`) get a
//! trailers-only `UNIMPLEMENTED`, which a generated client turns into an error the test can
//! ignore: the headers are what it is after.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running recorder. Dropping it stops accepting.
#[derive(Debug)]
pub struct HeaderRecorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl HeaderRecorder {
    /// Listen on a free loopback port.
    pub async fn start() -> HeaderRecorder {
        let listener = TcpListener::bind(crate::free_addr())
            .await
            .expect("bind the recorder");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let grpc = req
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        kept.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(req.headers().clone());
                        async move { Ok::<_, Infallible>(answer(grpc)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HeaderRecorder { addr, seen, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The headers of every request so far, in arrival order.
    pub fn requests(&self) -> Vec<HeaderMap> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The headers of the latest request; panics when none has arrived.
    pub fn last(&self) -> HeaderMap {
        self.requests()
            .pop()
            .expect("the recorder has received no request")
    }
}

impl Drop for HeaderRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(grpc: bool) -> http::Response<Full<Bytes>> {
    if !grpc {
        return http::Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    // Trailers-only: the status travels in the headers of an empty 200.
    let mut r = http::Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", http::HeaderValue::from_static("12"));
    r
}
