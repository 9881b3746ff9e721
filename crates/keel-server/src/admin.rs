//! The admin server: the operator's port, separate from traffic and bound to loopback by default.
//!
//! Endpoints:
//! - `GET /` — this list.
//! - `GET /livez`, `/healthz` — liveness; `GET /readyz[?verbose]` — readiness (same as the main port).
//! - whatever [`AdminRoutes::route`] adds: the facade registers `/debug/runtime` and
//!   `/debug/config`; later issues add `/metrics`, `/debug/tasks`, `/debug/doctor`.
//!
//! The admin port keeps answering through the whole drain, so `/readyz` can be watched turning
//! 503, and stops with the process.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use keel_core::{Phase, Shutdown};
use tokio::net::TcpListener;

use crate::readiness::{self, Readiness};

/// Produces an admin response body: (content type, body).
pub type AdminHandler = Arc<dyn Fn(&Request<Incoming>) -> (&'static str, String) + Send + Sync>;

/// Extra admin endpoints, keyed by exact path.
#[derive(Clone, Default)]
pub struct AdminRoutes {
    routes: BTreeMap<String, (String, AdminHandler)>,
    /// `PUT` handlers (operator actions such as changing the log filter), by path.
    puts: BTreeMap<String, PutHandler>,
}

/// A `PUT` handler: status, content type, body.
pub type PutHandler =
    Arc<dyn Fn(&Request<Incoming>) -> (StatusCode, &'static str, String) + Send + Sync>;

impl std::fmt::Debug for AdminRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.routes.keys()).finish()
    }
}

impl AdminRoutes {
    /// Add `GET path`, described by `help` on the index page.
    pub fn route<F>(&mut self, path: &str, help: &str, f: F) -> &mut Self
    where
        F: Fn(&Request<Incoming>) -> (&'static str, String) + Send + Sync + 'static,
    {
        self.routes
            .insert(path.to_string(), (help.to_string(), Arc::new(f)));
        self
    }

    /// Add `PUT path` (the path should also have a `GET` showing the current state).
    pub fn route_put<F>(&mut self, path: &str, f: F) -> &mut Self
    where
        F: Fn(&Request<Incoming>) -> (StatusCode, &'static str, String) + Send + Sync + 'static,
    {
        self.puts.insert(path.to_string(), Arc::new(f));
        self
    }
}

/// Serve the admin endpoints on `listener` until the lifecycle reaches [`Phase::Stopped`].
pub async fn serve_admin(
    listener: TcpListener,
    readiness: Readiness,
    routes: AdminRoutes,
    shutdown: Shutdown,
) {
    let routes = Arc::new(routes);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let stopped = shutdown.reached(Phase::Stopped);
    tokio::pin!(stopped);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        let routes = routes.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = handle(&req, &readiness, &routes);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn handle(
    req: &Request<Incoming>,
    readiness: &Readiness,
    routes: &AdminRoutes,
) -> Response<Full<Bytes>> {
    if req.method() == Method::PUT
        && let Some(h) = routes.puts.get(req.uri().path())
    {
        let (status, ct, body) = h(req);
        return respond(status, ct, body);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "admin endpoints are GET only (PUT where noted)\n".into(),
        );
    }
    if let Some(r) =
        readiness::probe_response(req.uri(), "/livez", "/readyz", "/healthz", readiness)
    {
        return r;
    }
    let path = req.uri().path();
    if let Some((_, h)) = routes.routes.get(path) {
        let (ct, body) = h(req);
        return respond(StatusCode::OK, ct, body);
    }
    if path == "/" {
        let mut s = String::from(
            "keel admin\n\n/livez        liveness\n/healthz      liveness (alias)\n/readyz       readiness; ?verbose lists every check\n",
        );
        for (p, (help, _)) in &routes.routes {
            s.push_str(&format!("{p:<13} {help}\n"));
        }
        return respond(StatusCode::OK, "text/plain; charset=utf-8", s);
    }
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        format!("no admin endpoint {path}; GET / lists them\n"),
    )
}

fn respond(status: StatusCode, ct: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Bind the admin listener (a single socket: admin traffic needs no sharding).
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
