//! The outbox: every event a rule must deliver is written to the history store in the
//! same commit as the event itself (`HistoryStore::in_one_commit`), so the commit that
//! makes the publish durable (and its ACK possible) makes its webhooks durable too, and
//! a failed one leaves neither.
//!
//! # Layout in the store
//! Each rule has one outbox channel, `OUTBOX_APP` / `"\u{1}outbox:<app>/<rule>"`
//! (an app id no key can have, so no client reads it): its message rows are the
//! events to deliver, at positions `(timestamp, 0, outbox seq, 0)` where the outbox seq
//! counts 1, 2, 3 … per rule across restarts and the timestamp never goes backwards, so
//! position order is queue order; its presence rows are the delivered marks, the
//! newest of which names the last delivered (or given-up) event. Retention keeps the
//! newest `outbox_items_max` rows (see [`retention_rule`]); the journal never lets
//! more than that many wait undelivered, so retention only removes delivered rows.
//!
//! # Who delivers
//! A node records (and so delivers) only the events of its own origin: the events it
//! accepted, which it commits before it ACKs them. Each event has exactly one origin,
//! so exactly one node of the cluster delivers it, and nothing needs to be agreed.
//! In a cluster, one other node also keeps a *shadow* row of each event (see
//! [`crate::handover`]) and delivers it only if the origin dies.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tern_core::{ChannelEvent, ChannelKey, Journal, OriginId};
use tern_store::{
    ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, Position, RetentionRule,
    StoreError, StoredItem,
};
use tokio::sync::Notify;

use crate::handover::{Placement, ShadowRow};
use crate::lifecycle::{Aggregates, OCCUPANCY_CHANNEL};
use crate::payload::Entry;
use crate::rule::{Rule, Source};

/// The app id of every outbox channel: not `[A-Za-z0-9_-]+`, so no configured app
/// (and no client credential) names it.
pub const OUTBOX_APP: &str = "\u{1}functions";
/// Every outbox channel's name starts with this (what [`retention_rule`] matches).
pub const OUTBOX_CHANNEL_PREFIX: &str = "\u{1}outbox:";
/// How long outbox rows are kept at most (undelivered ones are given up after
/// `retry_for_ms` of failed requests long before).
const OUTBOX_AGE_MAX_MS: i64 = 24 * 60 * 60 * 1000;

/// The store's retention rule for outbox channels: the newest `items_max` rows
/// (the largest `outbox_items_max` of the rules), for at most a day.
pub fn retention_rule(items_max: u64) -> RetentionRule {
    RetentionRule {
        prefix: OUTBOX_CHANNEL_PREFIX.into(),
        max_count: items_max,
        max_age_ms: OUTBOX_AGE_MAX_MS,
    }
}

/// Where the next outbox row goes.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Outbox seq of the last row written (0: none yet).
    pub(crate) seq: u64,
    /// Its timestamp: later rows never sort before it, even if the clock steps back.
    pub(crate) timestamp_ms: i64,
}

/// One rule's outbox.
pub struct RuleOutbox {
    pub rule: Rule,
    /// The events to deliver.
    pub entries: ChannelRef,
    /// The delivered marks.
    pub marks: ChannelRef,
    tail: Mutex<Tail>,
    /// Outbox seq of the last event delivered or given up.
    delivered_seq: AtomicU64,
    /// The undelivered rows of this run as (outbox seq, accepted ms), keeping only those
    /// accepted before every later row (a monotonic queue): its front is the earliest
    /// accepted time still undelivered, the mark this node publishes in gossip (see
    /// [`crate::handover`]). At most the undelivered rows, so `outbox_items_max`.
    pending_accepted: Mutex<VecDeque<(u64, i64)>>,
    /// Woken when rows are committed.
    pub(crate) committed: Notify,
    /// `Some(origin)` for the shadow rows this node keeps of another origin's events.
    pub(crate) shadow_of: Option<OriginId>,
    /// This rule's shadow outboxes, by origin (own outboxes only; bounded).
    pub(crate) shadows: Mutex<HashMap<u64, Arc<RuleOutbox>>>,
    /// Set once a takeover of this shadow outbox started (it starts once).
    pub(crate) taken_over: AtomicBool,
}

