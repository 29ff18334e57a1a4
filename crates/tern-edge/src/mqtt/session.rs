//! The rules of an MQTT connection, without I/O: who may connect (and which CONNACK
//! code a refusal gets), what a PUBLISH becomes as an Ably message and what an Ably
//! message becomes as a PUBLISH payload, and the window of QoS 1 messages sent to a
//! subscriber and not yet acknowledged.

use std::collections::BTreeMap;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use rumqttc::mqttbytes::{Protocol, QoS};
use tern_auth::{AuthContext, AuthError, ClientIdentity, KeyRing};
use tern_protocol::{Data, Message};

use crate::credentials::resolve_identity;

/// Checks a CONNECT and its credentials. The user name is a key name (`appId.keyId`)
/// with the key's secret as password, or a token (Tern token or JWT) with no password.
/// Refusals are MQTT's: 1 for another protocol level, 2 for an empty client id that
/// asks for a persistent session, 4 for credentials that are malformed or wrong, 5 for
/// none at all or an expired token.
pub(crate) fn authenticate(
    keys: &KeyRing,
    connect: &Connect,
    now_ms: i64,
) -> Result<(AuthContext, ClientIdentity), ConnectReturnCode> {
    if connect.protocol != Protocol::V4 {
        return Err(ConnectReturnCode::RefusedProtocolVersion);
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        return Err(ConnectReturnCode::BadClientId);
    }
    let Some(login) = &connect.login else {
        return Err(ConnectReturnCode::NotAuthorized);
    };
    let verified = if login.password.is_empty() {
        keys.authenticate_token(&login.username, now_ms)
    } else {
        keys.authenticate_key(&format!("{}:{}", login.username, login.password))
    };
    let ctx = verified.map_err(|err| match err {
        AuthError::TokenExpired => ConnectReturnCode::NotAuthorized,
        _ => ConnectReturnCode::BadUserNamePassword,
    })?;
    // The MQTT client identifier is not an Ably clientId (clients often make one up):
    // messages carry the credential's clientId, if it has one.
    let identity = resolve_identity(&ctx, None).map_err(|_| ConnectReturnCode::NotAuthorized)?;
    Ok((ctx, identity))
}

/// The Ably message a PUBLISH (or a last will) becomes: its payload as binary data,
/// byte for byte. MQTT payloads are opaque bytes; guessing text from valid UTF-8 would
/// turn a binary payload that happens to decode into a string for some messages and not
/// others. Ably subscribers get the bytes (ably-js: a `Buffer` / `ArrayBuffer`).
pub(crate) fn message_of(payload: Bytes) -> Message {
    Message {
        data: (!payload.is_empty()).then_some(Data::Binary(payload)),
        ..Default::default()
    }
}

/// The payload an Ably message goes out with to MQTT subscribers: its data as plain
/// bytes (`tern_core::event::payload_bytes`: string as UTF-8, binary as is, JSON as its
/// text, base64 undone). A delivery takes it from the event (`ChannelEvent::payloads`),
/// built once for every subscriber.
pub(crate) fn payload_of(message: &Message) -> Bytes {
    tern_core::event::payload_bytes(message)
}

/// The QoS a subscription is granted: at most 1 (QoS 2 is not offered).
pub(crate) fn granted(requested: QoS) -> QoS {
    match requested {
        QoS::AtMostOnce => QoS::AtMostOnce,
        QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
    }
}

/// How fast a connection's packets are taken: at most `publishes_max` PUBLISHes and
/// `others_max` other packets per second (the edge's `inbound_frames_per_second` and
/// `control_frames_per_second`). MQTT 3.1.1 cannot refuse a packet, so past either
/// bound the connection's socket is not read until the second is over: TCP slows the
/// sender, and nothing it sent is dropped.
#[derive(Debug)]
pub(crate) struct Rate {
    publishes_max: u32,
    others_max: u32,
    window_start_ms: i64,
    publishes: u32,
    others: u32,
}

/// Length of a [`Rate`] window.
const RATE_WINDOW_MS: i64 = 1_000;

impl Rate {
    pub(crate) fn new(publishes_max: u32, others_max: u32) -> Rate {
        Rate {
            publishes_max: publishes_max.max(1),
            others_max: others_max.max(1),
            window_start_ms: i64::MIN,
            publishes: 0,
            others: 0,
        }
    }

