//! The simulated cluster: its nodes and regions, what each node sees of the others
//! (membership, homes), the routing of what a hub journals, and the workload and churn
//! (publish, presence, crash, restart).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tern_core::{ChannelEvent, ChannelKey, CoreLimits, OriginId, RemoteEvent};
use tern_replication::heads::PreviousHeads;
use tern_replication::inbound;
use tern_replication::routing::{self, Node as Member_};
use tern_replication::Now;

use crate::acked::{AckState, Acked};
use crate::network::{describe, InFlight, Item};
use crate::node::{lock, Node};
use crate::stats::Stats;
use crate::workload::roll_subscriptions;
use crate::{Faults, Rng, Shape, Sizer};

/// Which messages a crash must not lose: those of `origin` up to `upto`, which survivor
/// `node` (incarnation `incarnation`) had applied when `origin` crashed.
pub(crate) struct Held {
    pub(crate) ch: usize,
    pub(crate) node: usize,
    pub(crate) incarnation: u64,
    pub(crate) origin: OriginId,
    pub(crate) upto: u64,
}

/// The simulated cluster.
pub struct Sim {
    pub seed: u64,
    pub(crate) rng: Rng,
    pub(crate) now_ms: i64,
    pub(crate) nodes: Vec<Node>,
    /// Each node's region (index into the topology's regions).
    pub(crate) regions: Vec<usize>,
    /// Each node's id (`n<index>`; it keeps it on restart) and each region's name, as
    /// routing sees them.
    pub(crate) ids: Vec<String>,
    pub(crate) region_names: Vec<String>,
    /// Link latency between node pairs (ms), from the topology.
    pub(crate) latency_ms: Vec<Vec<i64>>,
    pub(crate) faults: Faults,
    pub(crate) limits: CoreLimits,
    /// [`crate::Shape::durable_store`].
    pub(crate) durable_store: bool,
    pub(crate) queue: BTreeMap<(i64, u64), InFlight>,
    pub(crate) queue_counter: u64,
    pub(crate) partitioned: HashSet<(usize, usize)>,
    /// Per (sender, receiver): when the last item on its link arrives (`ordered_links`).
    pub(crate) link_clock: HashMap<(usize, usize), i64>,
    /// Every message published: (id, channel, origin, seq).
    pub(crate) published: Vec<(String, usize, OriginId, u64)>,
    /// Per (channel, origin), its events by sequence (index seq - 1): the message index
    /// into `published`, or `None` for a PRESENCE event.
    pub(crate) events: HashMap<(usize, OriginId), Vec<Option<usize>>>,
    /// Tags of crashed incarnations.
    pub(crate) dead_tags: Vec<String>,
    /// Departed incarnations some member noticed (and so publishes to the others).
    pub(crate) reported: Vec<(String, OriginId)>,
    pub(crate) held: Vec<Held>,
    /// The channels, and each key's index.
    pub(crate) keys: Vec<ChannelKey>,
    pub(crate) index: HashMap<ChannelKey, usize>,
    /// Subscriptions per node incarnation (0: one channel, subscribed with
    /// `SUBSCRIBED_PERCENT`).
    pub(crate) subs_per_node: usize,
    /// Channels that had an event or a subscriber (the convergence check looks at these).
    pub(crate) used: BTreeSet<usize>,
    /// Each node's clock offset (ms, `Faults::skew_ms`): what its hub and its rules see
    /// as now.
    pub(crate) skew_ms: Vec<i64>,
    /// Per node: every subscription of an incarnation that ended less than
    /// `INTEREST_TTL` ago or is current (the bound of what peers may hold of its interest).
    pub(crate) sub_history: Vec<Vec<(i64, usize)>>,
    /// The first inconsistency noticed outside the checks, reported by the next check.
    pub(crate) broken: Option<String>,
    /// Per (node, peer): the peer's own sequence in the last heads `node` got from it.
    pub(crate) previous_heads: HashMap<(usize, usize), PreviousHeads>,
    /// Departure notices still in flight (membership has not settled).
    pub(crate) departures_pending: usize,
    /// When the last crash or restart happened.
    pub(crate) last_churn_ms: Option<i64>,
    /// Nodes whose hub or subscribers may have changed since the last step check (the
    /// others need no new check).
    pub(crate) touched: BTreeSet<(usize, usize)>,
    /// `routing::homes` per (channel, set of nodes), see [`Sim::homes_among`].
    pub(crate) homes_memo: RefCell<HashMap<(usize, u64), Vec<usize>>>,
    /// When set, the bytes of each control frame a node sends (`Heads`, `Interest`) are
    /// measured with it and added to `control_bytes`.
    pub sizer: Option<Sizer>,
    /// Per node: (`Heads` bytes, `Interest` bytes) sent since the last reset.
    pub control_bytes: Vec<(u64, u64)>,
    /// Per node: links, replies waiting for replicas (`acked.rs`).
    pub(crate) acks: Vec<AckState>,
    /// Link epochs handed out (each link gets a new one).
    pub(crate) epochs: u64,
    /// Messages whose publish was ACKed.
    pub(crate) acked: Vec<Acked>,
    /// Print every step to stderr (for replaying one seed).
    pub trace: bool,
    /// What the faults actually did (so a sweep can prove it exercised them).
    pub stats: Stats,
}

