//! The invariants, after every step and once the network healed (see the crate docs).

use std::collections::{BTreeSet, HashSet};

use crate::node::{held_ids, lock, member, Member, Node};
use crate::Sim;

impl Sim {
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
