//! The receiving side: compact items back into the origin's msgpack frame, every
//! length and reference checked (the trust boundary).

use super::msgpack::*;
use super::*;

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
