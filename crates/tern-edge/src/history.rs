//! History: the journal that hands every applied event to the store, and the REST
//! history endpoints that read it back with Link-header pagination.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use tern_auth::Operation;
use tern_core::mutation::is_change;
use tern_core::{ChannelEvent, ChannelKey, Cursor, Journal, RemoteEvent};
use tern_protocol::{code, ErrorInfo, Format, Message, PresenceMessage};
use tern_store::{
    ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, Position, StoredItem,
};

use crate::credentials::{denied, rest_auth};
use crate::now_ms;
use crate::response::{body, response_format, ApiError};
use crate::state::EdgeState;

/// Hands every applied event to the store's writer queue (called under the channel
/// lock, in sequence order; it only queues).
pub struct StoreJournal {
    pub store: Arc<dyn HistoryStore>,
}

fn payload<T: Serialize>(value: &T) -> Bytes {
    tern_protocol::encode_value(Format::Msgpack, value)
}

impl Journal for StoreJournal {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        let items = stored_items(key, event);
        if items.is_empty() {
            return;
        }
        // A failed commit is logged (once per run of failures) and counted by the store;
        // here it only counts as an event missing from history. Replies learn of it
        // through `EdgeState::after_durable`.
        let done = Box::new(|committed: Result<(), tern_store::StoreError>| {
            if committed.is_err() {
                metrics::counter!("tern_history_dropped_total").increment(1);
            }
        });
        if let Err(err) = self.store.append(items, done) {
            metrics::counter!("tern_history_dropped_total").increment(1);
            tracing::warn!(channel = %key.name, error = %err, "history append refused");
        }
    }

    fn restore(&self, key: &ChannelKey) -> Cursor {
        let mut cursor = Cursor::new();
        match self.store.cursor(&key.app, &key.name) {
            Ok(origins) => {
                for (origin, seq) in origins {
                    cursor.advance(tern_core::OriginId(origin), seq);
                }
            }
            Err(err) => {
                tracing::warn!(channel = %key.name, error = %err, "reading the channel's stored cursor failed")
            }
        }
        cursor
    }
}

/// The store rows of one event, all at the event's position: each message (or presence
/// message) in the channel's history; each change of a message (update, delete, append,
/// summary) also among that message's versions, and each annotation among its
/// message's annotations (see `messages.rs`).
fn stored_items(key: &ChannelKey, event: &ChannelEvent) -> Vec<(ChannelRef, StoredItem)> {
    let item = |index: usize, payload: Bytes| StoredItem {
        timestamp_ms: event.timestamp_ms(),
        origin: event.origin.0,
        seq: event.seq,
        index: index as u32,
        payload,
    };
    let of = |kind| ChannelRef {
        app: key.app.clone(),
        channel: key.name.clone(),
        kind,
    };
    let per_message =
        |serial: &str, kind| ChannelRef::of_message(&key.app, &key.name, serial, kind);
    let frame = &event.frame;
    let mut items = Vec::new();
    if let Some(messages) = &frame.messages {
        for (index, message) in messages.iter().enumerate() {
            let stored = item(index, payload(message));
            if let (true, Some(serial)) = (is_change(message.action), &message.serial) {
                items.push((per_message(serial, EventKind::Versions), stored.clone()));
            }
            items.push((of(EventKind::Message), stored));
        }
    } else if let Some(presence) = &frame.presence {
        for (index, change) in presence.iter().enumerate() {
            items.push((of(EventKind::Presence), item(index, payload(change))));
        }
    } else if let Some(annotations) = &frame.annotations {
        for (index, annotation) in annotations.iter().enumerate() {
            let serial = annotation.message_serial.as_deref().unwrap_or_default();
            let stored = item(index, payload(annotation));
            items.push((per_message(serial, EventKind::Annotations), stored));
        }
    }
    items
}

