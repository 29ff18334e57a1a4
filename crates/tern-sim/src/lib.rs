//! Deterministic simulation of several Tern nodes over `tern-core`: one seeded event
//! queue, virtual time, and a network that delays, drops, duplicates, reorders and
//! partitions, with nodes that crash and restart. Test-only; never part of the binary.
//!
//! # Layout
//! - [`Rng`]: a small seeded generator (splitmix64), so a seed replays exactly.
//! - [`Sim`]: the nodes (one `Hub` and one recording subscriber per incarnation), the
//!   in-flight queue, the faults, and the invariant checks.
//!
//! # What it models of the cluster (`tern-cluster`'s replicator and membership)
//! - Every event a hub journals under its own origin (publishes, presence changes, the
//!   LEAVEs of `node_departed`) goes to every peer, as the replicator's journal does.
//! - An event ahead of a gap asks the node it came from for the missing range; the answer
//!   is the events still in that node's log, preceded by a `Skip` for the part its cursor
//!   covers but its log lacks (events that were no-ops there), as `answer_repair` does.
//! - Anti-entropy (`Heads`): a node compares its cursor with each reachable peer's and
//!   asks that peer for the events it lacks of origins it does not believe live (a
//!   crashed incarnation's, its own previous one's), and of the peer's own events those
//!   the peer already had in its previous heads; a live third origin's events come from
//!   that origin.
//! - Crash: the node loses its hub; items in flight to it are lost (what it sent before
//!   is on the wire and still arrives); it sends nothing while down. Each node up at the
//!   time learns of the departure after a failure-detection delay and then calls
//!   `hub.node_departed(tag + "-")` (the dead incarnation's connection ids) and treats
//!   the origin as dead. A node crashes only once membership has settled: every survivor
//!   noticed the previous crash, and `Faults::settle_ms` passed since the last crash or
//!   restart (see "Known limit" below).
//! - Restart: a new incarnation with a new origin id (never the old sequence space),
//!   a new connection-id tag, an empty hub and a fresh subscriber attached at once; it
//!   catches the channel up from peers' logs by anti-entropy. Like the real membership,
//!   it never reports departures of incarnations it did not see live (its own previous
//!   one included).
//!
//! Not modeled: QUIC links and their resend buffers (the network here loses messages and
//! only repair brings them back), gossip itself, interest routing, the history store.
//!
//! # Known limit (crash cascades)
//! Only nodes that saw an incarnation live remove its presence members, and a LEAVE that
//! was a no-op on a node is not in that node's log. So when every node holding the LEAVE
//! for a dead incarnation's member crashes before a restarted node has caught up, the
//! restarted node can keep that member (with `settle_ms: 0`, about 2% of seeds). The
//! sweep keeps crashes `settle_ms` apart; fixing it needs the cluster to tell a joining
//! node which incarnations departed.
//!
//! # Invariants
//! After every step ([`Sim::check_step`]), for each subscriber *incarnation*:
//! - per origin, events arrive in strictly increasing sequence order (no duplicate
//!   event), and no MESSAGE event is skipped, except messages published before this
//!   incarnation attached (a restarted node may only find a peer's trimmed log). PRESENCE
//!   events may be skipped: one that changed nothing on a node is not fanned out there,
//!   nor logged, so a repair from that node skips it;
//! - no message id arrives twice;
//! - each channel's pending (out-of-order) events and log stay within `CoreLimits`.
//!
//! After healing and draining ([`Sim::check_converged`]), over the live nodes:
//! - every live node's subscriber has exactly the same set of messages, and that set
//!   contains every message published by a live incarnation and every message of a
//!   crashed incarnation that a still-live survivor had applied when it crashed (so a
//!   restarted subscriber has every message published after it re-attached, except those
//!   of an origin that died before any live node got them);
//! - every live node has the same presence members (clientId, connectionId, data), equal
//!   to what the live clients entered and did not leave; no crashed incarnation's
//!   connection is left in it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, Journal, OriginId, Publisher,
    RemoteEvent, RemoteOutcome, Subscriber,
};
use tern_protocol::{flags, presence_action, Data, Message, PresenceMessage};

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

/// The hub's journal: the events this incarnation originates, to send to every peer
/// (what the replicator does with its journal).
struct Outbox {
    origin: OriginId,
    events: Mutex<Vec<Arc<ChannelEvent>>>,
}

