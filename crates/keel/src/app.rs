//! `App`: one service's wiring — config, runtime, readiness, admin, serving and drain.

use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use keel_config::{ConfigError, Loaded};
use keel_core::observe::SharedObserver;
use keel_core::tasks::Registry;
use keel_core::{BoxError, Shutdown};
use keel_runtime::Sizing;
use keel_server::{
    AdminRoutes, DrainOutcome, HttpSettings, Readiness, RequestBody, Server, ServerHandle,
};

use crate::config::{Config, Sources};

/// Errors that stop a service from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A second stop signal cut the drain short.
    #[error("stopped by a second signal before the drain finished")]
    Forced,
    /// `app.client(name)` for a name with no `[clients.<name>]` section.
    #[error("no upstream named {0:?} in [clients]; configured: {1}")]
    UnknownClient(String, String),
    /// Anything else.
    #[error("{0}")]
    Other(BoxError),
}

struct Inner {
    name: String,
    loaded: Loaded<Config>,
    /// This App's task registry (requests, their tasks, background loops).
    registry: &'static Registry,
    /// This App's metrics and span export.
    telemetry: keel_telemetry::Telemetry,
    /// What its server, clients and consumers report to: `None` when neither metrics nor
    /// span export is on, so the request path records nothing at all.
    observer: Option<SharedObserver>,
    sizing: Sizing,
    shutdown: Shutdown,
    readiness: Readiness,
    admin_routes: Mutex<AdminRoutes>,
    clients: Mutex<std::collections::HashMap<String, Arc<keel_client::client::Client>>>,
}

