//! The replication exchanges between simulated nodes, each decided by the shipped rule:
//! interest (`routing::Interest`), `Sync` answers (`warm::answer_sync`), applying an
//! event and asking for a gap (`repair::answer`), `Heads` anti-entropy
//! (`heads::shares`, `heads::wanted`), and the handoff of stored channels to their new
//! homes after a view change (`handoff`).

use tern_core::{OriginId, RemoteEvent, RemoteOutcome};
use tern_replication::handoff::{Member, StoredChannel};
use tern_replication::heads::{self, HEADS_CHANNELS_MAX, HEADS_PER_FRAME};
use tern_replication::links;
use tern_replication::receive::{self, Do};
use tern_replication::repair::{self, Read, Reading, RepairPart};
use tern_replication::routing::INTEREST_PER_FRAME;
use tern_replication::warm;

use crate::network::{repair_items, Item};
use crate::node::lock;
use crate::{Control, Sim};

/// One channel a sender lists in its `Heads`: the channel and the sender's cursor.
struct Head {
    ch: usize,
    origins: Vec<(u64, u64)>,
}

/// What a sender lists this round, and per node index which of those channels it sends
/// there (`heads::shares` in its view).
#[derive(Default)]
struct Heads {
    list: Vec<Head>,
    to: Vec<Vec<usize>>,
}

impl Sim {
    /// A same-region peer's interest in `chans` reaches `to` (`routing::Interest::on_frame`).
    pub(crate) fn take_interest(
        &mut self,
        to: usize,
        from: usize,
        incarnation: u64,
        chans: &[usize],
    ) {
        if self.regions[from] != self.regions[to] {
            return;
        }
        let now = self.now_at(to);
        let keys: Vec<_> = chans.iter().map(|&ch| self.keys[ch].clone()).collect();
        let node = &mut self.nodes[to];
        node.interest.on_frame(&self.ids[from], keys, true, now);
        for &ch in chans {
            node.interest_from.insert((from, ch), incarnation);
        }
    }

    /// Node `home` answers node `node`'s `Sync` on `ch` (`warm::answer_sync`): per origin
    /// its repair answer from 1, then its presence members and cursor, as one item (the
    /// real frames follow each other on one ordered link).
    pub(crate) fn sync_from(&mut self, home: usize, node: usize, ch: usize, incarnation: u64) {
        let answer = warm::answer_sync(&self.nodes[home].hub, &self.keys[ch]);
        let items = answer
            .repairs
            .into_iter()
            .flat_map(|(origin, parts)| repair_items(home, ch, origin, parts))
            .collect();
        let item = Item::SyncState {
            from: home,
            ch,
            for_incarnation: incarnation,
            items,
            members: answer.members,
            cursor: answer.cursor,
        };
        self.send(home, node, item);
    }

    /// A replicated event from `from` reaches `to` (`receive::event`); `link` is its
    /// position on `from`'s link (`None`: a repair or `Sync` answer).
    pub(crate) fn take_event(
        &mut self,
        to: usize,
        from: usize,
        ch: usize,
        event: RemoteEvent,
        link: Option<(u64, u64)>,
    ) {
        let (now, now_ms) = (self.now_at(to), self.hub_now(to));
        let key = self.keys[ch].clone();
        // Asked only off the link (the driver's `holds` takes its locks); the sim's is
        // cheap enough to ask first.
        let kept = link.is_some() || self.holds(to, ch);
        // A gap asks the event's sender: its round trip, each way delayed and jittered
        // at most as the network does (the driver waits a `Heads` round instead: QUIC's
        // estimate does not see the emulated WAN).
        let round_trip = 2 * (self.latency_ms[to][from] + self.faults.jitter_ms as i64);
        let again_after = std::time::Duration::from_millis(round_trip as u64);
        let node = &mut self.nodes[to];
        let (hub, gaps) = (&node.hub, &mut node.gaps);
        let at = receive::At { hub, now, now_ms };
        let mut out = Vec::new();
        let taken = receive::event(
            at,
            &key,
            event,
            link.is_some(),
            || kept,
            || gaps,
            again_after,
            &mut out,
        )
        .expect("the sim's limits hold every channel");
        self.log(|| format!("   {:?}", taken.outcome));
        match taken.outcome {
            Some(RemoteOutcome::Duplicate) => self.stats.duplicates_seen += 1,
            Some(RemoteOutcome::Gap { .. }) => self.stats.gaps += 1,
            _ => {}
        }
        if let (true, Some(link)) = (taken.counted, link) {
            self.applied_on_link(to, from, link);
        }
        self.carry_out(to, from, out);
    }

