//! Answering peers: gap repairs and `Sync` from the hub's log (`tern_replication::repair`,
//! `warm::answer_sync`), this node's cursors for `Heads`, and history pages for a
//! channel's new home (`tern_replication::backfill`). The rules say what to answer;
//! this file turns it into frames, the one place where an event that does not fit a
//! frame becomes a `Skip`.

use std::sync::atomic::AtomicUsize;

use tern_replication::backfill::{self, Took, BACKFILL_PAGE};
use tern_replication::heads::{self, HEADS_CHANNELS_MAX, HEADS_PER_FRAME};
use tern_replication::receive;
use tern_replication::repair::{self, Plan, Read, Reading, RepairPart};
use tern_replication::warm;

use super::send::ignored;
use super::*;
use crate::wire::HeadV1;

/// One of [`Replicator::backfill_answers`], given back when dropped.
struct BackfillSlot<'a>(&'a AtomicUsize);

/// What the store holds of `origin`'s `from..=to` on `key` (a bounded read, blocking);
/// `None` when the store's cursor is short of `from`.
fn stored(
    history: &dyn HistoryAccess,
    key: &ChannelKey,
    origin: u64,
    (from, to): (u64, u64),
) -> Option<Read> {
    let upto = history
        .cursor(&key.app, &key.name)
        .iter()
        .find(|(o, _)| *o == origin)
        .map_or(0, |(_, seq)| *seq);
    if upto < from {
        return None;
    }
    let (events, whole_from) = history.events(&key.app, &key.name, origin, from, to.min(upto));
    Some(Read {
        events,
        upto,
        whole_from,
    })
}

impl Drop for BackfillSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Replicator {
    /// Runs `read` off the runtime with the history store, holding one of
    /// `BACKFILL_ANSWERS_MAX` slots (released however the read ends); with none free,
    /// counts `busy` and reads nothing (the peer asks again).
    fn read_store(
        self: &Arc<Self>,
        busy: &'static str,
        read: impl FnOnce(&Arc<Self>, Arc<dyn HistoryAccess>) + Send + 'static,
    ) {
        self.read_store_or_not(busy, |me, history| {
            if let Some(history) = history {
                read(me, history);
            }
        });
    }

