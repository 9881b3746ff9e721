//! The main server: accept loops over a `SO_REUSEPORT` group, and the drain sequence.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use keel_core::{BoxError, Phase, Shutdown};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use keel_core::observe::SharedObserver;
use keel_core::tasks::Registry;

use crate::body::RequestBody;
use crate::config::{HttpSettings, ShutdownConfig};
use crate::conn;
use crate::listener::{Keepalive, ListenOptions, bind_group};
use crate::readiness::Readiness;
use crate::shared::Shared;
use crate::stats::Stats;

/// A bound server, not yet serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
    local_addr: SocketAddr,
    tcp_nodelay: bool,
    tracker: TaskTracker,
}

/// What the rest of the process needs to watch a server drain.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    stats: Arc<Stats>,
    tracker: TaskTracker,
    limiter: Option<crate::overload::Limiter>,
}

impl ServerHandle {
    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The overload limiter's state, when `[overload]` is enabled.
    pub fn overload(&self) -> Option<crate::overload::OverloadStats> {
        self.limiter.as_ref().map(|l| l.stats())
    }

    /// Resolves when every accept loop and connection has finished (after listeners close).
    pub async fn closed(&self) {
        self.tracker.wait().await;
    }
}

impl Server {
    /// Bind `listeners` `SO_REUSEPORT` sockets to `settings.server.addr`, with no telemetry
    /// and tasks listed in [`Registry::global`] (see [`Server::bind_with`]).
    pub fn bind(
        settings: &HttpSettings,
        listeners: usize,
        readiness: Readiness,
        shutdown: Shutdown,
    ) -> io::Result<Server> {
        Server::bind_with(
            settings,
            listeners,
            readiness,
            shutdown,
            Registry::global(),
            None,
        )
    }

    /// [`Server::bind`] for one service: its requests' tasks are listed in `registry` and
    /// its telemetry goes to `observer` (the `keel` facade passes its App's own).
    pub fn bind_with(
        settings: &HttpSettings,
        listeners: usize,
        readiness: Readiness,
        shutdown: Shutdown,
        registry: &'static Registry,
        observer: Option<SharedObserver>,
    ) -> io::Result<Server> {
        let cfg = &settings.server;
        let socks = bind_group(
            cfg.addr,
            ListenOptions {
                count: listeners,
                backlog: cfg.backlog,
                fastopen_queue: cfg.tcp_fastopen_queue,
                keepalive: (!cfg.tcp_keepalive_idle.get().is_zero()).then(|| Keepalive {
                    idle: cfg.tcp_keepalive_idle.get(),
                    interval: cfg.tcp_keepalive_interval.get(),
                    probes: cfg.tcp_keepalive_probes,
                }),
            },
        )
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", cfg.addr)))?;
        let local_addr = socks[0].local_addr()?;
        // Dating asked for on the listeners is inherited by every accepted socket, and it
        // keeps the kernel's dating switched on for as long as the server listens: Linux turns
        // it on lazily, from a work queue, when the first socket in the system asks, so a
        // socket that asks alone has its first segments undated.
        let o = &settings.overload;
        let rx_stamped = o.enabled
            && o.rx_timestamps
            && socks.iter().fold(true, |all, l| {
                use std::os::fd::AsRawFd;
                crate::rxstamp::enable(l.as_raw_fd()) && all
            });
        let shared = Shared::new(
            settings, readiness, shutdown, registry, observer, rx_stamped,
        );
        Ok(Server {
            shared,
            listeners: socks,
            local_addr,
            tcp_nodelay: cfg.tcp_nodelay,
            tracker: {
                // Closed from the start: `wait` then resolves once the accept loops (tracked
                // as they start) and every connection they spawned have finished.
                let t = TaskTracker::new();
                t.close();
                t
            },
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of listening sockets.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// A handle for the drain sequence.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            stats: self.shared.stats.clone(),
            tracker: self.tracker.clone(),
            limiter: self.shared.limiter.clone(),
        }
    }

    /// Split into per-shard servers, one listener each, for sharded runtimes. Each part
    /// shares the counters and the lifecycle.
    pub fn into_shards(self) -> Vec<ShardServer> {
        let Server {
            shared,
            listeners,
            tcp_nodelay,
            tracker,
            ..
        } = self;
        listeners
            .into_iter()
            .map(|l| ShardServer {
                shared: shared.clone(),
                listener: l,
                tcp_nodelay,
                tracker: tracker.clone(),
            })
            .collect()
    }

    /// Serve `service` on every listener from the current runtime. Returns when the listeners
    /// have closed and every connection has finished, or when the lifecycle is stopped.
    pub async fn serve<S, B>(self, service: S) -> io::Result<()>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let handle = self.handle();
        let shutdown = self.shared.shutdown.clone();
        if let Some(l) = &self.shared.limiter
            && l.config().cpu_guard
        {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let sampler = crate::overload::sample_cpu(l.clone(), cores, Duration::from_millis(250));
            let lifecycle = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = sampler => {}
                    _ = lifecycle.reached(Phase::Stopped) => {}
                }
            });
        }
        for shard in self.into_shards() {
            let l = shard.into_tokio()?;
            let t = l.tracker.clone();
            t.spawn(l.accept_loop(service.clone()));
        }
        tokio::select! {
            _ = handle.closed() => {}
            _ = shutdown.reached(Phase::Stopped) => {
                // Connections with nothing left in flight are finishing their last writes
                // (see `conn::serve_connection`): give them that moment before returning, as
                // the process usually exits right after.
                let _ = tokio::time::timeout(crate::conn::FLUSH_AFTER_STOP, handle.closed()).await;
            }
        }
        Ok(())
    }
}

