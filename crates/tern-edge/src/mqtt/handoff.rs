//! A persistent session moves to the node its client reconnects to. A CONNECT with
//! `clean_session = 0` that finds no session parked here asks every other live node
//! (`GET /mqtt/sessions/{clientId}` on their client port, with the connecting client's
//! own credential); a node that has one parked, or a live connection for it (which it
//! supersedes first, so it parks), hands it over and forgets it. The subscriptions'
//! cursors mean the same on every node, so the new node resumes each channel with
//! exactly what was published meanwhile, as it does for a local session.
//!
//! The credential decides, as for a local take-over: any credential of the session's
//! app may take it (and then gets only what its capability allows, `connection`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rumqttc::mqttbytes::v4::Login;
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tern_core::Cursor;
use tern_protocol::{code, ErrorInfo, Format};

use super::connection::take_over;
use super::session::Unacked;
use super::sessions::{Parked, ParkedSubscription};
use crate::credentials::rest_auth;
use crate::now_ms;
use crate::response::error_response;
use crate::state::EdgeState;

/// `GET /mqtt/sessions/{clientId}`: hands this node's session of `clientId` (in the
/// credential's app) to the asking node: 200 with the session, 404 when there is none.
pub(crate) async fn give(
    State(state): State<Arc<EdgeState>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let (auth, _) = match rest_auth(&state.keys, &headers, &query, now_ms()) {
        Ok(auth) => auth,
        Err(err) => return error_response(err),
    };
    let none = || error_response(ErrorInfo::new(code::NOT_FOUND, "no such MQTT session"));
    let Some(sessions) = state.mqtt_sessions.get() else {
        return none();
    };
    let key = (auth.app_id.clone(), client_id);
    // Number 0 is no connection's: any live one of this client id is superseded.
    take_over(sessions, &key, 0).await;
    let parked = sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(&key, now_ms());
    match parked {
        Some(parked) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            encode(&parked).to_string(),
        )
            .into_response(),
        None => none(),
    }
}

/// Asks every other live node for the session of `client_id`, with the connecting
/// client's credential; the first that has one hands it over.
pub(super) async fn fetch(state: &EdgeState, login: &Login, client_id: &str) -> Option<Parked> {
    let cluster = state.cluster.as_ref()?;
    let credential = if login.password.is_empty() {
        format!("Bearer {}", STANDARD.encode(&login.username))
    } else {
        let key = format!("{}:{}", login.username, login.password);
        format!("Basic {}", STANDARD.encode(key))
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&credential).ok()?,
    );
    let path = format!(
        "/mqtt/sessions/{}",
        utf8_percent_encode(client_id, NON_ALPHANUMERIC)
    );
    let asks = cluster.peer_urls().into_iter().map(|url| {
        let (headers, path) = (headers.clone(), path.clone());
        async move { crate::forward::get_from_home(&url, &path, &headers).await }
    });
    let answers = futures_util::future::join_all(asks).await;
    answers
        .into_iter()
        .filter_map(Result::ok)
        .find(|(status, _)| *status == StatusCode::OK)
        .and_then(|(_, body)| decode(&body))
}

fn qos_number(qos: QoS) -> u8 {
    qos as u8
}

fn qos_of(number: &Value) -> Option<QoS> {
    match number.as_u64()? {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        _ => None,
    }
}

fn encode(parked: &Parked) -> Value {
    let subscriptions: Vec<Value> = parked
        .subscriptions
        .iter()
        .map(|s| {
            json!({"channel": &*s.channel, "qos": qos_number(s.qos), "cursor": s.cursor.encode()})
        })
        .collect();
    let unacked: Vec<Value> = parked
        .unacked
        .iter()
        .map(|(id, m)| json!({"id": id, "topic": m.topic, "payload": STANDARD.encode(&m.payload)}))
        .collect();
    let unsent: Vec<Value> = parked
        .unsent
        .iter()
        .map(|(topic, qos, payload)| {
            json!({"topic": &**topic, "qos": qos_number(*qos), "payload": STANDARD.encode(payload)})
        })
        .collect();
    json!({"subscriptions": subscriptions, "unacked": unacked, "unsent": unsent})
}

/// A session as a peer sent it; `None` if any part is not what [`encode`] writes.
fn decode(body: &[u8]) -> Option<Parked> {
    let value: Value = tern_protocol::decode_value(Format::Json, body).ok()?;
    let text = |v: &Value, field: &str| v.get(field)?.as_str().map(str::to_string);
    let payload = |v: &Value| STANDARD.decode(text(v, "payload")?).ok().map(Bytes::from);
    let subscriptions = value
        .get("subscriptions")?
        .as_array()?
        .iter()
        .map(|s| {
            Some(ParkedSubscription {
                channel: text(s, "channel")?.into(),
                qos: qos_of(s.get("qos")?)?,
                cursor: Cursor::decode(&text(s, "cursor")?)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let unacked = value
        .get("unacked")?
        .as_array()?
        .iter()
        .map(|m| {
            let id = u16::try_from(m.get("id")?.as_u64()?)
                .ok()
                .filter(|id| *id > 0)?;
            let topic = text(m, "topic")?;
            Some((
                id,
                Unacked {
                    topic,
                    payload: payload(m)?,
                },
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    let unsent = value
        .get("unsent")?
        .as_array()?
        .iter()
        .map(|m| {
            Some((
                text(m, "topic")?.into(),
                qos_of(m.get("qos")?)?,
                payload(m)?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Parked {
        subscriptions,
        unacked,
        unsent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::OriginId;

    /// A session survives its hand-off form; anything else is refused, not guessed.
    #[test]
    fn session_round_trip() {
        let mut cursor = Cursor::new();
        cursor.advance(OriginId(0xab), 7);
        let parked = Parked {
            subscriptions: vec![ParkedSubscription {
                channel: "a:b/c".into(),
                qos: QoS::AtLeastOnce,
                cursor,
            }],
            unacked: vec![(
                9,
                Unacked {
                    topic: "a:b/c".into(),
                    payload: Bytes::from_static(b"\x00\xff"),
                },
            )],
            unsent: vec![("x".into(), QoS::AtMostOnce, Bytes::from_static(b"y"))],
        };
        let bytes = encode(&parked).to_string();
        assert_eq!(decode(bytes.as_bytes()), Some(parked));
        for bad in [
            "{}",
            "[]",
            r#"{"subscriptions":[{"channel":"a","qos":2,"cursor":"v1.1-1"}],"unacked":[],"unsent":[]}"#,
            r#"{"subscriptions":[],"unacked":[{"id":0,"topic":"t","payload":""}],"unsent":[]}"#,
            r#"{"subscriptions":[],"unacked":[],"unsent":[{"topic":"t","qos":0,"payload":"!"}]}"#,
        ] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad}");
        }
    }
}