/// The events whose rows [`StoreJournal`] wrote to a channel's history, rebuilt from
/// the rows of one kind (`presence`: the presence history, else the messages): one per
/// (origin, sequence), its messages (or presence messages) in index order, each as it
/// was sent (id, connectionId, timestamp, serial). What a restarted node takes back of
/// its earlier incarnations (`tern_replication::recover`). Annotations are not in these
/// rows, so their events are not rebuilt (a hole the recovery skips); a row that does
/// not decode loses its event the same way.
pub fn stored_events(channel: &str, presence: bool, items: Vec<StoredItem>) -> Vec<RemoteEvent> {
    let mut by_event: BTreeMap<(u64, u64), Vec<StoredItem>> = BTreeMap::new();
    for item in items {
        by_event
            .entry((item.origin, item.seq))
            .or_default()
            .push(item);
    }
    by_event
        .into_iter()
        .filter_map(|((origin, seq), mut rows)| {
            rows.sort_by_key(|row| row.index);
            let timestamp = rows.first().map(|row| row.timestamp_ms);
            let mut frame = tern_protocol::ProtocolMessage {
                channel: Some(channel.to_string()),
                timestamp,
                ..Default::default()
            };
            if presence {
                let changes: Vec<PresenceMessage> = decoded(&rows)?;
                frame.connection_id = changes.first().and_then(|c| c.connection_id.clone());
                frame.action = tern_protocol::action::PRESENCE;
                frame.presence = Some(changes);
            } else {
                let messages: Vec<Message> = decoded(&rows)?;
                frame.connection_id = messages.first().and_then(|m| m.connection_id.clone());
                frame.action = tern_protocol::action::MESSAGE;
                frame.messages = Some(messages);
            }
            Some(RemoteEvent {
                origin: tern_core::OriginId(origin),
                seq,
                publisher: frame.connection_id.as_deref().map(Arc::from),
                frame,
            })
        })
        .collect()
}

/// Every row's payload decoded, or `None` if one does not decode.
fn decoded<T: serde::de::DeserializeOwned>(rows: &[StoredItem]) -> Option<Vec<T>> {
    rows.iter()
        .map(|row| rmp_serde::from_slice(&row.payload).ok())
        .collect()
}

/// For a message item copied from another node's history (a new home's backfill): the
/// row that files it among its message's versions when it is a change, as
/// [`StoreJournal`] files the events it journals. (Annotations are not copied.)
pub fn version_row(
    app: &str,
    channel: &str,
    item: &StoredItem,
) -> Option<(ChannelRef, StoredItem)> {
    let message: Message = rmp_serde::from_slice(&item.payload).ok()?;
    let serial = message.serial.filter(|_| is_change(message.action))?;
    Some((
        ChannelRef::of_message(app, channel, &serial, EventKind::Versions),
        item.clone(),
    ))
}

type Params = Query<HashMap<String, String>>;

/// Query-string escaping: everything but RFC 3986 unreserved characters (so no commas,
/// which would break Link header parsing).
pub(crate) const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Query params of a history request, validated.
struct HistoryParams {
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    limit: usize,
    direction: Direction,
    after: Option<Position>,
    until: Option<BTreeMap<u64, u64>>,
}

fn invalid(name: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::INVALID_PARAMETER_VALUE,
        format!("invalid value for '{name}'"),
    )
}

fn parse_params(q: &HashMap<String, String>) -> Result<HistoryParams, ErrorInfo> {
    let int = |name: &str| -> Result<Option<i64>, ErrorInfo> {
        q.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().map_err(|_| invalid(name)))
            .transpose()
    };
    let limit = int("limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ErrorInfo::new(
            code::INVALID_PARAMETER_VALUE,
            "limit must be between 1 and 1000",
        ));
    }
    let direction = match q.get("direction").map(String::as_str) {
        None | Some("backwards") => Direction::Backwards,
        Some("forwards") => Direction::Forwards,
        Some(_) => return Err(invalid("direction")),
    };
    let after = q
        .get("page")
        .map(|p| Position::decode(p).ok_or_else(|| invalid("page")))
        .transpose()?;
    let until = q
        .get("from_serial")
        .or_else(|| q.get("fromSerial"))
        .map(|s| Cursor::decode(s).ok_or_else(|| invalid("from_serial")))
        .transpose()?
        .map(|cursor| {
            cursor
                .origins()
                .map(|(origin, seq)| (origin.0, seq))
                .collect()
        });
    Ok(HistoryParams {
        start_ms: int("start")?,
        end_ms: int("end")?,
        limit: limit as usize,
        direction,
        after,
        until,
    })
}

/// Query parameters a `Link` never repeats: the page position and the envelope
/// (set per link and per request), and credentials. A key or token in a link would
/// leak into logs, caches and `Referer`s; the SDKs authenticate every request
/// themselves, so the link does not need them.
const LINK_OMITS: [&str; 5] = ["page", "envelope", "key", "access_token", "accessToken"];

