//! One metrics recorder per node. `tern dev` runs three nodes in one process, and the
//! `metrics` facade has one global recorder, so each node gets its own Prometheus
//! recorder (every series labelled `node` and `region`) and its own tokio runtime whose
//! threads (workers and blocking pool) record into it: `on_thread_start` makes it the
//! thread's local recorder. The node's own OS threads (the history writer) do the same
//! through [`NodeRecorder::thread_start`].
//!
//! What is recorded on any other thread would fall to the global recorder. With one node
//! that is the node's recorder; with several it is [`Tripwire`], which counts nothing and
//! logs the metric's name once, so a series that escapes its node is seen, not silently
//! merged into another node's numbers.
//!
//! Histogram samples queue in the recorder until an upkeep drains them. The upkeep runs
//! a second after the first sample since the last one ([`Upkept`]), never on a bare
//! timer, so a node that records nothing never wakes for it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio::sync::Notify;

/// How long histogram samples gather before an upkeep drains them (the bound on what
/// the recorder holds undrained: about this long of samples).
const UPKEEP_AFTER: Duration = Duration::from_secs(1);

/// Histogram buckets (seconds) for every `*_seconds` series: 0.5 ms to 10 s, enough
/// resolution for a LAN ACK and for a WAN replication lag.
const BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A node's recorder, leaked: it is referenced by thread-locals for the life of the
/// process (a node is never torn down before the process ends).
#[derive(Clone, Copy)]
pub struct NodeRecorder {
    recorder: &'static Upkept,
}

/// A node's Prometheus recorder, whose histograms note that a sample waits for upkeep.
pub struct Upkept {
    inner: PrometheusRecorder,
    pending: Arc<Pending>,
}

/// Whether a histogram sample was recorded since the last upkeep, and the upkeep task's
/// wake-up for the first one.
#[derive(Default)]
struct Pending {
    recorded: AtomicBool,
    first: Notify,
}

impl Pending {
    /// A sample was recorded: wakes the upkeep if it is the first since the last one.
    /// Costs one relaxed load per sample once armed.
    fn mark(&self) {
        if !self.recorded.load(Ordering::Relaxed) && !self.recorded.swap(true, Ordering::AcqRel) {
            self.first.notify_one();
        }
    }
}

/// One histogram of a node: records into Prometheus's and marks the upkeep due.
struct MarkedHistogram {
    inner: Histogram,
    pending: Arc<Pending>,
}

impl HistogramFn for MarkedHistogram {
    fn record(&self, value: f64) {
        self.inner.record(value);
        self.pending.mark();
    }
}

impl NodeRecorder {
    pub fn new(node: &str, region: &str) -> NodeRecorder {
        let recorder = PrometheusBuilder::new()
            .add_global_label("node", node)
            .add_global_label("region", region)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS_SECONDS)
            .expect("the histogram buckets are valid")
            .build_recorder();
        let recorder = Upkept {
            inner: recorder,
            pending: Arc::default(),
        };
        NodeRecorder {
            recorder: Box::leak(Box::new(recorder)),
        }
    }

    /// Makes this node's recorder the current thread's, for the rest of the thread's life.
    pub fn enter(self) {
        // The guard would restore the previous recorder when dropped; the thread belongs
        // to this node until it ends, and the recorder is 'static.
        std::mem::forget(metrics::set_default_local_recorder(self.recorder));
    }

    /// Runs `f` with this node's recorder (describing the metrics, registering at zero).
    pub fn with<T>(self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self.recorder, f)
    }

    /// A runtime whose every thread records into this node's recorder.
    pub fn runtime(self, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(format!("tern-{name}"))
            .on_thread_start(move || self.enter())
            .build()
    }

    /// For the node's own OS threads.
    pub fn thread_start(self) -> tern_store::ThreadStart {
        Arc::new(move || self.enter())
    }

    /// Drains histogram samples into their buckets [`UPKEEP_AFTER`] after the first
    /// sample since the last drain, on the current runtime (the node's). Histogram
    /// samples queue in the recorder until drained; without this a node nobody scrapes
    /// would hold every sample ever recorded. A node that records nothing sleeps here.
    pub fn spawn_upkeep(self) {
        let handle = self.recorder.inner.handle();
        let pending = self.recorder.pending.clone();
        tokio::spawn(async move {
            loop {
                // Cancel-safe enough: a permit stored by `mark` while nobody waited is
                // taken by the next `notified`.
                pending.first.notified().await;
                tokio::time::sleep(UPKEEP_AFTER).await;
                // Cleared before draining: a sample recorded from here on arms the next
                // upkeep (one drained now as well costs an empty upkeep, nothing more).
                pending.recorded.store(false, Ordering::Release);
                handle.run_upkeep();
            }
        });
    }

    /// The node's `/metrics` text.
    pub fn render(self) -> crate::admin::Render {
        let handle = self.recorder.inner.handle();
        Arc::new(move || handle.render())
    }

    /// Installs the global recorder: `only`'s when it is the process's one node, else
    /// the [`Tripwire`].
    pub fn install_global(only: Option<NodeRecorder>) -> anyhow::Result<()> {
        let installed = match only {
            Some(node) => metrics::set_global_recorder(Forward(node.recorder)).is_ok(),
            None => metrics::set_global_recorder(Tripwire::default()).is_ok(),
        };
        anyhow::ensure!(installed, "a metrics recorder was already installed");
        Ok(())
    }
}

