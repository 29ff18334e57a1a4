//! App statistics: `GET /stats` (Ably's v2 shape, per minute, hour, day or month, with
//! Link-header paging) and, when the config allows it, `POST /stats` fixtures as Ably's
//! sandbox takes them.
//!
//! # Layout
//! - `interval`: units, interval ids and the `start`/`end` params (pure).
//! - `entries`: the base counters, how rows combine, the aggregates derived from them
//!   and fixtures (pure).
//! - `counters`: what this node counts per app: the open minute's atomics and gauges,
//!   the closed minutes (bounded), and queries over them.
//! - here: the handlers, counting REST requests, and a cluster-wide answer.
//!
//! What is counted, and where: messages and presence messages a client published
//! (inbound, realtime or REST: `session/publish.rs`, `rest.rs`), those written to a
//! realtime connection (outbound: the connection's writer, once per write batch),
//! realtime connections (`session.rs`), channels (the hub's per-app counts, sampled by
//! the tick) and REST requests by outcome (the [`count_requests`] middleware). Sizes are
//! Ably's message size (`tern_core::event::message_size`).
//!
//! In a cluster every node counts what it does; `GET /stats` asks every other live node
//! for the same page of its own statistics and adds them up, so any node answers with
//! the app's totals. Statistics live in memory: a node's are lost when it stops.

mod counters;
mod entries;
mod interval;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query as QueryParams, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use percent_encoding::utf8_percent_encode;
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use tern_auth::{OpSet, Operation};
use tern_protocol::{code, ErrorInfo};

pub(crate) use counters::{AppStats, Delivered, OpenConnection, Stats};
pub(crate) use entries::{Kind, Outcome, Request, Transport};

use counters::{Order, Query};
use interval::{TimeParam, Unit};

use crate::credentials::rest_auth;
use crate::forward::{get_from_home, FORWARDED};
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::state::EdgeState;

/// The JSON schema each statistics entry names (ably-common `app-stats`).
const SCHEMA: &str = "https://schemas.ably.com/json/app-stats-0.0.5.json";
/// Default and largest `limit`.
const LIMIT_DEFAULT: usize = 100;
const LIMIT_MAX: usize = 1_000;

type Params = QueryParams<HashMap<String, String>>;

fn invalid(message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code::INVALID_PARAMETER_VALUE, message)
}

/// The query of a `GET /stats`: `unit` (or `by`, as the ably-js suite writes it),
/// `start`/`end` as ms or interval ids (the end's whole interval included), `direction`
/// (backwards by default), `limit` (1..=1000, default 100) and `page` (from a Link).
fn parse_query(q: &HashMap<String, String>, now_ms: i64) -> Result<Query, ErrorInfo> {
    let unit = match q.get("unit").or_else(|| q.get("by")) {
        None => Unit::Minute,
        Some(name) => {
            Unit::parse(name).ok_or_else(|| invalid("unit must be minute, hour, day or month"))?
        }
    };
    let time = |name: &str| -> Result<Option<TimeParam>, ErrorInfo> {
        q.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| {
                TimeParam::parse(v).ok_or_else(|| {
                    invalid(format!(
                        "{name} must be ms since the epoch or an interval id"
                    ))
                })
            })
            .transpose()
    };
    let start_ms = time("start")?.map_or(0, TimeParam::first_ms);
    let end_ms = time("end")?.map_or(now_ms.clamp(0, interval::TIME_MAX_MS), TimeParam::last_ms);
    if start_ms > end_ms {
        return Err(invalid("start must not be after end"));
    }
    let limit = match q.get("limit") {
        None => LIMIT_DEFAULT,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=LIMIT_MAX).contains(n))
            .ok_or_else(|| invalid("limit must be between 1 and 1000"))?,
    };
    let direction = match q.get("direction").map(String::as_str) {
        None | Some("backwards") => Order::Backwards,
        Some("forwards") => Order::Forwards,
        Some(_) => return Err(invalid("direction must be forwards or backwards")),
    };
    // A page cursor is an interval start this node wrote; clamped like every instant.
    let after = q
        .get("page")
        .map(|p| {
            p.parse::<i64>()
                .map(|ms| ms.clamp(0, interval::TIME_MAX_MS))
                .map_err(|_| invalid("invalid value for 'page'"))
        })
        .transpose()?;
    Ok(Query {
        unit,
        first: unit.floor(start_ms),
        last: unit.floor(end_ms),
        direction,
        limit,
        after,
    })
}

/// One interval's entries, as reported (base and derived, zeros left out).
type Entries = BTreeMap<String, f64>;

/// A page of intervals, by start, ready to merge with other nodes' pages.
struct Answer {
    intervals: BTreeMap<i64, Entries>,
    more: bool,
}

