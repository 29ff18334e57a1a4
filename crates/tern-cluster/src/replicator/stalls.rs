//! Driving `tern_replication::stalls`: the gaps the hub holds events back behind are
//! watched (by `receive::event`, in `receive.rs`), and a crashed origin's gap (its node back as another incarnation) that stood
//! still for `GAP_GIVE_UP` is skipped so the events behind it are delivered.

use tern_replication::receive;

use super::*;

impl Replicator {
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
        let mut out = Vec::new();
        let at = receive::At {
            now,
            ..self.at(&hub)
        };
        receive::tick(at, &mut lock(&self.gaps), &mut out);
        for action in out {
            if let receive::Do::GaveUp {
                key,
                origin,
                upto,
                applied,
            } = action
            {
                gave_up(&key, origin, upto, applied);
            }
        }
    }
}

/// A dead origin's gap was given up (`receive::Do::GaveUp`): counted and logged.
pub(super) fn gave_up(key: &ChannelKey, origin: u64, upto: u64, applied: usize) {
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
