//! One simulated node: its hub, its recording subscriber, its presence clients, and what
//! it knows of its peers; booting an incarnation and attaching its subscriber.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, Journal, OriginId, Subscriber,
};
use tern_protocol::{Data, PresenceMessage};
use tern_replication::routing;

use crate::network::Item;
use crate::{Sim, ALL_MODES, ASK_AGAIN_MS, CLIENTS};

/// One recorded delivery: origin, sequence, and the message id (`None` for PRESENCE).
pub(crate) type Delivery = (OriginId, u64, Option<String>);

/// One recording subscriber: every event it got, in delivery order.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) got: Mutex<Vec<Delivery>>,
}

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut got = self.got.lock().unwrap_or_else(|p| p.into_inner());
        if event.is_message() {
            for m in event.frame.messages.iter().flatten() {
                got.push((
                    event.origin,
                    event.seq,
                    Some(m.id.clone().unwrap_or_default()),
                ));
            }
        } else {
            got.push((event.origin, event.seq, None));
        }
        true
    }
}

/// The hub's journal: every event the hub applies, in order, for the routing to send on
/// (its own to the homes and interested nodes, another region's to the interested nodes
/// of its region when it is the home), as the replicator's `record` does.
pub(crate) struct Outbox {
    pub(crate) events: Mutex<Vec<Arc<ChannelEvent>>>,
}

impl Journal for Outbox {
    fn record(&self, _key: &ChannelKey, event: &Arc<ChannelEvent>) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
    }
}

/// A client connection with (at most) one presence member.
pub(crate) struct Client {
    pub(crate) client_id: String,
    pub(crate) connection_id: String,
    pub(crate) serial: u64,
    /// The member's data while entered.
    pub(crate) present: Option<String>,
}

/// One node; its fields after `up` describe the current (or last) incarnation.
pub(crate) struct Node {
    pub(crate) up: bool,
    pub(crate) incarnation: u64,
    pub(crate) origin: OriginId,
    /// Prefix of this incarnation's connection ids (followed by `-`).
    pub(crate) tag: String,
    pub(crate) hub: Hub,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) checked: Checked,
    /// `published.len()` when the subscriber attached.
    pub(crate) attached_at: usize,
    /// This incarnation has a subscriber (attached, or waiting for the channel state).
    pub(crate) subscribed: bool,
    /// Its subscriber is attached.
    pub(crate) attached: bool,
    /// Waiting for the channel's state before attaching: since when, and from which home.
    pub(crate) warming: Option<(i64, usize)>,
    /// Message ids the hub held when the subscriber attached (the state it attached to).
    pub(crate) pre_attach: HashSet<String>,
    /// Same-region peers (by node index, as the real interest is by node id) that said
    /// they have subscribers, when this node last heard it and from which incarnation.
    pub(crate) interest: routing::Interest,
    /// Per same-region peer: the incarnation whose interest it last heard (to tell a
    /// predecessor's interest, still held until it expires, from the current one's).
    pub(crate) interest_from: HashMap<usize, u64>,
    /// It has been the channel's home in its region (among the live nodes) since boot.
    pub(crate) was_home: bool,
    /// It got routed events only because a peer still held its previous incarnation's
    /// interest (kept for `INTEREST_TTL_MS`).
    pub(crate) stale_fed: bool,
    /// Crashed origins this node has not yet seen depart (it still waits on their link).
    pub(crate) believed_live: HashSet<OriginId>,
    pub(crate) clients: Vec<Client>,
}

/// What the step checks have verified so far of one subscriber incarnation.
#[derive(Default)]
pub(crate) struct Checked {
    pub(crate) upto: usize,
    pub(crate) last: BTreeMap<OriginId, u64>,
    pub(crate) ids: HashSet<String>,
}

/// A presence member as the convergence check compares it.
pub(crate) type Member = (String, String, String);

