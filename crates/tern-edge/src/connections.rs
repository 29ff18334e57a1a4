//! Per-connection push, API Gateway's `@connections`: a backend sends a message to one
//! realtime connection by its id, reads a connection's state, or closes it, through
//! REST calls made to any node of the cluster.
//!
//! - `POST /connections/{connectionId}/messages` (a message or an array, as a channel
//!   publish; `?enveloped=false` takes any body as one message, as `rest::publish`)
//!   publishes on the connection's own channel `[connection]<connectionId>`, which only
//!   that connection may attach (subscribe only; nobody may publish there except through
//!   this endpoint, or read it over REST, SSE or MQTT). The SDK side is one line:
//!   `realtime.channels.get('[connection]' + realtime.connection.id).subscribe(…)`.
//! - `GET /connections/{connectionId}`: `connected` (a transport holds it) or
//!   `disconnected` (parked for a resume until `parkedUntil`), clientId, transport,
//!   node, region, connectedAt.
//! - `DELETE /connections/{connectionId}`: closes it for good: a live connection gets a
//!   connection ERROR 80017 (ably-js goes FAILED and does not reconnect), a parked one
//!   is forgotten (a later resume gets a new connection, 80008) and its presence
//!   members leave now. 204.
//!
//! # Where a connection is
//! A connection id is `<node tag>-<random>`: the tag names the node that issued it and
//! holds its registry entry (live, parked, or `moved` after a resume on another node,
//! which gets a new id there: see `handover`) for its whole life. So the request is
//! routed by the id alone, with no lookup table to keep in step: a node that is not the holder forwards it, unchanged, to the
//! holder's client URL (`forward::forward`, at most once); a tag no live member has
//! means the node is gone and its connections with it (404/80022). Publishing at the
//! holder makes it the events' origin, so a live connection there gets the message from
//! the hub's fan-out with no cluster hop, and the channel's replication and log give it
//! everything the resume path needs.
//!
//! # What 201 means
//! The message is in the connection's channel, committed to the holder's store (and on
//! `ack_replicas`), exactly like a channel publish: delivered now to the attachment if
//! the connection is attached, and to its resume otherwise (ably-js re-attaches with its
//! channelSerial and gets exactly the events after it from the channel log). A message
//! for a connection that never attaches its channel is kept in the channel's history
//! only.
//!
//! # Who may call
//! A key or token whose capability grants `publish` on `[connection]<connectionId>`
//! (patterns `[connection]*` or `[*]*`) or on every channel (`*`), of the connection's
//! app. A connection of another app is 404, as if unknown.

pub(crate) mod handover;
pub(crate) mod keys;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use tern_auth::{AuthContext, Capability, Operation};
use tern_core::{ChannelKey, Lookup};
use tern_protocol::{code, flags, ErrorInfo};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::credentials::{denied, rest_auth};
use crate::forward::FORWARDED;
use crate::now_ms;
use crate::response::{body, error_response, response_format, ApiError};
use crate::state::EdgeState;
use crate::stats::Transport;

/// The qualifier of a connection's own channel: `[connection]<connectionId>`.
pub(crate) const CHANNEL_PREFIX: &str = "[connection]";

/// Length of the random part of a connection id (`session` issues them).
pub(crate) const ID_RANDOM_LEN: usize = 12;
/// Longest node tag accepted in an id (this node's is 6).
const TAG_LEN_MAX: usize = 64;

/// The node tag of a well-formed connection id `<tag>-<12 alphanumerics>`; `None` for
/// anything no Tern node issues.
pub(crate) fn node_tag_of(id: &str) -> Option<&str> {
    let (tag, random) = id.split_once('-')?;
    let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    (!tag.is_empty()
        && tag.len() <= TAG_LEN_MAX
        && alnum(tag)
        && random.len() == ID_RANDOM_LEN
        && alnum(random))
    .then_some(tag)
}

