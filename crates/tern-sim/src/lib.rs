//! Deterministic simulation of several Tern nodes over `tern-core`: one seeded event
//! queue, virtual time, and a network that delays, drops, duplicates, reorders and
//! partitions. Test-only; never part of the binary.
//!
//! # Layout
//! - [`Rng`]: a small seeded generator (splitmix64), so a seed replays exactly.
//! - [`Sim`]: the nodes (one `Hub` each, one recording subscriber each), the in-flight
//!   queue, the faults, and the invariant checks run after every step.
//!
//! What it models of the cluster design: per-origin FIFO replication with duplicates
//! and gaps detected by the core, and anti-entropy that repairs gaps from any peer's
//! log. What it does not model yet: QUIC links, gossip membership, crash/restart with a
//! new incarnation, interest-based routing.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, RemoteEvent,
    RemoteOutcome, Subscriber,
};
use tern_protocol::{flags, Data, Message};

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

/// Fault rates, in percent per message.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop: u64,
    pub duplicate: u64,
    /// Extra random delay (ms) on top of the link latency: reorders messages.
    pub jitter_ms: u64,
}

/// One recording subscriber: every MESSAGE it got, as (origin, seq, message id).
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(OriginId, u64, String)>>,
}

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut got = self.got.lock().unwrap_or_else(|p| p.into_inner());
        for m in event.frame.messages.iter().flatten() {
            got.push((event.origin, event.seq, m.id.clone().unwrap_or_default()));
        }
        true
    }
}

struct Node {
    hub: Hub,
    recorder: Arc<Recorder>,
}

struct InFlight {
    to: usize,
    event: RemoteEvent,
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
    queue: BTreeMap<(i64, u64), InFlight>,
    queue_counter: u64,
    partitioned: HashSet<(usize, usize)>,
    published: Vec<String>,
    key: ChannelKey,
    /// Repairs asked for, per (node, origin): highest sequence and when. A gap reported
    /// again while a repair is in flight does not ask again (avoids repair storms).
    requested: BTreeMap<(usize, OriginId), (u64, i64)>,
    /// Per node, what the step checks have verified so far (checks are incremental).
    checked: Vec<Checked>,
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
}

#[derive(Default)]
struct Checked {
    upto: usize,
    last: BTreeMap<OriginId, u64>,
    ids: HashSet<String>,
}

const ALL_MODES: u64 =
    flags::PUBLISH | flags::SUBSCRIBE | flags::PRESENCE | flags::PRESENCE_SUBSCRIBE;

impl Sim {
    /// `latency_ms[i][j]`: one-way delay between node i and j.
    pub fn new(seed: u64, latency_ms: Vec<Vec<i64>>, faults: Faults) -> Sim {
        let key = ChannelKey::new("sim", "channel");
        let node_count = latency_ms.len();
        let nodes = (0..node_count)
            .map(|i| {
                let hub = Hub::new(OriginId(1000 + i as u64), CoreLimits::default());
                let recorder = Arc::new(Recorder::default());
                let options = AttachOptions {
                    modes: ALL_MODES,
                    echo: true,
                    resume_from: None,
                    rewind: None,
                };
                hub.attach(
                    &key,
                    format!("sub-{i}").into(),
                    options,
                    recorder.clone(),
                    |_| {},
                    0,
                )
                .expect("attach");
                Node { hub, recorder }
            })
            .collect();
        Sim {
            seed,
            rng: Rng::new(seed),
            now_ms: 0,
            nodes,
            latency_ms,
            faults,
            queue: BTreeMap::new(),
            queue_counter: 0,
            partitioned: HashSet::new(),
            published: Vec::new(),
            key,
            requested: BTreeMap::new(),
            checked: (0..node_count).map(|_| Checked::default()).collect(),
            stats: Stats::default(),
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        format!(
            "TERN_SIM_SEED={} cargo test -p tern-sim --test seeds -- replay",
            self.seed
        )
    }

    fn send(&mut self, from: usize, to: usize, event: RemoteEvent) {
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
            self.queue_counter += 1;
            self.queue.insert(
                (at, self.queue_counter),
                InFlight {
                    to,
                    event: event.clone(),
                },
            );
        }
    }

