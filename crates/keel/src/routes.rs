//! Route labels from the router, for every handler: the matched route template
//! (`/users/{id}`) is recorded on the request's [`Context`], so metrics, spans and the task
//! dump are labelled by template whether or not the handler takes a `Context`. Requests no route matched (the router's fallback) keep
//! no template and share the one `unmatched` label, so a scan of random paths cannot grow the
//! series count.
//!
//! gRPC services (added with [`Router::grpc_service`], or merged as tonic's
//! `Routes::into_axum_router`) match one catch-all route per service (`/pkg.Service/{*rest}`);
//! their label is the method path (`/pkg.Service/Method`) instead — a bounded set, interned
//! here, so labelling a call does not allocate.
//!
//! Two ways to get there:
//!
//! - [`Router`], Keel's thin wrapper of axum's, records each template as the route is added
//!   and matches the request's path against them itself (with `matchit`, the matcher axum
//!   uses) before the router runs: no layer on the routes and no allocation. On
//!   `examples/hello`'s `GET /` it cut 976 instructions a request against the layer (19,642
//!   to 18,666 under callgrind) and two of its seventeen allocations (`bench/allocs`).
//! - A plain axum `Router` — given to [`App::serve`](crate::App::serve), or merged into a
//!   [`Router`] — gets [`RouteLabelLayer`] on each of its routes instead: axum applies a route
//!   layer by boxing each route once more, which costs two allocations per request.
//!
//! A path that both a [`Router`]'s own templates and a merged plain router's routes match is
//! labelled by the [`Router`]'s template (it is matched first). Merged gRPC services
//! (`/pkg.Service/…`) never overlap an HTTP route, so they are labelled by method either way.

use std::collections::HashSet;
use std::convert::Infallible;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};

use axum::extract::MatchedPath;
use axum::response::Response;
use axum::routing::MethodRouter;
use bytes::Bytes;
use http::Request;
use keel_core::{BoxError, Context};

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
            let label = grpc_catch_all(template, &req)
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

/// A gRPC call that reached a service's catch-all route (`/pkg.Service/{*rest}`): labelled
/// by its method path instead of the template.
fn grpc_catch_all<B>(template: &str, req: &Request<B>) -> bool {
    template.ends_with(GRPC_CATCH_ALL) && keel_core::grpc::is_grpc(req.headers())
}

/// How a gRPC service's route template ends (see [`Router::grpc_service`]).
const GRPC_CATCH_ALL: &str = "/{*rest}";

/// `router` with every route labelled (see the module doc). A router of nothing but a
/// fallback (a proxy) has no templates: its requests keep the `unmatched` label.
///
/// The result has its handlers turned into routes once, here (`with_state`, as
/// `axum::serve` does): a router left as it was builds each handler's route on every request
/// it serves — with the label layer on it, four allocations per request.
pub fn label_routes(router: axum::Router) -> axum::Router {
    layered(router).with_state(())
}

/// An axum `Router` that knows its route templates, so Keel labels its requests without a
/// layer on every route (see the module doc). Build it as an axum router; give it to
/// [`App::serve`](crate::App::serve), or call it as a `tower::Service` once its state is
/// supplied (`Router<()>`).
///
/// ```
/// use axum::routing::get;
///
/// let router: keel::Router = keel::Router::new()
///     .route("/", get(|| async { "hi\n" }))
///     .route("/users/{id}", get(|| async { "a user\n" }));
/// assert_eq!(router.templates().collect::<Vec<_>>(), ["/", "/users/{id}"]);
/// ```
#[derive(Debug)]
pub struct Router<S = ()> {
    inner: axum::Router<S>,
    table: Arc<Table>,
    /// The gRPC services added with [`Router::grpc_service`], by the index of their template,
    /// called directly (see there); `None` for every other template. Each clone of the router
    /// (one per connection) has its own, so a call needs no clone of the service.
    grpc: Vec<Option<GrpcEndpoint>>,
    /// Headers every answer carries unless its handler set them ([`Router::response_header`]).
    defaults: Option<Arc<Defaults>>,
    /// The gRPC method label this clone (one connection's) handed out last: a connection
    /// mostly calls the same method again, which then costs a comparison instead of the
    /// shared table's lock and lookup.
    last_method: Option<Arc<str>>,
}

/// See [`Router::response_header`].
type Defaults = Vec<(http::HeaderName, http::HeaderValue)>;

