//! One channel's state: who is attached, who is present, and where its cursor stands.
//! A channel is owned by exactly one `Mutex` in the [`crate::Hub`]; everything here runs
//! under that lock, which is what orders fan-out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tern_protocol::{
    action, annotation_action, flags, Annotation, Message, PresenceMessage, ProtocolMessage,
};

use crate::cursor::{Cursor, OriginId};
use crate::delta::{DeltaCursor, DeltaState};
use crate::event::{ChannelEvent, Publisher, Subscriber};
use crate::journal::Journal;
use crate::key::ChannelKey;
use crate::log::{ChannelLog, Rewind};
use crate::mutation::is_change;
use crate::presence::{PresenceError, PresenceSet};
use crate::serial::{floor_after, SerialPosition};

/// How a connection attaches.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Granted Ably mode bits (`flags::SUBSCRIBE`, `flags::PRESENCE_SUBSCRIBE`, …).
    pub modes: u64,
    /// Whether the connection receives its own messages (`echo` query param).
    pub echo: bool,
    /// Continue from this cursor (a resumed connection re-attaching with its
    /// channelSerial): replay everything after it, or report continuity lost.
    pub resume_from: Option<Cursor>,
    /// Replay recent messages on a fresh attach (`rewind` param).
    pub rewind: Option<Rewind>,
    /// The attachment takes vcdiff deltas (`delta=vcdiff` channel param).
    pub delta: bool,
}

/// What the attaching connection needs to build its ATTACHED reply and presence SYNC.
/// Handed to the attach callback under the channel lock, so frames the callback queues
/// precede every event published after the attach.
#[derive(Debug)]
pub struct AttachSnapshot {
    pub channel_serial: String,
    /// Current members (empty unless the attachment has PRESENCE_SUBSCRIBE, and empty
    /// when resumed: the client keeps its own presence set and gets the backlog).
    pub members: Vec<PresenceMessage>,
    /// Events to send right after ATTACHED (and SYNC), before anything live, oldest first.
    pub backlog: Vec<Arc<ChannelEvent>>,
    /// Continuity from `resume_from` is preserved (the ATTACHED carries RESUMED).
    pub resumed: bool,
    /// `resume_from` was given but the events after it are no longer all held.
    pub continuity_lost: bool,
}

/// Occupancy of a channel (REST `GET /channels/{name}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStatus {
    pub connections: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub presence_connections: usize,
    pub presence_members: usize,
    pub presence_subscribers: usize,
}

struct Attachment {
    sink: Arc<dyn Subscriber>,
    options: AttachOptions,
    /// For a delta attachment: which event it last got, so it gets a delta only on that.
    delta: Option<DeltaCursor>,
}

pub(crate) struct Channel {
    name: Arc<str>,
    attachments: HashMap<Arc<str>, Attachment>,
    presence: PresenceSet,
    cursor: Cursor,
    log: ChannelLog,
    delta: DeltaState,
    /// Client-supplied message ids seen recently → the serial they were given.
    ids: IdWindow,
    /// Remote events that arrived ahead of a gap, by (origin, seq); bounded by
    /// `CoreLimits::pending_max`.
    pending: BTreeMap<(OriginId, u64), RemoteEvent>,
    /// Next origin sequence this node assigns on this channel.
    next_seq: u64,
    /// When the channel last became empty (no attachments, no members).
    pub(crate) empty_since_ms: Option<i64>,
    /// Set by the sweep when the channel leaves the hub's map; a caller that locked it
    /// afterwards must look the channel up again.
    pub(crate) retired: bool,
}

impl Channel {
    pub(crate) fn new(name: Arc<str>, now_ms: i64) -> Self {
        Channel {
            name,
            attachments: HashMap::new(),
            presence: PresenceSet::default(),
            cursor: Cursor::new(),
            log: ChannelLog::default(),
            delta: DeltaState::default(),
            ids: IdWindow::default(),
            pending: BTreeMap::new(),
            next_seq: 1,
            empty_since_ms: Some(now_ms),
            retired: false,
        }
    }