/// The connection whose own channel `name` is (`[connection]<id>`, `id` well formed).
pub(crate) fn owner_of(name: &str) -> Option<&str> {
    let id = name.strip_prefix(CHANNEL_PREFIX)?;
    node_tag_of(id).map(|_| id)
}

/// The channel of connection `id`.
pub(crate) fn channel_of(id: &str) -> String {
    format!("{CHANNEL_PREFIX}{id}")
}

/// The modes connection `connection_id` may attach `channel` with: a connection's own
/// channel is subscribe-only and its owner's alone (whatever the capability says), the
/// owner being the connection or its successor after a cross-node resume
/// (`predecessors`, see `handover`); any other channel follows the capability.
pub(crate) fn granted_modes(
    capability: &Capability,
    connection_id: &str,
    predecessors: &[Arc<str>],
    channel: &str,
) -> u64 {
    match owner_of(channel) {
        Some(owner) if owner == connection_id || predecessors.iter().any(|p| &**p == owner) => {
            flags::SUBSCRIBE
        }
        Some(_) => 0,
        None => crate::credentials::granted_modes(capability, channel),
    }
}

/// What a connection is, for `GET /connections/{id}`; kept with its live handle and
/// in its parked state.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) app_id: String,
    /// The clientId it acts as, if it has one.
    pub(crate) client_id: Option<String>,
    /// `web_socket` or `comet` (ably-js's names).
    pub(crate) transport: &'static str,
    /// When the connection was first opened (a resume keeps it).
    pub(crate) connected_at_ms: i64,
    /// Ids it took over from other nodes (`handover`), whose channels it owns too.
    pub(crate) predecessors: Vec<Arc<str>>,
}

/// A live session's handle in the registry: how others reach it.
pub(crate) struct LiveConnection {
    /// Woken when a resume on another transport takes this connection over, or by
    /// `DELETE /connections/{id}` (the session ends the connection for good); `why`
    /// says which. One `Notify` for both: every idle session waits on it, and each
    /// wait is a `Notified` in its future.
    woken: Notify,
    why: AtomicU8,
    pub(crate) info: ConnectionInfo,
}

/// Why a live connection's session was woken (see [`LiveConnection::woken`]).
pub(crate) enum Woken {
    /// A resume on another transport took the connection over.
    Superseded,
    /// `DELETE /connections/{id}` closed it.
    Closed,
}

const SUPERSEDED: u8 = 1;
const CLOSED: u8 = 2;

impl LiveConnection {
    pub(crate) fn new(info: ConnectionInfo) -> Arc<Self> {
        Arc::new(LiveConnection {
            woken: Notify::new(),
            why: AtomicU8::new(0),
            info,
        })
    }

    /// A resume on another transport takes this connection over. `notify_one` keeps
    /// the wake-up if the session is between polls.
    pub(crate) fn supersede(&self) {
        self.why.fetch_or(SUPERSEDED, Ordering::Release);
        self.woken.notify_one();
    }

    /// `DELETE /connections/{id}`: the session ends the connection for good.
    pub(crate) fn close(&self) {
        self.why.fetch_or(CLOSED, Ordering::Release);
        self.woken.notify_one();
    }

    /// Completes once the connection is superseded or closed (then [`Self::why`] says
    /// which). Cancel-safe.
    pub(crate) fn woken(&self) -> Notified<'_> {
        self.woken.notified()
    }

    /// Why the session was woken: closed, if it was both.
    pub(crate) fn why(&self) -> Woken {
        if self.why.load(Ordering::Acquire) & CLOSED != 0 {
            Woken::Closed
        } else {
            Woken::Superseded
        }
    }
}

/// The connection ERROR a client gets when `DELETE /connections/{id}` closes it.
pub(crate) fn closed_by_request() -> ErrorInfo {
    ErrorInfo::new(
        code::CONNECTION_CLOSED,
        "connection closed by DELETE /connections/{connectionId}",
    )
}

