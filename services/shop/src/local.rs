//! The whole shop in one process: four [`keel::App`]s on free loopback ports, SQLite files in
//! one directory, the embedded broker between order and inventory. `keel demo` and the
//! shop's tests run it; the binaries in `src/bin/` run the same services one per process.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel::{App, BoxError, Sources};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::{Bus, Counters};
use crate::gateway;

/// How to start a [`LocalShop`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the SQLite files and config files go.
    pub dir: PathBuf,
    /// The gateway's keys and rate.
    pub gateway: gateway::Settings,
    /// Also start a second user service labelled `keel.color=canary`.
    pub canary_user: bool,
    /// Share of uncoloured user requests the gateway sends to the canary (percent).
    pub canary_weight: u32,
    /// Extra TOML for every service's config (e.g. `[tracing]`), appended as is.
    pub extra_config: String,
    /// Drain delay of each service: how long readiness is withdrawn before closing.
    pub drain_delay: Duration,
    /// Start no inventory service and point its callers at an address nobody listens on
    /// (tests of what the shop does while inventory is down).
    pub inventory_down: bool,
    /// Carry order events over this NATS server (`nats://…`) instead of the embedded
    /// broker: the real-server path, still in one process.
    pub nats: Option<String>,
    /// Keep the services' data in PostgreSQL instead of SQLite files: an admin URL
    /// (`postgres://postgres@127.0.0.1:5432/postgres`) on which a fresh database per service
    /// is created (and dropped again by [`LocalShop::stop`]).
    pub postgres: Option<String>,
}

impl Options {
    /// Defaults: the demo's keys, no canary, a quick drain.
    pub fn new(dir: &Path) -> Options {
        Options {
            dir: dir.to_path_buf(),
            gateway: gateway::settings(&Default::default(), gateway::DEMO_KEYS, 1_000.0, 2_000.0),
            canary_user: false,
            canary_weight: 0,
            extra_config: String::new(),
            drain_delay: Duration::from_millis(200),
            inventory_down: false,
            nats: None,
            postgres: None,
        }
    }
}

/// Where one service listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Traffic.
    pub addr: SocketAddr,
    /// Admin (`/metrics`, `/debug/*`, probes).
    pub admin: SocketAddr,
}

/// The running shop.
#[derive(Debug)]
pub struct LocalShop {
    /// The gateway, the shop's public door.
    pub gateway: Ports,
    /// The user service (the stable copy).
    pub user: Ports,
    /// The canary user service, when started.
    pub user_canary: Option<Ports>,
    /// The order service.
    pub order: Ports,
    /// The inventory service.
    pub inventory: Ports,
    /// The order service's store (orders, outbox).
    pub order_db: crate::db::Db,
    /// The inventory service's store (stock, reservations, confirmations, inbox).
    pub inventory_db: crate::db::Db,
    /// The relay's and the consumer's counters.
    pub counters: Counters,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), keel::Error>>)>,
    /// PostgreSQL databases to drop at stop: (admin URL, names).
    created: Option<(String, Vec<String>)>,
}

/// A loopback address whose port was free a moment ago and was never handed out before in
/// this process. The kernel may give the port it just released to the next bind, so the
/// eight (or ten) addresses of one shop could repeat one; Keel's listeners set
/// `SO_REUSEPORT`, so two services would then both bind it and silently split its
/// connections. `keel_test_support::free_port` guards against the same repeat, seen under the
/// full suite.
fn free_addr() -> Result<SocketAddr, BoxError> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(addr.port()) {
            return Ok(addr);
        }
    }
    Err("no loopback port left that this process has not handed out already".into())
}

fn ports() -> Result<Ports, BoxError> {
    Ok(Ports {
        addr: free_addr()?,
        admin: free_addr()?,
    })
}

