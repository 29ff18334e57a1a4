//! Fan-out events: one published frame, shared by every subscriber.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tern_protocol::{Data, Format, Message, PresenceMessage, ProtocolMessage};

use crate::cursor::OriginId;
use crate::delta::Delta;

/// Who is publishing: the connection (absent for REST) and the frame id that message and
/// presence ids derive from (`connectionId:msgSerial` for realtime publishes).
#[derive(Clone, Debug)]
pub struct Publisher {
    pub connection_id: Option<Arc<str>>,
    pub frame_id: String,
}

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
    /// What the event holds in memory, measured: its msgpack encoding (built at once,
    /// and the bytes every msgpack subscriber, the cluster and the history store use)
    /// plus the decoded structs. The channel log's byte bound counts this.
    pub size_bytes: usize,
    encoded: [OnceLock<Bytes>; Format::COUNT],
    /// Ably's size of the messages (or presence messages) it carries, measured on first
    /// need (app statistics count it per delivery).
    data_bytes: OnceLock<usize>,
    /// Each message's data as plain bytes ([`payload_bytes`]), built on first need and
    /// shared by every subscriber that wants it (MQTT).
    payloads: OnceLock<Vec<Bytes>>,
    /// The event as delta subscribers get it (see [`crate::delta`]), when the channel had
    /// any while it was applied.
    delta: Option<Delta>,
}

impl ChannelEvent {
    pub fn new(
        origin: OriginId,
        seq: u64,
        publisher: Option<Arc<str>>,
        frame: ProtocolMessage,
    ) -> Self {
        let msgpack = tern_protocol::encode(Format::Msgpack, &frame);
        let structs = std::mem::size_of::<ChannelEvent>()
            + frame.messages.as_ref().map_or(0, Vec::len) * std::mem::size_of::<Message>()
            + frame.presence.as_ref().map_or(0, Vec::len) * std::mem::size_of::<PresenceMessage>();
        let event = ChannelEvent {
            origin,
            seq,
            publisher,
            frame,
            size_bytes: structs + 2 * msgpack.len(),
            encoded: Default::default(),
            data_bytes: OnceLock::new(),
            payloads: OnceLock::new(),
            delta: None,
        };
        // The decoded strings take about what their encoding takes, hence 2×.
        let _ = event.encoded[Format::Msgpack.index()].set(msgpack);
        event
    }

    /// This event with its delta form; what it holds in memory grows by that form's size.
    pub(crate) fn with_delta(mut self, delta: Delta) -> Self {
        self.size_bytes += delta.event.size_bytes;
        self.delta = Some(delta);
        self
    }

    /// The delta form, if the channel built one (see [`crate::delta`]).
    pub fn delta(&self) -> Option<&Delta> {
        self.delta.as_ref()
    }

    pub fn timestamp_ms(&self) -> i64 {
        self.frame.timestamp.unwrap_or(0)
    }

    pub fn message_count(&self) -> usize {
        self.frame.messages.as_ref().map_or(0, Vec::len)
    }

    pub fn presence_count(&self) -> usize {
        self.frame.presence.as_ref().map_or(0, Vec::len)
    }