fn not_found(id: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::CONNECTION_NOT_FOUND,
        format!("connection {id} not found (closed, expired, or its node is gone)"),
    )
}

fn malformed(id: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::INVALID_CONNECTION_KEY,
        format!("{id:?} is not a connection id"),
    )
}

/// Where a `/connections/{id}` request is served.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Here: this node issued the id, the request was already forwarded once, or the
    /// id is malformed (the handler reports it).
    Here,
    /// At the node that issued the id (its client URL).
    Forward(String),
    /// Nowhere: the node that issued it is not a live member.
    Gone,
}

/// Decides where a request for connection `id` goes: `holder` finds a live member's
/// client URL by node tag.
pub(crate) fn route(
    id: &str,
    my_tag: &str,
    forwarded: bool,
    holder: impl FnOnce(&str) -> Option<String>,
) -> Route {
    match node_tag_of(id) {
        None => Route::Here,
        Some(tag) if tag == my_tag || forwarded => Route::Here,
        Some(tag) => holder(tag).map_or(Route::Gone, Route::Forward),
    }
}

/// Middleware on the `/connections/{id}` routes: forwards the request to the node that
/// holds the connection, or answers 404 when that node is gone.
pub(crate) async fn to_holder(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(id) = path_id(&request) else {
        return next.run(request).await;
    };
    let forwarded = request.headers().contains_key(FORWARDED);
    let cluster = state.cluster.clone();
    let decision = route(&id, &state.node_tag, forwarded, |tag| {
        cluster?.node_by_tag(tag).map(|node| node.client_url)
    });
    match decision {
        Route::Here => next.run(request).await,
        Route::Forward(url) => {
            let within = crate::forward::answer_within(&state, request.method());
            crate::forward::forward(&url, request, within).await
        }
        Route::Gone => {
            // Credentials first: an unauthenticated caller learns nothing of the id.
            let query: Query<HashMap<String, String>> =
                Query::try_from_uri(request.uri()).unwrap_or(Query(HashMap::new()));
            match rest_auth(&state.keys, request.headers(), &query, now_ms()) {
                Ok(_) => error_response(not_found(&id)),
                Err(error) => error_response(error),
            }
        }
    }
}

/// The decoded `{id}` of `/connections/{id}[/…]`.
fn path_id(request: &Request) -> Option<String> {
    let encoded = request
        .uri()
        .path()
        .strip_prefix("/connections/")?
        .split('/')
        .next()?;
    Some(percent_decode_str(encoded).decode_utf8().ok()?.into_owned())
}

/// The caller may act on connection `id`: see the module doc.
fn check_allowed(auth: &AuthContext, id: &str) -> Result<(), ErrorInfo> {
    let channel = channel_of(id);
    let capability = &auth.capability;
    if capability.allows(&channel, Operation::Publish) || capability.allows("*", Operation::Publish)
    {
        Ok(())
    } else {
        Err(denied("publish", &channel))
    }
}

/// Authenticates a `/connections/{id}` request and checks the id and the capability.
fn authorize(
    state: &EdgeState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    id: &str,
) -> Result<(AuthContext, tern_auth::ClientIdentity), ErrorInfo> {
    let (auth, identity) = rest_auth(&state.keys, headers, query, now_ms())?;
    if node_tag_of(id).is_none() {
        return Err(malformed(id));
    }
    check_allowed(&auth, id)?;
    Ok((auth, identity))
}

/// `GET /connections/{id}`'s answer.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ConnectionDetails {
    connection_id: String,
    /// `connected` or `disconnected` (parked: its transport is gone, a resume may take it).
    state: &'static str,
    client_id: Option<String>,
    transport: &'static str,
    /// The node (`server_id`) and region holding it.
    node_id: String,
    region: Option<String>,
    connected_at: i64,
    /// Parked only: when its state expires (`connectionStateTtl` after the drop).
    #[serde(skip_serializing_if = "Option::is_none")]
    parked_until: Option<i64>,
    /// Ids it took over by resuming on this node from another (`handover`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    resumed_from: Vec<String>,
}