impl Sim {
    /// `regions[i]`: node i's region; `latency_ms[i][j]`: one-way delay between node i
    /// and j.
    pub fn new(seed: u64, regions: Vec<usize>, latency_ms: Vec<Vec<i64>>, faults: Faults) -> Sim {
        Sim::with_shape(seed, regions, latency_ms, faults, Shape::default())
    }

    /// A cluster with `shape.channels` channels and about `shape.subscriptions`
    /// subscriptions spread over the nodes.
    pub fn with_shape(
        seed: u64,
        regions: Vec<usize>,
        latency_ms: Vec<Vec<i64>>,
        faults: Faults,
        shape: Shape,
    ) -> Sim {
        assert_eq!(regions.len(), latency_ms.len(), "one region per node");
        assert!(regions.len() <= 64, "node sets are u64 masks");
        let keys: Vec<ChannelKey> = if shape.channels <= 1 {
            vec![ChannelKey::new("sim", &format!("channel-{seed}"))]
        } else {
            (0..shape.channels)
                .map(|c| ChannelKey::new("sim", &format!("channel-{c}")))
                .collect()
        };
        let index = keys.iter().cloned().zip(0..).collect();
        let subs_per_node = if shape.channels <= 1 {
            0
        } else {
            shape.subscriptions.div_ceil(regions.len())
        };
        let limits = CoreLimits {
            channel_idle_retain_ms: shape.idle_retain_ms.unwrap_or(i64::MAX),
            ..CoreLimits::default()
        };
        let mut rng = Rng::new(seed);
        let mut skew_rng = Rng::new(seed ^ 0x5eed_c10c);
        let skew_ms = (0..regions.len())
            .map(|_| skew_rng.below(faults.skew_ms + 1) as i64)
            .collect();
        let regions_len = regions.len();
        let ids = (0..regions.len()).map(|i| format!("n{i}")).collect();
        let region_names = (0..=regions.iter().copied().max().unwrap_or(0))
            .map(|r| format!("r{r}"))
            .collect();
        let nodes: Vec<Node> = (0..latency_ms.len())
            .map(|i| {
                let subs = roll_subscriptions(&mut rng, subs_per_node, keys.len());
                Sim::boot(&limits, i, 0, subs)
            })
            .collect();
        let sub_history = nodes
            .iter()
            .map(|n| n.subs.keys().map(|&ch| (i64::MAX, ch)).collect())
            .collect();
        let used = nodes.iter().flat_map(|n| n.subs.keys().copied()).collect();
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
            durable_store: shape.durable_store,
            queue: BTreeMap::new(),
            queue_counter: 0,
            partitioned: HashSet::new(),
            link_clock: HashMap::new(),
            published: Vec::new(),
            events: HashMap::new(),
            dead_tags: Vec::new(),
            reported: Vec::new(),
            held: Vec::new(),
            keys,
            index,
            subs_per_node,
            used,
            skew_ms,
            sub_history,
            broken: None,
            previous_heads: HashMap::new(),
            departures_pending: 0,
            last_churn_ms: None,
            touched: BTreeSet::new(),
            homes_memo: RefCell::new(HashMap::new()),
            sizer: None,
            control_bytes: vec![(0, 0); regions_len],
            acks: (0..regions_len).map(|_| AckState::default()).collect(),
            epochs: 0,
            acked: Vec::new(),
            trace: false,
            stats: Stats::default(),
        };
        let count = sim.nodes.len();
        for at in count - shape.joiners.min(count - 1)..count {
            // Not booted yet: nobody saw it, it subscribes to nothing.
            let node = &mut sim.nodes[at];
            node.up = false;
            node.subs.clear();
            sim.sub_history[at].clear();
        }
        sim.used = sim
            .nodes
            .iter()
            .flat_map(|n| n.subs.keys().copied())
            .collect();
        sim.note_homes_all();
        for at in 0..count {
            if sim.nodes[at].up {
                sim.start_subscribers(at);
            }
        }
        sim
    }

    /// What node `at`'s hub and rules take for now (its clock, skewed).
    pub(crate) fn hub_now(&self, at: usize) -> i64 {
        self.now_ms + self.skew_ms[at]
    }

    pub(crate) fn now_at(&self, at: usize) -> Now {
        Now::from_millis(self.hub_now(at).max(0) as u64)
    }

    /// Starts every subscriber of node `at`'s incarnation.
    pub(crate) fn start_subscribers(&mut self, at: usize) {
        if self.nodes[at].subs.is_empty() {
            self.stats.absent_subscribers += 1;
        }
        let chans: Vec<usize> = self.nodes[at].subs.keys().copied().collect();
        for ch in chans {
            self.start_subscriber(at, ch);
        }
    }

    /// Whether node `observer` counts node `node` live: it is up, or it crashed and
    /// `observer` has not noticed yet.
    pub(crate) fn in_view(&self, observer: usize, node: usize) -> bool {
        node == observer
            || self.nodes[node].up
            || self.nodes[observer]
                .believed_live
                .contains(&self.nodes[node].origin)
    }

    /// The nodes `observer` counts live (itself included), as routing sees them: the
    /// members its membership lists.
    pub(crate) fn view(&self, observer: usize) -> Vec<Member_<'_>> {
        (0..self.nodes.len())
            .filter(|&i| self.in_view(observer, i))
            .map(|i| self.member(i))
            .collect()
    }

    pub(crate) fn member(&self, i: usize) -> Member_<'_> {
        Member_ {
            id: &self.ids[i],
            region: &self.region_names[self.regions[i]],
            origin: self.nodes[i].origin.0,
        }
    }

    /// The channel's home in `region` as `observer` sees it (`routing::home_in` over its
    /// view). `usize::MAX` if it knows none there.
    pub(crate) fn home_seen(&self, observer: usize, ch: usize, region: usize) -> usize {
        self.homes_among(self.view_mask(observer), ch)[region]
    }

    /// The nodes `observer` counts live, a bit per node index.
    pub(crate) fn view_mask(&self, observer: usize) -> u64 {
        (0..self.nodes.len())
            .filter(|&i| self.in_view(observer, i))
            .fold(0u64, |m, i| m | 1 << i)
    }

    /// The channel's home per region (`usize::MAX` where none) among the nodes in
    /// `mask` (a bit per node index): `routing::homes`, remembered per (channel, mask) as
    /// it depends on nothing else (node ids and regions are fixed), so that thousands of
    /// channels stay cheap in debug.
    pub(crate) fn homes_among(&self, mask: u64, ch: usize) -> Vec<usize> {
        if let Some(homes) = self.homes_memo.borrow().get(&(ch, mask)) {
            return homes.clone();
        }
        let nodes = (0..self.nodes.len())
            .filter(|&i| mask & (1 << i) != 0)
            .map(|i| self.member(i));
        let mut homes = vec![usize::MAX; self.region_names.len()];
        for (region, node) in routing::homes(&self.keys[ch], nodes) {
            homes[region[1..].parse::<usize>().expect("regions are r<index>")] = node_index(node);
        }
        let mut memo = self.homes_memo.borrow_mut();
        if memo.len() >= HOMES_MEMO_MAX {
            memo.clear();
        }
        memo.insert((ch, mask), homes.clone());
        homes
    }

    /// [`Sim::homes_among`] as the rules take it: region name → home's node id, for the
    /// regions that have one.
    pub(crate) fn home_ids_among(&self, mask: u64, ch: usize) -> HashMap<&str, &str> {
        self.homes_among(mask, ch)
            .into_iter()
            .enumerate()
            .filter(|&(_, home)| home != usize::MAX)
            .map(|(region, home)| (self.region_names[region].as_str(), self.ids[home].as_str()))
            .collect()
    }

    /// The channel's home in each region among the nodes that are up.
    pub(crate) fn live_homes(&self, ch: usize) -> Vec<usize> {
        let mask = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .fold(0u64, |m, i| m | 1 << i);
        self.homes_among(mask, ch)
            .into_iter()
            .filter(|&h| h != usize::MAX)
            .collect()
    }

    /// Nodes of `at`'s region other than itself.
    pub(crate) fn region_peers(&self, at: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| i != at && self.regions[i] == self.regions[at])
            .collect()
    }

    /// Whether node `at` keeps the channel (repairs it from `Heads`): it has a
    /// subscriber (attached or waiting for the state) or is the home in its region.
    pub(crate) fn holds(&self, at: usize, ch: usize) -> bool {
        let sub = self.nodes[at].subs.get(&ch);
        let warming = sub.is_some_and(|s| s.warming.is_some());
        inbound::keeps(
            || sub.is_some() && !warming,
            || warming,
            || self.home_seen(at, ch, self.regions[at]) == at,
        )
    }

    /// Who node `at` sends an event of `origin` to: `routing::recipients` over its view
    /// and the interest it holds of peers it counts live. Counts relays, and events sent
    /// on a predecessor's interest (checking that no current incarnation without a
    /// subscriber is routed to on its own interest).
    pub(crate) fn route(&mut self, at: usize, ch: usize, origin: OriginId) -> Vec<usize> {
        let now = self.now_at(at);
        let key = &self.keys[ch];
        let view = self.view(at);
        let me = self.member(at);
        let peers: Vec<Member_> = view.iter().copied().filter(|n| n.id != me.id).collect();
        let holding: Vec<&str> = self.nodes[at]
            .interest
            .interested(key, now)
            .into_iter()
            .filter(|p| peers.iter().any(|n| n.id == *p))
            .collect();
        let to: Vec<usize> =
            routing::recipients(me, &peers, key, origin.0, holding.iter().copied())
                .into_iter()
                .map(node_index)
                .collect();
        let interested: Vec<usize> = holding.into_iter().map(node_index).collect();
        let own = origin == self.nodes[at].origin;
        let home_here = self.home_seen(at, ch, self.regions[at]);
        for &peer in to.iter().filter(|p| interested.contains(p)) {
            if !own {
                self.stats.relayed += 1;
            }
            let target = &self.nodes[peer];
            if target.up && !target.subscribed(ch) && peer != home_here {
                // Interest this incarnation never sent: its node's previous one's,
                // which the peer keeps until it expires.
                if self.nodes[at].interest_from.get(&(peer, ch)) == Some(&target.incarnation) {
                    self.broken.get_or_insert(format!(
                        "n{at} holds interest of {}, which has no subscriber",
                        target.tag
                    ));
                }
                self.stats.stale_interest += 1;
                self.nodes[peer].stale_fed.insert(ch);
            }
        }
        to
    }

    /// Marks each live node that is now the channel's home in its region (among the live
    /// nodes). Called whenever the live set changes. A node's view holds every live
    /// node (and maybe crashed ones it has not noticed), so whoever any node takes for a
    /// home is marked here.
    pub(crate) fn note_homes(&mut self, ch: usize) {
        for home in self.live_homes(ch) {
            self.nodes[home].was_home.insert(ch);
        }
    }

    /// [`Sim::note_homes`] for every channel that matters (had an event or a subscriber;
    /// a node's hub holds no other).
    pub(crate) fn note_homes_all(&mut self) {
        for ch in self.used.clone() {
            self.note_homes(ch);
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        format!(
            "TERN_SIM_SEED={} cargo test -p tern-sim --test seeds -- seed_sweep",
            self.seed
        )
    }
}

