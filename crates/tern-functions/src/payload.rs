//! What a function receives: Ably's webhook payloads (batched, single enveloped, single
//! non-enveloped) and their signature, built from outbox entries. No I/O.
//!
//! The shapes follow Ably's "Outbound webhooks overview": a receiver written against it
//! parses these requests unchanged and verifies `X-Ably-Signature` = base64 of
//! HMAC-SHA256(raw body, the signing key's secret), with `X-Ably-Key` naming the key.

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tern_protocol::{Message, PresenceMessage};

use crate::rule::{RuleConfig, Source};

/// Ably's webhook format version, sent as `x-ably-version`.
pub const WEBHOOK_VERSION: &str = "1.2";

/// One event waiting in a rule's outbox: one message or one presence message, already
/// in Ably's JSON form. Stored as JSON (the outbox row's payload).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub source: String,
    pub app: String,
    pub channel: String,
    /// When the event was accepted (ms since the epoch).
    pub timestamp: i64,
    /// The stable id a function de-duplicates on: the message's serial
    /// (`<origin>-<seq>:<index>`, unique per message in the cluster) or the presence
    /// message's id. A re-delivered event carries the same one.
    pub serial: String,
    /// The message or presence message as Ably's JSON (binary data base64-encoded).
    pub item: Value,
}

impl Entry {
    pub fn message(app: &str, channel: &str, message: &Message, fallback_serial: String) -> Entry {
        Entry {
            source: Source::Message.as_str().into(),
            app: app.into(),
            channel: channel.into(),
            timestamp: message.timestamp.unwrap_or(0),
            serial: message.serial.clone().unwrap_or(fallback_serial),
            item: serde_json::to_value(message).unwrap_or(Value::Null),
        }
    }

    pub fn presence(
        app: &str,
        channel: &str,
        presence: &PresenceMessage,
        fallback_serial: String,
    ) -> Entry {
        Entry {
            source: Source::Presence.as_str().into(),
            app: app.into(),
            channel: channel.into(),
            timestamp: presence.timestamp.unwrap_or(0),
            serial: presence.id.clone().unwrap_or(fallback_serial),
            item: serde_json::to_value(presence).unwrap_or(Value::Null),
        }
    }

    /// A `channel.lifecycle` / `channel.occupancy` item: named after the event
    /// (`channel.opened`, `channel.closed`, `[meta]occupancy`), its data Ably's
    /// `ChannelDetails` (see [`crate::lifecycle`]); `None` for other sources.
    fn channel_details_item(&self, rule: &RuleConfig) -> Option<Value> {
        let meta = [Source::Lifecycle.as_str(), Source::Occupancy.as_str()];
        if !meta.contains(&self.source.as_str()) {
            return None;
        }
        let mut data = self.item.get("data").cloned().unwrap_or(Value::Null);
        if let Value::Object(map) = &mut data {
            map.insert("site".into(), Value::String(rule.site.clone()));
        }
        Some(json!({
            "webhookId": rule.id,
            "source": self.source,
            "serial": self.serial,
            "timestamp": self.timestamp,
            "name": self.item.get("name").cloned().unwrap_or(Value::Null),
            "data": data,
        }))
    }

    /// A connection that ended (`connection.disconnected`): `item` is the event's
    /// fields; its stable id is the connection id, which ends once.
    pub fn disconnected(app: &str, connection_id: &str, timestamp: i64, item: Value) -> Entry {
        Entry {
            source: Source::Disconnect.as_str().into(),
            app: app.into(),
            channel: String::new(),
            timestamp,
            serial: format!("{connection_id}:disconnected"),
            item,
        }
    }

    fn is_connection(&self) -> bool {
        self.source == Source::Disconnect.as_str()
    }

    /// `item` with the site added: the `data` of a connection event.
    fn connection_data(&self, rule: &RuleConfig) -> Value {
        let mut data = self.item.clone();
        if let Value::Object(fields) = &mut data {
            fields.insert("site".into(), json!(rule.site));
        }
        data
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// `None` for bytes this crate did not write (never a panic).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        serde_json::from_slice(bytes).ok()
    }

    fn is_presence(&self) -> bool {
        self.source == Source::Presence.as_str()
    }