/// What this node holds of connection `id`.
enum Held {
    /// Live or parked here, for `GET`.
    Here(ConnectionDetails),
    /// Resumed on another node as this id (`handover`).
    Moved(Arc<str>),
}

/// What this node holds of connection `id` for app `app_id`: `None` when it holds
/// nothing of that app.
fn held(state: &EdgeState, app_id: &str, id: &str) -> Option<Held> {
    let registry = state.registry();
    let (info, state_name, parked_until) = match registry.lookup(id, now_ms())? {
        Lookup::Live(live) => (live.info.clone(), "connected", None),
        Lookup::Parked { state, deadline_ms } => {
            (state.info.clone(), "disconnected", Some(deadline_ms))
        }
        Lookup::Moved { to, app, .. } => {
            return (&**app == app_id).then(|| Held::Moved(to.clone()));
        }
    };
    drop(registry);
    if info.app_id != app_id {
        return None;
    }
    let me = state
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.node_by_tag(&state.node_tag));
    Some(Held::Here(ConnectionDetails {
        connection_id: id.to_string(),
        state: state_name,
        client_id: info.client_id,
        transport: info.transport,
        node_id: state.config.server_id.clone(),
        region: me.map(|node| node.region),
        connected_at: info.connected_at_ms,
        parked_until,
        resumed_from: info.predecessors.iter().map(|p| p.to_string()).collect(),
    }))
}

/// `GET /connections/{id}`.
pub(crate) async fn get(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (auth, _) = authorize(&state, &headers, &q, &id)?;
    let format = response_format(&headers, q.get("format").map(String::as_str));
    match held(&state, &auth.app_id, &id).ok_or_else(|| not_found(&id))? {
        Held::Here(details) => Ok(body(StatusCode::OK, format, &details)),
        Held::Moved(to) => Ok(body(
            StatusCode::OK,
            format,
            &serde_json::json!({ "connectionId": id, "state": "moved", "movedTo": &*to }),
        )),
    }
}

