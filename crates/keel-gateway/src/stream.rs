//! Bodies and connections passed through rather than held: a request body capped as it
//! streams ([`Capped`]), and a WebSocket tunnelled byte for byte ([`tunnel`]) — opened by an
//! HTTP/1.1 `Upgrade` ([`websocket_upgrade`]) or by HTTP/2's extended CONNECT (RFC 8441,
//! [`h2_websocket_connect`]; the upstream leg is HTTP/1.1 either way).
//!
//! A proxy that collects a body before forwarding it holds the whole upload in memory, makes
//! the upstream wait for the last byte before it sees the first, and needs a size cap far
//! below what users upload. Streamed, a transfer of any size costs a few frames in flight:
//! hyper reads the next frame from the client only when the upstream connection took the
//! last one, and the same holds for the answer, so a slow reader slows the upstream instead
//! of filling the proxy's memory.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Version};
use http_body::{Body, Frame, SizeHint};

/// The error a [`Capped`] body ends with when its limit is passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
pub struct TooLarge {
    /// The cap.
    pub limit: u64,
}

/// A request body that fails once more than `limit` bytes have passed through it, and
/// raises a flag the proxy reads afterwards to answer `413` rather than a gateway error
/// (the upstream call fails as the body does, and the failure alone does not say why). The
/// flag is raised too when the body it wraps was already capped and fails with
/// `http_body_util::LengthLimitError`.
#[derive(Debug)]
pub struct Capped<B> {
    inner: B,
    left: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> Capped<B> {
    /// `inner`, cut off after `limit` bytes.
    pub fn new(inner: B, limit: u64) -> Capped<B> {
        Capped {
            inner,
            left: limit,
            limit,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once the body went over its limit; read it after the body is gone.
    pub fn exceeded(&self) -> Arc<AtomicBool> {
        self.exceeded.clone()
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<keel_core::BoxError>,
{
    type Data = Bytes;
    type Error = keel_core::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => {
                let e = e.into();
                // The same cap put on earlier (Keel's server caps every request body).
                if is_length_limit(&*e) {
                    this.exceeded.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(e)));
            }
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if n > this.left {
                this.left = 0;
                this.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(TooLarge { limit: this.limit }))));
            }
            this.left -= n;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() || err.is::<TooLarge>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The protocol a request asks to upgrade to, when it is a WebSocket handshake this proxy
/// may tunnel: HTTP/1.1, `GET`, `Connection` listing `upgrade`, and `Upgrade: websocket`.
/// Any other `Upgrade` (`h2c` above all, which would hand the proxy's connection to a
/// protocol it does not speak) is `None`, and the header is dropped with the other
/// hop-by-hop ones.
pub fn websocket_upgrade(
    version: Version,
    method: &Method,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || method != Method::GET {
        return None;
    }
    // `Upgrade` first: almost no request has one, and then `Connection` is not read.
    let upgrade = headers.get(UPGRADE)?;
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    // `websocket`, possibly with a version (`websocket/13` is not registered, but harmless).
    let proto = upgrade.to_str().ok()?.trim();
    let websocket = proto
        .split('/')
        .next()
        .is_some_and(|p| p.eq_ignore_ascii_case("websocket"));
    (asks && websocket).then(|| upgrade.clone())
}

/// Whether a request is RFC 8441's extended CONNECT for a WebSocket: HTTP/2, `CONNECT`, and
/// `:protocol` = `websocket` (hyper hands the pseudo-header over as [`hyper::ext::Protocol`];
/// the server must advertise it, `server.http2_extended_connect`).
pub fn h2_websocket_connect(
    version: Version,
    method: &Method,
    extensions: &http::Extensions,
) -> bool {
    version == Version::HTTP_2
        && method == Method::CONNECT
        && extensions
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// A fresh `Sec-WebSocket-Key` for the HTTP/1.1 leg of a WebSocket that came over HTTP/2:
/// 16 bytes, base64 (RFC 6455 §4.1). The key only proves that the upstream speaks WebSocket,
/// so Keel's non-cryptographic id stream serves.
pub fn websocket_key() -> HeaderValue {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&keel_core::codec::rand::next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&keel_core::codec::rand::next_u64().to_le_bytes());
    let encoded = base64_16(raw);
    HeaderValue::from_bytes(&encoded)
        .unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

/// 16 bytes in standard base64: 22 characters and two pads.
fn base64_16(raw: [u8; 16]) -> [u8; 24] {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut padded = [0u8; 18]; // whole groups of three; the two zero bytes become the pads
    padded[..16].copy_from_slice(&raw);
    let mut out = [0u8; 24];
    for (group, chunk) in padded.chunks(3).enumerate() {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for i in 0..4 {
            out[group * 4 + i] = B64[((n >> (18 - 6 * i)) & 63) as usize];
        }
    }
    out[22] = b'=';
    out[23] = b'=';
    out
}

/// Copy bytes both ways between the two upgraded connections until both sides are done;
/// each direction's end is passed on as a half-close. A tunnel in which no byte moved either
/// way for `idle` is closed (an `io::ErrorKind::TimedOut` error): a peer that vanished
/// without a FIN, or a client that stopped reading, holds the proxy's two connections no
/// longer than that. Returns the bytes copied (client → upstream, upstream → client).
pub async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) -> Result<(u64, u64), keel_core::BoxError> {
    let (client, upstream) = tokio::try_join!(client, upstream)?;
    let started = tokio::time::Instant::now();
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut client = Active::new(hyper_util::rt::TokioIo::new(client), started, &last);
    let mut upstream = Active::new(hyper_util::rt::TokioIo::new(upstream), started, &last);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        // Sleep until `idle` after the last movement seen, then look again: a timer per
        // tunnel, re-armed only as often as the tunnel is quiet, not per byte.
        let moved = started + std::time::Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            done = &mut copy => return Ok(done?),
            () = tokio::time::sleep_until(moved + idle) => {
                let now_ms = started.elapsed().as_millis() as u64;
                if now_ms.saturating_sub(last.load(Ordering::Relaxed)) >= idle.as_millis() as u64 {
                    return Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("tunnel idle for {idle:?}"),
                    )));
                }
            }
        }
    }
}