pub(crate) fn member(m: &PresenceMessage) -> Member {
    let data = match &m.data {
        Some(Data::String(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    (
        m.client_id.clone().unwrap_or_default(),
        m.connection_id.clone().unwrap_or_default(),
        data,
    )
}

/// The ids of the messages in the channel's log on `hub`.
pub(crate) fn held_ids(hub: &Hub, key: &ChannelKey) -> HashSet<String> {
    hub.cursor(key)
        .origins()
        .flat_map(|(origin, seq)| hub.events_of(key, origin, 1, seq))
        .filter(|e| e.is_message())
        .flat_map(|e| {
            e.frame
                .messages
                .iter()
                .flatten()
                .map(|m| m.id.clone().unwrap_or_default())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    /// Incarnation `incarnation` of node `index`: a fresh hub, its subscriber (if it has
    /// one) not attached yet (see [`Sim::start_subscriber`]).
    pub(crate) fn boot(
        limits: &CoreLimits,
        index: usize,
        incarnation: u64,
        subscribed: bool,
    ) -> Node {
        // Node id and boot epoch, as the server derives it: never reused.
        let origin = OriginId(((index as u64 + 1) << 32) | incarnation);
        let tag = format!("n{index}i{incarnation}");
        let outbox = Arc::new(Outbox {
            events: Mutex::new(Vec::new()),
        });
        let hub = Hub::with_journal(origin, limits.clone(), Some(outbox.clone()));
        let recorder = Arc::new(Recorder::default());
        let clients = (0..CLIENTS)
            .map(|k| Client {
                client_id: format!("user-{k}"),
                connection_id: format!("{tag}-c{k}"),
                serial: 0,
                present: None,
            })
            .collect();
        Node {
            up: true,
            incarnation,
            origin,
            tag,
            hub,
            outbox,
            recorder,
            checked: Checked::default(),
            attached_at: 0,
            subscribed,
            attached: false,
            warming: None,
            pre_attach: HashSet::new(),
            interest: routing::Interest::default(),
            interest_from: HashMap::new(),
            was_home: false,
            stale_fed: false,
            believed_live: HashSet::new(),
            clients,
        }
    }

    /// Node `at`'s subscriber (if it has one) attaches: at once when the node is the
    /// channel's home in its region; otherwise it first tells its region it is
    /// interested and asks the home for the channel's state (`warm`), attaching when
    /// that arrives or after `WARM_TIMEOUT_MS`.
    pub(crate) fn start_subscriber(&mut self, at: usize) {
        let node = &self.nodes[at];
        if !node.subscribed {
            self.stats.absent_subscribers += 1;
            return;
        }
        let home = self.home_seen(at, self.regions[at]);
        if home == at {
            self.attach(at);
            return;
        }
        self.nodes[at].warming = Some((self.now_ms, home));
        self.log(|| format!("n{at} warms from home n{home}"));
        let incarnation = self.nodes[at].incarnation;
        for peer in self.region_peers(at) {
            if peer != home {
                let item = Item::Interest {
                    from: at,
                    incarnation,
                };
                self.send(at, peer, item);
            }
        }
        self.send(
            at,
            home,
            Item::Sync {
                from: at,
                incarnation,
            },
        );
        self.enqueue(self.now_ms + ASK_AGAIN_MS, at, Item::WarmTick);
    }

    /// Attaches node `at`'s subscriber to what its hub holds now.
    pub(crate) fn attach(&mut self, at: usize) {
        let attached_at = self.published.len();
        let node = &mut self.nodes[at];
        let options = AttachOptions {
            modes: ALL_MODES,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        };
        node.hub
            .attach(
                &self.key,
                format!("{}-sub", node.tag).into(),
                options,
                node.recorder.clone(),
                |_| {},
                self.now_ms,
            )
            .expect("attach");
        node.pre_attach = held_ids(&node.hub, &self.key);
        node.attached_at = attached_at;
        node.attached = true;
        node.warming = None;
        self.log(|| format!("n{at} attached"));
    }
}
