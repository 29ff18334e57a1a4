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