    /// [`Self::read_store`], but `read` also runs, at once and with `None`, when no
    /// store can be read (none, or no slot free).
    fn read_store_or_not(
        self: &Arc<Self>,
        busy: &'static str,
        read: impl FnOnce(&Arc<Self>, Option<Arc<dyn HistoryAccess>>) + Send + 'static,
    ) {
        let Some(history) = self.history.get().cloned() else {
            return read(self, None);
        };
        if self.backfill_answers.fetch_add(1, Ordering::SeqCst) >= BACKFILL_ANSWERS_MAX {
            self.backfill_answers.fetch_sub(1, Ordering::SeqCst);
            ignored(busy);
            return read(self, None);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = BackfillSlot(&me.backfill_answers);
            read(&me, Some(history));
        });
    }

    /// Sends each peer the cursors of the channels it shares with us (`heads::shares`:
    /// it is their home in its region, or we hold its interest) where the two disagree
    /// or the slow round is due (`heads::Quiet`); it asks for what it lacks. The bytes
    /// grow with what two nodes share and disagree on, not with all our channels.
    pub(super) fn send_heads(&self) {
        let Some(hub) = self.running.get().and_then(|r| r.hub.upgrade()) else {
            return;
        };
        let mut per_peer: HashMap<String, Vec<HeadV1>> = HashMap::new();
        // The cursors are read before the replicator lock is taken, never under it: a
        // remote event holds its channel's lock while it is journaled (`record` takes
        // the replicator lock), so reading a channel under the replicator lock waits on
        // a thread that waits on us, and the node's runtime stops (it did, under
        // 20,000 msg/s: gossip fell silent and the region was declared dead).
        let skip = self.heads_skip.load(Ordering::Relaxed);
        let (cursors, next) = hub.cursors_from(skip, HEADS_CHANNELS_MAX);
        self.heads_skip.store(next, Ordering::Relaxed);
        let now = self.now();
        {
            let out = lock(&self.out);
            if out.peers.is_empty() {
                return;
            }
            let mut quiet = lock(&self.quiet);
            for (key, cursor) in cursors {
                let origins: Vec<(u64, u64)> = cursor.origins().map(|(o, s)| (o.0, s)).collect();
                if origins.is_empty() {
                    continue;
                }
                let digest = heads::digest(&origins);
                let homes = routing::homes(&key, self.nodes(&out));
                let interested = self.interested(&out, &key);
                for peer in out.peers.values() {
                    let id = peer.spec.node_id.as_str();
                    if !heads::shares(&homes, peer.node(), interested.contains(&id))
                        || !quiet.send(peer.spec.origin, &key, digest, now)
                    {
                        continue;
                    }
                    per_peer.entry(id.to_string()).or_default().push(HeadV1 {
                        app: key.app.to_string(),
                        channel: key.name.to_string(),
                        origins: origins.clone(),
                    });
                }
            }
        }
        for (peer, heads) in per_peer {
            for chunk in heads.chunks(HEADS_PER_FRAME) {
                let frame = FrameV1::Heads {
                    channels: chunk.to_vec(),
                };
                self.send_control(&peer, frame);
            }
        }
    }

    /// Answers a peer's `Repair` (`repair::plan`, then `repair::finish`): from the log,
    /// and from the store where the log has holes or the request reaches past the hub's
    /// cursor, or from the store alone when the hub has nothing of it. The store is read
    /// off the runtime; with no read slot free, the log's events go alone (no `Skip`: a
    /// hole nothing vouches for), and a store-only answer is not sent (the asker asks
    /// again).
    pub(super) fn answer_repair(
        self: &Arc<Self>,
        hub: &Hub,
        peer: &str,
        key: &ChannelKey,
        origin: u64,
        (from, to): (u64, u64),
    ) {
        let plan = repair::plan(hub, key, OriginId(origin), from, to);
        if !plan.reads_store() || self.history.get().is_none() {
            // Nothing to read, or no store to read it from.
            let parts = repair::finish(plan, from, to, |_| Reading::Short);
            return self.send_repair(peer, key, origin, parts);
        }
        let busy = match plan {
            Plan::Store => "repair_from_store_busy",
            Plan::Log { .. } => "repair_holes_from_store_busy",
        };
        let (peer, key) = (peer.to_string(), key.clone());
        self.read_store_or_not(busy, move |me, history| {
            let parts = repair::finish(plan, from, to, |span| match &history {
                None => Reading::Busy,
                Some(history) => {
                    stored(&**history, &key, origin, span).map_or(Reading::Short, Reading::Read)
                }
            });
            me.take_past_hub(&key, origin, &parts);
            if !parts.is_empty() {
                me.send_repair(&peer, &key, origin, parts);
            }
        });
    }

    /// What this node's store answered past its hub's cursor goes to its hub too
    /// (`repair::past_hub`), so its `Heads` list it until the asker has it.
    fn take_past_hub(&self, key: &ChannelKey, origin: u64, parts: &[RepairPart]) {
        let Some(hub) = self.running.get().and_then(|r| r.hub.upgrade()) else {
            return;
        };
        let past = repair::past_hub(&hub, key, OriginId(origin), parts);
        self.apply_stored(&hub, key, past);
    }

    /// Events read from this node's own store, in order, applied to its hub if it keeps
    /// the channel (`receive::from_own_store`).
    fn apply_stored(&self, hub: &Hub, key: &ChannelKey, events: Vec<tern_core::RemoteEvent>) {
        if events.is_empty() {
            return;
        }
        let mut out = Vec::new();
        let kept = || self.holds(key);
        if let Err(err) = receive::from_own_store(self.at(hub), key, events, kept, &mut out) {
            tracing::warn!(channel = %key.name, error = %err, "a stored event was refused");
        }
        for action in out {
            if let receive::Do::Ignored(reason) = action {
                ignored(reason);
            }
        }
    }

    /// What this node's own store holds of a gap in its hub (`origin`'s `from..=to` on
    /// `key`), applied as soon as it is read, while the sender is asked too
    /// (`repair::own_store`: a copied history can hold events whose sender died before
    /// it sent them, and then no peer would answer).
    pub(super) fn fill_from_own_store(
        self: &Arc<Self>,
        key: &ChannelKey,
        origin: u64,
        (from, to): (u64, u64),
    ) {
        let key = key.clone();
        self.read_store("gap_from_own_store_busy", move |me, history| {
            let Some(read) = stored(&*history, &key, origin, (from, to)) else {
                return;
            };
            let Some(hub) = me.running.get().and_then(|r| r.hub.upgrade()) else {
                return;
            };
            me.apply_stored(&hub, &key, repair::own_store(read.events, from, to));
        });
    }

    fn send_repair(&self, peer: &str, key: &ChannelKey, origin: u64, parts: Vec<RepairPart>) {
        let skip = |upto: u64| FrameV1::Skip {
            app: key.app.to_string(),
            channel: key.name.to_string(),
            origin,
            upto,
        };
        for part in parts {
            let event = match part {
                RepairPart::Skip(upto) => {
                    self.send_control(peer, skip(upto));
                    continue;
                }
                RepairPart::Event(event) => event,
            };
            let frame = EventV1::from_event(&key.app, &key.name, &event);
            if frame.fits() {
                self.send_control(peer, FrameV1::Event(frame));
                continue;
            }
            oversized(key, event.seq, frame.frame.len());
            self.send_control(peer, skip(event.seq));
        }
    }

    /// Answers `Sync`: the channel's log per origin (as repair answers), its presence
    /// members, then `Synced` with the cursor.
    pub(super) fn answer_sync(&self, hub: &Hub, peer: &str, key: &ChannelKey) {
        let answer = warm::answer_sync(hub, key);
        for (origin, parts) in answer.repairs {
            self.send_repair(peer, key, origin.0, parts);
        }
        for members in warm::member_pages(answer.members) {
            let frame = tern_protocol::ProtocolMessage {
                presence: Some(members),
                ..Default::default()
            };
            let frame = FrameV1::SyncMembers {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                frame: tern_protocol::encode(tern_protocol::Format::Msgpack, &frame).to_vec(),
            };
            self.send_control(peer, frame);
        }
        let frame = FrameV1::Synced {
            app: key.app.to_string(),
            channel: key.name.to_string(),
            origins: answer.cursor.iter().map(|(o, seq)| (o.0, *seq)).collect(),
        };
        self.send_control(peer, frame);
    }

    /// Starts copying the channel's stored history from its home in another region when
    /// this node is the channel's home here and has a history store: always after a
    /// `Skip` (`listed` is `None`: events no log had), otherwise (`listed`: the node whose
    /// `Heads` told of the channel, and its cursor) only when the store here lacks some
    /// of what that cursor lists (`backfill::covers`, `Backfills::start`). The `Heads`
    /// sender is also the source when no other region has a home.
    pub(super) fn maybe_backfill(&self, key: &ChannelKey, listed: Option<(&str, &[(u64, u64)])>) {
        let Some(history) = self.history.get() else {
            return;
        };
        let source = {
            let out = lock(&self.out);
            let homes = routing::homes(key, self.nodes(&out));
            let told_by = listed.map(|(peer, _)| peer);
            let source =
                backfill::source(&homes, &self.config.region, &self.config.node_id, told_by);
            match source {
                Some(node) => node.to_string(),
                None => return,
            }
        };
        let now = self.now();
        let missed = listed.is_none();
        let stored = || {
            let theirs = listed.map_or(&[][..], |(_, cursor)| cursor);
            backfill::covers(&history.cursor(&key.app, &key.name), theirs)
        };
        if !lock(&self.backfills).start(key, &source, now, missed, stored) {
            return;
        }
        self.tick_wake.notify_one();
        tracing::info!(channel = %key.name, from = %source, "copying the channel's history to its new home");
        for presence in [false, true] {
            let frame = FrameV1::Backfill {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                presence,
                after: None,
            };
            self.send_control(&source, frame);
        }
    }

    /// Answers one `Backfill` page from the store (off the async runtime).
    pub(super) fn answer_backfill(
        self: &Arc<Self>,
        peer: String,
        key: ChannelKey,
        presence: bool,
        after: Option<ItemPosV1>,
    ) {
        self.read_store("backfill_busy", move |me, history| {
            let (mut items, mut more) =
                history.page(&key.app, &key.name, presence, after, BACKFILL_PAGE);
            // Items are stored messages (each within the publish limit), but a page of
            // them must still fit a frame: cut it and let the peer ask for the rest.
            if let Some(cut) = backfill::cut_page(items.iter().map(|i| i.payload.len())) {
                items.truncate(cut);
                more = true;
            }
            let frame = FrameV1::BackfillItems {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                presence,
                items,
                more,
            };
            me.send_control(&peer, frame);
        });
    }

    /// Stores one page of copied history and asks for the next.
    pub(super) fn take_backfill(
        &self,
        peer: &str,
        key: ChannelKey,
        presence: bool,
        items: Vec<ItemV1>,
        more: bool,
    ) {
        let Some(history) = self.history.get() else {
            return;
        };
        let last = items.last().map(|item| item.position);
        // Only answers to what we asked for (a late duplicate is harmless anyway).
        let now = self.now();
        let took = lock(&self.backfills).took(&key, peer, presence, last, more, now);
        if took == Took::Unasked {
            return;
        }
        metrics::counter!("tern_history_backfilled_items_total").increment(items.len() as u64);
        history.put(&key.app, &key.name, presence, items);
        if let (Took::Next, true, Some(after)) = (took, more, last) {
            let frame = FrameV1::Backfill {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                presence,
                after: Some(after),
            };
            self.send_control(peer, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::PresenceMessage;
    use tern_replication::warm::member_pages;

    /// Presence SYNC to a peer is cut by encoded size as well as by count: 256 members
    /// with 64 KB of data each (16 MiB together, past the frame limit) go in several
    /// frames, each of which fits, and no member is lost or repeated.
    #[test]
    fn member_pages_fit_a_frame() {
        let members: Vec<PresenceMessage> = (0..256)
            .map(|i| PresenceMessage {
                action: tern_protocol::presence_action::PRESENT,
                client_id: Some(format!("c{i}")),
                connection_id: Some(format!("conn-{i}")),
                data: Some(tern_protocol::Data::String("d".repeat(64_000))),
                ..Default::default()
            })
            .collect();
        let pages = member_pages(members.clone());
        assert!(pages.len() > 1);
        for page in &pages {
            let frame = FrameV1::SyncMembers {
                app: "app".into(),
                channel: "room".into(),
                frame: tern_protocol::encode(
                    tern_protocol::Format::Msgpack,
                    &tern_protocol::ProtocolMessage {
                        presence: Some(page.clone()),
                        ..Default::default()
                    },
                )
                .to_vec(),
            };
            assert!(crate::wire::encode(&frame).len() <= crate::wire::FRAME_BYTES_MAX);
        }
        assert_eq!(pages.concat(), members);
        // Small members still go 256 to a frame.
        let small = vec![PresenceMessage::default(); 600];
        let sizes: Vec<usize> = member_pages(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