/// A gRPC service as the router calls it directly.
type GrpcEndpoint =
    tower::util::BoxCloneSyncService<Request<axum::body::Body>, Response, Infallible>;

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Router {
            inner: self.inner.clone(),
            table: self.table.clone(),
            grpc: self.grpc.clone(),
            defaults: self.defaults.clone(),
            last_method: None,
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Default for Router<S> {
    fn default() -> Self {
        Self::new()
    }
}

/// The templates of a [`Router`], in the order they were added, and their matcher.
#[derive(Clone, Default)]
struct Table {
    /// Template → its index in `templates`.
    matcher: matchit::Router<usize>,
    templates: Vec<Arc<str>>,
    /// gRPC method labels handed out (shared by the clones of one router).
    methods: Arc<Labels>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.templates).finish()
    }
}

impl Table {
    /// Record `template`; its index, unless it was known already.
    fn insert(&mut self, template: &str) -> Option<usize> {
        // axum has accepted the route already, so matchit accepts its template too; the one
        // refusal left is the same template added again (another method on the path), which
        // matchit reports as a conflict.
        let index = self.templates.len();
        self.matcher.insert(template, index).ok()?;
        self.templates.push(Arc::from(template));
        Some(index)
    }

    /// The index of the template the request's path matches, after labelling the request
    /// with it (when it has a context and no label yet). `last_method`: the calling clone's
    /// last gRPC method label.
    #[inline]
    fn route<B>(&self, req: &Request<B>, last_method: &mut Option<Arc<str>>) -> Option<usize> {
        let path = req.uri().path();
        let index = *self.matcher.at(path).ok()?.value;
        if let Some(ctx) = req.extensions().get::<Context>()
            && ctx.route().is_none()
        {
            let template = &self.templates[index];
            // A server-made context knows whether the call is gRPC, which spares the header
            // lookup; one made elsewhere (a test, a background context) may not.
            let method = (template.ends_with(GRPC_CATCH_ALL)
                && (ctx.is_grpc() || keel_core::grpc::is_grpc(req.headers())))
            .then(|| match last_method {
                Some(last) if **last == *path => Some(last.clone()),
                _ => {
                    let label = self.methods.get(path, true)?;
                    *last_method = Some(label.clone());
                    Some(label)
                }
            })
            .flatten();
            ctx.set_route(method.unwrap_or_else(|| template.clone()));
        }
        Some(index)
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            inner: axum::Router::new(),
            table: Arc::default(),
            grpc: Vec::new(),
            defaults: None,
            last_method: None,
        }
    }

    /// Record `template`, with the gRPC service to call directly for it, if any.
    fn record(&mut self, template: &str, grpc: Option<GrpcEndpoint>) {
        if Arc::make_mut(&mut self.table).insert(template).is_some() {
            // `grpc` has one entry per template, added here and nowhere else.
            self.grpc.push(grpc);
        }
    }

    /// The templates this router labels requests by, in the order they were added.
    pub fn templates(&self) -> impl Iterator<Item = &str> {
        self.table.templates.iter().map(|t| &**t)
    }

    /// `axum::Router::route`, recording `path` as a template.
    #[track_caller]
    pub fn route(mut self, path: &str, method_router: MethodRouter<S>) -> Self {
        self.inner = self.inner.route(path, method_router);
        self.record(path, None);
        self
    }

    /// `axum::Router::route_service`, recording `path` as a template.
    #[track_caller]
    pub fn route_service<T>(mut self, path: &str, service: T) -> Self
    where
        T: tower::Service<Request<axum::body::Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        T::Response: axum::response::IntoResponse,
        T::Future: Send + 'static,
    {
        self.inner = self.inner.route_service(path, service);
        self.record(path, None);
        self
    }

    /// A gRPC service (a tonic server, `FooServer::new(..)`), routed as tonic's
    /// `Routes::add_service` routes it — at `/pkg.Service/{*rest}` — with its calls labelled by
    /// method (`/pkg.Service/Method`, at most 256 distinct ones per router, then by the
    /// service's template). Unlike tonic's `Routes`, no fallback is added: a call to a service
    /// nobody serves gets the router's 404, which gRPC clients read as `UNIMPLEMENTED`.
    ///
    /// Its calls are dispatched by the router's own match, not through axum's: axum would
    /// match the path again, percent-decode the `{*rest}` capture into the request's
    /// extensions, record the matched path and clone the boxed route — work a gRPC service
    /// never reads, which cost unary gRPC on `examples/hello` 3,695 instructions and six
    /// allocations a call (59,150 and 31.3 through axum, 55,455 and 25.2 direct, under
    /// callgrind). A [`Router::layer`] added later applies as usual:
    /// from then on, calls go through axum.
    #[track_caller]
    pub fn grpc_service<G>(mut self, service: G) -> Self
    where
        G: tower::Service<Request<tonic::body::Body>, Error = Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        G::Response: axum::response::IntoResponse,
        G::Future: Send + 'static,
    {
        use axum::response::IntoResponse;
        use tower::ServiceExt;
        let path = format!("/{}/{{*rest}}", G::NAME);
        let service =
            service.map_request(|req: Request<axum::body::Body>| req.map(tonic::body::Body::new));
        let direct = GrpcEndpoint::new(service.clone().map_response(IntoResponse::into_response));
        self.inner = self.inner.route_service(&path, service);
        self.record(&path, Some(direct));
        self
    }

    /// Answer every request through this router with `name: value` unless the handler's
    /// response already has `name` (a proxy passing on its upstream's, say). Set again, a
    /// name takes the new value.
    ///
    /// What `axum::middleware::map_response` would do for a fixed header, without a layer's
    /// cost: a layer wraps and boxes every route once more (and sends [`Router::grpc_service`]
    /// calls through axum); this is one lookup on the way out. On the shop's gateway the
    /// layer cost about 2,600 instructions a proxied request (callgrind). A router merged or
    /// nested into another keeps its headers on its own routes; one with no routes (a
    /// fallback alone) has none to keep them on, and they go.
    pub fn response_header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        let defaults = Arc::make_mut(self.defaults.get_or_insert_with(Arc::default));
        defaults.retain(|(n, _)| *n != name);
        defaults.push((name, value));
        self
    }

    /// `axum::Router::merge`. The templates of a merged [`Router`] join this one's; a plain
    /// axum `Router`'s routes are labelled by [`RouteLabelLayer`] instead. A merged
    /// [`Router`]'s [`Router::response_header`]s apply to its routes only.
    #[track_caller]
    pub fn merge(mut self, other: impl Into<Router<S>>) -> Self {
        let other = other.into().defaults_as_layer();
        self.inner = self.inner.merge(other.inner);
        let mut grpc = other.grpc.into_iter();
        for t in &other.table.templates {
            self.record(t, grpc.next().flatten());
        }
        self
    }

    /// `axum::Router::nest`. The nested router's requests are labelled by
    /// [`RouteLabelLayer`] (its templates under `path` are axum's to compose), and its
    /// [`Router::response_header`]s apply to its routes only.
    #[track_caller]
    pub fn nest(mut self, path: &str, router: Router<S>) -> Self {
        self.inner = self
            .inner
            .nest(path, layered(router.defaults_as_layer().inner));
        self
    }

    /// This router with its [`Router::response_header`]s applied by a layer on its routes,
    /// for when it joins another router (whose answers must not get them): the slow way, paid
    /// only by routers that are merged or nested. A route layer: on the routes, not on the
    /// fallback, which a merge or a nest may make the whole router's.
    fn defaults_as_layer(mut self) -> Self {
        if let Some(defaults) = self.defaults.take()
            && self.inner.has_routes()
        {
            let tag = axum::middleware::map_response(move |mut resp: Response| {
                set_defaults(&mut resp, &defaults);
                std::future::ready(resp)
            });
            self.inner = self.inner.route_layer(tag);
            self.grpc.iter_mut().for_each(|g| *g = None);
        }
        self
    }

    /// `axum::Router::fallback`: requests no route matches keep the `unmatched` label.
    pub fn fallback<H, T>(mut self, handler: H) -> Self
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
    {
        self.inner = self.inner.fallback(handler);
        self
    }

    /// `axum::Router::layer`: around every route and the fallback; labels are unchanged.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<Request<axum::body::Body>> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<Request<axum::body::Body>>>::Response:
            axum::response::IntoResponse + 'static,
        <L::Service as tower::Service<Request<axum::body::Body>>>::Error:
            Into<Infallible> + 'static,
        <L::Service as tower::Service<Request<axum::body::Body>>>::Future: Send + 'static,
    {
        self.inner = self.inner.layer(layer);
        // The layer wraps the gRPC routes too: they are axum's to call from now on.
        self.grpc.iter_mut().for_each(|g| *g = None);
        self
    }

    /// `axum::Router::with_state`.
    pub fn with_state<S2>(self, state: S) -> Router<S2> {
        Router {
            inner: self.inner.with_state(state),
            table: self.table,
            grpc: self.grpc,
            defaults: self.defaults,
            last_method: None,
        }
    }
}

