//! The comet transport: the same realtime connection as a WebSocket one, over plain
//! HTTP requests, for clients that cannot hold a WebSocket (ably-js falls back to it:
//! `xhr_polling` in browsers, `comet` in Node).
//!
//! - `GET /comet/connect?…` takes the WebSocket's query (credentials, `format`,
//!   `clientId`, `resume`/`recover`, `echo`, `v`, …), opens a [`Session`] and answers as
//!   the connection's first receive: CONNECTED, and whatever follows it.
//! - `GET /comet/{connectionKey}/recv` waits for frames (long-poll).
//! - `POST /comet/{connectionKey}/send` carries an array of frames from the client.
//! - `GET|POST /comet/{connectionKey}/close` ends the connection (CLOSE);
//!   `…/disconnect` drops the transport and parks the connection for a resume.
//!
//! Every response body is an array of ProtocolMessages, in the connection's format.
//! With `stream=false` (browsers' `xhr_polling`) a receive answers with one array as
//! soon as there is something to send; otherwise (ably-js's Node transport) the response
//! streams one JSON array per line until `max_idle_interval_ms` after it began. A
//! long-poll with nothing to send answers a HEARTBEAT at that interval and a stream
//! just ends (ably-js counts a completed request as activity), so the client's idle
//! timer never fires on a healthy connection.
//!
//! The session is the WebSocket's: a [`Session`] whose [`Outlet`] queue (the same bound,
//! `outbound_queue_max`; overflow → 80020) is drained by receives instead of a socket
//! writer, and whose inbound frames come from sends ([`CometInbound`]). Bounds: one
//! receive drains at a time (a newer one makes the older answer at once, with what it
//! has or `[]`, since a client polls once at a time and a second poll means it gave up
//! on the first); a send body is at most `max_frame_size` (413, 40009, and the
//! connection fails as for a WebSocket message over it); a client with no receive open
//! for `comet_poll_timeout_ms` is a dropped transport (the usual grace period, then
//! presence leave). Each comet connection holds a `connections_max` permit; its HTTP
//! requests are HTTP connections (`http_connections_max`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use tern_protocol::{action, code, ErrorInfo, Format, ProtocolMessage};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::outlet::{encode_item, error_frame, tally, Outlet, OutletRx, WRITE_BATCH_MAX};
use crate::session::{Inbound, Received, Session};
use crate::state::EdgeState;
use crate::stats::Delivered;

/// Frames handed from send requests to the session before a send waits. A send waits
/// (its request stays unanswered) while the session works through earlier frames, as a
/// WebSocket reader does, so this only smooths the hand-off.
const INBOUND_FRAMES_MAX: usize = 64;
/// How long an ended connection's key still answers a receive with its last frame (a
/// CLOSED, an ERROR): the client polls again at once, so this only covers that gap.
const LINGER: Duration = Duration::from_secs(2);

/// The comet connections of this node by connection key. Bounded by `connections_max`:
/// every entry holds a connection permit while its session runs, and leaves the table
/// at most [`LINGER`] after the session ends.
#[derive(Default)]
pub(crate) struct Links(Mutex<HashMap<String, Arc<Link>>>);

impl Links {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Link>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Option<Arc<Link>> {
        self.lock().get(key).cloned()
    }

    fn insert(&self, key: String, link: Arc<Link>) {
        self.lock().insert(key, link);
    }

    /// Removes `key` if it still names `link`.
    fn remove(&self, key: &str, link: &Arc<Link>) {
        let mut links = self.lock();
        if links.get(key).is_some_and(|held| Arc::ptr_eq(held, link)) {
            links.remove(key);
        }
    }
}

/// One comet connection, as its HTTP requests see it.
struct Link {
    format: Format,
    /// Receives stream lines (JSON only) rather than answer once.
    stream: bool,
    /// Frames from send requests to the session.
    inbound: mpsc::Sender<Received>,
    /// The outlet's queue: held by the one receive that drains it.
    drain: tokio::sync::Mutex<Drain>,
    /// Receives open now, and since when none has been (see [`Polls`]).
    polls: Polls,
    /// The newest receive's ticket: an older receive that sees another ticket answers.
    ticket: AtomicU64,
    /// Woken when a newer receive arrives.
    takeover: Notify,
    /// The outlet's shared parts: where the app's delivered messages are counted.
    outlet: Arc<crate::outlet::Shared>,
}

