//! Ably's subscribe-only streaming endpoints: `GET /sse` (Server-Sent Events, what a
//! browser `EventSource` reads) and `GET /event-stream` (SSE when the client accepts
//! `text/event-stream`, otherwise one JSON envelope per line).
//!
//! A stream attaches to the hub like a realtime connection (same capability, channel-name
//! and rewind rules, the same `Sync` wait before a node's first subscriber), so it sees
//! exactly what WebSocket subscribers see. Every message or presence event carries an
//! `id` from which the stream resumes (`lastEvent` or the `Last-Event-ID` header that
//! `EventSource` sends when it reconnects): per channel, the channel's serial, which is a
//! cursor and means the same on every node, so a stream resumes in any region with
//! exactly the messages it missed. Within a frame of several messages, an id also says
//! how many of that frame's messages were given (see [`StreamId`]).
//!
//! Bounded: channels per stream (`channels_per_connection_max`), streams count against
//! `connections_max`, and the events queued for a stream (`outbound_queue_max`): a stream
//! that reads too slowly is ended, and its client resumes from its last id.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tern_core::{AttachOptions, ChannelEvent, ChannelKey, Cursor, OriginId, Subscriber};
use tern_protocol::{code, flags, Data, ErrorInfo};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::channel_name;
use crate::credentials::{denied, granted_modes, rest_auth};
use crate::now_ms;
use crate::response::error_response;
use crate::state::EdgeState;

/// Longest a stream waits for a channel's state from the cluster before it attaches
/// with what this node has (as an ATTACH does).
const WARM_WAIT: Duration = Duration::from_secs(4);

/// What the client asked for.
#[derive(Debug, PartialEq)]
struct StreamRequest {
    /// Channel names as given (a `[?rewind=…]` qualifier allowed).
    channels: Vec<String>,
    /// Where to resume, if the client has been streaming before.
    last_event: Option<String>,
    rewind: Option<String>,
    /// Message events carry the whole Message (default) or only its data.
    enveloped: bool,
    /// Keepalives as `heartbeat` events rather than comments / empty lines.
    heartbeats: bool,
    /// SSE framing (`id:`/`event:`/`data:`) or one JSON envelope per line.
    sse: bool,
}

/// `GET /sse`.
pub(crate) async fn sse(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    peer: Option<axum::Extension<crate::hooks::Peer>>,
) -> Response {
    open(state, query, headers, true, peer_addr(peer)).await
}

fn peer_addr(peer: Option<axum::Extension<crate::hooks::Peer>>) -> Option<std::net::SocketAddr> {
    peer.map(|axum::Extension(peer)| peer.0)
}

/// `GET /event-stream`: SSE when the client accepts `text/event-stream`.
pub(crate) async fn event_stream(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    peer: Option<axum::Extension<crate::hooks::Peer>>,
) -> Response {
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/event-stream"));
    open(state, query, headers, sse, peer_addr(peer)).await
}

fn bool_param(query: &HashMap<String, String>, name: &str, default: bool) -> bool {
    match query.get(name).map(String::as_str) {
        Some("true" | "1") => true,
        Some("false" | "0") => false,
        _ => default,
    }
}

/// Reads the request's parameters (`channels` or `channel`, `separator`, `lastEvent` or
/// the `Last-Event-ID` header, `rewind`, `enveloped`, `heartbeats`).
fn parse_request(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    sse: bool,
    channels_max: usize,
) -> Result<StreamRequest, ErrorInfo> {
    let list = query
        .get("channels")
        .or_else(|| query.get("channel"))
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, "no channels given (channels=a,b)"))?;
    let separator = query
        .get("separator")
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(",");
    let channels: Vec<String> = list.split(separator).map(str::to_string).collect();
    if channels.len() > channels_max {
        return Err(ErrorInfo::new(
            code::CHANNEL_OPERATION_FAILED,
            format!("too many channels for one stream (at most {channels_max})"),
        ));
    }
    for (i, name) in channels.iter().enumerate() {
        channel_name::parse(name).map_err(channel_name::invalid)?;
        if channels[..i].contains(name) {
            return Err(ErrorInfo::new(
                code::BAD_REQUEST,
                format!("channel '{name}' given twice"),
            ));
        }
    }
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(StreamRequest {
        channels,
        last_event: header_id
            .or_else(|| query.get("lastEvent").cloned())
            .filter(|id| !id.is_empty()),
        rewind: query.get("rewind").cloned(),
        enveloped: bool_param(query, "enveloped", true),
        heartbeats: bool_param(query, "heartbeats", false),
        sse,
    })
}

