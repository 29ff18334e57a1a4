//! `connection.disconnected` for the connections of a node that departed (died, or
//! restarted as a new incarnation): no node of theirs is left to report them.
//!
//! Each node records the connections it opens and ends as messages on the app's
//! internal channel [`CHANNEL`] (only for apps with a `connection.disconnected` rule).
//! Every node attaches an internal subscriber to it (as for token revocations), so the
//! hub and the cluster (replication, repair of a dead origin's events) deliver every
//! record to every node, which folds them into [`Fold`]: the open connections by
//! connection-id tag (the prefix naming the node that issued them). When gossip reports
//! a node departed, every survivor remembers its tag; the **emitter** — the live member
//! with the oldest incarnation (it has seen the most records), decided by the caller
//! from the live set — writes `connection.disconnected` (`reason: "node_lost"`, the usual
//! stable id) to its own outbox for every connection still open under a departed tag,
//! then records them ended, so the other nodes forget them. If the emitter departs in
//! turn, the next one reports what is still open: at least once, duplicates only when
//! two survivors briefly both see themselves as the oldest (same id).
//!
//! Bounded: at most [`OPEN_MAX`] connections are folded per app and [`DEPARTED_MAX`]
//! departed tags remembered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tern_core::{AttachOptions, ChannelEvent, ChannelKey, Hub, Subscriber};
use tern_protocol::{flags, Data, Message};

use crate::now_ms;

/// The internal channel (of each app) carrying connection records.
pub(crate) const CHANNEL: &str = "[internal]connections";
const SUBSCRIBER_ID: &str = "internal-connections";
const MESSAGE_NAME: &str = "connection";
/// Open connections folded per app at most; beyond, new ones are not tracked (and a
/// departed node's would not be reported), counted in
/// `tern_departures_untracked_total`.
pub(crate) const OPEN_MAX: usize = 1_000_000;
/// Departed tags remembered at most (a tag whose connections were all reported is
/// forgotten with them).
pub(crate) const DEPARTED_MAX: usize = 256;

/// What `connection.disconnected` says about an open connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Opened {
    pub(crate) client_id: Option<String>,
    pub(crate) transport: String,
    pub(crate) connected_at: i64,
}

/// One record on [`CHANNEL`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub(crate) enum Record {
    Opened {
        id: String,
        #[serde(flatten)]
        opened: Opened,
    },
    Ended {
        id: String,
    },
}

/// The tag of a connection id (`<tag>-<random>`).
fn tag_of(id: &str) -> &str {
    id.split_once('-').map_or(id, |(tag, _)| tag)
}

/// One app's open connections by tag, and the departed tags. No I/O.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    open: HashMap<String, HashMap<String, Opened>>,
    entries: usize,
    departed: VecDeque<String>,
}

impl Fold {
    /// Applies one record; false when an opened connection was not tracked (full).
    pub(crate) fn apply(&mut self, record: Record) -> bool {
        match record {
            Record::Opened { id, opened } => {
                if self.entries >= OPEN_MAX {
                    return false;
                }
                let by_id = self.open.entry(tag_of(&id).to_string()).or_default();
                if by_id.insert(id, opened).is_none() {
                    self.entries += 1;
                }
                true
            }
            Record::Ended { id } => {
                let tag = tag_of(&id);
                if let Some(by_id) = self.open.get_mut(tag) {
                    if by_id.remove(&id).is_some() {
                        self.entries -= 1;
                    }
                    if by_id.is_empty() {
                        self.open.remove(tag);
                    }
                }
                true
            }
        }
    }

    /// Remembers that the node issuing `tag` departed.
    pub(crate) fn depart(&mut self, tag: &str) {
        if !self.departed.iter().any(|t| t == tag) {
            self.departed.push_back(tag.to_string());
            while self.departed.len() > DEPARTED_MAX {
                self.departed.pop_front();
            }
        }
    }

    /// Takes every connection still open under a departed tag (the emitter reports
    /// them); their tags are forgotten.
    pub(crate) fn take_departed(&mut self) -> Vec<(String, Opened)> {
        let mut taken = Vec::new();
        for tag in std::mem::take(&mut self.departed) {
            if let Some(by_id) = self.open.remove(&tag) {
                self.entries -= by_id.len();
                taken.extend(by_id);
            }
        }
        taken.sort_by(|a, b| a.0.cmp(&b.0));
        taken
    }

    /// Connections folded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries
    }
}

/// Connections (id, what is known of it) of one departed node to report, by app.
pub(crate) type Departed = Vec<(Arc<str>, Vec<(String, Opened)>)>;

/// Every app's fold on this node, fed by its internal subscribers.
#[derive(Default)]
pub(crate) struct Departures {
    folds: Mutex<HashMap<Arc<str>, Fold>>,
}