impl Recorder for Upkept {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_counter(key, unit, help)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_gauge(key, unit, help)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_histogram(key, unit, help)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(MarkedHistogram {
            inner: self.inner.register_histogram(key, metadata),
            pending: self.pending.clone(),
        }))
    }
}

/// The one node's recorder as the global one.
struct Forward(&'static Upkept);

impl Recorder for Forward {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.0.describe_counter(key, unit, help)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.0.describe_gauge(key, unit, help)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.0.describe_histogram(key, unit, help)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, metadata)
    }
}

/// The global recorder of a process running several nodes: anything recorded off every
/// node's threads is dropped and its name logged once (a bug to fix, never a number
/// added to the wrong node).
#[derive(Default)]
pub struct Tripwire {
    seen: Mutex<HashSet<String>>,
}

impl Tripwire {
    fn tripped(&self, key: &Key) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < 1_000 && seen.insert(key.name().to_string()) {
            tracing::warn!(
                metric = key.name(),
                "metric recorded outside any node's threads: not counted"
            );
        }
    }
}

impl Recorder for Tripwire {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.tripped(key);
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.tripped(key);
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.tripped(key);
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes' runtimes in one process count apart, each series labelled with its
    /// node and region.
    #[test]
    fn each_runtime_records_into_its_node() {
        let a = NodeRecorder::new("a-1", "us-east");
        let b = NodeRecorder::new("b-1", "eu-west");
        for (node, count) in [(a, 3), (b, 5)] {
            let runtime = node.runtime("test").unwrap();
            runtime.block_on(async move {
                for _ in 0..count {
                    tokio::spawn(async {
                        metrics::counter!("tern_frames_sent_total").increment(1);
                    })
                    .await
                    .unwrap();
                }
                tokio::task::spawn_blocking(|| {
                    metrics::counter!("tern_nacks_total").increment(1);
                })
                .await
                .unwrap();
            });
            let thread_start = node.thread_start();
            std::thread::spawn(move || {
                thread_start();
                metrics::counter!("tern_history_dropped_total").increment(1);
            })
            .join()
            .unwrap();
            runtime.shutdown_background();
        }
        let text_a = (a.render())();
        let text_b = (b.render())();
        assert!(
            text_a.contains(r#"tern_frames_sent_total{node="a-1",region="us-east"} 3"#),
            "{text_a}"
        );
        assert!(
            text_b.contains(r#"tern_frames_sent_total{node="b-1",region="eu-west"} 5"#),
            "{text_b}"
        );
        for (text, node) in [(&text_a, "a-1"), (&text_b, "b-1")] {
            for series in ["tern_nacks_total", "tern_history_dropped_total"] {
                assert!(
                    text.contains(&format!(r#"{series}{{node="{node}","#)),
                    "{series} on {node}: {text}"
                );
            }
        }
    }
}