impl Router<()> {
    /// The router as [`App::serve`](crate::App::serve) runs it: handlers turned into routes
    /// once, here, as `axum::serve` does (left as they are, each request would build its
    /// handler's route again).
    pub(crate) fn prepared(self) -> Router<()> {
        Router {
            inner: self.inner.with_state(()),
            table: self.table,
            grpc: self.grpc,
            defaults: self.defaults,
            last_method: None,
        }
    }
}

/// A plain axum router, its routes labelled by [`RouteLabelLayer`].
impl<S: Clone + Send + Sync + 'static> From<axum::Router<S>> for Router<S> {
    fn from(router: axum::Router<S>) -> Self {
        Router {
            inner: layered(router),
            table: Arc::default(),
            grpc: Vec::new(),
            defaults: None,
            last_method: None,
        }
    }
}

/// `router` with [`RouteLabelLayer`] on its routes (axum refuses a route layer on none).
fn layered<S: Clone + Send + Sync + 'static>(router: axum::Router<S>) -> axum::Router<S> {
    if router.has_routes() {
        router.route_layer(RouteLabelLayer::default())
    } else {
        router
    }
}

impl<B> tower::Service<Request<B>> for Router<()>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = RouterFuture<<axum::Router as tower::Service<Request<B>>>::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request<B>>::poll_ready(&mut self.inner, cx)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(index) = self.table.route(&req, &mut self.last_method)
            && let Some(Some(grpc)) = self.grpc.get_mut(index)
            // tonic's services are always ready; one that is not goes through axum, which
            // waits for it on a clone.
            && grpc
                .poll_ready(&mut TaskContext::from_waker(std::task::Waker::noop()))
                .is_ready()
        {
            return RouterFuture {
                dispatch: Dispatch::Grpc {
                    fut: grpc.call(req.map(axum::body::Body::new)),
                },
                defaults: self.defaults.clone(),
            };
        }
        RouterFuture {
            dispatch: Dispatch::Axum {
                fut: self.inner.call(req),
            },
            defaults: self.defaults.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of a [`Router`]'s call.
    pub struct RouterFuture<F> {
        #[pin]
        dispatch: Dispatch<F>,
        defaults: Option<Arc<Defaults>>,
    }
}

