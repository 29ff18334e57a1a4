//! Deterministic simulation of several Tern nodes over `tern-core`: one seeded event
//! queue, virtual time, and a network that delays, drops, duplicates, reorders and
//! partitions, with nodes that crash and restart. Test-only; never part of the binary.
//!
//! # Layout
//! - [`Rng`]: a small seeded generator (splitmix64), so a seed replays exactly.
//! - [`Sim`]: the nodes (one `Hub` and one recording subscriber per incarnation), the
//!   in-flight queue, the faults, and the invariant checks.
//!
//! # The rules are the shipped ones
//! Routing (homes, recipients, interest with its TTL), repair answers, `Sync` answers
//! and `Heads` anti-entropy are `tern-replication`'s functions, the ones `tern-cluster`'s
//! replicator drives: this crate has no copy of them, only the network, the clock, the
//! faults and the checks around them. A bug in a rule fails a seed here.
//!
//! # What it models of the cluster (`tern-cluster`'s replicator and membership)
//! - Regions: every node has one (the caller passes them; the sweep puts 1 to 3 nodes in
//!   each of 2 or 3 regions of `regions/topology.toml`, 1 ms apart inside a region). The
//!   channel's *home* in a region is `routing::home_in` (the rendezvous hash of app,
//!   channel and node id, ties by node id; a node keeps its id `n<index>` across restarts) among the nodes the observer counts live: those up, and crashed
//!   ones whose departure it has not noticed yet (it routes to them, and what it sends
//!   is lost).
//! - Subscribers: each incarnation has one with probability 65%. A node with one tells
//!   the nodes of its region (`Interest`, repeated each anti-entropy round, forgotten
//!   7 s after it was last heard, kept per node id as the replicator does, so a peer may
//!   still route to a restarted node's new incarnation on its predecessor's interest).
//!   The home attaches its subscriber at once; any other node first sends `Interest`
//!   and asks the region's home for the channel state (`Sync`; the home counts the
//!   interest first, as it comes first on the same link) and attaches when the answer
//!   (its log per origin as a repair answer from 1, a `Skip` for what its log starts
//!   after, its presence members, then its cursor, skipped to: `Synced`) arrives, asking
//!   again each second and attaching without it after 3 s.
//! - Routing (`routing::recipients`, over the node's view): every event a hub applies is journaled; its own go to the
//!   channel's home in every region the node knows a live node of and to the nodes of its
//!   region whose interest it holds; an event of a live origin of another region applied
//!   by the home of this region goes on to the interested nodes of this region; nothing
//!   else is sent (an interested node, or a home's copy of its own region's events,
//!   passes nothing on).
//! - An event ahead of a gap asks the node it came from for the missing range; the answer
//!   is the events still in that node's log, preceded by a `Skip` for the part its cursor
//!   covers but its log lacks (events that were no-ops there): `repair::answer`.
//! - Anti-entropy (`Heads`, `heads::wanted`): a node that keeps the channel (it has a subscriber, attached
//!   or waiting for the state, or it is the home of its region in its view) compares its
//!   cursor with each reachable peer's and asks that peer for the events it lacks of
//!   origins it does not believe live (a crashed incarnation's, its own previous one's),
//!   and of the peer's own events those the peer already had in its previous heads
//!   (newer ones may still be on their way); a live third origin's events come from that
//!   origin or the home's relay. A node that does not keep the channel ignores heads.
//! - Crash: the node loses its hub; items in flight to it are lost (what it sent before
//!   is on the wire and still arrives); it sends nothing while down. Each node up at the
//!   time learns of the departure after a failure-detection delay and then calls
//!   `hub.node_departed(tag + "-")` (the dead incarnation's connection ids) and treats
//!   the origin as dead (and no longer as a possible home). A node crashes only once
//!   membership has settled: every survivor noticed the previous crash, and
//!   `Faults::settle_ms` passed since the last crash or restart (see "Known limit"
//!   below).
//! - Restart: a new incarnation with a new origin id (never the old sequence space),
//!   a new connection-id tag, an empty hub and maybe a subscriber (attached as above,
//!   through `Sync` unless it is the home); if it keeps the channel it catches up from
//!   peers' heads. Like the real membership, it does not notice departures of
//!   incarnations it did not see live, but it learns them (its own previous one
//!   included) from the departed tags members publish: a node that notices a departure
//!   reports it to every member within `GOSSIP_SPREAD_MS`, and a restarted node gets
//!   every tag reported so far (the sim keeps that list even when every reporter has
//!   crashed since; the real one lives on the members). Every node sees a restarted node
//!   at once (gossip's delay in spreading a join is not modeled).
//!
//! Links (`acked.rs`): routed events carry link positions and wait in the shipped resend
//! buffer until `Stored`; each anti-entropy round resends a stalled link (go-back-N),
//! and publishes wait for `ack_replicas` in the shipped waiters.
//!
//! Not modeled: ordered QUIC streams (the network here loses and reorders every kind of
//! message, `Hello`, `Stored`, interest, `Sync` and its answer included, and only resends,
//! repair, heads, the interest refresh and asking again bring them back), a store commit
//! before `Stored`, a subscriber's last detach (`Interest` off), history `Backfill` and the
//! history store, forwarded reads, several channels, gossip itself.
//!
//! # Known limit (crash cascades)
//! A LEAVE that was a no-op on a node is not in that node's log, and a node removes a
//! dead incarnation's members only once it noticed or was told of the departure. The
//! sweep keeps crashes `settle_ms` apart so that each departure is noticed before the
//! next crash; without that spacing (`settle_ms: 0`) a few seeds used to keep a member.
//!
//! # Invariants
//! After every step ([`Sim::check_step`]), for each subscriber *incarnation*:
//! - per origin, events arrive in strictly increasing sequence order (no duplicate
//!   event), and no MESSAGE event is skipped, except messages published before this
//!   incarnation attached (they are in the state it attached to, or a restarted node may
//!   only find a peer's trimmed log). PRESENCE events may be skipped: one that changed
//!   nothing on a node is not fanned out there, nor logged, so a repair from that node
//!   skips it;
//! - no message id arrives twice;
//! - each channel's pending (out-of-order) events and log stay within `CoreLimits`;
//! - routing never sends to a node without a subscriber that is not the home in the
//!   sender's view, except on interest the sender still holds from that node's
//!   *previous* incarnation (counted in `Stats::stale_interest`).
//!
//! After healing and draining ([`Sim::check_converged`]), over the live nodes that keep
//! the channel (those with an attached subscriber, and each region's home among the live
//! nodes):
//! - every one has exactly the same set of messages (for a subscriber: what it was
//!   delivered plus what its hub held when it attached; for a home without subscriber:
//!   its log), and that set contains every message published by a live incarnation and
//!   every message of a crashed incarnation that a still-live survivor had applied when
//!   it crashed;
//! - every one has the same presence members (clientId, connectionId, data), equal to
//!   what the clients of every live node (subscribers or not) entered and did not leave;
//!   no crashed incarnation's connection is left in it;
//! - a live node that has no subscriber, was never its region's home since it booted,
//!   and got no event on a predecessor's interest holds no event of any origin but its
//!   own: the routing sent it nothing, and it asked for nothing.
//!
//! The sweep then makes the network lossless ([`Sim::calm`]), repeats interest, has every
//! live node publish once more and checks convergence again with no anti-entropy round:
//! routing alone (origin to homes and interested nodes, home relay, gap repair) must
//! bring those messages everywhere. `Heads` alone would repair a missing relay or home,
//! so only this phase shows one.
//!
//! # What the sweep found in the real rules (fixed)
//! - `Hub::skip_remote` dropped the pending events it skipped over instead of applying
//!   them, and `Synced` skips to the home's cursor. A home's log has holes where an event
//!   was a no-op there (a LEAVE of a member `node_departed` had already removed); its
//!   `Sync` answer sends the events after the hole, which wait behind it on the syncing
//!   node, and `Synced` moved the cursor past them and discarded them (seeds 52, 366).
//!   Now the waiting events apply first.
//! - A restarted node keeping its previous incarnation's presence member (seeds 76,
//!   491): the sim did not model the departed tags the real membership gossips to
//!   members that did not see an incarnation live; now it does (see Restart).