    /// The array field Ably names after the event type.
    fn array_field(&self) -> &'static str {
        if self.is_presence() {
            "presence"
        } else {
            "messages"
        }
    }

    /// One element of a batched request's `items`.
    fn batched_item(&self, rule: &RuleConfig) -> Value {
        if let Some(item) = self.channel_details_item(rule) {
            return item;
        }
        if self.is_connection() {
            return json!({
                "webhookId": rule.id,
                "source": self.source,
                "serial": self.serial,
                "timestamp": self.timestamp,
                "name": self.source,
                "data": self.connection_data(rule),
            });
        }
        let name = if self.is_presence() {
            "presence.message"
        } else {
            "channel.message"
        };
        json!({
            "webhookId": rule.id,
            "source": self.source,
            "serial": self.serial,
            "timestamp": self.timestamp,
            "name": name,
            "data": {
                "channelId": self.channel,
                "site": rule.site,
                self.array_field(): [self.item],
            },
        })
    }
}

/// One HTTP request to a function: body and headers (method POST, the rule's URL).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
}

/// A batched request: `{"items": [...]}`, always enveloped.
pub fn batched(rule: &RuleConfig, entries: &[Entry]) -> Request {
    let items: Vec<Value> = entries.iter().map(|e| e.batched_item(rule)).collect();
    let body = Bytes::from(serde_json::to_vec(&json!({ "items": items })).unwrap_or_default());
    finish(rule, body, "application/json", Vec::new())
}

/// A single request: the enveloped form (`{source, appId, channel, site, ruleId,
/// messages|presence}`) or, if the rule is not enveloped, the event's data as the body
/// with `x-ably-envelope-*` and `x-ably-message-*` headers.
pub fn single(rule: &RuleConfig, entry: &Entry) -> Request {
    if entry.is_connection() {
        return connection_single(rule, entry);
    }
    if !rule.enveloped {
        return non_enveloped(rule, entry);
    }
    let mut envelope = json!({
        "source": entry.source,
        "appId": entry.app,
        "channel": entry.channel,
        "site": rule.site,
        "ruleId": rule.id,
    });
    envelope[entry.array_field()] = json!([entry.item]);
    let body = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
    finish(rule, body, "application/json", Vec::new())
}

/// A connection event alone: enveloped `{source, appId, site, ruleId, serial,
/// timestamp, connection}`, or the event's fields as the body with
/// `x-ably-envelope-*` headers.
fn connection_single(rule: &RuleConfig, entry: &Entry) -> Request {
    if !rule.enveloped {
        let body = Bytes::from(serde_json::to_vec(&entry.item).unwrap_or_default());
        let headers = vec![
            ("x-ably-envelope-appid".into(), entry.app.clone()),
            ("x-ably-envelope-rule-id".into(), rule.id.clone()),
            ("x-ably-envelope-site".into(), rule.site.clone()),
            ("x-ably-envelope-source".into(), entry.source.clone()),
            ("x-ably-message-id".into(), entry.serial.clone()),
        ];
        return finish(rule, body, "application/json", headers);
    }
    let envelope = json!({
        "source": entry.source,
        "appId": entry.app,
        "site": rule.site,
        "ruleId": rule.id,
        "serial": entry.serial,
        "timestamp": entry.timestamp,
        "connection": entry.item,
    });
    let body = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
    finish(rule, body, "application/json", Vec::new())
}

fn non_enveloped(rule: &RuleConfig, entry: &Entry) -> Request {
    let text = |field: &str| entry.item.get(field).and_then(Value::as_str);
    let (body, content_type, encoding) = raw_data(entry.item.get("data"), text("encoding"));
    let mut headers = vec![
        ("x-ably-envelope-appid".into(), entry.app.clone()),
        ("x-ably-envelope-channel".into(), entry.channel.clone()),
        ("x-ably-envelope-rule-id".into(), rule.id.clone()),
        ("x-ably-envelope-site".into(), rule.site.clone()),
        ("x-ably-envelope-source".into(), entry.source.clone()),
        (
            "x-ably-message-id".into(),
            text("id").unwrap_or(&entry.serial).into(),
        ),
        (
            "x-ably-message-timestamp".into(),
            entry.timestamp.to_string(),
        ),
    ];
    let optional = [
        ("x-ably-message-client-id", text("clientId")),
        ("x-ably-message-connection-id", text("connectionId")),
        ("x-ably-message-encoding", encoding.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            headers.push((name.into(), value.into()));
        }
    }
    if entry.is_presence() {
        let action = entry
            .item
            .get("action")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        // Ably's header table names the action x-ably-message-name, its example
        // x-ably-message-action: both are sent.
        let action = presence_action_name(action);
        headers.push(("x-ably-message-name".into(), action.into()));
        headers.push(("x-ably-message-action".into(), action.into()));
    } else if let Some(name) = text("name") {
        headers.push(("x-ably-message-name".into(), name.into()));
    }
    // Header values must be visible ASCII; one that is not (a clientId in another
    // script) is left out rather than failing the whole request.
    headers.retain(|(_, value)| hyper::header::HeaderValue::from_str(value).is_ok());
    finish(rule, body, content_type, headers)
}