pin_project_lite::pin_project! {
    /// Where a [`Router`]'s call went: axum's router, or a gRPC service called directly.
    #[project = DispatchProj]
    enum Dispatch<F> {
        /// Through axum's router.
        Axum { #[pin] fut: F },
        /// A gRPC service's own (boxed, as axum's would be).
        Grpc { fut: <GrpcEndpoint as tower::Service<Request<axum::body::Body>>>::Future },
    }
}

/// `defaults` on `resp`, where it has none of its own.
fn set_defaults(resp: &mut Response, defaults: &Defaults) {
    for (name, value) in defaults {
        if let http::header::Entry::Vacant(slot) = resp.headers_mut().entry(name.clone()) {
            slot.insert(value.clone());
        }
    }
}

impl<F> std::fmt::Debug for RouterFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterFuture")
    }
}

impl<F> std::future::Future for RouterFuture<F>
where
    F: std::future::Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = match this.dispatch.project() {
            DispatchProj::Axum { fut } => fut.poll(cx),
            DispatchProj::Grpc { fut } => fut.as_mut().poll(cx),
        };
        match this.defaults {
            None => out,
            Some(defaults) => out.map_ok(|mut resp| {
                set_defaults(&mut resp, defaults);
                resp
            }),
        }
    }
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

    /// Call `router` with `path` in a fresh context; the label it got.
    async fn label_of(router: &mut Router, method: http::Method, path: &str) -> Option<String> {
        use tower::{Service as _, ServiceExt};
        let ctx = Context::background(std::time::Duration::from_secs(5));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(ctx.clone());
        ServiceExt::<Request<axum::body::Body>>::ready(router)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap();
        ctx.route().map(|r| r.to_string())
    }

    #[tokio::test]
    async fn the_router_labels_by_its_templates_and_leaves_strays_unlabelled() {
        use axum::routing::{get, post};
        let mut router: Router = Router::new()
            .route("/users/{id}", get(|| async {}))
            // A second method on a known path adds no template.
            .route("/users/{id}", post(|| async {}))
            .route("/users/me", get(|| async {}))
            .merge(Router::new().route("/orders/{*rest}", get(|| async {})))
            .nest("/admin", Router::new().route("/stats", get(|| async {})))
            .prepared();
        assert_eq!(
            router.templates().collect::<Vec<_>>(),
            ["/users/{id}", "/users/me", "/orders/{*rest}"]
        );
        use http::Method;
        let cases = [
            (Method::GET, "/users/u1", Some("/users/{id}")),
            (Method::POST, "/users/u2", Some("/users/{id}")),
            // Method not allowed is still the route's request.
            (Method::DELETE, "/users/u3", Some("/users/{id}")),
            // The static route wins, as in axum.
            (Method::GET, "/users/me", Some("/users/me")),
            (Method::GET, "/orders/a/b/c", Some("/orders/{*rest}")),
            // Nested: axum's own template, recorded by the route layer.
            (Method::GET, "/admin/stats", Some("/admin/stats")),
            (Method::GET, "/nope", None),
            (Method::GET, "/users", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(
                label_of(&mut router, method.clone(), path).await.as_deref(),
                want,
                "{method} {path}"
            );
        }
    }

    #[tokio::test]
    async fn grpc_calls_are_labelled_by_method_and_other_requests_by_template() {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let mut router: Router = Router::new().grpc_service(health).prepared();
        assert_eq!(
            router.templates().collect::<Vec<_>>(),
            ["/grpc.health.v1.Health/{*rest}"]
        );
        let label = |grpc: bool, path: &'static str| {
            let ctx = Context::background(std::time::Duration::from_secs(5));
            let mut req = Request::post(path);
            if grpc {
                req = req.header("content-type", "application/grpc");
            }
            let mut req = req.body(axum::body::Body::empty()).unwrap();
            req.extensions_mut().insert(ctx.clone());
            let mut router = router.clone();
            async move {
                tower::ServiceExt::oneshot(&mut router, req).await.unwrap();
                ctx.route().map(|r| r.to_string())
            }
        };
        assert_eq!(
            label(true, "/grpc.health.v1.Health/Check").await.as_deref(),
            Some("/grpc.health.v1.Health/Check")
        );
        assert_eq!(
            label(true, "/grpc.health.v1.Health/Watch").await.as_deref(),
            Some("/grpc.health.v1.Health/Watch")
        );
        // Not gRPC: the template, so a scan of method names makes no series.
        assert_eq!(
            label(false, "/grpc.health.v1.Health/Check")
                .await
                .as_deref(),
            Some("/grpc.health.v1.Health/{*rest}")
        );
        // A service nobody serves: no route, no label (and a 404).
        assert_eq!(label(true, "/pkg.Nope/Call").await, None);
        let resp = tower::ServiceExt::oneshot(
            &mut router,
            Request::post("/pkg.Nope/Call")
                .header("content-type", "application/grpc")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 404);

        // One clone (one connection) calling methods in turn: the label it remembers from
        // its last call is reused only for that same method.
        let mut conn = router.clone();
        for method in ["Check", "Check", "Watch", "Watch", "Check"] {
            let path = format!("/grpc.health.v1.Health/{method}");
            let ctx = Context::background(std::time::Duration::from_secs(5));
            let mut req = Request::post(path.as_str())
                .header("content-type", "application/grpc")
                .body(axum::body::Body::empty())
                .unwrap();
            req.extensions_mut().insert(ctx.clone());
            tower::ServiceExt::oneshot(&mut conn, req).await.unwrap();
            assert_eq!(ctx.route().map(|r| r.to_string()), Some(path));
        }
    }

    #[tokio::test]
    async fn a_grpc_call_is_answered_by_the_service_and_a_later_layer_still_wraps_it() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router: Router = Router::new().grpc_service(health.clone()).prepared();
        // A real gRPC client over the router (the direct path): the service's answer whole.
        let mut client = HealthClient::new(router);
        let check = |service: &str| HealthCheckRequest {
            service: service.into(),
        };
        let answer = client.check(check("")).await.unwrap().into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32);
        let unknown = client.check(check("nobody")).await.unwrap_err();
        assert_eq!(
            unknown.code(),
            tonic::Code::NotFound,
            "the service's own status"
        );

        // A layer added after the service wraps its calls: they go through axum then.
        let tag = axum::middleware::map_response(|mut resp: Response| async move {
            resp.headers_mut()
                .insert("x-layered", http::HeaderValue::from_static("yes"));
            resp
        });
        let layered: Router = Router::new().grpc_service(health).layer(tag).prepared();
        let mut client = HealthClient::new(layered.clone());
        let answer = client.check(check("")).await.unwrap();
        assert_eq!(answer.metadata().get("x-layered").unwrap(), "yes");
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    }

    #[tokio::test]
    async fn a_label_already_recorded_is_kept() {
        use axum::routing::get;
        let mut router: Router = Router::new().route("/a/{x}", get(|| async {}));
        let ctx = Context::background(std::time::Duration::from_secs(5));
        ctx.set_route(Arc::from("/outer/{x}"));
        let mut req = Request::get("/a/1")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(ctx.clone());
        tower::ServiceExt::oneshot(&mut router, req).await.unwrap();
        assert_eq!(ctx.route().map(|r| &**r), Some("/outer/{x}"));
    }

    /// `router`'s answer to `GET path`: its status and the `x-tag` and `x-b` headers.
    async fn tags(router: &Router, path: &str) -> (u16, Option<String>, Option<String>) {
        let req = Request::get(path).body(axum::body::Body::empty()).unwrap();
        let resp = tower::ServiceExt::oneshot(router.clone(), req)
            .await
            .unwrap();
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        (resp.status().as_u16(), h("x-tag"), h("x-b"))
    }

    #[tokio::test]
    async fn response_headers_tag_every_answer_the_handler_did_not_tag_itself() {
        use axum::response::IntoResponse;
        use axum::routing::get;
        use http::{HeaderName, HeaderValue};
        let tag = HeaderName::from_static("x-tag");
        let b = HeaderName::from_static("x-b");
        let merged = Router::new()
            .route("/merged", get(|| async { "m" }))
            .response_header(b.clone(), HeaderValue::from_static("merged"));
        let nested = Router::new()
            .route("/n", get(|| async { "n" }))
            .response_header(b.clone(), HeaderValue::from_static("nested"));
        let router: Router = Router::new()
            .route("/", get(|| async { "hi" }))
            .route(
                "/own",
                get(|| async { ([("x-tag", "upstream")], "proxied").into_response() }),
            )
            .response_header(tag.clone(), HeaderValue::from_static("first"))
            // Set again: the new value wins.
            .response_header(tag, HeaderValue::from_static("gateway"))
            .merge(merged)
            .nest("/inner", nested)
            .prepared();
        let gw = Some("gateway".to_string());
        assert_eq!(tags(&router, "/").await, (200, gw.clone(), None));
        // The handler's own value stays (a proxy's upstream said who answered).
        assert_eq!(
            tags(&router, "/own").await,
            (200, Some("upstream".into()), None)
        );
        // No route: the fallback's 404 is tagged too.
        assert_eq!(tags(&router, "/nowhere").await, (404, gw.clone(), None));
        // A merged or nested router's headers reach its own routes and no others.
        let merged_tag = Some("merged".to_string());
        assert_eq!(
            tags(&router, "/merged").await,
            (200, gw.clone(), merged_tag)
        );
        let nested_tag = Some("nested".to_string());
        assert_eq!(tags(&router, "/inner/n").await, (200, gw, nested_tag));
    }

    #[tokio::test]
    async fn a_response_header_leaves_grpc_calls_direct_and_tags_them() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router: Router = Router::new()
            .grpc_service(health)
            .response_header(
                http::HeaderName::from_static("x-tag"),
                http::HeaderValue::from_static("yes"),
            )
            .prepared();
        assert!(
            router.grpc.iter().all(Option::is_some),
            "still called directly"
        );
        let answer = HealthClient::new(router)
            .check(HealthCheckRequest { service: "".into() })
            .await
            .unwrap();
        assert_eq!(answer.metadata().get("x-tag").unwrap(), "yes");
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    }
}
