//! Mutable messages and annotations: the checks before a change or an annotation
//! reaches the hub (shared by REST and realtime), the summaries that follow
//! annotations, and the REST routes that read and write them.
//!
//! A message is found by its serial, which names its position in the store
//! (`tern_core::serial`): the message as first published is one row of the channel's
//! history, its changes and its annotations are one range each (`EventKind::Versions`,
//! `EventKind::Annotations`). Changes this node applied but has not committed yet are
//! taken from the channel's log too, so a change right after a publish sees it.
//! The rules (what a change makes of a message, how annotations add up) are pure and
//! live in `tern_core::mutation`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use rand::Rng;
use serde::Deserialize;
use tern_auth::{AuthContext, ClientIdentity, Operation};
use tern_core::mutation::{self, is_change};
use tern_core::{ChannelKey, SerialPosition};
use tern_protocol::{
    annotation_action, code, message_action, Annotation, ErrorInfo, Format, Message,
};
use tern_store::{ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, Position};

use crate::credentials::{denied, message_client_id, rest_auth};
use crate::history::page_response;
use crate::now_ms;
use crate::publish::{request_publisher, By, Checked, Counted};
use crate::response::{body, request_format, response_format, ApiError};
use crate::rest::{channel_key, decode_body};
use crate::state::EdgeState;
use crate::stats::Transport;

type Params = Query<HashMap<String, String>>;

/// Most changes (or annotations) of one message read to build its latest version or
/// its summary: ten full store pages. Retention keeps far fewer per message by default
/// (`max_count` applies to each message's range as to a channel).
const ROWS_PER_MESSAGE_MAX: usize = 10 * tern_store::LIMIT_MAX;

fn not_found(serial: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::NOT_FOUND,
        format!("no message with serial '{serial}'"),
    )
}

fn store_failed(error: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo::new(code::INTERNAL, format!("reading history failed: {error}"))
}

/// Runs blocking store reads from a realtime session's task: on a multi-threaded
/// runtime the worker hands its other tasks on first; elsewhere (tests on a
/// current-thread runtime) it just runs. The reads are point lookups and short scans.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Every payload of `channel` from its start, in order, at most `max`.
fn read_all(
    store: &dyn HistoryStore,
    channel: ChannelRef,
    max: usize,
) -> Result<Vec<Bytes>, ErrorInfo> {
    let mut query = HistoryQuery::new(channel);
    query.direction = Direction::Forwards;
    query.limit = tern_store::LIMIT_MAX;
    let mut out = Vec::new();
    loop {
        let page = store.query(&query).map_err(store_failed)?;
        out.extend(page.items.into_iter().map(|item| item.payload));
        match page.next {
            Some(next) if out.len() < max => query.after = Some(next),
            _ => return Ok(out),
        }
    }
}

/// The stored message at `at` in the channel's history, if any.
fn read_at(
    store: &dyn HistoryStore,
    key: &ChannelKey,
    at: &SerialPosition,
) -> Result<Option<Message>, ErrorInfo> {
    let mut query = HistoryQuery::new(ChannelRef::new(&key.app, &key.name, EventKind::Message));
    query.direction = Direction::Forwards;
    query.start_ms = Some(at.timestamp_ms);
    query.end_ms = Some(at.timestamp_ms);
    query.limit = tern_store::LIMIT_MAX;
    let wanted = Position {
        timestamp_ms: at.timestamp_ms,
        origin: at.origin.0,
        seq: at.seq,
        index: at.index,
    };
    loop {
        let page = store.query(&query).map_err(store_failed)?;
        if let Some(item) = page.items.iter().find(|i| i.position() == wanted) {
            return Ok(rmp_serde::from_slice(&item.payload).ok());
        }
        match page.next {
            Some(next) if page.items.last().is_some_and(|i| i.position() < wanted) => {
                query.after = Some(next)
            }
            _ => return Ok(None),
        }
    }
}

fn decode_all<T: serde::de::DeserializeOwned>(payloads: Vec<Bytes>) -> Vec<T> {
    payloads
        .iter()
        .filter_map(|p| rmp_serde::from_slice(p).ok())
        .collect()
}