/// `Link` header: first, current and (if more) next, as `./<segment>?<query>` so both
/// ably-js (keeps the query, re-requests its own path) and ably-python (resolves it
/// relative to the request URL) follow it. `next` is the next page's `page` param.
fn link_header(segment: &str, q: &HashMap<String, String>, next: Option<String>) -> String {
    let query = |extra: Option<String>| {
        let mut pairs: Vec<(String, String)> = q
            .iter()
            .filter(|(k, _)| !LINK_OMITS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        pairs.sort();
        if let Some(page) = extra {
            pairs.push(("page".into(), page));
        }
        pairs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, QUERY_VALUE),
                    utf8_percent_encode(v, QUERY_VALUE)
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    let mut links = vec![
        format!("<./{segment}?{}>; rel=\"first\"", query(None)),
        format!(
            "<./{segment}?{}>; rel=\"current\"",
            query(q.get("page").cloned())
        ),
    ];
    if let Some(next) = next {
        links.push(format!("<./{segment}?{}>; rel=\"next\"", query(Some(next))));
    }
    links.join(", ")
}

/// A page of items in the client's format with its `Link` header (or, with
/// `envelope`, both in a JSON envelope). `next` is the next page's `page` param.
pub(crate) fn page_response<T: Serialize>(
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    segment: &str,
    items: Vec<T>,
    next: Option<String>,
) -> Response {
    let link = link_header(segment, q, next);
    if q.contains_key("envelope") {
        let envelope = serde_json::json!({ "statusCode": 200, "headers": { "link": link }, "response": items });
        return body(StatusCode::OK, Format::Json, &envelope);
    }
    let mut response = body(
        StatusCode::OK,
        response_format(headers, q.get("format").map(String::as_str)),
        &items,
    );
    if let Ok(value) = HeaderValue::from_str(&link) {
        response.headers_mut().insert(header::LINK, value);
    }
    response
}

async fn read(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    channel: &str,
    kind: EventKind,
) -> Result<(Vec<Bytes>, Option<Position>, ChannelKey), ErrorInfo> {
    let (auth, _) = rest_auth(&state.keys, headers, q, now_ms())?;
    let parsed = crate::channel_name::parse(channel).map_err(crate::channel_name::invalid)?;
    if !auth.capability.allows(parsed.base, Operation::History) {
        return Err(denied("history", parsed.base));
    }
    let store = state
        .store
        .clone()
        .ok_or_else(|| ErrorInfo::new(code::NOT_FOUND, "history is not enabled on this node"))?;
    let params = parse_params(q)?;
    let query = HistoryQuery {
        channel: ChannelRef {
            app: auth.app_id.as_str().into(),
            channel: parsed.base.into(),
            kind,
        },
        start_ms: params.start_ms,
        end_ms: params.end_ms,
        limit: params.limit,
        direction: params.direction,
        after: params.after,
        until: params.until,
    };
    // redb reads are blocking file I/O: keep them off the async workers.
    let page = tokio::task::spawn_blocking(move || store.query(&query))
        .await
        .map_err(|_| ErrorInfo::new(code::INTERNAL, "history query failed"))?
        .map_err(|e| ErrorInfo::new(code::INTERNAL, format!("history query failed: {e}")))?;
    Ok((
        page.items.into_iter().map(|i| i.payload).collect(),
        page.next,
        ChannelKey::new(auth.app_id.as_str(), parsed.base),
    ))
}

fn decode_all<T: serde::de::DeserializeOwned>(payloads: Vec<Bytes>) -> Vec<T> {
    payloads
        .iter()
        .filter_map(|p| rmp_serde::from_slice(p).ok())
        .collect()
}

/// `GET /channels/{channel}/messages`: message history.
pub(crate) async fn messages(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let (payloads, next, key) = read(&state, &headers, &q, &channel, EventKind::Message).await?;
    let items: Vec<Message> = decode_all(payloads);
    // Each message in its latest version (store reads: off the async workers).
    let items = match items.iter().any(|m| is_change(m.action)) {
        false => items,
        true => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || {
                crate::messages::latest_versions(&state, &key, items)
            })
            .await
            .map_err(|_| ErrorInfo::new(code::INTERNAL, "history query failed"))?
        }
    };
    let next = next.map(|p| p.encode());
    Ok(page_response(&headers, &q, "messages", items, next))
}