/// One listener of a server, to be driven by one shard's runtime.
#[derive(Debug)]
pub struct ShardServer {
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    tcp_nodelay: bool,
    tracker: TaskTracker,
}

struct TokioShard {
    shared: Arc<Shared>,
    listener: TcpListener,
    tcp_nodelay: bool,
    tracker: TaskTracker,
}

impl ShardServer {
    fn into_tokio(self) -> io::Result<TokioShard> {
        Ok(TokioShard {
            listener: TcpListener::from_std(self.listener)?,
            shared: self.shared,
            tcp_nodelay: self.tcp_nodelay,
            tracker: self.tracker,
        })
    }

    /// Serve on this shard's listener from the current (shard) runtime until the lifecycle
    /// closes the listeners, then until this process's connections are done or stopped.
    /// Must be called inside the runtime that should own the connections.
    pub async fn serve<S, B>(self, service: S) -> io::Result<()>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let shard = self.into_tokio()?;
        let tracker = shard.tracker.clone();
        let shutdown = shard.shared.shutdown.clone();
        tracker.track_future(shard.accept_loop(service)).await;
        // Keep this runtime alive while its connections drain: dropping it would cancel them.
        tokio::select! {
            _ = tracker.wait() => {}
            _ = shutdown.reached(Phase::Stopped) => {
                let _ = tokio::time::timeout(crate::conn::FLUSH_AFTER_STOP, tracker.wait()).await;
            }
        }
        Ok(())
    }
}