mod acked;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, Journal, OriginId, Publisher,
    RemoteEvent, RemoteOutcome, Subscriber,
};
use tern_protocol::{flags, presence_action, Data, Message, PresenceMessage};
use tern_replication::heads::{self, PreviousHeads};
use tern_replication::repair::{self, RepairPart};
use tern_replication::routing::{self, Node as Member_};
use tern_replication::{warm, Now};

use acked::{AckState, Acked};

/// splitmix64: tiny, seedable, good enough for fault injection.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Fault rates, in percent per message, and timings.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop: u64,
    pub duplicate: u64,
    /// Extra random delay (ms) on top of the link latency: reorders messages.
    pub jitter_ms: u64,
    /// Failure detection: each survivor learns of a crash within this many ms.
    pub detect_ms: u64,
    /// A node crashes only this long after the previous crash or restart, and once every
    /// survivor has noticed the previous crash (see [`Sim::crash`]).
    pub settle_ms: i64,
}

/// Presence clients per node incarnation.
const CLIENTS: usize = 3;

/// Chance (percent) that a node incarnation has a subscriber on the channel.
const SUBSCRIBED_PERCENT: u64 = 65;

/// A node waiting for the channel's state asks again after this long
/// (`ASK_AGAIN_AFTER`) and attaches anyway after `WARM_TIMEOUT_MS` (`WARM_TIMEOUT`).
const ASK_AGAIN_MS: i64 = 1_000;
const WARM_TIMEOUT_MS: i64 = 3_000;
/// How long gossip takes to carry a member's departed-tag list to every other member.
const GOSSIP_SPREAD_MS: u64 = 300;

/// One recorded delivery: origin, sequence, and the message id (`None` for PRESENCE).
type Delivery = (OriginId, u64, Option<String>);

