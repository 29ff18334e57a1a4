//! What is stored and how its key is laid out.
//!
//! Key = channel prefix ‖ position, where the prefix is `len(app) u16 ‖ app ‖
//! len(channel) u16 ‖ channel ‖ kind u8` (length-prefixed, so any bytes in names are
//! unambiguous) and the position is big-endian `timestamp (sign-flipped) ‖ origin ‖ seq ‖
//! index`. Byte order of keys is then position order within a channel.

use std::sync::Arc;

use bytes::Bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Message,
    Presence,
}

/// One channel of one app, messages or presence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelRef {
    pub app: Arc<str>,
    pub channel: Arc<str>,
    pub kind: EventKind,
}

/// One stored message or presence message.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredItem {
    pub timestamp_ms: i64,
    pub origin: u64,
    pub seq: u64,
    pub index: u32,
    pub payload: Bytes,
}

impl StoredItem {
    pub fn position(&self) -> Position {
        Position {
            timestamp_ms: self.timestamp_ms,
            origin: self.origin,
            seq: self.seq,
            index: self.index,
        }
    }
}

/// Total order of items within a channel; the exclusive bound of pagination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub timestamp_ms: i64,
    pub origin: u64,
    pub seq: u64,
    pub index: u32,
}

pub(crate) const POSITION_BYTES: usize = 8 + 8 + 8 + 4;

impl Position {
    /// URL-safe text: four hex fields joined by `-`.
    pub fn encode(&self) -> String {
        format!(
            "{:x}-{:x}-{:x}-{:x}",
            (self.timestamp_ms as u64) ^ SIGN,
            self.origin,
            self.seq,
            self.index
        )
    }

    pub fn decode(text: &str) -> Option<Position> {
        let mut parts = text.split('-');
        let mut next = || parts.next().and_then(|p| u64::from_str_radix(p, 16).ok());
        let position = Position {
            timestamp_ms: (next()? ^ SIGN) as i64,
            origin: next()?,
            seq: next()?,
            index: u32::try_from(next()?).ok()?,
        };
        parts.next().is_none().then_some(position)
    }

    pub(crate) fn to_bytes(self) -> [u8; POSITION_BYTES] {
        let mut out = [0u8; POSITION_BYTES];
        out[0..8].copy_from_slice(&((self.timestamp_ms as u64) ^ SIGN).to_be_bytes());
        out[8..16].copy_from_slice(&self.origin.to_be_bytes());
        out[16..24].copy_from_slice(&self.seq.to_be_bytes());
        out[24..28].copy_from_slice(&self.index.to_be_bytes());
        out
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Position> {
        let field = |at: usize, len: usize| bytes.get(at..at + len);
        let u64_at = |at| field(at, 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        Some(Position {
            timestamp_ms: (u64_at(0)? ^ SIGN) as i64,
            origin: u64_at(8)?,
            seq: u64_at(16)?,
            index: u32::from_be_bytes(field(24, 4)?.try_into().ok()?),
        })
    }

    pub(crate) const MIN: Position = Position {
        timestamp_ms: i64::MIN,
        origin: 0,
        seq: 0,
        index: 0,
    };
    pub(crate) const MAX: Position = Position {
        timestamp_ms: i64::MAX,
        origin: u64::MAX,
        seq: u64::MAX,
        index: u32::MAX,
    };
}

/// Flipping the sign bit makes two's-complement timestamps sort as unsigned bytes.
const SIGN: u64 = 1 << 63;

impl ChannelRef {
    pub(crate) fn prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.app.len() + self.channel.len() + 5);
        for part in [self.app.as_bytes(), self.channel.as_bytes()] {
            let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&part[..usize::from(len)]);
        }
        out.push(match self.kind {
            EventKind::Message => 0,
            EventKind::Presence => 1,
        });
        out
    }

    /// Parses a prefix back (for retention, which walks every channel).
    pub(crate) fn from_prefix(bytes: &[u8]) -> Option<ChannelRef> {
        let mut at = 0;
        let mut part = || {
            let len = usize::from(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
            let text = std::str::from_utf8(bytes.get(at + 2..at + 2 + len)?).ok()?;
            at += 2 + len;
            Some(Arc::<str>::from(text))
        };
        let app = part()?;
        let channel = part()?;
        let kind = match bytes.get(at)? {
            0 => EventKind::Message,
            1 => EventKind::Presence,
            _ => return None,
        };
        (at + 1 == bytes.len()).then_some(ChannelRef { app, channel, kind })
    }

    pub(crate) fn key(&self, position: Position) -> Vec<u8> {
        let mut key = self.prefix();
        key.extend_from_slice(&position.to_bytes());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Key byte order equals position order, and positions survive text and bytes.
        #[test]
        fn key_order_is_position_order(a in any::<(i64, u64, u64, u32)>(), b in any::<(i64, u64, u64, u32)>()) {
            let pa = Position { timestamp_ms: a.0, origin: a.1, seq: a.2, index: a.3 };
            let pb = Position { timestamp_ms: b.0, origin: b.1, seq: b.2, index: b.3 };
            let ch = ChannelRef { app: "a".into(), channel: "c".into(), kind: EventKind::Message };
            prop_assert_eq!(ch.key(pa).cmp(&ch.key(pb)), pa.cmp(&pb));
            prop_assert_eq!(Position::decode(&pa.encode()), Some(pa));
            prop_assert_eq!(Position::from_bytes(&pa.to_bytes()), Some(pa));
        }

        /// Arbitrary text never panics the position decoder.
        #[test]
        fn decode_never_panics(text in ".{0,80}") {
            let _ = Position::decode(&text);
        }

        /// Channel prefixes round-trip for any names.
        #[test]
        fn prefix_round_trip(app in ".{0,20}", channel in ".{0,40}") {
            let ch = ChannelRef { app: app.as_str().into(), channel: channel.as_str().into(), kind: EventKind::Presence };
            prop_assert_eq!(ChannelRef::from_prefix(&ch.prefix()), Some(ch));
        }
    }
}