impl Answer {
    fn local(state: &EdgeState, app: &str, query: &Query) -> Answer {
        let Some(stats) = state.stats.existing(app) else {
            return Answer {
                intervals: BTreeMap::new(),
                more: false,
            };
        };
        let page = stats.query(query);
        Answer {
            intervals: page
                .intervals
                .iter()
                .map(|(start, row)| (*start, entries::entries(row)))
                .collect(),
            more: page.more,
        }
    }

    /// Adds another node's page: entries of the same interval add up (counts, and the
    /// gauges, which are per node).
    fn add(&mut self, other: Answer) {
        for (start, entries) in other.intervals {
            let mine = self.intervals.entry(start).or_default();
            for (name, value) in entries {
                *mine.entry(name).or_insert(0.0) += value;
            }
        }
        self.more |= other.more;
    }

    /// The first `limit` intervals in the query's order. Every node answered with its
    /// first `limit` after the same cursor, so these are exactly the cluster's first
    /// `limit`; there are more when any node had more or the union has more.
    fn page(self, query: &Query) -> (Vec<(i64, Entries)>, bool) {
        let total = self.intervals.len();
        let ordered: Vec<(i64, Entries)> = match query.direction {
            Order::Forwards => self.intervals.into_iter().take(query.limit).collect(),
            Order::Backwards => self.intervals.into_iter().rev().take(query.limit).collect(),
        };
        (ordered, self.more || total > query.limit)
    }
}

/// A statistics entry as the SDKs read it (`Stats`, TS12).
fn entry_json(app: &str, unit: Unit, start: i64, entries: Entries, now_ms: i64) -> Value {
    let mut object = Map::new();
    object.insert("intervalId".into(), unit.id(start).into());
    object.insert("unit".into(), unit.name().into());
    object.insert("schema".into(), SCHEMA.into());
    object.insert("appId".into(), app.into());
    if (start..unit.next(start)).contains(&now_ms) {
        object.insert("inProgress".into(), interval::second_id(now_ms).into());
    }
    let entries: Map<String, Value> = entries
        .into_iter()
        .map(|(name, value)| (name, number(value)))
        .collect();
    object.insert("entries".into(), Value::Object(entries));
    Value::Object(object)
}

/// Whole numbers as integers (counts are), others as floats (means).
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Value::from(value as i64)
    } else {
        Number::from_f64(value).map_or(Value::Null, Value::Number)
    }
}

/// `GET /stats`: the app's statistics. Needs the `stats` operation on every channel
/// (`"*"`): statistics are the whole app's.
pub(crate) async fn get(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    QueryParams(q): Params,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now)?;
    if !auth.capability.allows("*", Operation::Stats) {
        return Err(ErrorInfo::new(
            code::CAPABILITY_DENIED,
            "action 'stats' is not permitted: it needs the stats operation on '*'",
        )
        .into());
    }
    let query = parse_query(&q, now)?;
    let forwarded = headers.contains_key(FORWARDED);
    let mut answer = Answer::local(&state, &auth.app_id, &query);
    if !forwarded {
        for peer in peer_answers(&state, &headers, &q).await? {
            answer.add(peer);
        }
    }
    let (intervals, more) = answer.page(&query);
    let next = more
        .then(|| intervals.last().map(|(start, _)| start.to_string()))
        .flatten();
    let items: Vec<Value> = intervals
        .into_iter()
        .map(|(start, entries)| entry_json(&auth.app_id, query.unit, start, entries, now))
        .collect();
    if forwarded {
        return Ok(peer_envelope(items, more));
    }
    Ok(crate::history::page_response(
        &headers, &q, "stats", items, next,
    ))
}

/// The same page from every other live node of the cluster (none for a single node).
/// A node that does not answer fails the request (504, 50003): a sum without it would
/// be wrong without saying so.
async fn peer_answers(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<Vec<Answer>, ErrorInfo> {
    let Some(cluster) = &state.cluster else {
        return Ok(Vec::new());
    };
    let peers = cluster.peer_urls();
    if peers.is_empty() {
        return Ok(Vec::new());
    }
    // Always JSON, whatever the client asked for; its credentials go along.
    let mut pairs: Vec<(&String, &String)> = q
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "format" | "envelope"))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let encode = |s: &str| utf8_percent_encode(s, crate::history::QUERY_VALUE).to_string();
            format!("{}={}", encode(k), encode(v))
        })
        .collect();
    let path = format!("/stats?{}", query.join("&"));
    let mut peer_headers = headers.clone();
    peer_headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let asks = peers.iter().map(|peer| {
        let (path, headers) = (&path, &peer_headers);
        async move { (peer, get_from_home(peer, path, headers).await) }
    });
    let mut answers = Vec::new();
    for (peer, result) in futures_util::future::join_all(asks).await {
        let answer = match result {
            Ok((StatusCode::OK, bytes)) => {
                parse_peer(&bytes).ok_or_else(|| "an unreadable answer".to_string())
            }
            Ok((status, _)) => Err(format!("status {status}")),
            Err(reason) => Err(reason),
        };
        match answer {
            Ok(answer) => answers.push(answer),
            Err(reason) => {
                tracing::warn!(%peer, %reason, "a node did not give its app statistics");
                metrics::counter!("tern_stats_peer_failures_total").increment(1);
                return Err(ErrorInfo::with_status(
                    code::TIMEOUT,
                    504,
                    format!("a node of the cluster did not give its statistics ({reason})"),
                ));
            }
        }
    }
    Ok(answers)
}