/// A stream's position: for each of its channels (in request order) the serial of the
/// last event given, and, when only the first messages of a multi-message event were
/// given, that event and how many. Wire form: entries joined by `_`, each
/// `<channel serial>` or `<serial before the event>~<origin hex>-<seq hex>-<given>`;
/// channel serials use only `[0-9a-z.-]`.
#[derive(Clone, Debug, Default, PartialEq)]
struct StreamId {
    entries: Vec<Position>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Position {
    cursor: Cursor,
    /// An event of which only the first `given` messages were given.
    partial: Option<(OriginId, u64, usize)>,
}

impl StreamId {
    fn encode(&self) -> String {
        let entries = self.entries.iter().map(|p| match p.partial {
            None => p.cursor.encode(),
            Some((origin, seq, given)) => {
                format!("{}~{:x}-{:x}-{:x}", p.cursor.encode(), origin.0, seq, given)
            }
        });
        entries.collect::<Vec<_>>().join("_")
    }

    /// `None` unless it is an id this server gave for a stream of `channels` channels.
    fn decode(text: &str, channels: usize) -> Option<StreamId> {
        let entries = text
            .split('_')
            .map(|entry| match entry.split_once('~') {
                None => Some(Position {
                    cursor: Cursor::decode(entry)?,
                    partial: None,
                }),
                Some((cursor, partial)) => {
                    let mut parts = partial.split('-').map(|p| u64::from_str_radix(p, 16).ok());
                    let (origin, seq, given) = (parts.next()??, parts.next()??, parts.next()??);
                    Some(Position {
                        cursor: Cursor::decode(cursor)?,
                        partial: Some((OriginId(origin), seq, usize::try_from(given).ok()?)),
                    })
                }
            })
            .collect::<Option<Vec<_>>>()?;
        (entries.len() == channels).then_some(StreamId { entries })
    }
}

/// One channel's attachment on behalf of a stream: queues its events, tagged with the
/// channel's index in the stream.
struct StreamSink {
    index: usize,
    queue: mpsc::Sender<(usize, Arc<ChannelEvent>)>,
    /// Set when the stream's queue overflowed: from then on every channel of the stream
    /// refuses events (so the hub drops them all), and the stream ends once what was
    /// queued before is written. Its client resumes from the last id it got.
    overflow: Arc<AtomicBool>,
}

impl Subscriber for StreamSink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        if self.overflow.load(Ordering::Acquire) {
            return false;
        }
        let accepted = self.queue.try_send((self.index, event.clone())).is_ok();
        if !accepted {
            metrics::counter!("tern_outbound_overflows_total").increment(1);
            self.overflow.store(true, Ordering::Release);
        }
        accepted
    }
}

/// Detaches a stream's channels when its response body is dropped (the client went
/// away, or the stream ended).
struct Attachments {
    state: Arc<EdgeState>,
    id: Arc<str>,
    keys: Vec<ChannelKey>,
    /// For `connection.disconnected` when the stream ends.
    app_id: String,
    client_id: Option<String>,
    connected_at_ms: i64,
    _permit: OwnedSemaphorePermit,
    _open: crate::state::OpenConnection,
}

