//! Scrape-time collectors for what keeps its own counters: the tokio runtime and Keel's task
//! registry. Each reads current values when `/metrics` is rendered; nothing runs between
//! scrapes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use keel_core::tasks::{Registry, TaskKind};

use crate::metrics::Metrics;

/// Runtime signals of the runtime behind `handle`: workers, alive tasks, the global queue,
/// per-worker busy time and the busy ratio since the previous scrape (the executor's
/// saturation: near 1.0 means work is queueing). Per-worker local queue depths need tokio's
/// unstable metrics and are exported when Keel is built with `--cfg tokio_unstable`.
pub fn runtime(metrics: &Metrics, handle: tokio::runtime::Handle) {
    let last: Mutex<Option<(Instant, Vec<Duration>)>> = Mutex::new(None);
    metrics.add_collector(move |e| {
        let m = handle.metrics();
        let workers = m.num_workers();
        e.family("keel_runtime_workers", "Tokio worker threads.", "gauge");
        e.sample("keel_runtime_workers", &[], workers as f64);
        e.family(
            "keel_runtime_alive_tasks",
            "Tasks alive in the runtime.",
            "gauge",
        );
        e.sample("keel_runtime_alive_tasks", &[], m.num_alive_tasks() as f64);
        e.family(
            "keel_runtime_global_queue_depth",
            "Tasks waiting in the runtime's global (injection) queue.",
            "gauge",
        );
        e.sample(
            "keel_runtime_global_queue_depth",
            &[],
            m.global_queue_depth() as f64,
        );

        let now = Instant::now();
        let busy: Vec<Duration> = (0..workers)
            .map(|w| m.worker_total_busy_duration(w))
            .collect();
        e.family(
            "keel_runtime_worker_busy_seconds_total",
            "Time each worker spent running tasks.",
            "counter",
        );
        e.family(
            "keel_runtime_worker_busy_ratio",
            "Share of wall time each worker was busy since the previous scrape.",
            "gauge",
        );
        let mut prev = last.lock().unwrap_or_else(|p| p.into_inner());
        for (w, b) in busy.iter().enumerate() {
            let worker = w.to_string();
            e.sample(
                "keel_runtime_worker_busy_seconds_total",
                &[("worker", &worker)],
                b.as_secs_f64(),
            );
            if let Some((then, before)) = prev.as_ref()
                && let Some(was) = before.get(w)
            {
                let wall = now.saturating_duration_since(*then).as_secs_f64();
                if wall > 0.0 {
                    let ratio = (b.saturating_sub(*was).as_secs_f64() / wall).clamp(0.0, 1.0);
                    e.sample(
                        "keel_runtime_worker_busy_ratio",
                        &[("worker", &worker)],
                        ratio,
                    );
                }
            }
        }
        *prev = Some((now, busy));
        drop(prev);

        #[cfg(tokio_unstable)]
        {
            e.family(
                "keel_runtime_worker_local_queue_depth",
                "Tasks waiting in each worker's local queue.",
                "gauge",
            );
            for w in 0..workers {
                e.sample(
                    "keel_runtime_worker_local_queue_depth",
                    &[("worker", &w.to_string())],
                    m.worker_local_queue_depth(w) as f64,
                );
            }
        }
    });
}

/// Live Keel tasks by kind and leak suspects, from a service's task registry.
pub fn tasks(metrics: &Metrics, registry: &'static Registry) {
    metrics.add_collector(move |e| {
        let r = registry;
        e.family(
            "keel_tasks_live",
            "Live tasks in Keel's registry, by kind.",
            "gauge",
        );
        for kind in [
            TaskKind::Request,
            TaskKind::Scoped,
            TaskKind::Detached,
            TaskKind::Background,
        ] {
            e.sample(
                "keel_tasks_live",
                &[("kind", kind.as_str())],
                r.live_by_kind(kind) as f64,
            );
        }
        e.family(
            "keel_task_leak_suspects_total",
            "Tasks found alive well past their owner's deadline, since start.",
            "counter",
        );
        e.sample(
            "keel_task_leak_suspects_total",
            &[],
            r.leak_suspects_total() as f64,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricsConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runtime_and_task_families_are_rendered() {
        let m = Metrics::new(MetricsConfig::default());
        runtime(&m, tokio::runtime::Handle::current());
        tasks(&m, Registry::global());
        let first = m.render();
        assert!(first.contains("keel_runtime_workers 2\n"), "{first}");
        assert!(
            first.contains("keel_tasks_live{kind=\"request\"}"),
            "{first}"
        );
        // The busy ratio needs two scrapes.
        assert!(!first.contains("keel_runtime_worker_busy_ratio{"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = m.render();
        assert!(
            second.contains("keel_runtime_worker_busy_ratio{worker=\"0\"}"),
            "{second}"
        );
    }
}
