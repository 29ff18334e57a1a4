//! Wire v2 records: several frames in one length-prefixed record, events in their
//! compact form (`wire::compact`), and on links between regions the record compressed
//! with one zstd stream per link (issue 17). Pure: frames in, record bytes out.
//!
//! A record's body (after the `u32` length every record has) starts with its version:
//! - `1`: one `bincode(FrameV1)`, as every node before wire v2 sends (`wire::encode`);
//! - `2`: then a kind byte, [`PLAIN`] or [`ZSTD`], then the items: each a tag,
//!   [`ITEM_FRAME`] (a varint length and `bincode(FrameV1)`) or [`ITEM_EVENT`] (a
//!   compact event). A [`ZSTD`] record holds the items compressed as the next block of
//!   the link's zstd stream: each record is flushed, so it decodes as soon as it
//!   arrives, and later records refer back to earlier ones (an 80-byte message whose
//!   neighbours look like it costs a few bytes).
//!
//! A receiver accepts either version on any link, so a sender switches to v2 once it
//! knows its peer reads it (`link.rs` asks) and a node of the previous release, which
//! only reads version 1, is never sent anything else.
//!
//! Bounds: a record's items decompress to at most [`FRAME_BYTES_MAX`] (more is refused
//! as a bomb), its frames pass `wire::check` like v1 frames, and the zstd window is
//! [`WINDOW_LOG`] so a peer cannot make this node allocate a large one.

use std::collections::VecDeque;

use zstd::stream::raw::{Decoder as ZDecoder, Encoder as ZEncoder, InBuffer, Operation, OutBuffer};

use crate::wire::compact;
use crate::wire::{self, FrameV1, Refusal, FRAME_BYTES_MAX, VERSION_V1};

pub const VERSION_V2: u8 = 2;
pub const PLAIN: u8 = 0;
pub const ZSTD: u8 = 1;
pub const ITEM_FRAME: u8 = 0;
pub const ITEM_EVENT: u8 = 1;
/// A `Stored` ack in a few bytes: the same incarnation and link as the previous one
/// (a flag) and how far past the previous position it is.
pub const ITEM_STORED: u8 = 2;
/// Records smaller than this are not compressed: a zstd block has a 3-byte header and a
/// lone ack or two would come out larger (they stay out of the zstd stream on both
/// sides, so the stream stays in step).
pub const COMPRESS_BYTES_MIN: usize = 32;
/// zstd window (2^17 = 128 KiB): enough for the recent messages of a link to be
/// referred to, small enough for one per peer link.
pub const WINDOW_LOG: u32 = 17;
/// A batch is written once it holds this many bytes (before compression), whatever
/// else waits: it keeps a record's latency and the receiver's buffer bounded.
pub const BATCH_BYTES_MAX: usize = 256 << 10;
/// zstd level on inter-region links: chosen by measurement (docs/benchmarks.md): the
/// streaming context does most of the work for small messages, and level 3 costs a few
/// microseconds per record.
pub const ZSTD_LEVEL: i32 = 3;

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(bytes: &[u8]) -> Result<(usize, usize), Refusal> {
    let mut v: usize = 0;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= usize::from(b & 0x7f).checked_shl(7 * i as u32).unwrap_or(0);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(Refusal::Undecodable("v2 record: varint".into()))
}

