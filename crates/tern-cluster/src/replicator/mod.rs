//! The replication driver: it runs the rules of `tern_replication` (routing by
//! interest, reliable links with `Stored` acks, `ack_replicas` waiters, gap repair,
//! `Heads` anti-entropy, `Sync` for a first subscriber, history backfill) over QUIC
//! links, with tokio tasks and the clock. No rule is decided here; this module only
//! holds the rules' state under locks, feeds them what arrives (`now` included) and
//! carries out what they decide.
//!
//! One publish, end to end: the hub journals the event ([`Replicator::record`], the
//! `Journal`), which asks `routing::recipients` who gets it, gives it a position on each
//! recipient's link (`links::OutLink`) and keeps it in that link's resend buffer
//! (`links::SendBuffer`); `send::send_loop` writes it; on the peer, `receive.rs` hands
//! it to `Hub::apply_remote` and, once it is in the peer's store, answers `Stored`;
//! back here `Stored` advances the link and `acks::Waiters` says which publishes'
//! replies (queued by [`Replicator::after_replicated`]) run now.
//!
//! # Layout
//! - `mod.rs`: the state, the public API, the `Journal` side (record, interest).
//! - `routes.rs`: homes, recipients, interest, `Sync` waits, acks: the rules' glue.
//! - `answers.rs`: answering peers: repairs, `Sync`, `Heads`, history pages.
//! - `receive.rs`: a peer's inbound link, frame by frame, and its `Stored` acks.
//! - `send.rs`: one outbound link: connect, `Hello`, write, resend.
//! - `wan.rs`: the emulated WAN's precise timer (local multi-region runs only).
//! - `handoff.rs`: the handoff pass over this node's store after a membership change.
//! - `stalls.rs`: a dead origin's gap nobody fills, given up after a while.
//! - `history.rs`: what the driver needs of the node's history store (`HistoryAccess`,
//!   `LocalStore`).

mod answers;
mod handoff;
mod history;
mod receive;
mod routes;
mod send;
mod stalls;
mod wan;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tern_core::{ChannelEvent, ChannelKey, Hub, Journal, OriginId};
use tern_replication::acks::Waiters;
use tern_replication::backfill::Backfills;
use tern_replication::handoff::Handoff;
use tern_replication::links::{InLink, OutLink, SendBuffer};
use tern_replication::routing::{self, Interest, Node};
use tern_replication::warm::Warm;
use tern_replication::{heads, Now};
use tokio::sync::{oneshot, Notify};

use crate::link::LinkEndpoint;
use crate::topology::{Topology, WanLink};
use crate::wire::{EventV1, FrameV1, ItemPosV1, ItemV1};
use send::{oversized, send_loop, Hello};

pub use history::{Barrier, HistoryAccess, LocalStore, ReplicaCallback};
pub use tern_replication::acks::REPLICA_ACK_TIMEOUT;
pub use tern_replication::handoff::StoredChannel;
pub use tern_replication::links::{CONTROL_QUEUE_MAX, PEER_BUFFER_MAX};
pub use tern_replication::warm::WARM_TIMEOUT;

/// How soon a failed link is dialled again.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// Channels whose latest ack targets are remembered (past it, waiters fall back to
/// waiting on every link).
const LAST_TARGETS_MAX: usize = 65_536;
/// Page reads answering peers' `Backfill` requests at once (each holds a blocking thread
/// while the store reads); a request past it is ignored and counted, and the asker asks
/// again after `ASK_AGAIN_AFTER`.
pub const BACKFILL_ANSWERS_MAX: usize = 16;

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