/// Another node's page: its items (JSON) and whether it had more.
fn parse_peer(bytes: &Bytes) -> Option<Answer> {
    #[derive(Deserialize)]
    struct Item {
        #[serde(rename = "intervalId")]
        interval_id: String,
        #[serde(default)]
        entries: BTreeMap<String, f64>,
    }
    #[derive(Deserialize)]
    struct Envelope {
        items: Vec<Item>,
        more: bool,
    }
    let envelope: Envelope = serde_json::from_slice(bytes).ok()?;
    let mut intervals = BTreeMap::new();
    for item in envelope.items {
        let (start, _) = interval::parse_interval_id(&item.interval_id)?;
        intervals.insert(start, item.entries);
    }
    Some(Answer {
        intervals,
        more: envelope.more,
    })
}

/// `POST /stats`: fixtures, as Ably's sandbox takes them (a JSON array, or one object,
/// in the nested form, each for one minute). Only when `[stats] fixtures = true`, and
/// only from a key (not a token) with every operation on every channel. Stored on this
/// node, added to what its minutes hold; all or nothing.
pub(crate) async fn post_fixtures(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    QueryParams(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    if !state.stats.config().fixtures {
        return Err(ErrorInfo::new(code::NOT_FOUND, "no such endpoint").into());
    }
    let now = now_ms();
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now)?;
    if auth.via_token || auth.capability.ops_for("*") != OpSet::ALL {
        return Err(ErrorInfo::new(
            code::CAPABILITY_DENIED,
            "statistics fixtures need a key with every operation on every channel",
        )
        .into());
    }
    let fixtures: Value = crate::rest::decode_body(request_format(&headers), &bytes)?;
    let fixtures = match fixtures {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        _ => {
            return Err(
                ErrorInfo::new(code::BAD_REQUEST, "statistics fixtures must be an array").into(),
            )
        }
    };
    let rows = fixtures
        .iter()
        .map(entries::fixture_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ErrorInfo::new(code::BAD_REQUEST, e.to_string()))?;
    let Some(app) = state.stats.app(&auth.app_id, now) else {
        return Err(ErrorInfo::new(
            code::INTERNAL,
            "statistics are not kept for this app (stats.apps_max)",
        )
        .into());
    };
    for (start, row) in rows {
        app.insert(start, row);
    }
    let format = response_format(&headers, q.get("format").map(String::as_str));
    Ok(body(StatusCode::CREATED, format, &Vec::<Value>::new()))
}

tokio::task_local! {
    /// The app and kind of the REST request being served, once its credentials are
    /// known (see [`count_requests`]).
    static REQUEST: RefCell<Option<(String, Request)>>;
}

/// Notes that the REST request being served is `app`'s (called where credentials are
/// checked); [`count_requests`] counts it when it ends. Outside a request: nothing.
pub(crate) fn note_request(app: &str, kind: Request) {
    let _ = REQUEST.try_with(|noted| *noted.borrow_mut() = Some((app.to_string(), kind)));
}

/// Middleware: counts every REST request whose credentials named an app, by outcome
/// (2xx/3xx succeeded, 4xx refused, 5xx failed). A request another node forwarded here
/// was counted there.
pub(crate) async fn count_requests(
    State(state): State<Arc<EdgeState>>,
    request: HttpRequest,
    next: Next,
) -> Response {
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let (response, noted) = REQUEST
        .scope(RefCell::new(None), async move {
            let response = next.run(request).await;
            (response, REQUEST.with(|noted| noted.borrow_mut().take()))
        })
        .await;
    if let Some((app, kind)) = noted {
        let outcome = match response.status().as_u16() {
            500.. => Outcome::Failed,
            400.. => Outcome::Refused,
            _ => Outcome::Succeeded,
        };
        if let Some(stats) = state.stats.app(&app, now_ms()) {
            stats.requested(kind, outcome);
        }
    }
    response
}

