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
use tern_core::{ChannelKey, Publisher};
use tern_protocol::{code, ErrorInfo, Format, Message};

use crate::channel_name;
use crate::credentials::{denied, message_client_id, rest_auth};
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::state::EdgeState;
use crate::stats::{Kind, Transport};

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
    if let Some(error) = state
        .durable(applied.key.clone(), applied.store_mark)
        .await
        .error()
    {
        return Err(error);
    }
    crate::push::delivery::on_published(state, &auth.app_id, &applied.key.name, applied.pushes)
        .await;
    Ok(applied.response)
}

/// A publish applied to the hub, not yet known to be durable.
pub(crate) struct Applied {
    pub(crate) response: PublishResponse,
    pub(crate) key: ChannelKey,
    /// [`EdgeState::store_mark`] taken before the publish was applied: hand it to
    /// [`EdgeState::after_durable`] / [`EdgeState::durable`] before replying.
    pub(crate) store_mark: u64,
    /// Push notifications its messages carry (`extras.push`), to deliver once durable.
    pub(crate) pushes: Vec<serde_json::Value>,
}

/// The checks and the hub publish of a publish without a realtime connection (REST,
/// MQTT): capability, size budget, clientIds, message changes; then applied. The caller
/// replies only once it is durable (`Applied::store_mark`).
///
/// A before-publish function of the channel is called after the checks and before the
/// hub, and its verdict awaited (bounded by its timeout): the caller's request (or
/// MQTT packet) waits, as the publish's answer depends on it.
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
/// (a connection's own channel, `connections`): the size budget, clientIds, the
/// before-publish function, message changes, then the hub.
pub(crate) async fn apply_publish_to(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    key: ChannelKey,
    mut messages: Vec<Message>,
    transport: Transport,
) -> Result<Applied, ErrorInfo> {
    let mut size = crate::budget::check_messages(&messages, &state.config)?;
    for message in &mut messages {
        message.client_id = message_client_id(identity, message.client_id.as_deref())?;
        message.connection_id = on_behalf_of(state, message.connection_key.take())?;
    }
    if let Some(caller) = state
        .hooks
        .as_ref()
        .and_then(|hooks| hooks.before_publish(&auth.app_id, &key.name))
    {
        let verdict = caller.before_publish(&key.name, None, &messages).await;
        let (checked, resized) = crate::hooks::apply_verdict(verdict, messages, &state.config)?;
        messages = checked;
        size = resized.unwrap_or(size);
    }
    let messages = crate::messages::prepare_messages(state, auth, identity, &key, messages)?;
    let pushes = crate::push::delivery::payloads(&messages);
    let message_id = messages
        .first()
        .and_then(|m| m.id.as_deref())
        .map(|id| id.rsplit_once(':').map_or(id, |(base, _)| base).to_string());
    let (serials, frame_id, store_mark) =
        publish_applied(state, auth, &key, messages, size, transport)?;
    Ok(Applied {
        response: PublishResponse {
            channel: key.name.to_string(),
            message_id: message_id.unwrap_or(frame_id),
            serials,
        },
        key,
        store_mark,
        pushes,
    })
}

/// Publishes checked and prepared messages for a REST caller and waits until they
/// are durable; their serials (for a change, its version serial).
pub(crate) async fn publish_prepared(
    state: &EdgeState,
    auth: &AuthContext,
    key: &ChannelKey,
    messages: Vec<Message>,
    size: usize,
) -> Result<Vec<Option<String>>, ErrorInfo> {
    let (serials, _, store_mark) =
        publish_applied(state, auth, key, messages, size, Transport::Rest)?;
    if let Some(error) = state.durable(key.clone(), store_mark).await.error() {
        return Err(error);
    }
    Ok(serials)
}

/// Applies prepared messages to the hub: their serials, the frame id and the store mark
/// to wait on before replying.
fn publish_applied(
    state: &EdgeState,
    auth: &AuthContext,
    key: &ChannelKey,
    messages: Vec<Message>,
    size: usize,
    transport: Transport,
) -> Result<(Vec<Option<String>>, String, u64), ErrorInfo> {
    let now = now_ms();
    let frame_id = crate::messages::random_id();
    let count = messages.len() as u64;
    let publisher = Publisher {
        connection_id: None,
        frame_id: frame_id.clone(),
    };
    let store_mark = state.store_mark();
    let outcome = state
        .hub
        .publish(key, &publisher, messages, now)
        .map_err(|e| ErrorInfo::new(code::CHANNEL_OPERATION_FAILED, e.to_string()))?;
    metrics::counter!("tern_messages_published_total").increment(count);
    if let Some(stats) = state.stats.app(&auth.app_id, now) {
        stats.received(transport, Kind::Messages, count as usize, size);
    }
    Ok((outcome.serials, frame_id, store_mark))
}

/// A REST message carrying a realtime connection's key is published on behalf of that
/// connection (TM2h): it carries the connection's id. A key that names no connection
/// of this node is refused (40006).
fn on_behalf_of(state: &EdgeState, key: Option<String>) -> Result<Option<String>, ErrorInfo> {
    let Some(key) = key else {
        return Ok(None);
    };
    match state.registry().connection_id(&key) {
        Some(id) => Ok(Some(id.to_string())),
        None => Err(ErrorInfo::new(
            code::INVALID_PUBLISH_CONNECTION_KEY,
            "connectionKey names no connection of this node",
        )),
    }
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