    /// Ably's size ([`message_size`], [`presence_size`]) of everything the event
    /// carries, summed: measured once, on the first call, then shared.
    pub fn data_bytes(&self) -> usize {
        *self.data_bytes.get_or_init(|| {
            let messages = self.frame.messages.iter().flatten().map(message_size);
            let presence = self.frame.presence.iter().flatten().map(presence_size);
            messages.sum::<usize>() + presence.sum::<usize>()
        })
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

    /// Each message's data as plain bytes ([`payload_bytes`]), in message order: built
    /// on the first call and shared afterwards.
    pub fn payloads(&self) -> &[Bytes] {
        self.payloads.get_or_init(|| {
            self.frame
                .messages
                .iter()
                .flatten()
                .map(payload_bytes)
                .collect()
        })
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

/// A message's data as plain bytes, for a client with no Ably decoding (MQTT): string
/// data as its UTF-8 bytes, binary as it is, JSON data as its JSON text. Data that
/// travelled as base64 (`encoding` ending in `base64`) is decoded back to its bytes;
/// other encodings (`json`, `utf-8`, cipher) leave the data as it is.
pub fn payload_bytes(message: &Message) -> Bytes {
    use base64::Engine as _;
    let base64 = message
        .encoding
        .as_deref()
        .is_some_and(|e| e == "base64" || e.ends_with("/base64"));
    match &message.data {
        None => Bytes::new(),
        Some(Data::Binary(bytes)) => bytes.clone(),
        Some(Data::String(text)) if base64 => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::copy_from_slice(text.as_bytes())),
        Some(Data::String(text)) => Bytes::copy_from_slice(text.as_bytes()),
        Some(Data::Json(value)) => Bytes::from(value.to_string()),
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

fn text_bytes(text: Option<&String>) -> usize {
    text.map_or(0, String::len)
}

/// A message's size as Ably counts it (for `maxMessageSize` and in app statistics):
/// name, clientId, data and extras as JSON. The server adds an id, connectionId and
/// timestamp on the way, so this is the same on the way in and on every delivery.
pub fn message_size(m: &Message) -> usize {
    text_bytes(m.name.as_ref())
        + text_bytes(m.client_id.as_ref())
        + data_bytes(m.data.as_ref())
        + m.extras.as_ref().map_or(0, |e| e.to_string().len())
}

/// Bytes a message counts against `maxMessageSize`: [`message_size`] plus the other
/// fields a client supplies and Tern stores and sends on (id, encoding), so no field
/// carries bytes past the limit.
pub fn message_bytes(m: &Message) -> usize {
    message_size(m) + text_bytes(m.id.as_ref()) + text_bytes(m.encoding.as_ref())
}

/// A presence message's size as Ably counts it: clientId, data and extras.
pub fn presence_size(p: &PresenceMessage) -> usize {
    text_bytes(p.client_id.as_ref())
        + data_bytes(p.data.as_ref())
        + p.extras.as_ref().map_or(0, |e| e.to_string().len())
}

/// Bytes a presence message counts against `maxMessageSize`: [`presence_size`] plus
/// id and encoding (as for [`message_bytes`]).
pub fn presence_bytes(p: &PresenceMessage) -> usize {
    presence_size(p) + text_bytes(p.id.as_ref()) + text_bytes(p.encoding.as_ref())
}

/// Where a channel delivers events for one attachment. Implemented by the edge over a
/// bounded queue; the core only needs to know whether the event was accepted.
pub trait Subscriber: Send + Sync {
    /// Queues `event` for delivery without blocking. Returns `false` when the
    /// subscriber's queue is full: the subscriber is then dropped from the channel and is
    /// expected to disconnect its client (which may resume from its cursor).
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event's size is what it holds: its msgpack encoding (kept for reuse) plus its
    /// structs, so many empty messages cost what they take, not a flat charge.
    #[test]
    fn size_is_measured_on_the_encoding_and_structs() {
        let frame = ProtocolMessage {
            action: tern_protocol::action::MESSAGE,
            messages: Some(vec![
                Message {
                    id: Some("abc:0".into()),
                    ..Default::default()
                };
                1_000
            ]),
            ..Default::default()
        };
        let event = ChannelEvent::new(OriginId(1), 1, None, frame);
        let msgpack = event.encoded(Format::Msgpack);
        assert!(msgpack.len() > 1_000 * 6, "each message's id is encoded");
        assert!(event.size_bytes >= msgpack.len() + 1_000 * std::mem::size_of::<Message>());
        // The encoding made for the size is the one handed out, not a second one.
        assert_eq!(
            event.encoded(Format::Msgpack).as_ptr(),
            msgpack.as_ptr(),
            "shared, not re-encoded"
        );
    }
}