    /// Counts one packet taken at `now_ms`.
    pub(crate) fn count(&mut self, publish: bool, now_ms: i64) {
        if now_ms.saturating_sub(self.window_start_ms) >= RATE_WINDOW_MS {
            self.window_start_ms = now_ms;
            self.publishes = 0;
            self.others = 0;
        }
        if publish {
            self.publishes += 1;
        } else {
            self.others += 1;
        }
    }

    /// `None` while the socket may be read; otherwise when it may be again.
    pub(crate) fn paused_until(&self, now_ms: i64) -> Option<i64> {
        let window_end = self.window_start_ms.saturating_add(RATE_WINDOW_MS);
        let spent = self.publishes >= self.publishes_max || self.others >= self.others_max;
        (spent && now_ms < window_end).then_some(window_end)
    }
}

/// One QoS 1 message sent to the subscriber and not yet acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unacked {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
}

/// QoS 1 messages sent and not yet acknowledged, by packet id: at most `max`, ids
/// 1..=65535 handed out in turn, skipping ids still in use.
#[derive(Debug)]
pub(crate) struct Inflight {
    max: usize,
    next: u16,
    /// By packet id: the order it was sent in, and the message.
    sent: BTreeMap<u16, (u64, Unacked)>,
    sends: u64,
}

impl Inflight {
    pub(crate) fn new(max: usize) -> Inflight {
        Inflight {
            // More than 65,535 ids cannot be in flight at once.
            max: max.clamp(1, usize::from(u16::MAX)),
            next: 1,
            sent: BTreeMap::new(),
            sends: 0,
        }
    }

    /// Whether another message may be sent now.
    pub(crate) fn has_room(&self) -> bool {
        self.sent.len() < self.max
    }

    /// Records `message` as sent and returns its packet id; `None` when the window is
    /// full.
    pub(crate) fn send(&mut self, message: Unacked) -> Option<u16> {
        if !self.has_room() {
            return None;
        }
        while self.sent.contains_key(&self.next) {
            self.advance();
        }
        let id = self.next;
        self.advance();
        self.restore(id, message);
        Some(id)
    }

    /// Records `message` as sent under packet id `id`: a parked session's message sent
    /// again with its original id.
    pub(crate) fn restore(&mut self, id: u16, message: Unacked) {
        self.sends += 1;
        self.sent.insert(id, (self.sends, message));
    }

    /// What is unacknowledged, oldest first (for a persistent session to park).
    pub(crate) fn unacked(&self) -> Vec<(u16, Unacked)> {
        let mut sent: Vec<_> = self.sent.iter().collect();
        sent.sort_by_key(|(_, (order, _))| *order);
        sent.into_iter()
            .map(|(id, (_, message))| (*id, message.clone()))
            .collect()
    }

    fn advance(&mut self) {
        self.next = if self.next == u16::MAX {
            1
        } else {
            self.next + 1
        };
    }

