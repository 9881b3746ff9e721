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

use std::collections::HashSet;
use std::convert::Infallible;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};

use axum::extract::MatchedPath;
use http::Request;
use keel_core::Context;

/// Most distinct gRPC method labels one router takes: method names come from the caller (an
/// unknown method reaches the service's catch-all route too), so past this many a call is
/// labelled by its service's template instead, and the series count stays bounded.
const MAX_METHODS: usize = 256;

/// Records each route's template on the request's [`Context`]; use with
/// `Router::route_layer` (which [`App::serve`](crate::App::serve) does for you).
///
/// axum applies a route layer when a request reaches the route, so the layer itself holds the
/// interned labels: every request of the router shares them, and labelling allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct RouteLabelLayer {
    labels: Arc<Labels>,
}

impl<S> tower::Layer<S> for RouteLabelLayer {
    type Service = RouteLabel<S>;
    fn layer(&self, inner: S) -> RouteLabel<S> {
        RouteLabel {
            inner,
            labels: self.labels.clone(),
        }
    }
}

/// See [`RouteLabelLayer`].
#[derive(Debug, Clone)]
pub struct RouteLabel<S> {
    inner: S,
    labels: Arc<Labels>,
}

/// The labels a router has handed out: read-mostly (a new one appears once per template or
/// gRPC method), so a read lock serves every request after the first of each. The set is
/// bounded (the router's templates, at most [`MAX_METHODS`] method names), so a fast hasher
/// serves where SipHash's flood resistance buys nothing.
#[derive(Debug, Default)]
struct Labels(RwLock<HashSet<Arc<str>, BuildHasherDefault<keel_core::fasthash::AddrHasher>>>);

impl Labels {
    /// The shared label for `label`; `None` when it is new and `bounded` labels are full.
    fn get(&self, label: &str, bounded: bool) -> Option<Arc<str>> {
        if let Some(l) = self.0.read().unwrap_or_else(|p| p.into_inner()).get(label) {
            return Some(l.clone());
        }
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = all.get(label) {
            return Some(l.clone());
        }
        // Templates are few (the router's own); the cap guards caller-chosen method names.
        if bounded && all.len() >= MAX_METHODS {
            return None;
        }
        let l: Arc<str> = Arc::from(label);
        all.insert(l.clone());
        Some(l)
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
            let grpc_method =
                template.ends_with("/{*rest}") && keel_core::grpc::is_grpc(req.headers());
            let label = grpc_method
                .then(|| self.labels.get(req.uri().path(), true))
                .flatten()
                .or_else(|| self.labels.get(template, false));
            if let Some(label) = label {
                ctx.set_route(label);
            }
        }
        self.inner.call(req)
    }
}

/// `router` with every route labelled (see the module doc). A router of nothing but a
/// fallback (a proxy) has no templates: its requests keep the `unmatched` label.
///
/// The result has its handlers turned into routes once, here (`with_state`, as
/// `axum::serve` does): a router left as it was builds each handler's route on every request
/// it serves — with the label layer on it, four allocations per request.
pub fn label_routes(router: axum::Router) -> axum::Router {
    let router = if router.has_routes() {
        router.route_layer(RouteLabelLayer::default())
    } else {
        router
    };
    router.with_state(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_router_hands_out_one_shared_label_per_distinct_name() {
        let labels = Labels::default();
        let a = labels.get("/users/{id}", false).unwrap();
        let b = labels.get("/users/{id}", false).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the common case allocates once");
        let m1 = labels.get("/pkg.S/One", true).unwrap();
        assert!(Arc::ptr_eq(&m1, &labels.get("/pkg.S/One", true).unwrap()));
        assert!(!Arc::ptr_eq(&a, &m1));
        for i in 0..MAX_METHODS {
            labels.get(&format!("/pkg.S/M{i}"), true);
        }
        // Full: a new caller-chosen name gets no label of its own; known ones and templates
        // still do.
        assert!(labels.get("/pkg.S/Fresh", true).is_none());
        assert!(labels.get("/pkg.S/M3", true).is_some());
        assert!(labels.get("/orders/{id}", false).is_some());
    }
}