/// The message `serial` of a channel as first published, and every change to it this
/// node has (stored or still in the channel's log). Blocking: store reads.
pub(crate) fn find_message(
    state: &EdgeState,
    key: &ChannelKey,
    serial: &str,
) -> Result<(Message, Vec<Message>), ErrorInfo> {
    let at = SerialPosition::decode(serial).ok_or_else(|| not_found(serial))?;
    let (logged, mut changes) = state.hub.logged_message(key, serial);
    let original = match (logged, &state.store) {
        (Some(original), _) => Some(original),
        (None, Some(store)) => read_at(store.as_ref(), key, &at)?,
        (None, None) => None,
    };
    let original = original
        .filter(|m| !is_change(m.action))
        .ok_or_else(|| not_found(serial))?;
    if let Some(store) = &state.store {
        let versions = ChannelRef::of_message(&key.app, &key.name, serial, EventKind::Versions);
        changes.extend(decode_all(read_all(
            store.as_ref(),
            versions,
            ROWS_PER_MESSAGE_MAX,
        )?));
    }
    Ok((original, changes))
}

/// Every stored annotation of the message `serial`, in serial order. Blocking.
fn annotations_of(
    state: &EdgeState,
    key: &ChannelKey,
    serial: &str,
) -> Result<Vec<Annotation>, ErrorInfo> {
    let Some(store) = &state.store else {
        return Ok(Vec::new());
    };
    let channel = ChannelRef::of_message(&key.app, &key.name, serial, EventKind::Annotations);
    Ok(decode_all(read_all(
        store.as_ref(),
        channel,
        ROWS_PER_MESSAGE_MAX,
    )?))
}

/// The clientId a credential proves, for `…-own` capabilities.
fn proven_client_id(identity: &ClientIdentity) -> Option<&str> {
    identity.id()
}

/// Whether the caller may make a change with `action` to a message by `author`:
/// `message-update-any` / `message-delete-any`, or the `-own` one for its own messages.
fn may_change(
    auth: &AuthContext,
    identity: &ClientIdentity,
    channel: &str,
    action: u8,
    author: Option<&str>,
) -> Result<(), ErrorInfo> {
    let (any, own) = if action == message_action::DELETE {
        (Operation::MessageDeleteAny, Operation::MessageDeleteOwn)
    } else {
        (Operation::MessageUpdateAny, Operation::MessageUpdateOwn)
    };
    let is_author = author.is_some() && author == proven_client_id(identity);
    if auth.capability.allows(channel, any) || (is_author && auth.capability.allows(channel, own)) {
        return Ok(());
    }
    Err(denied(any.name(), channel))
}

/// Turns the messages of a publish into what the hub applies: new messages as they
/// are; each update, delete or append into the message subscribers get
/// ([`mutation::apply_change`]) once its serial is found and the caller may change it.
/// Summaries and metadata come only from the server (40003). Blocking when a change
/// is among them (store reads).
pub(crate) fn prepare_messages(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    key: &ChannelKey,
    messages: Vec<Message>,
) -> Result<Vec<Message>, ErrorInfo> {
    messages
        .into_iter()
        .map(|mut message| {
            message.annotations = None;
            match message.action {
                None | Some(message_action::CREATE) => {
                    message.serial = None;
                    message.version = None;
                    Ok(message)
                }
                Some(message_action::UPDATE | message_action::DELETE | message_action::APPEND) => {
                    prepare_change(state, auth, identity, key, message)
                }
                Some(other) => Err(ErrorInfo::new(
                    code::INVALID_PARAMETER_VALUE,
                    format!("a client may not publish a message with action {other}"),
                )),
            }
        })
        .collect()
}

fn prepare_change(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    key: &ChannelKey,
    mut change: Message,
) -> Result<Message, ErrorInfo> {
    let serial = change
        .serial
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ErrorInfo::new(code::INVALID_PARAMETER_VALUE, "this message lacks a serial")
        })?;
    let action = change.action.unwrap_or(message_action::UPDATE);
    let (original, changes) = blocking(|| find_message(state, key, &serial))?;
    let latest = mutation::latest(original, changes);
    may_change(
        auth,
        identity,
        &key.name,
        action,
        latest.client_id.as_deref(),
    )?;
    let mut version = change.version.take().unwrap_or_default();
    version.client_id = message_client_id(identity, version.client_id.as_deref())?;
    // Assigned when the change is applied (`Channel::publish`).
    version.serial = None;
    version.timestamp = None;
    change.version = Some(version);
    mutation::apply_change(&latest, change)
        .map_err(|e| ErrorInfo::new(code::INVALID_MESSAGE_DATA, e.to_string()))
}