    /// Continues a channel this node held before (see `Journal::restore`): this node's
    /// own sequence goes on after the highest it ever assigned here. Other origins'
    /// positions are not taken over: the log is empty, and a node whose cursor claimed
    /// events it cannot supply would answer peers' repairs with a `Skip` for events
    /// other nodes still have; it repairs them from its peers like any new channel.
    pub(crate) fn restore(&mut self, cursor: Cursor, own: OriginId) {
        let mine = cursor.get(own);
        self.next_seq = self.next_seq.max(mine + 1);
        self.cursor.advance(own, mine);
    }

    /// An event was applied: an empty channel's idle time starts again, so it is dropped
    /// only once it has had neither attachments nor events for the retain period (and
    /// its events are long in the store that `restore` reads).
    fn active(&mut self, now_ms: i64) {
        if let Some(since) = &mut self.empty_since_ms {
            *since = (*since).max(now_ms);
        }
    }

    pub(crate) fn has_attachments(&self) -> bool {
        !self.attachments.is_empty()
    }

    /// See `Hub::seed_members`. Returns how many members were taken in.
    pub(crate) fn seed_members(
        &mut self,
        ctx: &ApplyContext<'_>,
        members: Vec<PresenceMessage>,
    ) -> usize {
        let departed = ctx
            .departed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut taken = 0;
        for member in members {
            let conn = member.connection_id.as_deref().unwrap_or_default();
            if departed.iter().any(|prefix| conn.starts_with(&**prefix)) {
                continue;
            }
            if let Ok(Some(_)) = self.presence.apply(member, usize::MAX) {
                taken += 1;
            }
        }
        drop(departed);
        self.touch(ctx.now_ms);
        taken
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.attachments.is_empty() && self.presence.is_empty()
    }

    fn touch(&mut self, now_ms: i64) {
        self.empty_since_ms = if self.is_empty() {
            Some(self.empty_since_ms.unwrap_or(now_ms))
        } else {
            None
        };
    }

    pub(crate) fn attach(
        &mut self,
        own: OriginId,
        connection_id: Arc<str>,
        options: AttachOptions,
        sink: Arc<dyn Subscriber>,
        reply: impl FnOnce(&AttachSnapshot),
        now_ms: i64,
    ) {
        let (backlog, resumed, continuity_lost) = match (&options.resume_from, &options.rewind) {
            (Some(from), _) => match self.log.since(from, &self.cursor, own) {
                Some(events) => (events, true, false),
                None => (Vec::new(), false, true),
            },
            (None, Some(rewind)) => (self.log.rewind(rewind, &self.cursor.encode()), false, false),
            (None, None) => (Vec::new(), false, false),
        };
        let wants = |event: &ChannelEvent| options_want(&options, &connection_id, event);
        let mut options = options.clone();
        // A client resuming here from a node that was ahead of this one has seen events
        // this node lacks: the serials it is given must still cover them, or a later
        // failover would replay them. Once this node has caught up, nothing to cover.
        let seen = match &options.resume_from {
            Some(seen) if !self.cursor.covers(seen) => Some(seen.clone()),
            _ => None,
        };
        if seen.is_none() {
            options.resume_from = None;
        }
        let mut delta = options.delta.then(DeltaCursor::default);
        let backlog = backlog
            .into_iter()
            .filter(|e| wants(e))
            .map(|e| match (&seen, &mut delta) {
                (Some(seen), _) => covering(&e, seen),
                (None, Some(delta)) => delta.pick(&e),
                (None, None) => e,
            })
            .collect();
        let members = if options.modes & flags::PRESENCE_SUBSCRIBE != 0 && !resumed {
            self.presence.members()
        } else {
            Vec::new()
        };
        let mut channel_serial = self.cursor.clone();
        if let Some(seen) = &seen {
            channel_serial.merge(seen);
        }
        reply(&AttachSnapshot {
            channel_serial: channel_serial.encode(),
            members,
            backlog,
            resumed,
            continuity_lost,
        });
        if delta.is_some() {
            self.delta.attached();
        }
        let attachment = Attachment {
            sink,
            options,
            delta,
        };
        if let Some(replaced) = self.attachments.insert(connection_id, attachment) {
            self.forget(&replaced);
        }
        self.touch(now_ms);
    }