impl Journal for Outbox {
    fn record(&self, _key: &ChannelKey, event: &Arc<ChannelEvent>) {
        if event.origin == self.origin {
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(event.clone());
        }
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
    },
    /// A repair answer: events of `origin` up to `upto` are not in the peer's log.
    Skip { origin: OriginId, upto: u64 },
    /// Membership reports that incarnation `tag`/`origin` departed.
    Departed { tag: String, origin: OriginId },
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
    held: Vec<Held>,
    key: ChannelKey,
    /// The first inconsistency noticed outside the checks, reported by the next check.
    broken: Option<String>,
    /// Repairs asked for, per (node, origin): highest sequence and when. A gap reported
    /// again while a repair is in flight does not ask again (avoids repair storms).
    requested: BTreeMap<(usize, OriginId), (u64, i64)>,
    /// Per (node, peer): the peer's own sequence in the last heads `node` got from it.
    previous_heads: HashMap<(usize, usize), u64>,
    /// Departure notices still in flight (membership has not settled).
    departures_pending: usize,
    /// When the last crash or restart happened.
    last_churn_ms: Option<i64>,
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
    /// Highest virtual time reached (ms).
    pub max_now_ms: i64,
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
        self.max_now_ms = self.max_now_ms.max(other.max_now_ms);
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
    /// `latency_ms[i][j]`: one-way delay between node i and j.
    pub fn new(seed: u64, latency_ms: Vec<Vec<i64>>, faults: Faults) -> Sim {
        let key = ChannelKey::new("sim", "channel");
        let limits = CoreLimits::default();
        let nodes = (0..latency_ms.len())
            .map(|i| Sim::boot(&key, &limits, i, 0, 0, 0))
            .collect();
        Sim {
            seed,
            rng: Rng::new(seed),
            now_ms: 0,
            nodes,
            latency_ms,
            faults,
            limits,
            queue: BTreeMap::new(),
            queue_counter: 0,
            partitioned: HashSet::new(),
            published: Vec::new(),
            events: HashMap::new(),
            dead_tags: Vec::new(),
            held: Vec::new(),
            key,
            broken: None,
            requested: BTreeMap::new(),
            previous_heads: HashMap::new(),
            departures_pending: 0,
            last_churn_ms: None,
            trace: false,
            stats: Stats::default(),
        }
    }

    /// Incarnation `incarnation` of node `index`: a fresh hub, its subscriber attached.
    fn boot(
        key: &ChannelKey,
        limits: &CoreLimits,
        index: usize,
        incarnation: u64,
        attached_at: usize,
        now_ms: i64,
    ) -> Node {
        // Node id and boot epoch, as the server derives it: never reused.
        let origin = OriginId(((index as u64 + 1) << 32) | incarnation);
        let tag = format!("n{index}i{incarnation}");
        let outbox = Arc::new(Outbox {
            origin,
            events: Mutex::new(Vec::new()),
        });
        let hub = Hub::with_journal(origin, limits.clone(), Some(outbox.clone()));
        let recorder = Arc::new(Recorder::default());
        let options = AttachOptions {
            modes: ALL_MODES,
            echo: true,
            resume_from: None,
            rewind: None,
        };
        hub.attach(
            key,
            format!("{tag}-sub").into(),
            options,
            recorder.clone(),
            |_| {},
            now_ms,
        )
        .expect("attach");
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
            attached_at,
            believed_live: HashSet::new(),
            clients,
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

    /// Sends what node `at` journaled under its own origin to every peer, and notes what
    /// each of those events is (for the checks).
    fn flush(&mut self, at: usize) {
        let events = std::mem::take(&mut *lock(&self.nodes[at].outbox.events));
        for event in events {
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
            let remote = Arc::new(RemoteEvent::from_event(&event));
            for to in 0..self.nodes.len() {
                if to != at {
                    let item = Item::Event {
                        from: at,
                        event: remote.clone(),
                    };
                    self.send(at, to, item);
                }
            }
        }
    }

    /// A client publishes one message at node `at` (if it is up); the origin sends it to
    /// every peer.
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
        self.dead_tags.push(tag);
        self.requested.retain(|(node, _), _| *node != at);
        // Its links are gone: heads state starts over on new ones.
        self.previous_heads
            .retain(|(node, peer), _| *node != at && *peer != at);
        self.stats.crashes += 1;
        true
    }