/// Checks and fills the annotations of one publish: a known action and a type, the
/// serial of a message that exists, the caller's clientId. Blocking (store reads).
pub(crate) fn prepare_annotations(
    state: &EdgeState,
    auth: &AuthContext,
    identity: &ClientIdentity,
    key: &ChannelKey,
    annotations: Vec<Annotation>,
) -> Result<Vec<Annotation>, ErrorInfo> {
    if !auth
        .capability
        .allows(&key.name, Operation::AnnotationPublish)
    {
        return Err(denied("annotation-publish", &key.name));
    }
    let mut checked: Vec<String> = Vec::new();
    annotations
        .into_iter()
        .map(|mut annotation| {
            let invalid =
                |what: &str| ErrorInfo::new(code::INVALID_PARAMETER_VALUE, what.to_string());
            if !matches!(
                annotation.action,
                None | Some(annotation_action::CREATE | annotation_action::DELETE)
            ) {
                return Err(invalid("unknown annotation action"));
            }
            if annotation.kind.as_deref().is_none_or(str::is_empty) {
                return Err(invalid("an annotation needs a type"));
            }
            let serial = annotation
                .message_serial
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid("an annotation needs the serial of its message"))?;
            if !checked.contains(&serial) {
                blocking(|| find_message(state, key, &serial))?;
                checked.push(serial);
            }
            annotation.client_id = message_client_id(identity, annotation.client_id.as_deref())?;
            annotation.serial = None;
            annotation.timestamp = None;
            annotation.connection_id = None;
            Ok(annotation)
        })
        .collect()
}

/// Serializes summaries: each reads the annotations committed before it and publishes
/// the result, so the last summary of a message counts every annotation before it.
static SUMMARIES: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));
/// The entry of `serial` of `key` in [`SUMMARIES_PENDING`].
fn pending_key(key: &ChannelKey, serial: &str) -> (String, String, String) {
    (
        key.app.to_string(),
        key.name.to_string(),
        serial.to_string(),
    )
}

/// Messages (app, channel, serial) whose summary task is waiting to run.
static SUMMARIES_PENDING: LazyLock<
    std::sync::Mutex<std::collections::HashSet<(String, String, String)>>,
> = LazyLock::new(Default::default);

/// After annotations of `serials` were applied: once they are durable, publishes each
/// message's new summary (`message.summary`, counted from every stored annotation) on
/// the channel, as a change of the message like any other.
pub(crate) fn summarize_later(state: Arc<EdgeState>, key: ChannelKey, mut serials: Vec<String>) {
    serials.sort();
    serials.dedup();
    // A message whose summary is already waiting gets no second task: that one reads
    // the annotations only once it runs, after everything applied before it is durable.
    // So waiting tasks are at most one per message, however fast annotations arrive.
    {
        let mut pending = SUMMARIES_PENDING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        serials.retain(|serial| pending.insert(pending_key(&key, serial)));
    }
    if serials.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let _turn = SUMMARIES.lock().await;
        {
            let mut pending = SUMMARIES_PENDING
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for serial in &serials {
                pending.remove(&pending_key(&key, serial));
            }
        }
        if let Some(error) = state.durable(key.clone(), state.store_mark()).await.error() {
            tracing::warn!(channel = %key.name, %error, "annotations not durable; no summary");
            return;
        }
        for serial in serials {
            let reader = state.clone();
            let (channel, message_serial) = (key.clone(), serial.clone());
            let read = tokio::task::spawn_blocking(move || {
                annotations_of(&reader, &channel, &message_serial)
            })
            .await;
            let annotations = match read {
                Ok(Ok(annotations)) => annotations,
                _ => {
                    tracing::warn!(channel = %key.name, %serial, "reading annotations failed; no summary");
                    continue;
                }
            };
            let summary = Message {
                action: Some(message_action::SUMMARY),
                serial: Some(serial),
                annotations: Some(
                    serde_json::json!({ "summary": mutation::summarize(&annotations) }),
                ),
                ..Default::default()
            };
            let publisher = request_publisher();
            if let Err(error) = state.hub.publish(&key, &publisher, vec![summary], now_ms()) {
                tracing::warn!(channel = %key.name, %error, "summary not published");
            }
        }
    });
}

