//! The simulated cluster: its nodes and regions, what each node sees of the others
//! (membership, homes), the routing of what a hub journals, and the workload and churn
//! (publish, presence, crash, restart).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tern_core::{ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, RemoteEvent};
use tern_protocol::{presence_action, Data, Message, PresenceMessage};
use tern_replication::heads::PreviousHeads;
use tern_replication::routing::{self, Node as Member_};
use tern_replication::Now;

use crate::acked::{AckState, Acked};
use crate::network::{describe, InFlight, Item};
use crate::node::{lock, Node};
use crate::{Faults, Rng, CLIENTS, GOSSIP_SPREAD_MS, SUBSCRIBED_PERCENT};

/// Which messages a crash must not lose: those of `origin` up to `upto`, which survivor
/// `node` (incarnation `incarnation`) had applied when `origin` crashed.
pub(crate) struct Held {
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
    pub(crate) queue: BTreeMap<(i64, u64), InFlight>,
    pub(crate) queue_counter: u64,
    pub(crate) partitioned: HashSet<(usize, usize)>,
    /// Every message published: (id, origin, seq).
    pub(crate) published: Vec<(String, OriginId, u64)>,
    /// Per origin, its events by sequence (index seq - 1): the message index into
    /// `published`, or `None` for a PRESENCE event.
    pub(crate) events: HashMap<OriginId, Vec<Option<usize>>>,
    /// Tags of crashed incarnations.
    pub(crate) dead_tags: Vec<String>,
    /// Departed incarnations some member noticed (and so publishes to the others).
    pub(crate) reported: Vec<(String, OriginId)>,
    pub(crate) held: Vec<Held>,
    pub(crate) key: ChannelKey,
    /// The first inconsistency noticed outside the checks, reported by the next check.
    pub(crate) broken: Option<String>,
    /// Repairs asked for, per (node, origin): highest sequence and when. A gap reported
    /// again while a repair is in flight does not ask again (avoids repair storms).
    pub(crate) requested: BTreeMap<(usize, OriginId), (u64, i64)>,
    /// Per (node, peer): the peer's own sequence in the last heads `node` got from it.
    pub(crate) previous_heads: HashMap<(usize, usize), PreviousHeads>,
    /// Departure notices still in flight (membership has not settled).
    pub(crate) departures_pending: usize,
    /// When the last crash or restart happened.
    pub(crate) last_churn_ms: Option<i64>,
    /// Nodes whose hub or subscriber may have changed since the last step check (the
    /// others need no new check).
    pub(crate) touched: BTreeSet<usize>,
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
    pub(crate) fn home_seen(&self, observer: usize, region: usize) -> usize {
        let region = &self.region_names[region];
        routing::home_in(&self.key, self.view(observer), region).map_or(usize::MAX, node_index)
    }

    /// The channel's home in `region` among the nodes that are up.
    pub(crate) fn live_home(&self, region: usize) -> Option<usize> {
        let up = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .map(|i| self.member(i));
        routing::home_in(&self.key, up, &self.region_names[region]).map(node_index)
    }

    /// Nodes of `at`'s region other than itself.
    pub(crate) fn region_peers(&self, at: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| i != at && self.regions[i] == self.regions[at])
            .collect()
    }

    /// Whether node `at` keeps the channel (repairs it from `Heads`): it has a
    /// subscriber (attached or waiting for the state) or is the home in its region.
    pub(crate) fn holds(&self, at: usize) -> bool {
        self.nodes[at].subscribed || self.home_seen(at, self.regions[at]) == at
    }

    /// Who node `at` sends an event of `origin` to: `routing::recipients` over its view
    /// and the interest it holds of peers it counts live. Counts relays, and events sent
    /// on a predecessor's interest (checking that no current incarnation without a
    /// subscriber is routed to on its own interest).
    pub(crate) fn route(&mut self, at: usize, origin: OriginId) -> Vec<usize> {
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
    pub(crate) fn note_homes(&mut self) {
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
}

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
    pub(crate) fn note_own(&mut self, at: usize, event: &Arc<ChannelEvent>) {
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
}
