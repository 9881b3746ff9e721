//! One upstream's routing decision, composed from the policies: which endpoint a request goes
//! to, and what its outcome teaches the policies.
//!
//! For each pick: the request's colour selects a subset (falling back to the main fleet);
//! outlier ejection decides which endpoints count as healthy; the priority distribution
//! chooses a level (spilling to the next one as health falls, using every endpoint of a level in
//! panic); P2C over peak-EWMA picks within it. Outcomes feed the outlier detector and the
//! endpoint's load (failures and `Retry-After` penalise it). No I/O happens here: the
//! transport calls [`Upstream::pick`] before connecting and [`Picked`]'s methods after.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::balance::{self, BalanceConfig, Load};
use crate::endpoint::{Endpoint, EndpointSet, Endpoints, level_health_of};
use crate::outlier::{OutlierConfig, OutlierDetector};
use crate::priority::{self, LevelHealth, PriorityConfig};

/// Policy settings of one upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamConfig {
    /// Load balancing.
    pub balance: BalanceConfig,
    /// Outlier ejection.
    pub outlier: OutlierConfig,
    /// Priority spill-over and panic.
    pub priority: PriorityConfig,
    /// Weighted subsets: `(colour, percent)` — that share of requests *without* a colour go
    /// to the endpoints labelled with that colour (a canary at 5 %, say). Requests with a
    /// colour (from baggage) always follow it. A colour with no endpoints falls back to the
    /// main fleet, like a baggage colour does.
    pub subset_weights: Vec<(String, u32)>,
}

/// Loads in the order of the endpoint set's endpoints (a pick indexes, no hashing), rebuilt
/// when the set's version changes; an address that stays keeps its load history.
#[derive(Debug, Default)]
struct LoadTable {
    version: Option<u64>,
    addrs: Vec<SocketAddr>,
    loads: Vec<Arc<Load>>,
}

impl LoadTable {
    fn get(&self, addr: &SocketAddr) -> Option<&Arc<Load>> {
        self.addrs
            .iter()
            .position(|a| a == addr)
            .and_then(|i| self.loads.get(i))
    }
}

/// Routing state of one upstream. Share it (`Arc`) between callers.
#[derive(Debug)]
pub struct Upstream {
    cfg: UpstreamConfig,
    endpoints: Endpoints,
    outlier: OutlierDetector<SocketAddr>,
    loads: Mutex<LoadTable>,
    /// The endpoint-set version the loads and the outlier detector were last synced to, plus
    /// one (0: never).
    synced: AtomicU64,
    /// The load of an endpoint removed by a concurrent update between a pick's snapshot and
    /// its table lookup: rare, short-lived, and not worth an allocation on every pick.
    orphan: Arc<Load>,
}

/// The chosen endpoint for one attempt.
#[derive(Debug, Clone)]
pub struct Picked {
    /// Where to send it.
    pub endpoint: Endpoint,
    /// Its load; start a call on it with [`Load::start`].
    pub load: Arc<Load>,
    /// The priority level chosen, and whether that level was in panic.
    pub level: usize,
    /// Panic mode: the level had too few healthy endpoints, so ejected ones were used too.
    pub panic: bool,
    /// Version of the endpoint set the pick was made from.
    pub version: u64,
}

impl Upstream {
    /// Route over `endpoints` with `cfg`.
    pub fn new(cfg: UpstreamConfig, endpoints: Endpoints) -> Upstream {
        Upstream {
            orphan: Arc::new(Load::new(&cfg.balance)),
            outlier: OutlierDetector::new(cfg.outlier.clone()),
            cfg,
            endpoints,
            loads: Mutex::new(LoadTable::default()),
            synced: AtomicU64::new(0),
        }
    }

    /// Balancer settings (calls report their outcome with them).
    pub fn balance_config(&self) -> &BalanceConfig {
        &self.cfg.balance
    }

    /// The endpoint set handle (discovery publishes into it).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The outlier detector (for reports and the doctor).
    pub fn outlier(&self) -> &OutlierDetector<SocketAddr> {
        &self.outlier
    }

    /// Choose an endpoint for a request of traffic colour `color`. `None` only when the
    /// upstream has no endpoints at all.
    pub fn pick(&self, color: Option<&str>) -> Option<Picked> {
        self.pick_at(color, Instant::now())
    }

    /// [`Upstream::pick`] at `now`, a clock reading the caller already has.
    pub fn pick_at(&self, color: Option<&str>, now: Instant) -> Option<Picked> {
        self.pick_inner(color, keel_core::codec::rand::next_u64(), now)
    }

    /// [`Upstream::pick`] with an explicit random draw (tests).
    pub fn pick_with(&self, color: Option<&str>, draw: u64) -> Option<Picked> {
        self.pick_inner(color, draw, Instant::now())
    }

