//! The invariants, after every step and once the network healed (see the crate docs).

use std::collections::{BTreeSet, HashMap, HashSet};

use tern_replication::heads::HEADS_CHANNELS_MAX;
use tern_replication::routing::{INTEREST_MAX, INTEREST_TTL};

use crate::acked::Acked;
use crate::cluster::Held;
use crate::node::{lock, member, Member, Node};
use crate::Sim;

impl Sim {
    /// Per-step invariants (see the crate docs): per-origin order with no message
    /// skipped and no duplicate for each live subscriber incarnation; pending and log
    /// within their bounds; the rules' queues and maps within theirs.
    pub fn check_step(&mut self) -> Result<(), String> {
        if let Some(err) = self.broken.take() {
            return Err(err);
        }
        let stepped: BTreeSet<usize> = self.touched.iter().map(|&(node, _)| node).collect();
        self.check_ack_bounds(&stepped)?;
        let Sim {
            nodes,
            events,
            published,
            keys,
            limits,
            touched,
            ..
        } = self;
        for (i, ch) in std::mem::take(touched) {
            let node = &mut nodes[i];
            if !node.up {
                continue;
            }
            let key = &keys[ch];
            let who = format!("node {i} ({}) c{ch}", node.tag);
            if let Some(sub) = node.subs.get_mut(&ch) {
                let got = lock(&sub.recorder.got);
                let checked = &mut sub.checked;
                for (origin, seq, id) in &got[checked.upto..] {
                    let last = checked.last.get(origin).copied().unwrap_or(0);
                    if *seq <= last {
                        return Err(format!("{who}: origin {origin} seq {seq} after {last}"));
                    }
                    let kinds = events.get(&(ch, *origin));
                    for skipped in last + 1..*seq {
                        match kinds.and_then(|k| k.get(skipped as usize - 1)) {
                            Some(None) => {}
                            Some(Some(index)) if *index < sub.attached_at => {}
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
            }
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

    /// The rules' maps stay within their named bounds, checked right after a heads round
    /// (when the driver's tick expires interest): a node's `routing::Interest` holds at
    /// most `INTEREST_MAX` entries and no more than the (peer, channel) pairs its
    /// region's peers subscribed to in incarnations alive within `INTEREST_TTL` plus one
    /// network delay (so expiry works); each link's `PreviousHeads` at most
    /// `4 × HEADS_CHANNELS_MAX`.
    pub(crate) fn check_rule_bounds(&mut self) -> Result<(), String> {
        let all: BTreeSet<usize> = (0..self.nodes.len()).collect();
        self.check_ack_bounds(&all)?;
        let ttl = INTEREST_TTL.as_millis() as i64;
        let delay = self.latency_ms.iter().flatten().max().copied().unwrap_or(0)
            + self.faults.jitter_ms as i64;
        for at in 0..self.nodes.len() {
            if !self.nodes[at].up {
                continue;
            }
            let held = self.nodes[at].interest.len();
            self.stats.max_interest = self.stats.max_interest.max(held);
            let heard: BTreeSet<(usize, usize)> = self
                .region_peers(at)
                .into_iter()
                .flat_map(|p| {
                    self.sub_history[p]
                        .iter()
                        .filter(|(ended, _)| self.now_ms - *ended < ttl + delay)
                        .map(move |(_, ch)| (p, *ch))
                })
                .collect();
            if held > INTEREST_MAX || held > heard.len() {
                return Err(format!(
                    "n{at}: {held} interest entries, over the bound (INTEREST_MAX \
                     {INTEREST_MAX}, peers' live subscriptions {})",
                    heard.len()
                ));
            }
        }
        for (&(node, peer), previous) in &self.previous_heads {
            self.stats.max_previous_heads = self.stats.max_previous_heads.max(previous.len());
            if previous.len() > 4 * HEADS_CHANNELS_MAX {
                return Err(format!(
                    "n{node}: previous heads of n{peer} hold {} entries, over \
                     4 x HEADS_CHANNELS_MAX",
                    previous.len()
                ));
            }
        }
        Ok(())
    }

    /// After healing and draining (see the crate docs), for every channel that had an
    /// event or a subscriber: the live nodes that keep it (an attached subscriber, or the
    /// home of their region) agree on its messages and on its presence, none lost what it
    /// must not, and a node that neither has a subscriber nor was ever a home got nothing
    /// of it.
    pub fn check_converged(&self) -> Result<(), String> {
        let mut published: HashMap<usize, Vec<usize>> = HashMap::new();
        for (index, (_, ch, _, _)) in self.published.iter().enumerate() {
            published.entry(*ch).or_default().push(index);
        }
        let mut held: HashMap<usize, Vec<&Held>> = HashMap::new();
        for h in &self.held {
            held.entry(h.ch).or_default().push(h);
        }
        let mut acked: HashMap<usize, Vec<&Acked>> = HashMap::new();
        for a in &self.acked {
            acked
                .entry(self.published[a.message].1)
                .or_default()
                .push(a);
        }
        for &ch in &self.used {
            let none = Vec::new();
            self.check_channel(
                ch,
                published.get(&ch).unwrap_or(&Vec::new()),
                held.get(&ch).unwrap_or(&none),
                acked.get(&ch).map_or(&[][..], |a| a.as_slice()),
            )
            .map_err(|err| format!("c{ch}: {err}"))?;
        }
        Ok(())
    }

    fn check_channel(
        &self,
        ch: usize,
        published: &[usize],
        helds: &[&Held],
        acked: &[&Acked],
    ) -> Result<(), String> {
        let key = &self.keys[ch];
        let homes: HashSet<usize> = self.live_homes(ch).into_iter().collect();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.up
                || node.subscribed(ch)
                || node.was_home.contains(&ch)
                || node.stale_fed.contains(&ch)
            {
                continue;
            }
            // Its own earlier incarnations' events it took back from its store
            // (`recover`) are its own to hold, until the channel is dropped while idle.
            let cursor = node.hub.cursor(key);
            let foreign = cursor.origins().find(|&(o, seq)| {
                o != node.origin && !node.earlier_origins.contains(&o) && seq > 0
            });
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
            .filter(|(i, n)| n.up && (n.attached(ch) || homes.contains(i)))
            .collect();
        // What each keeper has, and from which published message on it must have
        // everything. A subscriber: what it was delivered plus what its hub held when it
        // attached. A home: what its store holds (the hub may have dropped the channel
        // while idle), also when it has a subscriber. With logs that keep everything, a
        // subscriber's hub held every earlier message when it attached, so it must have
        // them all; once nodes drop idle channels, a subscriber is owed only what was
        // published after it attached (earlier messages are history, in the homes'
        // stores), as a client attaching late is. So too where stores survive a restart:
        // a restarted node reopens a channel at its stored cursor with nothing in its
        // log (`Journal::restore`), so neither its subscribers nor a node warming from it
        // are handed what was published before (history has it).
        let drops_idle = self.limits.channel_idle_retain_ms != i64::MAX || self.durable_store;
        let mut sets: Vec<(usize, &str, HashSet<String>, usize)> = Vec::new();
        for &(i, n) in &live {
            if let Some(sub) = n.subs.get(&ch).filter(|s| s.attached) {
                let got = lock(&sub.recorder.got)
                    .iter()
                    .filter_map(|(_, _, id)| id.clone())
                    .chain(sub.pre_attach.iter().cloned())
                    .collect();
                let from = if drops_idle { sub.attached_at } else { 0 };
                sets.push((i, "subscriber", got, from));
            }
            if homes.contains(&i) {
                sets.push((i, "store", n.outbox.stored_ids(key), 0));
            }
        }
        let union: HashSet<&String> = sets.iter().flat_map(|s| &s.2).collect();
        self.check_acked(acked, &union)?;
        for &index in published {
            let (id, _, origin, seq) = &self.published[index];
            if self.nodes.iter().any(|n| n.up && n.origin == *origin) && !union.contains(id) {
                return Err(format!(
                    "message {id} of live origin {origin} (seq {seq}) lost"
                ));
            }
        }
        for held in helds {
            let holder = &self.nodes[held.node];
            if !holder.up || holder.incarnation != held.incarnation {
                continue;
            }
            let kinds = self.events.get(&(ch, held.origin)).into_iter().flatten();
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
        let index_of: HashMap<&String, usize> = published
            .iter()
            .map(|&index| (&self.published[index].0, index))
            .collect();
        for (i, what, set, from) in &sets {
            let owed = |id: &&&String| index_of.get(**id).is_none_or(|index| index >= from);
            let mut missing: Vec<&&String> = union
                .iter()
                .filter(owed)
                .filter(|id| !set.contains(**id))
                .collect();
            if !missing.is_empty() {
                missing.sort();
                let node = &self.nodes[*i];
                let owed = union.iter().filter(owed).count();
                return Err(format!(
                    "node {i} ({}) {what}: has {} of {owed} messages, lacks {missing:?}",
                    node.tag,
                    owed - missing.len(),
                ));
            }
        }
        let expected: BTreeSet<Member> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .flat_map(|n| &n.clients)
            .filter_map(|c| {
                let data = c.present.get(&ch)?.clone();
                Some((c.client_id.clone(), c.connection_id.clone(), data))
            })
            .collect();
        for (i, node) in &live {
            let members: BTreeSet<Member> = node.hub.members(key).iter().map(member).collect();
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
