//! `ack_replicas` in the simulation, with the shipped rules: each own event an origin
//! routes gets a position on the link to each recipient (`links::OutLink`) and waits in
//! that link's resend buffer (`links::SendBuffer`); a recipient that applied a link's
//! positions in a row (`links::InLink`) answers `Stored`; the origin's publish replies
//! wait in `acks::Waiters` and are ACKed (or NACKed after `REPLICA_ACK_TIMEOUT`) as the
//! rules say. Each anti-entropy round doubles as the resend timer: a link with
//! unacknowledged events sends `Hello` (its first held position) and resends them
//! (go-back-N), over the same faulty network as everything else.
//!
//! What the checks get from it: every message whose publish was ACKed, while one of the
//! node incarnations that stored it is still up, is on every live node that keeps the
//! channel after heal ([`Sim::check_acked`]); and no waiter outlives its timeout.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tern_core::RemoteEvent;
use tern_replication::acks::{LinkView, Waiters, REPLICA_ACK_TIMEOUT};
use tern_replication::links::{InLink, OutLink, SendBuffer, StoredOutcome};

use crate::network::Item;
use crate::Sim;

/// The simulation's `ack_replicas` (the server's default).
pub const ACK_REPLICAS: usize = 1;

/// One outbound link, from one node incarnation to one incarnation of a peer.
pub(crate) struct SimLink {
    pub(crate) link: OutLink,
    pub(crate) to_incarnation: u64,
    /// Each held event with its channel.
    pub(crate) buffer: SendBuffer<(usize, Arc<RemoteEvent>)>,
    /// `link.acked` at the previous resend round: a link whose acks advanced since is
    /// not stalled and resends nothing (as `RESEND_AFTER` in the driver).
    pub(crate) acked_at_round: u64,
}

/// Per node incarnation: its outbound links (by peer index), its waiting replies, and
/// what it applied of each sender's link.
#[derive(Default)]
pub(crate) struct AckState {
    pub(crate) out: HashMap<usize, SimLink>,
    /// Token: the published message's index, and its targets.
    pub(crate) waiters: Waiters<(usize, Vec<(u64, u64)>)>,
    pub(crate) inbound: HashMap<usize, InLink>,
    /// Per channel, the (link epoch, position) of the latest event it sent on each link
    /// that carried it (the driver's `LastSent::any`): while not `links::settled`, the
    /// channel stays in the hub.
    pub(crate) last_sent: HashMap<usize, Vec<(u64, u64)>>,
}

/// A message whose publish was ACKed, and the incarnations whose `Stored` made it so.
pub(crate) struct Acked {
    pub(crate) message: usize,
    pub(crate) ackers: Vec<(usize, u64)>,
}

impl Sim {
    /// Gives node `at`'s own event a position on the link to `to`; returns the position.
    pub(crate) fn link_position(
        &mut self,
        at: usize,
        to: usize,
        ch: usize,
        event: &Arc<RemoteEvent>,
    ) -> (u64, u64) {
        let now = self.now_at(at);
        let to_incarnation = self.nodes[to].incarnation;
        let stale = self.acks[at]
            .out
            .get(&to)
            .is_none_or(|l| l.to_incarnation != to_incarnation);
        if stale {
            self.epochs += 1;
            let link = SimLink {
                link: OutLink::new(self.epochs),
                to_incarnation,
                buffer: SendBuffer::default(),
                acked_at_round: 0,
            };
            self.acks[at].out.insert(to, link);
        }
        let link = self.acks[at].out.get_mut(&to).expect("inserted above");
        let seq = link.link.hand_out();
        if link.buffer.push(seq, (ch, event.clone()), now).is_some() {
            link.link.counts_after = seq - link.buffer.len() as u64;
        }
        (link.link.epoch, seq)
    }

    /// Node `at` waits for its message `message` to be stored on `targets`.
    pub(crate) fn wait_for_replicas(
        &mut self,
        at: usize,
        message: usize,
        targets: Vec<(u64, u64)>,
    ) {
        let now = self.now_at(at);
        self.acks[at]
            .waiters
            .push(targets.clone(), now, (message, targets));
        self.answer_waiters(at);
    }

