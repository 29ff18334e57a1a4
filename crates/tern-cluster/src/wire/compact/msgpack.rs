//! The msgpack and varint pieces the compact codec is built of: varints and zigzag,
//! bounds-checked reads of peer bytes, canonical headers, integer widths.

use super::*;

// ---- varints --------------------------------------------------------------------------

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

pub(super) fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

pub(super) fn bad(what: &str) -> Refusal {
    Refusal::Undecodable(format!("compact event: {what}"))
}

/// Reads peer bytes; every read is bounds-checked.
pub(super) struct Input<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Input<'a> {
    pub(super) fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub(super) fn byte(&mut self) -> Result<u8, Refusal> {
        let b = *self.bytes.get(self.at).ok_or_else(|| bad("truncated"))?;
        self.at += 1;
        Ok(b)
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.left() {
            return Err(bad("truncated"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    pub(super) fn varint(&mut self) -> Result<u128, Refusal> {
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

    pub(super) fn len(&mut self) -> Result<usize, Refusal> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= FRAME_BYTES_MAX)
            .ok_or_else(|| bad("length"))
    }
}

// ---- msgpack shapes -------------------------------------------------------------------

/// The canonical (smallest) msgpack string header for `len`.
pub(super) fn str_header(out: &mut Vec<u8>, len: usize) {
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

pub(super) fn container_header(out: &mut Vec<u8>, len: usize, map: bool) {
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
pub(super) fn int_width(marker: u8) -> Option<(usize, bool)> {
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

pub(super) fn int_read(bytes: &[u8], signed: bool) -> i128 {
    let mut buf = [0u8; 16];
    let n = bytes.len();
    buf[16 - n..].copy_from_slice(bytes);
    if signed && bytes[0] & 0x80 != 0 {
        buf[..16 - n].fill(0xff);
    }
    i128::from_be_bytes(buf)
}

pub(super) fn int_write(
    out: &mut Vec<u8>,
    value: i128,
    width: usize,
    signed: bool,
) -> Result<(), Refusal> {
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
pub(super) fn raw_len(marker: u8, after: &[u8]) -> Option<usize> {
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

/// The bytes of a msgpack string (without its header) this module wrote.
pub(super) fn strip_str_header(bytes: &[u8]) -> &[u8] {
    match bytes.first() {
        Some(0xa0..=0xbf) => &bytes[1..],
        Some(0xd9) => &bytes[2..],
        Some(0xda) => &bytes[3..],
        Some(0xdb) => &bytes[5..],
        _ => bytes,
    }
}