impl Drop for Attachments {
    fn drop(&mut self) {
        let now = now_ms();
        for key in &self.keys {
            self.state.hub.detach(key, &self.id, now);
        }
        // A stream is a connection of its own (a new id each time, no resume of the
        // connection): its end is the connection's end.
        crate::hooks::record_disconnect(
            &self.state,
            crate::hooks::Ended {
                app_id: &self.app_id,
                connection_id: &self.id,
                client_id: self.client_id.as_deref(),
                transport: "sse",
                connected_at_ms: self.connected_at_ms,
                reason: crate::hooks::EndReason::Closed,
            },
            now,
        );
    }
}

async fn open(
    state: Arc<EdgeState>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    sse: bool,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let now = now_ms();
    let (mut ctx, mut identity) = match rest_auth(&state.keys, &headers, &query, now) {
        Ok(auth) => auth,
        Err(err) => return error_response(err),
    };
    let request = match parse_request(
        &query,
        &headers,
        sse,
        state.config.channels_per_connection_max,
    ) {
        Ok(request) => request,
        Err(err) => return error_response(err),
    };
    let Ok(permit) = state.connection_permits.clone().try_acquire_owned() else {
        return error_response(ErrorInfo::new(
            code::RATE_LIMIT,
            "connection limit reached on this node",
        ));
    };
    // Resuming needs an id this server gave for these channels; any other id cannot
    // prove continuity, so the stream starts live with an error event saying so.
    let resume = request
        .last_event
        .as_deref()
        .map(|id| StreamId::decode(id, request.channels.len()));
    let mut position = match &resume {
        Some(Some(id)) => id.clone(),
        _ => StreamId {
            entries: vec![Position::default(); request.channels.len()],
        },
    };
    let mut first: Vec<Bytes> = Vec::new();
    if matches!(resume, Some(None)) {
        let err = ErrorInfo::new(
            code::UNABLE_TO_RECOVER,
            "lastEvent is not an id this stream can resume from",
        );
        first.push(frame(&request, "error", None, &error_value(&err)));
    }
    let id: Arc<str> = format!("sse-{}-{}", state.config.server_id, stream_counter()).into();
    // Every stream is a new connection: the app's `$connect` function, if any, may
    // refuse it (40300, as an HTTP error) or narrow its capability. A clientId it
    // attaches names nobody here: a stream only receives.
    let arrival = crate::hooks::Arrival {
        transport: "sse",
        peer,
    };
    if let Err(err) = crate::hooks::on_connect(&state, &id, arrival, &mut ctx, &mut identity).await
    {
        return error_response(err);
    }
    let (tx, rx) = mpsc::channel(state.config.outbound_queue_max.max(1));
    let overflow = Arc::new(AtomicBool::new(false));
    let mut keys = Vec::with_capacity(request.channels.len());
    let mut backlog = VecDeque::new();
    for (index, name) in request.channels.iter().enumerate() {
        let parsed = channel_name::parse(name).map_err(channel_name::invalid);
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(err) => return error_response(err),
        };
        let modes = granted_modes(&ctx.capability, parsed.base)
            & (flags::SUBSCRIBE | flags::PRESENCE_SUBSCRIBE);
        if modes & flags::SUBSCRIBE == 0 {
            detach_all(&state, &id, &keys);
            return error_response(denied("subscribe", parsed.base));
        }
        let rewind = match parsed.params.get("rewind").or(request.rewind.as_ref()) {
            Some(value) if resume.is_none() => match channel_name::parse_rewind(value, now) {
                Ok(rewind) => Some(rewind),
                Err(reason) => {
                    detach_all(&state, &id, &keys);
                    return error_response(ErrorInfo::new(code::INVALID_PARAMETER_VALUE, reason));
                }
            },
            _ => None,
        };
        let key = ChannelKey::new(&ctx.app_id, parsed.base);
        if let Some(cluster) = &state.cluster {
            if let Some(ready) = cluster.warm(&key) {
                let _ = tokio::time::timeout(WARM_WAIT, ready).await;
            }
        }
        let entry = &mut position.entries[index];
        let options = AttachOptions {
            modes,
            echo: true,
            resume_from: matches!(resume, Some(Some(_))).then(|| entry.cursor.clone()),
            rewind,
            delta: false,
        };
        let sink = Arc::new(StreamSink {
            index,
            queue: tx.clone(),
            overflow: overflow.clone(),
        });
        let partial = entry.partial.take();
        let mut lost = false;
        let attached = state.hub.attach(
            &key,
            id.clone(),
            options,
            sink,
            |snapshot| {
                lost = snapshot.continuity_lost;
                for event in &snapshot.backlog {
                    let event = match partial {
                        Some((origin, seq, given))
                            if event.origin == origin && event.seq == seq =>
                        {
                            let left = event.message_count().saturating_sub(given);
                            if left == 0 {
                                continue;
                            }
                            Arc::new(event.last_messages(left))
                        }
                        _ => event.clone(),
                    };
                    // Held apart from the live queue (the log holds these events anyway),
                    // and written before anything live.
                    backlog.push_back((index, event));
                }
            },
            now,
        );
        if let Err(err) = attached {
            detach_all(&state, &id, &keys);
            return error_response(crate::publish::core_error(err));
        }
        keys.push(key);
        if lost {
            let err = ErrorInfo::new(
                code::MESSAGES_EXPIRED,
                format!(
                    "continuity lost on '{name}': messages since lastEvent are no longer retained"
                ),
            );
            first.push(frame(&request, "error", None, &error_value(&err)));
        }
    }
    drop(tx);
    let guard = Attachments {
        state: state.clone(),
        id,
        keys,
        app_id: ctx.app_id.clone(),
        client_id: identity.id().map(str::to_owned),
        connected_at_ms: now,
        _permit: permit,
        _open: crate::state::OpenConnection::new("sse"),
    };
    let keepalive = Duration::from_millis(state.config.max_idle_interval_ms.max(1_000));
    let expires = ctx
        .expires_ms
        .map(|at| Duration::from_millis(at.saturating_sub(now).max(0) as u64));
    let feed = Feed {
        backlog,
        rx,
        overflow,
    };
    let body = stream_body(request, position, feed, first, keepalive, expires, guard);
    let content_type = if body.1 {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut response = Response::new(body.0);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.into_response()
}

