//! `channel.lifecycle` and `channel.occupancy` as the cluster sees a channel, not one
//! node: a channel opens when its first attachment anywhere appears and closes when the
//! last one anywhere goes.
//!
//! How the cluster knows: every node reports its own occupancy of the channels a
//! lifecycle or occupancy rule matches (at most once a second per channel, when it
//! changed, and all non-empty ones every [`REFRESH_MS`]) as messages on the app's
//! internal channel [`OCCUPANCY_CHANNEL`], published through the hub like any event, so
//! replication carries the reports to that channel's home in every region. One node
//! aggregates: the one the [`crate::handover::Placement`] names (in a cluster, the home
//! of [`OCCUPANCY_CHANNEL`] in the first region by name; a single node is its own). It
//! folds the reports, per channel and reporting origin, into cluster totals as it
//! journals them (connections, publishers, subscribers and presence subscribers are
//! summed over nodes; presence members and presence connections, which every node holding
//! the channel sees whole, are the largest report), and on a change queues the events in
//! its own outbox, in the same commit as the report: delivered like any webhook, at least
//! once, by this one node, with a `serial` made from the report's own position (two
//! aggregators briefly disagreeing emit the same serial).
//!
//! A node that leaves the cluster stops counting ([`Outbox::forget_origin`]). A node that
//! becomes the aggregator learns for two refreshes and a second (from the first report
//! it sees; every node sends at least an empty heartbeat report each refresh) before it
//! emits, so it starts from the cluster's state rather than announcing every open
//! channel again. So a new cluster emits its first lifecycle events 11-16 s after it
//! starts, and an open or close that happens while the aggregator changes may be lost.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern_core::{ChannelEvent, ChannelKey, OriginId};

use crate::outbox::Outbox;
use crate::payload::Entry;
use crate::rule::Source;

/// The internal channel occupancy reports travel on (one per app; no client can name a
/// channel starting with `[`).
pub const OCCUPANCY_CHANNEL: &str = "[internal]occupancy";
/// Every node reports all its non-empty channels this often, so a new aggregator knows
/// the cluster's state within it.
pub const REFRESH_MS: i64 = 5_000;
/// How long a new aggregator learns before it emits: every node has refreshed twice.
const WARM_UP_MS: i64 = 2 * REFRESH_MS + 1_000;
/// Channels one app's aggregate holds at most; past it new channels are ignored (and
/// logged), never an unbounded map.
pub const CHANNELS_MAX: usize = 100_000;

/// One node's occupancy of one channel, in Ably's metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub connections: u64,
    pub publishers: u64,
    pub subscribers: u64,
    pub presence_connections: u64,
    pub presence_members: u64,
    pub presence_subscribers: u64,
}

impl Metrics {
    pub fn from_status(status: &tern_core::ChannelStatus) -> Metrics {
        Metrics {
            connections: status.connections as u64,
            publishers: status.publishers as u64,
            subscribers: status.subscribers as u64,
            presence_connections: status.presence_connections as u64,
            presence_members: status.presence_members as u64,
            presence_subscribers: status.presence_subscribers as u64,
        }
    }

    /// Whether the channel is active: someone attached or present.
    pub fn is_active(&self) -> bool {
        self.connections > 0 || self.presence_members > 0
    }

    /// The cluster's totals from each node's report (see the module doc).
    fn total<'a>(reports: impl Iterator<Item = &'a Metrics>) -> Metrics {
        reports.fold(Metrics::default(), |sum, m| Metrics {
            connections: sum.connections + m.connections,
            publishers: sum.publishers + m.publishers,
            subscribers: sum.subscribers + m.subscribers,
            presence_subscribers: sum.presence_subscribers + m.presence_subscribers,
            presence_connections: sum.presence_connections.max(m.presence_connections),
            presence_members: sum.presence_members.max(m.presence_members),
        })
    }
}

/// One report message's data: a channel and this node's metrics of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub channel: String,
    pub metrics: Metrics,
}

/// The message name of reports.
pub const REPORT_NAME: &str = "occupancy";

/// What an app's aggregate knows of one channel.
#[derive(Default)]
struct ChannelAggregate {
    /// The latest report of each origin.
    reports: HashMap<u64, Metrics>,
    /// The totals last emitted (or adopted at the end of the warm-up).
    emitted: Metrics,
}

/// Every app's aggregate on this node while it is the aggregator.
#[derive(Default)]
pub(crate) struct Aggregates {
    apps: Mutex<HashMap<String, AppAggregate>>,
}

struct AppAggregate {
    /// When this node started aggregating the app (the warm-up runs from it).
    since_ms: i64,
    warm: bool,
    channels: HashMap<String, ChannelAggregate>,
}