fn put_varint_u128(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_u128(bytes: &[u8]) -> Result<(u128, usize), Refusal> {
    let mut v: u128 = 0;
    for (i, b) in bytes.iter().enumerate().take(19) {
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(Refusal::Undecodable("v2 record: varint".into()))
}

fn varint_u64(bytes: &[u8]) -> Result<(u64, usize), Refusal> {
    let (v, used) = varint_u128(bytes)?;
    let v = u64::try_from(v).map_err(|_| Refusal::Undecodable("v2 record: varint".into()))?;
    Ok((v, used))
}

/// The previous `Stored` on a link: (incarnation, epoch, upto).
type LastStored = (u64, u64, u64);

fn zstd_err(e: std::io::Error) -> Refusal {
    Refusal::Undecodable(format!("v2 record: zstd: {e}"))
}

/// The sending side of one link in wire v2.
pub struct RecordEncoder {
    events: compact::Encoder,
    stored: LastStored,
    zstd: Option<ZEncoder<'static>>,
    batch: Vec<u8>,
}

impl RecordEncoder {
    /// `compress`: a zstd level for links between regions, `None` within a region.
    pub fn new(compress: Option<i32>) -> RecordEncoder {
        let zstd = compress.and_then(|level| {
            let mut z = ZEncoder::new(level).ok()?;
            z.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG))
                .ok()?;
            Some(z)
        });
        RecordEncoder {
            events: compact::Encoder::new(),
            stored: (0, 0, 0),
            zstd,
            batch: Vec::new(),
        }
    }

    /// Adds `frame` to the batch; returns the batch's bytes so far (uncompressed).
    pub fn push(&mut self, frame: &FrameV1) -> usize {
        match frame {
            FrameV1::Event(event) => {
                self.batch.push(ITEM_EVENT);
                self.events.encode(event, &mut self.batch);
            }
            &FrameV1::Stored {
                incarnation,
                epoch,
                upto,
            } => {
                self.batch.push(ITEM_STORED);
                let (last_incarnation, last_epoch, last_upto) = self.stored;
                if (incarnation, epoch) == (last_incarnation, last_epoch) {
                    self.batch.push(0);
                } else {
                    self.batch.push(1);
                    put_varint_u128(&mut self.batch, u128::from(incarnation));
                    put_varint_u128(&mut self.batch, u128::from(epoch));
                }
                let delta = i128::from(upto) - i128::from(last_upto);
                put_varint_u128(&mut self.batch, ((delta << 1) ^ (delta >> 127)) as u128);
                self.stored = (incarnation, epoch, upto);
            }
            other => {
                let bytes = wire::encode(other);
                self.batch.push(ITEM_FRAME);
                put_varint(&mut self.batch, bytes.len() - 1);
                self.batch.extend(&bytes[1..]);
            }
        }
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The batch's bytes so far (uncompressed).
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// The record body of everything pushed since the last one (empty batch: nothing).
    pub fn finish(&mut self) -> Vec<u8> {
        let items = std::mem::take(&mut self.batch);
        if items.is_empty() {
            return Vec::new();
        }
        if let Some(z) = self
            .zstd
            .as_mut()
            .filter(|_| items.len() >= COMPRESS_BYTES_MIN)
        {
            let mut out = Vec::with_capacity(items.len() / 2 + 64);
            out.extend([VERSION_V2, ZSTD]);
            if compress_into(z, &items, &mut out).is_ok() {
                return out;
            }
            // A failing compressor leaves its stream unusable: the link goes plain
            // (records say which they are, so the receiver follows).
            self.zstd = None;
        }
        let mut out = Vec::with_capacity(items.len() + 2);
        out.extend([VERSION_V2, PLAIN]);
        out.extend(items);
        out
    }
}

fn compress_into(
    z: &mut ZEncoder<'static>,
    items: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut input = InBuffer::around(items);
    while input.pos() < items.len() {
        out.reserve(items.len().max(1024));
        let len = out.len();
        let mut buffer = OutBuffer::around_pos(out, len);
        z.run(&mut input, &mut buffer)?;
    }
    loop {
        out.reserve(1024);
        let len = out.len();
        let mut buffer = OutBuffer::around_pos(out, len);
        if z.flush(&mut buffer)? == 0 {
            return Ok(());
        }
    }
}

/// The receiving side of one link: reads v1 and v2 records.
#[derive(Default)]
pub struct RecordDecoder {
    events: compact::Decoder,
    stored: LastStored,
    zstd: Option<ZDecoder<'static>>,
}

impl RecordDecoder {
    pub fn new() -> RecordDecoder {
        RecordDecoder::default()
    }

    /// The frames of one record body, in order, each checked like a v1 frame.
    pub fn decode(&mut self, body: &[u8], frames: &mut VecDeque<FrameV1>) -> Result<(), Refusal> {
        match body {
            [VERSION_V1, ..] => {
                frames.push_back(wire::decode(body)?);
                Ok(())
            }
            [VERSION_V2, PLAIN, items @ ..] => self.items(items, frames),
            [VERSION_V2, ZSTD, compressed @ ..] => {
                let items = self.decompress(compressed)?;
                self.items(&items, frames)
            }
            [VERSION_V2, kind, ..] => Err(Refusal::Undecodable(format!("v2 record kind {kind}"))),
            [version, ..] => Err(Refusal::Version(*version)),
            [] => Err(Refusal::Empty),
        }
    }

    fn decompress(&mut self, compressed: &[u8]) -> Result<Vec<u8>, Refusal> {
        if self.zstd.is_none() {
            let mut z = ZDecoder::new().map_err(zstd_err)?;
            z.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG))
                .map_err(zstd_err)?;
            self.zstd = Some(z);
        }
        let z = self.zstd.as_mut().expect("set above");
        let mut out: Vec<u8> = Vec::with_capacity(compressed.len() * 4);
        let mut input = InBuffer::around(compressed);
        loop {
            out.reserve((compressed.len() * 4).clamp(1024, 1 << 20));
            let len = out.len();
            let mut buffer = OutBuffer::around_pos(&mut out, len);
            z.run(&mut input, &mut buffer).map_err(zstd_err)?;
            let filled = buffer.pos() < buffer.capacity();
            // Grown by at most 1 MiB a step, so a bomb stops here.
            if out.len() > FRAME_BYTES_MAX {
                return Err(Refusal::TooLarge(out.len()));
            }
            // All input consumed and the output not full: the flushed block is out.
            if input.pos() == compressed.len() && filled {
                return Ok(out);
            }
        }
    }

    fn items(&mut self, mut items: &[u8], frames: &mut VecDeque<FrameV1>) -> Result<(), Refusal> {
        let mut count = 0usize;
        while let Some((&tag, rest)) = items.split_first() {
            count += 1;
            // Each frame is checked; this bounds how many one record may carry.
            if count > wire::ITEMS_PER_FRAME_MAX * 16 {
                return Err(Refusal::TooManyItems(count));
            }
            match tag {
                ITEM_FRAME => {
                    let (len, used) = varint(rest)?;
                    let body = rest
                        .get(used..used.saturating_add(len))
                        .ok_or(Refusal::Truncated)?;
                    let mut v1 = Vec::with_capacity(body.len() + 1);
                    v1.push(VERSION_V1);
                    v1.extend(body);
                    frames.push_back(wire::decode(&v1)?);
                    items = &rest[used + len..];
                }
                ITEM_EVENT => {
                    let (event, used) = self.events.decode(rest)?;
                    let frame = FrameV1::Event(event);
                    wire::check(&frame)?;
                    frames.push_back(frame);
                    items = &rest[used..];
                }
                ITEM_STORED => {
                    let (&same, mut rest) = rest.split_first().ok_or(Refusal::Truncated)?;
                    let (incarnation, epoch) = match same {
                        0 => (self.stored.0, self.stored.1),
                        1 => {
                            let (incarnation, used) = varint_u64(rest)?;
                            rest = &rest[used..];
                            let (epoch, used) = varint_u64(rest)?;
                            rest = &rest[used..];
                            (incarnation, epoch)
                        }
                        _ => return Err(Refusal::Undecodable("v2 stored flag".into())),
                    };
                    let (zigzag, used) = varint_u128(rest)?;
                    let delta = ((zigzag >> 1) as i128) ^ -((zigzag & 1) as i128);
                    let upto = i128::from(self.stored.2)
                        .checked_add(delta)
                        .and_then(|v| u64::try_from(v).ok())
                        .ok_or_else(|| Refusal::Undecodable("v2 stored position".into()))?;
                    let frame = FrameV1::Stored {
                        incarnation,
                        epoch,
                        upto,
                    };
                    wire::check(&frame)?;
                    self.stored = (incarnation, epoch, upto);
                    frames.push_back(frame);
                    items = &rest[used..];
                }
                other => {
                    return Err(Refusal::Undecodable(format!("v2 item tag {other}")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{EventV1, HeadV1};
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = FrameV1> {
        prop_oneof![
            (0u64..3, 0u64..3, 0u64..1 << 40).prop_map(|(incarnation, epoch, upto)| {
                FrameV1::Stored {
                    incarnation: incarnation << 40,
                    epoch,
                    upto,
                }
            }),
            (
                0u64..1 << 20,
                proptest::collection::vec(any::<u8>(), 0..200),
                0u8..3
            )
                .prop_map(|(seq, frame, channel)| FrameV1::Event(EventV1 {
                    app: "a".into(),
                    channel: format!("c{channel}"),
                    origin: 7,
                    seq,
                    publisher: None,
                    frame,
                    link_seq: seq,
                })),
            (0u64..1 << 20).prop_map(|seq| FrameV1::Heads {
                channels: vec![HeadV1 {
                    app: "a".into(),
                    channel: "c".into(),
                    origins: vec![(7, seq)],
                }],
            }),
        ]
    }

    proptest! {
        /// Any run of frames, in records of any size, plain or compressed, comes back
        /// the same and in order.
        #[test]
        fn records_round_trip(
            batches in proptest::collection::vec(proptest::collection::vec(arb_frame(), 0..6), 1..12),
            compress in any::<bool>(),
        ) {
            let mut encoder = RecordEncoder::new(compress.then_some(ZSTD_LEVEL));
            let mut decoder = RecordDecoder::new();
            for batch in batches {
                for frame in &batch {
                    encoder.push(frame);
                }
                let record = encoder.finish();
                let mut got = VecDeque::new();
                if !record.is_empty() {
                    decoder.decode(&record, &mut got).unwrap();
                }
                prop_assert_eq!(Vec::from(got), batch);
            }
        }

        /// Peer bytes never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frames = VecDeque::new();
            let _ = RecordDecoder::new().decode(&bytes, &mut frames);
            let mut with_kind = vec![VERSION_V2, PLAIN];
            with_kind.extend(&bytes);
            let _ = RecordDecoder::new().decode(&with_kind, &mut frames);
            with_kind[1] = ZSTD;
            let _ = RecordDecoder::new().decode(&with_kind, &mut frames);
        }
    }

    /// A lone ack in a record costs at most 10 bytes on the wire (length prefix
    /// included) once the link has sent one.
    #[test]
    fn a_lone_ack_is_small() {
        let mut encoder = RecordEncoder::new(Some(ZSTD_LEVEL));
        let stored = |upto| FrameV1::Stored {
            incarnation: 1_796_000_000_000,
            epoch: 3,
            upto,
        };
        encoder.push(&stored(1));
        encoder.finish();
        encoder.push(&stored(2));
        let record = encoder.finish();
        assert!(4 + record.len() <= 10, "{} bytes", 4 + record.len());
    }

    /// The zstd level (`ZSTD_LEVEL`): bytes per message and encode time of a link
    /// sending 80-byte chat messages and 2 KB dashboard updates whose words and numbers
    /// are drawn at random, one message per record (the sparse case) and 20 per record.
    /// A measurement, not a check: `cargo test -p tern-cluster --release --lib
    /// zstd_levels -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn zstd_levels() {
        use tern_protocol::{Data, Format, Message, ProtocolMessage};
        let words = [
            "the", "meet", "station", "deploy", "build", "ok", "ticket", "north", "cpu", "alert",
            "review", "coffee",
        ];
        let mut x: u64 = 42;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut frames = |dashboard: bool, count: u64| -> Vec<FrameV1> {
            (1..=count)
                .map(|n| {
                    let data = if dashboard {
                        let hosts: Vec<String> = (0..40)
                            .map(|i| {
                                format!(
                                    r#"{{"h":"web-{i}","cpu":{}.{},"mem":{},"rps":{}}}"#,
                                    next(100),
                                    next(10),
                                    next(64000),
                                    next(5000)
                                )
                            })
                            .collect();
                        format!(
                            r#"{{"t":{},"hosts":[{}]}}"#,
                            1_780_000_000_000 + n * 5,
                            hosts.join(",")
                        )
                    } else {
                        let text: Vec<&str> = (0..6).map(|_| words[next(12) as usize]).collect();
                        format!(
                            r#"{{"t":{},"user":"u{}","text":"{}"}}"#,
                            1_780_000_000_000 + n * 5,
                            next(500),
                            text.join(" ")
                        )
                    };
                    let pm = ProtocolMessage {
                        action: tern_protocol::action::MESSAGE,
                        id: Some(format!("AbCdEfGh12:{n}")),
                        connection_id: Some("AbCdEfGh12".into()),
                        channel: Some("room".into()),
                        channel_serial: Some(format!("v1.3f9a2c41d5e6b7a8-{n:x}")),
                        timestamp: Some(1_780_000_000_000 + n as i64 * 5),
                        messages: Some(vec![Message {
                            id: Some(format!("AbCdEfGh12:{n}:0")),
                            connection_id: Some("AbCdEfGh12".into()),
                            name: Some("m".into()),
                            data: Some(Data::String(data)),
                            timestamp: Some(1_780_000_000_000 + n as i64 * 5),
                            ..Message::default()
                        }]),
                        ..ProtocolMessage::default()
                    };
                    FrameV1::Event(EventV1 {
                        app: "app".into(),
                        channel: "room".into(),
                        origin: 0x3f9a_2c41_d5e6_b7a8,
                        seq: n,
                        publisher: Some("AbCdEfGh12".into()),
                        frame: tern_protocol::encode(Format::Msgpack, &pm).to_vec(),
                        link_seq: n,
                    })
                })
                .collect()
        };
        for dashboard in [false, true] {
            let frames = frames(dashboard, 2_000);
            let v1: usize = frames.iter().map(|f| 4 + wire::encode(f).len()).sum();
            println!(
                "{} v1: {} B/msg",
                if dashboard { "2KB" } else { "80B" },
                v1 / frames.len()
            );
            for level in [None, Some(1), Some(3), Some(6), Some(9)] {
                for per_record in [1, 20] {
                    let mut encoder = RecordEncoder::new(level);
                    let start = std::time::Instant::now();
                    let mut bytes = 0;
                    for chunk in frames.chunks(per_record) {
                        chunk.iter().for_each(|f| {
                            encoder.push(f);
                        });
                        bytes += 4 + encoder.finish().len();
                    }
                    println!(
                        "  level {level:?}, {per_record} per record: {} B/msg, {:.1} us/msg",
                        bytes / frames.len(),
                        start.elapsed().as_secs_f64() * 1e6 / frames.len() as f64
                    );
                }
            }
        }
    }

    /// A decompression bomb is refused, not inflated past the frame limit; so is a
    /// stream that asks for a window larger than [`WINDOW_LOG`].
    #[test]
    fn a_zstd_bomb_is_refused() {
        let zeros = vec![0u8; FRAME_BYTES_MAX + 4096];
        let mut z = ZEncoder::new(19).unwrap();
        z.set_parameter(zstd::zstd_safe::CParameter::WindowLog(WINDOW_LOG))
            .unwrap();
        let mut record = vec![VERSION_V2, ZSTD];
        compress_into(&mut z, &zeros, &mut record).unwrap();
        assert!(record.len() < 64 << 10, "{}", record.len());
        let mut frames = VecDeque::new();
        let refused = RecordDecoder::new().decode(&record, &mut frames);
        assert!(matches!(refused, Err(Refusal::TooLarge(_))), "{refused:?}");

        let mut record = vec![VERSION_V2, ZSTD];
        record.extend(zstd::bulk::compress(&zeros, 19).unwrap());
        let refused = RecordDecoder::new().decode(&record, &mut frames);
        assert!(
            matches!(refused, Err(Refusal::Undecodable(_))),
            "{refused:?}"
        );
    }
}