    /// Keeps only the `granted` mode bits of a connection's attachment; the modes it
    /// had, or `None` when it is not attached.
    pub(crate) fn restrict_modes(&mut self, connection_id: &str, granted: u64) -> Option<u64> {
        let attachment = self.attachments.get_mut(connection_id)?;
        let before = attachment.options.modes;
        attachment.options.modes = before & granted;
        Some(before)
    }

    pub(crate) fn detach(&mut self, connection_id: &str, now_ms: i64) -> bool {
        let removed = self.attachments.remove(connection_id);
        if let Some(removed) = &removed {
            self.forget(removed);
        }
        self.touch(now_ms);
        removed.is_some()
    }

    /// Bookkeeping for an attachment that left the channel.
    fn forget(&mut self, attachment: &Attachment) {
        if attachment.delta.is_some() {
            self.delta.detached();
        }
    }

    /// Assigns the next origin sequence and builds the shared outbound frame. `build`
    /// gets the event's serial position (index 0) to derive its messages' serials.
    fn next_event(
        &mut self,
        origin: OriginId,
        publisher: &Publisher,
        timestamp: i64,
        build: impl FnOnce(&mut ProtocolMessage, SerialPosition),
    ) -> ChannelEvent {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.cursor.advance(origin, seq);
        self.active(timestamp);
        let at = SerialPosition {
            timestamp_ms: timestamp,
            origin,
            seq,
            index: 0,
        };
        let mut frame = ProtocolMessage {
            channel: Some(self.name.to_string()),
            id: Some(publisher.frame_id.clone()),
            connection_id: publisher.connection_id.as_deref().map(str::to_string),
            timestamp: Some(timestamp),
            channel_serial: Some(self.cursor.encode()),
            ..Default::default()
        };
        build(&mut frame, at);
        ChannelEvent::new(origin, seq, publisher.connection_id.clone(), frame)
    }

    /// Applies a publish and fans it out. Messages whose client-supplied id was seen
    /// within the idempotency window are not published again; they get their original
    /// serial back. Returns the per-message serials and the event (if anything was new).
    pub(crate) fn publish(
        &mut self,
        ctx: &ApplyContext<'_>,
        publisher: &Publisher,
        messages: Vec<Message>,
    ) -> (Vec<Option<String>>, Option<Arc<ChannelEvent>>) {
        self.ids
            .expire(ctx.now_ms, ctx.limits.idempotency_window_ms);
        let mut serials: Vec<Option<String>> = Vec::with_capacity(messages.len());
        let mut fresh = Vec::with_capacity(messages.len());
        let mut fresh_slots = Vec::with_capacity(messages.len());
        for message in messages {
            match message.id.as_deref().and_then(|id| self.ids.get(id)) {
                Some(serial) => serials.push(Some(serial.to_string())),
                None => {
                    fresh_slots.push(serials.len());
                    serials.push(None);
                    fresh.push(message);
                }
            }
        }
        self.journal_again(ctx, &serials, &fresh_slots);
        if fresh.is_empty() {
            return (serials, None);
        }
        let now_ms = ctx.now_ms;
        // A change or annotation sorts after the message it changes (see `serial`).
        let timestamp = fresh
            .iter()
            .filter(|m| is_change(m.action))
            .filter_map(|m| m.serial.as_deref().and_then(SerialPosition::decode))
            .map(|target| floor_after(&target))
            .fold(now_ms, i64::max);
        let supplied: Vec<bool> = fresh.iter().map(|m| m.id.is_some()).collect();
        let mut assigned = Vec::with_capacity(fresh.len());
        let event = self.next_event(ctx.origin, publisher, timestamp, |frame, at| {
            for (index, msg) in fresh.iter_mut().enumerate() {
                let serial = SerialPosition {
                    index: index as u32,
                    ..at
                }
                .encode();
                if msg.id.is_none() {
                    msg.id = Some(format!("{}:{index}", publisher.frame_id));
                }
                if msg.timestamp.is_none() {
                    msg.timestamp = Some(timestamp);
                }
                if msg.connection_id.is_none() {
                    msg.connection_id = publisher.connection_id.as_deref().map(str::to_string);
                }
                msg.action.get_or_insert(0);
                msg.connection_key = None;
                if is_change(msg.action) && msg.serial.is_some() {
                    // The message keeps the serial of the one it changes; the change
                    // is named by its version.
                    let version = msg.version.get_or_insert_with(Default::default);
                    version.serial = Some(serial.clone());
                    version.timestamp = Some(timestamp);
                } else {
                    msg.serial = Some(serial.clone());
                }
                assigned.push(serial);
            }
            frame.action = action::MESSAGE;
            frame.messages = Some(fresh);
        });
        let event = self.apply(ctx, event);
        let ids = event
            .frame
            .messages
            .iter()
            .flatten()
            .map(|m| m.id.clone().unwrap_or_default());
        for (((slot, serial), id), supplied) in
            fresh_slots.into_iter().zip(assigned).zip(ids).zip(supplied)
        {
            if supplied {
                self.ids
                    .insert(id, serial.clone(), now_ms, ctx.limits.idempotency_ids_max);
            }
            serials[slot] = Some(serial);
        }
        (serials, Some(event))
    }