/// The message data as a body: JSON stays JSON, base64 becomes bytes, text stays text;
/// an encoding left over (a cipher, say) is passed on in `x-ably-message-encoding`.
fn raw_data(data: Option<&Value>, encoding: Option<&str>) -> (Bytes, &'static str, Option<String>) {
    let engine = base64::engine::general_purpose::STANDARD;
    match (data, encoding) {
        (None | Some(Value::Null), _) => (Bytes::new(), "text/plain", None),
        (Some(Value::String(s)), None | Some("utf-8")) => {
            (Bytes::from(s.clone()), "text/plain", None)
        }
        (Some(Value::String(s)), Some("json")) => {
            (Bytes::from(s.clone()), "application/json", None)
        }
        (Some(Value::String(s)), Some("base64")) => match engine.decode(s) {
            Ok(bytes) => (Bytes::from(bytes), "application/octet-stream", None),
            Err(_) => (Bytes::from(s.clone()), "text/plain", Some("base64".into())),
        },
        (Some(Value::String(s)), Some(other)) => {
            (Bytes::from(s.clone()), "text/plain", Some(other.into()))
        }
        (Some(value), _) => (
            Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            "application/json",
            None,
        ),
    }
}

fn presence_action_name(action: u64) -> &'static str {
    match action {
        0 => "absent",
        1 => "present",
        2 => "enter",
        3 => "leave",
        _ => "update",
    }
}

/// Content type, version, the rule's extra headers, then the signature (last, over the
/// final body).
fn finish(
    rule: &RuleConfig,
    body: Bytes,
    content_type: &str,
    mut headers: Vec<(String, String)>,
) -> Request {
    headers.insert(0, ("content-type".into(), content_type.into()));
    headers.insert(1, ("x-ably-version".into(), WEBHOOK_VERSION.into()));
    headers.extend(rule.headers.iter().cloned());
    if let Some(key) = &rule.signing_key {
        headers.push(("x-ably-key".into(), key.name.clone()));
        headers.push(("x-ably-signature".into(), signature(&key.secret, &body)));
    }
    Request { body, headers }
}

