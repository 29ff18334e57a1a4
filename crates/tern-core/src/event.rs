//! Fan-out events: one published frame, shared by every subscriber.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tern_protocol::{Format, ProtocolMessage};

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
    encoded: [OnceLock<Bytes>; Format::COUNT],
}

impl ChannelEvent {
    pub fn new(
        origin: OriginId,
        seq: u64,
        publisher: Option<Arc<str>>,
        frame: ProtocolMessage,
    ) -> Self {
        ChannelEvent {
            origin,
            seq,
            publisher,
            frame,
            encoded: Default::default(),
        }
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

/// Where a channel delivers events for one attachment. Implemented by the edge over a
/// bounded queue; the core only needs to know whether the event was accepted.
pub trait Subscriber: Send + Sync {
    /// Queues `event` for delivery without blocking. Returns `false` when the
    /// subscriber's queue is full: the subscriber is then dropped from the channel and is
    /// expected to disconnect its client (which may resume from its cursor).
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool;
}