/// A forwarded statistics request answers with an envelope the asking node reads: this
/// node's items and whether it had more (see [`peer_answers`]).
fn peer_envelope(items: Vec<Value>, more: bool) -> Response {
    let value = serde_json::json!({ "items": items, "more": more });
    let mut response = body(StatusCode::OK, tern_protocol::Format::Json, &value);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn answer(intervals: &[(i64, f64)], more: bool) -> Answer {
        Answer {
            intervals: intervals
                .iter()
                .map(|(start, n)| (*start, Entries::from([("n".to_string(), *n)])))
                .collect(),
            more,
        }
    }

    fn query(direction: Order, limit: usize) -> Query {
        Query {
            unit: Unit::Minute,
            first: 0,
            last: 0,
            direction,
            limit,
            after: None,
        }
    }

    /// Nodes' pages merge into the cluster's: the same interval adds up, the first
    /// `limit` in the query's order are kept, and there is more when the union is
    /// longer or a node had more.
    #[test]
    fn cluster_pages_merge() {
        let mut merged = answer(&[(1, 1.0), (3, 1.0)], false);
        merged.add(answer(&[(2, 5.0), (3, 2.0)], false));
        let (page, more) = merged.page(&query(Order::Forwards, 2));
        let got: Vec<(i64, f64)> = page.iter().map(|(s, e)| (*s, e["n"])).collect();
        assert_eq!((got, more), (vec![(1, 1.0), (2, 5.0)], true));

        let mut merged = answer(&[(1, 1.0), (3, 1.0)], false);
        merged.add(answer(&[(2, 5.0), (3, 2.0)], false));
        let (page, more) = merged.page(&query(Order::Backwards, 3));
        let got: Vec<(i64, f64)> = page.iter().map(|(s, e)| (*s, e["n"])).collect();
        assert_eq!((got, more), (vec![(3, 3.0), (2, 5.0), (1, 1.0)], false));

        let mut merged = answer(&[(1, 1.0)], false);
        merged.add(answer(&[(2, 1.0)], true));
        assert!(merged.page(&query(Order::Forwards, 5)).1, "a node had more");
    }

    /// A peer's envelope is read back (interval ids of any unit) and anything else is
    /// refused, never a panic.
    #[test]
    fn peer_envelopes() {
        let body = Bytes::from_static(
            br#"{"items":[{"intervalId":"2025-02-03:15","entries":{"a":2}}],"more":true}"#,
        );
        let read = parse_peer(&body).unwrap();
        assert!(read.more);
        assert_eq!(read.intervals.len(), 1);
        for bad in [
            &b"[]"[..],
            b"{}",
            br#"{"items":[{"intervalId":"x"}],"more":false}"#,
        ] {
            assert!(parse_peer(&Bytes::copy_from_slice(bad)).is_none());
        }
    }

    /// Counts are integers in the answer, means keep their fraction.
    #[test]
    fn numbers() {
        assert_eq!(number(3.0), serde_json::json!(3));
        assert_eq!(number(1.5), serde_json::json!(1.5));
    }

    proptest! {
        /// Whatever the query params, parsing them and running the query on an app's
        /// statistics never panics (a cursor or bound at the ends of time included).
        #[test]
        fn queries_never_panic(
            unit in proptest::option::of("minute|hour|day|month|[a-z]{0,6}"),
            start in proptest::option::of("-?[0-9]{0,20}|[0-9]{4}-[0-9]{2}(-[0-9]{2}(:[0-9]{2}(:[0-9]{2})?)?)?"),
            end in proptest::option::of("-?[0-9]{0,20}|9999-12(-31(:23(:59)?)?)?"),
            page in proptest::option::of(prop_oneof![
                "-?[0-9]{0,20}",
                Just(i64::MAX.to_string()),
                Just(i64::MIN.to_string()),
            ]),
            limit in proptest::option::of("[0-9]{0,5}"),
            forwards in any::<bool>(),
        ) {
            let mut q = HashMap::new();
            for (name, value) in [("unit", unit), ("start", start), ("end", end), ("page", page), ("limit", limit)] {
                if let Some(value) = value {
                    q.insert(name.to_string(), value);
                }
            }
            q.insert("direction".into(), if forwards { "forwards" } else { "backwards" }.into());
            let stats = Stats::new(crate::config::StatsConfig::default());
            let now = 1_738_595_045_678;
            let app = stats.app("a", now).unwrap();
            app.received(Transport::Rest, Kind::Messages, 1, 1);
            if let Ok(query) = parse_query(&q, now) {
                let _ = app.query(&query);
            }
        }
    }
}
