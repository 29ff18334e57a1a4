//! Replication between members, by interest. Every channel has a *home* in each region:
//! the node there with the highest rendezvous hash of (channel, node). The home is the
//! channel's storage replica in its region and the relay its events cross the WAN to.
//! An origin sends each of its events to the channel's home in every region and to the
//! nodes of its own region that have subscribers on the channel (they say so with
//! `Interest`); a home passes what came from another region on to the interested nodes
//! of its region. So one copy of a message crosses to each remote region, and a node
//! receives a channel only while it has subscribers or is the channel's home. A node's
//! first subscriber on a channel it does not receive waits for the channel's state
//! (`Sync`: log, presence members, cursor) from its region's home.
//! Inbound events are applied in origin order by the core.
//!
//! Each outbound link is reliable on its own: events carry a link position (`link_seq`,
//! 1, 2, ... per link), the receiver answers `Stored{upto}` once every position up to
//! `upto` is applied *and* committed to its history store, and the sender keeps
//! unacknowledged events (bounded) and resends them after a reconnect or when acks stall
//! (go-back-N). Channel-level gaps (an event ahead of a missing one) are repaired from the
//! sender's log, and `Heads` anti-entropy covers what no link will bring any more (a dead
//! origin's events, a dead relay's unforwarded ones), so a lost frame costs a resend,
//! never a message.
//!
//! `Stored` acks drive `ack_replicas`: [`Replicator::after_replicated`] runs its callback
//! once everything journaled before the call is stored on that many of this node's
//! recipients (fewer when fewer are live; a peer that became a recipient later does not
//! count for earlier events).
//!
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tern_core::{ChannelEvent, ChannelKey, Hub, Journal, OriginId, RemoteOutcome};
use tokio::sync::{oneshot, watch, Notify};

use tern_protocol::PresenceMessage;

use crate::link::{LinkEndpoint, LinkReceiver, LinkSender};
use crate::topology::{Topology, WanLink};
use crate::wire::{EventV1, FrameV1, HeadV1, ItemPosV1, ItemV1};
use crate::ClusterError;

/// Unacknowledged events kept per peer for resending. Past it the oldest is dropped and
/// that peer stops counting as a replica for it (its channel gap is repaired from logs).
pub const PEER_BUFFER_MAX: usize = 65_536;
/// Control frames (acks, repair requests and answers) queued per peer.
pub const CONTROL_QUEUE_MAX: usize = 65_536;
/// A publish waiting for `ack_replicas` longer than this is refused (NACK), not ACKed.
pub const REPLICA_ACK_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// How often each node sends its channel cursors to every peer (anti-entropy).
const HEADS_EVERY: Duration = Duration::from_secs(1);
/// Channels per anti-entropy round, and per `Heads` frame.
const HEADS_CHANNELS_MAX: usize = 20_000;
const HEADS_PER_FRAME: usize = 256;
/// Resend unacknowledged events when no ack has advanced for this long (plus 2× the
/// emulated delay).
const RESEND_AFTER: Duration = Duration::from_millis(1_000);
/// How often a node repeats its interest to its region's peers, and how long a peer's
/// interest lasts when it is not repeated.
const INTEREST_REFRESH: Duration = Duration::from_secs(2);
const INTEREST_TTL: Duration = Duration::from_secs(7);
/// Channel interests remembered over all peers, and channels per `Interest` frame.
const INTEREST_MAX: usize = 1 << 20;
const INTEREST_PER_FRAME: usize = 512;
/// How long a first attach waits for a channel's state from its home.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels waiting for their state at once; past it an attach goes ahead at once.
const WARMING_MAX: usize = 10_000;
/// Channels whose latest ack targets are remembered (past it, waiters fall back to
/// waiting on every link).
const LAST_TARGETS_MAX: usize = 65_536;
/// Presence members per `SyncMembers` frame, and their encoded bytes beyond which a
/// frame is cut early (a frame always carries at least one member).
const MEMBERS_PER_FRAME: usize = 256;
const MEMBERS_BYTES_PER_FRAME: usize = 4 << 20;
/// Stored items per `BackfillItems` frame, and their payload bytes beyond which a page
/// is cut early (a page always carries at least one item).
const BACKFILL_PAGE: usize = 64;
const BACKFILL_BYTES_MAX: usize = 8 << 20;
/// A request to another node not answered this long is sent again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// Channels being backfilled at once, and how soon one may be backfilled again.
const BACKFILLS_MAX: usize = 10_000;
const BACKFILL_AGAIN_AFTER: Duration = Duration::from_secs(60);
/// Page reads answering peers' `Backfill` requests at once (each holds a blocking thread
/// while the store reads); a request past it is ignored and counted, and the asker asks
/// again after [`ASK_AGAIN_AFTER`].
pub const BACKFILL_ANSWERS_MAX: usize = 16;

/// This node's history store, as far as copying a channel's stored history to its new
/// home needs it. Implemented where the node is wired.
pub trait HistoryAccess: Send + Sync {
    /// Whether any item of the channel is stored here.
    fn has(&self, app: &str, channel: &str) -> bool;
    /// Up to `max` stored items of the channel strictly after `after`, oldest first, and
    /// whether more may follow. Blocking (a store read).
    fn page(
        &self,
        app: &str,
        channel: &str,
        presence: bool,
        after: Option<ItemPosV1>,
        max: usize,
    ) -> (Vec<ItemV1>, bool);
    /// Stores copied items; an item at a position already stored replaces it.
    fn put(&self, app: &str, channel: &str, presence: bool, items: Vec<ItemV1>);
}

/// A publish's reply, run with `true` once replicated (or `false` on timeout).
pub type ReplicaCallback = Box<dyn FnOnce(bool) + Send>;

/// The local history store as link acks need it (this crate does not depend on the
/// store's).
pub trait LocalStore: Send + Sync {
    /// Writes the store lost so far (appends refused, commits failed); only grows.
    fn lost_writes(&self) -> u64;
    /// Runs `then(true)` once everything journaled so far is committed and no write was
    /// lost since [`Self::lost_writes`] returned `since`; `then(false)` otherwise.
    fn after_committed(&self, since: u64, then: Box<dyn FnOnce(bool) + Send>);
}

/// Waits for the local history store.
pub type Barrier = Arc<dyn LocalStore>;

/// A peer as membership describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node_id: String,
    pub incarnation: u64,
    pub region: String,
    pub quic: SocketAddr,
    /// The peer's origin id (its events arrive on its own link).
    pub origin: u64,
}

/// This node, for replication.
#[derive(Clone, Debug)]
pub struct ReplicatorConfig {
    pub node_id: String,
    pub incarnation: u64,
    pub region: String,
    /// Peers that must store an event before its publish is ACKed.
    pub ack_replicas: usize,
    /// Emulated WAN between regions (local multi-region runs only).
    pub topology: Option<Topology>,
}

/// The hub's journal on a replicating node, and the replication engine behind it.
pub struct Replicator {
    config: ReplicatorConfig,
    origin: OriginId,
    next: Option<Arc<dyn Journal>>,
    out: Mutex<Out>,
    recv: Mutex<HashMap<String, RecvState>>,
    running: OnceLock<Running>,
    /// Channels with subscribers on this node (its interest); bounded by the hub's
    /// channels.
    mine: Mutex<HashSet<ChannelKey>>,
    /// First attaches waiting for a channel's state from its home.
    warming: Mutex<HashMap<ChannelKey, Warming>>,
    /// The history store, for copying history to a channel's new home.
    history: OnceLock<Arc<dyn HistoryAccess>>,
    /// Channels whose history this node started copying, and when.
    backfills: Mutex<HashMap<ChannelKey, Backfilling>>,
    /// `Backfill` pages being read for peers now (at most [`BACKFILL_ANSWERS_MAX`]).
    backfill_answers: std::sync::atomic::AtomicUsize,
}

/// One of [`Replicator::backfill_answers`], given back when dropped.
struct BackfillSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for BackfillSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Warming {
    since: Instant,
    /// The home asked, and when (asked again each [`ASK_AGAIN_AFTER`]: an answer to a
    /// node the home did not know yet is dropped).
    home: String,
    asked: Instant,
    waiters: Vec<oneshot::Sender<()>>,
}