fn detach_all(state: &EdgeState, id: &str, keys: &[ChannelKey]) {
    for key in keys {
        state.hub.detach(key, id, now_ms());
    }
}

fn stream_counter() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The response body: what `first` holds, then each queued event as it arrives,
/// keepalives while idle; it ends when the queue is closed (the hub dropped a sink for
/// being too slow) or when the credential expires (after an `error` event, 40142).
/// What a stream's channels queued, and whether the queue overflowed.
struct Feed {
    /// Events from the channels' logs (resume, rewind), oldest first, before live ones.
    backlog: VecDeque<(usize, Arc<ChannelEvent>)>,
    rx: mpsc::Receiver<(usize, Arc<ChannelEvent>)>,
    overflow: Arc<AtomicBool>,
}

fn stream_body(
    request: StreamRequest,
    position: StreamId,
    feed: Feed,
    first: Vec<Bytes>,
    keepalive: Duration,
    expires: Option<Duration>,
    guard: Attachments,
) -> (Body, bool) {
    let sse = request.sse;
    let deadline = expires.map(|after| tokio::time::Instant::now() + after);
    struct Stream {
        request: StreamRequest,
        position: StreamId,
        feed: Feed,
        pending: VecDeque<Bytes>,
        done: bool,
        _guard: Attachments,
    }
    let start = Stream {
        request,
        position,
        feed,
        pending: first.into(),
        done: false,
        _guard: guard,
    };
    let body = futures_util::stream::unfold(start, move |mut s| async move {
        loop {
            if let Some(chunk) = s.pending.pop_front() {
                return Some((Ok::<Bytes, std::convert::Infallible>(chunk), s));
            }
            if s.done {
                return None;
            }
            if let Some((index, event)) = s.feed.backlog.pop_front() {
                s.pending
                    .push_back(render(&s.request, &mut s.position, index, &event));
                continue;
            }
            // After an overflow nothing more is queued: write what is, then end.
            if s.feed.overflow.load(Ordering::Acquire) {
                match s.feed.rx.try_recv() {
                    Ok((index, event)) => {
                        let chunk = render(&s.request, &mut s.position, index, &event);
                        s.pending.push_back(chunk);
                    }
                    Err(_) => s.done = true,
                }
                continue;
            }
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = s.feed.rx.recv() => match item {
                    Some((index, event)) => {
                        let chunk = render(&s.request, &mut s.position, index, &event);
                        if !chunk.is_empty() {
                            return Some((Ok(chunk), s));
                        }
                    }
                    None => s.done = true,
                },
                _ = tokio::time::sleep(keepalive) => {
                    return Some((Ok(keepalive_chunk(&s.request)), s));
                }
                _ = expiry => {
                    let err = ErrorInfo::new(code::TOKEN_EXPIRED, "token expired");
                    s.pending.push_back(frame(&s.request, "error", None, &error_value(&err)));
                    s.done = true;
                }
            }
        }
    });
    (Body::from_stream(body), sse)
}

