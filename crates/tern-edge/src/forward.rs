//! REST reads of a channel (history, presence, status) on a node that does not keep the
//! channel are answered by the channel's home in this region, which stores all of it:
//! the request goes there unchanged (same path, query and credentials) and its answer
//! comes back as it is. A forwarded request carries `x-tern-forwarded` and is always
//! served where it lands, so a request is forwarded at most once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use tern_core::ChannelKey;
use tern_protocol::{code, ErrorInfo};

use crate::credentials::rest_auth;
use crate::now_ms;
use crate::response::error_response;
use crate::state::EdgeState;

/// Marks a request one node forwarded to another.
pub(crate) const FORWARDED: &str = "x-tern-forwarded";
/// How long the home has to answer a read, connection included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a node makes a write wait for its replicas before it answers (the
/// cluster's `REPLICA_ACK_TIMEOUT`; `tern-server` checks the two agree).
pub const DURABLE_WITHIN: Duration = Duration::from_secs(10);
/// What a forwarded write (a push to a connection, its DELETE) allows the holder beyond
/// its own deadlines, for the hop and a loaded machine.
const WRITE_SLACK: Duration = Duration::from_secs(5);
/// Largest answer passed back.
const FORWARD_BODY_MAX: usize = 16 << 20;

/// Middleware on the channel read routes: forwards to the channel's home when this node
/// is not it; otherwise (or when the request cannot be authenticated, which the handler
/// then reports) serves it here.
pub(crate) async fn to_home(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    match home_url(&state, &request) {
        Some(url) => forward(&url, request, FORWARD_TIMEOUT).await,
        None => next.run(request).await,
    }
}

/// The base URL of the node to forward `request` to, if any.
fn home_url(state: &EdgeState, request: &Request) -> Option<String> {
    let cluster = state.cluster.as_ref()?;
    if request.method() != Method::GET || request.headers().contains_key(FORWARDED) {
        return None;
    }
    let encoded = request
        .uri()
        .path()
        .strip_prefix("/channels/")?
        .split('/')
        .next()?;
    let channel = percent_decode_str(encoded).decode_utf8().ok()?;
    let query: Query<HashMap<String, String>> = Query::try_from_uri(request.uri()).ok()?;
    let (auth, _) = rest_auth(&state.keys, request.headers(), &query, now_ms()).ok()?;
    let base = crate::channel_name::parse(&channel).ok()?.base;
    cluster.home_url(&ChannelKey::new(&auth.app_id, base))
}

/// How long a node forwarding `method` waits for the other node's answer. A write is
/// given the holder's whole decision time (its before-publish function, then its
/// replicas) and some: a shorter wait would answer 504 for a write the holder then
/// ACKs, and a caller retrying that would publish it twice.
pub(crate) fn answer_within(state: &EdgeState, method: &Method) -> Duration {
    if method == Method::GET || method == Method::HEAD {
        return FORWARD_TIMEOUT;
    }
    let hooks = state
        .hooks
        .as_ref()
        .map_or(Duration::ZERO, |h| h.longest_timeout());
    hooks + DURABLE_WITHIN + WRITE_SLACK
}

/// Sends `request` to the node at `base` and passes its answer back; a node that does
/// not answer in `within` is a 504 (50003).
pub(crate) async fn forward(base: &str, request: Request, within: Duration) -> Response {
    let reason = match tokio::time::timeout(within, send(base, request)).await {
        Ok(Ok(response)) => return response,
        Ok(Err(reason)) => reason,
        Err(_) => "timed out".to_string(),
    };
    tracing::warn!(home = %base, %reason, "forwarding a channel read to its home failed");
    metrics::counter!("tern_forward_failures_total").increment(1);
    error_response(ErrorInfo::with_status(
        code::TIMEOUT,
        504,
        format!("the node that keeps this channel did not answer ({reason})"),
    ))
}

/// A GET of `path_and_query` at the channel's home `base`, with the caller's
/// credentials (`headers`), for a read that serves several channels at once (batch
/// presence). Bounded like a forwarded request; `Err` names why it failed.
pub(crate) async fn get_from_home(
    base: &str,
    path_and_query: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(axum::http::StatusCode, Bytes), String> {
    let empty = Bytes::new();
    call(
        base,
        Method::GET,
        path_and_query,
        headers.clone(),
        empty,
        FORWARD_TIMEOUT,
    )
    .await
}

/// A POST of `body` to `path` at another node `base`, with `headers` (credentials,
/// content type): for work only that node can do (push delivery at the push home).
/// Bounded like a forwarded request; `Err` names why it failed.
pub(crate) async fn post_to(
    base: &str,
    path: &str,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<axum::http::StatusCode, String> {
    let (status, _) = call(base, Method::POST, path, headers, body, FORWARD_TIMEOUT).await?;
    Ok(status)
}

/// A request of `method` to `path` at another node `base`, with `headers` and `body`,
/// within `timeout`: its status and body (read up to `FORWARD_BODY_MAX`). Every
/// node-to-node HTTP call goes through here; the cross-node connection handover
/// (`connections::handover`) passes a shorter timeout, as it must not hold a connect up.
pub(crate) async fn call(
    base: &str,
    method: Method,
    path: &str,
    headers: axum::http::HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<(axum::http::StatusCode, Bytes), String> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body))
        .map_err(|e| e.to_string())?;
    *request.headers_mut() = headers;
    let response = tokio::time::timeout(timeout, send(base, request))
        .await
        .map_err(|_| "timed out".to_string())??;
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), FORWARD_BODY_MAX)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// One HTTP/1.1 request to `base` (`http://host:port`) over a fresh connection.
async fn send(base: &str, request: Request) -> Result<Response, String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("cannot forward to {base}: plain http only"))?
        .trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // The body goes along (push writes are forwarded too); the router's body limit
    // already bounded it.
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, FORWARD_BODY_MAX)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut outbound = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(path)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    for (name, value) in &parts.headers {
        let hop = [
            header::HOST,
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ];
        if !hop.contains(name) {
            outbound.headers_mut().append(name, value.clone());
        }
    }
    let headers = outbound.headers_mut();
    headers.insert(
        header::HOST,
        HeaderValue::from_str(authority).map_err(|e| e.to_string())?,
    );
    headers.insert(FORWARDED, HeaderValue::from_static("1"));
    let answer = sender
        .send_request(outbound)
        .await
        .map_err(|e| e.to_string())?;
    let (mut parts, body) = answer.into_parts();
    let body = Limited::new(body, FORWARD_BODY_MAX)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    // The body is passed back whole: how the home framed it does not apply here.
    for hop in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
    ] {
        parts.headers.remove(hop);
    }
    Ok((parts.status, parts.headers, Body::from(body)).into_response())
}
