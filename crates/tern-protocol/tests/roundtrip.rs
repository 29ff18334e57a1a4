//! Property tests for the codecs: round trips through both formats, and no panic on any input.

use bytes::Bytes;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde_json::{json, Value};
use tern_protocol::{
    decode, decode_messages, encode, encode_value, Annotation, AuthDetails, ConnectionDetails,
    Data, ErrorInfo, Format, Message, MessageVersion, PresenceMessage, ProtocolMessage,
    PublishResult,
};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9:_-]{0,12}"]
}

/// JSON values that survive both formats exactly: no floats (serde_json may round their
/// last digit), no top-level strings or nulls (those decode as `Data::String` / `None`).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::from),
        Just(Value::Null),
    ];
    let nested = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(text(), inner, 0..4).prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    });
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        vec(nested.clone(), 0..4).prop_map(Value::Array),
        btree_map(text(), nested, 0..4).prop_map(|map| Value::Object(map.into_iter().collect())),
    ]
}

fn data(binary: bool) -> BoxedStrategy<Data> {
    let text_or_json = prop_oneof![
        text().prop_map(Data::String),
        json_value().prop_map(Data::Json)
    ];
    if binary {
        prop_oneof![
            text_or_json,
            vec(any::<u8>(), 0..32).prop_map(|b| Data::Binary(Bytes::from(b)))
        ]
        .boxed()
    } else {
        text_or_json.boxed()
    }
}

fn extras() -> impl Strategy<Value = Option<Value>> {
    option::of(btree_map(text(), text(), 0..3).prop_map(|map| json!(map)))
}

