//! Fan-out events: one published frame, shared by every subscriber.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tern_protocol::{Data, Format, Message, PresenceMessage, ProtocolMessage};

use crate::cursor::OriginId;

/// One MESSAGE or PRESENCE frame as applied to a channel. The outbound frame is built
/// once; its bytes are encoded at most once per wire format, on first need, and then
/// shared (`Bytes` refcount) by every subscriber that uses that format.
#[derive(Debug)]
pub struct ChannelEvent {
    /// Where the event entered the system.
    pub origin: OriginId,
    /// Its origin sequence on this channel (1, 2, 3 … with no gaps per origin).
    pub seq: u64,
    /// Connection that published it, for `echo=false`; `None` for REST publishes.
    pub publisher: Option<Arc<str>>,
    /// The frame every subscriber receives (action, channel, id, connectionId, timestamp,
    /// channelSerial, messages or presence).
    pub frame: ProtocolMessage,
    /// Approximate payload bytes, for the log's byte bound.
    pub size_bytes: usize,
    encoded: [OnceLock<Bytes>; Format::COUNT],
}

/// Fixed per-event overhead counted against the log's byte bound.
const EVENT_OVERHEAD_BYTES: usize = 256;

impl ChannelEvent {
    pub fn new(
        origin: OriginId,
        seq: u64,
        publisher: Option<Arc<str>>,
        frame: ProtocolMessage,
    ) -> Self {
        let size_bytes = EVENT_OVERHEAD_BYTES
            + frame
                .messages
                .iter()
                .flatten()
                .map(message_bytes)
                .sum::<usize>()
            + frame
                .presence
                .iter()
                .flatten()
                .map(presence_bytes)
                .sum::<usize>();
        ChannelEvent {
            origin,
            seq,
            publisher,
            frame,
            size_bytes,
            encoded: Default::default(),
        }
    }

    pub fn timestamp_ms(&self) -> i64 {
        self.frame.timestamp.unwrap_or(0)
    }

    pub fn message_count(&self) -> usize {
        self.frame.messages.as_ref().map_or(0, Vec::len)
    }

    /// A copy holding only the last `count` messages (for a rewind that ends mid-frame).
    pub fn last_messages(&self, count: usize) -> ChannelEvent {
        let mut frame = self.frame.clone();
        if let Some(messages) = &mut frame.messages {
            let skip = messages.len().saturating_sub(count);
            messages.drain(..skip);
        }
        ChannelEvent::new(self.origin, self.seq, self.publisher.clone(), frame)
    }

    /// The frame's bytes in `format`, encoded on the first call and shared afterwards.
    pub fn encoded(&self, format: Format) -> Bytes {
        self.encoded[format.index()]
            .get_or_init(|| tern_protocol::encode(format, &self.frame))
            .clone()
    }

    /// True for MESSAGE frames (as opposed to PRESENCE).
    pub fn is_message(&self) -> bool {
        self.frame.action == tern_protocol::action::MESSAGE
    }
}

fn data_bytes(data: Option<&Data>) -> usize {
    match data {
        None => 0,
        Some(Data::String(s)) => s.len(),
        Some(Data::Binary(b)) => b.len(),
        Some(Data::Json(v)) => v.to_string().len(),
    }
}

/// Bytes a message counts against `maxMessageSize`: name, clientId, data and extras.
pub fn message_bytes(m: &Message) -> usize {
    m.name.as_ref().map_or(0, String::len)
        + m.client_id.as_ref().map_or(0, String::len)
        + data_bytes(m.data.as_ref())
        + m.extras.as_ref().map_or(0, |e| e.to_string().len())
}

/// Bytes a presence message counts against `maxMessageSize`: clientId, data and extras.
pub fn presence_bytes(p: &PresenceMessage) -> usize {
    p.client_id.as_ref().map_or(0, String::len)
        + data_bytes(p.data.as_ref())
        + p.extras.as_ref().map_or(0, |e| e.to_string().len())
}

/// Where a channel delivers events for one attachment. Implemented by the edge over a
/// bounded queue; the core only needs to know whether the event was accepted.
pub trait Subscriber: Send + Sync {
    /// Queues `event` for delivery without blocking. Returns `false` when the
    /// subscriber's queue is full: the subscriber is then dropped from the channel and is
    /// expected to disconnect its client (which may resume from its cursor).
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool;
}