/// The hub's journal on a replicating node, and the driver of the replication rules
/// (`tern_replication`) over QUIC links.
pub struct Replicator {
    config: ReplicatorConfig,
    origin: OriginId,
    next: Option<Arc<dyn Journal>>,
    /// Where this driver's clock starts: the rules take `now` as time since then.
    base: Instant,
    out: Mutex<Out>,
    /// Per sender node: what this node applied of its link.
    recv: Mutex<HashMap<String, InLink>>,
    running: OnceLock<Running>,
    /// Channels with subscribers on this node (its interest); bounded by the hub's
    /// channels.
    mine: Mutex<HashSet<ChannelKey>>,
    /// First attaches waiting for a channel's state from its home.
    warming: Mutex<Warm<oneshot::Sender<()>>>,
    /// The history store, for copying history to a channel's new home.
    history: OnceLock<Arc<dyn HistoryAccess>>,
    /// Channels whose history this node is copying.
    backfills: Mutex<Backfills<ItemPosV1>>,
    /// `Backfill` pages being read for peers now (at most [`BACKFILL_ANSWERS_MAX`]).
    backfill_answers: std::sync::atomic::AtomicUsize,
    /// Where the next `Heads` round starts in the hub's channels (`Hub::cursors_from`),
    /// so a node with more than `HEADS_CHANNELS_MAX` channels lists them all in turn.
    heads_skip: std::sync::atomic::AtomicUsize,
    /// Telling channels' new homes of this node's stored channels after a membership
    /// change (the page token is the store's).
    handoff: Mutex<Handoff<Vec<u8>>>,
    /// The gaps the hub holds events back behind, watched (`stalls`) and asked for once
    /// per round (`repair::Asked`): `receive::Gaps`.
    gaps: Mutex<tern_replication::receive::Gaps>,
    /// What this node last sent each peer, and heard from it, of each channel's cursor
    /// (`heads::Quiet`: `Heads` only where the two disagree). Taken under `out`, never
    /// the other way round.
    quiet: Mutex<heads::Quiet>,
    /// Wakes the tick (asleep until its next round while nothing waits) when something
    /// starts waiting on it: see [`TICK`].
    tick_wake: Arc<Notify>,
}

/// The replicator's tick: while something waits on it (a publish for its replicas, a
/// channel state, a history page, a handoff pass) it runs every `TICK`; while nothing
/// does, it sleeps to the tick of the next `Heads` round (or interest refresh), on the
/// same grid, and whatever starts waiting wakes it (`tick_wake`).
const TICK: Duration = Duration::from_millis(250);

/// The first tick after `due` on the grid that starts at `grid` (one every [`TICK`]).
fn next_tick(grid: Instant, due: Instant) -> Instant {
    let tick = TICK.as_nanos();
    let ticks = due.saturating_duration_since(grid).as_nanos() / tick + 1;
    grid + Duration::from_nanos((ticks * tick) as u64)
}

struct Running {
    endpoint: Arc<LinkEndpoint>,
    hub: Weak<Hub>,
    barrier: Barrier,
}

#[derive(Default)]
struct Out {
    peers: HashMap<String, PeerOut>,
    /// Publishes waiting for `ack_replicas`, in call order.
    waiters: Waiters<ReplicaCallback>,
    /// Numbers each `PeerOut` (a peer that leaves and comes back gets a new one).
    epochs: u64,
    /// Same-region peers' interest.
    interest: Interest,
    /// Per channel, where its latest events went (at most [`LAST_TARGETS_MAX`]
    /// channels; past it the map is cleared).
    last: HashMap<ChannelKey, LastSent>,
}

impl Out {
    /// The channel's entry in [`Out::last`], made if missing (the map is cleared first
    /// when it is full).
    fn last_mut(&mut self, key: &ChannelKey) -> &mut LastSent {
        if !self.last.contains_key(key) {
            if self.last.len() >= LAST_TARGETS_MAX {
                self.last.clear();
            }
            // The key is cloned only for a channel not in the map yet.
            self.last.insert(key.clone(), LastSent::default());
        }
        self.last.get_mut(key).expect("inserted above")
    }
}

/// The (link epoch, position) on each link that carried a channel's latest events.
#[derive(Default)]
struct LastSent {
    /// This node's own latest event: what a publish's ACK waits for (empty: it went
    /// nowhere). `None`: none since the channel was last forgotten.
    own: Option<Arc<[(u64, u64)]>>,
    /// The latest event this node sent, its own or relayed: while unacknowledged the
    /// channel keeps its log (`Journal::may_drop`). A forgotten channel may be dropped.
    any: Option<Arc<[(u64, u64)]>>,
}

struct PeerOut {
    spec: PeerSpec,
    shared: Arc<PeerShared>,
    /// This link's positions (handed out, acked, dropped).
    link: OutLink,
    task: tokio::task::AbortHandle,
}

