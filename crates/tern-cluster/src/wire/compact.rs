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

// ---- varints --------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

fn bad(what: &str) -> Refusal {
    Refusal::Undecodable(format!("compact event: {what}"))
}

/// Reads peer bytes; every read is bounds-checked.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn byte(&mut self) -> Result<u8, Refusal> {
        let b = *self.bytes.get(self.at).ok_or_else(|| bad("truncated"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.left() {
            return Err(bad("truncated"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn varint(&mut self) -> Result<u128, Refusal> {
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let b = self.byte()?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn len(&mut self) -> Result<usize, Refusal> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= FRAME_BYTES_MAX)
            .ok_or_else(|| bad("length"))
    }
}

// ---- msgpack shapes -------------------------------------------------------------------

/// The canonical (smallest) msgpack string header for `len`.
fn str_header(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=31 => out.push(0xa0 | len as u8),
        32..=0xff => out.extend([0xd9, len as u8]),
        0x100..=0xffff => {
            out.push(0xda);
            out.extend((len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend((len as u32).to_be_bytes());
        }
    }
}

fn container_header(out: &mut Vec<u8>, len: usize, map: bool) {
    let (fix, m16, m32) = if map {
        (0x80, 0xde, 0xdf)
    } else {
        (0x90, 0xdc, 0xdd)
    };
    match len {
        0..=15 => out.push(fix | len as u8),
        16..=0xffff => {
            out.push(m16);
            out.extend((len as u16).to_be_bytes());
        }
        _ => {
            out.push(m32);
            out.extend((len as u32).to_be_bytes());
        }
    }
}

/// Bytes of an integer marker's value (0xcc..=0xd3), and whether it is signed.
fn int_width(marker: u8) -> Option<(usize, bool)> {
    match marker {
        0xcc => Some((1, false)),
        0xcd => Some((2, false)),
        0xce => Some((4, false)),
        0xcf => Some((8, false)),
        0xd0 => Some((1, true)),
        0xd1 => Some((2, true)),
        0xd2 => Some((4, true)),
        0xd3 => Some((8, true)),
        _ => None,
    }
}

fn int_read(bytes: &[u8], signed: bool) -> i128 {
    let mut buf = [0u8; 16];
    let n = bytes.len();
    buf[16 - n..].copy_from_slice(bytes);
    if signed && bytes[0] & 0x80 != 0 {
        buf[..16 - n].fill(0xff);
    }
    i128::from_be_bytes(buf)
}

fn int_write(out: &mut Vec<u8>, value: i128, width: usize, signed: bool) -> Result<(), Refusal> {
    let bits = width as u32 * 8;
    let fits = if signed {
        value >= -(1i128 << (bits - 1)) && value < (1i128 << (bits - 1))
    } else {
        value >= 0 && value < (1i128 << bits)
    };
    if !fits {
        return Err(bad("integer out of range"));
    }
    out.extend(&value.to_be_bytes()[16 - width..]);
    Ok(())
}

/// Length of a raw item copied as it is (nil, bool, floats, bin, ext, fixints): the
/// bytes after the marker, given those bytes (for bin/ext lengths).
fn raw_len(marker: u8, after: &[u8]) -> Option<usize> {
    let be = |n: usize| -> Option<usize> {
        let b = after.get(..n)?;
        Some(b.iter().fold(0usize, |a, &x| (a << 8) | x as usize))
    };
    Some(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
        0xca => 4,
        0xcb => 8,
        0xc4 => 1 + be(1)?,
        0xc5 => 2 + be(2)?,
        0xc6 => 4 + be(4)?,
        0xd4 => 2,
        0xd5 => 3,
        0xd6 => 5,
        0xd7 => 9,
        0xd8 => 17,
        0xc7 => 1 + 1 + be(1)?,
        0xc8 => 2 + 1 + be(2)?,
        0xc9 => 4 + 1 + be(4)?,
        _ => return None,
    })
}

// ---- encoding -------------------------------------------------------------------------

/// A msgpack walk failed: the frame goes as it is.
struct NotCompact;

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// Appends the compact form of `event` to `out`.
    pub fn encode(&mut self, event: &EventV1, out: &mut Vec<u8>) {
        let flags_at = out.len();
        out.push(0);
        let mut flags = 0;
        // Channel.
        let key = (event.app.clone(), event.channel.clone());
        let prev_seq = match self.channel_index.get(&key) {
            Some(&at) => {
                put_varint(out, at as u128 + 1);
                self.tables.channels[at].seq
            }
            None => {
                put_varint(out, 0);
                put_varint(out, event.app.len() as u128);
                out.extend(event.app.as_bytes());
                put_varint(out, event.channel.len() as u128);
                out.extend(event.channel.as_bytes());
                0
            }
        };
        put_varint(out, zigzag(i128::from(event.seq) - i128::from(prev_seq)));
        self.put_channel(&key, event.seq);
        if event.origin == self.tables.origin {
            flags |= FLAG_SAME_ORIGIN;
        } else {
            put_varint(out, u128::from(event.origin));
            self.tables.origin = event.origin;
        }
        if event.link_seq != 0 && event.link_seq == self.tables.link_seq.wrapping_add(1) {
            flags |= FLAG_NEXT_LINK_SEQ;
        } else {
            put_varint(out, u128::from(event.link_seq));
        }
        if event.link_seq != 0 {
            self.tables.link_seq = event.link_seq;
        }
        if let Some(publisher) = &event.publisher {
            flags |= FLAG_PUBLISHER;
            self.string(out, Some(b"\0publisher"), publisher.as_bytes());
        }
        // The frame, walked as msgpack; one that cannot be walked goes as it is.
        let mut body = Vec::with_capacity(event.frame.len());
        let mut input = &event.frame[..];
        match self.value(&mut body, &mut input, None, 0) {
            Ok(()) if input.is_empty() => out.extend(body),
            _ => {
                self.reset_frame_tables();
                flags |= FLAG_RAW_FRAME;
                put_varint(out, event.frame.len() as u128);
                out.extend(&event.frame);
            }
        }
        out[flags_at] = flags;
    }

    fn put_channel(&mut self, key: &(String, String), seq: u64) {
        match self.channel_index.get(key) {
            Some(&at) => self.tables.channels[at].seq = seq,
            None => {
                let t = &mut self.tables;
                if t.channels.len() == CHANNELS_MAX {
                    let old = &t.channels[t.channels_next];
                    self.channel_index
                        .remove(&(old.app.clone(), old.channel.clone()));
                }
                let at = ring_put(
                    &mut t.channels,
                    &mut t.channels_next,
                    CHANNELS_MAX,
                    ChannelEntry {
                        app: key.0.clone(),
                        channel: key.1.clone(),
                        seq,
                    },
                );
                self.channel_index.insert(key.clone(), at);
            }
        }
    }

    /// Forgets the tables a frame walk fills (strings, keys, slots), as the decoder
    /// does when it reads a raw frame: a walk that failed half-way may have changed them.
    fn reset_frame_tables(&mut self) {
        self.tables.reset_frame_tables();
        self.string_index.clear();
        self.key_index.clear();
    }

    fn value(
        &mut self,
        out: &mut Vec<u8>,
        input: &mut &[u8],
        key: Option<&[u8]>,
        depth: usize,
    ) -> Result<(), NotCompact> {
        if depth > DEPTH_MAX {
            return Err(NotCompact);
        }
        let (&marker, rest) = input.split_first().ok_or(NotCompact)?;
        let be = |n: usize| -> Result<usize, NotCompact> {
            let b = rest.get(..n).ok_or(NotCompact)?;
            Ok(b.iter().fold(0usize, |a, &x| (a << 8) | x as usize))
        };
        // Strings.
        let string = match marker {
            0xa0..=0xbf => Some((1, (marker & 0x1f) as usize)),
            0xd9 => Some((2, be(1)?)),
            0xda => Some((3, be(2)?)),
            0xdb => Some((5, be(4)?)),
            _ => None,
        };
        if let Some((header, len)) = string {
            let bytes = input.get(header..header + len).ok_or(NotCompact)?;
            let mut canonical = Vec::new();
            str_header(&mut canonical, len);
            if canonical.len() != header {
                return Err(NotCompact);
            }
            *input = &input[header + len..];
            self.string(out, key, bytes);
            return Ok(());
        }
        // Containers.
        let container = match marker {
            0x80..=0x8f => Some((1, (marker & 0x0f) as usize, true)),
            0x90..=0x9f => Some((1, (marker & 0x0f) as usize, false)),
            0xde => Some((3, be(2)?, true)),
            0xdf => Some((5, be(4)?, true)),
            0xdc => Some((3, be(2)?, false)),
            0xdd => Some((5, be(4)?, false)),
            _ => None,
        };
        if let Some((header, len, map)) = container {
            let mut canonical = Vec::new();
            container_header(&mut canonical, len, map);
            if canonical.len() != header || len > input.len() {
                return Err(NotCompact);
            }
            out.extend(&canonical);
            *input = &input[header..];
            for _ in 0..len {
                if map {
                    let k = self.key(out, input)?;
                    self.value(out, input, k.as_deref(), depth + 1)?;
                } else {
                    self.value(out, input, key, depth + 1)?;
                }
            }
            return Ok(());
        }
        // Integers with a width.
        if let Some((width, signed)) = int_width(marker) {
            let bytes = rest.get(..width).ok_or(NotCompact)?;
            let value = int_read(bytes, signed);
            let prev = self.tables.slot_int(key);
            out.push(marker);
            put_varint(out, zigzag(value - prev));
            self.tables.saw_int(key, value);
            *input = &rest[width..];
            return Ok(());
        }
        if marker == ESCAPE {
            return Err(NotCompact);
        }
        let n = raw_len(marker, rest).ok_or(NotCompact)?;
        let item = input.get(..1 + n).ok_or(NotCompact)?;
        out.extend(item);
        *input = &input[1 + n..];
        Ok(())
    }

    /// A map key: one byte for a string key already in the key table. Returns the key
    /// (its bytes) when it is a string.
    fn key(&mut self, out: &mut Vec<u8>, input: &mut &[u8]) -> Result<Option<Vec<u8>>, NotCompact> {
        let (&marker, rest) = input.split_first().ok_or(NotCompact)?;
        let short = match marker {
            0xa0..=0xbf => Some((marker & 0x1f) as usize),
            _ => None,
        };
        if let Some(len) = short {
            let bytes = rest.get(..len).ok_or(NotCompact)?.to_vec();
            *input = &rest[len..];
            match self.key_index.get(&bytes) {
                Some(&at) => out.push(at as u8),
                None => {
                    out.extend(&[marker]);
                    out.extend(&bytes);
                    let t = &mut self.tables;
                    if t.keys.len() == KEYS_MAX {
                        let old = t.keys[t.keys_next].clone();
                        self.key_index.remove(&old);
                    }
                    let at = ring_put(&mut t.keys, &mut t.keys_next, KEYS_MAX, bytes.clone());
                    self.key_index.insert(bytes.clone(), at);
                }
            }
            return Ok(Some(bytes));
        }
        if marker < 0x80 {
            out.push(ESCAPE);
            put_varint(out, u128::from(ESC_FIXINT_KEY));
            out.push(marker);
            *input = rest;
            return Ok(None);
        }
        // Any other key (long strings, numbers) is an ordinary value with no slot.
        self.value(out, input, None, DEPTH_MAX)?;
        Ok(None)
    }

    fn string(&mut self, out: &mut Vec<u8>, key: Option<&[u8]>, value: &[u8]) {
        if let Some(&at) = self.string_index.get(value) {
            out.push(ESCAPE);
            put_varint(out, ESC_REF_BASE as u128 + at as u128);
            self.tables.saw_string(key, value, true);
            return;
        }
        let mut literal = Vec::with_capacity(value.len() + 5);
        str_header(&mut literal, value.len());
        literal.extend(value);
        let mut delta = Vec::new();
        if let Some(prev) = self.tables.slot_string(key) {
            let prefix = prev.iter().zip(value).take_while(|(a, b)| a == b).count();
            let room = prev.len().min(value.len()) - prefix;
            let suffix = prev
                .iter()
                .rev()
                .zip(value.iter().rev())
                .take(room)
                .take_while(|(a, b)| a == b)
                .count();
            let middle = &value[prefix..value.len() - suffix];
            delta.push(ESCAPE);
            put_varint(&mut delta, u128::from(ESC_DELTA));
            put_varint(&mut delta, prefix as u128);
            put_varint(&mut delta, suffix as u128);
            put_varint(&mut delta, middle.len() as u128);
            delta.extend(middle);
        }
        if !delta.is_empty() && delta.len() < literal.len() {
            out.extend(delta);
        } else {
            out.extend(literal);
        }
        let t = &self.tables;
        if value.len() <= INTERN_BYTES_MAX && t.strings.len() == STRINGS_MAX {
            // The ring entry about to be replaced: forget where that string was.
            let old = &t.strings[t.strings_next];
            if self.string_index.get(old) == Some(&t.strings_next) {
                self.string_index.remove(old);
            }
        }
        if let Some(at) = self.tables.saw_string(key, value, false) {
            self.string_index.insert(value.to_vec(), at);
        }
    }
}

// ---- decoding -------------------------------------------------------------------------

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Reads one compact event from `bytes`; returns it and the bytes it took.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<(EventV1, usize), Refusal> {
        let mut input = Input { bytes, at: 0 };
        let flags = input.byte()?;
        if flags & !FLAGS_ALL != 0 {
            return Err(bad("flags"));
        }
        let channel_ref = input.len()?;
        let (app, channel, prev_seq, at) = if channel_ref == 0 {
            let n = input.len()?;
            let app = String::from_utf8(input.take(n)?.to_vec()).map_err(|_| bad("app"))?;
            let n = input.len()?;
            let channel = String::from_utf8(input.take(n)?.to_vec()).map_err(|_| bad("channel"))?;
            (app, channel, 0, None)
        } else {
            let entry = self
                .tables
                .channels
                .get(channel_ref - 1)
                .ok_or_else(|| bad("channel reference"))?;
            (
                entry.app.clone(),
                entry.channel.clone(),
                entry.seq,
                Some(channel_ref - 1),
            )
        };
        let seq = i128::from(prev_seq) + unzigzag(input.varint()?);
        let seq = u64::try_from(seq).map_err(|_| bad("seq"))?;
        match at {
            Some(at) => self.tables.channels[at].seq = seq,
            None => {
                let t = &mut self.tables;
                ring_put(
                    &mut t.channels,
                    &mut t.channels_next,
                    CHANNELS_MAX,
                    ChannelEntry {
                        app: app.clone(),
                        channel: channel.clone(),
                        seq,
                    },
                );
            }
        }
        let origin = if flags & FLAG_SAME_ORIGIN != 0 {
            self.tables.origin
        } else {
            let origin = u64::try_from(input.varint()?).map_err(|_| bad("origin"))?;
            self.tables.origin = origin;
            origin
        };
        let link_seq = if flags & FLAG_NEXT_LINK_SEQ != 0 {
            self.tables
                .link_seq
                .checked_add(1)
                .ok_or_else(|| bad("link_seq"))?
        } else {
            u64::try_from(input.varint()?).map_err(|_| bad("link_seq"))?
        };
        if link_seq != 0 {
            self.tables.link_seq = link_seq;
        }
        let publisher = if flags & FLAG_PUBLISHER != 0 {
            let mut out = Vec::new();
            let marker = input.byte()?;
            self.string(&mut out, &mut input, marker, Some(b"\0publisher"))?;
            let text = strip_str_header(&out);
            Some(String::from_utf8(text.to_vec()).map_err(|_| bad("publisher"))?)
        } else {
            None
        };
        let frame = if flags & FLAG_RAW_FRAME != 0 {
            // The encoder forgot its frame tables when it could not walk this frame.
            self.tables.reset_frame_tables();
            let n = input.len()?;
            input.take(n)?.to_vec()
        } else {
            let mut out = Vec::new();
            self.value(&mut out, &mut input, None, 0)?;
            out
        };
        let used = input.at;
        Ok((
            EventV1 {
                app,
                channel,
                origin,
                seq,
                publisher,
                frame,
                link_seq,
            },
            used,
        ))
    }

    fn value(
        &mut self,
        out: &mut Vec<u8>,
        input: &mut Input<'_>,
        key: Option<&[u8]>,
        depth: usize,
    ) -> Result<(), Refusal> {
        if depth > DEPTH_MAX {
            return Err(bad("too deep"));
        }
        if out.len() > FRAME_BYTES_MAX {
            return Err(Refusal::TooLarge(out.len()));
        }
        let marker = input.byte()?;
        match marker {
            0xa0..=0xbf | 0xd9..=0xdb | ESCAPE => self.string(out, input, marker, key),
            0x80..=0x8f | 0x90..=0x9f | 0xdc..=0xdf => {
                let (len, map) = match marker {
                    0x80..=0x8f => ((marker & 0x0f) as usize, true),
                    0x90..=0x9f => ((marker & 0x0f) as usize, false),
                    _ => {
                        let n = if marker == 0xdc || marker == 0xde {
                            2
                        } else {
                            4
                        };
                        let b = input.take(n)?;
                        let len = b.iter().fold(0usize, |a, &x| (a << 8) | x as usize);
                        (len, marker >= 0xde)
                    }
                };
                // Every item takes at least one byte of input.
                if len > input.left() {
                    return Err(bad("container length"));
                }
                container_header(out, len, map);
                for _ in 0..len {
                    if map {
                        let k = self.key(out, input, depth)?;
                        self.value(out, input, k.as_deref(), depth + 1)?;
                    } else {
                        self.value(out, input, key, depth + 1)?;
                    }
                }
                Ok(())
            }
            0xcc..=0xd3 => {
                let (width, signed) = int_width(marker).ok_or_else(|| bad("int"))?;
                let delta = unzigzag(input.varint()?);
                let value = self
                    .tables
                    .slot_int(key)
                    .checked_add(delta)
                    .ok_or_else(|| bad("int"))?;
                out.push(marker);
                int_write(out, value, width, signed)?;
                self.tables.saw_int(key, value);
                Ok(())
            }
            _ => {
                let rest = &input.bytes[input.at..];
                let n = raw_len(marker, rest).ok_or_else(|| bad("marker"))?;
                let item = input.take(n)?;
                out.push(marker);
                out.extend(item);
                Ok(())
            }
        }
    }

    fn key(
        &mut self,
        out: &mut Vec<u8>,
        input: &mut Input<'_>,
        depth: usize,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let marker = input.byte()?;
        match marker {
            0x00..=0x7f => {
                let key = self
                    .tables
                    .keys
                    .get(marker as usize)
                    .ok_or_else(|| bad("key reference"))?
                    .clone();
                str_header(out, key.len());
                out.extend(&key);
                Ok(Some(key))
            }
            0xa0..=0xbf => {
                let key = input.take((marker & 0x1f) as usize)?.to_vec();
                out.push(marker);
                out.extend(&key);
                let t = &mut self.tables;
                ring_put(&mut t.keys, &mut t.keys_next, KEYS_MAX, key.clone());
                Ok(Some(key))
            }
            ESCAPE => {
                let at = input.at;
                if input.varint()? == u128::from(ESC_FIXINT_KEY) {
                    let b = input.byte()?;
                    if b >= 0x80 {
                        return Err(bad("fixint key"));
                    }
                    out.push(b);
                    return Ok(None);
                }
                input.at = at;
                self.string(out, input, ESCAPE, None)?;
                Ok(None)
            }
            _ => {
                input.at -= 1;
                self.value(out, input, None, DEPTH_MAX.max(depth))?;
                Ok(None)
            }
        }
    }

    /// A string item whose first byte `marker` was read; appends its msgpack bytes.
    fn string(
        &mut self,
        out: &mut Vec<u8>,
        input: &mut Input<'_>,
        marker: u8,
        key: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let (value, referenced) = match marker {
            0xa0..=0xbf => (input.take((marker & 0x1f) as usize)?.to_vec(), false),
            0xd9 => {
                let n = input.byte()? as usize;
                if n < 32 {
                    return Err(bad("str8"));
                }
                (input.take(n)?.to_vec(), false)
            }
            0xda | 0xdb => {
                let width = if marker == 0xda { 2 } else { 4 };
                let b = input.take(width)?;
                let n = b.iter().fold(0usize, |a, &x| (a << 8) | x as usize);
                let canonical = if width == 2 { n > 0xff } else { n > 0xffff };
                if !canonical {
                    return Err(bad("str length"));
                }
                (input.take(n)?.to_vec(), false)
            }
            ESCAPE => match input.varint()? {
                v if v == u128::from(ESC_DELTA) => {
                    let prev = self
                        .tables
                        .slot_string(key)
                        .ok_or_else(|| bad("delta without a previous string"))?;
                    let prefix = input.len()?;
                    let suffix = input.len()?;
                    if prefix.checked_add(suffix).is_none_or(|n| n > prev.len()) {
                        return Err(bad("delta lengths"));
                    }
                    let middle = input.len()?;
                    let middle = input.take(middle)?;
                    let mut value = Vec::with_capacity(prefix + middle.len() + suffix);
                    value.extend(&prev[..prefix]);
                    value.extend(middle);
                    value.extend(&prev[prev.len() - suffix..]);
                    (value, false)
                }
                v if v >= u128::from(ESC_REF_BASE) => {
                    let at = usize::try_from(v - u128::from(ESC_REF_BASE))
                        .map_err(|_| bad("string reference"))?;
                    let value = self
                        .tables
                        .strings
                        .get(at)
                        .ok_or_else(|| bad("string reference"))?
                        .clone();
                    (value, true)
                }
                _ => return Err(bad("escape")),
            },
            _ => return Err(bad("string marker")),
        };
        if value.len() > FRAME_BYTES_MAX {
            return Err(Refusal::TooLarge(value.len()));
        }
        str_header(out, value.len());
        out.extend(&value);
        self.tables.saw_string(key, &value, referenced);
        Ok(())
    }
}

/// The bytes of a msgpack string (without its header) this module wrote.
fn strip_str_header(bytes: &[u8]) -> &[u8] {
    match bytes.first() {
        Some(0xa0..=0xbf) => &bytes[1..],
        Some(0xd9) => &bytes[2..],
        Some(0xda) => &bytes[3..],
        Some(0xdb) => &bytes[5..],
        _ => bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tern_protocol::{Data, Format, Message, ProtocolMessage};

    /// A MESSAGE frame as an origin builds it: `n` is the publish counter.
    fn frame(n: u64, data: Data, encoding: Option<&str>, channel: &str) -> Vec<u8> {
        let message = Message {
            id: Some(format!("x7Kp2QzR9A:{n}:0")),
            client_id: Some("user-42".into()),
            connection_id: Some("x7Kp2QzR9A".into()),
            name: Some("chat".into()),
            data: Some(data),
            encoding: encoding.map(Into::into),
            timestamp: Some(1_780_000_000_000 + n as i64 * 5),
            ..Message::default()
        };
        let pm = ProtocolMessage {
            action: tern_protocol::action::MESSAGE,
            id: Some(format!("x7Kp2QzR9A:{n}")),
            connection_id: Some("x7Kp2QzR9A".into()),
            channel: Some(channel.into()),
            channel_serial: Some(format!("v1.3f9a2c41d5e6b7a8-{n:x}")),
            timestamp: Some(1_780_000_000_000 + n as i64 * 5),
            messages: Some(vec![message]),
            ..ProtocolMessage::default()
        };
        tern_protocol::encode(Format::Msgpack, &pm).to_vec()
    }

    fn event(n: u64, frame: Vec<u8>, channel: &str) -> EventV1 {
        EventV1 {
            app: "app1".into(),
            channel: channel.into(),
            origin: 0x3f9a_2c41_d5e6_b7a8,
            seq: n,
            publisher: Some("x7Kp2QzR9A".into()),
            frame,
            link_seq: n,
        }
    }

    /// Encodes `events` on one stream and decodes them on the other end: the decoder
    /// gives back each event exactly (its frame byte for byte). Returns the bytes each
    /// one took.
    fn round_trip(events: &[EventV1]) -> Vec<usize> {
        let mut encoder = Encoder::new();
        let mut decoder = Decoder::new();
        let mut sizes = Vec::new();
        let mut stream = Vec::new();
        for event in events {
            let before = stream.len();
            encoder.encode(event, &mut stream);
            sizes.push(stream.len() - before);
        }
        let mut at = 0;
        for event in events {
            let (got, used) = decoder.decode(&stream[at..]).expect("decodes");
            assert_eq!(&got, event);
            assert_eq!(got.frame, event.frame, "frame bytes");
            at += used;
        }
        assert_eq!(at, stream.len());
        sizes
    }

    const PAYLOAD: usize = 80;

    /// `len` letters that differ from one `n` to the next all along.
    fn noise(n: u64, len: usize) -> String {
        let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (b'a' + (x % 26) as u8) as char
            })
            .collect()
    }

    /// An 80-byte JSON payload costs at most the payload plus 64 bytes once the link
    /// has seen one message (the first carries the names, keys and ids once).
    #[test]
    fn small_json_message_is_payload_plus_little() {
        let json = |n: u64| format!(r#"{{"user":"u","text":"{}"}}"#, noise(n, PAYLOAD - 22));
        assert_eq!(json(1).len(), PAYLOAD);
        let events: Vec<EventV1> = (1..=50)
            .map(|n| {
                // A text no earlier message shares: the bound holds for payloads that
                // do not resemble each other (similar ones cost less).
                let data = Data::String(json(n));
                event(
                    n,
                    frame(n, data, Some("json"), "room:lobby-7"),
                    "room:lobby-7",
                )
            })
            .collect();
        let sizes = round_trip(&events);
        let full = crate::wire::encode(&crate::wire::FrameV1::Event(events[1].clone())).len();
        for size in &sizes[1..] {
            assert!(*size <= PAYLOAD + 64, "{size} bytes (v1: {full})");
        }
        assert!(sizes[1] * 3 < full, "{} vs {full}", sizes[1]);
    }

    /// Binary (msgpack) payloads round-trip too, as do frames it cannot walk.
    #[test]
    fn binary_and_raw_frames_round_trip() {
        let mut events: Vec<EventV1> = (1..=20)
            .map(|n| {
                let data = Data::Binary(bytes::Bytes::from(vec![n as u8; 100 + n as usize]));
                event(n, frame(n, data, None, "bin"), "bin")
            })
            .collect();
        // Not msgpack at all, non-canonical lengths, and an empty frame.
        events.push(event(21, vec![0xc1, 1, 2], "bin"));
        events.push(event(22, vec![0xd9, 3, b'a', b'b', b'c'], "bin"));
        events.push(event(23, vec![], "bin"));
        events.push(event(
            24,
            frame(24, Data::String("after raw".into()), None, "bin"),
            "bin",
        ));
        round_trip(&events);
    }

    /// Tables wrap (more channels and strings than they hold) without losing step.
    #[test]
    fn tables_wrap() {
        let events: Vec<EventV1> = (1..=(CHANNELS_MAX as u64 + STRINGS_MAX as u64))
            .map(|n| {
                let channel = format!("c{}", n % (CHANNELS_MAX as u64 + 7));
                let data = Data::String(format!("short {n}"));
                event(n, frame(n, data, None, &channel), &channel)
            })
            .collect();
        round_trip(&events);
    }

    fn arb_data() -> impl Strategy<Value = (Data, Option<String>)> {
        prop_oneof![
            "[ -~]{0,300}".prop_map(|s| (Data::String(s), None)),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|b| (Data::Binary(bytes::Bytes::from(b)), None)),
            (any::<u32>(), "[a-z]{0,20}").prop_map(|(n, s)| {
                let json = serde_json::json!({ "n": n, "s": s }).to_string();
                (Data::String(json), Some("json".to_string()))
            }),
        ]
    }

    proptest! {
        /// Arbitrary sequences of events (JSON, string and binary payloads, channels,
        /// publishers, ids and sequences that jump) come back byte for byte.
        #[test]
        fn arbitrary_events_round_trip(
            items in proptest::collection::vec(
                (arb_data(), 0u8..4, any::<u64>(), proptest::option::of("[a-z0-9]{0,70}"), any::<bool>(), 0u64..1 << 40),
                1..40,
            )
        ) {
            let events: Vec<EventV1> = items
                .into_iter()
                .enumerate()
                .map(|(i, ((data, encoding), channel, seq, publisher, repair, ts))| {
                    let channel = format!("ch{channel}");
                    let mut pm = ProtocolMessage {
                        action: tern_protocol::action::MESSAGE,
                        id: publisher.clone().map(|p| format!("{p}:{seq}")),
                        channel: Some(channel.clone()),
                        timestamp: Some(ts as i64 - (1 << 39)),
                        messages: Some(vec![Message {
                            data: Some(data),
                            encoding,
                            client_id: publisher.clone(),
                            ..Message::default()
                        }]),
                        ..ProtocolMessage::default()
                    };
                    pm.count = Some(i as u32);
                    EventV1 {
                        app: "a".into(),
                        channel,
                        origin: seq.rotate_left(7) % 3,
                        seq: seq % (1 << 62),
                        publisher,
                        frame: tern_protocol::encode(Format::Msgpack, &pm).to_vec(),
                        link_seq: if repair { 0 } else { i as u64 + 1 },
                    }
                })
                .collect();
            round_trip(&events);
        }

        /// Arbitrary peer bytes never panic the decoder, with or without prior state.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = Decoder::new();
            let _ = decoder.decode(&bytes);
            let mut primed = Decoder::new();
            let mut encoder = Encoder::new();
            let mut stream = Vec::new();
            let first = event(1, frame(1, Data::String("hi".into()), None, "c"), "c");
            encoder.encode(&first, &mut stream);
            primed.decode(&stream).unwrap();
            let _ = primed.decode(&bytes);
        }
    }
}
