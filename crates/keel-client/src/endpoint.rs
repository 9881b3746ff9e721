//! Endpoints and endpoint sets: what the client balances over, and the one interface every
//! source of endpoints (a static config list now; DNS, etcd, Kubernetes EndpointSlices and xDS
//! later) publishes into.
//!
//! An [`Endpoints`] handle holds the current [`EndpointSet`] behind a `tokio::sync::watch`:
//! readers take a cheap `Arc` snapshot per request and never block a publisher; discovery
//! publishes a whole new set at once, so a request never sees half an update. An update that
//! would empty a non-empty set is refused unless explicitly allowed: a discovery outage that
//! returns nothing must not take every upstream away (the last-known-good set keeps serving).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::priority::LevelHealth;

/// The label that marks an endpoint's traffic colour (e.g. `canary`), matched against the
/// request's `keel-color` baggage entry.
pub const COLOR_LABEL: &str = "keel.color";

/// One upstream instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Failover priority: 0 is preferred; higher levels receive traffic as lower ones lose
    /// health (see [`crate::priority`]).
    pub priority: u32,
    /// Cluster or locality, for reports and locality-aware routing.
    pub locality: Option<String>,
    /// Free-form labels (`version`, `zone`, [`COLOR_LABEL`] …) used for subsets.
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint at priority 0 with no labels.
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            priority: 0,
            locality: None,
            labels: BTreeMap::new(),
        }
    }

    /// Parse the static-list form `ADDR[;key=value…]`, where the keys `priority` and
    /// `locality` set those fields and any other key becomes a label, e.g.
    /// `10.0.0.7:8080;priority=1;locality=eu-west-1b;keel.color=canary`.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        let mut parts = s.split(';').map(str::trim);
        let addr_s = parts.next().unwrap_or_default();
        let addr = addr_s.parse().map_err(|_| EndpointError {
            input: s.to_string(),
            reason: format!("{addr_s:?} is not an IP:port address"),
        })?;
        let mut e = Endpoint::new(addr);
        for kv in parts.filter(|p| !p.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(EndpointError {
                    input: s.to_string(),
                    reason: format!("{kv:?} is not key=value"),
                });
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "priority" => {
                    e.priority = v.parse().map_err(|_| EndpointError {
                        input: s.to_string(),
                        reason: format!("priority {v:?} is not a non-negative integer"),
                    })?;
                }
                "locality" => e.locality = Some(v.to_string()),
                _ => {
                    e.labels.insert(k.to_string(), v.to_string());
                }
            }
        }
        Ok(e)
    }

    /// This endpoint's colour label, if any.
    pub fn color(&self) -> Option<&str> {
        self.labels.get(COLOR_LABEL).map(String::as_str)
    }
}

/// A static endpoint entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {input:?}: {reason}")]
pub struct EndpointError {
    /// The entry as written.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// An immutable set of endpoints with a version that increases with every publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSet {
    /// Publication counter (0 for the initial set).
    pub version: u64,
    /// The endpoints, in the order the source gave them.
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    /// Endpoints whose labels include every `selector` pair.
    pub fn subset<'a>(
        &'a self,
        selector: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| selector.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
    }

    /// The endpoints a request of colour `color` may use: those labelled with that colour when
    /// there are any, otherwise the uncoloured ones — a colour with no instances falls back to
    /// the main fleet instead of failing. Without a colour: the uncoloured endpoints, or all of
    /// them when every endpoint is coloured.
    pub fn for_color<'a>(&'a self, color: Option<&str>) -> Vec<&'a Endpoint> {
        let filter = self.color_filter(color);
        self.endpoints.iter().filter(|e| filter.admits(e)).collect()
    }

    /// The rule [`EndpointSet::for_color`] applies, decided once, so a caller can filter
    /// while iterating instead of collecting a list first.
    pub fn color_filter<'a>(&self, color: Option<&'a str>) -> ColorFilter<'a> {
        if let Some(c) = color
            && self.endpoints.iter().any(|e| e.color() == Some(c))
        {
            return ColorFilter::Colored(c);
        }
        if self.endpoints.iter().any(|e| e.color().is_none()) {
            ColorFilter::Plain
        } else {
            ColorFilter::All
        }
    }

    /// Per-priority totals for [`crate::priority::distribute`], given which endpoints are
    /// healthy. Levels are dense from 0 to the highest priority present.
    pub fn level_health(&self, healthy: impl Fn(&Endpoint) -> bool) -> Vec<LevelHealth> {
        level_health_of(self.endpoints.iter().map(|e| (e.priority, healthy(e))))
    }
}

/// Per-priority totals from `(priority, healthy)` pairs. Levels are dense from 0 to the
/// highest priority present.
pub fn level_health_of(items: impl Iterator<Item = (u32, bool)> + Clone) -> Vec<LevelHealth> {
    let Some(top) = items.clone().map(|(p, _)| p).max() else {
        return Vec::new();
    };
    let mut levels = vec![
        LevelHealth {
            total: 0,
            healthy: 0
        };
        top as usize + 1
    ];
    for (priority, healthy) in items {
        let l = &mut levels[priority as usize];
        l.total += 1;
        if healthy {
            l.healthy += 1;
        }
    }
    levels
}

/// Which endpoints a request's colour may use (see [`EndpointSet::for_color`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorFilter<'a> {
    /// Endpoints of this colour.
    Colored(&'a str),
    /// Uncoloured endpoints.
    Plain,
    /// Every endpoint (all are coloured and none matches).
    All,
}