impl RuleOutbox {
    fn new(rule: Rule) -> RuleOutbox {
        RuleOutbox::named(rule, None)
    }

    /// An own outbox (`shadow_of` = `None`) or the shadow outbox of `shadow_of`'s
    /// events: `\u{1}outbox:<app>/<rule>` or `\u{1}outbox:<app>/<rule>@<origin hex>`.
    pub(crate) fn named(rule: Rule, shadow_of: Option<OriginId>) -> RuleOutbox {
        let mut name = format!(
            "{OUTBOX_CHANNEL_PREFIX}{}/{}",
            rule.config.app, rule.config.id
        );
        if let Some(origin) = shadow_of {
            name.push_str(&format!("@{:016x}", origin.0));
        }
        let channel = |kind| ChannelRef::new(OUTBOX_APP, &name, kind);
        RuleOutbox {
            entries: channel(EventKind::Message),
            marks: channel(EventKind::Presence),
            rule,
            tail: Mutex::new(Tail::default()),
            delivered_seq: AtomicU64::new(0),
            pending_accepted: Mutex::new(VecDeque::new()),
            committed: Notify::new(),
            shadow_of,
            shadows: Mutex::new(HashMap::new()),
            taken_over: AtomicBool::new(false),
        }
    }

    pub(crate) fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Events recorded but not yet delivered or given up.
    pub fn undelivered(&self) -> u64 {
        self.tail()
            .seq
            .saturating_sub(self.delivered_seq.load(Ordering::Acquire))
    }

    pub(crate) fn set_delivered(&self, upto: Position) {
        self.delivered_seq.fetch_max(upto.seq, Ordering::AcqRel);
        let mut pending = self.pending_accepted();
        while pending.front().is_some_and(|(seq, _)| *seq <= upto.seq) {
            pending.pop_front();
        }
    }

    fn pending_accepted(&self) -> MutexGuard<'_, VecDeque<(u64, i64)>> {
        self.pending_accepted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This node's delivered mark at `now_ms`: every event of this run accepted before
    /// it is delivered (or given up); `now_ms` when nothing waits.
    pub fn mark_ms(&self, now_ms: i64) -> i64 {
        self.pending_accepted()
            .front()
            .map_or(now_ms, |(_, accepted)| (*accepted).min(now_ms))
    }

    /// The position of the last delivered event, from the newest mark (blocking).
    pub(crate) fn read_delivered(&self, store: &dyn HistoryStore) -> Result<Position, StoreError> {
        let newest = newest(store, &self.marks)?;
        Ok(newest
            .and_then(|item| {
                std::str::from_utf8(&item.payload)
                    .ok()
                    .and_then(Position::decode)
            })
            .unwrap_or(Position::MIN))
    }

    /// Restores the tail and delivered mark from the store (blocking; at boot).
    fn recover(&self, store: &dyn HistoryStore) -> Result<(), StoreError> {
        if let Some(item) = newest(store, &self.entries)? {
            let mut tail = self.tail();
            tail.seq = item.seq;
            tail.timestamp_ms = item.timestamp_ms;
        }
        let delivered = self.read_delivered(store)?;
        self.set_delivered(delivered);
        let mut tail = self.tail();
        if tail.seq < delivered.seq {
            // Retention removed every row but not the newest mark (marks are younger):
            // continue after the mark, or the count of undelivered rows would read 0
            // until the new rows caught up with it, and the bound would not hold.
            tail.seq = delivered.seq;
            tail.timestamp_ms = tail.timestamp_ms.max(delivered.timestamp_ms);
        }
        Ok(())
    }