/// `DELETE /connections/{id}`: see the module doc.
pub(crate) async fn delete(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (auth, _) = authorize(&state, &headers, &q, &id)?;
    /// What the registry said, acted on once its lock is released.
    enum Found {
        Closing,
        Parked(Box<crate::resume::ParkedSession>),
        Moved(Arc<str>),
    }
    let found = {
        let mut registry = state.registry();
        let found = match registry.lookup(&id, now_ms()) {
            Some(Lookup::Moved { to, app, .. }) if **app == *auth.app_id => {
                Found::Moved(to.clone())
            }
            Some(Lookup::Live(live)) if live.info.app_id == auth.app_id => {
                // `notify_one` keeps the wake-up if the session is between polls. The
                // session ends as on CLOSE (members leave, `connection.disconnected`).
                live.close();
                Found::Closing
            }
            Some(Lookup::Parked { state, .. }) if state.info.app_id == auth.app_id => {
                match registry.discard_parked(&id) {
                    Some(parked) => Found::Parked(Box::new(parked)),
                    None => return Err(not_found(&id).into()),
                }
            }
            _ => return Err(not_found(&id).into()),
        };
        found
    };
    match found {
        Found::Closing => {}
        Found::Parked(parked) => ended_here(&state, &id, &parked, crate::hooks::EndReason::Closed),
        Found::Moved(to) => return Ok(delete_moved(&state, &to, headers).await),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A parked connection of this node ended other than by expiry (`DELETE`, or handed
/// over to another node): its members leave now rather than after the grace period,
/// and it is reported ended like any connection (`connection.disconnected`, and the
/// record that keeps survivors from reporting it if this node dies).
pub(crate) fn ended_here(
    state: &EdgeState,
    id: &str,
    parked: &crate::resume::ParkedSession,
    reason: crate::hooks::EndReason,
) {
    let now = now_ms();
    let app_id = &parked.info.app_id;
    if matches!(reason, crate::hooks::EndReason::Closed) {
        let channels: Vec<Arc<str>> = parked.presence_channels.iter().cloned().collect();
        state.hub.connection_closed(app_id, id, &channels, now);
    }
    if state.departures.tracks(app_id) {
        let ended = [crate::departures::Record::Ended { id: id.to_string() }];
        crate::departures::publish(&state.hub, app_id, &ended);
    }
    crate::hooks::record_disconnect(
        state,
        crate::hooks::Ended {
            app_id,
            connection_id: id,
            client_id: parked.info.client_id.as_deref(),
            transport: parked.info.transport,
            connected_at_ms: parked.info.connected_at_ms,
            reason,
        },
        now,
    );
}

/// Whether the node that issued connection id `id` is this one or a live member.
fn is_live_node_of(state: &EdgeState, id: &str) -> bool {
    node_tag_of(id).is_some_and(|tag| {
        tag == state.node_tag
            || state
                .cluster
                .as_ref()
                .is_some_and(|cluster| cluster.node_by_tag(tag).is_some())
    })
}

/// `DELETE` of a connection that moved to `to` on another node: closes `to` there, with
/// the caller's credentials.
async fn delete_moved(state: &EdgeState, to: &str, headers: HeaderMap) -> Response {
    let holder = node_tag_of(to).and_then(|tag| state.cluster.as_ref()?.node_by_tag(tag));
    let Some(node) = holder else {
        return error_response(not_found(to));
    };
    let mut request = Request::new(axum::body::Body::empty());
    *request.method_mut() = axum::http::Method::DELETE;
    *request.uri_mut() = match format!("/connections/{to}").parse() {
        Ok(uri) => uri,
        Err(_) => return error_response(malformed(to)),
    };
    *request.headers_mut() = headers;
    let within = crate::forward::answer_within(state, request.method());
    crate::forward::forward(&node.client_url, request, within).await
}

/// `POST /connections/{id}/messages`: see the module doc.
pub(crate) async fn publish(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (auth, identity) = authorize(&state, &headers, &q, &id)?;
    let messages = crate::rest::messages_of(&state, &headers, &q, bytes)?;
    match held(&state, &auth.app_id, &id) {
        None => return Err(not_found(&id).into()),
        Some(Held::Here(_)) => {}
        // Its successor owns this channel too and re-attached it, as long as the
        // successor's node lives: with that node gone, so is the connection.
        Some(Held::Moved(to)) => {
            if !is_live_node_of(&state, &to) {
                return Err(not_found(&id).into());
            }
        }
    }
    let key = ChannelKey::new(&auth.app_id, &channel_of(&id));
    let applied =
        crate::rest::apply_publish_to(&state, &auth, &identity, key, messages, Transport::Rest)
            .await?;
    let response = crate::rest::finish_publish(&state, &auth, applied).await?;
    Ok(body(
        StatusCode::CREATED,
        response_format(&headers, q.get("format").map(String::as_str)),
        &response,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only ids of the shape a node issues have a node tag; anything else is refused
    /// before routing or lookup.
    #[test]
    fn node_tags_of_ids() {
        assert_eq!(node_tag_of("abc123-ABCDEFGHIJ12"), Some("abc123"));
        for bad in [
            "",
            "abc123",
            "-ABCDEFGHIJ12",
            "abc123-ABCDEFGHIJ1",
            "abc123-ABCDEFGHIJ123",
            "abc 12-ABCDEFGHIJ12",
            "abc123-ABCDEFGHIJ1!",
            "ab/c-ABCDEFGHIJ12",
            &format!("{}-ABCDEFGHIJ12", "a".repeat(65)),
        ] {
            assert_eq!(node_tag_of(bad), None, "{bad:?}");
        }
    }

    /// A connection's own channel names its owner; other names (and a malformed id)
    /// name nobody.
    #[test]
    fn owners_of_channels() {
        assert_eq!(
            owner_of("[connection]abc123-ABCDEFGHIJ12"),
            Some("abc123-ABCDEFGHIJ12")
        );
        assert_eq!(
            channel_of("abc123-ABCDEFGHIJ12"),
            "[connection]abc123-ABCDEFGHIJ12"
        );
        for other in [
            "abc123-ABCDEFGHIJ12",
            "[connection]",
            "[connection]nope",
            "[?rewind=1][connection]abc123-ABCDEFGHIJ12",
            "[connection]abc123-ABCDEFGHIJ12x",
        ] {
            assert_eq!(owner_of(other), None, "{other:?}");
        }
    }

    /// Only the owner may attach its channel, subscribe only, whatever its capability
    /// grants; other channels follow the capability.
    #[test]
    fn only_the_owner_attaches_its_channel() {
        let everything = Capability::parse(r#"{"*":["*"],"[*]*":["*"]}"#).unwrap();
        let own = "[connection]abc123-ABCDEFGHIJ12";
        assert_eq!(
            granted_modes(&everything, "abc123-ABCDEFGHIJ12", &[], own),
            flags::SUBSCRIBE
        );
        assert_eq!(
            granted_modes(&everything, "abc123-OTHERxxxxxx1", &[], own),
            0
        );
        assert_eq!(
            granted_modes(&everything, "abc123-ABCDEFGHIJ12", &[], "chat"),
            crate::credentials::granted_modes(&everything, "chat")
        );
        // Its successor on another node owns it too.
        let successor = ["abc123-ABCDEFGHIJ12".into()];
        assert_eq!(
            granted_modes(&everything, "def456-ABCDEFGHIJ12", &successor, own),
            flags::SUBSCRIBE
        );
    }

    /// Requests are served where the id was issued: here for this node's ids (and for
    /// anything already forwarded, or malformed); forwarded to a live holder; gone when
    /// the holder is not a member.
    #[test]
    fn routes_by_node_tag() {
        let url = |tag: &str| (tag == "peer01").then(|| "http://peer".to_string());
        assert_eq!(
            route("me0001-ABCDEFGHIJ12", "me0001", false, url),
            Route::Here
        );
        assert_eq!(
            route("peer01-ABCDEFGHIJ12", "me0001", false, url),
            Route::Forward("http://peer".into())
        );
        assert_eq!(
            route("peer01-ABCDEFGHIJ12", "me0001", true, url),
            Route::Here
        );
        assert_eq!(
            route("dead01-ABCDEFGHIJ12", "me0001", false, url),
            Route::Gone
        );
        assert_eq!(route("garbage", "me0001", false, url), Route::Here);
    }

    /// A key granting publish on the connection's channel or on `*` may act on it;
    /// one granting publish only elsewhere, or only subscribe, may not.
    #[test]
    fn who_may_call() {
        let id = "abc123-ABCDEFGHIJ12";
        let auth = |capability: &str| AuthContext {
            app_id: "app".into(),
            key_name: "app.key".into(),
            client_id: tern_auth::ClientIdentity::Wildcard,
            capability: Capability::parse(capability).unwrap(),
            expires_ms: None,
            via_token: false,
            issued_ms: None,
            revocation_key: None,
        };
        for allowed in [
            r#"{"*":["publish"]}"#,
            r#"{"[connection]*":["publish"]}"#,
            r#"{"[*]*":["*"]}"#,
            r#"{"[connection]abc123-ABCDEFGHIJ12":["publish"]}"#,
        ] {
            assert!(check_allowed(&auth(allowed), id).is_ok(), "{allowed}");
        }
        for refused in [
            r#"{"chat":["publish"]}"#,
            r#"{"*":["subscribe"]}"#,
            r#"{"[connection]other0-ABCDEFGHIJ12":["publish"]}"#,
        ] {
            let error = check_allowed(&auth(refused), id).unwrap_err();
            assert_eq!(error.code, code::CAPABILITY_DENIED, "{refused}");
        }
    }
}