/// A channel's history being copied here.
struct Backfilling {
    started: Instant,
    source: String,
    /// Per kind (messages, presence): the page asked for and not answered yet.
    waiting: [Option<Option<ItemPosV1>>; 2],
    asked: Instant,
}

struct Running {
    endpoint: Arc<LinkEndpoint>,
    hub: Weak<Hub>,
    barrier: Barrier,
}

#[derive(Default)]
struct Out {
    peers: HashMap<String, PeerOut>,
    waiters: VecDeque<Waiter>,
    /// Numbers each `PeerOut` (a peer that leaves and comes back gets a new one).
    epochs: u64,
    /// Same-region peers' interest: channel → peer node id → when it last said so.
    interest: HashMap<ChannelKey, HashMap<String, Instant>>,
    interest_len: usize,
    /// Per channel, the (link epoch, position) of this node's latest event on each link
    /// that carried it: what a publish's ACK waits for.
    last_targets: HashMap<ChannelKey, Vec<(u64, u64)>>,
}

struct PeerOut {
    spec: PeerSpec,
    shared: Arc<PeerShared>,
    /// Link positions are per peer: the last one handed out on this link.
    seq: u64,
    /// Which link this is (see `Out::epochs`); sent in `Hello` so the receiver starts
    /// counting positions afresh.
    epoch: u64,
    /// Events at or below this position are no longer held for this peer.
    counts_after: u64,
    acked: u64,
    task: tokio::task::AbortHandle,
}

struct PeerShared {
    queue: Mutex<PeerQueue>,
    /// Events sent or waiting but not yet acknowledged by this peer (replication lag).
    unacked: metrics::Gauge,
    /// Seconds from an event queued for this peer to the peer's `Stored` ack covering it
    /// (sampled once per ack, for its newest event): the replication lag, in time.
    lag: metrics::Histogram,
    /// Event frames written to this peer's link (resends included).
    events_sent: std::sync::atomic::AtomicU64,
    notify: Notify,
    partitioned: AtomicBool,
    wan: Option<WanLink>,
}

#[derive(Default)]
struct PeerQueue {
    /// Unacknowledged events, consecutive link positions.
    events: VecDeque<(u64, FrameV1, Instant)>,
    control: VecDeque<(FrameV1, Instant)>,
    acked: u64,
}

struct Waiter {
    /// Per recipient link (its epoch, unique per `PeerOut`): the position that covers
    /// everything journaled before the waiter.
    targets: Vec<(u64, u64)>,
    since: Instant,
    then: ReplicaCallback,
}

