//! One channel's state: who is attached, who is present, and where its cursor stands.
//! A channel is owned by exactly one `Mutex` in the [`crate::Hub`]; everything here runs
//! under that lock, which is what orders fan-out.

use std::collections::HashMap;
use std::sync::Arc;

use tern_protocol::{action, flags, Message, PresenceMessage, ProtocolMessage};

use crate::cursor::{Cursor, OriginId};
use crate::event::{ChannelEvent, Subscriber};
use crate::presence::{PresenceError, PresenceSet};

/// How a connection attaches.
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    /// Granted Ably mode bits (`flags::SUBSCRIBE`, `flags::PRESENCE_SUBSCRIBE`, …).
    pub modes: u64,
    /// Whether the connection receives its own messages (`echo` query param).
    pub echo: bool,
}

/// What the attaching connection needs to build its ATTACHED reply and presence SYNC.
/// Handed to the attach callback under the channel lock, so frames the callback queues
/// precede every event published after the attach.
#[derive(Debug)]
pub struct AttachSnapshot {
    pub channel_serial: String,
    /// Current members (empty unless the attachment has PRESENCE_SUBSCRIBE).
    pub members: Vec<PresenceMessage>,
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
}

pub(crate) struct Channel {
    name: Arc<str>,
    attachments: HashMap<Arc<str>, Attachment>,
    presence: PresenceSet,
    cursor: Cursor,
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
            next_seq: 1,
            empty_since_ms: Some(now_ms),
            retired: false,
        }
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
        connection_id: Arc<str>,
        options: AttachOptions,
        sink: Arc<dyn Subscriber>,
        reply: impl FnOnce(&AttachSnapshot),
        now_ms: i64,
    ) {
        let members = if options.modes & flags::PRESENCE_SUBSCRIBE != 0 {
            self.presence.members()
        } else {
            Vec::new()
        };
        reply(&AttachSnapshot {
            channel_serial: self.cursor.encode(),
            members,
        });
        self.attachments
            .insert(connection_id, Attachment { sink, options });
        self.touch(now_ms);
    }

    pub(crate) fn detach(&mut self, connection_id: &str, now_ms: i64) -> bool {
        let removed = self.attachments.remove(connection_id).is_some();
        self.touch(now_ms);
        removed
    }

    /// Assigns the next origin sequence and builds the shared outbound frame.
    fn next_event(
        &mut self,
        origin: OriginId,
        publisher: &crate::hub::Publisher,
        timestamp: i64,
        build: impl FnOnce(&mut ProtocolMessage, &str),
    ) -> ChannelEvent {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.cursor.advance(origin, seq);
        let serial_base = format!("{:x}-{:x}", origin.0, seq);
        let mut frame = ProtocolMessage {
            channel: Some(self.name.to_string()),
            id: Some(publisher.frame_id.clone()),
            connection_id: publisher.connection_id.as_deref().map(str::to_string),
            timestamp: Some(timestamp),
            channel_serial: Some(self.cursor.encode()),
            ..Default::default()
        };
        build(&mut frame, &serial_base);
        ChannelEvent::new(origin, seq, publisher.connection_id.clone(), frame)
    }

    /// Applies a publish and fans it out. Returns the per-message serials.
    pub(crate) fn publish(
        &mut self,
        origin: OriginId,
        publisher: &crate::hub::Publisher,
        mut messages: Vec<Message>,
        now_ms: i64,
    ) -> (Vec<String>, String) {
        let mut serials = Vec::with_capacity(messages.len());
        let event = self.next_event(origin, publisher, now_ms, |frame, serial_base| {
            for (index, msg) in messages.iter_mut().enumerate() {
                let serial = format!("{serial_base}:{index}");
                if msg.id.is_none() {
                    msg.id = Some(format!("{}:{index}", publisher.frame_id));
                }
                if msg.timestamp.is_none() {
                    msg.timestamp = Some(now_ms);
                }
                if msg.connection_id.is_none() {
                    msg.connection_id = publisher.connection_id.as_deref().map(str::to_string);
                }
                msg.action.get_or_insert(0);
                msg.connection_key = None;
                msg.serial = Some(serial.clone());
                serials.push(serial);
            }
            frame.action = action::MESSAGE;
            frame.messages = Some(messages);
        });
        let channel_serial = event.frame.channel_serial.clone().unwrap_or_default();
        self.fan_out(Arc::new(event), now_ms);
        (serials, channel_serial)
    }

    /// Applies presence changes (fully populated) and broadcasts those that changed
    /// something. All-or-nothing on the member bound.
    pub(crate) fn presence(
        &mut self,
        origin: OriginId,
        publisher: &crate::hub::Publisher,
        changes: Vec<PresenceMessage>,
        members_max: usize,
        now_ms: i64,
    ) -> Result<(), PresenceError> {
        let mut broadcasts = Vec::new();
        for change in changes {
            if let Some(b) = self.presence.apply(change, members_max)? {
                broadcasts.push(b);
            }
        }
        self.broadcast_presence(origin, publisher, broadcasts, now_ms);
        Ok(())
    }

    /// Removes the members of a connection that has gone, broadcasting their LEAVEs.
    pub(crate) fn leave_connection(&mut self, origin: OriginId, connection_id: &str, now_ms: i64) {
        let leaves = self.presence.remove_connection(connection_id, now_ms);
        let publisher = crate::hub::Publisher {
            connection_id: None,
            frame_id: format!("leave-{connection_id}:{now_ms}"),
        };
        self.broadcast_presence(origin, &publisher, leaves, now_ms);
    }

    fn broadcast_presence(
        &mut self,
        origin: OriginId,
        publisher: &crate::hub::Publisher,
        broadcasts: Vec<PresenceMessage>,
        now_ms: i64,
    ) {
        if broadcasts.is_empty() {
            self.touch(now_ms);
            return;
        }
        let event = self.next_event(origin, publisher, now_ms, |frame, _| {
            frame.action = action::PRESENCE;
            frame.presence = Some(broadcasts);
        });
        self.fan_out(Arc::new(event), now_ms);
    }

    /// Offers `event` to every attachment that wants it. Attachments whose queue is full
    /// are removed here; their connection disconnects itself and may resume later.
    fn fan_out(&mut self, event: Arc<ChannelEvent>, now_ms: i64) {
        let wanted = if event.is_message() {
            flags::SUBSCRIBE
        } else {
            flags::PRESENCE_SUBSCRIBE
        };
        let mut too_slow: Vec<Arc<str>> = Vec::new();
        for (connection_id, attachment) in &self.attachments {
            if attachment.options.modes & wanted == 0 {
                continue;
            }
            if event.is_message()
                && !attachment.options.echo
                && event.publisher.as_deref() == Some(connection_id.as_ref())
            {
                continue;
            }
            if !attachment.sink.deliver(&event) {
                too_slow.push(connection_id.clone());
            }
        }
        for connection_id in too_slow {
            self.attachments.remove(&connection_id);
        }
        self.touch(now_ms);
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