    /// Queues `entries` as outbox rows after every row queued before (called under the
    /// channel lock, like every journal: it only queues). Over `outbox_items_max`
    /// undelivered, the rest are dropped and counted.
    pub(crate) fn append(
        self: &Arc<Self>,
        store: &dyn HistoryStore,
        entries: Vec<Entry>,
        event_ms: i64,
    ) {
        let mut tail = self.tail();
        let room = self.rule.config.outbox_items_max.saturating_sub(
            tail.seq
                .saturating_sub(self.delivered_seq.load(Ordering::Acquire)),
        );
        let kept = entries.len().min(room as usize);
        if kept < entries.len() {
            dropped(
                &self.rule.config.id,
                "outbox_full",
                (entries.len() - kept) as u64,
            );
        }
        if kept == 0 {
            return;
        }
        tail.timestamp_ms = tail.timestamp_ms.max(event_ms);
        {
            let mut pending = self.pending_accepted();
            while pending
                .back()
                .is_some_and(|(_, accepted)| *accepted >= event_ms)
            {
                pending.pop_back();
            }
            pending.push_back((tail.seq + kept as u64, event_ms));
        }
        let rows = entries
            .into_iter()
            .take(kept)
            .map(|entry| {
                tail.seq += 1;
                let item = StoredItem {
                    timestamp_ms: tail.timestamp_ms,
                    origin: 0,
                    seq: tail.seq,
                    index: 0,
                    payload: entry.encode(),
                };
                (self.entries.clone(), item)
            })
            .collect();
        let outbox = self.clone();
        let done = Box::new(move |committed: Result<(), StoreError>| {
            // Woken only once the rows are readable; a failed commit also fails the
            // publish's barrier (the store counts it), so the publish is NACKed.
            if committed.is_ok() {
                outbox.committed.notify_one();
            }
        });
        // Queued while the tail is held, so store order is outbox seq order. A refused
        // append is counted by the store as a lost write: the publish's reply waits on
        // that count and becomes a NACK, so no ACKed event lacks its outbox row.
        if let Err(err) = store.append(rows, done) {
            tracing::warn!(rule = %self.rule.config.id, error = %err, "webhook outbox append refused");
        }
    }
}

fn newest(
    store: &dyn HistoryStore,
    channel: &ChannelRef,
) -> Result<Option<StoredItem>, StoreError> {
    let mut query = HistoryQuery::new(channel.clone());
    query.limit = 1;
    query.direction = Direction::Backwards;
    Ok(store.query(&query)?.items.into_iter().next())
}

pub(crate) fn dropped(rule: &str, reason: &'static str, count: u64) {
    metrics::counter!("tern_webhook_events_dropped_total", "rule" => rule.to_string(), "reason" => reason)
        .increment(count);
    tracing::warn!(rule, reason, count, "webhook events dropped");
}

/// Every rule's outbox on this node.
pub struct Outbox {
    pub(crate) store: Arc<dyn HistoryStore>,
    origin: OriginId,
    pub(crate) rules: Vec<Arc<RuleOutbox>>,
    /// Which other origins' events this node shadows, and which apps it aggregates
    /// (set once, in a cluster).
    placement: OnceLock<Arc<dyn Placement>>,
    /// Occupancy reports folded per channel, for lifecycle and occupancy events.
    pub(crate) aggregates: Aggregates,
}

impl Outbox {
    /// Opens the outboxes of `rules` in `store` for a node whose origin is `origin`,
    /// picking up what an earlier run left undelivered. Blocking (two reads per rule).
    pub fn open(
        store: Arc<dyn HistoryStore>,
        origin: OriginId,
        rules: Vec<Rule>,
    ) -> Result<Arc<Outbox>, StoreError> {
        let rules: Vec<Arc<RuleOutbox>> = rules
            .into_iter()
            .map(|r| Arc::new(RuleOutbox::new(r)))
            .collect();
        for rule in &rules {
            rule.recover(store.as_ref())?;
        }
        Ok(Arc::new(Outbox {
            store,
            origin,
            rules,
            placement: OnceLock::new(),
            aggregates: Aggregates::default(),
        }))
    }

    /// In a cluster: from now on, other origins' events `placement` names are kept as
    /// shadow rows, for a takeover if their origin dies ([`crate::handover`]), and only
    /// the apps it names are aggregated ([`crate::lifecycle`]).
    pub fn set_placement(&self, placement: Arc<dyn Placement>) {
        let _ = self.placement.set(placement);
    }

    pub(crate) fn placement(&self) -> Option<&Arc<dyn Placement>> {
        self.placement.get()
    }

    /// This node's origin.
    pub fn origin(&self) -> OriginId {
        self.origin
    }

    /// The outboxes, for status and tests.
    pub fn rules(&self) -> &[Arc<RuleOutbox>] {
        &self.rules
    }

