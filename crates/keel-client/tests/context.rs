//! Whose call is it: the request's context given as an argument, carried in the request's
//! extensions or found in the task sets the deadline and trace the upstream receives; a call
//! that finds none is counted and logged once, never silently given a fresh context.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{client, get_root};
use http::HeaderMap;
use http_body_util::BodyExt;
use keel_client::client::{Client, ClientConfig};
use keel_client::endpoint::{Endpoint, Endpoints};
use keel_client::upstream::{Upstream, UpstreamConfig};
use keel_core::Context;
use keel_core::propagation::Outbound;
use keel_test_support::recorder::HeaderRecorder;

/// Log lines written by the subscriber set for the current thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    /// Capture `warn` and above on this thread until the guard drops. The tests run on
    /// tokio's current-thread runtime, so tasks they spawn log here too.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines_containing(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

fn named(name: &str, upstream: &HeaderRecorder) -> Arc<Client> {
    let eps = Endpoints::new(vec![Endpoint::new(upstream.addr())]);
    Arc::new(Client::new(
        name,
        ClientConfig::default(),
        Arc::new(Upstream::new(UpstreamConfig::default(), eps)),
    ))
}

/// One call from a plain `tokio::spawn`: no request, no scope, nothing in the extensions.
async fn call_from_spawned_task(c: &Arc<Client>) {
    let c = c.clone();
    let status = tokio::spawn(async move {
        let resp = c.request(get_root()).await.unwrap();
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        status
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
}

fn trace_id_of(h: &HeaderMap) -> String {
    let tp = h.get("traceparent").unwrap().to_str().unwrap();
    tp.split('-').nth(1).unwrap().to_string()
}

fn sent_timeout(h: &HeaderMap, name: &'static str) -> Duration {
    keel_core::codec::timeout::parse(name, h.get(name).unwrap().as_bytes()).unwrap()
}

/// The upstream got `ctx`'s trace and request id, and its remaining time minus the margin
/// as measured around the call: no more than before it, no less than after it (plus the
/// encoder's rounding down).
fn assert_carries(h: &HeaderMap, ctx: &Context, before: Duration, after: Duration) {
    let margin = Outbound::default().margin;
    assert_eq!(trace_id_of(h), ctx.trace().trace_id.to_string(), "{h:?}");
    assert_eq!(h.get("x-request-id").unwrap(), ctx.request_id(), "{h:?}");
    let sent = sent_timeout(h, "keel-timeout");
    assert!(sent <= before - margin, "sent {sent:?}, had {before:?}");
    assert!(
        sent + Duration::from_millis(1) >= after - margin,
        "sent {sent:?}, still had {after:?} after the call"
    );
}

#[tokio::test]
async fn a_call_from_a_plain_spawned_task_without_context_is_counted_and_logged_once() {
    let logs = Capture::default();
    let _guard = logs.install();
    let upstream = HeaderRecorder::start().await;
    let c = named("inventory", &upstream);

    call_from_spawned_task(&c).await;
    assert_eq!(c.stats().calls_without_context, 1);
    call_from_spawned_task(&c).await;
    assert_eq!(c.stats().calls_without_context, 2);
    assert_eq!(c.stats().calls, 2, "the calls were still made");

    let warnings = logs.lines_containing("without a request context");
    assert_eq!(warnings.len(), 1, "logged once per client: {warnings:?}");
    let w = &warnings[0];
    assert!(w.contains("WARN"), "{w}");
    assert!(w.contains("upstream=inventory"), "names the upstream: {w}");
    assert!(
        w.contains("client.call(&ctx, req)") && w.contains("Context::background"),
        "says what to do: {w}"
    );

    // What went out: a fresh root trace per call (nothing ties them to a request), with the
    // fallback deadline of 30 s.
    let sent = upstream.requests();
    assert_eq!(sent.len(), 2);
    assert_ne!(trace_id_of(&sent[0]), trace_id_of(&sent[1]));
    let t = sent_timeout(&sent[1], "keel-timeout");
    assert!(
        t <= Duration::from_secs(30) && t > Duration::from_secs(20),
        "{t:?}"
    );

    // Once per client, not once per process: another upstream's client speaks for itself.
    let other = named("user", &upstream);
    call_from_spawned_task(&other).await;
    let warnings = logs.lines_containing("without a request context");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].contains("upstream=user"), "{}", warnings[1]);
}

#[tokio::test]
async fn the_requests_context_sets_the_deadline_and_trace_however_it_is_handed_over() {
    let logs = Capture::default();
    let _guard = logs.install();
    let upstream = HeaderRecorder::start().await;
    let c = Arc::new(client(&[upstream.addr()], ClientConfig::default()));
    let ctx = Context::background(Duration::from_secs(10));

    // As an argument.
    let before = ctx.remaining();
    let resp = c.call(&ctx, get_root()).await.unwrap();
    let after = ctx.remaining();
    resp.into_body().collect().await.unwrap();
    assert_carries(&upstream.last(), &ctx, before, after);

    // In the request's extensions, from a task that has no context of its own.
    let mut req = get_root();
    req.extensions_mut().insert(ctx.clone());
    let before = ctx.remaining();
    let resp = tokio::spawn({
        let c = c.clone();
        async move { c.request(req).await.map(|r| r.status()).unwrap() }
    })
    .await
    .unwrap();
    let after = ctx.remaining();
    assert_eq!(resp, 200);
    assert_carries(&upstream.last(), &ctx, before, after);

    // In the task (`Context::current()`), as request-scoped tasks see it.
    let before = ctx.remaining();
    let resp = ctx.scope(c.request(get_root())).await.unwrap();
    let after = ctx.remaining();
    resp.into_body().collect().await.unwrap();
    assert_carries(&upstream.last(), &ctx, before, after);

    // Work no request started, named as such at the call site: a choice, not a fallback.
    let job = Context::background(Duration::from_secs(2));
    let req = http::Request::get("/job").body(Bytes::new()).unwrap();
    c.call(&job, req).await.unwrap();
    assert_eq!(
        trace_id_of(&upstream.last()),
        job.trace().trace_id.to_string()
    );

    assert_eq!(c.stats().calls, 4);
    assert_eq!(c.stats().calls_without_context, 0);
    assert!(
        logs.lines_containing("without a request context")
            .is_empty()
    );
}

#[tokio::test]
async fn a_context_that_leaves_less_than_the_margin_fails_the_call_before_sending() {
    let upstream = HeaderRecorder::start().await;
    let c = client(&[upstream.addr()], ClientConfig::default());
    let ctx = Context::background(Duration::from_millis(2));
    let err = c.call(&ctx, get_root()).await.unwrap_err();
    assert!(
        matches!(err, keel_client::client::ClientError::DeadlineExceeded(_)),
        "{err}"
    );
    assert!(upstream.requests().is_empty());
}