pub(crate) fn random_id() -> String {
    let random: [u8; 9] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

/// The channel of a REST read, after the caller's `history` capability is checked.
fn readable(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    channel: &str,
) -> Result<ChannelKey, ErrorInfo> {
    let (auth, _) = rest_auth(&state.keys, headers, q, now_ms())?;
    let key = channel_key(&auth.app_id, channel)?;
    if !auth.capability.allows(&key.name, Operation::History) {
        return Err(denied("history", &key.name));
    }
    Ok(key)
}

async fn find_off_runtime(
    state: &Arc<EdgeState>,
    key: &ChannelKey,
    serial: &str,
) -> Result<(Message, Vec<Message>), ErrorInfo> {
    let (state, key, serial) = (state.clone(), key.clone(), serial.to_string());
    tokio::task::spawn_blocking(move || find_message(&state, &key, &serial))
        .await
        .map_err(store_failed)?
}

/// `GET /channels/{channel}/messages/{serial}`: the message's latest version.
pub(crate) async fn get(
    State(state): State<Arc<EdgeState>>,
    Path((channel, serial)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let key = readable(&state, &headers, &q, &channel)?;
    let (original, changes) = find_off_runtime(&state, &key, &serial).await?;
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &mutation::latest(original, changes),
    ))
}

/// `GET /channels/{channel}/messages/{serial}/versions`: every version, oldest first
/// (`direction=backwards` for newest first), `limit` per page (`page` = offset).
pub(crate) async fn versions(
    State(state): State<Arc<EdgeState>>,
    Path((channel, serial)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let key = readable(&state, &headers, &q, &channel)?;
    let (original, changes) = find_off_runtime(&state, &key, &serial).await?;
    let mut all = mutation::versions(original, changes);
    if q.get("direction").map(String::as_str) == Some("backwards") {
        all.reverse();
    }
    let (limit, offset) = page_params(&q)?;
    let page: Vec<Message> = all.iter().skip(offset).take(limit).cloned().collect();
    let end = offset.saturating_add(limit);
    let next = (end < all.len()).then(|| end.to_string());
    Ok(page_response(&headers, &q, "versions", page, next))
}

fn invalid_param(name: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::INVALID_PARAMETER_VALUE,
        format!("invalid value for '{name}'"),
    )
}

/// The `limit` param: 1 to 1000, default 100.
fn limit_param(q: &HashMap<String, String>) -> Result<usize, ErrorInfo> {
    let limit = match q.get("limit") {
        Some(limit) => limit.parse::<usize>().map_err(|_| invalid_param("limit"))?,
        None => 100,
    };
    if !(1..=tern_store::LIMIT_MAX).contains(&limit) {
        return Err(invalid_param("limit"));
    }
    Ok(limit)
}

/// `limit` and the `page` offset of a list built in memory.
fn page_params(q: &HashMap<String, String>) -> Result<(usize, usize), ErrorInfo> {
    let offset = match q.get("page") {
        Some(page) => page.parse::<usize>().map_err(|_| invalid_param("page"))?,
        None => 0,
    };
    Ok((limit_param(q)?, offset))
}

/// `PATCH /channels/{channel}/messages/{serial}`: an update, delete or append (the
/// body is one message with its `action` and the operation as `version`). Answers
/// `{"versionSerial": …}` once the change is durable.
pub(crate) async fn change(
    State(state): State<Arc<EdgeState>>,
    Path((channel, serial)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (auth, identity) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let key = channel_key(&auth.app_id, &channel)?;
    let mut messages = tern_protocol::decode_messages(request_format(&headers), &bytes)
        .map_err(|e| e.to_error_info())?;
    if messages.len() != 1 {
        return Err(ErrorInfo::new(code::BAD_REQUEST, "expected one message").into());
    }
    let mut message = messages.remove(0);
    if !is_change(message.action) || message.action == Some(message_action::SUMMARY) {
        return Err(ErrorInfo::new(
            code::INVALID_PARAMETER_VALUE,
            "action must be message.update, message.delete or message.append",
        )
        .into());
    }
    message.serial = Some(serial);
    // A change is a publish too: the channel's before-publish function sees it (or an
    // edit could carry what the function refused in the original).
    let by = By::new(&state, &auth, &identity);
    let applied = Checked::new(&state, key, vec![message])?
        .call_function(&state, &auth)
        .await?
        .apply(&by, request_publisher(), Transport::Rest, Counted::InApp)?;
    applied.durable(&state).await?;
    let serials = applied.serials;
    let version_serial = serials.into_iter().next().flatten();
    Ok(body(
        StatusCode::OK,
        response_format(&headers, q.get("format").map(String::as_str)),
        &serde_json::json!({ "versionSerial": version_serial }),
    ))
}

/// One annotation or an array of them, as a REST body.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Annotation>),
    One(Box<Annotation>),
}