/// One recording subscriber: every event it got, in delivery order.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Delivery>>,
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
struct Outbox {
    events: Mutex<Vec<Arc<ChannelEvent>>>,
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
struct Client {
    client_id: String,
    connection_id: String,
    serial: u64,
    /// The member's data while entered.
    present: Option<String>,
}

/// One node; its fields after `up` describe the current (or last) incarnation.
struct Node {
    up: bool,
    incarnation: u64,
    origin: OriginId,
    /// Prefix of this incarnation's connection ids (followed by `-`).
    tag: String,
    hub: Hub,
    outbox: Arc<Outbox>,
    recorder: Arc<Recorder>,
    checked: Checked,
    /// `published.len()` when the subscriber attached.
    attached_at: usize,
    /// This incarnation has a subscriber (attached, or waiting for the channel state).
    subscribed: bool,
    /// Its subscriber is attached.
    attached: bool,
    /// Waiting for the channel's state before attaching: since when, and from which home.
    warming: Option<(i64, usize)>,
    /// Message ids the hub held when the subscriber attached (the state it attached to).
    pre_attach: HashSet<String>,
    /// Same-region peers (by node index, as the real interest is by node id) that said
    /// they have subscribers, when this node last heard it and from which incarnation.
    interest: routing::Interest,
    /// Per same-region peer: the incarnation whose interest it last heard (to tell a
    /// predecessor's interest, still held until it expires, from the current one's).
    interest_from: HashMap<usize, u64>,
    /// It has been the channel's home in its region (among the live nodes) since boot.
    was_home: bool,
    /// It got routed events only because a peer still held its previous incarnation's
    /// interest (kept for `INTEREST_TTL_MS`).
    stale_fed: bool,
    /// Crashed origins this node has not yet seen depart (it still waits on their link).
    believed_live: HashSet<OriginId>,
    clients: Vec<Client>,
}

/// What the step checks have verified so far of one subscriber incarnation.
#[derive(Default)]
struct Checked {
    upto: usize,
    last: BTreeMap<OriginId, u64>,
    ids: HashSet<String>,
}

/// Something in flight to node `to` (incarnation `to_incarnation`).
#[derive(Clone)]
enum Item {
    /// A replicated event, sent by node `from`.
    Event {
        from: usize,
        event: Arc<RemoteEvent>,
        /// Its position on the sender's link (epoch, position); `None` for a repair.
        link: Option<(u64, u64)>,
    },
    /// A link (re)starts from position `first` (see `acked.rs`).
    Hello { from: usize, epoch: u64, first: u64 },
    /// The receiver applied every position of link `epoch` up to `upto`.
    Stored { from: usize, epoch: u64, upto: u64 },
    /// A repair answer: events of `origin` up to `upto` are not in the peer's log.
    Skip { origin: OriginId, upto: u64 },
    /// Membership reports that incarnation `tag`/`origin` departed.
    Departed { tag: String, origin: OriginId },
    /// Another member's published list of departed tags (gossip) names `tag`: what a
    /// node that did not see the incarnation live (a restarted one) learns it from.
    Reported { tag: String, origin: OriginId },
    /// A same-region peer (incarnation `incarnation`) has subscribers on the channel
    /// (`Interest`, on).
    Interest { from: usize, incarnation: u64 },
    /// A node asks the region's home for the channel's state (after its interest, on the
    /// same ordered link, so the home counts the interest first).
    Sync { from: usize, incarnation: u64 },
    /// The home's answer to `Sync`, on one ordered link: per origin a `Skip` for what its
    /// log lacks and the events it has, then its presence members and its cursor.
    SyncState {
        from: usize,
        items: Vec<Item>,
        members: Vec<PresenceMessage>,
        cursor: Vec<(OriginId, u64)>,
    },
    /// The node's own timer while it waits for the channel's state: ask again, or give
    /// up and attach with what it has.
    WarmTick,
}

struct InFlight {
    to: usize,
    to_incarnation: u64,
    item: Item,
}

/// Which messages a crash must not lose: those of `origin` up to `upto`, which survivor
/// `node` (incarnation `incarnation`) had applied when `origin` crashed.
struct Held {
    node: usize,
    incarnation: u64,
    origin: OriginId,
    upto: u64,
}

/// The simulated cluster.
pub struct Sim {
    pub seed: u64,
    rng: Rng,
    now_ms: i64,
    nodes: Vec<Node>,
    /// Each node's region (index into the topology's regions).
    regions: Vec<usize>,
    /// Each node's id (`n<index>`; it keeps it on restart) and each region's name, as
    /// routing sees them.
    ids: Vec<String>,
    region_names: Vec<String>,
    /// Link latency between node pairs (ms), from the topology.
    latency_ms: Vec<Vec<i64>>,
    faults: Faults,
    limits: CoreLimits,
    queue: BTreeMap<(i64, u64), InFlight>,
    queue_counter: u64,
    partitioned: HashSet<(usize, usize)>,
    /// Every message published: (id, origin, seq).
    published: Vec<(String, OriginId, u64)>,
    /// Per origin, its events by sequence (index seq - 1): the message index into
    /// `published`, or `None` for a PRESENCE event.
    events: HashMap<OriginId, Vec<Option<usize>>>,
    /// Tags of crashed incarnations.
    dead_tags: Vec<String>,
    /// Departed incarnations some member noticed (and so publishes to the others).
    reported: Vec<(String, OriginId)>,
    held: Vec<Held>,
    key: ChannelKey,
    /// The first inconsistency noticed outside the checks, reported by the next check.
    broken: Option<String>,
    /// Repairs asked for, per (node, origin): highest sequence and when. A gap reported
    /// again while a repair is in flight does not ask again (avoids repair storms).
    requested: BTreeMap<(usize, OriginId), (u64, i64)>,
    /// Per (node, peer): the peer's own sequence in the last heads `node` got from it.
    previous_heads: HashMap<(usize, usize), PreviousHeads>,
    /// Departure notices still in flight (membership has not settled).
    departures_pending: usize,
    /// When the last crash or restart happened.
    last_churn_ms: Option<i64>,
    /// Nodes whose hub or subscriber may have changed since the last step check (the
    /// others need no new check).
    touched: BTreeSet<usize>,
    /// Per node: links, replies waiting for replicas (`acked.rs`).
    acks: Vec<AckState>,
    /// Link epochs handed out (each link gets a new one).
    epochs: u64,
    /// Messages whose publish was ACKed.
    acked: Vec<Acked>,
    /// Print every step to stderr (for replaying one seed).
    pub trace: bool,
    /// What the faults actually did (so a sweep can prove it exercised them).
    pub stats: Stats,
}

/// Fault and repair counts of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub dropped: u64,
    pub duplicated: u64,
    pub gaps: u64,
    pub duplicates_seen: u64,
    pub crashes: u64,
    pub restarts: u64,
    /// Items in flight to a node that crashed before they arrived.
    pub lost_to_crash: u64,
    pub presence_changes: u64,
    /// Members removed by `node_departed` on survivors.
    pub departed_leaves: u64,
    /// Repair answers that skipped events missing from a peer's log.
    pub skips: u64,
    /// Node incarnations that booted without a subscriber.
    pub absent_subscribers: u64,
    /// Channel states (`Sync` answers) taken in by a node waiting to attach.
    pub syncs: u64,
    /// Subscribers that attached without the state (it did not come in time).
    pub warm_timeouts: u64,
    /// Events a home passed on to its region's interested nodes.
    pub relayed: u64,
    /// Events routed to a node without subscribers that was not the home, because a
    /// peer still held its previous incarnation's interest.
    pub stale_interest: u64,
    /// Highest virtual time reached (ms).
    pub max_now_ms: i64,
    /// Publishes ACKed (`ack_replicas` met) and NACKed (timed out).
    pub acks: u64,
    pub nacks: u64,
    /// Frames sent again by the resend timer (`Hello` and events).
    pub resent: u64,
    /// Heads a node kept (`heads::shares`) and a peer would have compared.
    pub heads_unshared: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.gaps += other.gaps;
        self.duplicates_seen += other.duplicates_seen;
        self.crashes += other.crashes;
        self.restarts += other.restarts;
        self.lost_to_crash += other.lost_to_crash;
        self.presence_changes += other.presence_changes;
        self.departed_leaves += other.departed_leaves;
        self.skips += other.skips;
        self.absent_subscribers += other.absent_subscribers;
        self.syncs += other.syncs;
        self.warm_timeouts += other.warm_timeouts;
        self.relayed += other.relayed;
        self.stale_interest += other.stale_interest;
        self.max_now_ms = self.max_now_ms.max(other.max_now_ms);
        self.acks += other.acks;
        self.nacks += other.nacks;
        self.resent += other.resent;
        self.heads_unshared += other.heads_unshared;
    }
}

const ALL_MODES: u64 =
    flags::PUBLISH | flags::SUBSCRIBE | flags::PRESENCE | flags::PRESENCE_SUBSCRIBE;

/// A presence member as the convergence check compares it.
type Member = (String, String, String);

