//! Handover of a dead node's webhooks. Each event is delivered by its origin (the node
//! that accepted it, see [`crate::outbox`]); if that node dies for good, another one
//! delivers what it had not. The rule:
//!
//! 1. **Shadow rows.** One other node per (channel, origin) — the one the
//!    [`Placement`] names; in a cluster, the channel's home in the region after the
//!    origin's (a node every event of the channel already reaches) — writes a *shadow*
//!    outbox row for each matching event of that origin it applies, in the same writer
//!    queue as the event's own rows, so the `Stored` ack it sends the origin (what
//!    `ack_replicas` counts) covers the shadow row too. Shadow rows live in their own
//!    outbox channel per (rule, origin) and are bounded like an outbox (the newest
//!    `outbox_items_max` rows, a day at most).
//! 2. **Marks in gossip.** Each origin publishes, per rule, its delivered mark
//!    ([`Outbox::marks`], at most once a second): the earliest accepted time among its
//!    undelivered events, or the time of the snapshot when none waits. An event queued
//!    after the snapshot was accepted at most [`TAKEOVER_SKEW_MS`] before it (the edge
//!    reads the clock before the channel lock is taken).
//! 3. **Takeover.** When gossip declares the origin dead (and it has not come back on
//!    its data directory, which resumes its own outbox), every node holding shadow
//!    rows of it delivers those accepted at or after `mark - TAKEOVER_SKEW_MS`
//!    ([`Outbox::take_over`]), in shadow order (each channel's events in origin order),
//!    and keeps delivering rows repair brings later.
//!
//! Loss: none for an event that reached its shadow node, which every ACKed event does
//! (directly, or by repair from any survivor that has it). Duplicates: what the origin
//! delivered after the mark its peers last heard (a second of publishing plus a gossip
//! round), and what it delivered of the [`TAKEOVER_SKEW_MS`] before it; every copy
//! carries the same `serial`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_core::{ChannelKey, OriginId};
use tern_store::{HistoryStore, StoreError, StoredItem};

use crate::outbox::{Outbox, RuleOutbox};
use crate::payload::Entry;

/// How far before an origin's published mark a takeover starts delivering (see the
/// module doc): more duplicates, never a gap.
pub const TAKEOVER_SKEW_MS: i64 = 1_000;
/// Origins whose shadow rows one rule tracks in memory at once; past it the one written
/// to longest ago is forgotten (its rows stay in the store, where a takeover finds them).
const SHADOW_ORIGINS_MAX: usize = 256;

/// Which node of a cluster does what for webhooks (implemented where the node is
/// wired; a node without one is alone: it aggregates every app and shadows nothing).
pub trait Placement: Send + Sync {
    /// Whether this node keeps shadow rows of `origin`'s events on `key`. Called under
    /// the channel lock for events a rule matches: must be quick and never block.
    fn shadows(&self, key: &ChannelKey, origin: OriginId) -> bool;
    /// Whether this node aggregates `app`'s occupancy reports into lifecycle and
    /// occupancy events ([`crate::lifecycle`]). Same constraints.
    fn aggregates(&self, app: &str) -> bool;
}

/// A shadow row: the entry the origin queued, and when the origin accepted the event
/// (what a takeover compares with the origin's mark). Its JSON is the entry's plus
/// `accepted_ms`, so it decodes as an [`Entry`] too.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShadowRow {
    pub accepted_ms: i64,
    #[serde(flatten)]
    pub entry: Entry,
}

#[derive(Deserialize)]
struct Accepted {
    accepted_ms: i64,
}