    /// Node `at` (if down) restarts as a new incarnation: new origin, new connection ids,
    /// empty hub, its subscriber attached afresh; it pulls the channel from its peers.
    pub fn restart(&mut self, at: usize) -> bool {
        if self.nodes[at].up {
            return false;
        }
        let incarnation = self.nodes[at].incarnation + 1;
        self.nodes[at] = Sim::boot(
            &self.key,
            &self.limits,
            at,
            incarnation,
            self.published.len(),
            self.now_ms,
        );
        self.stats.restarts += 1;
        self.last_churn_ms = Some(self.now_ms);
        self.log(|| {
            format!(
                "n{at} restart as {} origin {}",
                self.nodes[at].tag, self.nodes[at].origin
            )
        });
        for peer in 0..self.nodes.len() {
            if peer != at {
                self.heads(at, peer);
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
            self.stats.lost_to_crash += 1;
            return true;
        }
        if self.trace {
            let what = match &flight.item {
                Item::Event { from, event } => {
                    format!(
                        "from n{from} {}",
                        describe(event.origin, event.seq, &event.frame)
                    )
                }
                Item::Skip { origin, upto } => format!("skip {origin} upto {upto}"),
                Item::Departed { tag, .. } => format!("departed {tag}"),
            };
            self.log(|| format!("n{to} <- {what}"));
        }
        match flight.item {
            Item::Event { from, event } => self.apply(to, from, Arc::unwrap_or_clone(event)),
            Item::Skip { origin, upto } => {
                self.nodes[to]
                    .hub
                    .skip_remote(&self.key, origin, upto, self.now_ms);
            }
            Item::Departed { tag, origin } => {
                let left = self.nodes[to]
                    .hub
                    .node_departed(&format!("{tag}-"), self.now_ms);
                self.stats.departed_leaves += left as u64;
                self.nodes[to].believed_live.remove(&origin);
            }
        }
        self.flush(to);
        true
    }

    /// Applies a replicated event at `to`; a gap asks the node it came from.
    fn apply(&mut self, to: usize, from: usize, event: RemoteEvent) {
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
                    self.answer_repair(from, to, origin, missing);
                }
            }
            RemoteOutcome::Applied(_) => {}
        }
    }

    /// `peer` answers `node`'s repair request for `origin`'s `from..=to`: the events
    /// still in its log, after a `Skip` over the part its cursor covers but its log lacks.
    fn answer_repair(
        &mut self,
        peer: usize,
        node: usize,
        origin: OriginId,
        (from, to): (u64, u64),
    ) {
        if !self.nodes[peer].up {
            return;
        }
        let hub = &self.nodes[peer].hub;
        let to = to.min(hub.cursor(&self.key).get(origin));
        if to < from {
            return;
        }
        let events = hub.events_of(&self.key, origin, from, to);
        let first = events.first().map_or(to + 1, |e| e.seq);
        if first > from {
            self.stats.skips += 1;
            let upto = first - 1;
            self.send(peer, node, Item::Skip { origin, upto });
        }
        for event in events {
            let event = Arc::new(RemoteEvent::from_event(&event));
            self.send(peer, node, Item::Event { from: peer, event });
        }
    }

    /// Whether `node` waits for `origin`'s events on that origin's own link: it is a live
    /// incarnation, or a crashed one whose departure `node` has not noticed yet.
    fn believed_live(&self, node: usize, origin: OriginId) -> bool {
        self.nodes[node].believed_live.contains(&origin)
            || self.nodes.iter().any(|n| n.up && n.origin == origin)
    }

    /// `peer`'s heads reach `node`, which asks `peer` for what it lacks of origins it
    /// does not believe live, and of `peer`'s own events those that `peer` already had
    /// in its previous heads (newer ones may still be on their way), as the replicator's
    /// `Heads` handling does.
    fn heads(&mut self, node: usize, peer: usize) {
        if !self.nodes[node].up
            || !self.nodes[peer].up
            || self.partitioned.contains(&(node.min(peer), node.max(peer)))
        {
            return;
        }
        let mine = self.nodes[node].hub.cursor(&self.key);
        let theirs: Vec<(OriginId, u64)> =
            self.nodes[peer].hub.cursor(&self.key).origins().collect();
        let (own, peer_origin) = (self.nodes[node].origin, self.nodes[peer].origin);
        for (origin, seq) in theirs {
            let have = mine.get(origin);
            let upto = if origin == peer_origin {
                let before = self.previous_heads.insert((node, peer), seq);
                before.unwrap_or(0).min(seq)
            } else if origin == own || self.believed_live(node, origin) {
                0
            } else {
                seq
            };
            if upto > have {
                self.answer_repair(peer, node, origin, (have + 1, upto));
            }
        }
    }

    /// A round of anti-entropy: every node gets every reachable peer's heads.
    pub fn anti_entropy(&mut self) {
        for node in 0..self.nodes.len() {
            for peer in 0..self.nodes.len() {
                if peer != node {
                    self.heads(node, peer);
                }
            }
        }
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
        let Sim {
            nodes,
            events,
            published,
            key,
            limits,
            ..
        } = self;
        for (i, node) in nodes.iter_mut().enumerate() {
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

    /// After healing and draining (see the crate docs): the live nodes agree on the
    /// messages and on presence, and neither lost what it must not.
    pub fn check_converged(&self) -> Result<(), String> {
        let live: Vec<(usize, &Node)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.up)
            .collect();
        let sets: Vec<HashSet<String>> = live
            .iter()
            .map(|(_, n)| {
                lock(&n.recorder.got)
                    .iter()
                    .filter_map(|(_, _, id)| id.clone())
                    .collect()
            })
            .collect();
        let union: HashSet<&String> = sets.iter().flatten().collect();
        for (id, origin, seq) in &self.published {
            if live.iter().any(|(_, n)| n.origin == *origin) && !union.contains(id) {
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
        let expected: BTreeSet<Member> = live
            .iter()
            .flat_map(|(_, n)| &n.clients)
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
