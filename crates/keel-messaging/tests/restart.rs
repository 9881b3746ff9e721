//! Broker restarts: a NATS server of the test's own (own port, own JetStream directory, so the
//! machine's server is left alone) is killed with SIGKILL and started again, once while the
//! outbox relay publishes and once while the consumer works. Pass: every message applied
//! exactly once, and the outbox drained.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, PgDb, stream_name};
use keel_messaging::nats::{ConsumerConfig, ConsumerStats, Nats, run};
use keel_messaging::store::PgStore;
use keel_test_support::{ChildGuard, free_addr, port_open, wait_until};

/// A JetStream server whose process the test owns.
struct OwnNats {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl OwnNats {
    fn start() -> OwnNats {
        let mut n = OwnNats {
            addr: free_addr(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.up();
        n
    }

    fn up(&mut self) {
        let port = self.addr.port().to_string();
        let store = self.dir.path().to_str().unwrap().to_string();
        self.child = Some(ChildGuard::spawn(
            "/usr/sbin/nats-server",
            &["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &store],
            &[],
        ));
        let addr = self.addr;
        assert!(
            wait_until(Duration::from_secs(10), || port_open(addr)),
            "nats-server did not listen on {addr}"
        );
    }

    /// SIGKILL, a pause, and the same server (same store) again.
    async fn crash_and_restart(&mut self, down_for: Duration) {
        if let Some(c) = self.child.take() {
            c.signal(libc::SIGKILL);
            drop(c);
        }
        tokio::time::sleep(down_for).await;
        self.up();
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_relay_and_during_consumption_loses_and_doubles_nothing() {
    let mut server = OwnNats::start();
    let nats = Nats::connect(&server.url()).await.unwrap();
    let stream = stream_name();
    let subject = format!("{}.orders", stream.to_lowercase());
    nats.ensure_stream(&stream, vec![format!("{}.>", stream.to_lowercase())])
        .await
        .unwrap();
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;

    let n = 4000i64;
    common::write_outbox(&store, &subject, 0..n, false).await;

    // The relay runs in small batches while the server dies and comes back.
    let relay = {
        let (store, nats) = (store.clone(), nats.clone());
        tokio::spawn(async move {
            let stats = keel_messaging::transport::StoreStats::default();
            let stop = async {
                loop {
                    if store.backlog().await.unwrap_or(1) == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            store
                .run_relay_observed(&nats, 50, Duration::from_millis(5), &stats, stop)
                .await;
            stats
        })
    };
    assert!(
        common::wait_for(Duration::from_secs(20), || {
            let store = store.clone();
            async move { store.backlog().await.unwrap() < n - 500 }
        })
        .await,
        "the relay got going"
    );
    let left_at_crash = store.backlog().await.unwrap();
    server.crash_and_restart(Duration::from_millis(500)).await;
    let relay_stats = tokio::time::timeout(Duration::from_secs(60), relay)
        .await
        .expect("the relay drained the outbox after the restart")
        .unwrap();
    assert!(left_at_crash > 0, "the crash came mid-relay");

    // The consumer works while the server dies and comes back.
    let mut cfg = ConsumerConfig::new(&stream, "ledger");
    cfg.filter_subject = subject.clone();
    cfg.ack_wait = Duration::from_secs(2);
    let stats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (nats, cfg, store, stats) = (nats.clone(), cfg.clone(), store.clone(), stats.clone());
        tokio::spawn(async move {
            run(&nats, &cfg, &store, &Ledger, stats, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    assert!(
        common::wait_for(Duration::from_secs(20), || {
            let store = store.clone();
            async move { Ledger::totals(&store).await.1 > 300 }
        })
        .await
    );
    let applied_at_crash = Ledger::totals(&store).await.1;
    server.crash_and_restart(Duration::from_millis(500)).await;
    let done = common::wait_for(Duration::from_secs(90), || {
        let store = store.clone();
        async move { Ledger::totals(&store).await.1 >= n }
    })
    .await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
    let (rows, distinct, sum) = Ledger::totals(&store).await;
    eprintln!(
        "relay: {left_at_crash} left at the crash, {relay_stats:?}; consumer: {applied_at_crash} applied at the crash, {stats:?}"
    );
    assert!(
        applied_at_crash < n,
        "the crash came mid-consumption ({applied_at_crash})"
    );
    assert!(
        done,
        "{distinct} of {n} applied after the restarts; {stats:?}"
    );
    assert_eq!(
        (rows, distinct),
        (n, n),
        "nothing lost, nothing applied twice"
    );
    assert_eq!(sum, (0..n).sum::<i64>());
    db.drop_db().await;
}