/// An event to queue: which channel, which source, Ably's name, the details.
struct Emitted {
    channel: String,
    source: Source,
    name: &'static str,
    totals: Metrics,
    serial: String,
}

impl Outbox {
    /// Folds the occupancy reports of one event on [`OCCUPANCY_CHANNEL`] into the
    /// aggregate, if this node aggregates the app, and queues the lifecycle and
    /// occupancy events they cause (under the channel lock, like every journal).
    pub(crate) fn record_reports(&self, key: &ChannelKey, event: &ChannelEvent) {
        let wanted = self.rules.iter().any(|r| {
            r.rule.config.app == *key.app
                && r.rule
                    .config
                    .sources
                    .iter()
                    .any(|s| matches!(s, Source::Lifecycle | Source::Occupancy))
        });
        if !wanted {
            return;
        }
        let now_ms = event.timestamp_ms();
        let mut apps = self
            .aggregates
            .apps
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.placement().is_none_or(|p| p.aggregates(&key.app)) {
            // Another node aggregates: forget, so a return starts with a warm-up.
            apps.remove(key.app.as_ref());
            return;
        }
        let app = apps
            .entry(key.app.to_string())
            .or_insert_with(|| AppAggregate {
                since_ms: now_ms,
                // A node without peers knows every report from the start.
                warm: self.placement().is_none(),
                channels: HashMap::new(),
            });
        if !app.warm && now_ms - app.since_ms >= WARM_UP_MS {
            // Adopt what was learned as already announced (the previous aggregator did).
            app.warm = true;
            for channel in app.channels.values_mut() {
                channel.emitted = Metrics::total(channel.reports.values());
            }
        }
        let Some(messages) = &event.frame.messages else {
            return;
        };
        let mut emitted = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            let Some(report) = decode(message) else {
                continue;
            };
            if report.channel.is_empty() {
                // A heartbeat: it only starts a new aggregator's warm-up clock.
                continue;
            }
            if !app.channels.contains_key(&report.channel) && app.channels.len() >= CHANNELS_MAX {
                tracing::warn!(app = %key.app, channel = %report.channel, "occupancy aggregate full; channel ignored");
                continue;
            }
            let channel = app.channels.entry(report.channel.clone()).or_default();
            if report.metrics == Metrics::default() {
                channel.reports.remove(&event.origin.0);
            } else {
                channel.reports.insert(event.origin.0, report.metrics);
            }
            let serial = format!("{:016x}-{:x}:{index}", event.origin.0, event.seq);
            changes(&report.channel, channel, app.warm, &serial, &mut emitted);
        }
        app.channels
            .retain(|_, c| !c.reports.is_empty() || c.emitted.is_active());
        drop(apps);
        self.queue_emitted(&key.app, emitted, now_ms);
    }

    /// A node left the cluster: its reports stop counting, and the channels that change
    /// get their events (serials named after the departed origin).
    pub fn forget_origin(&self, origin: OriginId, now_ms: i64) {
        let mut apps = self
            .aggregates
            .apps
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut by_app = Vec::new();
        for (app_id, app) in apps.iter_mut() {
            let mut emitted = Vec::new();
            for (name, channel) in app.channels.iter_mut() {
                if channel.reports.remove(&origin.0).is_some() {
                    let serial = format!("{:016x}-departed-{now_ms}", origin.0);
                    changes(name, channel, app.warm, &serial, &mut emitted);
                }
            }
            app.channels
                .retain(|_, c| !c.reports.is_empty() || c.emitted.is_active());
            by_app.push((app_id.clone(), emitted));
        }
        drop(apps);
        for (app, emitted) in by_app {
            self.queue_emitted(&app, emitted, now_ms);
        }
    }

    fn queue_emitted(&self, app: &str, emitted: Vec<Emitted>, now_ms: i64) {
        for event in emitted {
            for rule in &self.rules {
                if !rule.rule.matches(app, &event.channel, event.source) {
                    continue;
                }
                let entry = entry(app, &event, now_ms);
                rule.append(self.store.as_ref(), vec![entry], now_ms);
            }
        }
    }
}

/// The events a channel's new totals cause (none during a warm-up): `channel.opened` /
/// `channel.closed` when it becomes active / inactive, `[meta]occupancy` whenever the
/// totals change.
fn changes(
    name: &str,
    channel: &mut ChannelAggregate,
    warm: bool,
    serial: &str,
    out: &mut Vec<Emitted>,
) {
    let totals = Metrics::total(channel.reports.values());
    if !warm || totals == channel.emitted {
        return;
    }
    let before = channel.emitted;
    channel.emitted = totals;
    let mut push = |source, name_: &'static str, suffix: &str| {
        out.push(Emitted {
            channel: name.to_string(),
            source,
            name: name_,
            totals,
            serial: format!("{serial}:{suffix}"),
        });
    };
    match (before.is_active(), totals.is_active()) {
        (false, true) => push(Source::Lifecycle, "channel.opened", "opened"),
        (true, false) => push(Source::Lifecycle, "channel.closed", "closed"),
        _ => {}
    }
    push(Source::Occupancy, "[meta]occupancy", "occupancy");
}

