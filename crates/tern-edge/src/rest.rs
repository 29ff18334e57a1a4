//! REST handlers: the Ably REST API subset the SDKs use (ably.md §7), plus health and
//! metrics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tern_auth::{AuthContext, ClientIdentity, Operation, TokenRequest};
use tern_core::ChannelKey;
use tern_protocol::{code, ErrorInfo, Format, Message};

use crate::channel_name;
use crate::credentials::{denied, rest_auth};
use crate::now_ms;
use crate::publish::{request_publisher, Applied, By, Checked, Counted, Source};
use crate::response::{body, request_format, response_format, ApiError};
use crate::state::EdgeState;
use crate::stats::Transport;

type Params = Query<HashMap<String, String>>;

/// `GET /time`: `[ms since epoch]`, no auth.
pub(crate) async fn time(headers: HeaderMap, Query(q): Params) -> Response {
    body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &[now_ms()],
    )
}

/// `GET /health`: for load balancers (also served on the admin port).
pub(crate) async fn health(State(state): State<Arc<EdgeState>>) -> Response {
    let (healthy, body) = state.health_report();
    let status = match healthy {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError(ErrorInfo::new(code::NOT_FOUND, "no such endpoint"))
}

pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(
    format: Format,
    bytes: &[u8],
) -> Result<T, ErrorInfo> {
    // The frame decoder's bounds: rmp_serde's own depth cap (1,024) overflows a worker's
    // stack in a debug build.
    tern_protocol::decode_value(format, bytes)
        .map_err(|e| ErrorInfo::new(code::BAD_REQUEST, format!("invalid request body: {e}")))
}

/// `POST /keys/{keyName}/requestToken`: exchanges a signed TokenRequest for a token.
pub(crate) async fn request_token(
    State(state): State<Arc<EdgeState>>,
    Path(key_name): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    // A token request for a key of this node counts in its app's statistics.
    if let Some(key) = state.keys.get(&key_name) {
        crate::stats::note_request(&key.app_id, crate::stats::Request::Token);
    }
    let request: TokenRequest = decode_body(request_format(&headers), &bytes)?;
    let details = {
        let mut nonces = state.nonces.lock().unwrap_or_else(|p| p.into_inner());
        state
            .keys
            .request_token(
                &key_name,
                &request,
                now_ms(),
                &mut nonces,
                &state.config.token_policy,
            )
            .map_err(crate::credentials::auth_error)?
    };
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &details,
    ))
}

pub(crate) fn channel_key(app: &str, channel: &str) -> Result<ChannelKey, ErrorInfo> {
    let parsed = channel_name::parse(channel).map_err(channel_name::invalid)?;
    // Derived (filtered) channels exist only as realtime attachments.
    if parsed.filter.is_some() {
        return Err(crate::session::read_only(channel));
    }
    Ok(ChannelKey::new(app, parsed.base))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PublishResponse {
    pub(crate) channel: String,
    pub(crate) message_id: String,
    pub(crate) serials: Vec<Option<String>>,
}

/// `POST /channels/{channel}/messages`: one Message or an array.
pub(crate) async fn publish(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (auth, identity) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let messages = messages_of(&state, &headers, &q, bytes)?;
    let response = publish_messages(&state, &auth, &identity, &channel, messages).await?;
    Ok(body(
        StatusCode::CREATED,
        response_format(&headers, q.get("format").map(String::as_str)),
        &response,
    ))
}

/// The messages a publish request's body carries: a Message or an array in the
/// request's format, or with `?enveloped=false` the whole body as one message's data
/// (`inbound`, Ably's unenveloped publish, which inbound webhooks use).
pub(crate) fn messages_of(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    bytes: Bytes,
) -> Result<Vec<Message>, ErrorInfo> {
    if q.get("enveloped").is_some_and(|v| v == "false") {
        let max = state.config.max_message_size;
        return crate::inbound::message(headers, q, bytes, max).map(|message| vec![message]);
    }
    tern_protocol::decode_messages(request_format(headers), &bytes).map_err(|e| e.to_error_info())
}

/// Publishes `messages` on `channel` for a REST caller and waits until they are durable
/// (stored, and on replicas in a cluster): what one `POST /channels/{channel}/messages`
/// does, and each channel of a batch publish.
pub(crate) async fn publish_messages(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    channel: &str,
    messages: Vec<Message>,
) -> Result<PublishResponse, ErrorInfo> {
    let applied = apply_publish(state, auth, identity, channel, messages, Transport::Rest).await?;
    finish_publish(state, auth, applied).await
}

/// Waits until an applied REST publish is durable, then hands its push payloads over:
/// its answer, or the error to send instead of a 201.
pub(crate) async fn finish_publish(
    state: &EdgeState,
    auth: &AuthContext,
    applied: Applied,
) -> Result<PublishResponse, ErrorInfo> {
    applied.durable(state).await?;
    crate::push::delivery::on_published(state, &auth.app_id, &applied.key.name, applied.pushes)
        .await;
    Ok(PublishResponse {
        channel: applied.key.name.to_string(),
        message_id: applied.message_id,
        serials: applied.serials,
    })
}

/// A publish without a realtime connection (REST, MQTT) through the publish path
/// (`publish.rs`): capability, then the checks, the channel's before-publish function
/// (awaited: the request or MQTT packet waits, as its answer depends on it), the hub.
/// The caller answers only once it is durable (`Applied::store_mark`).
pub(crate) async fn apply_publish(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    channel: &str,
    messages: Vec<Message>,
    transport: Transport,
) -> Result<Applied, ErrorInfo> {
    let key = channel_key(&auth.app_id, channel)?;
    if !auth.capability.allows(&key.name, Operation::Publish) {
        return Err(denied("publish", &key.name));
    }
    apply_publish_to(state, auth, identity, key, messages, transport).await
}

/// [`apply_publish`] on a channel the caller has already been allowed to publish on
/// (a connection's own channel, `connections`): the publish path's checks, the
/// before-publish function, message changes, then the hub.
pub(crate) async fn apply_publish_to(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    key: ChannelKey,
    messages: Vec<Message>,
    transport: Transport,
) -> Result<Applied, ErrorInfo> {
    let by = By::new(state, auth, identity);
    Checked::new(state, key, messages)?
        .stamp(identity, Source::Request(state))?
        .call_function(state, auth)
        .await?
        .apply(&by, request_publisher(), transport, Counted::InApp)
}

/// `GET /channels/{channel}/presence`: current members.
pub(crate) async fn presence(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let key = channel_key(&auth.app_id, &channel)?;
    if !auth.capability.allows(&key.name, Operation::Subscribe) {
        return Err(denied("presence get", &key.name).into());
    }
    let members = members_of(&state, &key, &q);
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &members,
    ))
}