    /// A client publishes one message at node `at`; the origin sends it to every peer.
    pub fn publish(&mut self, at: usize) {
        let name = format!("msg-{}", self.published.len());
        let publisher = Publisher {
            connection_id: Some(format!("client-{at}").into()),
            frame_id: name.clone(),
        };
        let message = Message {
            name: Some(name.clone()),
            data: Some(Data::String("x".into())),
            ..Default::default()
        };
        let outcome = self.nodes[at]
            .hub
            .publish(&self.key, &publisher, vec![message], self.now_ms)
            .expect("publish");
        self.published.push(format!("{name}:0"));
        let event = RemoteEvent::from_event(&outcome.event.expect("a new message"));
        for to in 0..self.nodes.len() {
            if to != at {
                self.send(at, to, event.clone());
            }
        }
    }

    /// Delivers the next in-flight message (advancing virtual time). False if none.
    pub fn deliver_next(&mut self) -> bool {
        let Some((&(at, n), _)) = self.queue.first_key_value() else {
            return false;
        };
        let flight = self.queue.remove(&(at, n)).expect("present");
        self.now_ms = self.now_ms.max(at);
        let outcome = self.nodes[flight.to]
            .hub
            .apply_remote(&self.key, flight.event, self.now_ms)
            .expect("apply");
        if outcome == RemoteOutcome::Duplicate {
            self.stats.duplicates_seen += 1;
        }
        if let RemoteOutcome::Gap { origin, missing } = outcome {
            self.stats.gaps += 1;
            let round_trip = 2 * self.latency_ms[flight.to]
                .iter()
                .max()
                .copied()
                .unwrap_or(0)
                + self.faults.jitter_ms as i64;
            let asked = self.requested.get(&(flight.to, origin)).copied();
            if asked.is_none_or(|(upto, when)| upto < missing.1 || self.now_ms - when > round_trip)
            {
                self.requested
                    .insert((flight.to, origin), (missing.1, self.now_ms));
                self.repair(flight.to, origin, missing);
            }
        }
        true
    }

    /// Anti-entropy for one gap: ask every reachable peer for the missing events.
    fn repair(&mut self, node: usize, origin: OriginId, (from, to): (u64, u64)) {
        for peer in 0..self.nodes.len() {
            if peer == node {
                continue;
            }
            for event in self.nodes[peer].hub.events_of(&self.key, origin, from, to) {
                self.send(peer, node, RemoteEvent::from_event(&event));
            }
        }
    }

    /// Periodic anti-entropy: every node compares cursors with every peer and pulls what
    /// it lacks (covers gaps nobody noticed, e.g. the last message dropped).
    pub fn anti_entropy(&mut self) {
        for node in 0..self.nodes.len() {
            let mine = self.nodes[node].hub.cursor(&self.key);
            for peer in 0..self.nodes.len() {
                if peer == node {
                    continue;
                }
                let theirs = self.nodes[peer].hub.cursor(&self.key);
                for (origin, seq) in theirs.origins() {
                    if seq > mine.get(origin) {
                        self.repair(node, origin, (mine.get(origin) + 1, seq));
                    }
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

    /// Invariants that hold after every step: each subscriber saw each origin's messages
    /// in sequence order with no gap and no duplicate, and memory stayed bounded.
    pub fn check_step(&mut self) -> Result<(), String> {
        for (i, node) in self.nodes.iter().enumerate() {
            let got = node.recorder.got.lock().unwrap_or_else(|p| p.into_inner());
            let checked = &mut self.checked[i];
            for (origin, seq, id) in &got[checked.upto..] {
                let expected = checked.last.get(origin).copied().unwrap_or(0) + 1;
                if *seq != expected {
                    return Err(format!(
                        "node {i}: origin {origin} seq {seq}, expected {expected}"
                    ));
                }
                checked.last.insert(*origin, *seq);
                if !checked.ids.insert(id.clone()) {
                    return Err(format!("node {i}: duplicate message {id}"));
                }
            }
            checked.upto = got.len();
            let pending = node.hub.pending_len(&self.key);
            if pending > CoreLimits::default().pending_max {
                return Err(format!(
                    "node {i}: {pending} pending events, over the bound"
                ));
            }
        }
        Ok(())
    }

    /// After healing and draining: every subscriber has every published message.
    pub fn check_converged(&self) -> Result<(), String> {
        let want: HashSet<&String> = self.published.iter().collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let got = node.recorder.got.lock().unwrap_or_else(|p| p.into_inner());
            let have: HashSet<&String> = got.iter().map(|(_, _, id)| id).collect();
            if have != want {
                return Err(format!(
                    "node {i}: has {} of {} messages",
                    have.len(),
                    want.len()
                ));
            }
        }
        Ok(())
    }
}
