//! One simulated node: its hub, its recording subscriber, its presence clients, and what
//! it knows of its peers; booting an incarnation and attaching its subscriber.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Cursor, Hub, Journal, OriginId,
    RemoteEvent, Subscriber,
};
use tern_protocol::{Data, PresenceMessage};
use tern_replication::backfill::Backfills;
use tern_replication::handoff::{self, Handoff};
use tern_replication::heads;
use tern_replication::receive::Gaps;
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
/// of its region when it is the home), as the replicator's `record` does; and the node's
/// history store as far as replication sees it ([`Stored`]).
pub(crate) struct Outbox {
    pub(crate) events: Mutex<Vec<(ChannelKey, Arc<ChannelEvent>)>>,
    pub(crate) stored: Mutex<HashMap<ChannelKey, Stored>>,
    /// Channels whose sent events are not settled on their links, as of the sweep about
    /// to run (`Journal::may_drop`).
    pub(crate) pinned: Mutex<HashSet<ChannelKey>>,
}

/// What a node's history store holds of a channel (the sim's stand-in for `tern-store`,
/// which the journal feeds): the highest sequence per origin, messages and presence
/// together (`HistoryStore::cursor`), and the message ids. It outlives the hub's
/// channel: a channel dropped while idle (`Hub::sweep`) continues this node's own
/// sequence from it (`Journal::restore`), and what it holds still counts as held.
#[derive(Default)]
pub(crate) struct Stored {
    pub(crate) cursor: BTreeMap<OriginId, u64>,
    pub(crate) ids: HashSet<String>,
    /// The events this node journaled, as the store's rows give them back (what a
    /// restarted node recovers, `tern_replication::recover`).
    pub(crate) events: BTreeMap<(OriginId, u64), RemoteEvent>,
}

impl Outbox {
    /// The highest stored sequence of `origin` on `key`.
    pub(crate) fn stored_upto(&self, key: &ChannelKey, origin: OriginId) -> u64 {
        lock(&self.stored)
            .get(key)
            .and_then(|s| s.cursor.get(&origin).copied())
            .unwrap_or(0)
    }

    /// The ids of the messages stored of `key`.
    pub(crate) fn stored_ids(&self, key: &ChannelKey) -> HashSet<String> {
        lock(&self.stored)
            .get(key)
            .map(|s| s.ids.clone())
            .unwrap_or_default()
    }
}

impl Journal for Outbox {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        lock(&self.events).push((key.clone(), event.clone()));
        let mut stored = lock(&self.stored);
        let channel = stored.entry(key.clone()).or_default();
        let upto = channel.cursor.entry(event.origin).or_insert(0);
        *upto = (*upto).max(event.seq);
        channel
            .events
            .insert((event.origin, event.seq), RemoteEvent::from_event(event));
        if event.is_message() {
            let ids = event.frame.messages.iter().flatten();
            channel
                .ids
                .extend(ids.map(|m| m.id.clone().unwrap_or_default()));
        }
    }

    fn may_drop(&self, key: &ChannelKey) -> bool {
        !lock(&self.pinned).contains(key)
    }

    fn restore(&self, key: &ChannelKey) -> Cursor {
        let mut cursor = Cursor::new();
        if let Some(channel) = lock(&self.stored).get(key) {
            for (&origin, &seq) in &channel.cursor {
                cursor.advance(origin, seq);
            }
        }
        cursor
    }
}

/// A client connection with (at most) one presence member per channel.
pub(crate) struct Client {
    pub(crate) client_id: String,
    pub(crate) connection_id: String,
    pub(crate) serial: u64,
    /// The member's data per channel while entered.
    pub(crate) present: BTreeMap<usize, String>,
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
    /// This incarnation's subscribers, by channel index (attached, or waiting for the
    /// channel's state).
    pub(crate) subs: BTreeMap<usize, Sub>,
    /// Same-region peers (by node id) that said they have subscribers, per channel, when
    /// this node last heard it.
    pub(crate) interest: routing::Interest,
    /// Per (same-region peer, channel): the incarnation whose interest it last heard (to
    /// tell a predecessor's interest, still held until it expires, from the current one's).
    pub(crate) interest_from: HashMap<(usize, usize), u64>,
    /// Channels it has been the home of in its region (among the live nodes) since boot.
    pub(crate) was_home: HashSet<usize>,
    /// Channels it got routed events of only because a peer still held its previous
    /// incarnation's interest (kept for `INTEREST_TTL`).
    pub(crate) stale_fed: HashSet<usize>,
    /// Crashed origins this node has not yet seen depart (it still waits on their link).
    pub(crate) believed_live: HashSet<OriginId>,
    pub(crate) clients: Vec<Client>,
    /// Telling channels' new homes of its stored channels when its view changes
    /// (`tern_replication::handoff`), the view it last compared (members with their
    /// incarnations; empty before its first round), and
    /// when this incarnation booted (its clock, ms): the handoff's start-up window
    /// counts from then, as the driver's from its start.
    pub(crate) handoff: Handoff<()>,
    pub(crate) view_seen: Vec<handoff::Member>,
    /// Channels whose stored history it is copying (`tern_replication::backfill`).
    pub(crate) backfills: Backfills<()>,
    /// The gaps its hub holds events back behind (`tern_replication::stalls`), and the
    /// repairs it asked for (`repair::Asked`): `receive::Gaps`.
    pub(crate) gaps: Gaps,
    /// What it last sent each peer, and heard from it, of each channel's cursor
    /// (`heads::Quiet`).
    pub(crate) quiet: heads::Quiet,
    pub(crate) booted_ms: i64,
    /// Its earlier incarnations' origins, newest last (at most
    /// `recover::ORIGINS_KEPT`), as the server keeps them beside its store.
    pub(crate) earlier_origins: Vec<OriginId>,
}