impl TokioShard {
    async fn accept_loop<S, B>(self, service: S)
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let builders = Arc::new(conn::builders(&self.shared));
        // The request path, composed once for this listener; each connection clones it once.
        let stack = self.shared.layers.stack(service);
        let closing = self.shared.shutdown.reached(Phase::Closing);
        tokio::pin!(closing);
        loop {
            let (stream, peer) = tokio::select! {
                // Checked first: once closing, no new connection is taken even if one is queued.
                biased;
                _ = &mut closing => break,
                r = self.listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on a full table.
                        tracing::warn!(error = %e, "accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            if self.tcp_nodelay {
                let _ = stream.set_nodelay(true);
            }
            self.shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.shared
                .stats
                .connections
                .fetch_add(1, Ordering::Relaxed);
            let shared = self.shared.clone();
            let builders = builders.clone();
            let svc = stack.clone();
            self.tracker.spawn(async move {
                conn::serve_connection(stream, peer, builders, shared.clone(), svc).await;
                shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
        // Dropping the listener here closes the socket: new connections are refused, and the
        // kernel hashes nothing more to this member of the group.
        drop(self.listener);
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every in-flight request finished within the grace period.
    Clean,
    /// The grace period ran out; this many requests (and held work, such as tunnels) were
    /// still running and are cancelled.
    GraceExpired {
        /// Requests in flight and held work when the grace period ended.
        cancelled: usize,
    },
    /// A second stop signal arrived: exit now.
    Forced,
}

/// Walk the drain sequence once `stop` resolves:
/// not ready → hooks → drain delay → close listeners (Connection: close / GOAWAY) →
/// wait for in-flight work up to the grace period → stopped.
/// `again` resolving at any point after the first signal aborts with [`DrainOutcome::Forced`].
pub async fn drain<F1, F2>(
    stop: F1,
    again: F2,
    shutdown: &Shutdown,
    cfg: &ShutdownConfig,
    servers: &[ServerHandle],
) -> DrainOutcome
where
    F1: Future<Output = ()>,
    F2: Future<Output = ()>,
{
    stop.await;
    tokio::pin!(again);
    let outcome = tokio::select! {
        _ = &mut again => DrainOutcome::Forced,
        o = drain_steps(shutdown, cfg, servers) => o,
    };
    shutdown.advance(Phase::Stopped);
    match outcome {
        DrainOutcome::Clean => tracing::info!("drained cleanly"),
        DrainOutcome::GraceExpired { cancelled } => tracing::warn!(
            cancelled,
            grace_period = %cfg.grace_period,
            "grace period over; cancelling requests still in flight"
        ),
        DrainOutcome::Forced => tracing::warn!("second stop signal; exiting at once"),
    }
    outcome
}

async fn drain_steps(
    shutdown: &Shutdown,
    cfg: &ShutdownConfig,
    servers: &[ServerHandle],
) -> DrainOutcome {
    let delay_end = tokio::time::Instant::now() + cfg.drain_delay.get();
    shutdown.advance(Phase::Draining);
    tracing::info!(drain_delay = %cfg.drain_delay, "stop requested: readiness withdrawn, draining");
    let hooks: Vec<_> = shutdown
        .take_hooks()
        .into_iter()
        .map(|h| {
            let name = h.name().to_string();
            let fut = h.into_future();
            async move {
                fut.await;
                tracing::info!(hook = %name, "shutdown hook done");
            }
        })
        .collect();
    // Hooks (deregistration) get at most the drain delay; the delay is served in full either
    // way so load balancers have time to notice the withdrawn readiness.
    let _ = tokio::time::timeout_at(delay_end, futures_util::future::join_all(hooks)).await;
    tokio::time::sleep_until(delay_end).await;

    shutdown.advance(Phase::Closing);
    let in_flight = || -> usize {
        servers
            .iter()
            .map(|s| s.stats.in_flight.load(Ordering::Relaxed))
            .sum()
    };
    tracing::info!(
        in_flight = in_flight(),
        held = shutdown.held(),
        grace_period = %cfg.grace_period,
        "listeners closed; finishing in-flight requests"
    );
    // A connection that was upgraded (a WebSocket tunnel) has left its server: its work is
    // counted by the guard its tunnel holds, not by the server's connections.
    let all_closed = futures_util::future::join(
        futures_util::future::join_all(servers.iter().map(|s| s.closed())),
        shutdown.released(),
    );
    match tokio::time::timeout(cfg.grace_period.get(), all_closed).await {
        Ok(_) => DrainOutcome::Clean,
        Err(_) => DrainOutcome::GraceExpired {
            cancelled: in_flight() + shutdown.held(),
        },
    }
}

/// Install SIGTERM/SIGINT handling now and return two futures: the first resolves on the
/// first signal, the second on the second one (for [`drain`]'s `stop` and `again`).
///
/// Handlers are installed when this is *called*, not when the futures are first polled: a
/// signal arriving between "ready" and the first poll would otherwise take the default action
/// and kill the process mid-start. Both futures read one counter, so the first signal can
/// never be mistaken for the second.
pub fn stop_signals() -> io::Result<(impl Future<Output = ()>, impl Future<Output = ()>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                Some(()) = term.recv() => "SIGTERM",
                Some(()) = int.recv() => "SIGINT",
                else => return,
            };
            tracing::info!(signal = name, "stop signal");
            tx.send_modify(|n| *n += 1);
        }
    });
    let nth = |n: u32| {
        let mut rx = rx.clone();
        async move {
            // The sender lives as long as the listener task, which never ends while signals
            // can arrive.
            let _ = rx.wait_for(|c| *c >= n).await;
        }
    };
    Ok((nth(1), nth(2)))
}