    /// Applies annotations (action, type, messageSerial and clientId set by the caller)
    /// and fans them out: each gets its serial, an id, the time and the publishing
    /// connection. Returns their serials and the event.
    pub(crate) fn annotate(
        &mut self,
        ctx: &ApplyContext<'_>,
        publisher: &Publisher,
        mut annotations: Vec<Annotation>,
    ) -> (Vec<String>, Arc<ChannelEvent>) {
        let timestamp = annotations
            .iter()
            .filter_map(|a| a.message_serial.as_deref().and_then(SerialPosition::decode))
            .map(|target| floor_after(&target))
            .fold(ctx.now_ms, i64::max);
        let mut serials = Vec::with_capacity(annotations.len());
        let event = self.next_event(ctx.origin, publisher, timestamp, |frame, at| {
            for (index, annotation) in annotations.iter_mut().enumerate() {
                let serial = SerialPosition {
                    index: index as u32,
                    ..at
                }
                .encode();
                annotation
                    .id
                    .get_or_insert_with(|| format!("{}:{index}", publisher.frame_id));
                annotation.action.get_or_insert(annotation_action::CREATE);
                annotation.timestamp = Some(timestamp);
                annotation.connection_id = publisher.connection_id.as_deref().map(str::to_string);
                annotation.serial = Some(serial.clone());
                serials.push(serial);
            }
            frame.action = action::ANNOTATION;
            frame.annotations = Some(annotations);
        });
        let event = self.apply(ctx, event);
        (serials, event)
    }

    /// The message with `serial` as first published and its changes, as far as the
    /// channel's log holds them.
    pub(crate) fn message(&self, serial: &str) -> (Option<Message>, Vec<Message>) {
        self.log.message(serial)
    }

    /// Applies presence changes (fully populated) and broadcasts those that changed
    /// something. All-or-nothing on the member bound.
    pub(crate) fn presence(
        &mut self,
        ctx: &ApplyContext<'_>,
        publisher: &Publisher,
        changes: Vec<PresenceMessage>,
    ) -> Result<(), PresenceError> {
        let mut broadcasts = Vec::new();
        for change in changes {
            if let Some(b) = self
                .presence
                .apply(change, ctx.limits.presence_members_max)?
            {
                broadcasts.push(b);
            }
        }
        self.broadcast_presence(ctx, publisher, broadcasts);
        Ok(())
    }

    /// Removes the members of a connection that has gone, broadcasting their LEAVEs.
    pub(crate) fn leave_connection(&mut self, ctx: &ApplyContext<'_>, connection_id: &str) {
        let leaves = self.presence.remove_connection(connection_id, ctx.now_ms);
        let publisher = Publisher {
            connection_id: None,
            frame_id: format!("leave-{connection_id}:{}", ctx.now_ms),
        };
        self.broadcast_presence(ctx, &publisher, leaves);
    }