fn member(m: &PresenceMessage) -> Member {
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

impl Sim {
    /// `regions[i]`: node i's region; `latency_ms[i][j]`: one-way delay between node i
    /// and j.
    pub fn new(seed: u64, regions: Vec<usize>, latency_ms: Vec<Vec<i64>>, faults: Faults) -> Sim {
        assert_eq!(regions.len(), latency_ms.len(), "one region per node");
        let key = ChannelKey::new("sim", &format!("channel-{seed}"));
        let limits = CoreLimits::default();
        let mut rng = Rng::new(seed);
        let regions_len = regions.len();
        let ids = (0..regions.len()).map(|i| format!("n{i}")).collect();
        let region_names = (0..=regions.iter().copied().max().unwrap_or(0))
            .map(|r| format!("r{r}"))
            .collect();
        let nodes = (0..latency_ms.len())
            .map(|i| Sim::boot(&limits, i, 0, rng.chance(SUBSCRIBED_PERCENT)))
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            now_ms: 0,
            nodes,
            regions,
            ids,
            region_names,
            latency_ms,
            faults,
            limits,
            queue: BTreeMap::new(),
            queue_counter: 0,
            partitioned: HashSet::new(),
            published: Vec::new(),
            events: HashMap::new(),
            dead_tags: Vec::new(),
            reported: Vec::new(),
            held: Vec::new(),
            key,
            broken: None,
            requested: BTreeMap::new(),
            previous_heads: HashMap::new(),
            departures_pending: 0,
            last_churn_ms: None,
            touched: BTreeSet::new(),
            acks: (0..regions_len).map(|_| AckState::default()).collect(),
            epochs: 0,
            acked: Vec::new(),
            trace: false,
            stats: Stats::default(),
        };
        sim.note_homes();
        for at in 0..sim.nodes.len() {
            sim.start_subscriber(at);
        }
        sim
    }

    /// Incarnation `incarnation` of node `index`: a fresh hub, its subscriber (if it has
    /// one) not attached yet (see [`Sim::start_subscriber`]).
    fn boot(limits: &CoreLimits, index: usize, incarnation: u64, subscribed: bool) -> Node {
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
    fn start_subscriber(&mut self, at: usize) {
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
    fn attach(&mut self, at: usize) {
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

    /// Whether node `observer` counts node `node` live: it is up, or it crashed and
    /// `observer` has not noticed yet.
    fn in_view(&self, observer: usize, node: usize) -> bool {
        node == observer
            || self.nodes[node].up
            || self.nodes[observer]
                .believed_live
                .contains(&self.nodes[node].origin)
    }

    /// The nodes `observer` counts live (itself included), as routing sees them: the
    /// members its membership lists.
    fn view(&self, observer: usize) -> Vec<Member_<'_>> {
        (0..self.nodes.len())
            .filter(|&i| self.in_view(observer, i))
            .map(|i| self.member(i))
            .collect()
    }

    fn member(&self, i: usize) -> Member_<'_> {
        Member_ {
            id: &self.ids[i],
            region: &self.region_names[self.regions[i]],
            origin: self.nodes[i].origin.0,
        }
    }

    /// The channel's home in `region` as `observer` sees it (`routing::home_in` over its
    /// view). `usize::MAX` if it knows none there.
    fn home_seen(&self, observer: usize, region: usize) -> usize {
        let region = &self.region_names[region];
        routing::home_in(&self.key, self.view(observer), region).map_or(usize::MAX, node_index)
    }

    /// The channel's home in `region` among the nodes that are up.
    fn live_home(&self, region: usize) -> Option<usize> {
        let up = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .map(|i| self.member(i));
        routing::home_in(&self.key, up, &self.region_names[region]).map(node_index)
    }

    /// Nodes of `at`'s region other than itself.
    fn region_peers(&self, at: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| i != at && self.regions[i] == self.regions[at])
            .collect()
    }

    /// Whether node `at` keeps the channel (repairs it from `Heads`): it has a
    /// subscriber (attached or waiting for the state) or is the home in its region.
    fn holds(&self, at: usize) -> bool {
        self.nodes[at].subscribed || self.home_seen(at, self.regions[at]) == at
    }

    /// Who node `at` sends an event of `origin` to: `routing::recipients` over its view
    /// and the interest it holds of peers it counts live. Counts relays, and events sent
    /// on a predecessor's interest (checking that no current incarnation without a
    /// subscriber is routed to on its own interest).
    fn route(&mut self, at: usize, origin: OriginId) -> Vec<usize> {
        let now = Now::from_millis(self.now_ms as u64);
        let view = self.view(at);
        let me = self.member(at);
        let peers: Vec<Member_> = view.iter().copied().filter(|n| n.id != me.id).collect();
        let holding: Vec<&str> = self.nodes[at]
            .interest
            .interested(&self.key, now)
            .into_iter()
            .filter(|p| peers.iter().any(|n| n.id == *p))
            .collect();
        let to: Vec<usize> =
            routing::recipients(me, &peers, &self.key, origin.0, holding.iter().copied())
                .into_iter()
                .map(node_index)
                .collect();
        let interested: Vec<usize> = holding.into_iter().map(node_index).collect();
        let own = origin == self.nodes[at].origin;
        let home_here = self.home_seen(at, self.regions[at]);
        for &peer in to.iter().filter(|p| interested.contains(p)) {
            if !own {
                self.stats.relayed += 1;
            }
            let target = &self.nodes[peer];
            if target.up && !target.subscribed && peer != home_here {
                // Interest this incarnation never sent: its node's previous one's,
                // which the peer keeps until it expires.
                if self.nodes[at].interest_from.get(&peer) == Some(&target.incarnation) {
                    self.broken.get_or_insert(format!(
                        "n{at} holds interest of {}, which has no subscriber",
                        target.tag
                    ));
                }
                self.stats.stale_interest += 1;
                self.nodes[peer].stale_fed = true;
            }
        }
        to
    }

    /// Marks each live node that is now the channel's home in its region (among the live
    /// nodes). Called whenever the live set changes. A node's view holds every live
    /// node (and maybe crashed ones it has not noticed), so whoever any node takes for a
    /// home is marked here.
    fn note_homes(&mut self) {
        for at in 0..self.nodes.len() {
            if !self.nodes[at].up {
                continue;
            }
            if self.live_home(self.regions[at]) == Some(at) {
                self.nodes[at].was_home = true;
            }
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        format!(
            "TERN_SIM_SEED={} cargo test -p tern-sim --test seeds -- seed_sweep",
            self.seed
        )
    }

    fn enqueue(&mut self, at: i64, to: usize, item: Item) {
        self.queue_counter += 1;
        let to_incarnation = self.nodes[to].incarnation;
        self.queue.insert(
            (at, self.queue_counter),
            InFlight {
                to,
                to_incarnation,
                item,
            },
        );
    }

    /// Sends over the (faulty) network from `from` to `to`.
    fn send(&mut self, from: usize, to: usize, item: Item) {
        if !self.nodes[to].up {
            self.stats.lost_to_crash += 1;
            return;
        }
        if self.partitioned.contains(&(from.min(to), from.max(to)))
            || self.rng.chance(self.faults.drop)
        {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate) {
            2
        } else {
            1
        };
        self.stats.duplicated += copies - 1;
        for _ in 0..copies {
            let at = self.now_ms
                + self.latency_ms[from][to]
                + self.rng.below(self.faults.jitter_ms + 1) as i64;
            self.enqueue(at, to, item.clone());
        }
    }
}

/// The ids of the messages in the channel's log on `hub`.
fn held_ids(hub: &Hub, key: &ChannelKey) -> HashSet<String> {
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

/// The node index of a node id (`n<index>`).
fn node_index(id: &str) -> usize {
    id[1..].parse().expect("sim node ids are n<index>")
}

/// A repair answer from node `from` as items in flight.
fn repair_items(from: usize, origin: OriginId, parts: Vec<RepairPart>) -> Vec<Item> {
    parts
        .into_iter()
        .map(|part| match part {
            RepairPart::Skip(upto) => Item::Skip { origin, upto },
            RepairPart::Event(event) => Item::Event {
                from,
                event: Arc::new(RemoteEvent::from_event(&event)),
                link: None,
            },
        })
        .collect()
}

/// One line about an event, for the trace.
fn describe(origin: OriginId, seq: u64, frame: &tern_protocol::ProtocolMessage) -> String {
    let mut out = format!("{origin}/{seq}");
    for m in frame.messages.iter().flatten() {
        out.push_str(&format!(" msg {}", m.id.as_deref().unwrap_or("?")));
    }
    for p in frame.presence.iter().flatten() {
        let (client, conn, data) = member(p);
        out.push_str(&format!(" p{} {client} {conn} {data}", p.action));
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>7} {}", self.now_ms, what());
        }
    }

    /// Routes what node `at`'s hub journaled (see [`Sim::recipients`]), and notes what
    /// each of its own events is (for the checks).
    fn flush(&mut self, at: usize) {
        self.touched.insert(at);
        let events = std::mem::take(&mut *lock(&self.nodes[at].outbox.events));
        for event in events {
            let own = event.origin == self.nodes[at].origin;
            if own {
                self.note_own(at, &event);
            }
            let to = self.route(at, event.origin);
            let remote = Arc::new(RemoteEvent::from_event(&event));
            let mut targets = Vec::new();
            for &to in &to {
                targets.push(self.link_position(at, to, &remote));
            }
            if own && event.is_message() {
                self.wait_for_replicas(at, self.published.len() - 1, targets.clone());
            }
            if to.is_empty() {
                continue;
            }
            if !own {
                self.log(|| {
                    format!(
                        "n{at} relays {} to {to:?}",
                        describe(event.origin, event.seq, &event.frame)
                    )
                });
            }
            for (to, link) in to.into_iter().zip(targets) {
                let item = Item::Event {
                    from: at,
                    event: remote.clone(),
                    link: Some(link),
                };
                self.send(at, to, item);
            }
        }
    }

    /// Notes one of node `at`'s own events: a message goes into `published`, and every
    /// event into its origin's numbering.
    fn note_own(&mut self, at: usize, event: &Arc<ChannelEvent>) {
        self.log(|| {
            format!(
                "n{at} origin {}",
                describe(event.origin, event.seq, &event.frame)
            )
        });
        let kind = if event.is_message() {
            let id = event
                .frame
                .messages
                .iter()
                .flatten()
                .next()
                .and_then(|m| m.id.clone())
                .unwrap_or_default();
            self.published.push((id, event.origin, event.seq));
            Some(self.published.len() - 1)
        } else {
            None
        };
        let log = self.events.entry(event.origin).or_default();
        log.push(kind);
        if log.len() as u64 != event.seq {
            self.broken.get_or_insert(format!(
                "origin {} numbered an event {} after {}",
                event.origin,
                event.seq,
                log.len() - 1
            ));
        }
    }

    /// A client publishes one message at node `at` (if it is up); the origin routes it.
    pub fn publish(&mut self, at: usize) {
        if !self.nodes[at].up {
            return;
        }
        let name = format!("msg-{}", self.published.len());
        let node = &self.nodes[at];
        let publisher = Publisher {
            connection_id: Some(format!("{}-pub", node.tag).into()),
            frame_id: name.clone(),
        };
        let message = Message {
            name: Some(name),
            data: Some(Data::String("x".into())),
            ..Default::default()
        };
        node.hub
            .publish(&self.key, &publisher, vec![message], self.now_ms)
            .expect("publish");
        self.flush(at);
    }

    /// A random client of node `at` (if it is up) enters, updates its data, or leaves.
    pub fn presence(&mut self, at: usize) {
        if !self.nodes[at].up {
            return;
        }
        let k = self.rng.below(CLIENTS as u64) as usize;
        let leave = self.rng.chance(40);
        let data = format!("d{}", self.stats.presence_changes);
        let now_ms = self.now_ms;
        let node = &mut self.nodes[at];
        let client = &mut node.clients[k];
        let (action, data) = match client.present.take() {
            None => (presence_action::ENTER, data),
            Some(old) if leave => (presence_action::LEAVE, old),
            Some(_) => (presence_action::UPDATE, data),
        };
        if action != presence_action::LEAVE {
            client.present = Some(data.clone());
        }
        let frame_id = format!("{}:{}", client.connection_id, client.serial);
        client.serial += 1;
        let publisher = Publisher {
            connection_id: Some(client.connection_id.as_str().into()),
            frame_id: frame_id.clone(),
        };
        let change = PresenceMessage {
            id: Some(format!("{frame_id}:0")),
            action,
            client_id: Some(client.client_id.clone()),
            connection_id: Some(client.connection_id.clone()),
            data: Some(Data::String(data)),
            timestamp: Some(now_ms),
            ..Default::default()
        };
        node.hub
            .presence(&self.key, &publisher, vec![change], now_ms)
            .expect("presence");
        self.stats.presence_changes += 1;
        self.flush(at);
    }

    /// Node `at` crashes (if it is up, another node is, and membership has settled: no
    /// departure notice in flight and `settle_ms` since the last crash or restart): its
    /// hub and everything in flight to it are lost. Each survivor learns of it after a
    /// detection delay. Returns whether it crashed.
    pub fn crash(&mut self, at: usize) -> bool {
        let settled = self.departures_pending == 0
            && self
                .last_churn_ms
                .is_none_or(|when| self.now_ms - when >= self.faults.settle_ms);
        if !self.nodes[at].up || self.live_count() < 2 || !settled {
            return false;
        }
        self.last_churn_ms = Some(self.now_ms);
        let dead = self.nodes[at].origin;
        let tag = self.nodes[at].tag.clone();
        for survivor in 0..self.nodes.len() {
            if survivor == at || !self.nodes[survivor].up {
                continue;
            }
            let upto = self.nodes[survivor].hub.cursor(&self.key).get(dead);
            self.held.push(Held {
                node: survivor,
                incarnation: self.nodes[survivor].incarnation,
                origin: dead,
                upto,
            });
            self.nodes[survivor].believed_live.insert(dead);
            let at_ms = self.now_ms + 1 + self.rng.below(self.faults.detect_ms) as i64;
            let item = Item::Departed {
                tag: tag.clone(),
                origin: dead,
            };
            self.enqueue(at_ms, survivor, item);
            self.departures_pending += 1;
        }
        self.log(|| format!("n{at} crash ({tag}, origin {dead})"));
        let node = &mut self.nodes[at];
        node.up = false;
        node.hub = Hub::new(OriginId(0), CoreLimits::default());
        self.acks[at] = AckState::default();
        self.dead_tags.push(tag);
        self.requested.retain(|(node, _), _| *node != at);
        // Its links are gone: heads state starts over on new ones.
        self.previous_heads
            .retain(|(node, peer), _| *node != at && *peer != at);
        self.stats.crashes += 1;
        self.note_homes();
        true
    }

    /// Node `at` (if down) restarts as a new incarnation: new origin, new connection ids,
    /// empty hub, maybe a subscriber (attached at once if it is the home, else through
    /// `Sync`); it pulls the channel from its peers' heads if it keeps it.
    pub fn restart(&mut self, at: usize) -> bool {
        if self.nodes[at].up {
            return false;
        }
        let incarnation = self.nodes[at].incarnation + 1;
        let subscribed = self.rng.chance(SUBSCRIBED_PERCENT);
        self.nodes[at] = Sim::boot(&self.limits, at, incarnation, subscribed);
        self.stats.restarts += 1;
        self.note_homes();
        self.last_churn_ms = Some(self.now_ms);
        self.log(|| {
            format!(
                "n{at} restart as {} origin {}",
                self.nodes[at].tag, self.nodes[at].origin
            )
        });
        // The departed tags live members publish reach it with its first gossip rounds
        // (its own previous incarnation's included).
        for (tag, origin) in self.reported.clone() {
            let when = self.now_ms + 1 + self.rng.below(GOSSIP_SPREAD_MS) as i64;
            self.enqueue(when, at, Item::Reported { tag, origin });
        }
        self.start_subscriber(at);
        for peer in 0..self.nodes.len() {
            if peer != at {
                self.compare_heads(at, peer);
            }
        }
        true
    }

    /// Delivers the next in-flight item (advancing virtual time). False if none.
    pub fn deliver_next(&mut self) -> bool {
        let Some((&(at, n), _)) = self.queue.first_key_value() else {
            return false;
        };
        let flight = self.queue.remove(&(at, n)).expect("present");
        self.now_ms = self.now_ms.max(at);
        self.stats.max_now_ms = self.now_ms;
        let to = flight.to;
        if matches!(flight.item, Item::Departed { .. }) {
            self.departures_pending -= 1;
        }
        if !self.nodes[to].up || self.nodes[to].incarnation != flight.to_incarnation {
            if !matches!(flight.item, Item::WarmTick) {
                self.stats.lost_to_crash += 1;
            }
            return true;
        }
        self.take(to, flight.item);
        self.flush(to);
        true
    }

    /// Node `to` takes in one item.
    fn take(&mut self, to: usize, item: Item) {
        if self.trace {
            let what = match &item {
                Item::Hello { from, epoch, first } => {
                    format!("hello n{from} link {epoch} from {first}")
                }
                Item::Stored { from, epoch, upto } => {
                    format!("stored by n{from} link {epoch} upto {upto}")
                }
                Item::Event { from, event, .. } => {
                    format!(
                        "from n{from} {}",
                        describe(event.origin, event.seq, &event.frame)
                    )
                }
                Item::Skip { origin, upto } => format!("skip {origin} upto {upto}"),
                Item::Departed { tag, .. } => format!("departed {tag}"),
                Item::Reported { tag, .. } => format!("reported departed {tag}"),
                Item::Interest { from, incarnation } => {
                    format!("interest of n{from}i{incarnation}")
                }
                Item::Sync { from, .. } => format!("sync asked by n{from}"),
                Item::SyncState { from, cursor, .. } => {
                    format!("channel state from n{from}, cursor {cursor:?}")
                }
                Item::WarmTick => "warm timer".to_string(),
            };
            self.log(|| format!("n{to} <- {what}"));
        }
        match item {
            Item::Event { from, event, link } => {
                let in_order = self.apply(to, from, Arc::unwrap_or_clone(event));
                if let (true, Some(link)) = (in_order, link) {
                    self.applied_on_link(to, from, link);
                }
            }
            Item::Hello { from, epoch, first } => self.take_hello(to, from, epoch, first),
            Item::Stored { from, epoch, upto } => self.take_stored(to, from, epoch, upto),
            Item::Skip { origin, upto } => {
                let applied = self.nodes[to]
                    .hub
                    .skip_remote(&self.key, origin, upto, self.now_ms);
                self.log(|| format!("   skipped, {applied} applied"));
            }
            Item::Departed { tag, origin } => {
                let left = self.nodes[to]
                    .hub
                    .node_departed(&format!("{tag}-"), self.now_ms);
                self.stats.departed_leaves += left as u64;
                self.nodes[to].believed_live.remove(&origin);
                self.forget_departed(to, origin);
                // It now publishes the tag; gossip carries it to every member.
                if !self.reported.iter().any(|(t, _)| *t == tag) {
                    self.reported.push((tag.clone(), origin));
                }
                for peer in 0..self.nodes.len() {
                    if peer != to && self.nodes[peer].up {
                        let at = self.now_ms + 1 + self.rng.below(GOSSIP_SPREAD_MS) as i64;
                        let item = Item::Reported {
                            tag: tag.clone(),
                            origin,
                        };
                        self.enqueue(at, peer, item);
                    }
                }
            }
            Item::Reported { tag, origin } => {
                if tag != self.nodes[to].tag {
                    let left = self.nodes[to]
                        .hub
                        .node_departed(&format!("{tag}-"), self.now_ms);
                    self.stats.departed_leaves += left as u64;
                    self.nodes[to].believed_live.remove(&origin);
                }
            }
            Item::Interest { from, incarnation } => self.take_interest(to, from, incarnation),
            Item::Sync { from, incarnation } => {
                // The interest that precedes `Sync` on the same link.
                self.take_interest(to, from, incarnation);
                self.sync_from(to, from);
            }
            Item::SyncState {
                from,
                items,
                members,
                cursor,
            } => {
                for item in items {
                    self.take(to, item);
                }
                let now_ms = self.now_ms;
                let hub = &self.nodes[to].hub;
                hub.seed_members(&self.key, members, now_ms);
                let pending = hub.pending_len(&self.key);
                for (origin, upto) in cursor {
                    hub.skip_remote(&self.key, origin, upto, now_ms);
                }
                let after = hub.pending_len(&self.key);
                self.log(|| format!("   synced: pending {pending} -> {after}"));
                if self.nodes[to].warming.is_some() {
                    self.stats.syncs += 1;
                    self.log(|| format!("n{to} took the channel state from n{from}"));
                    self.attach(to);
                }
            }
            Item::WarmTick => {
                let Some((since, home)) = self.nodes[to].warming else {
                    return;
                };
                if self.now_ms - since >= WARM_TIMEOUT_MS {
                    self.stats.warm_timeouts += 1;
                    self.attach(to);
                } else {
                    let incarnation = self.nodes[to].incarnation;
                    self.send(
                        to,
                        home,
                        Item::Sync {
                            from: to,
                            incarnation,
                        },
                    );
                    self.enqueue(self.now_ms + ASK_AGAIN_MS, to, Item::WarmTick);
                }
            }
        }
    }

    /// A same-region peer's interest reaches `to` (`routing::Interest::on_frame`).
    fn take_interest(&mut self, to: usize, from: usize, incarnation: u64) {
        if self.regions[from] != self.regions[to] {
            return;
        }
        let now = Now::from_millis(self.now_ms as u64);
        let node = &mut self.nodes[to];
        let key = self.key.clone();
        node.interest.on_frame(&self.ids[from], [key], true, now);
        node.interest_from.insert(from, incarnation);
    }

    /// Node `home` answers node `node`'s `Sync` (`warm::answer_sync`): per origin its
    /// repair answer from 1, then its presence members and cursor, as one item (the
    /// real frames follow each other on one ordered link).
    fn sync_from(&mut self, home: usize, node: usize) {
        let answer = warm::answer_sync(&self.nodes[home].hub, &self.key);
        let items = answer
            .repairs
            .into_iter()
            .flat_map(|(origin, parts)| repair_items(home, origin, parts))
            .collect();
        let item = Item::SyncState {
            from: home,
            items,
            members: answer.members,
            cursor: answer.cursor,
        };
        self.send(home, node, item);
    }

    /// Applies a replicated event at `to`; a gap asks the node it came from.
    /// Returns whether it was not a gap (applied or a duplicate: its link position counts).
    fn apply(&mut self, to: usize, from: usize, event: RemoteEvent) -> bool {
        let outcome = self.nodes[to]
            .hub
            .apply_remote(&self.key, event, self.now_ms)
            .expect("apply");
        self.log(|| format!("   {outcome:?}"));
        match outcome {
            RemoteOutcome::Duplicate => self.stats.duplicates_seen += 1,
            RemoteOutcome::Gap { origin, missing } => {
                self.stats.gaps += 1;
                let round_trip = 2 * self.latency_ms[to].iter().max().copied().unwrap_or(0)
                    + self.faults.jitter_ms as i64;
                let asked = self.requested.get(&(to, origin)).copied();
                if asked
                    .is_none_or(|(upto, when)| upto < missing.1 || self.now_ms - when > round_trip)
                {
                    self.requested
                        .insert((to, origin), (missing.1, self.now_ms));
                    self.repair_from(from, to, origin, missing);
                }
                return false;
            }
            RemoteOutcome::Applied(_) => {}
        }
        true
    }

    /// `peer` answers `node`'s repair request for `origin`'s `from..=to`
    /// (`repair::answer`).
    fn repair_from(&mut self, peer: usize, node: usize, origin: OriginId, (from, to): (u64, u64)) {
        if !self.nodes[peer].up {
            return;
        }
        let parts = repair::answer(&self.nodes[peer].hub, &self.key, origin, from, to);
        self.stats.skips += parts
            .iter()
            .filter(|p| matches!(p, RepairPart::Skip(_)))
            .count() as u64;
        for item in repair_items(peer, origin, parts) {
            self.send(peer, node, item);
        }
    }

    /// `peer`'s heads reach `node` if `peer` sends them there (`heads::shares`, in
    /// `peer`'s view), and `node` asks `peer` for what `heads::wanted` says it lacks. A
    /// node that does not keep the channel ignores heads.
    fn compare_heads(&mut self, node: usize, peer: usize) {
        if !self.nodes[node].up
            || !self.nodes[peer].up
            || !self.holds(node)
            || self.partitioned.contains(&(node.min(peer), node.max(peer)))
        {
            return;
        }
        let now = Now::from_millis(self.now_ms as u64);
        let interested = self.regions[node] == self.regions[peer]
            && self.nodes[peer]
                .interest
                .interested(&self.key, now)
                .contains(&self.ids[node].as_str());
        let homes = routing::homes(&self.key, self.view(peer));
        if !heads::shares(&homes, self.member(node), interested) {
            self.stats.heads_unshared += 1;
            return;
        }
        let mine = self.nodes[node].hub.cursor(&self.key);
        let theirs: Vec<(u64, u64)> = self.nodes[peer]
            .hub
            .cursor(&self.key)
            .origins()
            .map(|(o, seq)| (o.0, seq))
            .collect();
        let live: Vec<u64> = self.view(node).iter().map(|n| n.origin).collect();
        let live = |origin: u64| live.contains(&origin);
        let asker = heads::Asker {
            own: self.nodes[node].origin.0,
            sender: self.nodes[peer].origin.0,
            live: &live,
        };
        let previous = self.previous_heads.entry((node, peer)).or_default();
        let asks = heads::wanted(&asker, previous, &self.key, &mine, &theirs);
        for (origin, from, to) in asks {
            self.repair_from(peer, node, OriginId(origin), (from, to));
        }
    }

    /// A round of anti-entropy: every node with a subscriber repeats its interest to its
    /// region's peers, and every node gets every reachable peer's heads.
    pub fn anti_entropy(&mut self) {
        self.refresh_interest();
        self.resend_and_expire();
        for node in 0..self.nodes.len() {
            for peer in 0..self.nodes.len() {
                if peer != node {
                    self.compare_heads(node, peer);
                }
            }
        }
    }

    /// Every node with a subscriber repeats its interest to its region's peers (the
    /// replicator does every 2 s).
    pub fn refresh_interest(&mut self) {
        for node in 0..self.nodes.len() {
            if self.nodes[node].up && self.nodes[node].subscribed {
                let incarnation = self.nodes[node].incarnation;
                for peer in self.region_peers(node) {
                    let item = Item::Interest {
                        from: node,
                        incarnation,
                    };
                    self.send(node, peer, item);
                }
            }
        }
    }

    /// From now on the network neither drops nor duplicates (it still reorders).
    pub fn calm(&mut self) {
        self.faults.drop = 0;
        self.faults.duplicate = 0;
    }

    pub fn partition(&mut self, a: usize, b: usize) {
        self.partitioned.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self) {
        self.partitioned.clear();
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].up
    }

    pub fn live_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.up).count()
    }

    /// Per-step invariants (see the crate docs): per-origin order with no message
    /// skipped and no duplicate for each live subscriber incarnation; pending and log
    /// within their bounds.
    pub fn check_step(&mut self) -> Result<(), String> {
        if let Some(err) = self.broken.take() {
            return Err(err);
        }
        self.check_ack_bounds()?;
        let Sim {
            nodes,
            events,
            published,
            key,
            limits,
            touched,
            ..
        } = self;
        for i in std::mem::take(touched) {
            let node = &mut nodes[i];
            if !node.up {
                continue;
            }
            let who = format!("node {i} ({})", node.tag);
            let got = lock(&node.recorder.got);
            let checked = &mut node.checked;
            for (origin, seq, id) in &got[checked.upto..] {
                let last = checked.last.get(origin).copied().unwrap_or(0);
                if *seq <= last {
                    return Err(format!("{who}: origin {origin} seq {seq} after {last}"));
                }
                let kinds = events.get(origin);
                for skipped in last + 1..*seq {
                    match kinds.and_then(|k| k.get(skipped as usize - 1)) {
                        Some(None) => {}
                        Some(Some(index)) if *index < node.attached_at => {}
                        Some(Some(index)) => {
                            return Err(format!(
                                "{who}: message {} (origin {origin} seq {skipped}) skipped",
                                published[*index].0
                            ))
                        }
                        None => {
                            return Err(format!("{who}: origin {origin} seq {skipped} unknown"))
                        }
                    }
                }
                checked.last.insert(*origin, *seq);
                if let Some(id) = id {
                    if !checked.ids.insert(id.clone()) {
                        return Err(format!("{who}: duplicate message {id}"));
                    }
                }
            }
            checked.upto = got.len();
            let pending = node.hub.pending_len(key);
            if pending > limits.pending_max {
                return Err(format!("{who}: {pending} pending events, over the bound"));
            }
            let log = node.hub.log_len(key);
            if log > limits.log.events_max {
                return Err(format!("{who}: {log} events in the log, over the bound"));
            }
        }
        Ok(())
    }

    /// After healing and draining (see the crate docs): the live nodes that keep the
    /// channel (an attached subscriber, or the home of their region) agree on the
    /// messages and on presence, none lost what it must not, and a node that neither
    /// has a subscriber nor was ever a home got nothing of the channel.
    pub fn check_converged(&self) -> Result<(), String> {
        let homes: HashSet<usize> = (0..self.nodes.len())
            .filter_map(|at| self.live_home(self.regions[at]))
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.up || node.subscribed || node.was_home || node.stale_fed {
                continue;
            }
            let cursor = node.hub.cursor(&self.key);
            let foreign = cursor
                .origins()
                .find(|&(o, seq)| o != node.origin && seq > 0);
            if let Some((origin, seq)) = foreign {
                return Err(format!(
                    "node {i} ({}) has no subscriber and was never the home, yet holds \
                     origin {origin}'s events up to {seq}",
                    node.tag
                ));
            }
        }
        let live: Vec<(usize, &Node)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.up && (n.attached || homes.contains(i)))
            .collect();
        let sets: Vec<HashSet<String>> = live
            .iter()
            .map(|(_, n)| {
                if n.attached {
                    lock(&n.recorder.got)
                        .iter()
                        .filter_map(|(_, _, id)| id.clone())
                        .chain(n.pre_attach.iter().cloned())
                        .collect()
                } else {
                    held_ids(&n.hub, &self.key)
                }
            })
            .collect();
        let union: HashSet<&String> = sets.iter().flatten().collect();
        self.check_acked(&union)?;
        for (id, origin, seq) in &self.published {
            if self.nodes.iter().any(|n| n.up && n.origin == *origin) && !union.contains(id) {
                return Err(format!(
                    "message {id} of live origin {origin} (seq {seq}) lost"
                ));
            }
        }
        for held in &self.held {
            let holder = &self.nodes[held.node];
            if !holder.up || holder.incarnation != held.incarnation {
                continue;
            }
            let kinds = self.events.get(&held.origin).into_iter().flatten();
            for index in kinds.take(held.upto as usize).flatten() {
                let id = &self.published[*index].0;
                if !union.contains(id) {
                    return Err(format!(
                        "message {id} of crashed origin {} lost, though node {} had it",
                        held.origin, held.node
                    ));
                }
            }
        }
        for ((i, node), set) in live.iter().zip(&sets) {
            if set.len() != union.len() {
                let mut missing: Vec<&&String> =
                    union.iter().filter(|id| !set.contains(**id)).collect();
                missing.sort();
                return Err(format!(
                    "node {i} ({}): has {} of {} messages, lacks {missing:?}",
                    node.tag,
                    set.len(),
                    union.len()
                ));
            }
        }
        let expected: BTreeSet<Member> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .flat_map(|n| &n.clients)
            .filter_map(|c| {
                let data = c.present.clone()?;
                Some((c.client_id.clone(), c.connection_id.clone(), data))
            })
            .collect();
        for (i, node) in &live {
            let members: BTreeSet<Member> =
                node.hub.members(&self.key).iter().map(member).collect();
            if let Some(ghost) = members.iter().find(|m| {
                self.dead_tags
                    .iter()
                    .any(|t| m.1.starts_with(&format!("{t}-")))
            }) {
                return Err(format!(
                    "node {i} ({}): crashed incarnation's member {ghost:?} remains",
                    node.tag
                ));
            }
            if members != expected {
                return Err(format!(
                    "node {i} ({}): presence {members:?}, expected {expected:?}",
                    node.tag
                ));
            }
        }
        Ok(())
    }
}