impl LocalShop {
    /// Start the four services (and the canary, if asked) and wait until each is ready.
    pub async fn start(opts: Options) -> Result<LocalShop, BoxError> {
        std::fs::create_dir_all(&opts.dir)?;
        let (gateway, user, order, inventory) = (ports()?, ports()?, ports()?, ports()?);
        let user_canary = if opts.canary_user {
            Some(ports()?)
        } else {
            None
        };
        let mut user_endpoints = vec![format!("{}", user.addr)];
        if let Some(c) = user_canary {
            user_endpoints.push(format!("{};keel.color=canary", c.addr));
        }
        let list = |v: &[String]| {
            v.iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let clients = format!(
            "[clients.user]\nendpoints = [{}]\n{}\n[clients.order]\nendpoints = [\"{}\"]\n\n[clients.inventory]\nendpoints = [\"{}\"]\nprotocol = \"h2c\"\n",
            list(&user_endpoints),
            if opts.canary_weight > 0 {
                format!("subsets = {{ canary = {} }}\n", opts.canary_weight)
            } else {
                String::new()
            },
            order.addr,
            inventory.addr,
        );
        let (stop, stop_rx) = watch::channel(false);
        let embedded = keel::messaging::embedded::Embedded::new();
        let counters = Counters::default();
        let mut tasks = Vec::new();

        let app = |name: &str, p: Ports| -> Result<App, BoxError> {
            let file = opts.dir.join(format!("{name}.toml"));
            std::fs::write(
                &file,
                format!(
                    "[server]\naddr = \"{}\"\n\n[admin]\naddr = \"{}\"\n\n[shutdown]\ndrain_delay = \"{}ms\"\n\n[readiness]\ninterval = \"1s\"\n\n{clients}\n{}\n",
                    p.addr,
                    p.admin,
                    opts.drain_delay.as_millis(),
                    opts.extra_config
                ),
            )?;
            let sources = Sources {
                file: Some(file),
                sets: Vec::new(),
            };
            // The process environment is not read: several services share this process,
            // and a KEEL_SERVER__ADDR meant for one would move them all.
            let loaded = sources.load_with_env(Vec::new())?;
            let sizing = keel::runtime::detect(&loaded.value.runtime);
            Ok(App::new(name, loaded, sizing))
        };
        let mut created = None;
        let mut urls = std::collections::HashMap::new();
        if let Some(admin) = &opts.postgres {
            let tag = format!(
                "{}_{:x}",
                std::process::id(),
                keel::codec::rand::next_u64() >> 20
            );
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            let pool = sqlx::PgPool::connect(admin).await?;
            let mut names = Vec::new();
            for svc in ["user", "order", "inventory"] {
                let name = format!("keel_shop_{tag}_{svc}");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await?;
                urls.insert(svc, format!("{base}/{name}"));
                names.push(name);
            }
            pool.close().await;
            created = Some((admin.clone(), names));
        }
        let db = |name: &str| {
            urls.get(name).cloned().unwrap_or_else(|| {
                format!("sqlite://{}", opts.dir.join(format!("{name}.db")).display())
            })
        };

        let serve = |app: App, router: keel::Router, tasks: &mut Vec<_>, name: &'static str| {
            let mut rx = stop_rx.clone();
            let stop_fut = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            tasks.push((
                name,
                tokio::spawn(app.serve_until(router, stop_fut, std::future::pending())),
            ));
        };

        let inventory_db = crate::db::open(&db("inventory")).await?;
        let bus = match &opts.nats {
            None => Bus::Embedded(embedded.clone()),
            Some(url) => {
                let cfg = keel::messaging::config::MessagingConfig {
                    broker: keel::messaging::config::BrokerKind::Nats,
                    url: url.clone(),
                    ..Default::default()
                };
                Bus::connect(&cfg, &embedded).await?
            }
        };
        if !opts.inventory_down {
            let a = app("inventory", inventory)?;
            let r = crate::inventory::router(&a, inventory_db.clone(), &bus, &counters).await?;
            serve(
                a,
                crate::http::tag_instance(r, "inventory".into()),
                &mut tasks,
                "inventory",
            );
        }

        let user_db = crate::db::open(&db("user")).await?;
        let a = app("user", user)?;
        let r = crate::user::router(&a, user_db.clone()).await?;
        serve(
            a,
            crate::http::tag_instance(r, "user".into()),
            &mut tasks,
            "user",
        );
        if let Some(c) = user_canary {
            let a = app("user-canary", c)?;
            // The canary shares the user store: a new version, same data.
            let r = crate::user::router(&a, user_db.clone()).await?;
            serve(
                a,
                crate::http::tag_instance(r, "user-canary".into()),
                &mut tasks,
                "user-canary",
            );
        }

        let order_db = crate::db::open(&db("order")).await?;
        let a = app("order", order)?;
        let r = crate::order::router(&a, order_db.clone(), bus, &counters).await?;
        serve(
            a,
            crate::http::tag_instance(r, "order".into()),
            &mut tasks,
            "order",
        );

        let a = app("gateway", gateway)?;
        let r = gateway::router(&a, opts.gateway.clone()).await?;
        serve(
            a,
            crate::http::tag_instance(r, "gateway".into()),
            &mut tasks,
            "gateway",
        );

        let shop = LocalShop {
            gateway,
            user,
            user_canary,
            order,
            inventory,
            order_db,
            inventory_db,
            counters,
            stop,
            tasks,
            created,
        };
        shop.wait_ready(Duration::from_secs(20)).await?;
        Ok(shop)
    }

    /// Every service's admin `/readyz` answers 200.
    async fn wait_ready(&self, within: Duration) -> Result<(), BoxError> {
        let mut all = vec![self.gateway, self.user, self.order];
        if self.tasks.iter().any(|(n, _)| *n == "inventory") {
            all.push(self.inventory);
        }
        all.extend(self.user_canary);
        let end = tokio::time::Instant::now() + within;
        for p in all {
            loop {
                if ready(p.admin).await {
                    break;
                }
                if tokio::time::Instant::now() > end {
                    return Err(format!("service on {} not ready within {within:?}", p.addr).into());
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// Drain and stop every service; the first error, if any.
    pub async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(true);
        let mut first = None;
        // The gateway first, inventory last: the reverse of the call direction.
        for (name, task) in self.tasks.into_iter().rev() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first.get_or_insert_with(|| format!("{name}: {e}"));
                }
                Err(e) => {
                    first.get_or_insert_with(|| format!("{name}: {e}"));
                }
            }
        }
        self.order_db.close().await;
        self.inventory_db.close().await;
        if let Some((admin, names)) = self.created {
            let pool = sqlx::PgPool::connect(&admin).await?;
            for name in names {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await?;
            }
        }
        match first {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// `GET /readyz` on `admin` answers 200 (a raw HTTP/1.1 exchange: no client needed).
async fn ready(admin: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    else {
        return false;
    };
    let req = format!("GET /readyz HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await,
        Ok(Ok(n)) if n >= 12 && &buf[9..12] == b"200"
    )
}
