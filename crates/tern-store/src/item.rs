//! What is stored, where, and how a key is laid out.
//!
//! Key = channel prefix ‖ position. The prefix is `len(app) u16 ‖ app ‖ len(channel) u16
//! ‖ channel ‖ kind u8`: length-prefixed, so names may hold any bytes (`\0` included)
//! and no two channels share a prefix. The position is big-endian `timestamp (sign bit
//! flipped) ‖ origin ‖ seq ‖ index`, so the byte order of one channel's keys is
//! [`Position`] order and a range scan reads history in order.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::StoreError;

/// Longest app or channel name a key can hold, in bytes.
pub const NAME_BYTES_MAX: usize = u16::MAX as usize;

/// Messages and presence messages of a channel are separate histories. The changes and
/// annotations of one message are kept apart too, so reading them is one range scan:
/// their [`ChannelRef::channel`] is `<channel>\0<message serial>` ([`ChannelRef::of_message`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Message,
    Presence,
    /// Updates, deletes, appends and summaries of one message (also in the channel's
    /// `Message` history, which the cursor and new homes read).
    Versions,
    /// Annotations of one message.
    Annotations,
}

impl EventKind {
    fn byte(self) -> u8 {
        match self {
            EventKind::Message => 0,
            EventKind::Presence => 1,
            EventKind::Versions => 2,
            EventKind::Annotations => 3,
        }
    }

    /// Whether rows of this kind belong to one message (channel `<channel>\0<serial>`).
    fn per_message(byte: u8) -> bool {
        byte >= 2
    }
}

/// Where an item sits: one channel of one app, messages or presence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelRef {
    pub app: Arc<str>,
    pub channel: Arc<str>,
    pub kind: EventKind,
}

/// One stored message (or presence message). `payload` is opaque: the caller chooses
/// the encoding (the edge stores msgpack).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredItem {
    pub timestamp_ms: i64,
    /// Node that accepted the publish.
    pub origin: u64,
    /// The origin's sequence number of the publish.
    pub seq: u64,
    /// Index of the message inside its publish (one publish may carry several).
    pub index: u32,
    pub payload: Bytes,
}

impl StoredItem {
    /// Where this item sorts within its channel.
    pub fn position(&self) -> Position {
        Position {
            timestamp_ms: self.timestamp_ms,
            origin: self.origin,
            seq: self.seq,
            index: self.index,
        }
    }
}

/// Total order of items inside one [`ChannelRef`]: (timestamp_ms, origin, seq, index).
/// Used as the exclusive pagination bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub timestamp_ms: i64,
    pub origin: u64,
    pub seq: u64,
    pub index: u32,
}

/// Bytes of an encoded position at the end of every key.
pub(crate) const POSITION_BYTES: usize = 8 + 8 + 8 + 4;

/// Most hex digits a field of a position string may have (a u64).
const HEX_DIGITS_MAX: usize = 16;

/// Flipping the sign bit makes two's-complement timestamps sort as unsigned bytes.
const SIGN: u64 = 1 << 63;

impl Position {
    /// The first position of any channel.
    pub const MIN: Position = Position {
        timestamp_ms: i64::MIN,
        origin: 0,
        seq: 0,
        index: 0,
    };
    /// The last position of any channel.
    pub const MAX: Position = Position {
        timestamp_ms: i64::MAX,
        origin: u64::MAX,
        seq: u64::MAX,
        index: u32::MAX,
    };

    /// URL-safe text without commas: four lowercase hex fields joined by `-`, the
    /// timestamp with its sign bit flipped so it is never negative.
    pub fn encode(&self) -> String {
        format!(
            "{:x}-{:x}-{:x}-{:x}",
            (self.timestamp_ms as u64) ^ SIGN,
            self.origin,
            self.seq,
            self.index
        )
    }