/// The channel's current members as `GET …/presence` lists them: filtered by the
/// `clientId` / `connectionId` params, ordered, at most `limit` (default 100, ≤ 1000).
pub(crate) fn members_of(
    state: &EdgeState,
    key: &ChannelKey,
    q: &HashMap<String, String>,
) -> Vec<tern_protocol::PresenceMessage> {
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let mut members: Vec<_> = state
        .hub
        .members(key)
        .into_iter()
        .filter(|m| {
            q.get("clientId")
                .is_none_or(|c| m.client_id.as_ref() == Some(c))
        })
        .filter(|m| {
            q.get("connectionId")
                .is_none_or(|c| m.connection_id.as_ref() == Some(c))
        })
        .collect();
    members.sort_by(|a, b| (&a.client_id, &a.connection_id).cmp(&(&b.client_id, &b.connection_id)));
    members.truncate(limit);
    members
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Occupancy {
    connections: usize,
    publishers: usize,
    subscribers: usize,
    presence_connections: usize,
    presence_members: usize,
    presence_subscribers: usize,
}

/// `GET /channels/{channel}`: ChannelDetails with occupancy. Needs the
/// `channel-metadata` operation on the channel, as Ably does (`*` grants it).
pub(crate) async fn channel_status(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let key = channel_key(&auth.app_id, &channel)?;
    if !auth
        .capability
        .allows(&key.name, Operation::ChannelMetadata)
    {
        return Err(denied("channel-metadata", &key.name).into());
    }
    let status = state.hub.status(&key).unwrap_or_default();
    let occupancy = Occupancy {
        connections: status.connections,
        publishers: status.publishers,
        subscribers: status.subscribers,
        presence_connections: status.presence_connections,
        presence_members: status.presence_members,
        presence_subscribers: status.presence_subscribers,
    };
    let details = serde_json::json!({
        "channelId": key.name.as_ref(),
        "status": {
            "isActive": status.connections > 0 || status.presence_members > 0,
            "occupancy": { "metrics": occupancy },
        },
    });
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &details,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token request body nested 1,000 deep (msgpack) is refused with 40000 on a
    /// 2 MiB stack, tokio's worker default, instead of overflowing it and aborting the
    /// server (fuzz finding: the body was read with rmp_serde's own depth cap of 1,024).
    #[test]
    fn deep_token_request_body_is_refused_within_a_worker_stack() {
        let mut body = vec![0x81, 0xa1, b'x'];
        body.extend(std::iter::repeat_n(0x91, 1_000));
        body.push(0xc0);
        let decoded = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || decode_body::<TokenRequest>(Format::Msgpack, &body).map(|_| ()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(decoded.unwrap_err().code, code::BAD_REQUEST);
    }
}