impl Link {
    /// Counts a receive as open until the guard is dropped.
    fn open(self: &Arc<Link>) -> PollGuard {
        self.polls.state().open += 1;
        self.polls.changed.notify_waiters();
        PollGuard {
            link: self.clone(),
            until: None,
        }
    }
}

/// The receiving side of the connection's outlet.
struct Drain {
    rx: OutletRx,
    /// The terminal frame has been handed to a receive (or there was none): later
    /// receives find the connection gone.
    finished: bool,
}

/// What one wait on the outlet produced.
#[derive(Debug)]
enum Batch {
    /// Frames to send, encoded, and what they deliver.
    Frames(Vec<Bytes>, Delivered),
    /// Nothing to send before the receive's deadline.
    Idle,
    /// A newer receive took over.
    Superseded,
    /// The connection ended: its last frame, encoded (if it has one).
    Final(Option<Bytes>),
}

/// Receives open on a connection, and since when none has been. A connection whose
/// client has had no receive open for `comet_poll_timeout_ms` counts as dropped: the
/// client stopped polling (it went away, or its network did).
struct Polls {
    state: Mutex<PollState>,
    changed: Notify,
}

#[derive(Clone, Copy, Debug)]
struct PollState {
    open: usize,
    idle_since: Instant,
}

impl PollState {
    /// When the connection counts as dropped if nothing changes: `None` while a receive
    /// is open.
    fn expiry(&self, timeout: Duration) -> Option<Instant> {
        (self.open == 0).then(|| self.idle_since + timeout)
    }
}