    /// Removes the members of every connection issued by a departed node (connection
    /// ids `{prefix}...`), broadcasting their LEAVEs.
    pub(crate) fn leave_connections_with_prefix(
        &mut self,
        ctx: &ApplyContext<'_>,
        prefix: &str,
    ) -> usize {
        let leaves = self
            .presence
            .remove_where(|conn| conn.starts_with(prefix), ctx.now_ms);
        let count = leaves.len();
        if count > 0 {
            let publisher = Publisher {
                connection_id: None,
                frame_id: format!("leave-{prefix}:{}", ctx.now_ms),
            };
            self.broadcast_presence(ctx, &publisher, leaves);
        }
        count
    }

    fn broadcast_presence(
        &mut self,
        ctx: &ApplyContext<'_>,
        publisher: &Publisher,
        broadcasts: Vec<PresenceMessage>,
    ) {
        if broadcasts.is_empty() {
            self.touch(ctx.now_ms);
            return;
        }
        let event = self.next_event(ctx.origin, publisher, ctx.now_ms, |frame, _| {
            frame.action = action::PRESENCE;
            frame.presence = Some(broadcasts);
        });
        self.apply(ctx, event);
    }

    /// A retried publish (message ids seen before) is answered with the first serials,
    /// but its first write may have been lost (a failed commit answered 5xx/NACK): the
    /// original events still in the log are journaled again, so the retry's reply waits
    /// for a write of its own. The store keys items by position, so a write that did
    /// land is only replaced, and peers drop the repeated sequence as a duplicate.
    fn journal_again(
        &self,
        ctx: &ApplyContext<'_>,
        serials: &[Option<String>],
        fresh_slots: &[usize],
    ) {
        let Some(journal) = ctx.journal else {
            return;
        };
        let mut seen: Vec<(OriginId, u64)> = Vec::new();
        for (slot, serial) in serials.iter().enumerate() {
            if fresh_slots.binary_search(&slot).is_ok() {
                continue;
            }
            let Some(at) = serial.as_deref().and_then(serial_position) else {
                continue;
            };
            if seen.contains(&at) {
                continue;
            }
            seen.push(at);
            for event in self.log.events_of(at.0, at.1, at.1) {
                journal.record(ctx.key, &event);
            }
        }
    }

    /// Logs, journals and fans out a new event, in that order, under the channel lock.
    fn apply(&mut self, ctx: &ApplyContext<'_>, event: ChannelEvent) -> Arc<ChannelEvent> {
        let event = Arc::new(self.delta.prepare(event));
        self.log.push(event.clone(), &ctx.limits.log, ctx.now_ms);
        if let Some(journal) = ctx.journal {
            journal.record(ctx.key, &event);
        }
        self.fan_out(event.clone(), ctx.now_ms);
        event
    }

    /// Logs and journals `event` without offering it to any attachment (a remote event
    /// that changes nothing here, see `apply_remote_one`).
    fn record_quietly(&mut self, ctx: &ApplyContext<'_>, event: ChannelEvent) {
        let event = Arc::new(event);
        self.log.push(event.clone(), &ctx.limits.log, ctx.now_ms);
        if let Some(journal) = ctx.journal {
            journal.record(ctx.key, &event);
        }
    }

    /// Offers `event` to every attachment that wants it. Attachments whose queue is full
    /// are removed here; their connection disconnects itself and may resume later.
    fn fan_out(&mut self, event: Arc<ChannelEvent>, now_ms: i64) {
        let mut too_slow: Vec<Arc<str>> = Vec::new();
        for (connection_id, attachment) in &mut self.attachments {
            if !options_want(&attachment.options, connection_id, &event) {
                if let Some(delta) = &mut attachment.delta {
                    if event.is_message() {
                        delta.missed();
                    }
                }
                continue;
            }
            let delivered = match (&attachment.options.resume_from, &mut attachment.delta) {
                (None, None) => attachment.sink.deliver(&event),
                (None, Some(delta)) => attachment.sink.deliver(&delta.pick(&event)),
                // Resumed from a node that was ahead (see `attach`).
                (Some(seen), delta) => {
                    // Rare (a resume from a node that was ahead): full events until
                    // this node has caught up.
                    if let Some(delta) = delta {
                        delta.missed();
                    }
                    let delivered = attachment.sink.deliver(&covering(&event, seen));
                    if self.cursor.covers(seen) {
                        attachment.options.resume_from = None;
                    }
                    delivered
                }
            };
            if !delivered {
                too_slow.push(connection_id.clone());
            }
        }
        for connection_id in too_slow {
            if let Some(removed) = self.attachments.remove(&connection_id) {
                self.forget(&removed);
            }
        }
        self.touch(now_ms);
    }

