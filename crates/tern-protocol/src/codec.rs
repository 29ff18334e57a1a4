//! The two wire formats and the functions that turn bytes into frames and back.

use std::fmt;
use std::io::Cursor;

use bytes::Bytes;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{code, ErrorInfo};
use crate::message::Message;
use crate::protocol_message::ProtocolMessage;

/// Deepest msgpack nesting accepted, matching serde_json's recursion limit so that both
/// formats bound stack use the same way.
const MSGPACK_DEPTH_MAX: usize = 128;

/// Longest decoder detail quoted back to a client; serde messages can quote input.
const ERROR_DETAIL_CHARS_MAX: usize = 160;

/// A wire format, chosen per connection (`format=` query param) or per REST request
/// (`Content-Type` / `Accept`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON text; binary data travels as base64.
    Json,
    /// msgpack with named maps (the same camelCase keys as JSON); binary data is `bin`.
    Msgpack,
}

impl Format {
    /// How many formats there are, for per-format caches indexed by [`Format::index`].
    pub const COUNT: usize = 2;

    /// A dense index in `0..Format::COUNT`.
    pub fn index(self) -> usize {
        match self {
            Format::Json => 0,
            Format::Msgpack => 1,
        }
    }

    /// The `format` query parameter: absent or `json` is JSON (Python sends none for JSON),
    /// `msgpack` is msgpack, anything else is unsupported.
    pub fn from_param(param: Option<&str>) -> Option<Format> {
        match param {
            None | Some("json") => Some(Format::Json),
            Some("msgpack") => Some(Format::Msgpack),
            Some(_) => None,
        }
    }

    /// The media type for bodies in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Msgpack => "application/x-msgpack",
        }
    }

    /// The format of a `Content-Type` or `Accept` value, ignoring parameters such as
    /// `; charset=utf-8` and case. `None` for anything else.
    pub fn from_content_type(content_type: &str) -> Option<Format> {
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        if media_type.eq_ignore_ascii_case("application/json") {
            Some(Format::Json)
        } else if media_type.eq_ignore_ascii_case("application/x-msgpack")
            || media_type.eq_ignore_ascii_case("application/msgpack")
        {
            Some(Format::Msgpack)
        } else {
            None
        }
    }
}

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape (a field of the wrong type, an out-of-range
    /// number, a missing `action`).
    #[error("malformed JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Not msgpack, or msgpack of the wrong shape, or nested deeper than the limit.
    #[error("malformed msgpack: {0}")]
    Msgpack(#[source] rmp_serde::decode::Error),
    /// A complete msgpack value followed by more bytes; one frame must be one value.
    #[error("{count} trailing bytes after the msgpack value")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
}

impl DecodeError {
    /// The error to send back: 40000 (bad request) naming the problem, cut to a short length.
    pub fn to_error_info(&self) -> ErrorInfo {
        let mut message = self.to_string();
        if let Some((cut, _)) = message.char_indices().nth(ERROR_DETAIL_CHARS_MAX) {
            message.truncate(cut);
            message.push('…');
        }
        ErrorInfo::new(code::BAD_REQUEST, message)
    }
}

/// Decodes one realtime frame.
pub fn decode(format: Format, bytes: &[u8]) -> Result<ProtocolMessage, DecodeError> {
    from_bytes(format, bytes)
}

/// Decodes a REST publish body: a single Message object or an array of them.
pub fn decode_messages(format: Format, bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
    from_bytes::<MessageBody>(format, bytes).map(|body| body.0)
}

/// Decodes any other body a client sends (a token request, ...) with a frame's bounds:
/// msgpack nesting no deeper than JSON's, one value and no trailing bytes.
pub fn decode_value<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<T, DecodeError> {
    from_bytes(format, bytes)
}

/// Encodes one realtime frame.
pub fn encode(format: Format, message: &ProtocolMessage) -> Bytes {
    encode_value(format, message)
}

/// Encodes any response value (arrays of Message/PresenceMessage, token details, ...).
/// Binary message data becomes base64 in JSON, as in [`encode`].
///
/// # Panics
///
/// If `value`'s `Serialize` fails, which for JSON means a map with non-string keys. No type
/// in this crate can fail, so this is a programming error, never a property of input.
pub fn encode_value<T: Serialize + ?Sized>(format: Format, value: &T) -> Bytes {
    let encoded = match format {
        Format::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
        // Named maps: ably-js and ably-python read msgpack maps by the JSON key names.
        Format::Msgpack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
    };
    match encoded {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => panic!("{format:?} serialization failed: {error}"),
    }
}

fn from_bytes<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<T, DecodeError> {
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(DecodeError::Json),
        Format::Msgpack => {
            let mut deserializer = rmp_serde::Deserializer::new(Cursor::new(bytes));
            deserializer.set_max_depth(MSGPACK_DEPTH_MAX);
            let value = T::deserialize(&mut deserializer).map_err(DecodeError::Msgpack)?;
            let consumed = usize::try_from(deserializer.position()).unwrap_or(usize::MAX);
            match bytes.len().saturating_sub(consumed) {
                0 => Ok(value),
                count => Err(DecodeError::TrailingBytes { count }),
            }
        }
    }
}

