//! `Message` and `PresenceMessage`, and how binary data crosses into JSON.
//!
//! Both types serialize through a borrowed wire view so that, in a human-readable format
//! (JSON), a message with [`Data::Binary`] goes out as base64 with `base64` appended to its
//! `encoding` (spec RSL4d3). Messages without binary data serialize as they are, and msgpack
//! keeps bytes as `bin`. This lives in `Serialize` rather than in the codec so that every
//! path to JSON (a frame, a REST history page, a nested response object) gets it right.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::data::Data;
use crate::integer;

/// A channel message (spec TM2). Unknown fields, such as the `size` ably-js sends, are
/// ignored when decoding; `None` fields are omitted when encoding.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// Unique id; publisher-supplied ids (`<base64>:<index>`) are kept for de-duplication.
    pub id: Option<String>,
    /// The publisher's clientId.
    pub client_id: Option<String>,
    /// The publishing connection; clients inherit it from the frame when absent.
    pub connection_id: Option<String>,
    /// Publish on behalf of another connection (REST only).
    pub connection_key: Option<String>,
    /// Event name.
    pub name: Option<String>,
    /// Payload, relayed opaquely.
    #[serde(default, deserialize_with = "present_data")]
    pub data: Option<Data>,
    /// How to decode `data` (`json`, `base64`, `utf-8/cipher+aes-128-cbc/base64`, ...).
    pub encoding: Option<String>,
    /// Extras object: headers, push, ref, delta, ...
    #[serde(default, deserialize_with = "present_value")]
    pub extras: Option<Value>,
    /// Milliseconds since the epoch.
    #[serde(default, deserialize_with = "integer::optional")]
    pub timestamp: Option<i64>,
    /// 0 create, 1 update, 2 delete, 3 meta, 4 summary, 5 append; absent means create.
    #[serde(default, deserialize_with = "integer::optional")]
    pub action: Option<u8>,
    /// Opaque server-assigned serial. On an update, delete, append or summary it names the
    /// message changed (and `version.serial` the change itself).
    pub serial: Option<String>,
    /// Which version of the message this is (spec TM2s): set by the server on every
    /// update, delete and append; `clientId`, `description` and `metadata` come from the
    /// caller's operation.
    pub version: Option<MessageVersion>,
    /// `{"summary": {type: ...}}`: the annotation summary of a `message.summary`.
    #[serde(default, deserialize_with = "present_value")]
    pub annotations: Option<Value>,
}

/// One version of a message (spec TM2s): the change that produced it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageVersion {
    /// The change's own serial (the message keeps its first serial).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When the change was applied, ms since the epoch.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<i64>,
    /// Who made the change (the operation's `clientId`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Why, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free-form metadata of the change (string values in Ably's model).
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub metadata: Option<Value>,
}

/// An annotation of a message (spec TAN): a reaction, a flag, a count, published by a
/// client about the message whose serial is `messageSerial`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Annotation {
    /// Unique id (`<frame id>:<index>` when the server assigns it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// 0 create, 1 delete (see [`crate::annotation_action`]).
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub action: Option<u8>,
    /// The annotation's own serial, assigned by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Serial of the message annotated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_serial: Option<String>,
    /// `namespace:aggregation.version`, e.g. `reaction:distinct.v1`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// What is counted (the emoji of a reaction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `multiple.v1`: how many this client adds.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub count: Option<i64>,
    /// The annotating client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The annotating connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// Optional payload, relayed opaquely (text or JSON; binary data is not base64'd here).
    #[serde(
        default,
        deserialize_with = "present_data",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Data>,
    /// How to decode `data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Extras object.
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub extras: Option<Value>,
    /// Milliseconds since the epoch.
    #[serde(
        default,
        deserialize_with = "integer::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<i64>,
}

/// A presence event (spec TP3). Ids have the form `connectionId:msgSerial:index`, which
/// ably-js relies on to order events for one member.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceMessage {
    /// `connectionId:msgSerial:index`.
    pub id: Option<String>,
    /// One of [`crate::presence_action`].
    #[serde(deserialize_with = "integer::required")]
    pub action: u8,
    /// The member's clientId.
    pub client_id: Option<String>,
    /// The member's connection.
    pub connection_id: Option<String>,
    /// Member data, relayed opaquely.
    #[serde(default, deserialize_with = "present_data")]
    pub data: Option<Data>,
    /// How to decode `data`.
    pub encoding: Option<String>,
    /// Extras object.
    #[serde(default, deserialize_with = "present_value")]
    pub extras: Option<Value>,
    /// Milliseconds since the epoch.
    #[serde(default, deserialize_with = "integer::optional")]
    pub timestamp: Option<i64>,
}

/// `deserialize_with` for optional `data`: a value that decodes to JSON null (a msgpack
/// NaN or infinity, which JSON has no form for) is absent, as JSON's own null is, so
/// a decoded message encodes back to itself.
fn present_data<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Data>, D::Error> {
    Ok(Option::<Data>::deserialize(deserializer)?.filter(|data| *data != Data::Json(Value::Null)))
}

/// `deserialize_with` for optional `extras`, as [`present_data`].
fn present_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Ok(Option::<Value>::deserialize(deserializer)?.filter(|value| !value.is_null()))
}

/// The JSON form of a message: binary data as a base64 string, with `base64` appended to
/// the encoding. Messages without binary data come back as clones.
///
/// [`crate::encode`] and [`crate::encode_value`] already do this while serializing; call
/// this only when you need the JSON-form `Message` itself.
pub fn to_json_safe(message: &Message) -> Message {
    match &message.data {
        Some(Data::Binary(bytes)) => Message {
            data: Some(Data::String(STANDARD.encode(bytes))),
            encoding: encoding_for(message.encoding.as_deref(), message.data.as_ref(), true)
                .map(Cow::into_owned),
            ..message.clone()
        },
        _ => message.clone(),
    }
}

