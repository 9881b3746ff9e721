//! The default stack, composed once per listener: every layer of [`super`] in order around
//! the user's service.

use std::sync::Arc;

use keel_core::Shutdown;
use keel_core::observe::SharedObserver;
use keel_core::tasks::Registry;

use super::admission::{Admission, AdmissionLayer};
use super::context::{ContextLayer, ContextService};
use super::deadline::{Deadline, DeadlineLayer};
use super::headers::{Headers, HeadersLayer};
use super::limits::{Limits, LimitsLayer};
use super::observe::{Observe, ObserveLayer};
use super::probes::{ProbePaths, Probes, ProbesLayer};
use super::service::{ServiceLayer, UserService};
use crate::config::HttpSettings;
use crate::readiness::Readiness;
use crate::stats::Stats;

/// The default request path around a user's service `S`, outermost first.
pub type Stack<S> =
    Probes<Headers<ContextService<Observe<Limits<Admission<Deadline<UserService<S>>>>>>>>;

/// Every layer of the default stack, built from the server's settings. Public so a user can
/// see what runs, and compose their own order (see the module doc of [`super`] for which
/// moves are safe) with `tower::ServiceBuilder`.
#[derive(Debug, Clone)]
pub struct Layers {
    /// Probes on the main port.
    pub probes: ProbesLayer,
    /// Hop-by-hop scrub and `Keep-Alive`.
    pub headers: HeadersLayer,
    /// The request context and its refusals.
    pub context: ContextLayer,
    /// Telemetry.
    pub observe: ObserveLayer,
    /// Body limits.
    pub limits: LimitsLayer,
    /// The concurrency limit.
    pub admission: AdmissionLayer,
    /// The deadline cut-off.
    pub deadline: DeadlineLayer,
}

impl Layers {
    /// The layers for `settings`: probes answered from `readiness`, `Keep-Alive` withdrawn
    /// when `shutdown` closes, tasks listed in `registry`, telemetry to `observer`, counters
    /// in `stats`, admission under `limiter`.
    pub fn new(
        settings: &HttpSettings,
        readiness: Readiness,
        shutdown: Shutdown,
        registry: &'static Registry,
        observer: Option<SharedObserver>,
        stats: Arc<Stats>,
        limiter: Option<crate::overload::Limiter>,
    ) -> Layers {
        let p = &settings.probes;
        let probes = if p.main_port {
            ProbesLayer::new(
                ProbePaths {
                    livez: p.livez_path.clone(),
                    readyz: p.readyz_path.clone(),
                    healthz: p.healthz_path.clone(),
                },
                readiness,
            )
        } else {
            ProbesLayer::off()
        };
        Layers {
            probes,
            headers: HeadersLayer::new(settings.server.idle_timeout.get(), shutdown),
            context: ContextLayer::new(
                &settings.deadline,
                settings.propagation.sample_ratio,
                registry,
                observer.clone(),
                stats.clone(),
            ),
            observe: ObserveLayer::new(observer),
            limits: LimitsLayer::new(settings.server.max_body_bytes.get(), stats.clone()),
            admission: AdmissionLayer::new(limiter, u64::from(settings.overload.retry_after_secs)),
            deadline: DeadlineLayer::new(stats),
        }
    }

    /// Wrap `service` in every layer, in the default order.
    pub fn stack<S>(&self, service: S) -> Stack<S> {
        use tower::Layer;
        self.probes.layer(
            self.headers.layer(
                self.context.layer(
                    self.observe.layer(
                        self.limits.layer(
                            self.admission
                                .layer(self.deadline.layer(ServiceLayer.layer(service))),
                        ),
                    ),
                ),
            ),
        )
    }
}