    /// Parses [`Position::encode`] output. Any other text (from a client's query
    /// string) is `None`, never a panic.
    pub fn decode(text: &str) -> Option<Position> {
        let mut fields = text.split('-');
        let mut next = || fields.next().and_then(hex_field);
        let position = Position {
            timestamp_ms: (next()? ^ SIGN) as i64,
            origin: next()?,
            seq: next()?,
            index: u32::try_from(next()?).ok()?,
        };
        fields.next().is_none().then_some(position)
    }

    pub(crate) fn to_bytes(self) -> [u8; POSITION_BYTES] {
        let mut out = [0u8; POSITION_BYTES];
        out[0..8].copy_from_slice(&((self.timestamp_ms as u64) ^ SIGN).to_be_bytes());
        out[8..16].copy_from_slice(&self.origin.to_be_bytes());
        out[16..24].copy_from_slice(&self.seq.to_be_bytes());
        out[24..28].copy_from_slice(&self.index.to_be_bytes());
        out
    }

    /// Inverse of [`Position::to_bytes`]; `None` unless `bytes` is exactly one position.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Position> {
        let bytes: &[u8; POSITION_BYTES] = bytes.try_into().ok()?;
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(field)
        };
        let mut index = [0u8; 4];
        index.copy_from_slice(&bytes[24..28]);
        Some(Position {
            timestamp_ms: (u64_at(0) ^ SIGN) as i64,
            origin: u64_at(8),
            seq: u64_at(16),
            index: u32::from_be_bytes(index),
        })
    }

    /// The next position in order, if any.
    pub(crate) fn successor(self) -> Option<Position> {
        if let Some(index) = self.index.checked_add(1) {
            return Some(Position { index, ..self });
        }
        if let Some(seq) = self.seq.checked_add(1) {
            return Some(Position {
                seq,
                index: 0,
                ..self
            });
        }
        if let Some(origin) = self.origin.checked_add(1) {
            return Some(Position {
                origin,
                seq: 0,
                index: 0,
                ..self
            });
        }
        Some(Position {
            timestamp_ms: self.timestamp_ms.checked_add(1)?,
            ..Position::MIN
        })
    }

    /// The previous position in order, if any.
    pub(crate) fn predecessor(self) -> Option<Position> {
        if let Some(index) = self.index.checked_sub(1) {
            return Some(Position { index, ..self });
        }
        if let Some(seq) = self.seq.checked_sub(1) {
            return Some(Position {
                seq,
                index: u32::MAX,
                ..self
            });
        }
        if let Some(origin) = self.origin.checked_sub(1) {
            return Some(Position {
                origin,
                seq: u64::MAX,
                index: u32::MAX,
                ..self
            });
        }
        Some(Position {
            timestamp_ms: self.timestamp_ms.checked_sub(1)?,
            ..Position::MAX
        })
    }
}

/// One hex field of a position string: 1 to 16 ASCII hex digits, nothing else (no sign,
/// no spaces), so the text form stays canonical enough to compare.
fn hex_field(text: &str) -> Option<u64> {
    let digits_ok =
        (1..=HEX_DIGITS_MAX).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit());
    digits_ok
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

impl ChannelRef {
    /// Shorthand for the struct literal.
    pub fn new(app: &str, channel: &str, kind: EventKind) -> ChannelRef {
        ChannelRef {
            app: app.into(),
            channel: channel.into(),
            kind,
        }
    }

    /// The changes (`Versions`) or annotations of the message `serial` of a channel.
    pub fn of_message(app: &str, channel: &str, serial: &str, kind: EventKind) -> ChannelRef {
        ChannelRef {
            app: app.into(),
            channel: format!("{channel}\0{serial}").into(),
            kind,
        }
    }

    /// The key prefix every item of this channel shares.
    pub(crate) fn key_prefix(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(self.app.len() + self.channel.len() + 5);
        for name in [self.app.as_bytes(), self.channel.as_bytes()] {
            let len = u16::try_from(name.len())
                .map_err(|_| StoreError::NameTooLong { bytes: name.len() })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(name);
        }
        out.push(self.kind.byte());
        Ok(out)
    }
}

