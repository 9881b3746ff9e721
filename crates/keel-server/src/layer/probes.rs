//! Probes on the main port: `/livez`, `/readyz`, `/healthz` are answered here, before every
//! other layer, so a wedged handler or a full concurrency limit cannot fail liveness. Probes
//! are not traffic: they get no context, no metrics and no overload slot.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::body::Fixed;
use crate::readiness::{self, Readiness};

/// The probe paths (`[probes]`).
#[derive(Debug, Clone)]
pub struct ProbePaths {
    /// Liveness.
    pub livez: String,
    /// Readiness (dependency checks, drain).
    pub readyz: String,
    /// Both in one (for platforms with a single health check).
    pub healthz: String,
}

/// Answers probes; passes everything else on.
#[derive(Debug, Clone)]
pub struct ProbesLayer {
    state: Option<Arc<(ProbePaths, Readiness)>>,
}

impl ProbesLayer {
    /// Probes at `paths`, answered from `readiness`.
    pub fn new(paths: ProbePaths, readiness: Readiness) -> Self {
        ProbesLayer {
            state: Some(Arc::new((paths, readiness))),
        }
    }

    /// No probes on this port (they are on the admin port only).
    pub fn off() -> Self {
        ProbesLayer { state: None }
    }
}

impl<S> tower::Layer<S> for ProbesLayer {
    type Service = Probes<S>;
    fn layer(&self, inner: S) -> Probes<S> {
        Probes {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`ProbesLayer`].
#[derive(Debug, Clone)]
pub struct Probes<S> {
    inner: S,
    state: Option<Arc<(ProbePaths, Readiness)>>,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Probes<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible>,
    RB: From<Fixed>,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = ProbesFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(state) = &self.state else {
            return ProbesFuture::Inner {
                fut: self.inner.call(req),
            };
        };
        let (paths, readiness) = &**state;
        match readiness::probe_response(
            req.uri(),
            &paths.livez,
            &paths.readyz,
            &paths.healthz,
            readiness,
        ) {
            Some(resp) => ProbesFuture::Answered { resp: Some(resp) },
            None => ProbesFuture::Inner {
                fut: self.inner.call(req),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Probes`].
    #[project = ProbesProj]
    #[derive(Debug)]
    pub enum ProbesFuture<F> {
        /// Not a probe.
        Inner { #[pin] fut: F },
        /// A probe's answer.
        Answered { resp: Option<Response<Fixed>> },
    }
}

impl<F, RB> Future for ProbesFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: From<Fixed>,
{
    type Output = Result<Response<RB>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ProbesProj::Inner { fut } => fut.poll(cx),
            ProbesProj::Answered { resp } => Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(crate::refusal::internal_error)
                .map(RB::from))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{answered_by, request};
    use keel_core::Shutdown;

    fn paths() -> ProbePaths {
        ProbePaths {
            livez: "/livez".into(),
            readyz: "/readyz".into(),
            healthz: "/healthz".into(),
        }
    }

    #[tokio::test]
    async fn probes_are_answered_here_and_other_paths_go_on() {
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(Default::default(), shutdown.clone());
        let (svc, calls) = answered_by("handler");
        let mut svc = tower::Layer::layer(&ProbesLayer::new(paths(), readiness.clone()), svc);
        let live = crate::layer::service::tests::call(&mut svc, request("/livez")).await;
        assert_eq!(live.0, 200);
        assert_eq!(live.1, "ok\n");
        // Not started yet: not ready, and the handler never saw either probe.
        let ready = crate::layer::service::tests::call(&mut svc, request("/readyz")).await;
        assert_eq!(ready.0, 503);
        assert_eq!(calls.get(), 0);
        let other = crate::layer::service::tests::call(&mut svc, request("/livez/x")).await;
        assert_eq!(other, (200, "handler".to_string()));
        assert_eq!(calls.get(), 1);
    }
}