    /// Runs node `at`'s waiting replies the rules let go.
    pub(crate) fn answer_waiters(&mut self, at: usize) {
        let now = self.now_at(at);
        let region = self.regions[at];
        let state = &mut self.acks[at];
        let links: Vec<(usize, OutLink)> = state.out.iter().map(|(p, l)| (*p, l.link)).collect();
        let view = |epoch: u64| {
            let (peer, link) = links.iter().find(|(_, l)| l.epoch == epoch)?;
            Some(LinkView {
                link: *link,
                remote: self.regions[*peer] != region,
            })
        };
        let done = state.waiters.drain(ACK_REPLICAS, now, view);
        for ((message, targets), ok) in done {
            if !ok {
                self.stats.nacks += 1;
                self.log(|| {
                    let views: Vec<String> = targets
                        .iter()
                        .map(|(epoch, target)| {
                            match links.iter().find(|(_, l)| l.epoch == *epoch) {
                                Some((peer, l)) => format!(
                                    "n{peer} link {epoch} pos {target}: acked {} counts after {}",
                                    l.acked, l.counts_after
                                ),
                                None => format!("link {epoch} gone"),
                            }
                        })
                        .collect();
                    format!("n{at} NACK {}: {views:?}", self.published[message].0)
                });
                continue;
            }
            self.stats.acks += 1;
            let ackers: Vec<(usize, u64)> = targets
                .iter()
                .filter_map(|(epoch, target)| {
                    let (peer, link) = links.iter().find(|(_, l)| l.epoch == *epoch)?;
                    let incarnation = self.acks[at].out.get(peer)?.to_incarnation;
                    (link.acked >= *target).then_some((*peer, incarnation))
                })
                .collect();
            // An ACK is a promise: each replica it counts holds the message now.
            let (id, ch, origin, seq) = &self.published[message];
            for &(peer, incarnation) in &ackers {
                let node = &self.nodes[peer];
                // In its store: `Stored` acks what the store committed, and the hub
                // may have dropped the channel since (idle).
                let holds = node.outbox.stored_upto(&self.keys[*ch], *origin) >= *seq;
                if node.up && node.incarnation == incarnation && !holds {
                    self.broken.get_or_insert(format!(
                        "message {id} ACKed on n{peer}'s Stored, which does not hold it"
                    ));
                }
            }
            self.acked.push(Acked { message, ackers });
        }
    }

    /// Node `to` applied position `seq` of `from`'s link `epoch` (not a gap): answers
    /// `Stored` for the prefix applied in a row.
    pub(crate) fn applied_on_link(&mut self, to: usize, from: usize, (epoch, seq): (u64, u64)) {
        let state = self.acks[to].inbound.get(&from).copied();
        let mut state = match state {
            Some(s) if s.epoch == epoch => s,
            _ => InLink::hello(None, epoch, epoch, 1, 0),
        };
        let advanced = state.applied(epoch, seq);
        self.acks[to].inbound.insert(from, state);
        if let Some(upto) = advanced {
            self.send(
                to,
                from,
                Item::Stored {
                    from: to,
                    epoch,
                    upto,
                },
            );
        }
    }

    /// A `Hello` on `from`'s link `epoch` reaches `to`: positions below `first` are gone.
    pub(crate) fn take_hello(&mut self, to: usize, from: usize, epoch: u64, first: u64) {
        let before = self.acks[to].inbound.get(&from).copied();
        let state = InLink::hello(before, epoch, epoch, first, 0);
        self.acks[to].inbound.insert(from, state);
    }

    /// `Stored` from `from` reaches its origin `to`.
    pub(crate) fn take_stored(&mut self, to: usize, from: usize, epoch: u64, upto: u64) {
        let Some(link) = self.acks[to].out.get_mut(&from) else {
            return;
        };
        if let StoredOutcome::Advanced(upto) = link.link.on_stored(epoch, upto) {
            let _lag = link.buffer.ack(upto);
        }
        self.answer_waiters(to);
    }