/// What this node has received from one sender.
struct RecvState {
    incarnation: u64,
    epoch: u64,
    /// Every link position up to here is applied.
    contiguous: u64,
    /// The store's lost-write count when this link (incarnation, epoch) began, before
    /// any of its events were applied: once a write is lost after it, some of them may
    /// be missing from the store, so nothing more of this link is acknowledged.
    store_mark: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    pub fn new(
        config: ReplicatorConfig,
        origin: OriginId,
        next: Option<Arc<dyn Journal>>,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            config,
            origin,
            next,
            out: Mutex::new(Out::default()),
            recv: Mutex::new(HashMap::new()),
            running: OnceLock::new(),
            mine: Mutex::new(HashSet::new()),
            warming: Mutex::new(HashMap::new()),
            history: OnceLock::new(),
            backfills: Mutex::new(HashMap::new()),
            backfill_answers: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Starts accepting peer links. `barrier` waits for the local history store.
    pub fn start(self: &Arc<Self>, endpoint: Arc<LinkEndpoint>, hub: &Arc<Hub>, barrier: Barrier) {
        let running = Running {
            endpoint: endpoint.clone(),
            hub: Arc::downgrade(hub),
            barrier,
        };
        if self.running.set(running).is_err() {
            return;
        }
        tokio::spawn(self.clone().accept_loop(endpoint));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut heads_at = Instant::now();
            let mut interest_at = Instant::now();
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.expire_waiters();
                me.expire_warming();
                if heads_at.elapsed() >= HEADS_EVERY {
                    heads_at = Instant::now();
                    me.send_heads();
                }
                if interest_at.elapsed() >= INTEREST_REFRESH {
                    interest_at = Instant::now();
                    me.refresh_interest();
                }
            }
        });
    }

    /// Makes the peer set equal to `peers` (this node excluded): links open to new peers,
    /// close to departed ones (and a departed peer no longer holds up ACKs).
    pub fn set_peers(self: &Arc<Self>, peers: &[PeerSpec]) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut out = lock(&self.out);
        out.peers.retain(|id, peer| {
            let keep = peers.iter().any(|p| p == &peer.spec) && id != &self.config.node_id;
            if !keep {
                tracing::info!(peer = %id, "replication peer left");
                peer.task.abort();
            }
            keep
        });
        for spec in peers {
            if spec.node_id == self.config.node_id || out.peers.contains_key(&spec.node_id) {
                continue;
            }
            tracing::info!(peer = %spec.node_id, region = %spec.region, quic = %spec.quic, "replication peer joined");
            let wan = self
                .config
                .topology
                .as_ref()
                .and_then(|t| t.link(&self.config.region, &spec.region));
            // A peer of our region hears our interest first thing, not at the next
            // refresh: it sends us those channels' events from then on.
            let mut queue = PeerQueue::default();
            if spec.region == self.config.region {
                for chunk in self.interest_list().chunks(INTEREST_PER_FRAME) {
                    let frame = FrameV1::Interest {
                        channels: chunk.to_vec(),
                        on: true,
                    };
                    queue.control.push_back((frame, Instant::now()));
                }
            }
            let shared = Arc::new(PeerShared {
                unacked: metrics::gauge!("tern_replication_unacked_events", "peer" => spec.node_id.clone()),
                lag: metrics::histogram!("tern_replication_lag_seconds", "peer" => spec.node_id.clone()),
                events_sent: std::sync::atomic::AtomicU64::new(0),
                queue: Mutex::new(queue),
                notify: Notify::new(),
                partitioned: AtomicBool::new(false),
                wan,
            });
            out.epochs += 1;
            let epoch = out.epochs;
            let task = tokio::spawn(send_loop(
                running.endpoint.clone(),
                Hello {
                    node_id: self.config.node_id.clone(),
                    region: self.config.region.clone(),
                    incarnation: self.config.incarnation,
                    origin: self.origin.0,
                    epoch,
                },
                spec.clone(),
                shared.clone(),
            ))
            .abort_handle();
            out.peers.insert(
                spec.node_id.clone(),
                PeerOut {
                    spec: spec.clone(),
                    shared,
                    seq: 0,
                    epoch,
                    counts_after: 0,
                    acked: 0,
                    task,
                },
            );
        }
        let done = self.drain_waiters(&mut out, Instant::now());
        drop(out);
        run_all(done);
    }

    /// Test hook: cut (or restore) this node's links to `peer` in both directions, as a
    /// network partition would. Frames wait in the resend buffer meanwhile.
    pub fn set_partitioned(&self, peer: &str, partitioned: bool) {
        if let Some(p) = lock(&self.out).peers.get(peer) {
            p.shared.partitioned.store(partitioned, Ordering::SeqCst);
            p.shared.notify.notify_one();
        }
    }

    fn peer_shared(&self, peer: &str) -> Option<Arc<PeerShared>> {
        lock(&self.out).peers.get(peer).map(|p| p.shared.clone())
    }

    /// Runs `then(true)` once this node's latest event on `channel` (everything
    /// journaled so far when `channel` is unknown here) is stored on `ack_replicas` of
    /// the peers it went to (or as many as are live), in call order; `then(false)` after
    /// [`REPLICA_ACK_TIMEOUT`]. `None` (a reply that published nothing) only keeps the
    /// order.
    pub fn after_replicated(
        &self,
        channel: Option<&ChannelKey>,
        then: Box<dyn FnOnce(bool) + Send>,
    ) {
        let mut out = lock(&self.out);
        let targets = match channel {
            None => Vec::new(),
            Some(key) => match out.last_targets.get(key) {
                Some(targets) => targets.clone(),
                // Forgotten (too many channels) or never published here: every link's
                // latest position covers it.
                None => out
                    .peers
                    .values()
                    .filter(|p| p.seq > p.counts_after)
                    .map(|p| (p.epoch, p.seq))
                    .collect(),
            },
        };
        out.waiters.push_back(Waiter {
            targets,
            since: Instant::now(),
            then,
        });
        let done = self.drain_waiters(&mut out, Instant::now());
        drop(out);
        run_all(done);
    }

    /// Lets this node copy stored history to, and from, other nodes: a channel's new
    /// home (a joining node, or the next one after a home died) copies what its store
    /// lacks from the channel's home in another region.
    pub fn set_history(&self, history: Arc<dyn HistoryAccess>) {
        let _ = self.history.set(history);
    }

    /// The channel's home in this node's region when it is another node (`None` when it
    /// is this one): the node that stores all of the channel here.
    pub fn home_of(&self, key: &ChannelKey) -> Option<String> {
        let out = lock(&self.out);
        let home = *self.homes(&out, key).get(self.config.region.as_str())?;
        (home != self.config.node_id).then(|| home.to_string())
    }

    /// The channel's home in `region` (this node included), if that region has a live
    /// node: where a dead origin's webhooks are shadowed (`tern_functions::outbox`).
    pub fn home_in(&self, key: &ChannelKey, region: &str) -> Option<String> {
        let out = lock(&self.out);
        let home = self
            .homes(&out, key)
            .get(region)
            .map(|home| home.to_string());
        home
    }

    /// Live QUIC connections to peers (one per peer, whichever side dialed).
    pub fn link_connections(&self) -> usize {
        self.running
            .get()
            .map_or(0, |r| r.endpoint.connection_count())
    }

    /// Sets `tern_link_rtt_seconds{peer}` to each linked peer's QUIC round-trip time
    /// (called before `/metrics` is rendered).
    pub fn record_link_rtts(&self) {
        let Some(running) = self.running.get() else {
            return;
        };
        for (peer, rtt) in running.endpoint.peer_rtts() {
            metrics::gauge!("tern_link_rtt_seconds", "peer" => peer).set(rtt.as_secs_f64());
        }
    }

    /// Whether `peer` (of this node's region) has told us it has subscribers on `key`.
    pub fn knows_interest(&self, peer: &str, key: &ChannelKey) -> bool {
        let out = lock(&self.out);
        let known = self.interested(&out, key).any(|p| p == peer);
        known
    }

    /// Event frames written to `peer`'s link so far (0 for an unknown peer).
    pub fn events_sent_to(&self, peer: &str) -> u64 {
        lock(&self.out)
            .peers
            .get(peer)
            .map_or(0, |p| p.shared.events_sent.load(Ordering::Relaxed))
    }

    /// Enough of the waiter's recipients (still the same links, not past a buffer
    /// drop) have stored up to their target: `ack_replicas` of them, or all of them if
    /// fewer; and when one of them is in another region, at least one that stored is, so
    /// an acknowledged message survives losing a whole region.
    fn satisfied(&self, out: &Out, targets: &[(u64, u64)]) -> bool {
        if self.config.ack_replicas == 0 {
            return true;
        }
        let (mut candidates, mut stored) = (0, 0);
        let (mut remote_candidate, mut remote_stored) = (false, false);
        for (epoch, target) in targets {
            // A peer that left (or came back as a new link) no longer counts.
            let Some(peer) = out.peers.values().find(|p| p.epoch == *epoch) else {
                continue;
            };
            if peer.counts_after >= *target {
                continue;
            }
            let remote = peer.spec.region != self.config.region;
            candidates += 1;
            remote_candidate |= remote;
            if peer.acked >= *target {
                stored += 1;
                remote_stored |= remote;
            }
        }
        stored >= self.config.ack_replicas.min(candidates) && (remote_stored || !remote_candidate)
    }

    fn drain_waiters(&self, out: &mut Out, now: Instant) -> Vec<(ReplicaCallback, bool)> {
        let mut done = Vec::new();
        while let Some(front) = out.waiters.front() {
            let ok = self.satisfied(out, &front.targets);
            let expired = now.duration_since(front.since) >= REPLICA_ACK_TIMEOUT;
            if !ok && !expired {
                break;
            }
            if !ok {
                metrics::counter!("tern_replica_ack_timeouts_total").increment(1);
            }
            let waiter = out.waiters.pop_front().expect("checked non-empty");
            done.push((waiter.then, ok));
        }
        done
    }

    fn expire_waiters(&self) {
        let mut out = lock(&self.out);
        let done = self.drain_waiters(&mut out, Instant::now());
        drop(out);
        run_all(done);
    }

    fn on_stored(&self, peer: &str, epoch: u64, upto: u64) {
        let mut out = lock(&self.out);
        let Some(p) = out.peers.get_mut(peer) else {
            return;
        };
        if p.epoch != epoch || upto <= p.acked {
            return;
        }
        if upto > p.seq {
            // Positions never handed out: believing it would count the peer as a
            // replica of events it has not seen, and skip sending them to it.
            ignored("stored_unsent");
            return;
        }
        p.acked = upto;
        {
            let mut q = lock(&p.shared.queue);
            let mut newest = None;
            while q.events.front().is_some_and(|(seq, _, _)| *seq <= upto) {
                newest = q.events.pop_front().map(|(_, _, queued)| queued);
            }
            if let Some(queued) = newest {
                p.shared.lag.record(queued.elapsed().as_secs_f64());
            }
            q.acked = q.acked.max(upto);
            p.shared.unacked.set(q.events.len() as f64);
        }
        p.shared.notify.notify_one();
        let done = self.drain_waiters(&mut out, Instant::now());
        drop(out);
        run_all(done);
    }

    /// Queues a control frame to `peer` (acks, repairs); dropped if the peer is unknown
    /// or its queue is full (both are retried by the protocol).
    fn send_control(&self, peer: &str, frame: FrameV1) -> bool {
        let out = lock(&self.out);
        let Some(p) = out.peers.get(peer) else {
            return false;
        };
        let mut q = lock(&p.shared.queue);
        let queued = q.control.len() < CONTROL_QUEUE_MAX;
        if queued {
            q.control.push_back((frame, Instant::now()));
        }
        drop(q);
        p.shared.notify.notify_one();
        queued
    }

    /// Sends every peer our channel cursors; each asks for what it lacks.
    fn send_heads(&self) {
        let Some(hub) = self.running.get().and_then(|r| r.hub.upgrade()) else {
            return;
        };
        let peers: Vec<String> = lock(&self.out).peers.keys().cloned().collect();
        if peers.is_empty() {
            return;
        }
        let heads: Vec<HeadV1> = hub
            .cursors(HEADS_CHANNELS_MAX)
            .into_iter()
            .map(|(key, cursor)| HeadV1 {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                origins: cursor.origins().map(|(o, seq)| (o.0, seq)).collect(),
            })
            .filter(|h| !h.origins.is_empty())
            .collect();
        for chunk in heads.chunks(HEADS_PER_FRAME) {
            for peer in &peers {
                self.send_control(
                    peer,
                    FrameV1::Heads {
                        channels: chunk.to_vec(),
                    },
                );
            }
        }
    }

    /// Answers a repair request from our log; what the log no longer has (or never
    /// logged) is answered with a `Skip` so the requester does not wait forever.
    fn answer_repair(&self, hub: &Hub, peer: &str, request: FrameV1) {
        let FrameV1::Repair {
            app,
            channel,
            origin,
            from,
            to,
        } = request
        else {
            return;
        };
        let key = ChannelKey::new(&app, &channel);
        let have = hub.cursor(&key).get(OriginId(origin));
        let to = to.min(have);
        if to < from {
            return;
        }
        let events = hub.events_of(&key, OriginId(origin), from, to);
        let skip = |upto: u64| FrameV1::Skip {
            app: app.clone(),
            channel: channel.clone(),
            origin,
            upto,
        };
        let first = events.first().map_or(to + 1, |e| e.seq);
        if first > from {
            self.send_control(peer, skip(first - 1));
        }
        for event in events {
            let frame = EventV1::from_event(&app, &channel, &event);
            if frame.fits() {
                self.send_control(peer, FrameV1::Event(frame));
                continue;
            }
            oversized(&key, event.seq, frame.frame.len());
            self.send_control(peer, skip(event.seq));
        }
    }

    async fn accept_loop(self: Arc<Self>, endpoint: Arc<LinkEndpoint>) {
        loop {
            match endpoint.accept().await {
                Ok(link) => {
                    tokio::spawn(self.clone().receive_loop(link));
                }
                Err(err) => {
                    tracing::debug!(error = %err, "inbound link failed");
                    if matches!(&err, crate::ClusterError::Link(m) if m == "endpoint closed") {
                        return;
                    }
                }
            }
        }
    }

    /// Applies one peer's link: events in origin order, repair requests from our log,
    /// acks of what we sent.
    async fn receive_loop(self: Arc<Self>, mut link: LinkReceiver) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut sender: Option<(String, u64)> = None;
        let mut sender_origin = 0;
        // The sender's own sequence per channel in its previous `Heads` (stale-gap check).
        let mut previous_heads: HashMap<ChannelKey, u64> = HashMap::new();
        let mut acker: Option<(watch::Sender<u64>, tokio::task::AbortHandle)> = None;
        // Our side of the link to the sender (for the partition test hook), looked up
        // once it exists rather than under the replicator lock on every frame.
        let mut sender_link: Option<Arc<PeerShared>> = None;
        while let Ok(Some(frame)) = link.recv().await {
            let Some(hub) = running.hub.upgrade() else {
                return;
            };
            // Every link starts with `Hello` (whose node id `link.rs` checked against the
            // peer's certificate): nothing before it speaks for any node.
            if sender.is_none() && !matches!(frame, FrameV1::Hello { .. }) {
                ignored("before_hello");
                continue;
            }
            if let Some((peer, _)) = &sender {
                if sender_link.is_none() {
                    sender_link = self.peer_shared(peer);
                }
                if sender_link
                    .as_ref()
                    .is_some_and(|l| l.partitioned.load(Ordering::SeqCst))
                {
                    break;
                }
            }
            match frame {
                FrameV1::Hello {
                    node_id,
                    incarnation,
                    origin,
                    epoch,
                    first,
                } => {
                    sender_origin = origin;
                    let store_mark = running.barrier.lost_writes();
                    let (contiguous, store_mark) = {
                        let mut recv = lock(&self.recv);
                        // One entry per sender node ever seen: bounded like the peer set.
                        if recv.len() >= crate::cluster::PEERS_MAX * 4
                            && !recv.contains_key(&node_id)
                        {
                            recv.clear();
                        }
                        let state = recv.entry(node_id.clone()).or_insert(RecvState {
                            incarnation,
                            epoch,
                            contiguous: 0,
                            store_mark,
                        });
                        if state.incarnation != incarnation || state.epoch != epoch {
                            *state = RecvState {
                                incarnation,
                                epoch,
                                contiguous: 0,
                                store_mark,
                            };
                        }
                        state.contiguous = state.contiguous.max(first.saturating_sub(1));
                        (state.contiguous, state.store_mark)
                    };
                    if let Some((_, task)) = acker.take() {
                        task.abort();
                    }
                    let (tx, rx) = watch::channel(contiguous);
                    let task = tokio::spawn(self.clone().ack_loop(
                        node_id.clone(),
                        (incarnation, epoch),
                        store_mark,
                        rx,
                    ))
                    .abort_handle();
                    acker = Some((tx, task));
                    sender = Some((node_id, incarnation));
                }
                FrameV1::Event(event) => {
                    let Some((peer, incarnation)) = &sender else {
                        continue;
                    };
                    let Ok(remote) = event.to_remote() else {
                        ignored("event_frame");
                        continue;
                    };
                    let key = ChannelKey::new(&event.app, &event.channel);
                    let outcome = hub.apply_remote(&key, remote, crate::now_ms());
                    match outcome {
                        Ok(RemoteOutcome::Gap {
                            origin,
                            missing: (from, to),
                        }) => {
                            self.send_control(
                                peer,
                                FrameV1::Repair {
                                    app: event.app,
                                    channel: event.channel,
                                    origin: origin.0,
                                    from,
                                    to,
                                },
                            );
                        }
                        Ok(_) if event.link_seq > 0 => {
                            self.advance_contiguous(peer, *incarnation, event.link_seq, &acker);
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(channel = %event.channel, error = %err, "remote event refused");
                        }
                    }
                }
                request @ FrameV1::Repair { .. } => {
                    let Some((peer, _)) = &sender else {
                        continue;
                    };
                    self.answer_repair(&hub, peer, request);
                }
                FrameV1::Heads { channels } => {
                    let Some((peer, _)) = &sender else {
                        continue;
                    };
                    let live_origins: Vec<u64> = lock(&self.out)
                        .peers
                        .values()
                        .map(|p| p.spec.origin)
                        .collect();
                    for head in channels {
                        let key = ChannelKey::new(&head.app, &head.channel);
                        // Only channels this node keeps: a new home backfills its
                        // channels this way, everybody else ignores the rest.
                        if !self.holds(&key) {
                            continue;
                        }
                        let mine = hub.cursor(&key);
                        if mine.origins().next().is_none() {
                            // Nothing of it here yet: if we are its home, its stored
                            // history is ours to keep too.
                            self.maybe_backfill(&key, false);
                        }
                        for (origin, seq) in head.origins {
                            let have = mine.get(OriginId(origin));
                            let upto = if origin == sender_origin {
                                // The sender's own events come on this link, resent until
                                // acked; what it already had a round ago and we still
                                // lack was never sent to us (published before it knew us).
                                let before = previous_heads.insert(key.clone(), seq);
                                if previous_heads.len() > HEADS_CHANNELS_MAX {
                                    previous_heads.clear();
                                }
                                before.unwrap_or(0).min(seq)
                            } else if origin == self.origin.0 || live_origins.contains(&origin) {
                                // Ours, or a live peer's: its own link brings them.
                                0
                            } else {
                                // An origin that died before every node had its events.
                                seq
                            };
                            if upto > have {
                                self.send_control(
                                    peer,
                                    FrameV1::Repair {
                                        app: head.app.clone(),
                                        channel: head.channel.clone(),
                                        origin,
                                        from: have + 1,
                                        to: upto,
                                    },
                                );
                            }
                        }
                    }
                }
                FrameV1::Interest { channels, on } => {
                    if let Some((peer, _)) = &sender {
                        self.on_interest(peer, channels, on);
                    }
                }
                FrameV1::Sync { app, channel } => {
                    if let Some((peer, _)) = &sender {
                        self.answer_sync(&hub, peer, app, channel);
                    }
                }
                FrameV1::SyncMembers {
                    app,
                    channel,
                    frame,
                } => {
                    let Ok(frame) = tern_protocol::decode(tern_protocol::Format::Msgpack, &frame)
                    else {
                        ignored("sync_members_frame");
                        continue;
                    };
                    // Seeding makes the channel: only for members there are.
                    let members = frame.presence.unwrap_or_default();
                    if !members.is_empty() {
                        let key = ChannelKey::new(&app, &channel);
                        hub.seed_members(&key, members, crate::now_ms());
                    }
                }
                FrameV1::Synced {
                    app,
                    channel,
                    origins,
                } => {
                    let key = ChannelKey::new(&app, &channel);
                    // What the home has but could not send (trimmed from its log) is
                    // nobody's to send any more.
                    for (origin, upto) in origins {
                        hub.skip_remote(&key, OriginId(origin), upto, crate::now_ms());
                    }
                    self.warmed(&key);
                }
                FrameV1::Backfill {
                    app,
                    channel,
                    presence,
                    after,
                } => {
                    if let Some((peer, _)) = &sender {
                        self.answer_backfill(peer.clone(), app, channel, presence, after);
                    }
                }
                FrameV1::BackfillItems {
                    app,
                    channel,
                    presence,
                    items,
                    more,
                } => {
                    if let Some((peer, _)) = &sender {
                        self.take_backfill(peer, app, channel, presence, items, more);
                    }
                }
                FrameV1::Skip {
                    app,
                    channel,
                    origin,
                    upto,
                } => {
                    let key = ChannelKey::new(&app, &channel);
                    let applied = hub.skip_remote(&key, OriginId(origin), upto, crate::now_ms());
                    // No log has them, but a home's store may: if we are the channel's
                    // home, copy its history.
                    self.maybe_backfill(&key, true);
                    tracing::warn!(%channel, origin = format!("{origin:016x}"), upto, applied, "events no peer can supply were skipped");
                }
                FrameV1::Stored {
                    incarnation,
                    epoch,
                    upto,
                } => {
                    if let Some((peer, _)) = &sender {
                        if incarnation == self.config.incarnation {
                            self.on_stored(peer, epoch, upto);
                        }
                    }
                }
            }
        }
        if let Some((_, task)) = acker {
            task.abort();
        }
    }

    /// Link position `link_seq` from `peer` is applied: extend the acknowledgeable prefix.
    fn advance_contiguous(
        &self,
        peer: &str,
        incarnation: u64,
        link_seq: u64,
        acker: &Option<(watch::Sender<u64>, tokio::task::AbortHandle)>,
    ) {
        let mut recv = lock(&self.recv);
        if let Some(state) = recv.get_mut(peer) {
            if state.incarnation == incarnation && link_seq == state.contiguous + 1 {
                state.contiguous = link_seq;
                if let Some((tx, _)) = acker {
                    let _ = tx.send(link_seq);
                }
            }
        }
    }

    /// Acknowledges a sender's link positions once they are in our store. Stops for good
    /// (the sender then stops counting us as a replica of them) once the store lost a
    /// write after `store_mark`, the link's start.
    async fn ack_loop(
        self: Arc<Self>,
        peer: String,
        (incarnation, epoch): (u64, u64),
        store_mark: u64,
        mut rx: watch::Receiver<u64>,
    ) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut sent = 0;
        loop {
            let upto = *rx.borrow_and_update();
            if upto > sent {
                let (tx, done) = tokio::sync::oneshot::channel();
                running.barrier.after_committed(
                    store_mark,
                    Box::new(move |stored| {
                        let _ = tx.send(stored);
                    }),
                );
                if !done.await.unwrap_or(false) {
                    tracing::error!(%peer, "this node's history store lost writes while this link was up: its events are no longer acknowledged as stored until the link starts afresh (a new incarnation or epoch)");
                    return;
                }
                let queued = self.send_control(
                    &peer,
                    FrameV1::Stored {
                        incarnation,
                        epoch,
                        upto,
                    },
                );
                if queued {
                    sent = upto;
                } else {
                    // The sender's link reached us before membership told us of it (or
                    // its queue is full): acks are cumulative, try again shortly rather
                    // than leave it resending everything.
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
                continue;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn run_all(done: Vec<(ReplicaCallback, bool)>) {
    for (then, ok) in done {
        then(ok);
    }
}

impl Journal for Replicator {
    fn restore(&self, key: &ChannelKey) -> tern_core::Cursor {
        self.next
            .as_ref()
            .map_or_else(tern_core::Cursor::new, |next| next.restore(key))
    }

    fn interest(&self, key: &ChannelKey, attached: bool) {
        if let Some(next) = &self.next {
            next.interest(key, attached);
        }
        {
            let mut mine = lock(&self.mine);
            if attached {
                mine.insert(key.clone());
            } else {
                mine.remove(key);
            }
        }
        self.tell_region(key, attached);
    }

    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        if let Some(next) = &self.next {
            next.record(key, event);
        }
        let own = event.origin == self.origin;
        let recipients = {
            let mut out = lock(&self.out);
            let recipients = self.recipients(&out, key, event.origin.0, own);
            if recipients.is_empty() {
                if own {
                    out.last_targets.insert(key.clone(), Vec::new());
                }
                return;
            }
            recipients
        };
        // Encoded once, outside the replicator lock (publishes on other channels take it).
        let frame = EventV1::from_event(&key.app, &key.name, event);
        if !frame.fits() {
            // The edge bounds every publish far below this; an event that still does not
            // fit a frame is reported and left out of replication (peers that ask for it
            // get a `Skip`), never sent, which would drop the link and resend it forever.
            oversized(key, event.seq, frame.frame.len());
            return;
        }
        let now = Instant::now();
        let mut out = lock(&self.out);
        let mut targets = Vec::with_capacity(recipients.len());
        for id in &recipients {
            let Some(peer) = out.peers.get_mut(id) else {
                continue;
            };
            peer.seq += 1;
            targets.push((peer.epoch, peer.seq));
            let mut frame = frame.clone();
            frame.link_seq = peer.seq;
            let mut q = lock(&peer.shared.queue);
            q.events.push_back((peer.seq, FrameV1::Event(frame), now));
            peer.shared.unacked.set(q.events.len() as f64);
            if q.events.len() > PEER_BUFFER_MAX {
                if let Some((dropped, _, _)) = q.events.pop_front() {
                    peer.counts_after = peer.counts_after.max(dropped);
                    metrics::counter!("tern_replication_buffer_drops_total").increment(1);
                }
            }
            drop(q);
            peer.shared.notify.notify_one();
        }
        if own {
            if out.last_targets.len() >= LAST_TARGETS_MAX && !out.last_targets.contains_key(key) {
                out.last_targets.clear();
            }
            out.last_targets.insert(key.clone(), targets);
        }
    }
}

impl Replicator {
    /// The channel's home in each region with a live node (this node included): the
    /// node there with the highest rendezvous score for the channel.
    fn homes<'a>(&'a self, out: &'a Out, key: &ChannelKey) -> HashMap<&'a str, &'a str> {
        let mut best: HashMap<&str, (u64, &str)> = HashMap::new();
        let me = (self.config.region.as_str(), self.config.node_id.as_str());
        let nodes = out
            .peers
            .values()
            .map(|p| (p.spec.region.as_str(), p.spec.node_id.as_str()))
            .chain(std::iter::once(me));
        for (region, node) in nodes {
            let score = key.home_score(node);
            let entry = best.entry(region).or_insert((score, node));
            if (score, node) > *entry {
                *entry = (score, node);
            }
        }
        best.into_iter().map(|(r, (_, n))| (r, n)).collect()
    }

    /// Whether this node is the channel's home in its region (it receives and stores
    /// every event of the channel).
    fn is_home(&self, out: &Out, key: &ChannelKey) -> bool {
        self.homes(out, key).get(self.config.region.as_str()) == Some(&self.config.node_id.as_str())
    }

    /// Same-region peers with live interest in the channel.
    fn interested<'a>(&self, out: &'a Out, key: &ChannelKey) -> impl Iterator<Item = &'a str> {
        let now = Instant::now();
        out.interest
            .get(key)
            .into_iter()
            .flat_map(|peers| peers.iter())
            .filter(move |(_, at)| now.duration_since(**at) < INTEREST_TTL)
            .map(|(peer, _)| peer.as_str())
            .filter(|peer| out.peers.contains_key(*peer))
    }

    /// Who gets an event of `origin` on `key`: for our own, the channel's home in every
    /// region and the interested nodes of ours; for one that came from another region,
    /// the interested nodes of ours if we are the channel's home here (its relay).
    fn recipients(&self, out: &Out, key: &ChannelKey, origin: u64, own: bool) -> Vec<String> {
        let me = self.config.node_id.as_str();
        let mut ids: Vec<String> = Vec::new();
        if own {
            for home in self.homes(out, key).into_values() {
                if home != me {
                    ids.push(home.to_string());
                }
            }
        } else {
            let Some(origin_node) = out.peers.values().find(|p| p.spec.origin == origin) else {
                return ids;
            };
            if origin_node.spec.region == self.config.region || !self.is_home(out, key) {
                return ids;
            }
        }
        for peer in self.interested(out, key) {
            if !ids.iter().any(|id| id == peer) {
                ids.push(peer.to_string());
            }
        }
        ids
    }

    /// Tells this node's region it has (`on`) or no longer has subscribers on `key`.
    fn tell_region(&self, key: &ChannelKey, on: bool) {
        let frame = FrameV1::Interest {
            channels: vec![(key.app.to_string(), key.name.to_string())],
            on,
        };
        for peer in self.region_peers() {
            self.send_control(&peer, frame.clone());
        }
    }

    /// The channels this node has subscribers on, as `Interest` names them.
    fn interest_list(&self) -> Vec<(String, String)> {
        lock(&self.mine)
            .iter()
            .map(|k| (k.app.to_string(), k.name.to_string()))
            .collect()
    }

    /// Peers in this node's region.
    fn region_peers(&self) -> Vec<String> {
        lock(&self.out)
            .peers
            .values()
            .filter(|p| p.spec.region == self.config.region)
            .map(|p| p.spec.node_id.clone())
            .collect()
    }

    /// Repeats this node's interest to its region's peers (they forget it otherwise) and
    /// forgets peers' interest that was not repeated.
    fn refresh_interest(&self) {
        let channels = self.interest_list();
        let peers = self.region_peers();
        for chunk in channels.chunks(INTEREST_PER_FRAME) {
            for peer in &peers {
                self.send_control(
                    peer,
                    FrameV1::Interest {
                        channels: chunk.to_vec(),
                        on: true,
                    },
                );
            }
        }
        let now = Instant::now();
        let mut out = lock(&self.out);
        let Out {
            interest,
            interest_len,
            ..
        } = &mut *out;
        interest.retain(|_, peers| {
            let before = peers.len();
            peers.retain(|_, at| now.duration_since(*at) < INTEREST_TTL);
            *interest_len -= before - peers.len();
            !peers.is_empty()
        });
    }

    /// A same-region peer's interest frame.
    fn on_interest(&self, peer: &str, channels: Vec<(String, String)>, on: bool) {
        let now = Instant::now();
        let mut guard = lock(&self.out);
        if guard
            .peers
            .get(peer)
            .is_none_or(|p| p.spec.region != self.config.region)
        {
            return;
        }
        let out = &mut *guard;
        for (app, channel) in channels {
            let key = ChannelKey::new(&app, &channel);
            if on {
                if out.interest_len >= INTEREST_MAX {
                    metrics::counter!("tern_replication_interest_refused_total").increment(1);
                    continue;
                }
                let fresh = out
                    .interest
                    .entry(key)
                    .or_default()
                    .insert(peer.to_string(), now)
                    .is_none();
                if fresh {
                    out.interest_len += 1;
                }
            } else if let Some(peers) = out.interest.get_mut(&key) {
                if peers.remove(peer).is_some() {
                    out.interest_len -= 1;
                }
                if peers.is_empty() {
                    out.interest.remove(&key);
                }
            }
        }
    }

    /// Before this node's first subscriber attaches to `key`: `None` when the node
    /// already receives the channel (it has subscribers on it, is its home, or is
    /// alone); otherwise it registers interest, asks the region's home for the
    /// channel's state, and the receiver completes once that arrived (or is dropped
    /// after [`WARM_TIMEOUT`]; attach anyway then).
    pub fn warm(&self, key: &ChannelKey) -> Option<oneshot::Receiver<()>> {
        if self.running.get().is_none() || lock(&self.mine).contains(key) {
            return None;
        }
        let home = {
            let out = lock(&self.out);
            let homes = self.homes(&out, key);
            let home = homes.get(self.config.region.as_str())?;
            if *home == self.config.node_id {
                return None;
            }
            home.to_string()
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut warming = lock(&self.warming);
            if let Some(w) = warming.get_mut(key) {
                w.waiters.push(tx);
                return Some(rx);
            }
            if warming.len() >= WARMING_MAX {
                metrics::counter!("tern_replication_warm_refused_total").increment(1);
                return None;
            }
            warming.insert(
                key.clone(),
                Warming {
                    since: Instant::now(),
                    home: home.clone(),
                    asked: Instant::now(),
                    waiters: vec![tx],
                },
            );
        }
        // Interest first: from now on the region sends us the channel's events, and
        // the state asked for next covers everything before.
        self.tell_region(key, true);
        self.send_control(
            &home,
            FrameV1::Sync {
                app: key.app.to_string(),
                channel: key.name.to_string(),
            },
        );
        Some(rx)
    }

    /// Gives up on channel states that did not come in time, and asks again for those
    /// that are late; likewise for history pages being copied.
    fn expire_warming(&self) {
        let mut again = Vec::new();
        lock(&self.warming).retain(|key, w| {
            let keep = w.since.elapsed() < WARM_TIMEOUT;
            if !keep {
                tracing::warn!(channel = %key.name, "channel state did not arrive in time; attaching with what this node has");
            } else if w.asked.elapsed() >= ASK_AGAIN_AFTER {
                w.asked = Instant::now();
                again.push((
                    w.home.clone(),
                    FrameV1::Sync {
                        app: key.app.to_string(),
                        channel: key.name.to_string(),
                    },
                ));
            }
            keep
        });
        for (key, b) in lock(&self.backfills).iter_mut() {
            if b.started.elapsed() >= BACKFILL_AGAIN_AFTER || b.asked.elapsed() < ASK_AGAIN_AFTER {
                continue;
            }
            b.asked = Instant::now();
            for (kind, waiting) in b.waiting.iter().enumerate() {
                if let Some(after) = waiting {
                    again.push((
                        b.source.clone(),
                        FrameV1::Backfill {
                            app: key.app.to_string(),
                            channel: key.name.to_string(),
                            presence: kind == 1,
                            after: *after,
                        },
                    ));
                }
            }
        }
        for (peer, frame) in again {
            self.send_control(&peer, frame);
        }
    }

    fn warmed(&self, key: &ChannelKey) {
        if let Some(w) = lock(&self.warming).remove(key) {
            for waiter in w.waiters {
                let _ = waiter.send(());
            }
        }
    }

    /// Answers `Sync`: the channel's log per origin (as repair answers), its presence
    /// members, then `Synced` with the cursor.
    fn answer_sync(&self, hub: &Hub, peer: &str, app: String, channel: String) {
        let key = ChannelKey::new(&app, &channel);
        let cursor = hub.cursor(&key);
        for (origin, have) in cursor.origins() {
            self.answer_repair(
                hub,
                peer,
                FrameV1::Repair {
                    app: app.clone(),
                    channel: channel.clone(),
                    origin: origin.0,
                    from: 1,
                    to: have,
                },
            );
        }
        for members in member_pages(hub.members(&key)) {
            let frame = tern_protocol::ProtocolMessage {
                presence: Some(members),
                ..Default::default()
            };
            self.send_control(
                peer,
                FrameV1::SyncMembers {
                    app: app.clone(),
                    channel: channel.clone(),
                    frame: tern_protocol::encode(tern_protocol::Format::Msgpack, &frame).to_vec(),
                },
            );
        }
        self.send_control(
            peer,
            FrameV1::Synced {
                app,
                channel,
                origins: cursor.origins().map(|(o, seq)| (o.0, seq)).collect(),
            },
        );
    }

    /// Starts copying the channel's stored history from its home in another region when
    /// this node is the channel's home here and has a history store: always after a
    /// `Skip` (`missed`: events no log had), otherwise only when nothing of the channel
    /// is stored here yet. At most once per [`BACKFILL_AGAIN_AFTER`] per channel.
    fn maybe_backfill(&self, key: &ChannelKey, missed: bool) {
        let Some(history) = self.history.get() else {
            return;
        };
        let source = {
            let out = lock(&self.out);
            let homes = self.homes(&out, key);
            if homes.get(self.config.region.as_str()) != Some(&self.config.node_id.as_str()) {
                return;
            }
            // The nearest region would be better; any other region's home has it all.
            let mut others: Vec<&str> = homes
                .iter()
                .filter(|(region, _)| **region != self.config.region)
                .map(|(_, node)| *node)
                .collect();
            others.sort_unstable();
            match others.first() {
                Some(node) => node.to_string(),
                None => return,
            }
        };
        {
            let mut backfills = lock(&self.backfills);
            if backfills
                .get(key)
                .is_some_and(|b| b.started.elapsed() < BACKFILL_AGAIN_AFTER)
            {
                return;
            }
            backfills.retain(|_, b| b.started.elapsed() < BACKFILL_AGAIN_AFTER);
            if backfills.len() >= BACKFILLS_MAX {
                return;
            }
            if !missed && history.has(&key.app, &key.name) {
                return;
            }
            backfills.insert(
                key.clone(),
                Backfilling {
                    started: Instant::now(),
                    source: source.clone(),
                    waiting: [Some(None), Some(None)],
                    asked: Instant::now(),
                },
            );
        }
        tracing::info!(channel = %key.name, from = %source, "copying the channel's history to its new home");
        for presence in [false, true] {
            self.send_control(
                &source,
                FrameV1::Backfill {
                    app: key.app.to_string(),
                    channel: key.name.to_string(),
                    presence,
                    after: None,
                },
            );
        }
    }

    /// Answers one `Backfill` page from the store (off the async runtime).
    fn answer_backfill(
        self: &Arc<Self>,
        peer: String,
        app: String,
        channel: String,
        presence: bool,
        after: Option<ItemPosV1>,
    ) {
        let Some(history) = self.history.get().cloned() else {
            return;
        };
        if self.backfill_answers.fetch_add(1, Ordering::SeqCst) >= BACKFILL_ANSWERS_MAX {
            self.backfill_answers.fetch_sub(1, Ordering::SeqCst);
            ignored("backfill_busy");
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            // Released however the read ends.
            let _slot = BackfillSlot(&me.backfill_answers);
            let (mut items, mut more) =
                history.page(&app, &channel, presence, after, BACKFILL_PAGE);
            // Items are stored messages (each within the publish limit), but a page of
            // them must still fit a frame: cut it and let the peer ask for the rest.
            let mut bytes = 0;
            if let Some(cut) = items.iter().position(|item| {
                bytes += item.payload.len();
                bytes > BACKFILL_BYTES_MAX
            }) {
                items.truncate(cut.max(1));
                more = true;
            }
            me.send_control(
                &peer,
                FrameV1::BackfillItems {
                    app,
                    channel,
                    presence,
                    items,
                    more,
                },
            );
        });
    }

    /// Stores one page of copied history and asks for the next.
    fn take_backfill(
        &self,
        peer: &str,
        app: String,
        channel: String,
        presence: bool,
        items: Vec<ItemV1>,
        more: bool,
    ) {
        let Some(history) = self.history.get() else {
            return;
        };
        let last = items.last().map(|item| item.position);
        {
            // Only answers to what we asked for (a late duplicate is harmless anyway).
            let key = ChannelKey::new(&app, &channel);
            let mut backfills = lock(&self.backfills);
            let Some(b) = backfills.get_mut(&key) else {
                return;
            };
            b.waiting[usize::from(presence)] = if more { last.map(Some) } else { None };
            b.asked = Instant::now();
        }
        metrics::counter!("tern_history_backfilled_items_total").increment(items.len() as u64);
        history.put(&app, &channel, presence, items);
        if let (true, Some(after)) = (more, last) {
            self.send_control(
                peer,
                FrameV1::Backfill {
                    app,
                    channel,
                    presence,
                    after: Some(after),
                },
            );
        }
    }

    /// Whether this node keeps `key` (and so repairs its gaps from `Heads`): it has
    /// subscribers on it, is waiting for its state, or is its home here.
    fn holds(&self, key: &ChannelKey) -> bool {
        lock(&self.mine).contains(key)
            || lock(&self.warming).contains_key(key)
            || self.is_home(&lock(&self.out), key)
    }
}

