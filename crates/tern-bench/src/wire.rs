//! The Ably realtime protocol as this client speaks it: ProtocolMessages over a WebSocket,
//! as JSON in text frames (`format=json`) or as msgpack maps with the same camelCase keys
//! in binary frames (`format=msgpack`). Only the fields a benchmark needs are read; unknown
//! fields are ignored, as a real SDK does.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context;
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::socket::{dial, next_message, Socket};

/// How ProtocolMessages are encoded on the socket.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    /// JSON in text frames.
    Json,
    /// msgpack named maps in binary frames.
    Msgpack,
}

impl Format {
    /// The `format=` query value.
    pub(crate) fn query_value(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Msgpack => "msgpack",
        }
    }

    /// Encodes one outbound ProtocolMessage as the frame this format uses.
    fn frame(self, value: &impl Serialize) -> Message {
        match self {
            Format::Json => Message::text(serde_json::to_string(value).expect("frame serializes")),
            Format::Msgpack => Message::binary(
                rmp_serde::to_vec_named(value).expect("frame serializes to msgpack"),
            ),
        }
    }
}

/// ProtocolMessage actions used here (Ably TR2).
pub(crate) mod action {
    pub const HEARTBEAT: u8 = 0;
    pub const ACK: u8 = 1;
    pub const NACK: u8 = 2;
    pub const CONNECTED: u8 = 4;
    pub const DISCONNECTED: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const ERROR: u8 = 9;
    pub const ATTACH: u8 = 10;
    pub const ATTACHED: u8 = 11;
    pub const DETACHED: u8 = 13;
    pub const MESSAGE: u8 = 15;
}

/// ATTACHED flag: the server kept continuity for the channelSerial we sent.
pub(crate) const FLAG_RESUMED: u64 = 4;
/// ATTACHED flag: missed messages follow the ATTACHED.
pub(crate) const FLAG_HAS_BACKLOG: u64 = 2;

/// How long the server may take to answer CONNECT / ATTACH before we call it an error.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A server→client ProtocolMessage, borrowing from the frame where it can.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Inbound<'a> {
    pub action: u8,
    #[serde(default, borrow)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub channel_serial: Option<Cow<'a, str>>,
    #[serde(default)]
    pub msg_serial: Option<u64>,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub flags: Option<u64>,
    #[serde(default, borrow)]
    pub connection_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub connection_details: Option<ConnectionDetails>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
    #[serde(default, borrow)]
    pub messages: Vec<InboundMessage<'a>>,
}

/// One message inside a MESSAGE frame: only `data` matters to a benchmark.
#[derive(Deserialize, Debug)]
pub(crate) struct InboundMessage<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    pub data: Option<Cow<'a, str>>,
}

/// An optional string that borrows from the frame when it can. serde borrows a `Cow`
/// only when it is a field on its own, not inside an `Option`, so wrap it.
pub(crate) fn borrowed_str<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(deserializer)?.map(|b| b.0))
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConnectionDetails {
    #[serde(default)]
    pub connection_key: Option<String>,
}

