//! Streaming request bodies (`Client::call_streaming`): sent as they are read, resent only
//! while none of the body has gone out.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{client, serve};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use keel_client::client::{ClientConfig, ClientError};
use keel_core::Context;
use keel_test_support::fault::{Fault, FaultProxy};

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 16;

type Chunks =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A POST of `CHUNKS` × `CHUNK` bytes whose length is not declared (chunked on the wire).
fn upload() -> http::Request<Chunks> {
    let chunk = Bytes::from(vec![b'k'; CHUNK]);
    let frames: Vec<_> = (0..CHUNKS)
        .map(|_| Ok(Frame::data(chunk.clone())))
        .collect();
    http::Request::post("/count")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap()
}

fn ctx() -> Context {
    Context::background(Duration::from_secs(10))
}

#[tokio::test]
async fn a_stream_refused_at_connect_is_resent_to_another_endpoint_whole() {
    let (good, _, _) = serve(Duration::from_secs(75)).await;
    let (other, _, _) = serve(Duration::from_secs(75)).await;
    let refusing = FaultProxy::start(other).await.unwrap();
    refusing.set(Fault::Refuse);
    let addrs: Vec<SocketAddr> = vec![refusing.addr(), good];
    let c = client(&addrs, ClientConfig::default());
    for i in 0..30 {
        let resp = c.call_streaming(&ctx(), upload()).await.unwrap();
        assert_eq!(resp.status(), 200, "call {i}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            (CHUNK * CHUNKS).to_string(),
            "call {i}: every byte arrived once"
        );
    }
    // The refused endpoint was picked at least once (the odds of never, in 30 draws before it
    // is ejected, are below 1e-9), and its calls went elsewhere with the body intact.
    assert!(c.stats().retries >= 1, "{:?}", c.stats());
}

#[tokio::test]
async fn a_stream_cut_off_after_it_went_out_is_not_resent_even_when_idempotent() {
    let (up, _, _) = serve(Duration::from_secs(75)).await;
    let proxy = FaultProxy::start(up).await.unwrap();
    // The head and some of the body get through, then both sides are reset.
    proxy.set(Fault::ResetAfterBytes(100 * 1024));
    let cfg = ClientConfig {
        idempotent: true,
        ..ClientConfig::default()
    };
    let c = client(&[proxy.addr()], cfg);
    match c.call_streaming(&ctx(), upload()).await {
        Err(ClientError::Failed { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("expected a failure after one attempt, got {other:?}"),
    }
    assert_eq!(c.stats().retries, 0, "{:?}", c.stats());

    // The same failure with a body held whole is retried (and fails again: every
    // connection is cut), which is what the stream must not do.
    let whole = http::Request::post("/count")
        .body(Bytes::from(vec![b'k'; CHUNK * CHUNKS]))
        .unwrap();
    match c.call(&ctx(), whole).await {
        Err(ClientError::Failed { attempts, .. }) => assert!(attempts > 1, "{attempts}"),
        other => panic!("expected a failure after retries, got {other:?}"),
    }
}

#[tokio::test]
async fn an_empty_stream_is_sent_like_a_whole_body_and_may_be_retried() {
    let (good, _, _) = serve(Duration::from_secs(75)).await;
    let c = client(&[good], ClientConfig::default());
    let req = http::Request::post("/count")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = c.call_streaming(&ctx(), req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "0");
}

/// A call's own retry policy (`call_streaming_with`) over the client's settings.
#[tokio::test]
async fn a_call_may_ask_for_one_attempt_or_for_idempotent_retries() {
    use keel_client::client::RetryPolicy;
    let (up, _, _) = serve(Duration::from_secs(75)).await;
    let proxy = FaultProxy::start(up).await.unwrap();
    let c = client(&[proxy.addr()], ClientConfig::default());
    let get = || {
        http::Request::get("/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let attempts = |r: Result<_, ClientError>| match r {
        Err(ClientError::Failed { attempts, .. }) => attempts,
        other => panic!("expected a failure, got {other:?}"),
    };

    // A refused connection is safe to retry on any upstream: the client's policy does,
    // `Never` does not.
    proxy.set(Fault::Refuse);
    let n = attempts(c.call_streaming(&ctx(), get()).await);
    assert!(n > 1, "{n}");
    let n = attempts(
        c.call_streaming_with(&ctx(), get(), RetryPolicy::Never)
            .await,
    );
    assert_eq!(n, 1);

    // A reset after the request went out is retried only on an idempotent call.
    proxy.set(Fault::ResetAfterBytes(10));
    let n = attempts(c.call_streaming(&ctx(), get()).await);
    assert_eq!(n, 1);
    let n = attempts(
        c.call_streaming_with(&ctx(), get(), RetryPolicy::Idempotent)
            .await,
    );
    assert!(n > 1, "{n}");
}