    /// Applies an event from another origin in that origin's sequence order: a
    /// duplicate is dropped, an event ahead of a gap waits (bounded) and the gap is
    /// reported for repair, and an in-order event is applied with every waiting event it
    /// unblocks.
    pub(crate) fn apply_remote(
        &mut self,
        ctx: &ApplyContext<'_>,
        event: RemoteEvent,
    ) -> RemoteOutcome {
        let origin = event.origin;
        let have = self.cursor.get(origin);
        if event.seq <= have {
            return RemoteOutcome::Duplicate;
        }
        if event.seq > have + 1 {
            // The gap reported reaches up to the highest missing event below this one,
            // not over the events already waiting right below it: a burst of events
            // behind one hole then reports the same gap each time, and the asker's
            // throttle holds it (reported up to the event, the range grew with every
            // event, each one asked again, and each answer carried every waiting event
            // again). Holes below a waiting run are still in the range, so an ask covers
            // every hole there is. The walk down is bounded by what waits (`pending_max`).
            let mut to = event.seq - 1;
            for ((_, held), _) in self
                .pending
                .range((origin, have + 1)..(origin, event.seq))
                .rev()
            {
                if *held != to {
                    break;
                }
                to -= 1;
            }
            let missing = (have + 1, to);
            if self.pending.len() < ctx.limits.pending_max {
                self.pending.insert((origin, event.seq), event);
            }
            return RemoteOutcome::Gap { origin, missing };
        }
        self.apply_remote_one(ctx, event);
        RemoteOutcome::Applied(1 + self.drain_pending(ctx, origin))
    }

    /// Applies the events of `origin` waiting right behind its cursor.
    fn drain_pending(&mut self, ctx: &ApplyContext<'_>, origin: OriginId) -> usize {
        let mut applied = 0;
        while let Some(next) = self.pending.remove(&(origin, self.cursor.get(origin) + 1)) {
            self.apply_remote_one(ctx, next);
            applied += 1;
        }
        let upto = self.cursor.get(origin);
        self.pending
            .retain(|(o, seq), _| *o != origin || *seq > upto);
        applied
    }

    /// Gives up on `origin`'s events up to `upto` that no peer can supply any more
    /// (trimmed from its log, or no-ops it never logged): events of `origin` already
    /// here and waiting (at or below `upto`, behind a hole) apply in order, the cursor
    /// moves past the holes, and the events waiting behind `upto` apply. Returns how
    /// many applied. (Moving the cursor first would drop the waiting ones: a message
    /// this node has, lost to its subscribers.)
    pub(crate) fn skip_remote(
        &mut self,
        ctx: &ApplyContext<'_>,
        origin: OriginId,
        upto: u64,
    ) -> usize {
        if upto <= self.cursor.get(origin) {
            return 0;
        }
        let waiting: Vec<u64> = self
            .pending
            .range((origin, 0)..=(origin, upto))
            .map(|((_, seq), _)| *seq)
            .collect();
        let mut applied = 0;
        for seq in waiting {
            if let Some(event) = self.pending.remove(&(origin, seq)) {
                self.apply_remote_one(ctx, event);
                applied += 1;
            }
        }
        self.cursor.advance(origin, upto);
        applied + self.drain_pending(ctx, origin)
    }