impl Polls {
    fn new(now: Instant) -> Polls {
        Polls {
            state: Mutex::new(PollState {
                open: 0,
                idle_since: now,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, PollState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes once no receive has been open for `timeout`. Cancel-safe: it only
    /// reads the state.
    async fn stopped(&self, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let expiry = self.state().expiry(timeout);
            match expiry {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// An open receive (see [`Polls`]).
struct PollGuard {
    link: Arc<Link>,
    /// The receive counts as open until then, even once it is no longer (a stream).
    until: Option<Instant>,
}

impl PollGuard {
    /// Closes the receive now, but counts it as open until `at`.
    fn until(mut self, at: Instant) {
        self.until = Some(at);
    }
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        {
            let mut state = self.link.polls.state();
            state.open -= 1;
            let closed = self
                .until
                .map_or_else(Instant::now, |at| at.max(Instant::now()));
            state.idle_since = state.idle_since.max(closed);
        }
        self.link.polls.changed.notify_waiters();
    }
}

/// The session's input from send requests, and the end of its transport when the
/// client stops polling.
struct CometInbound {
    frames: mpsc::Receiver<Received>,
    link: Arc<Link>,
    poll_timeout: Duration,
}

impl Inbound for CometInbound {
    /// Cancel-safe: `mpsc::Receiver::recv` and [`Polls::stopped`] are.
    async fn next(&mut self) -> Received {
        tokio::select! {
            received = self.frames.recv() => received.unwrap_or(Received::Gone),
            _ = self.link.polls.stopped(self.poll_timeout) => {
                metrics::counter!("tern_comet_poll_timeouts_total").increment(1);
                Received::Gone
            }
        }
    }
}

/// `GET /comet/connect`: opens a connection and answers as its first receive.
pub(crate) async fn connect(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<HashMap<String, String>>,
    peer: Option<axum::Extension<crate::hooks::Peer>>,
) -> Response {
    let arrival = crate::hooks::Arrival {
        transport: "comet",
        peer: peer.map(|axum::Extension(peer)| peer.0),
    };
    let Some(format) = Format::from_param(query.get("format").map(String::as_str)) else {
        let error = ErrorInfo::new(code::BAD_REQUEST, "unsupported format: use json or msgpack");
        return frames_response(
            StatusCode::BAD_REQUEST,
            Format::Json,
            &[encode_frame(Format::Json, &error_frame(error))],
        );
    };
    let Ok(permit) = state.connection_permits.clone().try_acquire_owned() else {
        metrics::counter!("tern_connections_refused_total", "reason" => "connections_max")
            .increment(1);
        // DISCONNECTED, not ERROR: the client tries again later, as after a refused
        // WebSocket upgrade.
        let error = ErrorInfo::new(code::RATE_LIMIT, "connection limit reached on this node");
        return frames_response(
            StatusCode::TOO_MANY_REQUESTS,
            format,
            &[encode_frame(format, &disconnected(error))],
        );
    };
    let (outlet, rx) = Outlet::new(state.config.outbound_queue_max);
    let (inbound, frames) = mpsc::channel(INBOUND_FRAMES_MAX);
    let link = Arc::new(Link {
        format,
        stream: format == Format::Json && query.get("stream").is_none_or(|v| v != "false"),
        inbound,
        drain: tokio::sync::Mutex::new(Drain {
            rx,
            finished: false,
        }),
        polls: Polls::new(Instant::now()),
        ticket: Default::default(),
        takeover: Notify::new(),
        outlet: outlet.shared.clone(),
    });
    // This request is the first receive: the poll timeout counts from its end.
    let poll = link.open();
    match Session::open(state.clone(), &query, format, outlet.clone(), arrival).await {
        Ok(session) => {
            let key = session.key().to_owned();
            state.comet.insert(key.clone(), link.clone());
            let inbound = CometInbound {
                frames,
                link: link.clone(),
                poll_timeout: Duration::from_millis(state.config.comet_poll_timeout_ms),
            };
            let state = state.clone();
            let link = link.clone();
            tokio::spawn(async move {
                let open = crate::state::OpenConnection::new("comet");
                session.run(inbound).await;
                drop(open);
                tokio::time::sleep(LINGER).await;
                state.comet.remove(&key, &link);
                // Only now: the ended link (and its queue) counted until it is gone.
                drop(permit);
            });
        }
        Err(err) => outlet.finish(Some(crate::outlet::refusal_frame(err))),
    }
    drop(outlet);
    receive(&state, link, poll).await
}

/// `GET /comet/{connectionKey}/recv`: the next frames of the connection.
pub(crate) async fn recv(State(state): State<Arc<EdgeState>>, Path(key): Path<String>) -> Response {
    match state.comet.get(&key) {
        Some(link) => {
            let poll = link.open();
            receive(&state, link, poll).await
        }
        None => gone(Format::Json),
    }
}

/// `POST /comet/{connectionKey}/send`: an array of frames for the session, handed over
/// in order; answered (204) once all are queued for it (replies come by receive).
pub(crate) async fn send(
    State(state): State<Arc<EdgeState>>,
    Path(key): Path<String>,
    body: Body,
) -> Response {
    let Some(link) = state.comet.get(&key) else {
        return gone(Format::Json);
    };
    let limit = state.config.max_frame_size;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(err) if over_limit(&err) => {
            let error = ErrorInfo::with_status(
                code::MESSAGE_TOO_LARGE,
                StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                format!("comet request body over the maximum of {limit} bytes"),
            );
            return refuse(&link, error).await;
        }
        // The client went away mid-body: nothing to answer.
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let frames = match decode_frames(link.format, &bytes) {
        Ok(frames) => frames,
        Err(error) => return refuse(&link, error).await,
    };
    for frame in frames {
        if link
            .inbound
            .send(Received::Decoded(Box::new(frame)))
            .await
            .is_err()
        {
            return gone(link.format);
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `GET|POST /comet/{connectionKey}/close`: the client closes the connection.
pub(crate) async fn close(state: State<Arc<EdgeState>>, key: Path<String>) -> Response {
    end(state, key, action::CLOSE).await
}

/// `GET|POST /comet/{connectionKey}/disconnect`: the client drops this transport; the
/// connection is parked for a resume.
pub(crate) async fn disconnect(state: State<Arc<EdgeState>>, key: Path<String>) -> Response {
    end(state, key, action::DISCONNECT).await
}

async fn end(State(state): State<Arc<EdgeState>>, Path(key): Path<String>, how: u8) -> Response {
    let Some(link) = state.comet.get(&key) else {
        return gone(Format::Json);
    };
    let frame = ProtocolMessage {
        action: how,
        ..Default::default()
    };
    match link.inbound.send(Received::Decoded(Box::new(frame))).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => gone(link.format),
    }
}

/// Fails the connection with `error` (as a WebSocket frame over the limit or
/// undecodable would) and answers the send with it.
async fn refuse(link: &Link, error: ErrorInfo) -> Response {
    let _ = link.inbound.send(Received::Refused(error.clone())).await;
    crate::response::error_response(error)
}

/// A send body: an array of frames, decoded by `tern-protocol` with a frame's bounds.
fn decode_frames(format: Format, bytes: &[u8]) -> Result<Vec<ProtocolMessage>, ErrorInfo> {
    tern_protocol::decode_value(format, bytes).map_err(|err| err.to_error_info())
}

/// Whether reading a body failed because it was over the limit.
fn over_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Answers one receive: takes the outlet from an older receive (which then answers),
/// and answers once (long-poll) or streams lines until the receive's deadline.
async fn receive(state: &EdgeState, link: Arc<Link>, poll: PollGuard) -> Response {
    let ticket = link.ticket.fetch_add(1, Ordering::SeqCst) + 1;
    link.takeover.notify_waiters();
    let deadline = Instant::now() + Duration::from_millis(state.config.max_idle_interval_ms);
    if link.stream {
        return stream(link, ticket, deadline, poll).await;
    }
    let mut drain = link.drain.lock().await;
    if drain.finished {
        return gone(link.format);
    }
    let format = link.format;
    let frames = match next_batch(&link, &mut drain, ticket, deadline).await {
        Batch::Frames(frames, delivered) => {
            count(&link, &delivered, frames.len());
            frames
        }
        Batch::Idle => vec![encode_frame(format, &heartbeat())],
        Batch::Superseded => Vec::new(),
        Batch::Final(Some(last)) => vec![last],
        Batch::Final(None) => return gone(format),
    };
    frames_response(StatusCode::OK, format, &frames)
}

/// A streamed receive: one line (a JSON array) per batch, until the deadline, a newer
/// receive, or the connection's end. Each line takes the outlet only while it waits for
/// frames, so a stream the client stopped reading (hyper no longer polls its body)
/// holds nothing a newer receive needs; and the client counts as polling until the
/// deadline, not for as long as a stalled body lives.
async fn stream(link: Arc<Link>, ticket: u64, deadline: Instant, poll: PollGuard) -> Response {
    if link.drain.lock().await.finished {
        return gone(link.format);
    }
    poll.until(deadline);
    let lines = futures_util::stream::unfold((link, false), move |(link, done)| async move {
        if done {
            return None;
        }
        let batch = {
            let mut drain = link.drain.lock().await;
            next_batch(&link, &mut drain, ticket, deadline).await
        };
        let (frames, done) = match batch {
            Batch::Frames(frames, delivered) => {
                count(&link, &delivered, frames.len());
                (frames, false)
            }
            Batch::Final(Some(last)) => (vec![last], true),
            Batch::Idle | Batch::Superseded | Batch::Final(None) => return None,
        };
        let line = stream_line(&frames);
        Some((Ok::<_, std::convert::Infallible>(line), (link, done)))
    });
    let mut response = Body::from_stream(lines).into_response();
    set_headers(&mut response, Format::Json);
    response
}

/// Waits for what the receive should carry. Cancel-safe: frames are taken from the
/// queue only in the arm that returns them.
async fn next_batch(link: &Link, drain: &mut Drain, ticket: u64, deadline: Instant) -> Batch {
    let format = link.format;
    loop {
        let takeover = link.takeover.notified();
        tokio::pin!(takeover);
        takeover.as_mut().enable();
        if link.ticket.load(Ordering::SeqCst) != ticket {
            return Batch::Superseded;
        }
        if let Some(last) = drain.rx.shared.end().cloned() {
            drain.finished = true;
            return Batch::Final(last.map(|frame| encode_frame(format, &frame)));
        }
        let rx = &mut drain.rx;
        let woke = tokio::select! {
            biased;
            // The session ended the connection; the loop reads how.
            _ = rx.shared.ended() => Woke::Ended,
            item = rx.queue.recv() => Woke::Item(item),
            _ = tokio::time::sleep_until(deadline) => return Batch::Idle,
            _ = takeover => Woke::Again,
        };
        match woke {
            Woke::Item(Some(first)) => return take_batch(format, rx, first),
            // Outlets all gone: the session ended; `end` says how, else it just closed.
            Woke::Item(None) if rx.shared.end().is_none() => {
                drain.finished = true;
                return Batch::Final(None);
            }
            Woke::Ended | Woke::Item(None) | Woke::Again => {}
        }
    }
}

/// What woke a receive's wait.
enum Woke {
    /// The session ended the connection.
    Ended,
    Item(Option<crate::outlet::Outbound>),
    Again,
}

/// `first` and whatever else is queued, up to [`WRITE_BATCH_MAX`], encoded.
fn take_batch(format: Format, rx: &mut OutletRx, first: crate::outlet::Outbound) -> Batch {
    let mut delivered = Delivered::default();
    let mut frames = Vec::new();
    let mut next = Some(first);
    while let Some(item) = next {
        tally(&mut delivered, &item);
        frames.push(encode_item(format, item));
        next = (frames.len() < WRITE_BATCH_MAX)
            .then(|| rx.queue.try_recv().ok())
            .flatten();
    }
    Batch::Frames(frames, delivered)
}

/// Counts a batch handed to the client (after it is built, once per batch).
fn count(link: &Link, delivered: &Delivered, frames: usize) {
    metrics::counter!("tern_frames_sent_total").increment(frames as u64);
    if let Some(stats) = link.outlet.stats() {
        stats.delivered(delivered);
    }
}

fn encode_frame(format: Format, frame: &ProtocolMessage) -> Bytes {
    tern_protocol::encode(format, frame)
}

fn heartbeat() -> ProtocolMessage {
    ProtocolMessage {
        action: action::HEARTBEAT,
        ..Default::default()
    }
}

fn disconnected(error: ErrorInfo) -> ProtocolMessage {
    ProtocolMessage {
        action: action::DISCONNECTED,
        error: Some(error),
        ..Default::default()
    }
}

/// The answer for a connection key this node has no comet connection for (ended, or
/// never here): DISCONNECTED, so the client resumes (or recovers) on a new transport.
fn gone(format: Format) -> Response {
    let error = ErrorInfo::with_status(
        code::DISCONNECTED,
        StatusCode::NOT_FOUND.as_u16(),
        "no comet connection with this key on this node",
    );
    frames_response(
        StatusCode::NOT_FOUND,
        format,
        &[encode_frame(format, &disconnected(error))],
    )
}

/// Encoded frames as one array in `format`: their bytes joined, never re-encoded (a
/// channel event's encoding is shared by every subscriber).
fn frames_body(format: Format, frames: &[Bytes]) -> Bytes {
    let size: usize = frames.iter().map(|f| f.len() + 1).sum();
    let mut body = BytesMut::with_capacity(size + 8);
    match format {
        Format::Json => {
            body.put_u8(b'[');
            for (i, frame) in frames.iter().enumerate() {
                if i > 0 {
                    body.put_u8(b',');
                }
                body.put_slice(frame);
            }
            body.put_u8(b']');
        }
        Format::Msgpack => {
            // A msgpack array header, then the elements as they are (each one value).
            // At most WRITE_BATCH_MAX elements, so the u32 form always fits.
            match frames.len() {
                len @ 0..=15 => body.put_u8(0x90 | len as u8),
                len @ 16..=0xffff => {
                    body.put_u8(0xdc);
                    body.put_u16(len as u16);
                }
                len => {
                    body.put_u8(0xdd);
                    body.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
                }
            }
            for frame in frames {
                body.put_slice(frame);
            }
        }
    }
    body.freeze()
}

/// One line of a streamed receive: a JSON array and a newline (ably-js splits on it).
fn stream_line(frames: &[Bytes]) -> Bytes {
    let array = frames_body(Format::Json, frames);
    let mut line = BytesMut::with_capacity(array.len() + 1);
    line.put_slice(&array);
    line.put_u8(b'\n');
    line.freeze()
}

fn frames_response(status: StatusCode, format: Format, frames: &[Bytes]) -> Response {
    let mut response = (status, frames_body(format, frames)).into_response();
    set_headers(&mut response, format);
    response
}

fn set_headers(response: &mut Response, format: Format) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    // A long-poll's answer is for this request only; no proxy or browser may reuse it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(format: Format, actions: &[u8]) -> Vec<Bytes> {
        actions
            .iter()
            .map(|&action| {
                encode_frame(
                    format,
                    &ProtocolMessage {
                        action,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// A JSON body is the frames' own bytes joined into one array that decodes back to
    /// the same frames; empty is `[]`; a stream line is the array and one newline.
    #[test]
    fn json_body_is_an_array_of_the_frames() {
        let body = frames_body(Format::Json, &frames(Format::Json, &[0, 4, 15]));
        let decoded = decode_frames(Format::Json, &body).unwrap();
        let actions: Vec<u8> = decoded.iter().map(|f| f.action).collect();
        assert_eq!(actions, vec![0, 4, 15]);
        assert_eq!(&frames_body(Format::Json, &[])[..], b"[]");
        let line = stream_line(&frames(Format::Json, &[0]));
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    /// A msgpack body is one msgpack array (header, then each frame's value) that
    /// decodes back to the frames, past the 15-element fixarray limit too.
    #[test]
    fn msgpack_body_is_an_array_of_the_frames() {
        let actions: Vec<u8> = (0..20).map(|i| if i % 2 == 0 { 0 } else { 15 }).collect();
        let body = frames_body(Format::Msgpack, &frames(Format::Msgpack, &actions));
        let decoded = decode_frames(Format::Msgpack, &body).unwrap();
        assert_eq!(
            decoded.iter().map(|f| f.action).collect::<Vec<_>>(),
            actions
        );
    }

    /// A send body that is not an array of frames is 40000, never a panic.
    #[test]
    fn bad_send_bodies_are_40000() {
        for body in [&b"{}"[..], b"[{}]", b"[1]", b"", b"[{\"action\":15}] x"] {
            let err = decode_frames(Format::Json, body).unwrap_err();
            assert_eq!(
                err.code,
                code::BAD_REQUEST,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(decode_frames(Format::Json, b"[]").unwrap().is_empty());
    }

    fn link() -> Arc<Link> {
        let (outlet, rx) = Outlet::new(4);
        let (inbound, _) = mpsc::channel(1);
        Arc::new(Link {
            format: Format::Json,
            stream: false,
            inbound,
            drain: tokio::sync::Mutex::new(Drain {
                rx,
                finished: false,
            }),
            polls: Polls::new(Instant::now()),
            ticket: AtomicU64::new(0),
            takeover: Notify::new(),
            outlet: outlet.shared.clone(),
        })
    }

    /// `Polls::stopped` waits while a receive is open, fires `timeout` after the last
    /// one closed, and a stream's receive counts as open until its deadline.
    #[tokio::test]
    async fn stopped_polling_fires_after_the_timeout_from_the_last_receive() {
        let timeout = Duration::from_millis(100);
        let link = link();
        let open = link.open();
        let waiting = tokio::time::timeout(Duration::from_millis(300), link.polls.stopped(timeout));
        assert!(waiting.await.is_err(), "a receive is open");
        let closed_at = Instant::now();
        drop(open);
        link.polls.stopped(timeout).await;
        assert!(closed_at.elapsed() >= timeout);
        let streaming = link.open();
        let deadline = Instant::now() + Duration::from_millis(200);
        streaming.until(deadline);
        link.polls.stopped(timeout).await;
        assert!(Instant::now() >= deadline + timeout);
    }

    /// The poll timeout runs only while no receive is open, from the end of the last.
    #[test]
    fn poll_expiry_counts_from_the_last_receive() {
        let start = Instant::now();
        let timeout = Duration::from_secs(15);
        let open = PollState {
            open: 1,
            idle_since: start,
        };
        assert_eq!(open.expiry(timeout), None);
        let idle = PollState {
            open: 0,
            idle_since: start + Duration::from_secs(3),
        };
        assert_eq!(idle.expiry(timeout), Some(start + Duration::from_secs(18)));
    }
}