/// `GET /channels/{channel}/presence/history`: presence history.
pub(crate) async fn presence_history(
    State(state): State<Arc<EdgeState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let (payloads, next, _) = read(&state, &headers, &q, &channel, EventKind::Presence).await?;
    let items: Vec<PresenceMessage> = decode_all(payloads);
    let next = next.map(|p| p.encode());
    Ok(page_response(&headers, &q, "history", items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Link entries match ably-js's pattern `<./word?query>; rel="word"` and carry the
    /// page position only in `next`.
    #[test]
    fn link_header_shape() {
        let mut q = HashMap::new();
        q.insert("limit".to_string(), "2".to_string());
        q.insert("from_serial".to_string(), "v1.a-3".to_string());
        let next = Position {
            timestamp_ms: 5,
            origin: 10,
            seq: 3,
            index: 0,
        };
        let link = link_header("messages", &q, Some(next.encode()));
        let parts: Vec<&str> = link.split(", ").collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].starts_with("<./messages?from_serial=v1.a-3&limit=2>; rel=\"first\""));
        assert!(parts[2].contains("page=") && parts[2].ends_with("rel=\"next\""));
        assert!(!link_header("messages", &q, None).contains("next"));
    }

    /// Credentials given as query parameters are never echoed into a link.
    #[test]
    fn link_header_omits_credentials() {
        let mut q = HashMap::new();
        q.insert("limit".to_string(), "2".to_string());
        q.insert("key".to_string(), "app.root:s3cret".to_string());
        q.insert("access_token".to_string(), "tn1.token".to_string());
        q.insert("accessToken".to_string(), "tn1.other".to_string());
        let next = Position {
            timestamp_ms: 5,
            origin: 10,
            seq: 3,
            index: 0,
        };
        let link = link_header("messages", &q, Some(next.encode()));
        for secret in ["key=", "s3cret", "access_token", "accessToken", "tn1"] {
            assert!(!link.contains(secret), "{secret} in {link}");
        }
        assert!(link.starts_with("<./messages?limit=2>; rel=\"first\""));
    }

    /// What a restarted node rebuilds from its history rows is the event its hub had
    /// built: the same messages (ids, serials, connection, time) or presence changes, at
    /// the same origin and sequence, so a peer applies it as the original.
    #[test]
    fn stored_rows_give_back_the_events() {
        let hub = tern_core::Hub::new(tern_core::OriginId(7), tern_core::CoreLimits::default());
        let key = ChannelKey::new("app", "room");
        let publisher = tern_core::Publisher {
            connection_id: Some("conn-1".into()),
            frame_id: "conn-1:4".into(),
        };
        let messages = vec![
            Message {
                name: Some("a".into()),
                ..Default::default()
            },
            Message {
                id: Some("mine".into()),
                name: Some("b".into()),
                ..Default::default()
            },
        ];
        let published = hub
            .publish(&key, &publisher, messages, 1_000)
            .unwrap()
            .event
            .unwrap();
        let enter = PresenceMessage {
            id: Some("conn-1:5:0".into()),
            action: tern_protocol::presence_action::ENTER,
            client_id: Some("ann".into()),
            connection_id: Some("conn-1".into()),
            ..Default::default()
        };
        hub.presence(&key, &publisher, vec![enter], 1_001).unwrap();
        let entered = hub.events_of(&key, tern_core::OriginId(7), 2, 2).remove(0);
        let rows = |event: &ChannelEvent, kind| {
            stored_items(&key, event)
                .into_iter()
                .filter(|(at, _)| at.kind == kind)
                .map(|(_, item)| item)
                .collect::<Vec<_>>()
        };
        let mut rows_back = rows(&published, EventKind::Message);
        rows_back.reverse();
        let back = stored_events("room", false, rows_back);
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].origin, back[0].seq),
            (published.origin, published.seq)
        );
        assert_eq!(back[0].frame.messages, published.frame.messages);
        assert_eq!(back[0].frame.action, tern_protocol::action::MESSAGE);
        assert_eq!(back[0].publisher.as_deref(), Some("conn-1"));
        let back = stored_events("room", true, rows(&entered, EventKind::Presence));
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].origin, back[0].seq), (entered.origin, 2));
        assert_eq!(back[0].frame.presence, entered.frame.presence);
        assert_eq!(back[0].frame.action, tern_protocol::action::PRESENCE);
        // A row that does not decode loses its event, not the others.
        let mut bad = rows(&published, EventKind::Message);
        bad[0].payload = Bytes::from_static(b"\xc1");
        assert!(stored_events("room", false, bad).is_empty());
    }

    /// A change copied to a new home is filed under its message as a journaled one is;
    /// a new message is not.
    #[test]
    fn copied_changes_are_filed_under_their_message() {
        let item = |message: &Message| StoredItem {
            timestamp_ms: 5,
            origin: 1,
            seq: 2,
            index: 0,
            payload: payload(message),
        };
        let change = Message {
            action: Some(tern_protocol::message_action::APPEND),
            serial: Some("s1".into()),
            ..Default::default()
        };
        let (channel, row) = version_row("app", "ch", &item(&change)).unwrap();
        assert_eq!(
            channel,
            ChannelRef::of_message("app", "ch", "s1", EventKind::Versions)
        );
        assert_eq!(row, item(&change));
        let created = Message {
            serial: Some("s1".into()),
            ..Default::default()
        };
        assert!(version_row("app", "ch", &item(&created)).is_none());
    }
}