/// `POST /channels/{channel}/messages/{serial}/annotations`: publishes annotations of
/// the message; 201 once durable. The message's summary follows on the channel.
pub(crate) async fn annotate(
    State(state): State<Arc<EdgeState>>,
    Path((channel, serial)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (auth, identity) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let key = channel_key(&auth.app_id, &channel)?;
    let mut annotations = match decode_body::<OneOrMany>(request_format(&headers), &bytes)? {
        OneOrMany::Many(many) => many,
        OneOrMany::One(one) => vec![*one],
    };
    for annotation in &mut annotations {
        match &annotation.message_serial {
            Some(given) if *given != serial => {
                return Err(ErrorInfo::new(
                    code::INVALID_PARAMETER_VALUE,
                    "annotation messageSerial differs from the URL's",
                )
                .into())
            }
            _ => annotation.message_serial = Some(serial.clone()),
        }
    }
    let by = By::new(&state, &auth, &identity);
    let annotated = crate::publish::annotate(&by, &key, annotations, &request_publisher())?;
    let store_mark = annotated.store_mark;
    if let Some(error) = state.durable(key.clone(), store_mark).await.error() {
        return Err(error.into());
    }
    summarize_later(state.clone(), key, vec![serial]);
    Ok(body(
        StatusCode::CREATED,
        Format::Json,
        &serde_json::json!({}),
    ))
}

/// `GET /channels/{channel}/messages/{serial}/annotations`: the message's annotations,
/// oldest first, `limit` per page.
pub(crate) async fn annotations(
    State(state): State<Arc<EdgeState>>,
    Path((channel, serial)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let key = readable(&state, &headers, &q, &channel)?;
    let store = state
        .store
        .clone()
        .ok_or_else(|| ErrorInfo::new(code::NOT_FOUND, "history is not enabled on this node"))?;
    let mut query = HistoryQuery::new(ChannelRef::of_message(
        &key.app,
        &key.name,
        &serial,
        EventKind::Annotations,
    ));
    query.direction = Direction::Forwards;
    query.limit = limit_param(&q)?;
    query.after = q
        .get("page")
        .map(|p| Position::decode(p).ok_or_else(|| invalid_param("page")))
        .transpose()?;
    let page = tokio::task::spawn_blocking(move || store.query(&query))
        .await
        .map_err(store_failed)?
        .map_err(store_failed)?;
    let items: Vec<Annotation> = decode_all(page.items.into_iter().map(|i| i.payload).collect());
    Ok(page_response(
        &headers,
        &q,
        "annotations",
        items,
        page.next.map(|p| p.encode()),
    ))
}

/// History in latest versions: each message replaced by its latest version, and the
/// changes themselves (stored beside the messages for the cursor and for new homes)
/// left out. Blocking (one short scan per message).
pub(crate) fn latest_versions(
    state: &EdgeState,
    key: &ChannelKey,
    messages: Vec<Message>,
) -> Vec<Message> {
    let Some(store) = &state.store else {
        return messages;
    };
    messages
        .into_iter()
        .filter(|m| !is_change(m.action))
        .map(|original| {
            let Some(serial) = original.serial.clone() else {
                return original;
            };
            let versions =
                ChannelRef::of_message(&key.app, &key.name, &serial, EventKind::Versions);
            match read_all(store.as_ref(), versions, ROWS_PER_MESSAGE_MAX) {
                Ok(rows) if !rows.is_empty() => mutation::latest(original, decode_all(rows)),
                _ => original,
            }
        })
        .collect()
}