/// The encoding to put on the wire: the message's own, plus `base64` when binary data is
/// about to be written as text.
fn encoding_for<'a>(
    encoding: Option<&'a str>,
    data: Option<&Data>,
    text_only: bool,
) -> Option<Cow<'a, str>> {
    if !(text_only && matches!(data, Some(Data::Binary(_)))) {
        return encoding.map(Cow::Borrowed);
    }
    Some(match encoding {
        None | Some("") => Cow::Borrowed("base64"),
        Some(encoding) => Cow::Owned(format!("{encoding}/base64")),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageWire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Data>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extras: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a MessageVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<&'a Value>,
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text_only = serializer.is_human_readable();
        MessageWire {
            id: self.id.as_deref(),
            client_id: self.client_id.as_deref(),
            connection_id: self.connection_id.as_deref(),
            connection_key: self.connection_key.as_deref(),
            name: self.name.as_deref(),
            data: self.data.as_ref(),
            encoding: encoding_for(self.encoding.as_deref(), self.data.as_ref(), text_only),
            extras: self.extras.as_ref(),
            timestamp: self.timestamp,
            action: self.action,
            serial: self.serial.as_deref(),
            version: self.version.as_ref(),
            annotations: self.annotations.as_ref(),
        }
        .serialize(serializer)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PresenceMessageWire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    action: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Data>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extras: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
}

impl Serialize for PresenceMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text_only = serializer.is_human_readable();
        PresenceMessageWire {
            id: self.id.as_deref(),
            action: self.action,
            client_id: self.client_id.as_deref(),
            connection_id: self.connection_id.as_deref(),
            data: self.data.as_ref(),
            encoding: encoding_for(self.encoding.as_deref(), self.data.as_ref(), text_only),
            extras: self.extras.as_ref(),
            timestamp: self.timestamp,
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn binary(encoding: Option<&str>) -> Message {
        Message {
            name: Some("n".into()),
            data: Some(Data::Binary(Bytes::from_static(b"hi!?"))),
            encoding: encoding.map(Into::into),
            ..Default::default()
        }
    }

    /// Binary data in JSON becomes base64, and `base64` is appended to any existing encoding.
    #[test]
    fn binary_in_json_appends_base64() {
        let cases = [
            (None, "base64"),
            (Some(""), "base64"),
            (
                Some("utf-8/cipher+aes-128-cbc"),
                "utf-8/cipher+aes-128-cbc/base64",
            ),
        ];
        for (encoding, expected) in cases {
            let value = serde_json::to_value(binary(encoding)).unwrap();
            assert_eq!(
                value,
                json!({"name":"n","data":"aGkhPw==","encoding":expected})
            );
            assert_eq!(
                serde_json::to_value(to_json_safe(&binary(encoding))).unwrap(),
                value
            );
        }
    }

    /// Non-binary messages keep their encoding untouched in JSON.
    #[test]
    fn text_in_json_is_untouched() {
        let message = Message {
            data: Some(Data::String("{}".into())),
            encoding: Some("json".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"data":"{}","encoding":"json"})
        );
        assert_eq!(to_json_safe(&message), message);
    }

    /// Presence data follows the same base64 rule as messages.
    #[test]
    fn presence_binary_in_json() {
        let presence = PresenceMessage {
            action: 2,
            data: Some(Data::Binary(Bytes::from_static(&[1, 2, 3]))),
            ..Default::default()
        };
        let value = serde_json::to_value(&presence).unwrap();
        assert_eq!(value, json!({"action":2,"data":"AQID","encoding":"base64"}));
    }

    /// A msgpack NaN or infinity as `data` or `extras` (JSON has no form for them) decodes
    /// as absent, as JSON's null does, so the message is relayed as it was decoded
    /// (fuzz finding: it decoded as a present null that re-encoding dropped).
    #[test]
    fn non_finite_data_and_extras_are_absent() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for field in ["data", "extras"] {
                let mut fields = std::collections::BTreeMap::new();
                fields.insert(field, value);
                let bytes = rmp_serde::to_vec_named(&fields).unwrap();
                let message: Message = rmp_serde::from_slice(&bytes).unwrap();
                assert_eq!(message, Message::default(), "{field}: {value}");
                let mut fields = std::collections::BTreeMap::new();
                fields.insert("action", 2.0);
                fields.insert(field, value);
                let bytes = rmp_serde::to_vec_named(&fields).unwrap();
                let presence: PresenceMessage = rmp_serde::from_slice(&bytes).unwrap();
                assert_eq!(presence.data, None, "{field}: {value}");
                assert_eq!(presence.extras, None, "{field}: {value}");
            }
        }
        let nested: Message = rmp_serde::from_slice(
            &rmp_serde::to_vec_named(&json!({"data": {"x": 1}, "extras": {"y": null}})).unwrap(),
        )
        .unwrap();
        assert_eq!(nested.data, Some(Data::Json(json!({"x": 1}))));
        assert_eq!(nested.extras, Some(json!({"y": null})));
    }

    /// A presence message without an action is rejected: the action is the whole point of it.
    #[test]
    fn presence_requires_action() {
        assert!(serde_json::from_str::<PresenceMessage>(r#"{"clientId":"bob"}"#).is_err());
        let presence: PresenceMessage =
            serde_json::from_str(r#"{"action":2,"id":"c:1:0","clientId":"bob","data":"here"}"#)
                .unwrap();
        assert_eq!(presence.id.as_deref(), Some("c:1:0"));
        assert_eq!(presence.data, Some(Data::String("here".into())));
    }
}
