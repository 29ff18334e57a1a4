//! REST handlers: the Ably REST API subset the SDKs use (ably.md §7), plus health and
//! metrics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::Rng;
use serde::Serialize;
use tern_auth::{Operation, TokenRequest};
use tern_core::{ChannelKey, Publisher};
use tern_protocol::{code, ErrorInfo, Format};

use crate::channel_name;
use crate::credentials::{denied, message_client_id, rest_auth};
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::state::EdgeState;

type Params = Query<HashMap<String, String>>;

/// `GET /regions`: the cluster's live nodes by region (one node: just itself).
pub(crate) async fn regions(State(state): State<Arc<EdgeState>>) -> Response {
    let body = match &state.cluster {
        Some(cluster) => cluster.regions(),
        None => serde_json::json!({ "regions": [] }),
    };
    axum::Json(body).into_response()
}

/// `GET /time`: `[ms since epoch]`, no auth.
pub(crate) async fn time(headers: HeaderMap, Query(q): Params) -> Response {
    body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &[now_ms()],
    )
}

/// `GET /health`: liveness for load balancers.
pub(crate) async fn health(State(state): State<Arc<EdgeState>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "serverId": state.config.server_id,
        "connections": state.connection_count(),
        "channels": state.hub.channel_count(),
    }))
    .into_response()
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) async fn metrics(State(state): State<Arc<EdgeState>>) -> Response {
    metrics::gauge!("tern_channels").set(state.hub.channel_count() as f64);
    let text = state
        .metrics_render
        .as_ref()
        .map(|render| render())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError(ErrorInfo::new(code::NOT_FOUND, "no such endpoint"))
}

fn decode_body<T: serde::de::DeserializeOwned>(
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

fn channel_key(app: &str, channel: &str) -> Result<ChannelKey, ErrorInfo> {
    let parsed = channel_name::parse(channel).map_err(|r| ErrorInfo::new(code::BAD_REQUEST, r))?;
    Ok(ChannelKey::new(app, parsed.base))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublishResponse {
    channel: String,
    message_id: String,
    serials: Vec<Option<String>>,
}

/// `POST /channels/{channel}/messages`: one Message or an array.
pub(crate) async fn publish(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let (auth, identity) = rest_auth(&state.keys, &headers, &q, now)?;
    let key = channel_key(&auth.app_id, &channel)?;
    if !auth.capability.allows(&key.name, Operation::Publish) {
        return Err(denied("publish", &key.name).into());
    }
    let mut messages = tern_protocol::decode_messages(request_format(&headers), &bytes)
        .map_err(|e| e.to_error_info())?;
    let size: usize = messages.iter().map(tern_core::event::message_bytes).sum();
    if size > state.config.max_message_size {
        return Err(
            ErrorInfo::new(code::MESSAGE_TOO_LARGE, "maximum message length exceeded").into(),
        );
    }
    for message in &mut messages {
        message.client_id = message_client_id(&identity, message.client_id.as_deref())?;
        message.connection_id = None;
        message.connection_key = None;
    }
    let random: [u8; 9] = rand::rng().random();
    let frame_id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
    let message_id = messages
        .first()
        .and_then(|m| m.id.as_deref())
        .map(|id| id.rsplit_once(':').map_or(id, |(base, _)| base).to_string())
        .unwrap_or_else(|| frame_id.clone());
    let count = messages.len() as u64;
    let publisher = Publisher {
        connection_id: None,
        frame_id,
    };
    let refused_before = state.refused_appends();
    let outcome = state
        .hub
        .publish(&key, &publisher, messages, now)
        .map_err(|e| ErrorInfo::new(code::CHANNEL_OPERATION_FAILED, e.to_string()))?;
    metrics::counter!("tern_messages_published_total").increment(count);
    if state.refused_appends() != refused_before {
        return Err(ErrorInfo::new(code::INTERNAL, "history store overloaded: not stored").into());
    }
    if !state.durable(key.clone()).await {
        return Err(ErrorInfo::new(
            code::TIMEOUT,
            "published, but not confirmed stored on a replica in time",
        )
        .into());
    }
    let response = PublishResponse {
        channel: key.name.to_string(),
        message_id,
        serials: outcome.serials,
    };
    Ok(body(
        StatusCode::CREATED,
        response_format(&headers, q.get("format").map(String::as_str)),
        &response,
    ))
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
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let mut members: Vec<_> = state
        .hub
        .members(&key)
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
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &members,
    ))
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

/// `GET /channels/{channel}`: ChannelDetails with occupancy.
pub(crate) async fn channel_status(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let key = channel_key(&auth.app_id, &channel)?;
    if auth.capability.ops_for(&key.name).is_empty() {
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