impl<'a> Inbound<'a> {
    /// Parses a JSON ProtocolMessage.
    pub(crate) fn parse(text: &'a str) -> anyhow::Result<Inbound<'a>> {
        serde_json::from_str(text).context("server sent a frame that is not a ProtocolMessage")
    }

    /// Parses a frame's payload: a binary frame is msgpack, a text frame JSON (what a
    /// server sends follows the connection's format).
    pub(crate) fn decode(data: &'a [u8], binary: bool) -> anyhow::Result<Inbound<'a>> {
        if binary {
            rmp_serde::from_slice(data)
                .context("server sent a binary frame that is not a msgpack ProtocolMessage")
        } else {
            Inbound::parse(std::str::from_utf8(data).context("text frame is not UTF-8")?)
        }
    }

    /// A frame that ends the connection or the channel: the run should count it as an error.
    pub(crate) fn is_failure(&self) -> bool {
        matches!(
            self.action,
            action::DISCONNECTED | action::ERROR | action::DETACHED | action::NACK
        )
    }
}

/// The fast path for MESSAGE frames: calls `each` with the raw `data` of every message
/// in the frame, without parsing the rest. Returns false if the frame does not start the
/// way Tern writes a MESSAGE (`action` first, 15); the caller then parses it fully.
///
/// Why: a benchmark client should spend as little CPU per delivery as it can, for every
/// protocol alike (a NATS delivery is a line split), because it shares the machine with
/// the server; a full serde parse of each ~390-byte frame was a third of its CPU. The
/// `data` of our messages is the stamp payload (ASCII letters and digits, no escapes);
/// anything else fails the stamp check and counts as a protocol error.
pub(crate) fn for_each_message_data(
    frame: &[u8],
    binary: bool,
    mut each: impl FnMut(&[u8]),
) -> bool {
    if binary {
        // A fixmap, then the key "action" (fixstr 6) and the positive fixint 15.
        const HEAD: &[u8] = b"\xa6action\x0f";
        if frame.first().is_none_or(|b| b & 0xf0 != 0x80)
            || frame.get(1..1 + HEAD.len()) != Some(HEAD)
        {
            return false;
        }
        let key = memchr::memmem::Finder::new(b"\xa4data");
        let mut rest = &frame[1 + HEAD.len()..];
        while let Some(at) = key.find(rest) {
            let value = &rest[at + 5..];
            let (len, header) = match value {
                [b, ..] if b & 0xe0 == 0xa0 => (usize::from(b & 0x1f), 1),
                [0xd9, n, ..] => (usize::from(*n), 2),
                [0xda, hi, lo, ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), 3),
                // Not a string (bin, nil): hand the bytes to the stamp check to reject.
                _ => (0, 0),
            };
            let Some(data) = value.get(header..header + len) else {
                return false;
            };
            each(data);
            rest = &value[header + len..];
        }
        true
    } else {
        if !frame.starts_with(b"{\"action\":15,") {
            return false;
        }
        let key = memchr::memmem::Finder::new(b"\"data\":\"");
        let mut rest = frame;
        while let Some(at) = key.find(rest) {
            let value = &rest[at + 8..];
            let Some(end) = memchr::memchr(b'"', value) else {
                return false;
            };
            each(&value[..end]);
            rest = &value[end + 1..];
        }
        true
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Attach<'a> {
    action: u8,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_serial: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Publish<'a> {
    action: u8,
    channel: &'a str,
    msg_serial: u64,
    messages: [PublishMessage<'a>; 1],
}

#[derive(Serialize)]
struct PublishMessage<'a> {
    name: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
struct Close {
    action: u8,
}

/// `{"action":10,"channel":c[,"channelSerial":s]}`
pub(crate) fn attach_frame(format: Format, channel: &str, channel_serial: Option<&str>) -> Message {
    format.frame(&Attach {
        action: action::ATTACH,
        channel,
        channel_serial,
    })
}

/// `{"action":15,"channel":c,"msgSerial":n,"messages":[{"name":"b","data":payload}]}`
pub(crate) fn publish_frame(format: Format, channel: &str, msg_serial: u64, data: &str) -> Message {
    format.frame(&Publish {
        action: action::MESSAGE,
        channel,
        msg_serial,
        messages: [PublishMessage { name: "b", data }],
    })
}

/// `{"action":7}`: a clean close, so the server can drop the connection state at once.
pub(crate) fn close_frame(format: Format) -> Message {
    format.frame(&Close {
        action: action::CLOSE,
    })
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub(crate) fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The connect URL an ably-js client on Node would use, plus `extra` query parameters
/// (already escaped, each starting with `&`).
pub(crate) fn connect_url(base: &str, key: &str, format: Format, extra: &str) -> String {
    let base = base.trim_end_matches('/');
    format!(
        "{base}/?key={}&format={}&heartbeats=false&v=6{extra}",
        query_escape(key),
        format.query_value()
    )
}

/// What CONNECTED told us.
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    pub connection_id: String,
    pub connection_key: String,
    /// Present when the server could not resume or recover (then the id is new).
    pub error: Option<serde_json::Value>,
}

/// Dials and waits for CONNECTED; an ERROR or a closed socket first is an error.
pub(crate) async fn open(
    url: &str,
    config: WebSocketConfig,
) -> anyhow::Result<(Socket, Connected)> {
    let mut socket = dial(url, config).await?;
    let connected = next_frame(&mut socket, |frame| {
        if frame.action == action::CONNECTED {
            Some(Connected {
                connection_id: frame.connection_id.as_deref().unwrap_or("").to_owned(),
                connection_key: frame
                    .connection_details
                    .as_ref()
                    .and_then(|d| d.connection_key.clone())
                    .unwrap_or_default(),
                error: frame.error.clone(),
            })
        } else {
            None
        }
    })
    .await
    .context("waiting for CONNECTED")?;
    Ok((socket, connected))
}

/// What ATTACHED told us.
#[derive(Debug, Clone)]
pub(crate) struct Attached {
    pub flags: u64,
    pub channel_serial: Option<String>,
}

/// Sends ATTACH and waits for this channel's ATTACHED.
pub(crate) async fn attach(
    socket: &mut Socket,
    format: Format,
    channel: &str,
    channel_serial: Option<&str>,
) -> anyhow::Result<Attached> {
    socket
        .send(attach_frame(format, channel, channel_serial))
        .await?;
    next_frame(socket, |frame| {
        (frame.action == action::ATTACHED && frame.channel.as_deref() == Some(channel)).then(|| {
            Attached {
                flags: frame.flags.unwrap_or(0),
                channel_serial: frame.channel_serial.as_deref().map(str::to_owned),
            }
        })
    })
    .await
    .with_context(|| format!("attaching {channel}"))
}

/// Reads frames until `pick` accepts one, within [`REPLY_TIMEOUT`]. Heartbeats and other
/// frames are skipped; a failure frame or a closed socket ends the wait with an error.
pub(crate) async fn next_frame<T>(
    socket: &mut Socket,
    mut pick: impl FnMut(&Inbound<'_>) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let message = next_message(socket, deadline, "no reply in time").await?;
        let (data, binary) = match message {
            Message::Text(text) => (bytes::Bytes::from(text), false),
            Message::Binary(data) => (data, true),
            _ => continue,
        };
        let frame = Inbound::decode(&data, binary)?;
        if let Some(value) = pick(&frame) {
            return Ok(value);
        }
        if frame.action != action::HEARTBEAT && frame.is_failure() {
            anyhow::bail!(
                "server sent action {} error {}",
                frame.action,
                frame.error.unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames we send are exactly the JSON the protocol notes show.
    #[test]
    fn outbound_frames() {
        let text = |m: Message| m.into_text().unwrap().as_str().to_owned();
        assert_eq!(
            text(attach_frame(Format::Json, "c", None)),
            r#"{"action":10,"channel":"c"}"#
        );
        assert_eq!(
            text(attach_frame(Format::Json, "c", Some("s\"1"))),
            r#"{"action":10,"channel":"c","channelSerial":"s\"1"}"#
        );
        assert_eq!(
            text(publish_frame(Format::Json, "c", 7, "hi")),
            r#"{"action":15,"channel":"c","msgSerial":7,"messages":[{"name":"b","data":"hi"}]}"#
        );
        assert_eq!(text(close_frame(Format::Json)), r#"{"action":7}"#);
    }

    /// msgpack frames are binary named maps that decode back to the same fields, and a
    /// msgpack MESSAGE from the server yields its data without copying.
    #[test]
    fn msgpack_frames() {
        let publish = publish_frame(Format::Msgpack, "c", 7, "hi");
        assert!(publish.is_binary());
        let value: serde_json::Value = rmp_serde::from_slice(&publish.into_data()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"action":15,"channel":"c","msgSerial":7,"messages":[{"name":"b","data":"hi"}]})
        );
        let inbound = rmp_serde::to_vec_named(&serde_json::json!({
            "action": 15, "channel": "c", "timestamp": 1.5,
            "messages": [{"data": "d1", "id": "x"}], "error": {"code": 1}
        }))
        .unwrap();
        let frame = Inbound::decode(&inbound, true).unwrap();
        assert_eq!(frame.action, action::MESSAGE);
        assert!(matches!(frame.messages[0].data, Some(Cow::Borrowed("d1"))));
        assert!(Inbound::decode(b"\xc1", true).is_err());
        let ack = rmp_serde::to_vec_named(&serde_json::json!({"action":1,"msgSerial":3,"count":2}))
            .unwrap();
        let frame = Inbound::decode(&ack, true).unwrap();
        assert_eq!((frame.msg_serial, frame.count), (Some(3), Some(2)));
    }

    /// Inbound frames parse with unknown fields present and known ones missing.
    #[test]
    fn inbound_frames() {
        let f = Inbound::parse(
            r#"{"action":15,"channel":"c","id":"x:1","channelSerial":"a:1","messages":[{"name":"b","data":"d1","serial":"s"},{"data":"d2"}]}"#,
        )
        .unwrap();
        assert_eq!(f.action, action::MESSAGE);
        let data: Vec<_> = f.messages.iter().map(|m| m.data.as_deref()).collect();
        assert_eq!(data, [Some("d1"), Some("d2")]);
        let f = Inbound::parse(
            r#"{"action":4,"connectionId":"k1","connectionDetails":{"connectionKey":"ck","maxIdleInterval":15000}}"#,
        )
        .unwrap();
        assert_eq!(f.connection_id.as_deref(), Some("k1"));
        assert_eq!(
            f.connection_details.unwrap().connection_key.as_deref(),
            Some("ck")
        );
        assert!(
            Inbound::parse(r#"{"action":2,"msgSerial":0,"count":1,"error":{"code":1}}"#)
                .unwrap()
                .is_failure()
        );
        assert!(Inbound::parse("not json").is_err());
    }

    /// The fast path finds every message's data in JSON and msgpack MESSAGE frames as
    /// Tern writes them, and declines anything else.
    #[test]
    fn fast_message_data() {
        let json = br#"{"action":15,"id":"c:0","channel":"x","messages":[{"id":"c:0:0","name":"b","data":"d1","action":0},{"data":"d2"}]}"#;
        let mut seen = Vec::new();
        assert!(for_each_message_data(json, false, |d| seen.push(d.to_vec())));
        assert_eq!(seen, [b"d1".to_vec(), b"d2".to_vec()]);
        assert!(!for_each_message_data(
            br#"{"action":1,"msgSerial":0}"#,
            false,
            |_| {}
        ));
        let long = "y".repeat(300);
        let msgpack = rmp_serde::to_vec_named(&serde_json::json!({
            "action": 15, "id": "c:0", "channel": "x",
            "messages": [{"name": "b", "data": "d1"}, {"data": "x".repeat(40)}, {"data": long}]
        }))
        .unwrap();
        let mut seen = Vec::new();
        assert!(for_each_message_data(&msgpack, true, |d| seen.push(d.len())));
        assert_eq!(seen, [2, 40, 300]);
        let ack =
            rmp_serde::to_vec_named(&serde_json::json!({"action": 1, "msgSerial": 0})).unwrap();
        assert!(!for_each_message_data(&ack, true, |_| {}));
        // A truncated string is declined, not read past its end.
        assert!(!for_each_message_data(
            &msgpack[..msgpack.len() - 5],
            true,
            |_| {}
        ));
    }

    /// Keys with ':' and other reserved characters are escaped in the connect URL.
    #[test]
    fn url_escaping() {
        assert_eq!(
            connect_url(
                "ws://127.0.0.1:1/",
                "app.key:s/+",
                Format::Json,
                "&echo=false"
            ),
            "ws://127.0.0.1:1/?key=app.key%3As%2F%2B&format=json&heartbeats=false&v=6&echo=false"
        );
    }
}
