//! A Kafka-API broker for the Kafka tests: `tansu`, with in-memory storage, on a free port.
//!
//! Debian has no Kafka; `scripts/test.sh` builds tansu once into `$HOME/.cache/tansu` (outside
//! the clone, so CI's fresh checkouts reuse it). `KEEL_TANSU` overrides the binary's path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ChildGuard, free_addr, port_open, wait_until};

/// A running broker, stopped on drop.
#[derive(Debug)]
pub struct Tansu {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it tells clients to connect to (differs when a fault proxy sits in front).
    pub advertised: SocketAddr,
    _child: ChildGuard,
}

/// The tansu binary: `$KEEL_TANSU`, else `$HOME/.cache/tansu/bin/tansu`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/tansu/bin/tansu")
}

impl Tansu {
    /// Start a broker that advertises its own address.
    pub fn start() -> Tansu {
        let addr = free_addr();
        Self::start_on(addr, addr)
    }

    /// Start a broker listening on `addr` that tells clients to use `advertised` (a fault
    /// proxy's address, so every connection after bootstrap goes through the proxy too).
    pub fn start_on(addr: SocketAddr, advertised: SocketAddr) -> Tansu {
        let bin = binary();
        assert!(
            bin.exists(),
            "no Kafka-API broker at {}: scripts/test.sh builds it (cargo install tansu --features dynostore --root ~/.cache/tansu)",
            bin.display()
        );
        let listener = format!("tcp://{addr}");
        let adv = format!("tcp://{advertised}");
        let child = ChildGuard::spawn(
            bin.to_str().unwrap_or("tansu"),
            &[
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &adv,
                "--storage-engine",
                "memory://tansu/",
            ],
            &[("RUST_LOG", "warn".to_string())],
        );
        assert!(
            wait_until(Duration::from_secs(20), || port_open(addr)),
            "tansu did not listen on {addr}"
        );
        Tansu {
            addr,
            advertised,
            _child: child,
        }
    }

    /// The bootstrap servers string for clients.
    pub fn bootstrap(&self) -> String {
        self.advertised.to_string()
    }
}