/// A service being assembled. Cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl App {
    /// Build from loaded config and a runtime sizing decision.
    pub fn new(name: &str, loaded: Loaded<Config>, sizing: Sizing) -> App {
        let shutdown = Shutdown::new();
        let registry = Registry::leaked(loaded.value.tasks.leak_grace.get());
        let readiness =
            Readiness::with_registry(loaded.value.readiness.clone(), shutdown.clone(), registry);
        let telemetry = crate::wiring::telemetry(&loaded.value.metrics, registry);
        let observer: Option<SharedObserver> = (loaded.value.metrics.enabled
            || crate::wiring::tracing_configured(&loaded.value.tracing, name))
        .then(|| Arc::new(telemetry.clone()) as SharedObserver);
        let app = App {
            inner: Arc::new(Inner {
                name: name.to_string(),
                registry,
                telemetry,
                observer,
                loaded,
                sizing,
                shutdown,
                readiness,
                admin_routes: Mutex::new(AdminRoutes::default()),
                clients: Mutex::new(std::collections::HashMap::new()),
            }),
        };
        app.register_debug_routes();
        app.register_metrics();
        app
    }

    /// This service's metrics (register your own families with `add_collector`).
    pub fn metrics(&self) -> &keel_telemetry::Metrics {
        &self.inner.telemetry.metrics
    }

    /// What this service's server, clients and consumers report to (metrics and spans);
    /// `None` when both are off. Give it to a message consumer's config so its deliveries
    /// are traced and counted with this service.
    pub fn observer(&self) -> Option<SharedObserver> {
        self.inner.observer.clone()
    }

    /// This service's task registry (`/debug/tasks`).
    pub fn registry(&self) -> &'static Registry {
        self.inner.registry
    }

    /// A context for work no request started (a scheduled job, a consumer's outbound call),
    /// with `timeout` from now as its deadline and its tasks listed in this service's
    /// registry. Passing it to a client is the explicit way to call without a request.
    pub fn background_context(&self, timeout: std::time::Duration) -> keel_core::Context {
        keel_core::Context::background_in(self.inner.registry, timeout)
    }

    fn register_metrics(&self) {
        if !self.config().metrics.enabled {
            return;
        }
        let metrics = self.inner.telemetry.metrics.clone();
        self.admin_route(
            "/metrics",
            "Prometheus metrics (text format 0.0.4)",
            move |_| (crate::wiring::CONTENT_TYPE, metrics.render()),
        );
    }

    /// Scrape-time collectors of this app's server, clients and runtime, on its own metrics.
    fn register_collectors(&self, handle: &ServerHandle) {
        let metrics = self.metrics();
        let weak = Arc::downgrade(&self.inner);
        let server = handle.clone();
        let overload = handle.clone();
        let lifecycle = self.inner.shutdown.clone();
        {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                keel_telemetry::collectors::runtime(metrics, rt);
            }
            metrics.add_collector(move |e| {
                let s = server.stats();
                let fams: [(&str, &str, &str, u64); 9] = [
                    ("keel_server_connections", "Open connections on the main port.", "gauge", s.connections.load(Ordering::Relaxed) as u64),
                    ("keel_server_connections_parked", "Open connections parked while idle, holding no HTTP/1 buffers (server.park_idle_after).", "gauge", s.parked.load(Ordering::Relaxed) as u64),
                    ("keel_server_held", "Work held open past its request that a drain waits for (the gateway's WebSocket tunnels).", "gauge", lifecycle.held() as u64),
                    ("keel_server_connections_accepted_total", "Connections accepted since start.", "counter", s.accepted.load(Ordering::Relaxed)),
                    ("keel_server_header_timeouts_total", "Connections closed for sending a request head too slowly.", "counter", s.header_timeouts.load(Ordering::Relaxed)),
                    ("keel_server_send_timeouts_total", "Connections closed because the peer took no byte of a response for server.send_timeout.", "counter", s.send_timeouts.load(Ordering::Relaxed)),
                    ("keel_server_body_too_large_total", "Requests refused with 413 before reaching the handler.", "counter", s.body_too_large.load(Ordering::Relaxed)),
                    ("keel_server_refused_on_arrival_total", "Requests refused on arrival: malformed propagation header (400) or deadline already passed (504).", "counter", s.refused_on_arrival.load(Ordering::Relaxed)),
                    ("keel_server_deadline_exceeded_total", "Handlers cut off by their request's deadline.", "counter", s.deadline_exceeded.load(Ordering::Relaxed)),
                ];
                for (name, help, kind, v) in fams {
                    e.family(name, help, kind);
                    e.sample(name, &[], v as f64);
                }
            });
            metrics.add_collector(move |e| {
                if let Some(o) = overload.overload() {
                    crate::wiring::overload_families(e, &o);
                }
            });
            metrics.add_collector(move |e| {
                let clients: Vec<Arc<keel_client::client::Client>> = weak
                    .upgrade()
                    .map(|inner| {
                        inner
                            .clients
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .values()
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                crate::wiring::client_families(e, &clients);
            });
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The effective config.
    pub fn config(&self) -> &Config {
        &self.inner.loaded.value
    }

    /// The config with its layers and hash.
    pub fn loaded_config(&self) -> &Loaded<Config> {
        &self.inner.loaded
    }

    /// Readiness: register dependency checks here.
    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    /// The lifecycle; `on_drain` registers deregistration hooks.
    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// The runtime sizing decision.
    pub fn sizing(&self) -> &Sizing {
        &self.inner.sizing
    }

    /// The client for upstream `name` (`[clients.<name>]`), built on first use and shared
    /// afterwards: pooled, balanced, retrying within a budget, breaking, and propagating the
    /// request context with this service's `[propagation]` margin and B3 format.
    pub fn client(&self, name: &str) -> Result<Arc<keel_client::client::Client>, Error> {
        let mut clients = self.inner.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let settings = self.config().clients.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.config().clients.keys().map(String::as_str).collect();
            Error::UnknownClient(
                name.to_string(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            )
        })?;
        // Validated at load time, so endpoints parse; an error here is still reported, not
        // unwrapped.
        let client = Arc::new(
            settings
                .build(name, self.config().propagation.outbound(false))
                .map_err(|e| Error::Other(Box::new(e)))?
                .observed_by(self.inner.observer.clone()),
        );
        clients.insert(name.to_string(), client.clone());
        Ok(client)
    }

    /// Add an admin endpoint.
    pub fn admin_route<F>(&self, path: &str, help: &str, f: F)
    where
        F: Fn(&Request<hyper::body::Incoming>) -> (&'static str, String) + Send + Sync + 'static,
    {
        if let Ok(mut r) = self.inner.admin_routes.lock() {
            r.route(path, help, f);
        }
    }

    /// Add a `PUT` admin endpoint (an operator action); give it a `GET` too.
    pub fn admin_route_put<F>(&self, path: &str, f: F)
    where
        F: Fn(&Request<hyper::body::Incoming>) -> (http::StatusCode, &'static str, String)
            + Send
            + Sync
            + 'static,
    {
        if let Ok(mut r) = self.inner.admin_routes.lock() {
            r.route_put(path, f);
        }
    }

    fn register_debug_routes(&self) {
        self.admin_route(
            "/debug/log",
            "the log filter in force; PUT ?filter=info,keel_server=debug changes it",
            |_| {
                let text = crate::logging::current_filter()
                    .unwrap_or_else(|| "(logging not set up by Keel)".to_string());
                ("text/plain; charset=utf-8", format!("{text}\n"))
            },
        );
        self.admin_route_put("/debug/log", |req| {
            let wanted = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("filter=")))
                .map(percent_decode);
            match wanted {
                None => (
                    http::StatusCode::BAD_REQUEST,
                    "text/plain; charset=utf-8",
                    "missing ?filter=<directives>, e.g. ?filter=info,keel_server=debug\n".into(),
                ),
                Some(f) => match crate::logging::set_filter(&f) {
                    Ok(()) => (
                        http::StatusCode::OK,
                        "text/plain; charset=utf-8",
                        format!("{f}\n"),
                    ),
                    Err(e) => (
                        http::StatusCode::BAD_REQUEST,
                        "text/plain; charset=utf-8",
                        format!("invalid log filter {f:?}: {e}\n"),
                    ),
                },
            }
        });
        let weak = Arc::downgrade(&self.inner);
        self.admin_route(
            "/debug/runtime",
            "worker threads, shards and why",
            move |_| {
                let Some(inner) = weak.upgrade() else {
                    return ("text/plain", "shutting down\n".into());
                };
                let tokio_workers = tokio::runtime::Handle::try_current()
                    .map(|h| h.metrics().num_workers())
                    .ok();
                let v = serde_json::json!({
                    "workers": inner.sizing.workers,
                    "reason": inner.sizing.reason,
                    "cgroup": inner.sizing.cgroup,
                    "available_cpus": inner.sizing.available_cpus,
                    "shard_mode": inner.loaded.value.runtime.shards,
                    "shards": inner.sizing.shards,
                    "control_runtime_workers": tokio_workers,
                });
                ("application/json", pretty(&v))
            },
        );
        let registry = self.inner.registry;
        self.admin_route(
            "/debug/tasks",
            "live Keel tasks, leak suspects first (JSON; ?format=text for people)",
            move |req| {
                let text = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "format=text"));
                if text {
                    return ("text/plain; charset=utf-8", registry.render_text());
                }
                let tasks = registry.snapshot();
                let v = serde_json::json!({
                    "live": tasks.len(),
                    "leak_suspects_total": registry.leak_suspects_total(),
                    "tasks": tasks,
                });
                ("application/json", pretty(&v))
            },
        );
        let weak = Arc::downgrade(&self.inner);
        self.admin_route(
            "/debug/config",
            "effective config (secrets redacted), layers, hash",
            move |_| {
                let Some(inner) = weak.upgrade() else {
                    return ("text/plain", "shutting down\n".into());
                };
                let l = &inner.loaded;
                let v = serde_json::json!({
                    "hash": l.hash(),
                    "layers": l.layers(),
                    "config": l.redacted(),
                });
                ("application/json", pretty(&v))
            },
        );
        let weak = Arc::downgrade(&self.inner);
        self.admin_route(
            "/debug/clients",
            "upstreams in use: pools, reuse, TIME_WAIT, retries, breakers, endpoints (JSON)",
            move |_| {
                let Some(inner) = weak.upgrade() else {
                    return ("text/plain", "shutting down\n".into());
                };
                let clients: Vec<_> = inner
                    .clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                let v: Vec<serde_json::Value> = clients.iter().map(|c| client_report(c)).collect();
                ("application/json", pretty(&serde_json::Value::Array(v)))
            },
        );
    }

    /// Serve `service` until a stop signal, then drain. Returns once the drain is over.
    ///
    /// An axum `Router` is labelled by its route templates for metrics, spans and the task
    /// dump ([`crate::routes`]); any other service labels its requests itself with
    /// [`Context::set_route`](keel_core::Context::set_route), or shares the `unmatched` label.
    pub async fn serve<S, B>(self, service: S) -> Result<(), Error>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Installed before anything can report ready, so an early SIGTERM drains instead of
        // killing the process with the default action.
        let (stop, again) = keel_server::stop_signals()?;
        self.serve_until(service, stop, again).await
    }

    /// [`App::serve`] with explicit stop triggers (tests, embedding).
    pub async fn serve_until<S, B, F1, F2>(
        self,
        service: S,
        stop: F1,
        again: F2,
    ) -> Result<(), Error>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        F1: Future<Output = ()>,
        F2: Future<Output = ()>,
    {
        let service = label_if_router(service);
        let cfg = self.config().clone();
        let inner = &self.inner;
        let shards = inner.sizing.shards.clone();
        let listeners = if shards.is_empty() {
            cfg.server.listeners.unwrap_or(inner.sizing.workers)
        } else {
            // One listener per shard: each shard's runtime accepts on its own socket.
            shards.len()
        };
        let tracer = crate::wiring::start_tracer(&cfg.tracing, &inner.name, &inner.telemetry);
        let mut propagation = cfg.propagation.clone();
        // Sampling is configured with tracing (`tracing.sample_ratio`, or the standard
        // `OTEL_TRACES_SAMPLER`/`_ARG`); the server applies it to the traces it starts.
        propagation.sample_ratio = crate::wiring::sample_ratio(&cfg.tracing, &inner.name);
        let settings = HttpSettings {
            server: cfg.server.clone(),
            probes: cfg.probes.clone(),
            deadline: cfg.deadline.clone(),
            propagation,
            overload: cfg.overload.clone(),
        };
        let server = Server::bind_with(
            &settings,
            listeners,
            inner.readiness.clone(),
            inner.shutdown.clone(),
            inner.registry,
            inner.observer.clone(),
        )?;
        start_leak_sweep(inner.registry, &cfg.tasks);
        let handle: ServerHandle = server.handle();
        tracing::info!(service = %inner.name, addr = %server.local_addr(), listeners, config_hash = %&inner.loaded.hash()[..12], "serving");

        self.register_collectors(&handle);
        let stats = handle.clone();
        let registry = inner.registry;
        let lifecycle = inner.shutdown.clone();
        self.admin_route(
            "/debug/server",
            "connections and requests in flight, limit counters",
            move |_| {
                let s = stats.stats();
                let v = serde_json::json!({
                    "in_flight": s.in_flight.load(Ordering::Relaxed),
                    "held": lifecycle.held(),
                    "connections": s.connections.load(Ordering::Relaxed),
                    "parked": s.parked.load(Ordering::Relaxed),
                    "accepted": s.accepted.load(Ordering::Relaxed),
                    "header_timeouts": s.header_timeouts.load(Ordering::Relaxed),
                    "send_timeouts": s.send_timeouts.load(Ordering::Relaxed),
                    "body_too_large": s.body_too_large.load(Ordering::Relaxed),
                    "refused_on_arrival": s.refused_on_arrival.load(Ordering::Relaxed),
                    "deadline_exceeded": s.deadline_exceeded.load(Ordering::Relaxed),
                    "live_tasks": registry.live(),
                    "overload": stats.overload().map(|o| serde_json::json!({
                        "limit": o.limit,
                        "in_flight": o.in_flight,
                        "queued": o.queued,
                        "expected_ms": o.expected.as_secs_f64() * 1e3,
                        "baseline_ms": o.baseline.as_secs_f64() * 1e3,
                        "admitted": o.admitted,
                        "shed_queue_full": o.shed[0],
                        "shed_queue_timeout": o.shed[1],
                        "shed_deadline": o.shed[2],
                        "shed_cpu": o.shed[3],
                        "shed_queue_delay": o.shed[4],
                        "cpu_hot": o.cpu_hot,
                        "queue_delay_ms": o.queue_delay.as_secs_f64() * 1e3,
                        "min_queue_delay_ms": o.min_queue_delay.as_secs_f64() * 1e3,
                        "standing_queue": o.standing_queue,
                        "queue_stalled": o.queue_stalled,
                        "max_queue_wait_ms": o.max_queue_wait.as_secs_f64() * 1e3,
                        "cpu": o.cpu,
                    })),
                });
                ("application/json", pretty(&v))
            },
        );

        if cfg.admin.enabled {
            let l = keel_server::admin::bind_admin(cfg.admin.addr)
                .await
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on admin.addr {}: {e}", cfg.admin.addr),
                    )
                })?;
            tracing::info!(addr = %l.local_addr()?, "admin listening");
            let routes = inner
                .admin_routes
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default();
            tokio::spawn(keel_server::serve_admin(
                l,
                inner.readiness.clone(),
                routes,
                inner.shutdown.clone(),
            ));
        }

        inner.readiness.start();
        let serving = if shards.is_empty() {
            let t = tokio::spawn(server.serve(service));
            Serving::Tasks(t)
        } else {
            Serving::Shards(spawn_shards(server, service, &inner.sizing, &cfg.runtime)?)
        };
        inner.readiness.mark_started();

        let outcome =
            keel_server::drain(stop, again, &inner.shutdown, &cfg.shutdown, &[handle]).await;
        // The spans of the last requests go out before the process does.
        tracer.shutdown(std::time::Duration::from_secs(2)).await;
        if outcome == DrainOutcome::Forced {
            return Err(Error::Forced);
        }
        match serving {
            Serving::Tasks(t) => {
                let _ = t.await;
            }
            Serving::Shards(handles) => {
                // Shard threads return promptly once the lifecycle is stopped.
                let _ = tokio::task::spawn_blocking(move || {
                    for h in handles {
                        let _ = h.join();
                    }
                })
                .await;
            }
        }
        Ok(())
    }
}