impl ColorFilter<'_> {
    /// Whether `e` is in.
    pub fn admits(&self, e: &Endpoint) -> bool {
        match self {
            ColorFilter::Colored(c) => e.color() == Some(c),
            ColorFilter::Plain => e.color().is_none(),
            ColorFilter::All => true,
        }
    }
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The update would empty a non-empty set; the previous set keeps serving.
    #[error("refusing to replace {current} endpoints with none; keeping the last known good set")]
    WouldEmpty {
        /// Endpoints in the set that stays.
        current: usize,
    },
}

/// The live endpoint set of one upstream. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Endpoints {
    tx: Arc<watch::Sender<Arc<EndpointSet>>>,
}

impl Endpoints {
    /// Start from `initial` (version 0).
    pub fn new(initial: Vec<Endpoint>) -> Endpoints {
        let (tx, _) = watch::channel(Arc::new(EndpointSet {
            version: 0,
            endpoints: initial,
        }));
        Endpoints { tx: Arc::new(tx) }
    }

    /// The current set (an `Arc` clone: no copying, no lock held afterwards).
    pub fn snapshot(&self) -> Arc<EndpointSet> {
        self.tx.borrow().clone()
    }

    /// Replace the set. An empty update over a non-empty set is refused (see the module doc);
    /// use [`Endpoints::publish_allow_empty`] when the upstream really has been removed.
    pub fn publish(&self, endpoints: Vec<Endpoint>) -> Result<u64, PublishError> {
        let current = self.tx.borrow().endpoints.len();
        if endpoints.is_empty() && current > 0 {
            tracing::warn!(
                current,
                "endpoint update would empty the set; keeping the last known good one"
            );
            return Err(PublishError::WouldEmpty { current });
        }
        Ok(self.publish_allow_empty(endpoints))
    }

    /// Replace the set, even with nothing. Returns the new version.
    pub fn publish_allow_empty(&self, endpoints: Vec<Endpoint>) -> u64 {
        let mut version = 0;
        self.tx.send_modify(|cur| {
            version = cur.version + 1;
            *cur = Arc::new(EndpointSet { version, endpoints });
        });
        version
    }

    /// Watch for new sets.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EndpointSet>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn static_entries_parse_priority_locality_and_labels() {
        let e = ep("10.0.0.7:8080; priority=1; locality=eu-west-1b; keel.color=canary; version=v2");
        assert_eq!(e.addr, "10.0.0.7:8080".parse().unwrap());
        assert_eq!(e.priority, 1);
        assert_eq!(e.locality.as_deref(), Some("eu-west-1b"));
        assert_eq!(e.color(), Some("canary"));
        assert_eq!(e.labels["version"], "v2");
        assert_eq!(ep("[::1]:9000").addr.port(), 9000);

        for bad in [
            "localhost:80",
            "10.0.0.1",
            "10.0.0.1:80;priority=high",
            "10.0.0.1:80;zone",
        ] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn colour_routes_to_its_subset_and_falls_back_to_the_main_fleet() {
        let set = EndpointSet {
            version: 0,
            endpoints: vec![
                ep("127.0.0.1:1"),
                ep("127.0.0.1:2"),
                ep("127.0.0.1:3;keel.color=canary"),
            ],
        };
        let ports = |v: Vec<&Endpoint>| v.iter().map(|e| e.addr.port()).collect::<Vec<_>>();
        assert_eq!(ports(set.for_color(Some("canary"))), vec![3]);
        assert_eq!(
            ports(set.for_color(None)),
            vec![1, 2],
            "uncoloured traffic avoids the canary"
        );
        assert_eq!(
            ports(set.for_color(Some("blue"))),
            vec![1, 2],
            "unknown colour falls back"
        );

        let all_canary = EndpointSet {
            version: 0,
            endpoints: vec![ep("127.0.0.1:3;keel.color=canary")],
        };
        assert_eq!(ports(all_canary.for_color(None)), vec![3]);

        let mut sel = BTreeMap::new();
        sel.insert("keel.color".to_string(), "canary".to_string());
        assert_eq!(set.subset(&sel).count(), 1);
    }

    #[test]
    fn level_health_counts_per_priority() {
        let set = EndpointSet {
            version: 0,
            endpoints: vec![
                ep("127.0.0.1:1"),
                ep("127.0.0.1:2"),
                ep("127.0.0.1:3;priority=2"),
            ],
        };
        let levels = set.level_health(|e| e.addr.port() != 2);
        assert_eq!(
            levels,
            vec![
                LevelHealth {
                    total: 2,
                    healthy: 1
                },
                LevelHealth {
                    total: 0,
                    healthy: 0
                },
                LevelHealth {
                    total: 1,
                    healthy: 1
                },
            ]
        );
        assert!(EndpointSet::default().level_health(|_| true).is_empty());
    }

    #[tokio::test]
    async fn publishing_swaps_whole_sets_and_never_empties_by_accident() {
        let eps = Endpoints::new(vec![ep("127.0.0.1:1")]);
        let mut rx = eps.subscribe();
        let before = eps.snapshot();
        assert_eq!(
            eps.publish(vec![ep("127.0.0.1:2"), ep("127.0.0.1:3")])
                .unwrap(),
            1
        );
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().endpoints.len(), 2);
        assert_eq!(before.endpoints.len(), 1, "an old snapshot is unaffected");

        assert_eq!(
            eps.publish(vec![]),
            Err(PublishError::WouldEmpty { current: 2 })
        );
        assert_eq!(
            eps.snapshot().endpoints.len(),
            2,
            "last known good keeps serving"
        );
        assert_eq!(eps.publish_allow_empty(vec![]), 2);
        assert!(eps.snapshot().endpoints.is_empty());
        assert_eq!(eps.publish(vec![]).unwrap(), 3, "empty over empty is fine");
    }
}
