//! One realtime connection over WebSocket: the upgrade, and the writer task that drains
//! the connection's bounded queue ([`Outlet`], in `outlet.rs`, shared with the comet
//! transport, whose long-polls drain the same queue) in batches.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tern_protocol::{action, code, ErrorInfo, Format, ProtocolMessage};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::gauges::OldestInBatch;
use crate::listener::ResetOnClose;
use crate::outlet::{
    encode_item, error_frame, refusal_frame, tally, Outbound, Outlet, Shared, WRITE_BATCH_MAX,
};
use crate::response::error_response;
use crate::session::{frame_too_large, Inbound, Received, Session};
use crate::state::EdgeState;
use crate::stats::Delivered;

/// The WebSocket read buffer each connection holds (see `upgrade`): a client's control
/// frames (ATTACH, HEARTBEAT) and small publishes fit; a larger one takes more than one
/// read (one per 256 B: the price of 256 B less in every idle connection).
const READ_BUFFER_BYTES: usize = 256;
/// How long a terminal frame (CLOSED, DISCONNECTED, ERROR) may take to reach the client.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /`: upgrades to a realtime connection (or describes the service to a browser).
pub(crate) async fn upgrade(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<HashMap<String, String>>,
    reset: Option<Extension<ResetOnClose>>,
    peer: Option<Extension<crate::hooks::Peer>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let arrival = crate::hooks::Arrival {
        transport: "web_socket",
        peer: peer.map(|Extension(peer)| peer.0),
    };
    let Ok(ws) = ws else {
        return axum::Json(serde_json::json!({
            "service": "tern",
            "serverId": state.config.server_id,
            "realtime": "connect with a WebSocket to this URL",
        }))
        .into_response();
    };
    let Ok(permit) = state.connection_permits.clone().try_acquire_owned() else {
        metrics::counter!("tern_connections_refused_total", "reason" => "connections_max")
            .increment(1);
        return error_response(ErrorInfo::new(
            code::RATE_LIMIT,
            "connection limit reached on this node",
        ));
    };
    let reset = reset.map(|Extension(reset)| reset);
    let frame_max = state.config.max_frame_size;
    // tungstenite allocates its read buffer up front (128 KiB by default) and holds it
    // for the connection's life: that was most of an idle connection's memory. It
    // grows for a frame larger than it (its header is read first, then the buffer is
    // reserved for the whole frame; the size limits apply before that), and reads
    // take at most its size at a time, so a smaller one costs a large frame more
    // reads, not correctness. The write buffer only grows while a batch is flushed
    // (docs/benchmarks.md, "Memory per idle connection").
    ws.max_message_size(frame_max)
        .max_frame_size(frame_max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(16 * 1024)
        // Not boxed: inline, the connection's future takes the room axum's upgrade task
        // already has for the WebSocket handshake (~370 B, done by then) and needs no
        // allocation of its own (with the `async fn`s gone, nothing in it is doubled).
        // What it starts from is boxed: axum's task keeps the callback's captures for
        // the connection's life, though they are used once the upgrade is done.
        .on_upgrade({
            let accepted = Box::new(Accepted {
                state,
                query,
                reset,
                arrival,
                permit,
            });
            move |socket| run(*accepted, socket)
        })
}

/// What a WebSocket connection starts from, taken from the upgrade request.
struct Accepted {
    state: Arc<EdgeState>,
    query: HashMap<String, String>,
    reset: Option<ResetOnClose>,
    arrival: crate::hooks::Arrival,
    /// This connection's place under `connections_max`, held until it ends.
    permit: OwnedSemaphorePermit,
}

/// The connection, from the upgraded socket to its end.
///
/// Not an `async fn`, and what is needed only to start is used before the future is
/// made: a future keeps what it captures for its whole life (an `async fn` each
/// argument twice: as captured and as moved into its body, rust-lang/rust#62958), and
/// this one lives as long as the connection. So the socket is split and its write half
/// handed to the writer here, and the query goes to the (boxed) opening, which frees it.
fn run(accepted: Accepted, socket: WebSocket) -> impl Future<Output = ()> + Send {
    let Accepted {
        state,
        query,
        reset,
        arrival,
        permit,
    } = accepted;
    let open = crate::state::OpenConnection::new("ws");
    let (sink, stream) = socket.split();
    let format = Format::from_param(query.get("format").map(String::as_str));
    let frame_max = state.config.max_frame_size;
    let (outlet, rx) = Outlet::new(state.config.outbound_queue_max);
    let writer = Writer {
        sink,
        format: format.unwrap_or(Format::Json),
        heartbeats: query.get("heartbeats").is_none_or(|v| v != "false"),
        idle: Duration::from_millis(state.config.max_idle_interval_ms),
        write_timeout: Duration::from_millis(state.config.write_timeout_ms),
        reset,
        shared: rx.shared,
        state: state.clone(),
    };
    let writer = tokio::spawn(write_loop(writer, rx.queue));
    // Boxed, and owning the query: opening (credentials, resume, a `$connect` function)
    // is a large state, and the query's map and strings are not needed past it.
    let opening = match format {
        None => {
            outlet.finish(Some(error_frame(ErrorInfo::new(
                code::BAD_REQUEST,
                "unsupported format: use json or msgpack",
            ))));
            None
        }
        Some(format) => {
            let outlet = outlet.clone();
            Some(Box::pin(async move {
                Session::open(state, &query, format, outlet, arrival).await
            }))
        }
    };
    async move {
        'session: {
            let Some(opening) = opening else {
                break 'session;
            };
            // Bound by a `let`, not matched in place: a `match` on the result would
            // keep it (a whole `Session`) in this future while the session runs.
            let session = match opening.await {
                Ok(session) => session,
                Err(err) => {
                    outlet.finish(Some(refusal_frame(err)));
                    break 'session;
                }
            };
            session.run(WsInbound(stream, frame_max)).await;
        }
        drop(outlet);
        // Bounded: every write of the writer is (`write_timeout_ms`, FINAL_WRITE_TIMEOUT).
        let _ = writer.await;
        drop(open);
        drop(permit);
    }
}