/// The App's leak sweep: its registry is scanned for tasks alive past their owner's deadline.
fn start_leak_sweep(registry: &'static Registry, cfg: &crate::config::TasksConfig) {
    registry.set_leak_grace(cfg.leak_grace.get());
    let every = cfg.sweep_interval.get();
    keel_core::tasks::spawn_background_in(registry, "task leak sweep", async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            registry.sweep();
        }
    });
}

/// Label the requests of a router by its route templates: a [`crate::Router`] matches its
/// own, a plain axum `Router` gets the route-label layer (the two kinds of service whose
/// templates Keel can read); any other service is left as it is.
fn label_if_router<S: 'static>(mut service: S) -> S {
    let any = &mut service as &mut dyn std::any::Any;
    if let Some(router) = any.downcast_mut::<crate::Router>() {
        *router = router.clone().prepared();
    } else if let Some(router) = any.downcast_mut::<axum::Router>() {
        *router = crate::routes::label_routes(router.clone());
    }
    service
}

enum Serving {
    Tasks(tokio::task::JoinHandle<std::io::Result<()>>),
    Shards(Vec<std::thread::JoinHandle<std::io::Result<()>>>),
}

fn spawn_shards<S, B>(
    server: Server,
    service: S,
    sizing: &Sizing,
    rt: &keel_runtime::RuntimeConfig,
) -> Result<Vec<std::thread::JoinHandle<std::io::Result<()>>>, Error>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let parts: Vec<Mutex<Option<keel_server::ShardServer>>> = server
        .into_shards()
        .into_iter()
        .map(|s| Mutex::new(Some(s)))
        .collect();
    let parts = Arc::new(parts);
    let sizing = sizing.clone();
    let rt = rt.clone();
    // Each shard clones the service once at start; the mutex only makes `S` shareable with
    // the shard threads without demanding `S: Sync` from users.
    let service = Mutex::new(service);
    // `run_sharded` builds every shard runtime before starting any, and drops them again if a
    // thread fails to start; dropping a runtime inside this async context would panic, so the
    // set-up runs on a short-lived plain thread.
    let handles = std::thread::Builder::new()
        .name("keel-shard-setup".into())
        .spawn(move || {
            keel_runtime::run_sharded(&sizing, &rt, move |plan| {
                let part = parts
                    .get(plan.index)
                    .and_then(|m| m.lock().ok().and_then(|mut o| o.take()));
                let svc = service.lock().ok().map(|s| s.clone());
                async move {
                    let Some(svc) = svc else {
                        return Ok(());
                    };
                    match part {
                        Some(p) => p.serve(svc).await,
                        None => Ok(()),
                    }
                }
            })
        })?
        .join()
        .map_err(|_| Error::Other("shard set-up thread panicked".into()))??;
    Ok(handles)
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Run a service: parse Keel's flags (`--config`, `--set`), load and validate config, set up
/// logging, size the runtime from the cgroup quota, and run `f` on it. Invalid config prints
/// every problem and exits 2; a second stop signal exits 130.
pub fn run<F, Fut>(name: &str, f: F) -> ExitCode
where
    F: FnOnce(App) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let sources = match Sources::from_args(std::env::args().skip(1)) {
        Ok(s) => s.with_env_file(),
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    run_with(name, &sources, f)
}