/// Who sends on a link, and which link it is (first frame of every link).
#[derive(Clone)]
struct Hello {
    node_id: String,
    /// This node's region (wire v2 glue: links to other regions are compressed).
    region: String,
    incarnation: u64,
    origin: u64,
    epoch: u64,
}

enum Work {
    Control(FrameV1, Instant),
    Event(u64, FrameV1, Instant),
    Resend,
    Idle,
}

/// Keeps one link to `peer` open and writes its queue into it, reconnecting and
/// resending whatever is unacknowledged.
async fn send_loop(
    endpoint: Arc<LinkEndpoint>,
    me: Hello,
    peer: PeerSpec,
    shared: Arc<PeerShared>,
) {
    let delay = shared.wan.map_or(Duration::ZERO, |w| w.delay);
    let loss = shared.wan.map_or(0.0, |w| w.loss);
    let resend_after = RESEND_AFTER + delay * 2;
    // WAN cost per peer: event frames (one per replicated event) and control frames.
    let event_bytes =
        metrics::counter!("tern_replication_event_bytes_total", "peer" => peer.node_id.clone());
    let events_sent =
        metrics::counter!("tern_replication_events_sent_total", "peer" => peer.node_id.clone());
    let control_bytes =
        metrics::counter!("tern_replication_control_bytes_total", "peer" => peer.node_id.clone());
    loop {
        if shared.partitioned.load(Ordering::SeqCst) {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        let mut link = match endpoint.connect(peer.quic, &peer.node_id).await {
            Ok(link) => link,
            Err(err) => {
                tracing::debug!(peer = %peer.node_id, error = %err, "link connect failed; retrying");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        // ---- wire v2 glue (issue 17): the link counts the bytes it writes, by kind,
        // and compresses when the peer is in another region.
        link.set_byte_counters(event_bytes.clone(), control_bytes.clone());
        link.set_compression((peer.region != me.region).then_some(crate::framing::ZSTD_LEVEL));
        // ---- end wire v2 glue
        let mut sent_upto = 0;
        if hello(&mut link, &me, &shared, &mut sent_upto)
            .await
            .is_err()
        {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        let mut last_acked = lock(&shared.queue).acked;
        let mut progress_at = Instant::now();
        loop {
            if shared.partitioned.load(Ordering::SeqCst) {
                break;
            }
            let work = {
                let mut q = lock(&shared.queue);
                if q.acked != last_acked {
                    last_acked = q.acked;
                    progress_at = Instant::now();
                }
                sent_upto = sent_upto.max(q.acked);
                if let Some((first, _, _)) = q.events.front() {
                    // Dropped from the buffer before it was sent: skip (see `hello`).
                    sent_upto = sent_upto.max(first - 1);
                }
                let next_event = q
                    .events
                    .front()
                    .map(|(first, _, _)| *first)
                    .and_then(|first| q.events.get((sent_upto + 1 - first) as usize))
                    .map(|(seq, _, at)| (*seq, *at));
                let control_at = q.control.front().map(|(_, at)| *at);
                // Whichever was queued first goes first: both wait the same emulated
                // delay, so a control frame must not hold back events queued before it.
                let control_first = match (control_at, next_event) {
                    (Some(c), Some((_, e))) => c <= e,
                    (Some(_), None) => true,
                    _ => false,
                };
                if control_first {
                    let (frame, at) = q.control.pop_front().expect("checked non-empty");
                    Work::Control(frame, at)
                } else if let Some((seq, at)) = next_event {
                    if sent_upto <= q.acked {
                        // Nothing was outstanding: the ack clock starts now, not when
                        // the link last made progress (an idle link would otherwise
                        // resend its first event at once).
                        progress_at = Instant::now();
                    }
                    let index =
                        (seq - q.events.front().map_or(seq, |(first, _, _)| *first)) as usize;
                    let frame = q.events[index].1.clone();
                    Work::Event(seq, frame, at)
                } else if sent_upto > q.acked && progress_at.elapsed() >= resend_after {
                    Work::Resend
                } else {
                    Work::Idle
                }
            };
            let result = match work {
                // wire v2 glue: frames are queued on the link and written together
                // (`flush_then_wait`, and `Idle`); the link counts their bytes.
                Work::Control(frame, at) => match flush_then_wait(&mut link, at + delay).await {
                    Ok(()) => link.queue(&frame).await,
                    Err(err) => Err(err),
                },
                Work::Event(seq, frame, at) => match flush_then_wait(&mut link, at + delay).await {
                    Err(err) => Err(err),
                    Ok(()) => {
                        sent_upto = seq;
                        if loss > 0.0 && rand::random::<f64>() < loss {
                            Ok(())
                        } else {
                            link.queue(&frame).await.map(|()| {
                                events_sent.increment(1);
                                shared.events_sent.fetch_add(1, Ordering::Relaxed);
                            })
                        }
                    }
                },
                Work::Resend => {
                    progress_at = Instant::now();
                    sent_upto = 0;
                    metrics::counter!("tern_replication_resends_total", "peer" => peer.node_id.clone())
                        .increment(1);
                    hello(&mut link, &me, &shared, &mut sent_upto).await
                }
                Work::Idle => {
                    if let Err(err) = link.flush().await {
                        tracing::debug!(peer = %peer.node_id, error = %err, "link send failed; reconnecting");
                        break;
                    }
                    tokio::select! {
                        _ = shared.notify.notified() => {}
                        _ = tokio::time::sleep(resend_after / 2) => {}
                    }
                    Ok(())
                }
            };
            match result {
                Ok(()) => {}
                // Nothing was written: the link is fine. Events are checked before they
                // get a link position (`record`), so this is a control frame; it is lost
                // as a dropped datagram would be, and asked for again if it mattered.
                Err(err @ ClusterError::FrameTooLarge(_)) => {
                    metrics::counter!("tern_replication_frames_refused_total").increment(1);
                    tracing::error!(peer = %peer.node_id, error = %err, "frame not sent");
                }
                Err(err) => {
                    tracing::debug!(peer = %peer.node_id, error = %err, "link send failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// wire v2 glue: writes what the link has queued before waiting for a frame's due time
/// (frames due together go out in one write; none waits behind a delay).
async fn flush_then_wait(link: &mut LinkSender, at: Instant) -> Result<(), ClusterError> {
    if at > Instant::now() {
        link.flush().await?;
    }
    wait_until(at).await;
    Ok(())
}

/// Announces the sender and rewinds to the first unacknowledged event.
async fn hello(
    link: &mut LinkSender,
    me: &Hello,
    shared: &PeerShared,
    sent_upto: &mut u64,
) -> Result<(), crate::ClusterError> {
    let first = {
        let q = lock(&shared.queue);
        let first = q.events.front().map_or(q.acked + 1, |(seq, _, _)| *seq);
        *sent_upto = q.acked.max(first - 1);
        first
    };
    link.send(&FrameV1::Hello {
        node_id: me.node_id.clone(),
        incarnation: me.incarnation,
        origin: me.origin,
        epoch: me.epoch,
        first,
    })
    .await
    .map(|_| ())
}

/// Waits for an emulated frame's due time. tokio's timer has millisecond granularity
/// and rounds up, which would add up to a millisecond to every emulated link; so it
/// sleeps on tokio to within two milliseconds and leaves the rest to [`PreciseTimer`]
/// (an OS thread whose timed waits are good to tens of microseconds), instead of
/// spinning a runtime worker. Only emulated links (`emulate_topology`) ever wait here.
async fn wait_until(at: Instant) {
    let now = Instant::now();
    if at <= now {
        return;
    }
    let coarse = at - now;
    if coarse > Duration::from_millis(2) {
        tokio::time::sleep(coarse - Duration::from_millis(2)).await;
    }
    if Instant::now() >= at {
        return;
    }
    let (tx, rx) = oneshot::channel();
    PreciseTimer::get().wake_at(at, tx);
    let _ = rx.await;
}

/// One thread that fires oneshots at their deadlines with OS timer precision.
struct PreciseTimer {
    due: Mutex<std::collections::BTreeMap<(Instant, u64), oneshot::Sender<()>>>,
    next_id: std::sync::atomic::AtomicU64,
    thread: std::thread::Thread,
}

impl PreciseTimer {
    fn get() -> &'static PreciseTimer {
        static TIMER: OnceLock<PreciseTimer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let thread = std::thread::Builder::new()
                .name("tern-wan-emulation".into())
                .spawn(|| loop {
                    let timer = PreciseTimer::get();
                    let now = Instant::now();
                    let next = {
                        let mut due = lock(&timer.due);
                        while let Some(entry) = due.first_entry() {
                            if entry.key().0 > now {
                                break;
                            }
                            let _ = entry.remove().send(());
                        }
                        due.keys().next().map(|(at, _)| *at)
                    };
                    match next {
                        Some(at) => std::thread::park_timeout(at.saturating_duration_since(now)),
                        None => std::thread::park(),
                    }
                })
                .expect("spawning the WAN emulation timer thread")
                .thread()
                .clone();
            PreciseTimer {
                due: Mutex::new(std::collections::BTreeMap::new()),
                next_id: std::sync::atomic::AtomicU64::new(0),
                thread,
            }
        })
    }

    fn wake_at(&self, at: Instant, then: oneshot::Sender<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.due).insert((at, id), then);
        self.thread.unpark();
    }
}

/// Counts a well-formed frame from a peer that this node does not act on.
fn ignored(reason: &'static str) {
    metrics::counter!("tern_replication_frames_ignored_total", "reason" => reason).increment(1);
}

/// Reports an event that cannot be replicated because it does not fit a frame.
fn oversized(key: &ChannelKey, seq: u64, bytes: usize) {
    metrics::counter!("tern_replication_frames_refused_total").increment(1);
    tracing::error!(app = %key.app, channel = %key.name, seq, bytes,
        "event does not fit a cluster frame: not replicated");
}

/// Presence members cut into `SyncMembers` pages: at most [`MEMBERS_PER_FRAME`] members
/// and, past the first member of a page, [`MEMBERS_BYTES_PER_FRAME`] bytes each.
fn member_pages(members: Vec<PresenceMessage>) -> Vec<Vec<PresenceMessage>> {
    let mut pages: Vec<Vec<PresenceMessage>> = Vec::new();
    let mut bytes = 0;
    for member in members {
        // Measured: the member as the page will carry it.
        let size = tern_protocol::encode_value(tern_protocol::Format::Msgpack, &member).len();
        let full = pages.last().is_none_or(|page| {
            page.len() >= MEMBERS_PER_FRAME || bytes + size > MEMBERS_BYTES_PER_FRAME
        });
        if full {
            pages.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        pages.last_mut().expect("pushed above").push(member);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Presence SYNC to a peer is cut by encoded size as well as by count: 256 members
    /// with 64 KB of data each (16 MiB together, past the frame limit) go in several
    /// frames, each of which fits, and no member is lost or repeated.
    #[test]
    fn member_pages_fit_a_frame() {
        let members: Vec<PresenceMessage> = (0..256)
            .map(|i| PresenceMessage {
                action: tern_protocol::presence_action::PRESENT,
                client_id: Some(format!("c{i}")),
                connection_id: Some(format!("conn-{i}")),
                data: Some(tern_protocol::Data::String("d".repeat(64_000))),
                ..Default::default()
            })
            .collect();
        let pages = member_pages(members.clone());
        assert!(pages.len() > 1);
        for page in &pages {
            let frame = FrameV1::SyncMembers {
                app: "app".into(),
                channel: "room".into(),
                frame: tern_protocol::encode(
                    tern_protocol::Format::Msgpack,
                    &tern_protocol::ProtocolMessage {
                        presence: Some(page.clone()),
                        ..Default::default()
                    },
                )
                .to_vec(),
            };
            assert!(crate::wire::encode(&frame).len() <= crate::wire::FRAME_BYTES_MAX);
        }
        assert_eq!(pages.concat(), members);
        // Small members still go 256 to a frame.
        let small = vec![PresenceMessage::default(); 600];
        let sizes: Vec<usize> = member_pages(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