fn ws_message(format: Format, bytes: Bytes) -> WsMessage {
    match format {
        // serde_json output is UTF-8, so this never falls back; binary keeps bad input safe.
        Format::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => WsMessage::Text(text),
            Err(err) => WsMessage::Binary(Bytes::from(err.to_string())),
        },
        Format::Msgpack => WsMessage::Binary(bytes),
    }
}

fn encode(format: Format, item: Outbound) -> WsMessage {
    ws_message(format, encode_item(format, item))
}

/// The session's input from a WebSocket: one message is one frame. Carries the
/// connection's `max_frame_size` to name it in the error for a message over it.
struct WsInbound(SplitStream<WebSocket>, usize);

impl Inbound for WsInbound {
    /// Cancel-safe: `SplitStream::next` loses nothing if dropped.
    async fn next(&mut self) -> Received {
        loop {
            return match self.0.next().await {
                Some(Ok(WsMessage::Text(text))) => Received::Encoded(Bytes::from(text)),
                Some(Ok(WsMessage::Binary(bytes))) => Received::Encoded(bytes),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Err(err)) if over_frame_limit(&err) => {
                    Received::Refused(frame_too_large(self.1))
                }
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => Received::Gone,
            };
        }
    }
}

/// Whether a WebSocket read failed because the client's message or frame was over
/// `max_frame_size` (tungstenite refuses it before buffering it whole).
fn over_frame_limit(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|err| matches!(err, tungstenite::Error::Capacity(_)))
}

/// Why the writer stopped before the session ended the connection.
enum WriteFailed {
    /// The socket is gone (the session's reader sees that too).
    Closed,
    /// One write took longer than `write_timeout_ms`: the client does not read.
    Stalled,
}

/// One write to the client, bounded: a client that stops reading must not hold the
/// writer, and with it the connection and its socket, forever. Most writes complete at
/// once (into the socket or tungstenite's buffer); only one that has to wait arms a
/// timer, which keeps a clock read and a timer handle off the fan-out path.
async fn bounded(
    limit: Duration,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), WriteFailed> {
    let mut write = pin!(write);
    let result = match (&mut write).now_or_never() {
        Some(result) => result,
        // Boxed: only a write that has to wait gets here, and inline the timer would
        // sit in every idle connection's writer task.
        None => match Box::pin(tokio::time::timeout(limit, write)).await {
            Ok(result) => result,
            Err(_) => return Err(WriteFailed::Stalled),
        },
    };
    result.map_err(|_| WriteFailed::Closed)
}

/// The writer's half of the socket and how it writes.
struct Writer {
    sink: SplitSink<WebSocket, WsMessage>,
    format: Format,
    /// Protocol HEARTBEATs when idle (else WebSocket pings).
    heartbeats: bool,
    idle: Duration,
    write_timeout: Duration,
    /// Makes the socket close with a reset when the writer gives up on the client
    /// (`None` when the connection was not accepted by `listener`).
    reset: Option<ResetOnClose>,
    /// Shared with the session: the end it asks for, the overflow signal (a stalled
    /// writer ends the session (80020) just like a full queue, so its reader lets go of
    /// the socket too), and where delivered messages are counted.
    shared: Arc<Shared>,
    /// The node: its origin and queue high-water mark.
    state: Arc<EdgeState>,
}

