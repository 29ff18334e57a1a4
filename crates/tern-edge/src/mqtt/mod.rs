//! MQTT 3.1.1 over TCP, and over WebSocket on the same port (`websocket`): an adapter
//! from MQTT packets to the same hub, capabilities and publish path as every other
//! transport (docs/mqtt.md). Packets are framed and decoded by `rumqttc`'s codec
//! (`mqttbytes::v4`); this module is only the adapter.
//!
//! # Layout
//! - `connection`: one connection's task (CONNECT, then one `select!` loop).
//! - `session`: its rules without I/O (credentials and CONNACK codes, payload mapping,
//!   the QoS 1 window, the packet rate).
//! - `sessions`: persistent sessions parked on this node, one live connection per
//!   client identifier.
//! - `handoff`: a session moves to the node its client reconnects to.
//! - `topic`: topics are channel names.
//! - `websocket`: MQTT over WebSocket, bridged to a connection task.
//!
//!
//! - Credentials: user name `appId.keyId` and the key's secret as password, or a token
//!   (Tern token or JWT) as user name with an empty password (`session::authenticate`).
//! - Topics are channel names, verbatim (`topic`); no wildcards.
//! - PUBLISH QoS 0 and 1 go through `rest::apply_publish` (capability, the publish
//!   budget, the hub); the PUBACK of a QoS 1 PUBLISH is sent from
//!   `EdgeState::after_durable`, so, like an Ably ACK, it means stored (and on
//!   replicas in a cluster). MQTT 3.1.1 cannot refuse a PUBLISH, so a refused one
//!   (capability, size) or one the store lost closes the connection without a PUBACK:
//!   the client sends it again after reconnecting.
//! - SUBSCRIBE attaches the connection to the channel (subscribe capability, else SUBACK
//!   0x80); messages go out as PUBLISH with the granted QoS (0 or 1, QoS 2 is granted
//!   as 1), QoS 1 ones in a bounded window of unacknowledged packet ids.
//! - Keep-alive: a client that sends nothing for 1.5 × its keep-alive is disconnected;
//!   the last will is published (as an Ably message) when the connection ends any way
//!   but by DISCONNECT.
//! - Persistent sessions (`clean_session = 0`, `sessions`): subscriptions with their
//!   channel cursors and unacknowledged QoS 1 messages are parked on this node for
//!   `connection_state_ttl_ms`; a reconnect with the same client identifier resumes
//!   them: messages sent and not acknowledged again (DUP), then exactly what was
//!   published meanwhile, from the channel log. A reconnect to another node takes the
//!   session over from the node that parked it (`handoff`).
//!
//! Bounded: the packet rate (`inbound_frames_per_second` PUBLISHes and
//! `control_frames_per_second` others; past either the socket is not read until the
//! second is over), packet size (`MqttConfig::packet_bytes_max`, checked on the fixed header
//! before the body is read), connections (`connections_max`, shared with WebSocket and
//! SSE), subscriptions per connection, QoS 1 publishes awaiting storage and deliveries
//! awaiting PUBACK, the queue of deliveries (`outbound_queue_max`: overflow ends the
//! connection), the CONNECT wait, and every write (`write_timeout_ms`).

mod connection;
pub(crate) mod handoff;
mod session;
mod sessions;
mod topic;
mod websocket;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

pub(crate) use connection::SharedSessions;

use crate::config::MqttConfig;
use crate::state::EdgeState;

/// Accepts MQTT connections on `listener` until the node shuts down; each is served by
/// its own task. A connection over `connections_max` gets CONNACK 3 (server
/// unavailable) and is closed.
pub async fn serve(listener: TcpListener, state: Arc<EdgeState>, config: MqttConfig) {
    let sessions = state
        .mqtt_sessions
        .get_or_init(|| {
            Arc::new(std::sync::Mutex::new(sessions::Sessions::new(
                config.sessions_max,
            )))
        })
        .clone();
    let config = Arc::new(config);
    let mut shutdown = state.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, "mqtt accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        state.arrived();
        let shared = websocket::Shared {
            state: state.clone(),
            config: config.clone(),
            sessions: sessions.clone(),
            peer,
        };
        let span = tracing::debug_span!("mqtt", %peer);
        tokio::spawn(serve_one(stream, shared).instrument(span));
    }
}

/// One accepted connection: MQTT over TCP, or HTTP for MQTT over WebSocket, told apart
/// by its first byte (waited for at most `connect_timeout_ms`).
async fn serve_one(stream: TcpStream, shared: websocket::Shared) {
    let wait = Duration::from_millis(shared.config.connect_timeout_ms);
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Ok(Ok(1)) if websocket::is_http(first[0]) => websocket::serve(stream, shared).await,
        Ok(Ok(1)) => {
            let peer = shared.peer;
            connection::run(stream, shared.state, shared.config, shared.sessions, peer).await
        }
        _ => {}
    }
}

/// What the fuzzer drives (`fuzz/`). Not part of the crate's API.
#[doc(hidden)]
pub mod fuzzing {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::Packet;

    /// Frames and decodes `bytes` as a client's stream, as a connection reads it, and
    /// runs every decoded packet's topics through the topic mapping and every payload
    /// through both payload mappings (which must give it back unchanged). Returns how
    /// many packets were decoded before the first error or the end.
    pub fn inbound(bytes: &[u8], packet_bytes_max: usize) -> usize {
        let mut buffer = BytesMut::from(bytes);
        let mut decoded = 0;
        while let Ok(Some(packet)) = super::connection::next_packet(&mut buffer, packet_bytes_max) {
            decoded += 1;
            let mut topics = Vec::new();
            match packet {
                Packet::Connect(connect) => {
                    if let Some(will) = connect.last_will {
                        topics.push(will.topic);
                    }
                }
                Packet::Publish(publish) => {
                    let message = super::session::message_of(publish.payload.clone());
                    assert_eq!(super::session::payload_of(&message), publish.payload);
                    topics.push(publish.topic);
                }
                Packet::Subscribe(subscribe) => {
                    topics.extend(subscribe.filters.into_iter().map(|f| f.path));
                }
                Packet::Unsubscribe(unsubscribe) => topics.extend(unsubscribe.topics),
                _ => {}
            }
            for topic in &topics {
                if let Ok(channel) = super::topic::channel(topic) {
                    assert_eq!(channel, topic, "a topic maps to the channel of its name");
                }
            }
        }
        decoded
    }
}