fn message(binary: bool) -> impl Strategy<Value = Message> {
    (
        (
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        (option::of(data(binary)), option::of(text()), extras()),
        (
            option::of(any::<i64>()),
            option::of(any::<u8>()),
            option::of(text()),
        ),
        (option::of(version()), extras()),
    )
        .prop_map(
            |(
                (id, client_id, connection_id, connection_key, name),
                (data, encoding, extras),
                (timestamp, action, serial),
                (version, annotations),
            )| {
                Message {
                    id,
                    client_id,
                    connection_id,
                    connection_key,
                    name,
                    data,
                    encoding,
                    extras,
                    timestamp,
                    action,
                    serial,
                    version,
                    annotations,
                }
            },
        )
}

fn version() -> impl Strategy<Value = MessageVersion> {
    (
        option::of(text()),
        option::of(any::<i64>()),
        option::of(text()),
        option::of(text()),
        extras(),
    )
        .prop_map(
            |(serial, timestamp, client_id, description, metadata)| MessageVersion {
                serial,
                timestamp,
                client_id,
                description,
                metadata,
            },
        )
}

fn annotation(binary: bool) -> impl Strategy<Value = Annotation> {
    (
        (
            option::of(text()),
            option::of(0u8..2),
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        (
            option::of(any::<i64>()),
            option::of(text()),
            option::of(text()),
            option::of(data(binary)),
            extras(),
            option::of(any::<i64>()),
        ),
    )
        .prop_map(
            move |(
                (id, action, serial, message_serial, kind, name),
                (count, client_id, connection_id, data, extras, timestamp),
            )| Annotation {
                id,
                action,
                serial,
                message_serial,
                kind,
                name,
                count,
                client_id,
                connection_id,
                // Binary data in an annotation is not base64'd in JSON (documented).
                encoding: None,
                data: data.filter(|d| binary || !matches!(d, Data::Binary(_))),
                extras,
                timestamp,
            },
        )
}

fn presence(binary: bool) -> impl Strategy<Value = PresenceMessage> {
    (
        (
            option::of(text()),
            0u8..5,
            option::of(text()),
            option::of(text()),
        ),
        (
            option::of(data(binary)),
            option::of(text()),
            extras(),
            option::of(any::<i64>()),
        ),
    )
        .prop_map(
            |((id, action, client_id, connection_id), (data, encoding, extras, timestamp))| {
                PresenceMessage {
                    id,
                    action,
                    client_id,
                    connection_id,
                    data,
                    encoding,
                    extras,
                    timestamp,
                }
            },
        )
}

fn error_info() -> impl Strategy<Value = ErrorInfo> {
    (any::<u32>(), any::<u16>(), text(), option::of(text())).prop_map(
        |(code, status_code, message, href)| ErrorInfo {
            code,
            status_code,
            message,
            href,
        },
    )
}

fn connection_details() -> impl Strategy<Value = ConnectionDetails> {
    (
        (
            option::of(text()),
            option::of(text()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
        ),
        (
            option::of(any::<u64>()),
            option::of(text()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
        ),
        option::of(text()),
    )
        .prop_map(
            |(
                (connection_key, client_id, max_message_size, max_idle_interval),
                (connection_state_ttl, server_id, max_inbound_rate, max_frame_size),
                site_code,
            )| ConnectionDetails {
                connection_key,
                client_id,
                max_message_size,
                max_idle_interval,
                connection_state_ttl,
                server_id,
                max_inbound_rate,
                max_frame_size,
                site_code,
            },
        )
}

fn protocol_message(binary: bool) -> impl Strategy<Value = ProtocolMessage> {
    (
        (
            any::<u8>(),
            option::of(any::<u64>()),
            option::of(text()),
            option::of(any::<i64>()),
        ),
        (
            option::of(any::<u32>()),
            option::of(error_info()),
            option::of(text()),
            option::of(text()),
        ),
        (option::of(text()), option::of(any::<i64>())),
        (
            option::of(vec(message(binary), 0..3)),
            option::of(vec(presence(binary), 0..3)),
            option::of(vec(annotation(binary), 0..3)),
        ),
        (
            option::of(option::of(text()).prop_map(|access_token| AuthDetails { access_token })),
            option::of(connection_details()),
            option::of(btree_map(text(), text(), 0..3)),
            option::of(vec(
                vec(option::of(text()), 0..3).prop_map(|serials| PublishResult { serials }),
                0..3,
            )),
        ),
    )
        .prop_map(
            |(
                (action, flags, id, timestamp),
                (count, error, connection_id, channel),
                (channel_serial, msg_serial),
                (messages, presence, annotations),
                (auth, connection_details, params, res),
            )| ProtocolMessage {
                action,
                flags,
                id,
                timestamp,
                count,
                error,
                connection_id,
                channel,
                channel_serial,
                msg_serial,
                messages,
                presence,
                annotations,
                auth,
                connection_details,
                params,
                res,
            },
        )
}

proptest! {
    /// Every frame, binary data included, comes back from msgpack exactly as it went in.
    #[test]
    fn msgpack_round_trip(frame in protocol_message(true)) {
        let bytes = encode(Format::Msgpack, &frame);
        prop_assert_eq!(decode(Format::Msgpack, &bytes).unwrap(), frame);
    }

    /// Every frame without binary data comes back from JSON exactly as it went in.
    #[test]
    fn json_round_trip(frame in protocol_message(false)) {
        let bytes = encode(Format::Json, &frame);
        prop_assert_eq!(decode(Format::Json, &bytes).unwrap(), frame);
    }

    /// Binary data through JSON comes back as its base64 text with `base64` in the encoding.
    #[test]
    fn json_binary_becomes_base64(payload in vec(any::<u8>(), 0..64), encoding in option::of("[a-z0-9/+-]{0,20}")) {
        let message = Message { data: Some(Data::Binary(Bytes::from(payload))), encoding, ..Default::default() };
        let back = decode_messages(Format::Json, &encode_value(Format::Json, &message)).unwrap().remove(0);
        prop_assert_eq!(&back, &tern_protocol::to_json_safe(&message));
        let encoding = back.encoding.unwrap();
        prop_assert!(encoding == "base64" || encoding.ends_with("/base64"));
    }

    /// REST bodies of messages round-trip in both formats, as an array and as one object.
    #[test]
    fn rest_messages_round_trip(messages in vec(message(false), 0..4)) {
        for format in [Format::Json, Format::Msgpack] {
            prop_assert_eq!(&decode_messages(format, &encode_value(format, &messages)).unwrap(), &messages);
            if let Some(first) = messages.first() {
                prop_assert_eq!(&decode_messages(format, &encode_value(format, first)).unwrap()[..], std::slice::from_ref(first));
            }
        }
    }

    /// Arbitrary bytes never panic any decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        for format in [Format::Json, Format::Msgpack] {
            if let Err(error) = decode(format, &bytes) {
                prop_assert_eq!(error.to_error_info().code, 40000);
            }
            let _ = decode_messages(format, &bytes);
        }
    }

    /// Valid frames with bytes flipped never panic either (reaching deeper decoder paths).
    #[test]
    fn mutated_frames_never_panic(
        frame in protocol_message(true),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        for format in [Format::Json, Format::Msgpack] {
            let mut bytes = encode(format, &frame).to_vec();
            for (index, byte) in &flips {
                let at = index.index(bytes.len());
                bytes[at] = *byte;
            }
            let _ = decode(format, &bytes);
            let _ = decode_messages(format, &bytes);
        }
    }
}