    /// The resend timer: every link of every live node with unacknowledged events sends
    /// `Hello` and everything it holds again; expired replies are NACKed.
    pub(crate) fn resend_and_expire(&mut self) {
        for at in 0..self.nodes.len() {
            if !self.nodes[at].up {
                continue;
            }
            let mut sends = Vec::new();
            // In peer order, not the map's (a seed must replay exactly).
            let mut links: Vec<(&usize, &mut SimLink)> = self.acks[at].out.iter_mut().collect();
            links.sort_unstable_by_key(|(peer, _)| **peer);
            for (&peer, link) in links {
                let progressed = link.link.acked != link.acked_at_round;
                link.acked_at_round = link.link.acked;
                if progressed
                    || link.buffer.is_empty()
                    || !self.nodes[peer].up
                    || link.to_incarnation != self.nodes[peer].incarnation
                {
                    continue;
                }
                let first = link.buffer.first();
                sends.push((
                    peer,
                    Item::Hello {
                        from: at,
                        epoch: link.link.epoch,
                        first,
                    },
                ));
                let mut seq = first - 1;
                while let Some((pos, (ch, event), _)) = link.buffer.after(seq) {
                    seq = *pos;
                    let link_pos = Some((link.link.epoch, *pos));
                    let item = Item::Event {
                        from: at,
                        ch: *ch,
                        event: event.clone(),
                        link: link_pos,
                    };
                    sends.push((peer, item));
                }
            }
            for (peer, item) in sends {
                self.stats.resent += 1;
                self.send(at, peer, item);
            }
            self.answer_waiters(at);
        }
    }

    /// Node `at` noticed that incarnation `origin` departed: its link to it is gone
    /// (membership removed the peer), and it no longer counts for `at`'s replies.
    pub(crate) fn forget_departed(&mut self, at: usize, origin: tern_core::OriginId) {
        // Origin ids are (index + 1) << 32 | incarnation (see `Sim::boot`).
        let peer = (origin.0 >> 32) as usize - 1;
        let incarnation = origin.0 & 0xffff_ffff;
        if self.acks[at]
            .out
            .get(&peer)
            .is_some_and(|l| l.to_incarnation == incarnation)
        {
            self.acks[at].out.remove(&peer);
        }
        self.answer_waiters(at);
    }

    /// No reply of `nodes` waits past its timeout once a resend round ran, and no buffer
    /// is over its bound (`PEER_BUFFER_MAX`).
    pub(crate) fn check_ack_bounds(&mut self, nodes: &BTreeSet<usize>) -> Result<(), String> {
        for &at in nodes {
            let state = &self.acks[at];
            self.stats.max_waiters = self.stats.max_waiters.max(state.waiters.len());
            for link in state.out.values() {
                self.stats.max_buffer = self.stats.max_buffer.max(link.buffer.len());
            }
            if let Some(since) = state.waiters.oldest() {
                let age = self.now_at(at).saturating_sub(since);
                if age > REPLICA_ACK_TIMEOUT * 2 && self.nodes[at].up {
                    return Err(format!(
                        "n{at}: a reply has waited {age:?} for its replicas"
                    ));
                }
            }
            for link in state.out.values() {
                if link.buffer.len() > tern_replication::links::PEER_BUFFER_MAX {
                    return Err(format!("n{at}: a resend buffer is over its bound"));
                }
            }
        }
        Ok(())
    }

    /// Every ACKed message, while an incarnation that stored it is up, is in `union`.
    pub(crate) fn check_acked(
        &self,
        acked: &[&Acked],
        union: &std::collections::HashSet<&String>,
    ) -> Result<(), String> {
        for acked in acked {
            let alive = acked
                .ackers
                .iter()
                .any(|(n, inc)| self.nodes[*n].up && self.nodes[*n].incarnation == *inc);
            let id = &self.published[acked.message].0;
            if alive && !union.contains(id) {
                return Err(format!(
                    "ACKed message {id} lost though a replica that stored it ({:?}) is up",
                    acked.ackers
                ));
            }
        }
        Ok(())
    }
}