    /// Node `at`'s hub and clocks (`receive::At`).
    pub(crate) fn at(&self, at: usize) -> receive::At<'_> {
        receive::At {
            hub: &self.nodes[at].hub,
            now: self.now_at(at),
            now_ms: self.hub_now(at),
        }
    }

    /// Carries out what a frame from `peer` left to node `at` (`receive::Do`), in order,
    /// as the driver's `carry_out`.
    pub(crate) fn carry_out(&mut self, at: usize, peer: usize, out: Vec<Do>) {
        for action in out {
            match action {
                Do::Ask {
                    key,
                    origin,
                    from,
                    to,
                } => {
                    let ch = self.index[&key];
                    self.log(|| format!("   n{at} asks n{peer} for {origin:x} {from}..={to}"));
                    self.repair_from(peer, at, ch, OriginId(origin), (from, to));
                }
                Do::FillFromStore {
                    key,
                    origin,
                    from,
                    to,
                } => self.fill_from_own_store(at, &key, OriginId(origin), (from, to)),
                Do::Backfill { key, listed } => {
                    let ch = self.index[&key];
                    self.maybe_backfill(at, ch, listed.as_deref().map(|l| (peer, l)));
                }
                Do::Warmed(key) => {
                    let ch = self.index[&key];
                    let warming = self.nodes[at].subs.get(&ch).and_then(|s| s.warming);
                    if warming.is_some() {
                        self.stats.syncs += 1;
                        self.log(|| format!("n{at} took c{ch}'s state from n{peer}"));
                        self.attach(at, ch);
                    }
                }
                Do::Skipped { applied, .. } => {
                    self.log(|| format!("   skipped, {applied} applied"))
                }
                Do::GaveUp {
                    key,
                    origin,
                    upto,
                    applied,
                } => {
                    self.stats.dead_gaps_skipped += 1;
                    self.log(|| {
                        format!(
                            "n{at} gives up on {}'s gap up to {upto} in c{}: {applied} applied",
                            OriginId(origin),
                            self.index[&key]
                        )
                    });
                }
                Do::StallsFull => self.stats.stalls_full += 1,
                Do::Ignored(reason) => self.log(|| format!("   ignored: {reason}")),
            }
        }
    }

    /// What node `at`'s own store holds of a gap in its hub (`origin`'s `from..=to` on
    /// `key`), applied at once (`repair::own_store`, `receive::from_own_store`, as the
    /// driver's `fill_from_own_store`).
    fn fill_from_own_store(
        &mut self,
        at: usize,
        key: &tern_core::ChannelKey,
        origin: OriginId,
        (from, to): (u64, u64),
    ) {
        let ch = self.index[key];
        let (stored, _) = self.stored_range(at, ch, origin, (from, to));
        let events = repair::own_store(stored, from, to);
        self.apply_stored(
            at,
            ch,
            events,
            &format!("fills {from}..={to} from its own store"),
        );
    }

    /// Events read from node `at`'s own store, in order, applied to its hub if it keeps
    /// `ch` (`receive::from_own_store`, as the driver's `apply_stored`); `what` names
    /// them in the trace.
    fn apply_stored(&mut self, at: usize, ch: usize, events: Vec<RemoteEvent>, what: &str) {
        let count = events.len();
        if count == 0 {
            return;
        }
        let key = self.keys[ch].clone();
        let kept = || self.holds(at, ch);
        let mut out = Vec::new();
        receive::from_own_store(self.at(at), &key, events, kept, &mut out)
            .expect("the sim's limits hold every channel");
        if out.is_empty() {
            self.log(|| format!("   n{at} {what} ({count} events)"));
        }
    }

    /// What node `at`'s store holds of `origin`'s `from..=to` on `ch`, and its stored
    /// cursor for the origin (the driver's `stored` read in `answers.rs`).
    fn stored_range(
        &self,
        at: usize,
        ch: usize,
        origin: OriginId,
        (from, to): (u64, u64),
    ) -> (Vec<RemoteEvent>, u64) {
        let stored = lock(&self.nodes[at].outbox.stored);
        let Some(channel) = stored.get(&self.keys[ch]) else {
            return (Vec::new(), 0);
        };
        let events = channel
            .events
            .range((origin, from)..=(origin, to))
            .map(|(_, e)| e.clone())
            .collect();
        (events, channel.cursor.get(&origin).copied().unwrap_or(0))
    }

    /// `peer` answers `node`'s repair request for `origin`'s `from..=to` on `ch`
    /// (`repair::plan` and `repair::finish`, as the driver's `answer_repair`).
    pub(crate) fn repair_from(
        &mut self,
        peer: usize,
        node: usize,
        ch: usize,
        origin: OriginId,
        (from, to): (u64, u64),
    ) {
        if !self.nodes[peer].up {
            return;
        }
        let plan = repair::plan(&self.nodes[peer].hub, &self.keys[ch], origin, from, to);
        // The sim's store reads are whole and never busy.
        let parts = repair::finish(plan, from, to, |span| {
            let (events, upto) = self.stored_range(peer, ch, origin, span);
            if upto < span.0 {
                Reading::Short
            } else {
                Reading::Read(Read {
                    events,
                    upto,
                    whole_from: span.0,
                })
            }
        });
        self.stats.skips += parts
            .iter()
            .filter(|p| matches!(p, RepairPart::Skip(_)))
            .count() as u64;
        // What the store answered past the hub's cursor goes to the hub too
        // (`repair::past_hub`, as the driver's `answer_repair`).
        let past = repair::past_hub(&self.nodes[peer].hub, &self.keys[ch], origin, &parts);
        self.apply_stored(peer, ch, past, "takes what its store answered");
        if !parts.is_empty() {
            let items = repair_items(peer, ch, origin, parts);
            self.send(peer, node, Item::Answer { ch, items });
        }
    }

    /// What `peer` lists in its `Heads` this round, as the driver does: the channels its
    /// hub holds (at most `HEADS_CHANNELS_MAX`, in key order here so a seed replays) with
    /// a non-empty cursor, each with its homes and interested peers in `peer`'s view.
    fn listed_heads(&self, peer: usize) -> Heads {
        let mut heads = Heads {
            list: Vec::new(),
            to: vec![Vec::new(); self.nodes.len()],
        };
        if !self.nodes[peer].up {
            return heads;
        }
        let now = self.now_at(peer);
        let mut cursors = self.nodes[peer].hub.cursors(HEADS_CHANNELS_MAX);
        cursors.sort_by(|a, b| (&a.0.app, &a.0.name).cmp(&(&b.0.app, &b.0.name)));
        let mask = self.view_mask(peer);
        for (key, cursor) in cursors {
            let origins: Vec<(u64, u64)> = cursor.origins().map(|(o, s)| (o.0, s)).collect();
            if origins.is_empty() {
                continue;
            }
            let ch = self.index[&key];
            let homes = self.home_ids_among(mask, ch);
            let interested = self.nodes[peer].interest.interested(&key, now);
            let index = heads.list.len();
            for node in (0..self.nodes.len()).filter(|&n| n != peer) {
                let heard = self.regions[node] == self.regions[peer]
                    && interested.contains(&self.ids[node].as_str());
                if heads::shares(&homes, self.member(node), heard) {
                    heads.to[node].push(index);
                }
            }
            heads.list.push(Head { ch, origins });
        }
        heads
    }

    /// Of what `peer` shares with each node this round, what it sends: only where the
    /// two disagree, the cursor changed, or the slow round is due (`heads::Quiet`, as
    /// the driver's `send_heads`).
    fn quiet_heads(&mut self, peer: usize, listed: &mut Heads) {
        let now = self.now_at(peer);
        let Heads { list, to } = listed;
        let digests: Vec<u64> = list.iter().map(|h| heads::digest(&h.origins)).collect();
        for (node, to) in to.iter_mut().enumerate() {
            let origin = self.nodes[node].origin.0;
            let before = to.len();
            let quiet = &mut self.nodes[peer].quiet;
            to.retain(|&i| quiet.send(origin, &self.keys[list[i].ch], digests[i], now));
            self.stats.heads_quiet += (before - to.len()) as u64;
        }
    }

    /// `peer`'s heads reach `node` for the channels `peer` shares with it
    /// (`heads::shares`, in `peer`'s view; counted in `peer`'s control bytes), and
    /// `node` asks `peer` for what `heads::wanted` says it lacks of the channels it
    /// keeps; it ignores the others.
    fn take_heads(&mut self, node: usize, peer: usize, heads_of_peer: &Heads) {
        if !self.nodes[peer].up || node == peer || !self.in_view(peer, node) {
            return;
        }
        let shared: Vec<&Head> = heads_of_peer.to[node]
            .iter()
            .map(|&i| &heads_of_peer.list[i])
            .collect();
        self.stats.heads_unshared += (heads_of_peer.list.len() - shared.len()) as u64;
        if let Some(sizer) = &self.sizer {
            for chunk in shared.chunks(HEADS_PER_FRAME) {
                let list: Vec<_> = chunk
                    .iter()
                    .map(|h| (&self.keys[h.ch], h.origins.as_slice()))
                    .collect();
                self.control_bytes[peer].0 += sizer(Control::Heads(&list)) as u64;
            }
        }
        if !self.nodes[node].up || self.partitioned.contains(&(node.min(peer), node.max(peer))) {
            return;
        }
        let sender = self.nodes[peer].origin.0;
        for head in &shared {
            let key = &self.keys[head.ch];
            self.nodes[node].quiet.heard(sender, key, &head.origins);
        }
        if self.trace {
            for head in &shared {
                if !self.holds(node, head.ch) {
                    self.log(|| format!("n{node} ignores heads of c{} from n{peer}", head.ch));
                }
            }
        }
        let live: Vec<u64> = self.view(node).iter().map(|n| n.origin).collect();
        let live = |origin: u64| live.contains(&origin);
        let asker = heads::Asker {
            own: self.nodes[node].origin.0,
            sender: self.nodes[peer].origin.0,
            live: &live,
        };
        if self.trace {
            for head in &shared {
                let mine = self.nodes[node].hub.cursor(&self.keys[head.ch]);
                let line = format!(
                    "n{node} <- heads c{} from n{peer}: {:?}, mine {:?}",
                    head.ch,
                    head.origins,
                    mine.origins().collect::<Vec<_>>()
                );
                self.log(|| line);
            }
        }
        let listed = shared
            .iter()
            .map(|h| (&self.keys[h.ch], h.origins.as_slice()));
        let mut previous = self
            .previous_heads
            .remove(&(node, peer))
            .unwrap_or_default();
        let mut out = Vec::new();
        let kept = |key: &tern_core::ChannelKey| self.holds(node, self.index[key]);
        receive::heads(self.at(node), &asker, &mut previous, listed, kept, &mut out);
        self.previous_heads.insert((node, peer), previous);
        self.carry_out(node, peer, out);
    }

    /// Every reachable peer's heads reach `node` (a restarted node catches up).
    pub(crate) fn catch_up_from_heads(&mut self, node: usize) {
        for peer in 0..self.nodes.len() {
            if peer != node {
                let heads = self.listed_heads(peer);
                self.take_heads(node, peer, &heads);
            }
        }
    }

    /// A round of anti-entropy: every node with a subscriber repeats its interest to its
    /// region's peers, stalled links resend, and every node gets every reachable peer's
    /// heads.
    pub fn anti_entropy(&mut self) {
        self.refresh_interest();
        self.resend_and_expire();
        self.backfill_round();
        self.send_heads_round();
    }

    /// The resend timer alone (stalled links resend; expired replies are NACKed).
    pub fn resend_round(&mut self) {
        self.resend_and_expire();
        self.backfill_round();
    }

    /// Every node sends its heads (`Heads`, each second in the driver), and forgets
    /// interest not repeated within its TTL (the driver's tick).
    pub fn send_heads_round(&mut self) {
        for at in 0..self.nodes.len() {
            if self.nodes[at].up {
                let now = self.now_at(at);
                self.nodes[at].interest.expire(now);
                // Idle channels leave the hub (the server's housekeeping, each second),
                // unless events sent on them are not settled on their links.
                let state = &self.acks[at];
                let link = |epoch: u64| {
                    let found = state.out.values().find(|l| l.link.epoch == epoch);
                    found.map(|l| l.link)
                };
                let pinned = state
                    .last_sent
                    .iter()
                    .filter(|(_, sent)| !links::settled(sent, link))
                    .map(|(&ch, _)| self.keys[ch].clone())
                    .collect();
                *lock(&self.nodes[at].outbox.pinned) = pinned;
                let hub_now = self.hub_now(at);
                let hub = &self.nodes[at].hub;
                let before = hub.channel_count();
                hub.sweep(hub_now);
                self.stats.retired += before.saturating_sub(hub.channel_count()) as u64;
            }
        }
        if let Err(err) = self.check_rule_bounds() {
            self.broken.get_or_insert(err);
        }
        self.handoff_round();
        self.stalls_round();
        let mut heads: Vec<Heads> = (0..self.nodes.len())
            .map(|p| self.listed_heads(p))
            .collect();
        for (peer, listed) in heads.iter_mut().enumerate() {
            self.quiet_heads(peer, listed);
        }
        for node in 0..self.nodes.len() {
            for (peer, heads) in heads.iter().enumerate() {
                if peer != node {
                    self.take_heads(node, peer, heads);
                }
            }
        }
    }

    /// Each live node skips the gaps of crashed origins (their node back as another
    /// incarnation) that no node filled for a while (`tern_replication::stalls`), as the
    /// driver's tick does each second; its membership comes from `handoff_round`.
    fn stalls_round(&mut self) {
        for at in 0..self.nodes.len() {
            if !self.nodes[at].up {
                continue;
            }
            let mut out = Vec::new();
            let mut gaps = std::mem::take(&mut self.nodes[at].gaps);
            receive::tick(self.at(at), &mut gaps, &mut out);
            self.nodes[at].gaps = gaps;
            self.carry_out(at, at, out);
        }
    }

    /// Each live node compares its view with the one it last compared and, when it
    /// changed, starts a handoff pass (`handoff::Handoff`, with the driver's settle and
    /// start-up windows); a due pass reads the node's whole store as one page, and
    /// each channel whose home moved goes to its new home as a `Heads` entry with the
    /// stored cursor, which the new home takes as any `Heads` (`take_heads`).
    fn handoff_round(&mut self) {
        let count = self.nodes.len();
        for at in 0..count {
            if !self.nodes[at].up {
                continue;
            }
            let since_boot = (self.hub_now(at) - self.nodes[at].booted_ms).max(0);
            let now = std::time::Duration::from_millis(since_boot as u64);
            // Members with their incarnations (a restart is a change); a node starts
            // knowing only itself, as the driver's first `set_peers` does.
            let view = self.members_of(self.view_mask(at));
            if view != self.nodes[at].view_seen {
                let mut before = std::mem::replace(&mut self.nodes[at].view_seen, view.clone());
                if before.is_empty() {
                    before.push(Member::from(self.member(at)));
                }
                self.nodes[at].gaps.stalls.on_members(&before, &view);
                self.nodes[at].handoff.on_members(&before, &view, now);
            }
            let Some(read) = self.nodes[at].handoff.next_read(now) else {
                continue;
            };
            let mut page: Vec<StoredChannel> = lock(&self.nodes[at].outbox.stored)
                .iter()
                .map(|(key, s)| {
                    (
                        key.clone(),
                        s.cursor.iter().map(|(o, q)| (o.0, *q)).collect(),
                    )
                })
                .collect();
            // The store lists channels in key order (and the run must not depend on a
            // hash map's).
            page.sort_by(|a, b| (&a.0.app, &a.0.name).cmp(&(&b.0.app, &b.0.name)));
            let me = self.ids[at].clone();
            let sends = self.nodes[at].handoff.on_page(read.pass, page, None, &me);
            let mut per_home: Vec<Option<Heads>> = (0..count).map(|_| None).collect();
            for (home, (key, origins)) in sends {
                let to = crate::cluster::node_index(&home);
                let heads = per_home[to].get_or_insert_with(|| Heads {
                    list: Vec::new(),
                    to: vec![Vec::new(); count],
                });
                self.log(|| format!("n{at} hands c{} over to n{to}", self.index[&key]));
                heads.to[to].push(heads.list.len());
                heads.list.push(Head {
                    ch: self.index[&key],
                    origins,
                });
                self.stats.handed_over += 1;
            }
            for (to, heads) in per_home.into_iter().enumerate() {
                if let Some(heads) = heads {
                    self.take_heads(to, at, &heads);
                }
            }
        }
    }

    /// The members (id and region) in `mask` (a bit per node index).
    fn members_of(&self, mask: u64) -> Vec<Member> {
        (0..self.nodes.len())
            .filter(|&i| mask & (1 << i) != 0)
            .map(|i| Member::from(self.member(i)))
            .collect()
    }

    /// Every node with subscribers repeats its interest in their channels to its
    /// region's peers (the replicator does every `INTEREST_REFRESH`).
    pub fn refresh_interest(&mut self) {
        for node in 0..self.nodes.len() {
            if !self.nodes[node].up || self.nodes[node].subs.is_empty() {
                continue;
            }
            let incarnation = self.nodes[node].incarnation;
            let chans: Vec<usize> = self.nodes[node].subs.keys().copied().collect();
            for peer in self.region_peers(node) {
                if let Some(sizer) = &self.sizer {
                    for chunk in chans.chunks(INTEREST_PER_FRAME) {
                        let keys: Vec<_> = chunk.iter().map(|&ch| &self.keys[ch]).collect();
                        self.control_bytes[node].1 += sizer(Control::Interest(&keys)) as u64;
                    }
                }
                let item = Item::Interest {
                    from: node,
                    incarnation,
                    chans: chans.clone(),
                };
                self.send(node, peer, item);
            }
        }
    }
}