/// The channel name inside a key prefix (retention rules match on it), or `None` if the
/// bytes are not a well-formed prefix.
pub(crate) fn channel_of_prefix(prefix: &[u8]) -> Option<&[u8]> {
    let (_app, rest) = split_name(prefix)?;
    let (channel, rest) = split_name(rest)?;
    matches!(rest, [0..=3]).then_some(channel)
}

/// `(app, channel)` of a message history's key prefix (kind `Message`); `None` for
/// presence, a message's changes and annotations, or malformed bytes.
pub(crate) fn message_channel_of_prefix(prefix: &[u8]) -> Option<(&[u8], &[u8])> {
    let (app, rest) = split_name(prefix)?;
    let (channel, rest) = split_name(rest)?;
    (rest == [EventKind::Message.byte()]).then_some((app, channel))
}

/// The key of a channel's cursor row for an item prefix: the prefix without its kind
/// byte, so messages and presence (which share one sequence per origin) share one row;
/// a message's changes and annotations count in their channel's row.
pub(crate) fn cursor_key(prefix: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let base = &prefix[..prefix.len().saturating_sub(1)];
    let per_message = prefix
        .last()
        .is_some_and(|kind| EventKind::per_message(*kind));
    let split = || {
        let (app, rest) = split_name(prefix)?;
        let (channel, _) = split_name(rest)?;
        let end = channel.iter().rposition(|b| *b == 0)?;
        Some((app, &channel[..end]))
    };
    match (per_message, per_message.then(split).flatten()) {
        (true, Some((app, channel))) => {
            let mut out = Vec::with_capacity(app.len() + channel.len() + 4);
            for name in [app, channel] {
                out.extend_from_slice(&(name.len() as u16).to_be_bytes());
                out.extend_from_slice(name);
            }
            std::borrow::Cow::Owned(out)
        }
        _ => std::borrow::Cow::Borrowed(base),
    }
}

/// Splits `len u16 ‖ name ‖ rest` into `(name, rest)`.
fn split_name(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// `prefix ‖ position`.
pub(crate) fn key(prefix: &[u8], position: Position) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + POSITION_BYTES);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&position.to_bytes());
    key
}