/// An upgraded connection that notes when bytes last moved through it (milliseconds since
/// the tunnel began, shared by both sides).
struct Active<T> {
    io: T,
    started: tokio::time::Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, started: tokio::time::Instant, last: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        Active {
            io,
            started,
            last: last.clone(),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let out = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        out
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let out = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(out, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        out
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_body_within_its_cap_passes_whole() {
        let body = Capped::new(Full::new(Bytes::from_static(b"hello")), 5);
        let flag = body.exceeded();
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert!(!flag.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_body_past_its_cap_fails_and_says_so() {
        let chunks =
            (0..4).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"abcd"))));
        let body = Capped::new(StreamBody::new(futures_util::stream::iter(chunks)), 10);
        let flag = body.exceeded();
        let err = body.collect().await.unwrap_err();
        assert!(err.downcast_ref::<TooLarge>().is_some(), "{err}");
        assert!(flag.load(Ordering::Relaxed));
    }

    #[test]
    fn websocket_keys_are_sixteen_bytes_of_base64_and_differ() {
        // RFC 6455 §1.3's sample nonce.
        assert_eq!(
            &base64_16(*b"the sample nonce"),
            b"dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert_eq!(&base64_16([0xff; 16]), b"/////////////////////w==");
        let (a, b) = (websocket_key(), websocket_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
    }

    #[test]
    fn an_h2_websocket_is_an_extended_connect_for_websocket() {
        let mut ext = http::Extensions::new();
        assert!(!h2_websocket_connect(
            Version::HTTP_2,
            &Method::CONNECT,
            &ext
        ));
        ext.insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(h2_websocket_connect(
            Version::HTTP_2,
            &Method::CONNECT,
            &ext
        ));
        assert!(!h2_websocket_connect(
            Version::HTTP_11,
            &Method::CONNECT,
            &ext
        ));
        assert!(!h2_websocket_connect(Version::HTTP_2, &Method::GET, &ext));
        let mut other = http::Extensions::new();
        other.insert(hyper::ext::Protocol::from_static("connect-udp"));
        assert!(!h2_websocket_connect(
            Version::HTTP_2,
            &Method::CONNECT,
            &other
        ));
    }

    #[test]
    fn only_websocket_handshakes_over_http1_get_are_tunnelled() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(websocket_upgrade(Version::HTTP_11, &Method::GET, &h).is_some());
        assert!(websocket_upgrade(Version::HTTP_11, &Method::POST, &h).is_none());
        assert!(websocket_upgrade(Version::HTTP_10, &Method::GET, &h).is_none());
        assert!(websocket_upgrade(Version::HTTP_2, &Method::GET, &h).is_none());
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(websocket_upgrade(Version::HTTP_11, &Method::GET, &h).is_none());
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(websocket_upgrade(Version::HTTP_11, &Method::GET, &h).is_none());
    }
}