    fn apply_remote_one(&mut self, ctx: &ApplyContext<'_>, remote: RemoteEvent) {
        self.cursor.advance(remote.origin, remote.seq);
        self.active(ctx.now_ms);
        let mut frame = remote.frame;
        frame.channel = Some(self.name.to_string());
        frame.channel_serial = Some(self.cursor.encode());
        if let Some(messages) = frame.messages.take() {
            self.ids
                .expire(ctx.now_ms, ctx.limits.idempotency_window_ms);
            let mut fresh = Vec::with_capacity(messages.len());
            for message in messages {
                let id = message.id.clone().unwrap_or_default();
                if !id.is_empty() && self.ids.get(&id).is_some() {
                    continue;
                }
                if !id.is_empty() {
                    let serial = message.serial.clone().unwrap_or_default();
                    self.ids
                        .insert(id, serial, ctx.now_ms, ctx.limits.idempotency_ids_max);
                }
                fresh.push(message);
            }
            if fresh.is_empty() {
                return;
            }
            frame.messages = Some(fresh);
        } else if let Some(changes) = frame.presence.take() {
            let departed = ctx
                .departed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut broadcasts = Vec::new();
            let mut taken = Vec::new();
            for change in changes {
                // A departed node's connection is gone for good, but its presence still
                // arrives after the departure (in flight, waiting behind a gap, or
                // repaired from a peer's log once its origin is known dead).
                let conn = change.connection_id.as_deref().unwrap_or_default();
                if departed.iter().any(|prefix| conn.starts_with(&**prefix)) {
                    continue;
                }
                taken.push(change.clone());
                // The origin accepted this change; a bound here would make regions diverge.
                if let Ok(Some(b)) = self.presence.apply(change, usize::MAX) {
                    broadcasts.push(b);
                }
            }
            drop(departed);
            if taken.is_empty() {
                return;
            }
            if broadcasts.is_empty() {
                // Nothing changes here (a member this node already has, e.g. seeded from
                // the home while it warmed the channel), but the event is still the
                // origin's: logged and journaled as the origin did (so this node can
                // supply it to a peer repairing that sequence, relays it and stores it),
                // and delivered to nobody.
                frame.presence = Some(taken);
                let event = ChannelEvent::new(remote.origin, remote.seq, remote.publisher, frame);
                self.record_quietly(ctx, event);
                return;
            }
            frame.presence = Some(broadcasts);
        }
        let event = ChannelEvent::new(remote.origin, remote.seq, remote.publisher, frame);
        self.apply(ctx, event);
    }

    /// Events of `origin` with sequence in `from..=to` still in the log, for repairing
    /// another node's gap.
    pub(crate) fn events_of(&self, origin: OriginId, from: u64, to: u64) -> Vec<Arc<ChannelEvent>> {
        self.log.events_of(origin, from, to)
    }

    pub(crate) fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The first of `origin`'s events held back behind a gap.
    pub(crate) fn first_pending(&self, origin: OriginId) -> Option<u64> {
        let held = self.pending.range((origin, 0)..=(origin, u64::MAX));
        held.map(|((_, seq), _)| *seq).next()
    }

    pub(crate) fn log_len(&self) -> usize {
        self.log.len()
    }

    pub(crate) fn members(&self) -> Vec<PresenceMessage> {
        self.presence.members()
    }

    pub(crate) fn status(&self) -> ChannelStatus {
        let count = |mode: u64| {
            self.attachments
                .values()
                .filter(|a| a.options.modes & mode != 0)
                .count()
        };
        ChannelStatus {
            connections: self.attachments.len(),
            publishers: count(flags::PUBLISH),
            subscribers: count(flags::SUBSCRIBE),
            presence_connections: self.presence.connection_count(),
            presence_members: self.presence.len(),
            presence_subscribers: count(flags::PRESENCE_SUBSCRIBE),
        }
    }
}

