//! The compact form of an [`EventV1`] on a wire-v2 link (issue 17): the same event in a
//! few dozen bytes plus its payload instead of ~5× it, rebuilt byte for byte at the
//! receiver (the origin's msgpack frame is reproduced exactly, so subscribers in every
//! region get the bytes the origin's subscribers get).
//!
//! Why it is small: an event's frame is a msgpack `ProtocolMessage` whose bytes are
//! mostly what the receiver has already seen on the same link: map keys, the channel,
//! the connectionId and clientId, a timestamp a few milliseconds after the previous one,
//! a message id and channelSerial that differ from the previous ones in a character or
//! two. So the frame is walked as msgpack (without knowing the ProtocolMessage schema,
//! so any field the protocol grows still round-trips) and each item is sent as:
//! - a map key: one byte naming it in the link's key table once it has been seen;
//! - a string: a reference into the link's string table, or the bytes it differs by
//!   from the previous string under the same map key (common prefix and suffix
//!   lengths and the middle), or itself;
//! - an integer: its marker and the difference from the previous integer under the same
//!   map key (a timestamp is one or two bytes);
//! - anything else (nil, bool, floats, bin, ext): its msgpack bytes as they are.
//!
//! The event's own fields are interned too: `(app, channel)` in a per-link channel table
//! (a reference after the first event), `seq` as the difference from that channel's
//! previous one, `link_seq` as one bit when it is the previous plus one.
//!
//! State: an [`Encoder`] and a [`Decoder`] hold mirror-image tables for one ordered
//! stream. Both sides update them in the same way from the same sequence of events, so
//! the tables need no messages of their own; they are bounded (rings and capped maps)
//! and a new stream starts with new tables. Pure: bytes in, bytes out, no I/O.
//!
//! Frames this walk does not reproduce exactly (a non-canonical msgpack length marker,
//! more nesting than [`DEPTH_MAX`], or not msgpack at all) are sent as they are (a flag
//! bit), so the codec is exact for every input, not just the frames tern produces.
//!
//! Decoding is the trust boundary: every length is checked against the bytes left and
//! the output against [`FRAME_BYTES_MAX`], references against the table, and any
//! inconsistency is a [`Refusal`], never a panic.

use std::collections::HashMap;

use super::{EventV1, Refusal, FRAME_BYTES_MAX};

/// Strings up to this long are remembered in the string table.
pub const INTERN_BYTES_MAX: usize = 64;
/// Entries of the string table (a ring: the oldest is replaced).
pub const STRINGS_MAX: usize = 1_024;
/// Entries of the map-key table: a key is one byte, so at most 128.
pub const KEYS_MAX: usize = 128;
/// Map keys whose previous string and integer are remembered (capped; keys past it are
/// simply not delta-coded).
pub const SLOTS_MAX: usize = 256;
/// Longest string a slot remembers for the next one under its key to differ from.
pub const SLOT_STRING_BYTES_MAX: usize = 256;
/// Entries of the channel table (a ring).
pub const CHANNELS_MAX: usize = 4_096;
/// Deepest msgpack nesting walked (a frame is three levels deep).
pub const DEPTH_MAX: usize = 16;

const FLAG_SAME_ORIGIN: u8 = 1;
const FLAG_PUBLISHER: u8 = 2;
const FLAG_NEXT_LINK_SEQ: u8 = 4;
const FLAG_RAW_FRAME: u8 = 8;
const FLAGS_ALL: u8 = 15;

/// The one msgpack marker that is never used: it escapes to this codec's own items.
const ESCAPE: u8 = 0xc1;
/// After [`ESCAPE`]: a string given as its difference from the slot's previous one.
const ESC_DELTA: u64 = 0;
/// After [`ESCAPE`] in key position: a positive fixint key (one byte follows).
const ESC_FIXINT_KEY: u64 = 1;
/// After [`ESCAPE`]: references to the string table start here.
const ESC_REF_BASE: u64 = 2;

/// The tables both ends of one stream keep in step.
#[derive(Default)]
struct Tables {
    /// Ring of short strings; `next` is where the next one goes.
    strings: Vec<Vec<u8>>,
    strings_next: usize,
    keys: Vec<Vec<u8>>,
    keys_next: usize,
    /// Per map key: the previous string and integer under it.
    slots: HashMap<Vec<u8>, Slot>,
    channels: Vec<ChannelEntry>,
    channels_next: usize,
    origin: u64,
    link_seq: u64,
}

#[derive(Default, Clone)]
struct Slot {
    string: Option<Vec<u8>>,
    int: Option<i128>,
}

struct ChannelEntry {
    app: String,
    channel: String,
    seq: u64,
}

fn ring_put<T>(ring: &mut Vec<T>, next: &mut usize, cap: usize, item: T) -> usize {
    let at = *next;
    if ring.len() < cap {
        ring.push(item);
    } else {
        ring[at] = item;
    }
    *next = (at + 1) % cap;
    at
}

impl Tables {
    fn slot(&mut self, key: Option<&[u8]>) -> Option<&mut Slot> {
        let key = key?;
        if !self.slots.contains_key(key) {
            if self.slots.len() >= SLOTS_MAX {
                return None;
            }
            self.slots.insert(key.to_vec(), Slot::default());
        }
        self.slots.get_mut(key)
    }

    fn slot_string(&self, key: Option<&[u8]>) -> Option<&[u8]> {
        self.slots.get(key?)?.string.as_deref()
    }

    fn slot_int(&self, key: Option<&[u8]>) -> i128 {
        key.and_then(|k| self.slots.get(k))
            .and_then(|s| s.int)
            .unwrap_or(0)
    }

    /// What both sides do after a string value (however it was sent).
    fn saw_string(&mut self, key: Option<&[u8]>, value: &[u8], referenced: bool) -> Option<usize> {
        if let Some(slot) = self.slot(key) {
            // Long strings (payloads) are not delta-coded: what a slot holds stays small.
            slot.string = (value.len() <= SLOT_STRING_BYTES_MAX).then(|| value.to_vec());
        }
        if !referenced && value.len() <= INTERN_BYTES_MAX {
            return Some(ring_put(
                &mut self.strings,
                &mut self.strings_next,
                STRINGS_MAX,
                value.to_vec(),
            ));
        }
        None
    }

    fn reset_frame_tables(&mut self) {
        self.strings.clear();
        self.strings_next = 0;
        self.keys.clear();
        self.keys_next = 0;
        self.slots.clear();
    }

    fn saw_int(&mut self, key: Option<&[u8]>, value: i128) {
        if let Some(slot) = self.slot(key) {
            slot.int = Some(value);
        }
    }
}

/// The sending side of one stream.
#[derive(Default)]
pub struct Encoder {
    tables: Tables,
    /// Where each remembered string and key sits in its table.
    string_index: HashMap<Vec<u8>, usize>,
    key_index: HashMap<Vec<u8>, usize>,
    channel_index: HashMap<(String, String), usize>,
}

/// The receiving side of one stream.
#[derive(Default)]
pub struct Decoder {
    tables: Tables,
}

mod decode;
mod encode;
mod msgpack;
#[cfg(test)]
mod tests;
