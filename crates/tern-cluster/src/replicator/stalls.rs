//! Driving `tern_replication::stalls`: the gaps the hub holds events back behind are
//! watched, and a crashed origin's gap (its node back as another incarnation) that stood
//! still for `GAP_GIVE_UP` is skipped so the events behind it are delivered.

use super::*;

impl Replicator {
    /// The hub answered an event of `origin` on `key` with a gap from `first`.
    pub(super) fn on_gap(&self, key: &ChannelKey, origin: u64, first: u64) {
        if !lock(&self.stalls).on_gap(key, origin, first, self.now()) {
            metrics::counter!("tern_replication_stalls_full_total").increment(1);
        }
    }

    /// Each second: skips the gaps of crashed origins that nobody filled for a while.
    pub(super) fn skip_dead_gaps(&self) {
        self.skip_dead_gaps_at(self.now());
    }

    /// Test hook: [`Self::skip_dead_gaps`] as if `later` had passed on this driver's
    /// clock (the rule waits `GAP_GIVE_UP`).
    pub fn skip_dead_gaps_after(&self, later: Duration) {
        self.skip_dead_gaps_at(self.now() + later);
    }

    fn skip_dead_gaps_at(&self, now: Duration) {
        let Some(hub) = self.running.get().and_then(|r| r.hub.upgrade()) else {
            return;
        };
        // The table's lock is held while the hub's channels are read (`Stalls::tick`):
        // nothing takes it under a channel's lock.
        let skips =
            lock(&self.stalls).tick(now, |key, origin| hub.held_back(key, OriginId(origin)));
        for (key, origin, upto) in skips {
            let applied = hub.skip_remote(&key, OriginId(origin), upto, crate::now_ms());
            metrics::counter!("tern_replication_dead_gaps_skipped_total").increment(1);
            tracing::warn!(
                app = %key.app,
                channel = %key.name,
                origin,
                upto,
                applied,
                "a dead origin's gap nobody could fill was skipped"
            );
        }
    }
}