/// `event` as a client that has seen `seen` must get it: with a channelSerial that also
/// covers `seen`, so the cursor the client keeps never goes back.
fn covering(event: &Arc<ChannelEvent>, seen: &Cursor) -> Arc<ChannelEvent> {
    let mut cursor = event
        .frame
        .channel_serial
        .as_deref()
        .and_then(Cursor::decode)
        .unwrap_or_default();
    if cursor.covers(seen) {
        return event.clone();
    }
    cursor.merge(seen);
    let mut frame = event.frame.clone();
    frame.channel_serial = Some(cursor.encode());
    Arc::new(ChannelEvent::new(
        event.origin,
        event.seq,
        event.publisher.clone(),
        frame,
    ))
}

/// Whether an attachment with `options` receives `event`: MESSAGE needs SUBSCRIBE (and
/// is skipped for its own publisher when echo is off); ANNOTATION needs
/// ANNOTATION_SUBSCRIBE (and echo likewise); PRESENCE needs PRESENCE_SUBSCRIBE.
fn options_want(options: &AttachOptions, connection_id: &str, event: &ChannelEvent) -> bool {
    // A connection that resumed here from another node may have seen an origin's events
    // that have not reached this node yet: they must not reach it twice when they do.
    if options
        .resume_from
        .as_ref()
        .is_some_and(|seen| event.seq <= seen.get(event.origin))
    {
        return false;
    }
    let echo_ok = options.echo || event.publisher.as_deref() != Some(connection_id);
    match event.frame.action {
        action::MESSAGE => options.modes & flags::SUBSCRIBE != 0 && echo_ok,
        action::ANNOTATION => options.modes & flags::ANNOTATION_SUBSCRIBE != 0 && echo_ok,
        _ => options.modes & flags::PRESENCE_SUBSCRIBE != 0,
    }
}

/// What applying an event needs from the hub.
pub(crate) struct ApplyContext<'a> {
    pub(crate) key: &'a ChannelKey,
    pub(crate) origin: OriginId,
    pub(crate) limits: &'a crate::limits::CoreLimits,
    pub(crate) journal: Option<&'a dyn Journal>,
    /// Connection-id prefixes of departed nodes (see `Hub::node_departed`).
    pub(crate) departed: &'a std::sync::Mutex<std::collections::VecDeque<Arc<str>>>,
    pub(crate) now_ms: i64,
}

/// Client-supplied message ids seen within the idempotency window.
#[derive(Debug, Default)]
struct IdWindow {
    serials: HashMap<String, String>,
    order: std::collections::VecDeque<(i64, String)>,
}

impl IdWindow {
    fn get(&self, id: &str) -> Option<&str> {
        self.serials.get(id).map(String::as_str)
    }

    fn insert(&mut self, id: String, serial: String, now_ms: i64, ids_max: usize) {
        if self.serials.insert(id.clone(), serial).is_none() {
            self.order.push_back((now_ms, id));
        }
        while self.order.len() > ids_max {
            self.pop_oldest();
        }
    }

    fn expire(&mut self, now_ms: i64, window_ms: i64) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now_ms - at > window_ms)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            self.serials.remove(&id);
        }
    }
}

/// An event from another origin, as a link delivers it.
#[derive(Clone, Debug)]
pub struct RemoteEvent {
    pub origin: OriginId,
    pub seq: u64,
    /// The publishing connection (for echo suppression of clients that resumed here).
    pub publisher: Option<Arc<str>>,
    /// The frame as the origin built it (channelSerial is recomputed here).
    pub frame: ProtocolMessage,
}

impl RemoteEvent {
    /// What a node sends to peers for an event it applied.
    pub fn from_event(event: &ChannelEvent) -> RemoteEvent {
        RemoteEvent {
            origin: event.origin,
            seq: event.seq,
            publisher: event.publisher.clone(),
            frame: event.frame.clone(),
        }
    }
}

/// What applying a remote event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteOutcome {
    /// Applied this many events (the one given plus any it unblocked).
    Applied(usize),
    /// Already applied here.
    Duplicate,
    /// Ahead of a gap: these sequences of `origin` are missing; ask a peer for them.
    Gap {
        origin: OriginId,
        missing: (u64, u64),
    },
}

/// The (origin, sequence) of the event that carried the message with `serial`.
fn serial_position(serial: &str) -> Option<(OriginId, u64)> {
    SerialPosition::decode(serial).map(|at| (at.origin, at.seq))
}