/// base64(HMAC-SHA256(body, secret)), what Ably's docs tell a receiver to compute.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 takes a key of any length");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::config;
    use crate::rule::{Mode, SigningKey};
    use tern_protocol::Data;

    fn message(id: &str, data: Data, encoding: Option<&str>) -> Message {
        Message {
            id: Some(id.into()),
            client_id: Some("user-3".into()),
            connection_id: Some("conn1".into()),
            name: Some("greeting".into()),
            data: Some(data),
            encoding: encoding.map(str::to_string),
            timestamp: Some(1_700_000_000_123),
            serial: Some("ab-3:0".into()),
            ..Message::default()
        }
    }

    fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
        request
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A batched request has exactly the shape of Ably's documented example, and its
    /// signature verifies the way Ably tells receivers to verify it.
    #[test]
    fn batched_matches_ablys_example_and_verifies() {
        let mut rule = config("rule1");
        rule.signing_key = Some(SigningKey {
            name: "app.root".into(),
            secret: "s3cret".into(),
        });
        rule.headers = vec![("x-custom".into(), "yes".into())];
        let entry = Entry::message(
            "app",
            "chat-channel-4",
            &message("conn1:1:0", Data::String("the message data".into()), None),
            String::new(),
        );
        let request = batched(&rule, &[entry]);
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let expected = json!({"items": [{
            "webhookId": "rule1",
            "source": "channel.message",
            "serial": "ab-3:0",
            "timestamp": 1_700_000_000_123i64,
            "name": "channel.message",
            "data": {
                "channelId": "chat-channel-4",
                "site": "tern",
                "messages": [{
                    "id": "conn1:1:0",
                    "clientId": "user-3",
                    "connectionId": "conn1",
                    "timestamp": 1_700_000_000_123i64,
                    "data": "the message data",
                    "name": "greeting",
                    "serial": "ab-3:0",
                }],
            },
        }]});
        assert_eq!(body, expected);
        assert_eq!(header(&request, "content-type"), Some("application/json"));
        assert_eq!(header(&request, "x-ably-version"), Some("1.2"));
        assert_eq!(header(&request, "x-custom"), Some("yes"));
        assert_eq!(header(&request, "x-ably-key"), Some("app.root"));
        // Recomputed independently of `signature`, with the hmac crate directly.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(&request.body);
        let mac = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(header(&request, "x-ably-signature"), Some(mac.as_str()));
    }

    /// A presence event is named `presence.message` and carries a `presence` array.
    #[test]
    fn batched_presence_item() {
        let presence = PresenceMessage {
            id: Some("conn1:2:0".into()),
            action: 2,
            client_id: Some("bob".into()),
            connection_id: Some("conn1".into()),
            timestamp: Some(5),
            ..PresenceMessage::default()
        };
        let entry = Entry::presence("app", "room", &presence, String::new());
        let body: Value = serde_json::from_slice(&batched(&config("r"), &[entry]).body).unwrap();
        let item = &body["items"][0];
        assert_eq!(item["name"], "presence.message");
        assert_eq!(item["source"], "channel.presence");
        assert_eq!(item["serial"], "conn1:2:0");
        assert_eq!(item["data"]["presence"][0]["action"], 2);
        assert_eq!(item["data"]["presence"][0]["clientId"], "bob");
    }

    /// Single enveloped: Ably's envelope with `appId`, `channel`, `ruleId`.
    #[test]
    fn single_enveloped_shape() {
        let mut rule = config("r9");
        rule.mode = Mode::Single;
        let entry = Entry::message(
            "app",
            "ch",
            &message("m:0", Data::String("x".into()), None),
            String::new(),
        );
        let body: Value = serde_json::from_slice(&single(&rule, &entry).body).unwrap();
        assert_eq!(body["source"], "channel.message");
        assert_eq!(body["appId"], "app");
        assert_eq!(body["channel"], "ch");
        assert_eq!(body["ruleId"], "r9");
        assert_eq!(body["site"], "tern");
        assert_eq!(body["messages"][0]["id"], "m:0");
    }

    /// Non-enveloped: the data is the body (JSON as JSON, base64 as bytes), the rest
    /// travels in Ably's `x-ably-*` headers.
    #[test]
    fn non_enveloped_body_is_the_data() {
        let mut rule = config("r");
        rule.mode = Mode::Single;
        rule.enveloped = false;
        let json_message = message("m:0", Data::String("{\"a\":1}".into()), Some("json"));
        let request = single(
            &rule,
            &Entry::message("app", "ch", &json_message, String::new()),
        );
        assert_eq!(&request.body[..], b"{\"a\":1}");
        assert_eq!(header(&request, "content-type"), Some("application/json"));
        assert_eq!(header(&request, "x-ably-message-name"), Some("greeting"));
        assert_eq!(header(&request, "x-ably-message-id"), Some("m:0"));
        assert_eq!(header(&request, "x-ably-envelope-channel"), Some("ch"));
        assert_eq!(
            header(&request, "x-ably-envelope-source"),
            Some("channel.message")
        );
        assert_eq!(header(&request, "x-ably-message-client-id"), Some("user-3"));
        let binary = message("m:1", Data::Binary(Bytes::from_static(&[0, 1, 255])), None);
        let request = single(&rule, &Entry::message("app", "ch", &binary, String::new()));
        assert_eq!(&request.body[..], &[0, 1, 255]);
        assert_eq!(
            header(&request, "content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(header(&request, "x-ably-message-encoding"), None);
    }

    /// Non-enveloped presence: the member's data is the body, the action a header.
    #[test]
    fn non_enveloped_presence() {
        let mut rule = config("r");
        rule.mode = Mode::Single;
        rule.enveloped = false;
        rule.sources = vec![Source::Presence];
        let presence = PresenceMessage {
            id: Some("c:1:0".into()),
            action: 2,
            client_id: Some("bob".into()),
            data: Some(Data::String("some data".into())),
            timestamp: Some(5),
            ..PresenceMessage::default()
        };
        let request = single(
            &rule,
            &Entry::presence("app", "ch", &presence, String::new()),
        );
        assert_eq!(&request.body[..], b"some data");
        assert_eq!(header(&request, "x-ably-message-action"), Some("enter"));
        assert_eq!(header(&request, "x-ably-message-name"), Some("enter"));
        assert_eq!(
            header(&request, "x-ably-envelope-source"),
            Some("channel.presence")
        );
        assert_eq!(header(&request, "x-ably-message-id"), Some("c:1:0"));
    }

    /// An outbox row round-trips, and foreign bytes decode to `None`.
    #[test]
    fn entry_round_trip() {
        let entry = Entry::message(
            "app",
            "ch",
            &message("m:0", Data::String("x".into()), None),
            String::new(),
        );
        assert_eq!(Entry::decode(&entry.encode()), Some(entry));
        assert_eq!(Entry::decode(b"\x93\x01"), None);
    }
}