fn keepalive_chunk(request: &StreamRequest) -> Bytes {
    match (request.sse, request.heartbeats) {
        (true, false) => Bytes::from_static(b":keepalive\n\n"),
        (true, true) => Bytes::from_static(b"event: heartbeat\ndata:\n\n"),
        (false, false) => Bytes::from_static(b"\n"),
        (false, true) => Bytes::from_static(b"{\"event\":\"heartbeat\"}\n"),
    }
}

/// One event of the stream, framed: SSE (`id:`, `event:`, one `data:` line per line of
/// the data) or a JSON envelope line.
fn frame(request: &StreamRequest, event: &str, id: Option<&str>, data: &Value) -> Bytes {
    if request.sse {
        let text = match data {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let mut out = String::with_capacity(text.len() + 64);
        if let Some(id) = id {
            out.push_str("id: ");
            out.push_str(id);
            out.push('\n');
        }
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
        for line in text.split('\n') {
            out.push_str("data: ");
            out.push_str(line.strip_suffix('\r').unwrap_or(line));
            out.push('\n');
        }
        out.push('\n');
        Bytes::from(out)
    } else {
        let mut envelope = json!({"event": event, "data": data});
        if let Some(id) = id {
            envelope["id"] = Value::String(id.to_string());
        }
        let mut line = envelope.to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

/// An error event's data: the ErrorInfo object (as JSON text in SSE, see [`frame`]).
fn error_value(err: &ErrorInfo) -> Value {
    serde_json::to_value(err).unwrap_or(Value::Null)
}

/// Renders one queued event (every message or presence message in it becomes one stream
/// event) and moves the stream's position past it.
fn render(
    request: &StreamRequest,
    position: &mut StreamId,
    index: usize,
    event: &ChannelEvent,
) -> Bytes {
    let Some(name) = request.channels.get(index) else {
        return Bytes::new();
    };
    let Some(entry) = position.entries.get_mut(index) else {
        return Bytes::new();
    };
    let before = entry.cursor.clone();
    let after = event
        .frame
        .channel_serial
        .as_deref()
        .and_then(Cursor::decode)
        .unwrap_or_else(|| {
            let mut c = before.clone();
            c.advance(event.origin, event.seq);
            c
        });
    let items: Vec<(&str, Value)> = if event.is_message() {
        event
            .frame
            .messages
            .iter()
            .flatten()
            .map(|m| {
                (
                    "message",
                    item_value(request, name, serde_json::to_value(m), m.data.as_ref()),
                )
            })
            .collect()
    } else {
        event
            .frame
            .presence
            .iter()
            .flatten()
            .map(|p| {
                (
                    "presence",
                    item_value(request, name, serde_json::to_value(p), p.data.as_ref()),
                )
            })
            .collect()
    };
    let count = items.len();
    // Inside a frame of several messages, the position is the cursor before this event
    // (every origin as after it, this event's origin one back) plus how many were given.
    let undone = (count > 1).then(|| {
        let mut cursor = before.clone();
        cursor.merge(&after);
        let mut undone = Cursor::new();
        for (origin, seq) in cursor.origins() {
            let seq = if origin == event.origin {
                event.seq.saturating_sub(1)
            } else {
                seq
            };
            undone.advance(origin, seq);
        }
        undone
    });
    let mut out = Vec::new();
    for (i, (kind, data)) in items.into_iter().enumerate() {
        let given = i + 1;
        let entry_now = match &undone {
            Some(undone) if given < count => Position {
                cursor: undone.clone(),
                partial: Some((event.origin, event.seq, given)),
            },
            _ => Position {
                cursor: after.clone(),
                partial: None,
            },
        };
        position.entries[index] = entry_now;
        let id = position.encode();
        out.extend_from_slice(&frame(request, kind, Some(&id), &data));
    }
    Bytes::from(out)
}

/// The `data` of a message or presence event: the whole object with its channel
/// (enveloped; JSON text in SSE), or only the payload (binary as base64).
fn item_value(
    request: &StreamRequest,
    channel: &str,
    object: Result<Value, serde_json::Error>,
    data: Option<&Data>,
) -> Value {
    if !request.enveloped {
        return match data {
            None => Value::Null,
            Some(Data::String(text)) => Value::String(text.clone()),
            Some(Data::Binary(bytes)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            Some(Data::Json(value)) => Value::String(value.to_string()),
        };
    }
    let mut object = object.unwrap_or(Value::Null);
    if let Value::Object(map) = &mut object {
        map.insert("channel".to_string(), Value::String(channel.to_string()));
    }
    if request.sse {
        Value::String(object.to_string())
    } else {
        object
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Channels, separator and resume id are read as Ably documents them; bad input
    /// gets its Ably error code.
    #[test]
    fn request_parameters() {
        let mut headers = HeaderMap::new();
        let r = parse_request(
            &query(&[("channels", "a,b"), ("v", "1.2")]),
            &headers,
            true,
            10,
        )
        .unwrap();
        assert_eq!(r.channels, ["a", "b"]);
        assert!(r.enveloped && !r.heartbeats && r.last_event.is_none());
        let r = parse_request(
            &query(&[
                ("channel", "fo,o|ba,r"),
                ("separator", "|"),
                ("enveloped", "false"),
                ("lastEvent", "x"),
            ]),
            &headers,
            true,
            10,
        )
        .unwrap();
        assert_eq!(r.channels, ["fo,o", "ba,r"]);
        assert!(!r.enveloped);
        headers.insert("last-event-id", HeaderValue::from_static("y"));
        let r = parse_request(
            &query(&[("channels", "a"), ("lastEvent", "x")]),
            &headers,
            true,
            10,
        )
        .unwrap();
        assert_eq!(r.last_event.as_deref(), Some("y"), "the header wins");
        let code = |q: &[(&str, &str)]| {
            parse_request(&query(q), &HeaderMap::new(), true, 2)
                .unwrap_err()
                .code
        };
        assert_eq!(code(&[]), code::BAD_REQUEST);
        assert_eq!(code(&[("channels", "a,:b")]), code::INVALID_CHANNEL_NAME);
        assert_eq!(
            code(&[("channels", "a,b,c")]),
            code::CHANNEL_OPERATION_FAILED
        );
        assert_eq!(code(&[("channels", "a,a")]), code::BAD_REQUEST);
    }

    /// An id survives its wire form, and only an id for the same number of channels is
    /// taken.
    #[test]
    fn stream_id_round_trip() {
        let mut a = Cursor::new();
        a.advance(OriginId(0xab), 7);
        let mut b = Cursor::new();
        b.advance(OriginId(1), 2);
        b.advance(OriginId(2), 9);
        let id = StreamId {
            entries: vec![
                Position {
                    cursor: a,
                    partial: None,
                },
                Position {
                    cursor: b,
                    partial: Some((OriginId(2), 10, 3)),
                },
            ],
        };
        let text = id.encode();
        assert_eq!(text, "v1.ab-7_v1.1-2.2-9~2-a-3");
        assert_eq!(StreamId::decode(&text, 2), Some(id));
        assert_eq!(StreamId::decode(&text, 1), None);
        assert_eq!(StreamId::decode("garbage", 1), None);
        assert_eq!(StreamId::decode("v1.ab-7~zz", 1), None);
    }

    fn request(sse: bool, enveloped: bool) -> StreamRequest {
        StreamRequest {
            channels: vec!["ch".into()],
            last_event: None,
            rewind: None,
            enveloped,
            heartbeats: false,
            sse,
        }
    }

    fn event(seq: u64, datas: &[&str]) -> ChannelEvent {
        let mut cursor = Cursor::new();
        cursor.advance(OriginId(5), seq);
        let messages = datas
            .iter()
            .enumerate()
            .map(|(i, d)| tern_protocol::Message {
                id: Some(format!("m{seq}:{i}")),
                name: Some("n".into()),
                data: Some(Data::String(d.to_string())),
                ..Default::default()
            })
            .collect();
        ChannelEvent::new(
            OriginId(5),
            seq,
            None,
            tern_protocol::ProtocolMessage {
                action: tern_protocol::action::MESSAGE,
                channel_serial: Some(cursor.encode()),
                messages: Some(messages),
                ..Default::default()
            },
        )
    }

    /// Each message becomes one SSE event; all but the last of a frame carry an id that
    /// resumes after exactly the messages given; multi-line data becomes several `data:`
    /// lines.
    #[test]
    fn sse_events_and_their_ids() {
        let request = request(true, false);
        let mut position = StreamId {
            entries: vec![Position::default()],
        };
        let text = render(&request, &mut position, 0, &event(1, &["one"]));
        assert_eq!(text, "id: v1.5-1\nevent: message\ndata: one\n\n");
        let text = render(
            &request,
            &mut position,
            0,
            &event(2, &["two\nlines", "three"]),
        );
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "id: v1.5-1~5-2-1\nevent: message\ndata: two\ndata: lines\n\n\
             id: v1.5-2\nevent: message\ndata: three\n\n"
        );
    }

    /// Enveloped, the data is the Message with its channel; a JSON stream wraps it.
    #[test]
    fn enveloped_and_plain_json() {
        let mut position = StreamId {
            entries: vec![Position::default()],
        };
        let text = render(&request(true, true), &mut position, 0, &event(1, &["x"]));
        let data = std::str::from_utf8(&text)
            .unwrap()
            .lines()
            .nth(2)
            .unwrap()
            .strip_prefix("data: ")
            .unwrap();
        let message: Value = serde_json::from_str(data).unwrap();
        assert_eq!(message["channel"], "ch");
        assert_eq!(message["data"], "x");
        assert_eq!(message["id"], "m1:0");
        let mut position = StreamId {
            entries: vec![Position::default()],
        };
        let text = render(&request(false, true), &mut position, 0, &event(1, &["x"]));
        let line: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(line["event"], "message");
        assert_eq!(line["id"], "v1.5-1");
        assert_eq!(line["data"]["channel"], "ch");
    }
}
