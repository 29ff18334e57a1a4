//! The replication exchanges between simulated nodes, each decided by the shipped rule:
//! interest (`routing::Interest`), `Sync` answers (`warm::answer_sync`), applying an
//! event and asking for a gap (`repair::answer`), and `Heads` anti-entropy
//! (`heads::shares`, `heads::wanted`).

use tern_core::{OriginId, RemoteEvent, RemoteOutcome};
use tern_replication::heads;
use tern_replication::repair::{self, RepairPart};
use tern_replication::routing;
use tern_replication::{warm, Now};

use crate::network::{repair_items, Item};
use crate::Sim;

impl Sim {
    /// A same-region peer's interest reaches `to` (`routing::Interest::on_frame`).
    pub(crate) fn take_interest(&mut self, to: usize, from: usize, incarnation: u64) {
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
    pub(crate) fn sync_from(&mut self, home: usize, node: usize) {
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
    pub(crate) fn apply(&mut self, to: usize, from: usize, event: RemoteEvent) -> bool {
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
    pub(crate) fn repair_from(
        &mut self,
        peer: usize,
        node: usize,
        origin: OriginId,
        (from, to): (u64, u64),
    ) {
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
    pub(crate) fn compare_heads(&mut self, node: usize, peer: usize) {
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
}