    /// On the hot path of every call: one pass over the endpoints with one outlier lookup
    /// each, one lock of the load table, loads found by index, one small allocation (plus
    /// the priority split's when the endpoints have more than one priority), and no clock
    /// read of its own.
    fn pick_inner(&self, color: Option<&str>, draw: u64, now: Instant) -> Option<Picked> {
        let color = color.or_else(|| self.weighted_color(draw.rotate_left(29)));
        let set = self.endpoints.snapshot();
        self.sync(&set);
        let filter = set.color_filter(color);
        let mut candidates: Vec<(usize, &Endpoint, bool)> = set
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| filter.admits(e))
            .map(|(i, e)| (i, e, !self.outlier.is_ejected_at(&e.addr, now)))
            .collect();
        let first = candidates.first()?.1.priority;
        let (level, panic) = if candidates.iter().all(|(_, e, _)| e.priority == first) {
            // One priority (the common case): it takes everything, and no split is built.
            let only = LevelHealth {
                total: candidates.len(),
                healthy: candidates.iter().filter(|(_, _, h)| *h).count(),
            };
            let level = first as usize;
            (
                level,
                priority::one_level_in_panic(&self.cfg.priority, &only),
            )
        } else {
            let levels = level_health_of(candidates.iter().map(|(_, e, h)| (e.priority, *h)));
            let dist = priority::distribute(&self.cfg.priority, &levels);
            let level = priority::pick_level(&dist, (draw % 100) as u32)?;
            (level, dist.panic.get(level).copied().unwrap_or(false))
        };
        candidates.retain(|(_, e, healthy)| e.priority as usize == level && (panic || *healthy));
        let t = self.lock_loads();
        // Another caller may have synced a newer set since this snapshot: then indexes do
        // not line up, and the address finds the load.
        let aligned = t.version == Some(set.version);
        let load_of = |i: usize, e: &Endpoint| -> &Arc<Load> {
            let found = if aligned {
                t.loads.get(i)
            } else {
                t.get(&e.addr)
            };
            found.unwrap_or(&self.orphan)
        };
        let &(i, endpoint, _) = balance::p2c_at(
            &self.cfg.balance,
            &candidates,
            |(i, e, _)| load_of(*i, e),
            (draw.rotate_left(17), draw.rotate_left(41)),
            now,
        )?;
        let load = load_of(i, endpoint).clone();
        let endpoint = endpoint.clone();
        drop(t);
        Some(Picked {
            endpoint,
            load,
            level,
            panic,
            version: set.version,
        })
    }

    /// The colour an uncoloured request is sent to by [`UpstreamConfig::subset_weights`], if
    /// any: bands of the given percentages over a draw in `[0, 100)`.
    fn weighted_color(&self, draw: u64) -> Option<&str> {
        if self.cfg.subset_weights.is_empty() {
            return None;
        }
        let r = (draw % 100) as u32;
        let mut upper = 0u32;
        for (color, percent) in &self.cfg.subset_weights {
            upper = upper.saturating_add(*percent);
            if r < upper {
                return Some(color);
            }
        }
        None
    }

    /// Report an attempt's outcome: feeds outlier ejection, and on failure penalises the
    /// endpoint in the balancer (for `retry_after` when the upstream sent one).
    pub fn report(&self, addr: SocketAddr, success: bool, retry_after: Option<Duration>) {
        self.report_at(addr, success, retry_after, Instant::now());
    }

    /// [`Upstream::report`] of an outcome seen at `now`.
    pub fn report_at(
        &self,
        addr: SocketAddr,
        success: bool,
        retry_after: Option<Duration>,
        now: Instant,
    ) {
        if let Some(until) = self.outlier.report_at(&addr, success, now) {
            tracing::warn!(%addr, ?until, "endpoint ejected after consecutive failures");
        }
        if !success {
            if let Some(load) = self.lock_loads().get(&addr) {
                load.penalize_at(&self.cfg.balance, retry_after, now);
            }
        }
    }

    /// The load tracked for `addr` (for reports and tests).
    pub fn load_of(&self, addr: &SocketAddr) -> Option<Arc<Load>> {
        self.lock_loads().get(addr).cloned()
    }

    fn sync(&self, set: &EndpointSet) {
        // The common case, an unchanged set, costs one atomic load instead of a lock.
        if self.synced.load(Ordering::Acquire) == set.version + 1 {
            return;
        }
        let mut t = self.lock_loads();
        if t.version == Some(set.version) {
            return;
        }
        let loads = set
            .endpoints
            .iter()
            .map(|e| {
                t.get(&e.addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Load::new(&self.cfg.balance)))
            })
            .collect();
        t.loads = loads;
        t.addrs = set.endpoints.iter().map(|e| e.addr).collect();
        t.version = Some(set.version);
        drop(t);
        self.outlier
            .set_endpoints(set.endpoints.iter().map(|e| e.addr));
        self.synced.store(set.version + 1, Ordering::Release);
    }

    fn lock_loads(&self) -> std::sync::MutexGuard<'_, LoadTable> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    fn upstream(eps: &[&str]) -> Upstream {
        Upstream::new(
            UpstreamConfig::default(),
            Endpoints::new(eps.iter().map(|s| ep(s)).collect()),
        )
    }

    fn picks(u: &Upstream, color: Option<&str>, n: u64) -> HashMap<u16, usize> {
        let mut m = HashMap::new();
        for i in 0..n {
            let p = u
                .pick_with(color, i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .unwrap();
            *m.entry(p.endpoint.addr.port()).or_default() += 1;
        }
        m
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_gets_no_traffic_until_its_ejection_ends() {
        let u = upstream(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let bad = "127.0.0.1:2".parse().unwrap();
        u.pick(None);
        for _ in 0..5 {
            u.report(bad, false, None);
        }
        assert!(u.outlier().is_ejected(&bad));
        let m = picks(&u, None, 300);
        assert_eq!(m.get(&2), None, "{m:?}");
        assert!(m[&1] > 0 && m[&3] > 0);

        tokio::time::advance(Duration::from_secs(31)).await;
        let m = picks(&u, None, 300);
        assert!(
            m.get(&2).copied().unwrap_or(0) > 0,
            "returns after the ejection: {m:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn losing_priority_zero_spills_to_priority_one_and_returns_when_it_heals() {
        let u = upstream(&[
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:11;priority=1",
            "127.0.0.1:12;priority=1",
        ]);
        assert!(
            picks(&u, None, 200).keys().all(|p| *p < 10),
            "healthy P0 takes everything"
        );
        for port in [1u16, 2] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            for _ in 0..5 {
                u.report(addr, false, None);
            }
        }
        // The ejection cap (10 %, at least one) lets one of the two P0 endpoints go: P0 is then
        // 50 % healthy, its health 1.4 × 50 = 70 %, so priority 1 takes the other 30 %.
        let m = picks(&u, None, 1000);
        let p1: usize = m.iter().filter(|(p, _)| **p > 10).map(|(_, n)| *n).sum();
        assert!(
            (250..=350).contains(&p1),
            "about 30 % spilled to priority 1: {m:?}"
        );
        let picked = u.pick_with(None, 99).unwrap();
        assert_eq!(picked.level, 1);

        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(
            picks(&u, None, 200).keys().all(|p| *p < 10),
            "back to P0 once healed"
        );
    }

    #[tokio::test]
    async fn colour_picks_its_subset_and_new_sets_keep_load_history() {
        let u = upstream(&["127.0.0.1:1", "127.0.0.1:3;keel.color=canary"]);
        assert_eq!(
            picks(&u, Some("canary"), 50)
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(
            picks(&u, None, 50).keys().copied().collect::<Vec<_>>(),
            vec![1]
        );

        let one: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let before = u.load_of(&one).unwrap();
        u.endpoints()
            .publish(vec![ep("127.0.0.1:1"), ep("127.0.0.1:4")])
            .unwrap();
        let after = picks(&u, None, 100);
        assert!(after.contains_key(&4));
        assert!(
            Arc::ptr_eq(&before, &u.load_of(&one).unwrap()),
            "an address that stays keeps its load history"
        );
        assert!(
            u.load_of(&"127.0.0.1:3".parse().unwrap()).is_none(),
            "a removed address is dropped"
        );
    }

    #[test]
    fn weighted_subsets_take_their_share_of_uncoloured_requests_only() {
        let cfg = UpstreamConfig {
            subset_weights: vec![("canary".into(), 20)],
            ..UpstreamConfig::default()
        };
        let eps = [
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3;keel.color=canary",
        ];
        let u = Upstream::new(
            cfg.clone(),
            Endpoints::new(eps.iter().map(|s| ep(s)).collect()),
        );
        let n = 10_000;
        let got = picks(&u, None, n);
        let canary = got.get(&3).copied().unwrap_or(0) as f64 / n as f64;
        assert!(
            (0.17..=0.23).contains(&canary),
            "canary share {canary}: {got:?}"
        );
        // A request coloured by baggage follows its colour, whatever the weights.
        assert_eq!(
            picks(&u, Some("canary"), 100)
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![3]
        );
        let blue = picks(&u, Some("blue"), 100);
        assert!(
            !blue.contains_key(&3),
            "an unknown colour falls back to the main fleet"
        );

        // No canary endpoints: its share falls back to the main fleet.
        let u = Upstream::new(
            cfg,
            Endpoints::new(vec![ep("127.0.0.1:1"), ep("127.0.0.1:2")]),
        );
        assert_eq!(picks(&u, None, 1000).values().sum::<usize>(), 1000);
    }

    #[test]
    fn no_endpoints_no_pick() {
        let u = upstream(&[]);
        assert!(u.pick(None).is_none());
    }
}
