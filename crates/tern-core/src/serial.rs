//! Message serials: where a message sits, as text that sorts in channel order.
//!
//! A serial names the event that carried the message (its origin and origin sequence,
//! the same on every node) and the message's index in it, after the event's timestamp:
//! `<timestamp ms, 14 digits>-<origin, 16 hex>-<seq, 16 hex>:<index, 4 hex>`. Every
//! field is fixed-width, so comparing two serials as text (as ably-js's tests and Ably's
//! own serials allow) compares (timestamp, origin, seq, index): a later version or an
//! annotation of a message always sorts after the message (see [`floor_after`]). The
//! history store keys items by exactly that tuple, so a serial is also the message's
//! position in the store.

use crate::cursor::OriginId;

/// Where a message sits: its event's timestamp, origin and sequence, and its index in
/// the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SerialPosition {
    pub timestamp_ms: i64,
    pub origin: OriginId,
    pub seq: u64,
    pub index: u32,
}

/// Largest timestamp a serial holds (14 decimal digits: until the year 5138).
const TIMESTAMP_MAX: i64 = 99_999_999_999_999;
/// Largest message index a serial holds (4 hex digits); a publish carries at most
/// 10,000 messages (`messages_per_publish_max` is validated against it).
pub const INDEX_MAX: u32 = 0xffff;
/// Length of every serial.
pub const SERIAL_LEN: usize = 14 + 1 + 16 + 1 + 16 + 1 + 4;

impl SerialPosition {
    /// The serial's text.
    pub fn encode(&self) -> String {
        format!(
            "{:014}-{:016x}-{:016x}:{:04x}",
            self.timestamp_ms.clamp(0, TIMESTAMP_MAX),
            self.origin.0,
            self.seq,
            self.index.min(INDEX_MAX)
        )
    }

    /// Parses [`SerialPosition::encode`] output; `None` for any other text (a client's
    /// serial may be anything).
    pub fn decode(text: &str) -> Option<SerialPosition> {
        let bytes = text.as_bytes();
        if bytes.len() != SERIAL_LEN || bytes[14] != b'-' || bytes[31] != b'-' || bytes[48] != b':'
        {
            return None;
        }
        let digits = |range: std::ops::Range<usize>, radix: u32| -> Option<u64> {
            let field = text.get(range)?;
            // from_str_radix accepts a leading '+', which the encoder never writes.
            if !field
                .bytes()
                .all(|b| b.is_ascii_digit() || (radix == 16 && matches!(b, b'a'..=b'f')))
            {
                return None;
            }
            u64::from_str_radix(field, radix).ok()
        };
        Some(SerialPosition {
            timestamp_ms: i64::try_from(digits(0..14, 10)?).ok()?,
            origin: OriginId(digits(15..31, 16)?),
            seq: digits(32..48, 16)?,
            index: u32::try_from(digits(49..53, 16)?).ok()?,
        })
    }
}

/// The earliest timestamp an event changing or annotating the message at `target` may
/// carry, so its serial sorts after the target's: one millisecond after it. (Clocks of
/// different regions disagree; the change's own time still wins when it is later.)
pub fn floor_after(target: &SerialPosition) -> i64 {
    target.timestamp_ms.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A serial survives its text form exactly, and has the documented shape.
    #[test]
    fn round_trip() {
        let at = SerialPosition {
            timestamp_ms: 1_765_000_000_123,
            origin: OriginId(0xabc),
            seq: 0x1f,
            index: 2,
        };
        let text = at.encode();
        assert_eq!(
            text,
            "01765000000123-0000000000000abc-000000000000001f:0002"
        );
        assert_eq!(SerialPosition::decode(&text), Some(at));
        for bad in [
            "",
            "abc-1:0",
            &text[1..],
            &text.replace('-', "+"),
            &text.to_uppercase(),
        ] {
            assert_eq!(SerialPosition::decode(bad), None, "{bad}");
        }
    }

    proptest! {
        /// Text order is position order, for any two serials.
        #[test]
        fn text_order_is_position_order(
            a in (0i64..TIMESTAMP_MAX, any::<u64>(), any::<u64>(), 0u32..=INDEX_MAX),
            b in (0i64..TIMESTAMP_MAX, any::<u64>(), any::<u64>(), 0u32..=INDEX_MAX),
        ) {
            let make = |(timestamp_ms, origin, seq, index)| SerialPosition {
                timestamp_ms, origin: OriginId(origin), seq, index,
            };
            let (a, b) = (make(a), make(b));
            prop_assert_eq!(a.encode().cmp(&b.encode()), a.cmp(&b));
        }

        /// Arbitrary text never panics the decoder; what it accepts re-encodes to itself.
        #[test]
        fn decode_never_panics(text in ".{0,60}") {
            if let Some(at) = SerialPosition::decode(&text) {
                prop_assert_eq!(at.encode(), text);
            }
        }
    }
}
