//! Between nodes (`tern-cluster`): `FrameV1` on the QUIC links, and the authenticated
//! gossip datagram.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::VecDeque;
use tern_cluster::gossip_auth::{fuzz_decode_datagram, GossipKey};

use tern_cluster::framing::{RecordDecoder, RecordEncoder, ZSTD_LEVEL};
use tern_cluster::wire::{self, FrameV1};
use tern_protocol::Format;

/// The gossip key of the fuzzed cluster.
pub const GOSSIP_KEY_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A frame from a peer: what decodes round-trips through the encoder, and the
/// msgpack realtime frames it carries decode or fail without a panic.
pub fn cluster_frame(data: &[u8]) {
    let Ok(frame) = wire::decode(data) else {
        return;
    };
    let bytes = wire::encode(&frame);
    let again = wire::decode(&bytes).expect("a re-encoded frame decodes");
    assert_eq!(frame, again, "frame changed in a round trip");
    match &frame {
        FrameV1::Event(event) => {
            let _ = event.to_remote();
        }
        FrameV1::SyncMembers { frame, .. } => {
            let _ = tern_protocol::decode(Format::Msgpack, frame);
        }
        _ => {}
    }
}

/// The records of one wire-v2 link (`framing.rs`): `data` is a sequence of record
/// bodies, each after a big-endian `u16` length, fed to one decoder (its tables carry
/// from record to record as on a link). What decodes round-trips: the frames, encoded
/// again on a new link (compressed, so the zstd stream is exercised too) and decoded
/// there, come back equal (events with their frame bytes identical).
pub fn cluster_record(data: &[u8]) {
    let mut decoder = RecordDecoder::new();
    let mut frames = VecDeque::new();
    let mut rest = data;
    while let [high, low, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*high, *low])).min(tail.len());
        if decoder.decode(&tail[..len], &mut frames).is_err() {
            break;
        }
        rest = &tail[len..];
    }
    let frames: Vec<FrameV1> = frames.into();
    let mut encoder = RecordEncoder::new(Some(ZSTD_LEVEL));
    for frame in &frames {
        encoder.push(frame);
    }
    let record = encoder.finish();
    let mut again = VecDeque::new();
    if !record.is_empty() {
        RecordDecoder::new()
            .decode(&record, &mut again)
            .expect("a re-encoded record decodes");
    }
    assert_eq!(Vec::from(again), frames, "frames changed in a round trip");
}

/// A gossip datagram: the bytes as received (refused: nothing unsealed passes the tag),
/// and as the chitchat message of a datagram sealed under our key now, which must pass
/// the transport's checks and then decode or fail in chitchat's decoder, never panic.
///
/// No round trip: chitchat re-encodes only deltas it built itself (`Delta::serialize`
/// asserts the length it had when decoded, which a different block split breaks), and
/// Tern never re-sends a received message.
pub fn gossip_datagram(data: &[u8]) {
    let key = GossipKey::from_hex(GOSSIP_KEY_HEX).expect("the fuzz gossip key parses");
    let now_ms = crate::NOW_MS as u64;
    let raw = fuzz_decode_datagram(&key, now_ms, data);
    assert!(
        matches!(raw, Err("short" | "tag")),
        "an unsealed datagram got past the tag: {raw:?}"
    );
    if let Err(reason) = fuzz_decode_datagram(&key, now_ms, &seal(now_ms, data)) {
        assert_eq!(reason, "decode", "a sealed datagram was refused");
    }
}

/// The datagram layout of `gossip_auth.rs`: version 1, send time (big-endian ms), the
/// message, HMAC-SHA256 of all that under the key.
pub fn seal(sent_at_ms: u64, message: &[u8]) -> Vec<u8> {
    let mut datagram = vec![1];
    datagram.extend_from_slice(&sent_at_ms.to_be_bytes());
    datagram.extend_from_slice(message);
    let mut key = [0u8; 32];
    for (byte, pair) in key
        .iter_mut()
        .zip(GOSSIP_KEY_HEX.as_bytes().chunks_exact(2))
    {
        let pair = std::str::from_utf8(pair).expect("hex is ASCII");
        *byte = u8::from_str_radix(pair, 16).expect("hex digits");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a 32-byte key");
    mac.update(&datagram);
    datagram.extend_from_slice(&mac.finalize().into_bytes());
    datagram
}