impl ShadowRow {
    /// The `accepted_ms` of a stored shadow row (`None` for other bytes).
    pub fn accepted_ms(payload: &[u8]) -> Option<i64> {
        serde_json::from_slice::<Accepted>(payload)
            .ok()
            .map(|a| a.accepted_ms)
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl RuleOutbox {
    /// This rule's shadow outbox of `origin`'s events (made on first use).
    pub(crate) fn shadow(&self, origin: OriginId) -> Arc<RuleOutbox> {
        let mut shadows = self
            .shadows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shadow) = shadows.get(&origin.0) {
            return shadow.clone();
        }
        if shadows.len() >= SHADOW_ORIGINS_MAX {
            let oldest = shadows
                .iter()
                .min_by_key(|(_, s)| s.tail().timestamp_ms)
                .map(|(origin, _)| *origin);
            if let Some(oldest) = oldest {
                shadows.remove(&oldest);
            }
        }
        let shadow = Arc::new(RuleOutbox::named(self.rule.clone(), Some(origin)));
        // Shadow rows are numbered from the wall clock (×1000) so a restarted node's
        // rows never reuse an earlier run's positions; nothing counts them densely.
        shadow.tail().seq = (wall_ms().max(0) as u64).saturating_mul(1000);
        shadows.insert(origin.0, shadow.clone());
        shadow
    }

    /// Queues shadow rows after every row of this shadow outbox queued before, at
    /// positions in arrival order (the wall clock, never backwards), so a takeover that
    /// is already delivering picks up rows repair brings later. Called under the
    /// channel lock: it only queues.
    pub(crate) fn append_shadow(self: &Arc<Self>, store: &dyn HistoryStore, rows: Vec<ShadowRow>) {
        let mut tail = self.tail();
        tail.timestamp_ms = tail.timestamp_ms.max(wall_ms());
        let items = rows
            .into_iter()
            .map(|row| {
                tail.seq += 1;
                let item = StoredItem {
                    timestamp_ms: tail.timestamp_ms,
                    origin: 0,
                    seq: tail.seq,
                    index: 0,
                    payload: serde_json::to_vec(&row).unwrap_or_default().into(),
                };
                (self.entries.clone(), item)
            })
            .collect();
        let shadow = self.clone();
        let done = Box::new(move |committed: Result<(), StoreError>| {
            if committed.is_ok() {
                shadow.committed.notify_one();
            }
        });
        // A refused append is a lost write to the store, which then stops acknowledging
        // the link the event came on: the origin resends it, nothing is ACKed without it.
        if let Err(err) = store.append(items, done) {
            tracing::warn!(rule = %self.rule.config.id, error = %err, "webhook shadow append refused");
        }
    }
}

/// Delivered marks as published in gossip: `app/rule=ms;…`.
pub fn encode_marks(marks: &[(String, String, i64)]) -> String {
    marks
        .iter()
        .map(|(app, rule, ms)| format!("{app}/{rule}={ms}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The marks of [`encode_marks`], by `app/rule`; what does not parse is left out
/// (a takeover then delivers everything shadowed for that rule).
pub fn parse_marks(text: &str) -> HashMap<String, i64> {
    text.split(';')
        .filter_map(|pair| {
            let (rule, ms) = pair.split_once('=')?;
            Some((rule.to_string(), ms.parse().ok()?))
        })
        .collect()
}

impl Outbox {
    /// Every rule's delivered mark, encoded for gossip ([`encode_marks`]).
    pub fn marks(&self) -> String {
        let marks: Vec<(String, String, i64)> = self
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule.config.app.clone(),
                    r.rule.config.id.clone(),
                    r.mark_ms(wall_ms()),
                )
            })
            .collect();
        encode_marks(&marks)
    }

    /// Takes over the webhooks of `origin`, a dead node whose last published marks were
    /// `marks`: delivers, per rule, the shadow rows this node keeps of it that were
    /// accepted at or after its mark less [`TAKEOVER_SKEW_MS`]. Each rule's takeover
    /// starts once; it ends after a quiet while with nothing left. Returns the rules
    /// whose takeover started now.
    pub fn take_over(self: &Arc<Self>, origin: OriginId, marks: &str) -> usize {
        if origin == self.origin() {
            return 0;
        }
        let marks = parse_marks(marks);
        let mut started = 0;
        for rule in &self.rules {
            let shadow = rule.shadow(origin);
            if shadow.taken_over.swap(true, Ordering::AcqRel) {
                continue;
            }
            let config = &rule.rule.config;
            let from_ms = marks
                .get(&format!("{}/{}", config.app, config.id))
                .map_or(i64::MIN, |ms| ms.saturating_sub(TAKEOVER_SKEW_MS));
            metrics::counter!("tern_webhook_takeovers_total", "rule" => config.id.clone())
                .increment(1);
            tracing::info!(rule = %config.id, origin = %format!("{:016x}", origin.0), from_ms, "taking over a dead node's webhooks");
            crate::driver::spawn_takeover(self.store.clone(), shadow, from_ms);
            started += 1;
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks survive the gossip encoding; junk parses to nothing rather than failing.
    #[test]
    fn marks_round_trip() {
        let marks = vec![
            ("app".to_string(), "r1".to_string(), 1_765_000_000_123),
            ("other".to_string(), "r-2".to_string(), 0),
        ];
        let parsed = parse_marks(&encode_marks(&marks));
        assert_eq!(parsed.get("app/r1"), Some(&1_765_000_000_123));
        assert_eq!(parsed.get("other/r-2"), Some(&0));
        assert!(parse_marks("").is_empty());
        assert!(parse_marks("x;y=z;=;a/b=1").len() == 1);
    }

    /// A shadow row decodes as the entry it wraps, and its accepted time is readable.
    #[test]
    fn shadow_row_is_an_entry() {
        let entry = Entry {
            source: "channel.message".into(),
            app: "app".into(),
            channel: "ch".into(),
            timestamp: 5,
            serial: "s:0".into(),
            item: serde_json::json!({"id": "m"}),
        };
        let row = ShadowRow {
            accepted_ms: 42,
            entry: entry.clone(),
        };
        let bytes = serde_json::to_vec(&row).unwrap();
        assert_eq!(Entry::decode(&bytes), Some(entry));
        assert_eq!(ShadowRow::accepted_ms(&bytes), Some(42));
        assert_eq!(ShadowRow::accepted_ms(b"{}"), None);
    }
}