/// [`run`] with explicit config sources.
pub fn run_with<F, Fut>(name: &str, sources: &Sources, f: F) -> ExitCode
where
    F: FnOnce(App) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let loaded = match sources.load() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{name}: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&loaded.value.log);
    let sizing = keel_runtime::detect(&loaded.value.runtime);
    sizing.log();
    // Sharded: the main runtime only runs the control plane (signals, admin, checks); the
    // shards carry the traffic on their own pinned runtimes.
    let runtime = if sizing.shards.is_empty() {
        keel_runtime::build_runtime(&loaded.value.runtime, &sizing)
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("keel-control")
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = App::new(name, loaded, sizing);
    let result = runtime.block_on(f(app));
    // Tasks still alive (streams cancelled at the end of the grace period) are dropped here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Forced) => ExitCode::from(130),
        Err(e) => {
            tracing::error!(error = %e, "service failed");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One upstream as `/debug/clients` shows it. TIME_WAIT is read from `/proc/net/tcp{,6}`
/// here, at request time: it is a scrape-time measurement, never a per-call cost.
fn client_report(c: &keel_client::client::Client) -> serde_json::Value {
    let stats = c.stats();
    let set = c.upstream().endpoints().snapshot();
    let addrs: Vec<std::net::SocketAddr> = set.endpoints.iter().map(|e| e.addr).collect();
    let time_wait = keel_client::sockets::time_wait_towards(&addrs);
    let endpoints: Vec<serde_json::Value> = set
        .endpoints
        .iter()
        .map(|e| {
            let load = c.upstream().load_of(&e.addr);
            let pool = c.pool_stats_of(e.addr).unwrap_or_default();
            serde_json::json!({
                "addr": e.addr.to_string(),
                "priority": e.priority,
                "ejected": c.upstream().outlier().is_ejected(&e.addr),
                "in_flight": load.as_ref().map(|l| l.in_flight()),
                "rtt_ms": load.as_ref().map(|l| l.rtt_estimate().as_secs_f64() * 1e3),
                "requests": pool.requests,
                "connects": pool.connects,
                "connect_errors": pool.connect_errors,
                "open": pool.open,
                "idle": pool.idle,
                "time_wait": time_wait.get(&e.addr).copied().unwrap_or(0),
            })
        })
        .collect();
    let breaker = |b: &keel_client::breaker::BreakerStats| {
        serde_json::json!({
            "requests": b.requests,
            "accepts": b.accepts,
            "local_rejects": b.local_rejects,
            "reject_probability": b.reject_probability,
        })
    };
    let budget = c.budget().stats();
    serde_json::json!({
        "name": c.name(),
        "calls": stats.calls,
        "retries": stats.retries,
        "hedges": stats.hedges,
        "requests": stats.pool.requests,
        "connects": stats.pool.connects,
        "connect_errors": stats.pool.connect_errors,
        "reuse_ratio": stats.pool.reuse_ratio(),
        "open": stats.pool.open,
        "idle": stats.pool.idle,
        "time_wait": time_wait.values().sum::<usize>(),
        "retry_budget": {
            "deposits": budget.deposits,
            "withdrawals": budget.withdrawals,
            "exhausted": budget.exhausted,
        },
        "breaker": breaker(&stats.breaker),
        "route_breakers": stats
            .route_breakers
            .iter()
            .map(|(p, b)| (p.clone(), breaker(b)))
            .collect::<serde_json::Map<_, _>>(),
        "endpoints": endpoints,
    })
}

/// `%XX` escapes and `+` decoded (query strings from curl and browsers); a malformed escape
/// is kept as it came, so the filter parser reports it.
fn percent_decode(s: &str) -> String {
    let form = keel_core::codec::percent::Options {
        plus_as_space: true,
        keep_malformed: true,
    };
    keel_core::codec::percent::decode_lossy(s.as_bytes(), form).unwrap_or_default()
}