/// The position at the end of a key of the channel with `prefix`.
pub(crate) fn position_of_key(prefix: &[u8], key: &[u8]) -> Result<Position, StoreError> {
    key.strip_prefix(prefix)
        .and_then(Position::from_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("malformed history key of {} bytes", key.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn position(fields: (i64, u64, u64, u32)) -> Position {
        Position {
            timestamp_ms: fields.0,
            origin: fields.1,
            seq: fields.2,
            index: fields.3,
        }
    }

    proptest! {
        /// Key byte order equals position order, and positions survive text and bytes.
        #[test]
        fn key_order_is_position_order(a in any::<(i64, u64, u64, u32)>(), b in any::<(i64, u64, u64, u32)>()) {
            let (pa, pb) = (position(a), position(b));
            let prefix = ChannelRef::new("a", "c", EventKind::Message).key_prefix().unwrap();
            prop_assert_eq!(key(&prefix, pa).cmp(&key(&prefix, pb)), pa.cmp(&pb));
            prop_assert_eq!(Position::decode(&pa.encode()), Some(pa));
            prop_assert_eq!(position_of_key(&prefix, &key(&prefix, pa)), Ok(pa));
        }

        /// Successor and predecessor are the adjacent positions, and inverse to each other.
        #[test]
        fn neighbours_are_adjacent(a in any::<(i64, u64, u64, u32)>()) {
            let p = position(a);
            if let Some(next) = p.successor() {
                prop_assert!(next > p);
                prop_assert_eq!(next.predecessor(), Some(p));
            } else {
                prop_assert_eq!(p, Position::MAX);
            }
        }

        /// Arbitrary text never panics the position decoder, and whatever it accepts
        /// encodes back to text that decodes to the same position.
        #[test]
        fn decode_never_panics(text in "[0-9a-fA-F+ -]{0,80}|.{0,80}") {
            if let Some(p) = Position::decode(&text) {
                prop_assert_eq!(Position::decode(&p.encode()), Some(p));
            }
        }

        /// Arbitrary key bytes never panic the key decoders.
        #[test]
        fn key_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = channel_of_prefix(&bytes);
            let _ = position_of_key(&bytes[..bytes.len().min(3)], &bytes);
        }

        /// The channel name is read back from any prefix, whatever bytes the names hold.
        #[test]
        fn prefix_names_round_trip(app in ".{0,20}", channel in ".{0,40}") {
            let prefix = ChannelRef::new(&app, &channel, EventKind::Presence).key_prefix().unwrap();
            prop_assert_eq!(channel_of_prefix(&prefix), Some(channel.as_bytes()));
        }
    }

    /// Names that differ only in where a `\0` falls get different prefixes.
    #[test]
    fn prefixes_are_unambiguous() {
        let a = ChannelRef::new("a\0", "b", EventKind::Message).key_prefix();
        let b = ChannelRef::new("a", "\0b", EventKind::Message).key_prefix();
        let c = ChannelRef::new("a", "\0b", EventKind::Presence).key_prefix();
        assert_ne!(a, b);
        assert_ne!(b, c);
    }

    /// Malformed position strings are refused: wrong field count, signs, overlong
    /// fields, an index past u32.
    #[test]
    fn decode_refuses_malformed_text() {
        for text in [
            "",
            "1-2-3",
            "1-2-3-4-5",
            "+1-2-3-4",
            "1-2-3--4",
            "1-2-3-",
            "11111111111111111-2-3-4",
            "1-2-3-100000000",
            "1,2,3,4",
            "g-2-3-4",
        ] {
            assert_eq!(Position::decode(text), None, "{text:?}");
        }
        assert!(Position::decode("8000000000000000-0-0-ffffffff").is_some());
    }

    /// A name longer than a key can hold is an error, not a truncation.
    #[test]
    fn overlong_names_are_refused() {
        let long = "x".repeat(NAME_BYTES_MAX + 1);
        let err = ChannelRef::new("app", &long, EventKind::Message).key_prefix();
        assert_eq!(
            err,
            Err(StoreError::NameTooLong {
                bytes: NAME_BYTES_MAX + 1
            })
        );
        assert!(ChannelRef::new(&long[1..], "c", EventKind::Message)
            .key_prefix()
            .is_ok());
    }

    /// A message's changes and annotations live under their own prefix (so one scan reads
    /// them), yet count in their channel's cursor row, as its messages and presence do.
    #[test]
    fn per_message_rows_share_their_channels_cursor() {
        let message = ChannelRef::new("app", "ch", EventKind::Message)
            .key_prefix()
            .unwrap();
        for kind in [EventKind::Versions, EventKind::Annotations] {
            let one = ChannelRef::of_message("app", "ch", "s1", kind)
                .key_prefix()
                .unwrap();
            let other = ChannelRef::of_message("app", "ch", "s2", kind)
                .key_prefix()
                .unwrap();
            assert_ne!(one, other);
            assert!(!other.starts_with(&one) && !one.starts_with(&message));
            assert_eq!(cursor_key(&one), cursor_key(&message));
            assert_eq!(channel_of_prefix(&one), Some(&b"ch\0s1"[..]));
        }
        assert_ne!(
            cursor_key(
                &ChannelRef::new("app", "ch2", EventKind::Presence)
                    .key_prefix()
                    .unwrap()
            ),
            cursor_key(&message)
        );
    }
}