impl PeerOut {
    fn node(&self) -> Node<'_> {
        Node {
            id: &self.spec.node_id,
            region: &self.spec.region,
            origin: self.spec.origin,
        }
    }
}

struct PeerShared {
    queue: Mutex<PeerQueue>,
    /// The replicator's `base`: queued times in the buffers are since then.
    base: Instant,
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
    events: SendBuffer<FrameV1>,
    control: VecDeque<(FrameV1, Now)>,
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
            base: Instant::now(),
            out: Mutex::new(Out::default()),
            recv: Mutex::new(HashMap::new()),
            running: OnceLock::new(),
            mine: Mutex::new(HashSet::new()),
            warming: Mutex::new(Warm::default()),
            history: OnceLock::new(),
            backfills: Mutex::new(Backfills::default()),
            backfill_answers: std::sync::atomic::AtomicUsize::new(0),
            heads_skip: std::sync::atomic::AtomicUsize::new(0),
            handoff: Mutex::new(Handoff::default()),
            gaps: Mutex::default(),
            quiet: Mutex::default(),
            tick_wake: Arc::new(Notify::new()),
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
        let wake = self.tick_wake.clone();
        tokio::spawn(async move {
            let grid = Instant::now();
            let mut heads_at = grid;
            let mut interest_at = grid;
            let mut busy = true;
            loop {
                let due = if busy {
                    Instant::now()
                } else {
                    (heads_at + heads::HEADS_EVERY).min(interest_at + routing::INTEREST_REFRESH)
                };
                let next = next_tick(grid, due);
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = wake.notified(), if !busy => {}
                }
                let Some(me) = weak.upgrade() else { return };
                me.expire_waiters();
                me.expire_warming();
                me.handoff_step();
                if heads_at.elapsed() >= heads::HEADS_EVERY {
                    heads_at = Instant::now();
                    me.send_heads();
                    me.skip_dead_gaps();
                }
                if interest_at.elapsed() >= routing::INTEREST_REFRESH {
                    interest_at = Instant::now();
                    me.refresh_interest();
                }
                busy = me.waited_on();
            }
        });
    }

    /// Whether anything waits on the tick (see [`TICK`]).
    fn waited_on(&self) -> bool {
        !lock(&self.out).waiters.is_empty()
            || !lock(&self.warming).is_empty()
            || !lock(&self.backfills).is_empty()
            || lock(&self.handoff).running()
    }

    /// Makes the peer set equal to `peers` (this node excluded): links open to new peers,
    /// close to departed ones (and a departed peer no longer holds up ACKs).
    pub fn set_peers(self: &Arc<Self>, peers: &[PeerSpec]) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut out = lock(&self.out);
        let before = self.members(&out);
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
                for chunk in self.interest_list().chunks(routing::INTEREST_PER_FRAME) {
                    let frame = FrameV1::Interest {
                        channels: chunk.to_vec(),
                        on: true,
                    };
                    queue.control.push_back((frame, self.now()));
                }
            }
            let shared = Arc::new(PeerShared {
                base: self.base,
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
                    link: OutLink::new(epoch),
                    task,
                },
            );
        }
        let after = self.members(&out);
        let done = self.drain_waiters(&mut out);
        drop(out);
        run_all(done);
        lock(&self.gaps).stalls.on_members(&before, &after);
        lock(&self.handoff).on_members(&before, &after, self.now());
        self.tick_wake.notify_one();
    }

    /// Test hook: cut (or restore) this node's links to `peer` in both directions, as a
    /// network partition would. Frames wait in the resend buffer meanwhile.
    pub fn set_partitioned(&self, peer: &str, partitioned: bool) {
        if let Some(p) = lock(&self.out).peers.get(peer) {
            p.shared.partitioned.store(partitioned, Ordering::SeqCst);
            p.shared.notify.notify_one();
        }
    }

    /// Test hook: sends `Heads` now, as the tick does each `HEADS_EVERY`, so a test can
    /// race it against publishes (it reads every channel's cursor).
    pub fn send_heads_now(&self) {
        self.send_heads();
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
            Some(key) => match out.last.get(key).and_then(|l| l.own.as_ref()) {
                Some(targets) => targets.to_vec(),
                // Forgotten (too many channels) or never published here: every link's
                // latest position covers it.
                None => out
                    .peers
                    .values()
                    .filter(|p| p.link.seq > p.link.counts_after)
                    .map(|p| (p.link.epoch, p.link.seq))
                    .collect(),
            },
        };
        let now = self.now();
        out.waiters.push(targets, now, then);
        let done = self.drain_waiters(&mut out);
        let waiting = !out.waiters.is_empty();
        drop(out);
        run_all(done);
        if waiting {
            self.tick_wake.notify_one();
        }
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
        let home = self.home_here(&out, key)?;
        (home != self.config.node_id).then(|| home.to_string())
    }

    /// The channel's home in `region` (this node included), if that region has a live
    /// node: where a dead origin's webhooks are shadowed (`tern_functions::outbox`).
    pub fn home_in(&self, key: &ChannelKey, region: &str) -> Option<String> {
        let out = lock(&self.out);
        let home = routing::home_in(key, self.nodes(&out), region).map(str::to_string);
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
        let known = self.interested(&out, key).contains(&peer);
        known
    }

    /// Event frames written to `peer`'s link so far (0 for an unknown peer).
    pub fn events_sent_to(&self, peer: &str) -> u64 {
        lock(&self.out)
            .peers
            .get(peer)
            .map_or(0, |p| p.shared.events_sent.load(Ordering::Relaxed))
    }

    /// Time since this replicator's base: the rules' `now`.
    fn now(&self) -> Now {
        self.base.elapsed()
    }

    /// The rules' view of this node now: its hub and both clocks
    /// (`tern_replication::receive::At`).
    fn at<'h>(&self, hub: &'h Hub) -> tern_replication::receive::At<'h> {
        tern_replication::receive::At {
            hub,
            now: self.now(),
            now_ms: crate::now_ms(),
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
            let recipients = self.recipients(&out, key, event.origin.0);
            if recipients.is_empty() {
                if own {
                    out.last_mut(key).own = Some(Arc::from([]));
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
        let now = self.now();
        let mut out = lock(&self.out);
        let mut targets = Vec::with_capacity(recipients.len());
        for id in &recipients {
            let Some(peer) = out.peers.get_mut(id) else {
                continue;
            };
            let seq = peer.link.hand_out();
            targets.push((peer.link.epoch, seq));
            let mut frame = frame.clone();
            frame.link_seq = seq;
            let mut q = lock(&peer.shared.queue);
            if let Some(dropped) = q.events.push(seq, FrameV1::Event(frame), now) {
                peer.link.counts_after = peer.link.counts_after.max(dropped);
                metrics::counter!("tern_replication_buffer_drops_total").increment(1);
            }
            peer.shared.unacked.set(q.events.len() as f64);
            drop(q);
            peer.shared.notify.notify_one();
        }
        let targets: Arc<[(u64, u64)]> = targets.into();
        let last = out.last_mut(key);
        if own {
            last.own = Some(targets.clone());
        }
        last.any = Some(targets);
    }

    fn may_drop(&self, key: &ChannelKey) -> bool {
        let out = lock(&self.out);
        let Some(sent) = out.last.get(key).and_then(|l| l.any.as_ref()) else {
            return true;
        };
        let link = |epoch: u64| {
            out.peers
                .values()
                .find(|p| p.link.epoch == epoch)
                .map(|p| p.link)
        };
        tern_replication::links::settled(sent, link)
    }
}

#[cfg(test)]
mod tick_tests {
    use super::*;

    /// The tick stays on its grid whatever it waited for: the next `Heads` round due
    /// 1 s after one that ran just past a tick runs on the fifth tick after it, as with
    /// a tick every 250 ms.
    #[test]
    fn the_tick_stays_on_its_grid() {
        let grid = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        assert_eq!(next_tick(grid, grid), grid + ms(250));
        assert_eq!(next_tick(grid, grid + ms(1)), grid + ms(250));
        assert_eq!(next_tick(grid, grid + ms(250)), grid + ms(500));
        let heads_at = grid + ms(500) + Duration::from_micros(300);
        assert_eq!(
            next_tick(grid, heads_at + heads::HEADS_EVERY),
            grid + ms(1_750)
        );
    }
}
