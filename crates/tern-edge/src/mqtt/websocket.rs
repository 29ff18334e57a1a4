//! MQTT over WebSocket (MQTT 3.1.1 §6), on the MQTT port: a connection whose first byte
//! is `G` (an HTTP `GET`; an MQTT stream starts with CONNECT, 0x10) is served as HTTP,
//! and `GET /mqtt` (or `/`) upgrades to a WebSocket with the `mqtt` subprotocol. Its
//! binary messages carry the MQTT byte stream, which goes through the same connection
//! task as a TCP client's (bridged through an in-memory pipe).
//!
//! Bounded: the HTTP handshake must complete within `connect_timeout_ms` (then the
//! CONNECT within the same again), one request head of at most
//! `request_head_bytes_max`, WebSocket messages of at most `packet_bytes_max` plus a
//! fixed header, and the pipe's buffer.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connection::{self, SharedSessions};
use crate::config::MqttConfig;
use crate::state::EdgeState;

/// Bytes the pipe between a WebSocket and its connection task buffers each way.
const PIPE_BYTES: usize = 64 * 1024;
/// A fixed header's most bytes (type and flags, four of remaining length).
const FIXED_HEADER_BYTES_MAX: usize = 5;

/// What the upgrade handler needs.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) state: Arc<EdgeState>,
    pub(super) config: Arc<MqttConfig>,
    pub(super) sessions: SharedSessions,
    /// The client's address (for the `$connect` function).
    pub(super) peer: std::net::SocketAddr,
}

/// Whether a connection whose first byte is `first` speaks HTTP.
pub(super) fn is_http(first: u8) -> bool {
    first == b'G'
}

/// Serves HTTP on `stream` until it upgrades (or fails, or times out).
pub(super) async fn serve(stream: TcpStream, shared: Shared) {
    let handshake = Duration::from_millis(shared.config.connect_timeout_ms);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(handshake)
        .max_buf_size(shared.state.config.request_head_bytes_max.max(8_192));
    let app = Router::new()
        .route("/mqtt", get(upgrade))
        .route("/", get(upgrade))
        .with_state(shared);
    let service = TowerToHyperService::new(app);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    // Once upgraded the socket belongs to the WebSocket task and this returns.
    let _ = tokio::time::timeout(handshake, conn).await;
}

async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Shared>) -> Response {
    let max = shared.config.packet_bytes_max + FIXED_HEADER_BYTES_MAX;
    ws.protocols(["mqtt"])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| bridge(socket, shared))
        .into_response()
}

/// Carries the WebSocket's binary messages to a connection task as a byte stream, and
/// its bytes back as binary messages, until either side ends.
async fn bridge(mut socket: WebSocket, shared: Shared) {
    let (mut ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let write_timeout = Duration::from_millis(shared.state.config.write_timeout_ms);
    tokio::spawn(connection::run(
        theirs,
        shared.state,
        shared.config,
        shared.sessions,
        shared.peer,
    ));
    let mut buffer = vec![0u8; PIPE_BYTES];
    loop {
        tokio::select! {
            // From the client: MQTT bytes into the connection task.
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if ours.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Text frames are not MQTT (§6); a close, an error or the end ends it.
                _ => break,
            },
            // From the connection task: its packets as binary messages.
            read = ours.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let sent = tokio::time::timeout(
                        write_timeout,
                        socket.send(Message::Binary(buffer[..n].to_vec().into())),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                }
            },
        }
    }
    let _ = socket.close().await;
}