fn decode(message: &tern_protocol::Message) -> Option<Report> {
    if message.name.as_deref() != Some(REPORT_NAME) {
        return None;
    }
    match &message.data {
        Some(tern_protocol::Data::String(text)) => serde_json::from_str(text).ok(),
        _ => None,
    }
}

/// A report as a message on [`OCCUPANCY_CHANNEL`].
pub fn report_message(report: &Report) -> tern_protocol::Message {
    tern_protocol::Message {
        name: Some(REPORT_NAME.into()),
        data: Some(tern_protocol::Data::String(
            serde_json::to_string(report).unwrap_or_default(),
        )),
        ..Default::default()
    }
}

/// Ably's `ChannelDetails` for a channel with `totals`.
pub fn details(channel: &str, totals: &Metrics) -> Value {
    json!({
        "channelId": channel,
        "name": channel,
        "status": {
            "isActive": totals.is_active(),
            "occupancy": { "metrics": totals },
        },
    })
}

fn entry(app: &str, event: &Emitted, now_ms: i64) -> Entry {
    Entry {
        source: event.source.as_str().into(),
        app: app.into(),
        channel: event.channel.clone(),
        timestamp: now_ms,
        serial: event.serial.clone(),
        item: json!({
            "id": event.serial,
            "name": event.name,
            "timestamp": now_ms,
            "data": details(&event.channel, &event.totals),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(connections: u64, presence_members: u64) -> Metrics {
        Metrics {
            connections,
            subscribers: connections,
            presence_members,
            ..Metrics::default()
        }
    }

    /// Attachments add up over nodes; presence members (each node sees the whole set)
    /// do not.
    #[test]
    fn totals_sum_attachments_and_take_the_largest_presence() {
        let reports = [metrics(2, 3), metrics(1, 3), metrics(0, 2)];
        let total = Metrics::total(reports.iter());
        assert_eq!((total.connections, total.subscribers), (3, 3));
        assert_eq!(total.presence_members, 3);
        assert!(total.is_active());
        assert!(!Metrics::default().is_active());
    }

    /// The first activity anywhere opens the channel, the last one closes it; every
    /// change is an occupancy event; nothing is emitted while warming up.
    #[test]
    fn opened_closed_and_occupancy_follow_the_totals() {
        let mut channel = ChannelAggregate::default();
        let names = |out: &Vec<Emitted>| out.iter().map(|e| e.name).collect::<Vec<_>>();
        let mut out = Vec::new();
        channel.reports.insert(1, metrics(1, 0));
        changes("ch", &mut channel, true, "s1", &mut out);
        assert_eq!(names(&out), ["channel.opened", "[meta]occupancy"]);
        assert_eq!(out[0].serial, "s1:opened");
        out.clear();
        channel.reports.insert(2, metrics(1, 0));
        changes("ch", &mut channel, true, "s2", &mut out);
        assert_eq!(names(&out), ["[meta]occupancy"]);
        assert_eq!(out[0].totals.connections, 2);
        out.clear();
        changes("ch", &mut channel, true, "s3", &mut out);
        assert!(out.is_empty(), "no change, no event");
        channel.reports.remove(&1);
        channel.reports.remove(&2);
        changes("ch", &mut channel, true, "s4", &mut out);
        assert_eq!(names(&out), ["channel.closed", "[meta]occupancy"]);
        out.clear();
        channel.reports.insert(1, metrics(1, 0));
        changes("ch", &mut channel, false, "s5", &mut out);
        assert!(out.is_empty(), "warming up");
    }

    /// Reports round-trip as messages; other messages are not reports.
    #[test]
    fn report_messages_round_trip() {
        let report = Report {
            channel: "room".into(),
            metrics: metrics(4, 1),
        };
        assert_eq!(decode(&report_message(&report)), Some(report));
        assert_eq!(decode(&tern_protocol::Message::default()), None);
    }

    /// The details are Ably's ChannelDetails shape.
    #[test]
    fn details_shape() {
        let value = details("room", &metrics(1, 0));
        assert_eq!(value["channelId"], "room");
        assert_eq!(value["status"]["isActive"], true);
        assert_eq!(value["status"]["occupancy"]["metrics"]["connections"], 1);
        assert_eq!(
            value["status"]["occupancy"]["metrics"]["presenceSubscribers"],
            0
        );
    }
}