    /// A PUBACK: the message is delivered. `false` for an id not in flight (ignored).
    pub(crate) fn ack(&mut self, id: u16) -> bool {
        self.sent.remove(&id).is_some()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Login;
    use tern_auth::{ApiKey, Capability};

    fn keys() -> KeyRing {
        KeyRing::new(vec![ApiKey {
            app_id: "app".into(),
            key_id: "k".into(),
            secret: "secret".into(),
            capability: Capability::all(),
        }])
    }

    fn connect(login: Option<(&str, &str)>) -> Connect {
        let mut connect = Connect::new("device-1");
        if let Some((user, password)) = login {
            connect.login = Some(Login::new(user, password));
        }
        connect
    }

    /// Key name and secret as user name and password connect; wrong or missing
    /// credentials, another protocol level and an empty id without a clean session get
    /// their CONNACK codes.
    #[test]
    fn connect_codes() {
        let keys = keys();
        let code = |c: &Connect| authenticate(&keys, c, 0).map(|(ctx, _)| ctx.app_id);
        assert_eq!(code(&connect(Some(("app.k", "secret")))), Ok("app".into()));
        assert_eq!(
            code(&connect(Some(("app.k", "wrong")))),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(
            code(&connect(Some(("app.nokey", "secret")))),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(
            code(&connect(Some(("not-a-token", "")))),
            Err(ConnectReturnCode::BadUserNamePassword)
        );
        assert_eq!(code(&connect(None)), Err(ConnectReturnCode::NotAuthorized));
        let mut v5 = connect(Some(("app.k", "secret")));
        v5.protocol = Protocol::V5;
        assert_eq!(code(&v5), Err(ConnectReturnCode::RefusedProtocolVersion));
        let mut anonymous = connect(Some(("app.k", "secret")));
        anonymous.client_id.clear();
        assert!(code(&anonymous).is_ok(), "an empty id with a clean session");
        anonymous.clean_session = false;
        assert_eq!(code(&anonymous), Err(ConnectReturnCode::BadClientId));
    }

    /// A token as user name with an empty password connects; an expired one is "not
    /// authorized".
    #[test]
    fn token_as_user_name() {
        let keys = keys();
        let now_s = 1_700_000_000;
        let now = now_s * 1_000;
        let key = keys.get("app.k").unwrap().clone();
        let token =
            tern_auth::sign_jwt(&key, &serde_json::json!({"iat": now_s, "exp": now_s + 60}));
        let ok = authenticate(&keys, &connect(Some((&token, ""))), now);
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            authenticate(&keys, &connect(Some((&token, ""))), now + 120_000).map(|_| ()),
            Err(ConnectReturnCode::NotAuthorized)
        );
    }

    /// A payload reaches Ably as the same bytes, and each kind of Ably data reaches MQTT
    /// as the bytes a subscriber expects.
    #[test]
    fn payload_mapping() {
        let bytes = Bytes::from_static(b"\x00\xffhello");
        let message = message_of(bytes.clone());
        assert_eq!(message.data, Some(Data::Binary(bytes.clone())));
        assert_eq!(payload_of(&message), bytes);
        assert_eq!(message_of(Bytes::new()).data, None);
        let with = |data: Data, encoding: Option<&str>| Message {
            data: Some(data),
            encoding: encoding.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(
            payload_of(&with(Data::String("héllo".into()), None)),
            "héllo".as_bytes()
        );
        assert_eq!(
            payload_of(&with(Data::String("AP9h".into()), Some("base64"))),
            &b"\x00\xffa"[..]
        );
        assert_eq!(
            payload_of(&with(
                Data::String("eyJhIjoxfQ==".into()),
                Some("json/base64")
            )),
            &b"{\"a\":1}"[..]
        );
        assert_eq!(
            payload_of(&with(Data::String("{\"a\":1}".into()), Some("json"))),
            &b"{\"a\":1}"[..]
        );
        assert_eq!(
            payload_of(&with(Data::Json(serde_json::json!({"a": [1]})), None)),
            &b"{\"a\":[1]}"[..]
        );
        assert_eq!(payload_of(&Message::default()), Bytes::new());
    }

    /// Past either bound the socket pauses until the window ends; a new window starts
    /// afresh, and publishes and other packets are counted apart.
    #[test]
    fn rate_pauses_reading_until_the_second_is_over() {
        let mut rate = Rate::new(2, 3);
        assert_eq!(rate.paused_until(0), None);
        rate.count(true, 1_000);
        rate.count(false, 1_100);
        assert_eq!(rate.paused_until(1_100), None);
        rate.count(true, 1_200);
        assert_eq!(rate.paused_until(1_200), Some(2_000));
        assert_eq!(rate.paused_until(2_000), None, "the window is over");
        rate.count(true, 2_000);
        assert_eq!(rate.paused_until(2_000), None, "a new window");
        for _ in 0..3 {
            rate.count(false, 2_500);
        }
        assert_eq!(rate.paused_until(2_500), Some(3_000));
    }

    /// Packet ids are handed out in turn, never one still in flight, wrap past 65,535
    /// to 1 (never 0), and the window holds at most `max`.
    #[test]
    fn inflight_window() {
        let unacked = || Unacked {
            topic: "t".into(),
            payload: Bytes::new(),
        };
        let mut window = Inflight::new(2);
        assert_eq!(window.send(unacked()), Some(1));
        assert_eq!(window.send(unacked()), Some(2));
        assert_eq!(window.send(unacked()), None, "full");
        assert!(!window.ack(7));
        assert!(window.ack(1));
        assert_eq!(window.send(unacked()), Some(3));
        let mut window = Inflight::new(3);
        window.next = u16::MAX;
        assert_eq!(window.send(unacked()), Some(u16::MAX));
        assert_eq!(window.send(unacked()), Some(1), "wraps to 1, never 0");
        window.next = u16::MAX;
        window.ack(u16::MAX);
        assert_eq!(window.send(unacked()), Some(u16::MAX));
        assert_eq!(window.len(), 2);
        let mut window = Inflight::new(3);
        window.send(unacked());
        window.send(unacked());
        window.ack(1);
        window.next = 1;
        window.send(unacked());
        assert_eq!(window.send(unacked()), Some(3), "skips ids still in flight");
        let ids: Vec<u16> = window.unacked().iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [2, 1, 3], "oldest first, not by id");
    }
}
