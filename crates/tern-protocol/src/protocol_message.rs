//! `ProtocolMessage`, the realtime frame, and the small types it carries.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ErrorInfo;
use crate::integer;
use crate::message::{Annotation, Message, PresenceMessage};

/// One realtime frame (spec TR4), in either direction.
///
/// `action` is a plain number so that a frame with an unknown action still decodes and can
/// be answered; only type mismatches fail to decode. Unknown fields (`state`,
/// the obsolete top-level `connectionKey`, ...) are ignored, `null` reads as `None`, and
/// `None` fields are omitted when encoding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMessage {
    /// One of [`crate::action`].
    #[serde(deserialize_with = "integer::required")]
    pub action: u8,
    /// Bits from [`crate::flags`].
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub flags: Option<u64>,
    /// HEARTBEAT ping id, or `connectionId:msgSerial` on relayed MESSAGE/PRESENCE frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Milliseconds since the epoch.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<i64>,
    /// ACK/NACK: how many frames from `msgSerial` on.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub count: Option<u32>,
    /// ERROR, NACK, DISCONNECTED, or a failed resume/attach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// CONNECTED: the connection's id; relayed frames: the publisher's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// The channel this frame is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Position in the channel, kept by the client for resume; `syncId:cursor` on SYNC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_serial: Option<String>,
    /// Per-connection publish sequence number, starting at 0.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub msg_serial: Option<i64>,
    /// MESSAGE payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    /// PRESENCE and SYNC payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<Vec<PresenceMessage>>,
    /// ANNOTATION payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Vec<Annotation>>,
    /// AUTH: the new credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthDetails>,
    /// CONNECTED: required by ably-js, which stalls without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_details: Option<ConnectionDetails>,
    /// ATTACH/ATTACHED channel params (`rewind`, `delta`, ...). Numbers and booleans from a
    /// sender are read as their text, since SDK users sometimes pass them unquoted.
    #[serde(
        default,
        deserialize_with = "params",
        skip_serializing_if = "Option::is_none"
    )]
    pub params: Option<BTreeMap<String, String>>,
    /// ACK: one result per acknowledged frame, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub res: Option<Vec<PublishResult>>,
}

/// CONNECTED `connectionDetails` (spec CD2). `connectionKey` is what the client resumes with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDetails {
    /// Secret handle for resume/recover; ably-js reads the key only from here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_key: Option<String>,
    /// The connection's clientId (`*` for wildcard).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Largest message the client may publish, in bytes.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_message_size: Option<u64>,
    /// Milliseconds without traffic after which the client assumes the transport is dead
    /// (it adds its own `realtimeRequestTimeout` on top).
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_idle_interval: Option<u64>,
    /// Milliseconds the server keeps connection state for a resume.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_state_ttl: Option<u64>,
    /// Which server the client talks to (debug only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// Inbound messages per second allowed (debug only).
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_inbound_rate: Option<u64>,
    /// Largest frame accepted, in bytes (debug only).
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_frame_size: Option<u64>,
    /// Region/site name (debug only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_code: Option<String>,
}

/// AUTH frame `auth`: the client's new token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthDetails {
    /// An Ably token or a JWT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

/// One entry of an ACK's `res`: the serials assigned to one frame's messages, in order;
/// `None` for a message that was not published (for example a de-duplicated one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    /// One per message in the acknowledged frame.
    #[serde(default)]
    pub serials: Vec<Option<String>>,
}

/// A channel param value: text, or a number/bool taken as its text.
struct ParamValue(String);

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParamValueVisitor)
    }
}

struct ParamValueVisitor;

impl Visitor<'_> for ParamValueVisitor {
    type Value = ParamValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number or boolean")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<ParamValue, E> {
        Ok(ParamValue(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<ParamValue, E> {
        Ok(ParamValue(value))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<ParamValue, E> {
        Ok(ParamValue(value.to_string()))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ParamValue, E> {
        Ok(ParamValue(value.to_string()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ParamValue, E> {
        Ok(ParamValue(value.to_string()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<ParamValue, E> {
        Ok(ParamValue(value.to_string()))
    }
}

fn params<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    let raw: Option<BTreeMap<String, ParamValue>> = Option::deserialize(deserializer)?;
    Ok(raw.map(|map| map.into_iter().map(|(key, value)| (key, value.0)).collect()))
}