/// A REST publish body: one message or an array of them.
struct MessageBody(Vec<Message>);

impl<'de> Deserialize<'de> for MessageBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MessageBodyVisitor)
    }
}

struct MessageBodyVisitor;

impl<'de> Visitor<'de> for MessageBodyVisitor {
    type Value = MessageBody;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object or an array of messages")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MessageBody, A::Error> {
        Message::deserialize(MapAccessDeserializer::new(map))
            .map(|message| MessageBody(vec![message]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageBody, A::Error> {
        // Cap the preallocation: the declared length is input.
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(message) = seq.next_element()? {
            messages.push(message);
        }
        Ok(MessageBody(messages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{action, flags, ConnectionDetails, Data, PresenceMessage, PublishResult};
    use serde_json::json;

    fn json_of(bytes: &Bytes) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// A real ably-js publish frame decodes, and the `size` field it sends is ignored.
    #[test]
    fn ably_js_publish_frame() {
        let text = br#"{"action":15,"channel":"foo","msgSerial":0,"messages":[{"name":"greeting","data":"hello","action":0,"size":13}]}"#;
        let frame = decode(Format::Json, text).unwrap();
        assert_eq!(frame.action, action::MESSAGE);
        assert_eq!(frame.channel.as_deref(), Some("foo"));
        assert_eq!(frame.msg_serial, Some(0));
        let messages = frame.messages.unwrap();
        assert_eq!(
            messages,
            [Message {
                name: Some("greeting".into()),
                data: Some(Data::String("hello".into())),
                action: Some(0),
                ..Default::default()
            }]
        );
    }

    /// An ATTACHED frame carries only the fields that were set.
    #[test]
    fn attached_has_only_set_fields() {
        let frame = ProtocolMessage {
            action: action::ATTACHED,
            channel: Some("foo".into()),
            channel_serial: Some("s1".into()),
            flags: Some(flags::CORE_MODES | flags::HAS_PRESENCE),
            ..Default::default()
        };
        let bytes = encode(Format::Json, &frame);
        assert_eq!(
            &bytes[..],
            br#"{"action":11,"flags":983041,"channel":"foo","channelSerial":"s1"}"#
        );
    }

    /// CONNECTED, ACK and NACK frames have the shapes the protocol notes list.
    #[test]
    fn server_frame_shapes() {
        let connected = ProtocolMessage {
            action: action::CONNECTED,
            connection_id: Some("conn1".into()),
            connection_details: Some(ConnectionDetails {
                connection_key: Some("ck1".into()),
                max_message_size: Some(65536),
                max_idle_interval: Some(15000),
                connection_state_ttl: Some(120_000),
                server_id: Some("srv-1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            json_of(&encode(Format::Json, &connected)),
            json!({"action":4,"connectionId":"conn1","connectionDetails":{"connectionKey":"ck1",
                "maxMessageSize":65536,"maxIdleInterval":15000,"connectionStateTtl":120000,"serverId":"srv-1"}})
        );
        let ack = ProtocolMessage {
            action: action::ACK,
            msg_serial: Some(0),
            count: Some(1),
            res: Some(vec![PublishResult {
                serials: vec![Some("a".into()), None],
            }]),
            ..Default::default()
        };
        assert_eq!(
            json_of(&encode(Format::Json, &ack)),
            json!({"action":1,"count":1,"msgSerial":0,"res":[{"serials":["a",null]}]})
        );
        let nack = ProtocolMessage {
            action: action::NACK,
            msg_serial: Some(3),
            count: Some(1),
            error: Some(ErrorInfo {
                href: None,
                ..ErrorInfo::new(code::CAPABILITY_DENIED, "no")
            }),
            ..Default::default()
        };
        assert_eq!(
            json_of(&encode(Format::Json, &nack)),
            json!({"action":2,"count":1,"error":{"code":40160,"statusCode":401,"message":"no"},"msgSerial":3})
        );
    }

    /// Binary data stays `bin` through msgpack and becomes base64 with an encoding in JSON.
    #[test]
    fn binary_data_per_format() {
        let frame = ProtocolMessage {
            action: action::MESSAGE,
            messages: Some(vec![Message {
                data: Some(Data::Binary(Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]))),
                encoding: Some("utf-8/cipher+aes-128-cbc".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let msgpack = encode(Format::Msgpack, &frame);
        assert_eq!(decode(Format::Msgpack, &msgpack).unwrap(), frame);

        let text = encode(Format::Json, &frame);
        assert_eq!(
            json_of(&text),
            json!({"action":15,"messages":[{"data":"3q2+7w==","encoding":"utf-8/cipher+aes-128-cbc/base64"}]})
        );
        let back = decode(Format::Json, &text)
            .unwrap()
            .messages
            .unwrap()
            .remove(0);
        assert_eq!(back.data, Some(Data::String("3q2+7w==".into())));
    }

    /// msgpack output uses named maps with the same camelCase keys as JSON.
    #[test]
    fn msgpack_uses_named_keys() {
        let frame = ProtocolMessage {
            action: action::ATTACH,
            channel: Some("c".into()),
            ..Default::default()
        };
        let bytes = encode(Format::Msgpack, &frame);
        // fixmap(2), "action", 10, "channel", "c"
        let mut expected = vec![0x82, 0xa6];
        expected.extend_from_slice(b"action");
        expected.extend_from_slice(&[0x0a, 0xa7]);
        expected.extend_from_slice(b"channel");
        expected.extend_from_slice(&[0xa1, b'c']);
        assert_eq!(&bytes[..], &expected[..]);
        let nested = ProtocolMessage {
            action: action::CONNECTED,
            connection_details: Some(ConnectionDetails {
                connection_key: Some("k".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let value: serde_json::Value =
            rmp_serde::from_slice(&encode(Format::Msgpack, &nested)).unwrap();
        assert_eq!(
            value,
            json!({"action":4,"connectionDetails":{"connectionKey":"k"}})
        );
    }

    /// A msgpack frame as ably-js sends it (string keys, float timestamp, bin data) decodes.
    #[test]
    fn msgpack_from_client() {
        #[derive(Serialize)]
        struct ClientMessage<'a> {
            name: &'a str,
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
            size: u32,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ClientFrame<'a> {
            action: u8,
            channel: &'a str,
            msg_serial: u8,
            timestamp: f64,
            messages: Vec<ClientMessage<'a>>,
            annotations: Vec<u8>,
        }
        let bytes = rmp_serde::to_vec_named(&ClientFrame {
            action: 15,
            channel: "foo",
            msg_serial: 7,
            timestamp: 1_700_000_000_000.0,
            messages: vec![ClientMessage {
                name: "b",
                data: &[1, 2],
                size: 2,
            }],
            annotations: vec![],
        })
        .unwrap();
        let frame = decode(Format::Msgpack, &bytes).unwrap();
        assert_eq!(frame.msg_serial, Some(7));
        assert_eq!(frame.timestamp, Some(1_700_000_000_000));
        let message = &frame.messages.unwrap()[0];
        assert_eq!(
            message.data,
            Some(Data::Binary(Bytes::from_static(&[1, 2])))
        );
    }

    /// Unknown actions decode; wrong types and out-of-range numbers are errors, not panics.
    #[test]
    fn action_edge_cases() {
        assert_eq!(
            decode(Format::Json, br#"{"action":42}"#).unwrap().action,
            42
        );
        let out_of_range = decode(Format::Json, br#"{"action":300}"#).unwrap_err();
        assert!(matches!(out_of_range, DecodeError::Json(_)));
        assert!(decode(Format::Json, br#"{"action":"15"}"#).is_err());
        assert!(
            decode(Format::Json, br#"{"channel":"x"}"#).is_err(),
            "action is required"
        );
        assert!(decode(Format::Json, br#"{"action":15,"flags":-1}"#).is_err());
        assert!(decode(Format::Json, b"").is_err());
        assert!(decode(Format::Msgpack, b"").is_err());
    }

    /// Nulls read as absent fields, and unknown fields are ignored.
    #[test]
    fn nulls_and_unknown_fields() {
        let text = br#"{"action":11,"channel":"c","channelSerial":null,"flags":null,"connectionKey":"old","state":[],"error":null}"#;
        let frame = decode(Format::Json, text).unwrap();
        assert_eq!(
            frame,
            ProtocolMessage {
                action: 11,
                channel: Some("c".into()),
                ..Default::default()
            }
        );
    }

    /// Channel params accept unquoted numbers and booleans as their text.
    #[test]
    fn lenient_params() {
        let frame = decode(
            Format::Json,
            br#"{"action":10,"params":{"rewind":1,"x":true,"delta":"vcdiff"}}"#,
        )
        .unwrap();
        let params = frame.params.unwrap();
        assert_eq!(params["rewind"], "1");
        assert_eq!(params["x"], "true");
        assert_eq!(params["delta"], "vcdiff");
    }

    /// Presence frames round-trip with their required action.
    #[test]
    fn presence_frame() {
        let text = br#"{"action":14,"channel":"foo","msgSerial":2,"presence":[{"action":2,"data":"here"}]}"#;
        let frame = decode(Format::Json, text).unwrap();
        assert_eq!(
            frame.presence.as_deref(),
            Some(
                &[PresenceMessage {
                    action: 2,
                    data: Some(Data::String("here".into())),
                    ..Default::default()
                }][..]
            )
        );
        assert_eq!(
            decode(Format::Msgpack, &encode(Format::Msgpack, &frame)).unwrap(),
            frame
        );
    }

    /// A REST publish body may be one message or an array, in either format.
    #[test]
    fn rest_body_one_or_many() {
        let one = decode_messages(Format::Json, br#"{"name":"a","data":"x"}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name.as_deref(), Some("a"));
        let many =
            decode_messages(Format::Json, br#"[{"name":"a"},{"name":"b","id":"i:1"}]"#).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].id.as_deref(), Some("i:1"));
        assert!(decode_messages(Format::Json, br#"[]"#).unwrap().is_empty());
        assert!(decode_messages(Format::Json, br#""text""#).is_err());
        assert!(decode_messages(Format::Json, br#"[1]"#).is_err());

        let packed = encode_value(Format::Msgpack, &many);
        assert_eq!(decode_messages(Format::Msgpack, &packed).unwrap(), many);
        let single = encode_value(Format::Msgpack, &many[0]);
        assert_eq!(
            decode_messages(Format::Msgpack, &single).unwrap(),
            &many[..1]
        );
    }

    /// Trailing bytes after a msgpack value are rejected.
    #[test]
    fn msgpack_trailing_bytes() {
        let mut bytes = encode(Format::Msgpack, &ProtocolMessage::default()).to_vec();
        bytes.extend_from_slice(&[0xc0, 0xc0]);
        assert!(matches!(
            decode(Format::Msgpack, &bytes),
            Err(DecodeError::TrailingBytes { count: 2 })
        ));
    }

    /// Deep msgpack nesting is refused instead of exhausting the stack.
    #[test]
    fn msgpack_depth_limit() {
        // {"action":0,"extras": [[[[...]]]] } nested 10 000 deep.
        let mut bytes = vec![0x82, 0xa6];
        bytes.extend_from_slice(b"action");
        bytes.extend_from_slice(&[0x00, 0xa6]);
        bytes.extend_from_slice(b"extras");
        bytes.extend(std::iter::repeat_n(0x91, 10_000));
        bytes.push(0xc0);
        assert!(matches!(
            decode(Format::Msgpack, &bytes),
            Err(DecodeError::Msgpack(_))
        ));
    }

    /// A decode error becomes a 40000 ErrorInfo whose message is short and names the problem.
    #[test]
    fn decode_error_to_error_info() {
        let long = format!(r#"{{"action":"{}"}}"#, "x".repeat(10_000));
        let error = decode(Format::Json, long.as_bytes())
            .unwrap_err()
            .to_error_info();
        assert_eq!(error.code, code::BAD_REQUEST);
        assert_eq!(error.status_code, 400);
        assert!(
            error.message.starts_with("malformed JSON"),
            "{}",
            error.message
        );
        assert!(error.message.chars().count() <= ERROR_DETAIL_CHARS_MAX + 1);
    }

    /// The `format` query param and content types map to formats as the SDKs send them.
    #[test]
    fn format_names() {
        assert_eq!(Format::from_param(None), Some(Format::Json));
        assert_eq!(Format::from_param(Some("json")), Some(Format::Json));
        assert_eq!(Format::from_param(Some("msgpack")), Some(Format::Msgpack));
        assert_eq!(Format::from_param(Some("xml")), None);
        assert_eq!(Format::from_param(Some("")), None);
        assert_eq!(
            Format::from_content_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("Application/X-Msgpack"),
            Some(Format::Msgpack)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
        for format in [Format::Json, Format::Msgpack] {
            assert_eq!(
                Format::from_content_type(format.content_type()),
                Some(format)
            );
            assert!(format.index() < Format::COUNT);
        }
        assert_ne!(Format::Json.index(), Format::Msgpack.index());
    }
}
