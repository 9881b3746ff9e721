//! Route labels from the router, for every handler: the matched route template
//! (`/users/{id}`, axum's `MatchedPath`) is recorded on the request's [`Context`] by a layer
//! on each route, so metrics, spans and the task dump are labelled by template whether or
//! not the handler takes a `Context`. Requests no route matched (the router's fallback) keep
//! no template and share the one `unmatched` label, so a scan of random paths cannot grow the
//! series count.
//!
//! gRPC services merged into the router (tonic's `Routes::into_axum_router`) match one
//! catch-all route per service (`/pkg.Service/{*rest}`); their label is the method path
//! (`/pkg.Service/Method`) instead — a bounded set, interned here, so labelling a call does
//! not allocate.
//!
//! [`App::serve`](crate::App::serve) adds the layer to an axum `Router` by itself.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};

use axum::extract::MatchedPath;
use http::Request;
use keel_core::Context;

/// Most distinct labels one route remembers (gRPC methods of one service). Past it a label is
/// still recorded, with an allocation per request.
const MAX_INTERNED: usize = 64;

/// Records each route's template on the request's [`Context`]; use with
/// `Router::route_layer` (which [`App::serve`](crate::App::serve) does for you).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLabelLayer;

impl<S> tower::Layer<S> for RouteLabelLayer {
    type Service = RouteLabel<S>;
    fn layer(&self, inner: S) -> RouteLabel<S> {
        RouteLabel {
            inner,
            labels: Arc::default(),
        }
    }
}

/// See [`RouteLabelLayer`].
#[derive(Debug, Clone)]
pub struct RouteLabel<S> {
    inner: S,
    labels: Arc<Labels>,
}

/// The labels one route has handed out: nearly always exactly one (its template), kept
/// where a lock-free read finds it.
#[derive(Debug, Default)]
struct Labels {
    first: OnceLock<Arc<str>>,
    more: Mutex<Vec<Arc<str>>>,
}

impl Labels {
    fn get(&self, label: &str) -> Arc<str> {
        let first = self.first.get_or_init(|| Arc::from(label));
        if &**first == label {
            return first.clone();
        }
        let mut more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = more.iter().find(|l| &***l == label) {
            return l.clone();
        }
        let l: Arc<str> = Arc::from(label);
        if more.len() < MAX_INTERNED {
            more.push(l.clone());
        }
        l
    }
}

impl<S, B> tower::Service<Request<B>> for RouteLabel<S>
where
    S: tower::Service<Request<B>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let (Some(ctx), Some(matched)) = (
            req.extensions().get::<Context>(),
            req.extensions().get::<MatchedPath>(),
        ) && ctx.route().is_none()
        {
            let template = matched.as_str();
            let label = if template.ends_with("/{*rest}") && keel_core::grpc::is_grpc(req.headers())
            {
                req.uri().path()
            } else {
                template
            };
            ctx.set_route(self.labels.get(label));
        }
        self.inner.call(req)
    }
}

/// `router` with every route labelled (see the module doc). A router of nothing but a
/// fallback (a proxy) has no templates: its requests keep the `unmatched` label.
pub fn label_routes(router: axum::Router) -> axum::Router {
    if router.has_routes() {
        router.route_layer(RouteLabelLayer)
    } else {
        router
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_route_hands_out_one_shared_label_per_distinct_name() {
        let labels = Labels::default();
        let a = labels.get("/users/{id}");
        let b = labels.get("/users/{id}");
        assert!(Arc::ptr_eq(&a, &b), "the common case allocates once");
        let m1 = labels.get("/pkg.S/One");
        let m1_again = labels.get("/pkg.S/One");
        assert!(Arc::ptr_eq(&m1, &m1_again));
        for i in 0..(MAX_INTERNED + 10) {
            assert_eq!(
                &*labels.get(&format!("/pkg.S/M{i}")),
                format!("/pkg.S/M{i}")
            );
        }
        assert_eq!(labels.more.lock().unwrap().len(), MAX_INTERNED);
    }
}
