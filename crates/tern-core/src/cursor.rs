//! Origins and cursors.
//!
//! An origin is one node incarnation; every message enters the system at exactly one
//! origin, which numbers its messages per channel 1, 2, 3 … with no gaps. A cursor is the
//! vector `origin → highest sequence seen` for one channel. It is sent to clients as the
//! opaque Ably `channelSerial`, and means the same thing on every node.

use std::collections::BTreeMap;
use std::fmt;

/// One node incarnation (node id + boot epoch), chosen by the caller at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OriginId(pub u64);

impl fmt::Display for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Largest number of origins a decoded cursor may carry; bounds client input.
pub const CURSOR_ORIGINS_MAX: usize = 64;

/// Per-channel vector of origin → highest origin sequence seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    seqs: BTreeMap<OriginId, u64>,
}

impl Cursor {
    pub fn new() -> Self {
        Cursor::default()
    }

    /// Highest sequence seen from `origin` (0 = none).
    pub fn get(&self, origin: OriginId) -> u64 {
        self.seqs.get(&origin).copied().unwrap_or(0)
    }

    /// Records that `seq` from `origin` has been applied. Sequences only move forward.
    pub fn advance(&mut self, origin: OriginId, seq: u64) {
        let entry = self.seqs.entry(origin).or_insert(0);
        if seq > *entry {
            *entry = seq;
        }
    }

    /// Raises every origin to at least `other`'s.
    pub fn merge(&mut self, other: &Cursor) {
        for (origin, seq) in other.origins() {
            self.advance(origin, seq);
        }
    }

    /// True when every origin of `other` is at or below this cursor.
    pub fn covers(&self, other: &Cursor) -> bool {
        other
            .seqs
            .iter()
            .all(|(origin, seq)| self.get(*origin) >= *seq)
    }

    pub fn origins(&self) -> impl Iterator<Item = (OriginId, u64)> + '_ {
        self.seqs.iter().map(|(o, s)| (*o, *s))
    }

    /// Opaque wire form: `v1.<origin hex>-<seq hex>.<origin hex>-<seq hex>…`, origins in
    /// order. Only `[0-9a-z.-]`, so it is safe in URLs, headers and Link values.
    pub fn encode(&self) -> String {
        let mut out = String::from("v1");
        for (origin, seq) in &self.seqs {
            out.push('.');
            out.push_str(&format!("{:x}-{:x}", origin.0, seq));
        }
        out
    }

    /// Parses [`Cursor::encode`] output; `None` for anything else (a foreign or corrupt
    /// serial means continuity cannot be proven).
    pub fn decode(text: &str) -> Option<Cursor> {
        let mut parts = text.split('.');
        if parts.next()? != "v1" {
            return None;
        }
        let mut cursor = Cursor::new();
        for part in parts {
            if cursor.seqs.len() >= CURSOR_ORIGINS_MAX {
                return None;
            }
            let (origin, seq) = part.split_once('-')?;
            let origin = u64::from_str_radix(origin, 16).ok()?;
            let seq = u64::from_str_radix(seq, 16).ok()?;
            cursor.advance(OriginId(origin), seq);
        }
        Some(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A cursor survives its wire encoding exactly.
    #[test]
    fn encode_round_trip() {
        let mut c = Cursor::new();
        c.advance(OriginId(0xabc), 7);
        c.advance(OriginId(1), 300);
        assert_eq!(c.encode(), "v1.1-12c.abc-7");
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("v1"), Some(Cursor::new()));
    }

    /// Sequences never move backwards, and `covers` compares per origin.
    #[test]
    fn advance_is_monotonic() {
        let mut a = Cursor::new();
        a.advance(OriginId(1), 5);
        a.advance(OriginId(1), 3);
        assert_eq!(a.get(OriginId(1)), 5);
        let mut b = Cursor::new();
        b.advance(OriginId(1), 4);
        assert!(a.covers(&b));
        b.advance(OriginId(2), 1);
        assert!(!a.covers(&b));
    }

    proptest! {
        /// Arbitrary text never panics the decoder, and anything it accepts re-encodes to
        /// a cursor that decodes to the same value.
        #[test]
        fn decode_never_panics(text in ".{0,200}") {
            if let Some(c) = Cursor::decode(&text) {
                prop_assert_eq!(Cursor::decode(&c.encode()), Some(c));
            }
        }
    }
}