impl Departures {
    fn folds(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Fold>> {
        self.folds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches this node's subscriber to `apps`' [`CHANNEL`].
    pub(crate) fn attach(self: &Arc<Self>, hub: &Hub, apps: &[String]) {
        for app in apps {
            let key = ChannelKey::new(app, CHANNEL);
            self.folds().entry(key.app.clone()).or_default();
            let sink = Arc::new(Sink {
                app: key.app.clone(),
                departures: self.clone(),
            });
            let options = AttachOptions {
                modes: flags::SUBSCRIBE,
                echo: true,
                resume_from: None,
                rewind: None,
                delta: false,
            };
            if let Err(err) =
                hub.attach(&key, SUBSCRIBER_ID.into(), options, sink, |_| {}, now_ms())
            {
                tracing::error!(%app, %err, "connection records cannot be received for this app");
            }
        }
    }

    fn record_messages<'m>(&self, app: &str, messages: impl Iterator<Item = &'m Message>) {
        let mut folds = self.folds();
        let Some(fold) = folds.get_mut(app) else {
            return;
        };
        for message in messages {
            let Some(Data::String(text)) = &message.data else {
                continue;
            };
            if let Ok(record) = serde_json::from_str::<Record>(text) {
                if !fold.apply(record) {
                    metrics::counter!("tern_departures_untracked_total").increment(1);
                }
            }
        }
    }

    /// Whether `app`'s connections are recorded (it has a `connection.disconnected` rule).
    pub(crate) fn tracks(&self, app: &str) -> bool {
        self.folds().contains_key(app)
    }

    /// The node issuing `tag` departed; if this node is the emitter, the connections
    /// still open under any departed tag, by app, to report.
    pub(crate) fn depart(&self, tag: &str, emitter: bool) -> Departed {
        let mut folds = self.folds();
        let mut out = Vec::new();
        for (app, fold) in folds.iter_mut() {
            fold.depart(tag);
            if emitter {
                let taken = fold.take_departed();
                if !taken.is_empty() {
                    out.push((app.clone(), taken));
                }
            }
        }
        out
    }
}

struct Sink {
    app: Arc<str>,
    departures: Arc<Departures>,
}

impl Subscriber for Sink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        self.departures
            .record_messages(&self.app, event.frame.messages.iter().flatten());
        // Never full: dropping this subscriber would stop records arriving.
        true
    }
}

/// Publishes `records` on `app`'s [`CHANNEL`] (not waited on: a record lost with this
/// node is what the departure path is for).
pub(crate) fn publish(hub: &Hub, app: &str, records: &[Record]) {
    if records.is_empty() {
        return;
    }
    let now = now_ms();
    let key = ChannelKey::new(app, CHANNEL);
    let (publisher, messages) = crate::publish::records("conns", MESSAGE_NAME, records, now);
    if let Err(err) = hub.publish(&key, &publisher, messages, now) {
        tracing::warn!(%app, %err, "connection record not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(id: &str) -> Record {
        Record::Opened {
            id: id.into(),
            opened: Opened {
                client_id: None,
                transport: "web_socket".into(),
                connected_at: 1,
            },
        }
    }

    /// Open connections are folded by tag; a departed tag's still-open connections are
    /// taken once, ended ones are not, other tags stay.
    #[test]
    fn departed_connections_are_taken_once() {
        let mut fold = Fold::default();
        for id in ["a-1", "a-2", "a-3", "b-1"] {
            assert!(fold.apply(opened(id)));
        }
        fold.apply(Record::Ended { id: "a-2".into() });
        assert_eq!(fold.len(), 3);
        fold.depart("a");
        let taken: Vec<String> = fold.take_departed().into_iter().map(|(id, _)| id).collect();
        assert_eq!(taken, ["a-1", "a-3"]);
        assert!(fold.take_departed().is_empty(), "taken once");
        assert_eq!(fold.len(), 1);
        // A late Opened of a departed tag (delayed replication) is reported by the next
        // emitter once the tag departs again (the emitter's departure re-runs it).
        fold.apply(opened("a-9"));
        fold.depart("a");
        assert_eq!(fold.take_departed().len(), 1);
    }

    /// A non-emitter keeps a departed tag's connections until their Ended records (from
    /// the emitter) arrive; if they never do, it reports them when it becomes emitter.
    #[test]
    fn a_later_emitter_reports_what_is_left() {
        let mut fold = Fold::default();
        fold.apply(opened("a-1"));
        fold.apply(opened("a-2"));
        fold.depart("a");
        // The emitter reported a-1, and its Ended arrived; then the emitter departed.
        fold.apply(Record::Ended { id: "a-1".into() });
        fold.depart("e");
        let taken: Vec<String> = fold.take_departed().into_iter().map(|(id, _)| id).collect();
        assert_eq!(taken, ["a-2"]);
    }

    /// Records survive the JSON they travel in.
    #[test]
    fn records_round_trip() {
        for record in [opened("t-x"), Record::Ended { id: "t-x".into() }] {
            let text = serde_json::to_string(&record).unwrap();
            assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), record);
        }
    }
}