impl OldestInBatch {
    /// Takes part in the batch's oldest event if `item` is a channel event.
    fn add_item(&mut self, item: &Outbound, local: tern_core::OriginId) {
        if let Outbound::Event(event, _) = item {
            self.add(event, local);
        }
    }
}

/// The writer: drains the queue in batches (one flush per batch), keeps the connection
/// alive when idle, and writes the terminal frame. Every write is bounded by
/// `write_timeout_ms`; past it the writer gives up on the client.
/// Not an `async fn`: this future lives as long as the connection, and an `async fn`
/// would hold its arguments (the `Writer`) twice (rust-lang/rust#62958).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold the Writer twice"
)]
fn write_loop(
    mut writer: Writer,
    mut queue: mpsc::Receiver<Outbound>,
) -> impl Future<Output = ()> + Send {
    async move {
        let mut deadline = Instant::now() + writer.idle;
        loop {
            let written = tokio::select! {
                biased;
                // The session ended the connection (or went away). Cancel-safe.
                _ = writer.shared.ended() => break,
                // Queued frames: write all that are ready, then flush once. Cancel-safe:
                // nothing is taken from the queue unless this arm runs.
                item = queue.recv() => {
                    let Some(item) = item else { break };
                    writer.batch(&mut queue, item).await
                }
                // Nothing sent for `idle`: a protocol HEARTBEAT (clients that asked for
                // them, and Python which asks for nothing) or a WebSocket ping.
                // Boxed, like the close below: rare, and inline they would make every
                // idle connection's writer task as large as they are.
                _ = tokio::time::sleep_until(deadline) => Box::pin(writer.heartbeat()).await,
            };
            match written {
                Ok(()) => deadline = Instant::now() + writer.idle,
                Err(failed) => return writer.give_up(failed),
            }
        }
        let last = writer.shared.end().cloned().flatten().map(|last| *last);
        Box::pin(writer.close(last)).await;
    }
}

impl Writer {
    async fn batch(
        &mut self,
        queue: &mut mpsc::Receiver<Outbound>,
        first: Outbound,
    ) -> Result<(), WriteFailed> {
        let limit = self.write_timeout;
        self.state.queue_high_water.saw(1 + queue.len());
        let origin = self.state.hub.origin();
        let mut oldest = OldestInBatch::default();
        let mut delivered = Delivered::default();
        tally(&mut delivered, &first);
        oldest.add_item(&first, origin);
        bounded(limit, self.sink.feed(encode(self.format, first))).await?;
        let mut written = 1u64;
        while written < WRITE_BATCH_MAX as u64 {
            let Ok(item) = queue.try_recv() else { break };
            tally(&mut delivered, &item);
            oldest.add_item(&item, origin);
            bounded(limit, self.sink.feed(encode(self.format, item))).await?;
            written += 1;
        }
        metrics::counter!("tern_frames_sent_total").increment(written);
        bounded(limit, self.sink.flush()).await?;
        oldest.record(self.state.delivery_histograms(), crate::now_ms());
        // Counted once the batch is out: a few relaxed adds per batch, none per frame.
        if let Some(stats) = self.shared.stats() {
            stats.delivered(&delivered);
        }
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), WriteFailed> {
        let beat = if self.heartbeats {
            let frame = ProtocolMessage {
                action: action::HEARTBEAT,
                ..Default::default()
            };
            ws_message(self.format, tern_protocol::encode(self.format, &frame))
        } else {
            WsMessage::Ping(Bytes::new())
        };
        bounded(self.write_timeout, self.sink.send(beat)).await
    }

    /// Writes the terminal frame (if any) and closes, within FINAL_WRITE_TIMEOUT.
    async fn close(mut self, last: Option<ProtocolMessage>) {
        let format = self.format;
        let limit = FINAL_WRITE_TIMEOUT.min(self.write_timeout);
        let sink = &mut self.sink;
        let closed = tokio::time::timeout(limit, async {
            if let Some(frame) = last {
                let _ = sink
                    .send(ws_message(format, tern_protocol::encode(format, &frame)))
                    .await;
            }
            let _ = sink.close().await;
        })
        .await;
        if closed.is_err() {
            self.give_up(WriteFailed::Stalled);
        }
    }

    /// Stops writing; the socket closes once the session's reader lets go of it too.
    fn give_up(self, failed: WriteFailed) {
        if let WriteFailed::Stalled = failed {
            metrics::counter!("tern_write_timeouts_total").increment(1);
            if let Some(reset) = &self.reset {
                reset.arm();
            }
            self.shared.stalled();
        }
    }
}
