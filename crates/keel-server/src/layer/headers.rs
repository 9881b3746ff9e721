//! Response headers every answer gets, the handler's and Keel's own alike: hop-by-hop
//! headers scrubbed (a handler cannot leak `Connection`, `Transfer-Encoding`… of some other
//! hop), and on HTTP/1.1 keep-alive `Keep-Alive: timeout=N` advertising the idle timeout, so
//! clients close idle connections before the server does (checklist row 4) — except while
//! the server is closing or when the connection must close after this answer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use keel_core::headers::KEEP_ALIVE;
use keel_core::{Phase, Shutdown};

use crate::refusal::CloseConnection;

/// Scrubs hop-by-hop headers and advertises the keep-alive.
#[derive(Debug, Clone)]
pub struct HeadersLayer {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    /// `timeout=N`, made once.
    keep_alive: HeaderValue,
    shutdown: Shutdown,
}

impl HeadersLayer {
    /// Advertise `idle_timeout` (whole seconds, at least 1) until `shutdown` starts closing.
    pub fn new(idle_timeout: std::time::Duration, shutdown: Shutdown) -> Self {
        let secs = idle_timeout.as_secs().max(1);
        // A static value is copied into each response without touching a reference count;
        // one small string per server, for the life of the process.
        let text: &'static str = Box::leak(format!("timeout={secs}").into_boxed_str());
        let keep_alive = HeaderValue::from_static(text);
        HeadersLayer {
            state: Arc::new(State {
                keep_alive,
                shutdown,
            }),
        }
    }
}

impl<S> tower::Layer<S> for HeadersLayer {
    type Service = Headers<S>;
    fn layer(&self, inner: S) -> Headers<S> {
        Headers {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`HeadersLayer`].
#[derive(Debug, Clone)]
pub struct Headers<S> {
    inner: S,
    state: Arc<State>,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Headers<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible>,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = HeadersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // HTTP/1.0 keep-alive is opt-in and HTTP/2 has no such header.
        let keep_alive = (req.version() == Version::HTTP_11).then(|| self.state.clone());
        HeadersFuture {
            fut: self.inner.call(req),
            keep_alive,
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Headers`].
    #[derive(Debug)]
    pub struct HeadersFuture<F> {
        #[pin]
        fut: F,
        keep_alive: Option<Arc<State>>,
    }
}

impl<F, RB> Future for HeadersFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
{
    type Output = Result<Response<RB>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = ready!(this.fut.poll(cx));
        let status = resp.status();
        strip_hop_by_hop(resp.headers_mut(), status);
        if let Some(state) = this.keep_alive.as_ref()
            // While closing hyper answers `Connection: close`; a keep-alive would contradict it.
            && !state.shutdown.has_reached(Phase::Closing)
            && resp.extensions().get::<CloseConnection>().is_none()
        {
            resp.headers_mut()
                .insert(KEEP_ALIVE.clone(), state.keep_alive.clone());
        }
        Poll::Ready(Ok(resp))
    }
}

/// Headers that describe one hop's connection, never the end-to-end message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Remove hop-by-hop headers from a response, including any named by its `Connection`
/// header. A `101 Switching Protocols` keeps `Connection`/`Upgrade`: they *are* the switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, status: StatusCode) {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    strip_connection_headers(headers);
}

/// Remove the headers that describe one hop's connection (RFC 9110 §7.6.1) — the fixed
/// list and any named by `Connection` — from a message about to cross to the next hop: a
/// response (see [`strip_hop_by_hop`]) or a request a proxy forwards.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
    // Nearly every message has none: one pass over its few names beats seven hashed removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in `Connection` are hop-by-hop too; collect them before removing it.
    let mut listed: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for name in s.split(',') {
                if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    listed.push(n);
                }
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for n in listed {
        headers.remove(n);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{answered_with, call_full};
    use std::time::Duration;

    #[test]
    fn hop_by_hop_headers_are_removed_including_connection_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("keep-alive", "timeout=1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, StatusCode::OK);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn switching_protocols_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(h.len(), 2);
    }

    #[tokio::test]
    async fn keep_alive_is_advertised_on_http11_until_closing_and_never_before_a_close() {
        let shutdown = Shutdown::new();
        let layer = HeadersLayer::new(Duration::from_secs(75), shutdown.clone());
        let handler = answered_with(|resp| {
            resp.headers_mut()
                .insert("connection", "x-private".parse().unwrap());
            resp.headers_mut().insert("x-private", "1".parse().unwrap());
        });
        let mut svc = tower::Layer::layer(&layer, handler);
        let req = |v| {
            let mut r = Request::new(String::new());
            *r.version_mut() = v;
            r
        };
        let h11 = call_full(&mut svc, req(Version::HTTP_11)).await;
        assert_eq!(h11.headers()["keep-alive"], "timeout=75");
        assert!(!h11.headers().contains_key("x-private"));
        let h2 = call_full(&mut svc, req(Version::HTTP_2)).await;
        assert!(!h2.headers().contains_key("keep-alive"));

        let closing = answered_with(|resp| {
            resp.extensions_mut().insert(CloseConnection);
        });
        let mut svc2 = tower::Layer::layer(&layer, closing);
        let r = call_full(&mut svc2, req(Version::HTTP_11)).await;
        assert!(!r.headers().contains_key("keep-alive"));

        shutdown.advance(Phase::Closing);
        let r = call_full(&mut svc, req(Version::HTTP_11)).await;
        assert!(!r.headers().contains_key("keep-alive"));
    }
}
