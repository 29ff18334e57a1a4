//! The sending side: an event's msgpack frame walked into compact items.

use super::msgpack::*;
use super::*;

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