impl Node {
    pub(crate) fn subscribed(&self, ch: usize) -> bool {
        self.subs.contains_key(&ch)
    }

    pub(crate) fn attached(&self, ch: usize) -> bool {
        self.subs.get(&ch).is_some_and(|s| s.attached)
    }
}

/// One subscriber of a node incarnation on one channel.
#[derive(Default)]
pub(crate) struct Sub {
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) checked: Checked,
    /// `published.len()` when the subscriber attached.
    pub(crate) attached_at: usize,
    /// It is attached.
    pub(crate) attached: bool,
    /// Waiting for the channel's state before attaching: since when, and from which home.
    pub(crate) warming: Option<(i64, usize)>,
    /// Message ids the hub held when it attached (the state it attached to).
    pub(crate) pre_attach: HashSet<String>,
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
    /// Incarnation `incarnation` of node `index`: a fresh hub, its subscribers (on
    /// `subs`) not attached yet (see [`Sim::start_subscriber`]).
    pub(crate) fn boot(
        limits: &CoreLimits,
        index: usize,
        incarnation: u64,
        subs: Vec<usize>,
    ) -> Node {
        // Node id and boot epoch, as the server derives it: never reused.
        let origin = OriginId(((index as u64 + 1) << 32) | incarnation);
        let tag = format!("n{index}i{incarnation}");
        let outbox = Arc::new(Outbox {
            events: Mutex::new(Vec::new()),
            stored: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashSet::new()),
        });
        let hub = Hub::with_journal(origin, limits.clone(), Some(outbox.clone()));
        let clients = (0..CLIENTS)
            .map(|k| Client {
                client_id: format!("user-{k}"),
                connection_id: format!("{tag}-c{k}"),
                serial: 0,
                present: BTreeMap::new(),
            })
            .collect();
        Node {
            up: true,
            incarnation,
            origin,
            tag,
            hub,
            outbox,
            subs: subs.into_iter().map(|ch| (ch, Sub::default())).collect(),
            interest: routing::Interest::default(),
            interest_from: HashMap::new(),
            was_home: HashSet::new(),
            stale_fed: HashSet::new(),
            believed_live: HashSet::new(),
            clients,
            handoff: Handoff::default(),
            backfills: Backfills::default(),
            gaps: Gaps::default(),
            quiet: heads::Quiet::default(),
            // Filled at its first handoff round (see `handoff_round`).
            view_seen: Vec::new(),
            booted_ms: 0,
            earlier_origins: Vec::new(),
        }
    }

    /// Node `at`'s subscriber on channel `ch` attaches: at once when the node is the
    /// channel's home in its region; otherwise it first tells its region it is
    /// interested and asks the home for the channel's state (`warm`), attaching when
    /// that arrives or after `WARM_TIMEOUT_MS`.
    pub(crate) fn start_subscriber(&mut self, at: usize, ch: usize) {
        let home = self.home_seen(at, ch, self.regions[at]);
        if home == at {
            self.attach(at, ch);
            return;
        }
        if let Some(sub) = self.nodes[at].subs.get_mut(&ch) {
            sub.warming = Some((self.now_ms, home));
        }
        self.log(|| format!("n{at} warms c{ch} from home n{home}"));
        let incarnation = self.nodes[at].incarnation;
        for peer in self.region_peers(at) {
            if peer != home {
                let item = Item::Interest {
                    from: at,
                    incarnation,
                    chans: vec![ch],
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
                ch,
            },
        );
        self.enqueue(self.now_ms + ASK_AGAIN_MS, at, Item::WarmTick { ch });
    }

    /// Attaches node `at`'s subscriber on `ch` to what its hub holds now.
    pub(crate) fn attach(&mut self, at: usize, ch: usize) {
        let attached_at = self.published.len();
        let now_ms = self.hub_now(at);
        let key = &self.keys[ch];
        let node = &mut self.nodes[at];
        let Some(sub) = node.subs.get_mut(&ch) else {
            return;
        };
        let options = AttachOptions {
            modes: ALL_MODES,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        };
        node.hub
            .attach(
                key,
                format!("{}-sub", node.tag).into(),
                options,
                sub.recorder.clone(),
                |_| {},
                now_ms,
            )
            .expect("attach");
        sub.pre_attach = held_ids(&node.hub, key);
        sub.attached_at = attached_at;
        sub.attached = true;
        sub.warming = None;
        self.log(|| format!("n{at} attached c{ch}"));
    }
}
