//! Node-level measurements the edge takes on its hot paths at almost no cost: the
//! deepest client outbound queue (a relaxed load per write batch; a store only when it
//! is a new maximum) and publish → delivery latency (one histogram sample per write
//! batch, for its oldest event).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tern_core::{ChannelEvent, OriginId};

/// Seconds of housekeeping ticks the queue high-water gauge looks back over: at least
/// one Prometheus scrape interval, so a burst between scrapes is still seen.
const HIGH_WATER_WINDOW: usize = 15;

/// The deepest outbound queue any client of this node had, per housekeeping tick.
#[derive(Default)]
pub(crate) struct QueueHighWater {
    /// Deepest since the last tick.
    current: AtomicUsize,
    /// The last `HIGH_WATER_WINDOW` ticks' maxima.
    window: Mutex<VecDeque<usize>>,
}

impl QueueHighWater {
    /// A writer found `depth` items queued when it woke.
    pub(crate) fn saw(&self, depth: usize) {
        if depth > self.current.load(Ordering::Relaxed) {
            self.current.fetch_max(depth, Ordering::Relaxed);
        }
    }

    /// Nothing seen since the last tick and the window holds only zeros: ticks would
    /// change nothing.
    pub(crate) fn is_settled(&self) -> bool {
        self.current.load(Ordering::Relaxed) == 0
            && self
                .window
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .all(|&max| max == 0)
    }

    /// Once a second: closes the tick and sets `tern_outbound_queue_depth_max` to the
    /// deepest queue of the window.
    pub(crate) fn tick(&self) {
        let deepest = self.current.swap(0, Ordering::Relaxed);
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.len() == HIGH_WATER_WINDOW {
            window.pop_front();
        }
        window.push_back(deepest);
        let max = window.iter().copied().max().unwrap_or(0);
        metrics::gauge!("tern_outbound_queue_depth_max").set(max as f64);
    }
}

/// The oldest event of one write batch, to sample publish → delivery latency once per
/// batch.
#[derive(Default)]
pub(crate) struct OldestInBatch {
    /// (timestamp ms, whether this node published it).
    oldest: Option<(i64, bool)>,
}

impl OldestInBatch {
    pub(crate) fn add(&mut self, event: &ChannelEvent, local: OriginId) {
        let at = event.timestamp_ms();
        if at > 0 && self.oldest.is_none_or(|(oldest, _)| at < oldest) {
            self.oldest = Some((at, event.origin == local));
        }
    }

    /// Records the batch's oldest event into `histograms`.
    pub(crate) fn record(self, histograms: &DeliveryHistograms, now_ms: i64) {
        if let Some((at, local)) = self.oldest {
            let seconds = now_ms.saturating_sub(at).max(0) as f64 / 1_000.0;
            match local {
                true => histograms.local.record(seconds),
                false => histograms.remote.record(seconds),
            }
        }
    }
}

/// `tern_delivery_seconds{origin}`: from the publish's timestamp to the batch written to
/// the client (`local`: published on this node; `remote`: replicated from another, so it
/// includes the replication lag). Handles taken once per node, on its thread
/// (`EdgeState::delivery_histograms`), so a batch records without a registry lookup.
pub(crate) struct DeliveryHistograms {
    local: metrics::Histogram,
    remote: metrics::Histogram,
}

impl DeliveryHistograms {
    pub(crate) fn new() -> DeliveryHistograms {
        DeliveryHistograms {
            local: metrics::histogram!("tern_delivery_seconds", "origin" => "local"),
            remote: metrics::histogram!("tern_delivery_seconds", "origin" => "remote"),
        }
    }
}