/// Entries of the homes memo before it starts over.
const HOMES_MEMO_MAX: usize = 1 << 18;

/// The node index of a node id (`n<index>`).
pub(crate) fn node_index(id: &str) -> usize {
    id[1..].parse().expect("sim node ids are n<index>")
}

impl Sim {
    pub(crate) fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>7} {}", self.now_ms, what());
        }
    }

    /// Routes what node `at`'s hub journaled (see [`Sim::recipients`]), and notes what
    /// each of its own events is (for the checks).
    pub(crate) fn flush(&mut self, at: usize) {
        let mut events = std::mem::take(&mut *lock(&self.nodes[at].outbox.events));
        // One call can journal events of many channels (`node_departed`) in the hub's
        // map order; by channel (each channel's own order kept) a seed replays exactly.
        events.sort_by_key(|(key, _)| self.index[key]);
        for (key, event) in events {
            let ch = self.index[&key];
            self.touched.insert((at, ch));
            let own = event.origin == self.nodes[at].origin;
            if own {
                self.note_own(at, ch, &event);
            }
            let to = self.route(at, ch, event.origin);
            let remote = Arc::new(RemoteEvent::from_event(&event));
            let mut targets = Vec::new();
            for &to in &to {
                targets.push(self.link_position(at, to, ch, &remote));
            }
            if own && event.is_message() {
                self.wait_for_replicas(at, self.published.len() - 1, targets.clone());
            }
            if to.is_empty() {
                continue;
            }
            self.acks[at].last_sent.insert(ch, targets.clone());
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
                    ch,
                    event: remote.clone(),
                    link: Some(link),
                };
                self.send(at, to, item);
            }
        }
    }

    /// Notes one of node `at`'s own events: a message goes into `published`, and every
    /// event into its origin's numbering.
    pub(crate) fn note_own(&mut self, at: usize, ch: usize, event: &Arc<ChannelEvent>) {
        if self.used.insert(ch) {
            self.note_homes(ch);
        }
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
            self.published.push((id, ch, event.origin, event.seq));
            Some(self.published.len() - 1)
        } else {
            None
        };
        let log = self.events.entry((ch, event.origin)).or_default();
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

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].up
    }

    pub fn channel_count(&self) -> usize {
        self.keys.len()
    }

    /// The channels node `at`'s current incarnation subscribes to.
    pub fn subscriptions(&self, at: usize) -> Vec<usize> {
        self.nodes[at].subs.keys().copied().collect()
    }

    /// Channels node `at`'s hub holds (its share of the cluster's channels).
    pub fn held_channels(&self, at: usize) -> usize {
        self.nodes[at].hub.channel_count()
    }

    /// Zeroes every node's control byte counts.
    pub fn reset_control_bytes(&mut self) {
        self.control_bytes.iter_mut().for_each(|c| *c = (0, 0));
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    pub fn live_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.up).count()
    }
}