    /// Whether this node keeps shadow rows of another origin's `event`: some rule
    /// matches its channel (checked first: it is cheaper) and the placement says so.
    fn shadows(&self, key: &ChannelKey, event: &ChannelEvent) -> bool {
        let Some(placement) = self.placement.get() else {
            return false;
        };
        let matched = self.rules.iter().any(|r| {
            r.rule.matches(&key.app, &key.name, Source::Message)
                || r.rule.matches(&key.app, &key.name, Source::Presence)
        });
        matched && placement.shadows(key, event.origin)
    }

    /// Writes the outbox rows of one applied event (see [`OutboxJournal`]).
    pub fn record(&self, key: &ChannelKey, event: &ChannelEvent) {
        if &*key.name == OCCUPANCY_CHANNEL {
            self.record_reports(key, event);
            return;
        }
        let own = event.origin == self.origin;
        if !own && !self.shadows(key, event) {
            // Another node accepted it; that node delivers it.
            return;
        }
        let fallback = |index: usize| format!("{:x}-{:x}:{index}", event.origin.0, event.seq);
        for rule in &self.rules {
            let mut entries = Vec::new();
            if let Some(messages) = &event.frame.messages {
                if rule.rule.matches(&key.app, &key.name, Source::Message) {
                    entries.extend(
                        messages
                            .iter()
                            .enumerate()
                            .map(|(i, m)| Entry::message(&key.app, &key.name, m, fallback(i))),
                    );
                }
            }
            if let Some(presence) = &event.frame.presence {
                if rule.rule.matches(&key.app, &key.name, Source::Presence) {
                    entries.extend(
                        presence
                            .iter()
                            .enumerate()
                            .map(|(i, p)| Entry::presence(&key.app, &key.name, p, fallback(i))),
                    );
                }
            }
            if entries.is_empty() {
                continue;
            }
            if own {
                rule.append(self.store.as_ref(), entries, event.timestamp_ms());
                continue;
            }
            let rows = entries
                .into_iter()
                .map(|entry| ShadowRow {
                    accepted_ms: event.timestamp_ms(),
                    entry,
                })
                .collect();
            rule.shadow(event.origin)
                .append_shadow(self.store.as_ref(), rows);
        }
    }
}

impl Outbox {
    /// The apps with a rule that wants `connection.disconnected`.
    pub fn disconnect_apps(&self) -> Vec<String> {
        let mut apps: Vec<String> = self
            .rules
            .iter()
            .filter(|rule| rule.rule.config.sources.contains(&Source::Disconnect))
            .map(|rule| rule.rule.config.app.clone())
            .collect();
        apps.sort();
        apps.dedup();
        apps
    }

    /// Writes the outbox rows of a connection that ended on this node (the
    /// `connection.disconnected` event) for every rule of `app` that wants it. Only
    /// queued: durable with the store's next commit, delivered as any event.
    pub fn record_disconnect(
        &self,
        app: &str,
        connection_id: &str,
        now_ms: i64,
        item: serde_json::Value,
    ) {
        for rule in &self.rules {
            let config = &rule.rule.config;
            if config.app == app && config.sources.contains(&Source::Disconnect) {
                let entry = Entry::disconnected(app, connection_id, now_ms, item.clone());
                rule.append(self.store.as_ref(), vec![entry], now_ms);
            }
        }
    }
}

/// The hub's journal on a node with webhook rules: the history journal first (the
/// event's own rows), then the event's outbox rows, in one append (one commit), so the
/// barrier a publish's ACK waits on covers both and neither is stored without the other.
pub struct OutboxJournal {
    pub history: Arc<dyn Journal>,
    pub outbox: Arc<Outbox>,
}

impl Journal for OutboxJournal {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        // One commit for both: an outbox row committed after its event's failed commit
        // would send a function a message the publisher was refused (NACK) and history
        // never had (`tests/disk_fault.rs` found it on a full disk).
        self.outbox.store.in_one_commit(&mut || {
            self.history.record(key, event);
            self.outbox.record(key, event);
        });
    }

    fn restore(&self, key: &ChannelKey) -> tern_core::Cursor {
        self.history.restore(key)
    }

    fn interest(&self, key: &ChannelKey, attached: bool) {
        self.history.interest(key, attached);
    }

    fn may_drop(&self, key: &ChannelKey) -> bool {
        self.history.may_drop(key)
    }
}
