//! One MQTT connection: CONNECT, then one `select!` loop over the client's packets,
//! deliveries from the hub, commits of its QoS 1 publishes, keep-alive, token expiry
//! and shutdown.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tern_auth::{AuthContext, ClientIdentity, Operation};
use tern_core::{AttachOptions, ChannelEvent, ChannelKey, Cursor, Subscriber};
use tern_protocol::{flags, ErrorInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::session::{self, Inflight, Rate, Unacked};
use super::sessions::{Parked, ParkedSubscription, SessionKey, Sessions};
use super::topic;
use crate::config::MqttConfig;
use crate::now_ms;
use crate::rest::apply_publish;
use crate::state::EdgeState;
use crate::stats::Transport;

/// Longest a subscription waits for a channel's state from the cluster before it
/// attaches with what this node has (as an ATTACH does).
const WARM_WAIT: Duration = Duration::from_secs(4);
/// What one socket read asks room for.
const READ_CHUNK_BYTES: usize = 8_192;
/// Longest a CONNECT waits for the live connection of its client identifier to end
/// (and park its session) after superseding it.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(2);
/// The node's persistent sessions and live client identifiers.
pub(crate) type SharedSessions = Arc<std::sync::Mutex<Sessions>>;
/// CONNACK 3 (server unavailable), written to a connection over `connections_max`.
const CONNACK_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];

/// The next whole packet in `buffer` (consumed from it), `None` while only part of one
/// has arrived. A packet whose remaining length is over `packet_bytes_max` is an error
/// as soon as its fixed header is in, before its body is read.
pub(super) fn next_packet(
    buffer: &mut BytesMut,
    packet_bytes_max: usize,
) -> Result<Option<Packet>, CodecError> {
    match Packet::read(buffer, packet_bytes_max) {
        Ok(packet) => Ok(Some(packet)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(err) => Err(err),
    }
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT: no will.
    Disconnect,
    /// The node shuts down.
    Shutdown,
    /// Anything else (the client went away, broke the protocol, was refused, timed
    /// out, read too slowly): the will is published.
    Abnormal(String),
}

impl End {
    fn abnormal(reason: impl Into<String>) -> End {
        End::Abnormal(reason.into())
    }
}

/// One channel's attachment on behalf of the connection: queues its events, tagged
/// with the topic.
struct Sink {
    topic: Arc<str>,
    queue: mpsc::Sender<(Arc<str>, Arc<ChannelEvent>)>,
    /// Set when the queue overflowed: the connection then ends (the hub has already
    /// dropped this attachment).
    overflow: Arc<AtomicBool>,
}

impl Subscriber for Sink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let accepted = self
            .queue
            .try_send((self.topic.clone(), event.clone()))
            .is_ok();
        if !accepted {
            metrics::counter!("tern_outbound_overflows_total").increment(1);
            self.overflow.store(true, Ordering::Release);
        }
        accepted
    }
}

struct Subscription {
    key: ChannelKey,
    qos: QoS,
    /// After the last event taken from the channel: where a persistent session resumes.
    cursor: Cursor,
}

/// A message taken from the hub, waiting for room in the QoS 1 window.
struct Outgoing {
    topic: Arc<str>,
    qos: QoS,
    payload: Bytes,
}

/// What the connection's loop waits on besides its socket.
struct Inputs {
    /// Events of the subscribed channels, tagged with the topic.
    events: mpsc::Receiver<(Arc<str>, Arc<ChannelEvent>)>,
    committed: mpsc::UnboundedReceiver<Committed>,
    /// Keep-alive: the longest the client may stay silent.
    silence_max: Option<Duration>,
}

/// The commit of one QoS 1 publish: its packet id and, if it was not stored, why.
type Committed = (u16, Option<ErrorInfo>);

struct Connection {
    state: Arc<EdgeState>,
    config: Arc<MqttConfig>,
    id: Arc<str>,
    /// When the CONNECT was accepted (for `connection.disconnected`).
    connected_at_ms: i64,
    /// Numbers this node's MQTT connections (the live one of a client identifier).
    number: u64,
    /// App and client identifier; `None` for an empty identifier (a clean session of
    /// its own).
    session_key: Option<SessionKey>,
    /// `clean_session = 0`: parked when the connection ends.
    persistent: bool,
    sessions: SharedSessions,
    /// Notified when a newer connection with the same client identifier arrives.
    superseded: Arc<Notify>,
    auth: AuthContext,
    identity: ClientIdentity,
    will: Option<LastWill>,
    /// By channel name, which is the topic.
    subscriptions: HashMap<Arc<str>, Subscription>,
    inflight: Inflight,
    /// Messages of the hub's latest event not yet sent (the QoS 1 window was full):
    /// at most one event's messages, since the queue is read only when this is empty.
    outgoing: VecDeque<Outgoing>,
    events_tx: mpsc::Sender<(Arc<str>, Arc<ChannelEvent>)>,
    overflow: Arc<AtomicBool>,
    /// Unbounded, but holds at most `pending_acks` items: one per QoS 1 publish
    /// awaiting its commit, and the socket is not read past `pending_acks_max`.
    committed_tx: mpsc::UnboundedSender<Committed>,
    pending_acks: usize,
    rate: Rate,
    /// Encoded packets not yet written.
    out: BytesMut,
    writer: Writer,
}

/// The connection's byte stream, either way: a TCP socket, or the bridge to an MQTT
/// over WebSocket connection (`websocket`).
type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Serves one TCP connection until it ends.
pub(super) async fn run(
    stream: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    state: Arc<EdgeState>,
    config: Arc<MqttConfig>,
    sessions: SharedSessions,
    peer: std::net::SocketAddr,
) {
    let write_timeout = Duration::from_millis(state.config.write_timeout_ms);
    let Ok(_permit) = state.connection_permits.clone().try_acquire_owned() else {
        metrics::counter!("tern_connections_refused_total", "reason" => "connections_max")
            .increment(1);
        let mut stream = stream;
        let _ = tokio::time::timeout(write_timeout, stream.write_all(&CONNACK_UNAVAILABLE)).await;
        return;
    };
    let _open = crate::state::OpenConnection::new("mqtt");
    let (reader, writer) = tokio::io::split(stream);
    let (mut reader, writer): (Reader, Writer) = (Box::new(reader), Box::new(writer));
    let mut inbound = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let connect_wait = Duration::from_millis(config.connect_timeout_ms);
    let first = tokio::time::timeout(
        connect_wait,
        read_packet(&mut reader, &mut inbound, config.packet_bytes_max),
    )
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Err(CodecError::InvalidProtocolLevel(_))) => {
            // A CONNECT of a protocol level the codec knows not: say which we speak.
            let mut writer = writer;
            let refusal = connack(ConnectReturnCode::RefusedProtocolVersion);
            let _ = tokio::time::timeout(write_timeout, writer.write_all(&refusal)).await;
            return;
        }
        other => {
            tracing::debug!(?other, "mqtt connection without a CONNECT");
            metrics::counter!("tern_mqtt_refused_total", "reason" => "no_connect").increment(1);
            return;
        }
    };
    let accepted = accept(connect, &state, &config, sessions, writer, peer).await;
    let Some((mut connection, inputs)) = accepted else {
        return;
    };
    let end = connection.serve(&mut reader, inbound, inputs).await;
    connection.close(end);
}

fn connack(code: ConnectReturnCode) -> BytesMut {
    let mut out = BytesMut::new();
    // Encoding a CONNACK cannot fail (its size is fixed).
    let _ = ConnAck::new(code, false).write(&mut out);
    out
}

/// Reads until one whole packet is in `inbound`.
async fn read_packet(
    reader: &mut Reader,
    inbound: &mut BytesMut,
    packet_bytes_max: usize,
) -> Result<Packet, CodecError> {
    loop {
        if let Some(packet) = next_packet(inbound, packet_bytes_max)? {
            return Ok(packet);
        }
        inbound.reserve(READ_CHUNK_BYTES);
        if reader.read_buf(inbound).await? == 0 {
            return Err(CodecError::InsufficientBytes(1));
        }
    }
}

/// Checks the CONNECT and answers it: CONNACK 0 and a connection to serve, or the
/// refusal's code and `None`.
async fn accept(
    connect: Connect,
    state: &Arc<EdgeState>,
    config: &Arc<MqttConfig>,
    sessions: SharedSessions,
    mut writer: Writer,
    peer: std::net::SocketAddr,
) -> Option<(Connection, Inputs)> {
    let write_timeout = Duration::from_millis(state.config.write_timeout_ms);
    let number = next_connection_number();
    let id: Arc<str> = format!("mqtt-{}-{number}", state.node_tag).into();
    let refuse = |code: ConnectReturnCode, why: &'static str| {
        metrics::counter!("tern_mqtt_refused_total", "reason" => why).increment(1);
        tracing::debug!(?code, client = %connect.client_id, why, "mqtt CONNECT refused");
        connack(code)
    };
    let checked = match session::authenticate(&state.keys, &connect, now_ms()) {
        Ok((mut auth, mut identity)) => {
            // Every CONNECT is a new connection: the app's `$connect` function, if any,
            // may refuse it (CONNACK 5, MQTT 3.1.1 has no reason text) or narrow its
            // capability, which the will is then checked against.
            let arrival = crate::hooks::Arrival {
                transport: "mqtt",
                peer: Some(peer),
            };
            match crate::hooks::on_connect(state, &id, arrival, &mut auth, &mut identity).await {
                Ok(_) => Ok((auth, identity)),
                Err(error) => {
                    tracing::info!(client = %connect.client_id, code = error.code, reason = %error.message, "mqtt CONNECT refused by the connect function");
                    Err(refuse(ConnectReturnCode::NotAuthorized, "function"))
                }
            }
        }
        Err(code) => Err(refuse(code, "connect")),
    };
    let checked = checked.and_then(|(auth, id)| {
        // A will the credential could not publish is refused now, not lost later.
        let will_allowed = connect.last_will.as_ref().is_none_or(|will| {
            topic::channel(&will.topic)
                .is_ok_and(|channel| auth.capability.allows(channel, Operation::Publish))
        });
        if will_allowed {
            Ok((auth, id))
        } else {
            Err(refuse(ConnectReturnCode::NotAuthorized, "connect"))
        }
    });
    let (auth, identity) = match checked {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let _ = tokio::time::timeout(write_timeout, writer.write_all(&refusal)).await;
            return None;
        }
    };
    let (events_tx, events_rx) = mpsc::channel(state.config.outbound_queue_max.max(1));
    let (committed_tx, committed_rx) = mpsc::unbounded_channel();
    let session_key =
        (!connect.client_id.is_empty()).then(|| (auth.app_id.clone(), connect.client_id.clone()));
    let superseded = Arc::new(Notify::new());
    let parked = match &session_key {
        Some(key) => {
            take_over(&sessions, key, number).await;
            let mut sessions = sessions.lock().unwrap_or_else(|p| p.into_inner());
            let clean = connect.clean_session;
            sessions.connect(key, number, superseded.clone(), clean, now_ms())
        }
        None => None,
    };
    // Not parked here: the client may have been connected to another node.
    let parked = match (parked, &connect.login) {
        (None, Some(login)) if !connect.clean_session && !connect.client_id.is_empty() => {
            super::handoff::fetch(state, login, &connect.client_id).await
        }
        (parked, _) => parked,
    };
    let mut connection = Connection {
        state: state.clone(),
        config: config.clone(),
        id,
        connected_at_ms: now_ms(),
        number,
        session_key,
        persistent: !connect.clean_session,
        sessions,
        superseded,
        auth,
        identity,
        will: connect.last_will,
        subscriptions: HashMap::new(),
        inflight: Inflight::new(config.inflight_max),
        outgoing: VecDeque::new(),
        events_tx,
        overflow: Arc::new(AtomicBool::new(false)),
        committed_tx,
        pending_acks: 0,
        rate: Rate::new(
            state.config.inbound_frames_per_second,
            state.config.control_frames_per_second,
        ),
        out: BytesMut::new(),
        writer,
    };
    connection.encode(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        parked.is_some(),
    )));
    if let Some(parked) = parked {
        connection.resume(parked).await;
    }
    metrics::counter!("tern_mqtt_connections_total").increment(1);
    Some((
        connection,
        Inputs {
            events: events_rx,
            committed: committed_rx,
            silence_max: keep_alive(connect.keep_alive),
        },
    ))
}

/// Supersedes the live connection of `key`, if another, and waits (bounded) until it
/// has ended and parked its session.
pub(super) async fn take_over(sessions: &SharedSessions, key: &SessionKey, number: u64) {
    let deadline = Instant::now() + SUPERSEDE_WAIT;
    loop {
        let live = sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live_other(key, number);
        let Some(live) = live else {
            return;
        };
        if Instant::now() >= deadline {
            tracing::warn!("mqtt: superseded connection did not end in time");
            return;
        }
        live.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn next_connection_number() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How long the connection may be silent: 1.5 × the client's keep-alive, none for 0.
fn keep_alive(seconds: u16) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_millis(u64::from(seconds) * 1_500))
}

impl Connection {
    /// The connection's loop. Each turn handles the whole packets already read, writes
    /// what they produced, then waits for the next input.
    async fn serve(
        &mut self,
        reader: &mut Reader,
        mut inbound: BytesMut,
        mut inputs: Inputs,
    ) -> End {
        let mut shutdown = self.state.shutdown.clone();
        let expiry = self.auth.expires_ms.map(|at| {
            Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64)
        });
        let mut silent_until = inputs.silence_max.map(|max| Instant::now() + max);
        loop {
            // Packets already read wait too while the rate is spent.
            while self.rate.paused_until(now_ms()).is_none() {
                match next_packet(&mut inbound, self.config.packet_bytes_max) {
                    Ok(Some(packet)) => {
                        silent_until = inputs.silence_max.map(|max| Instant::now() + max);
                        let publish = matches!(packet, Packet::Publish(_));
                        self.rate.count(publish, now_ms());
                        if let Err(end) = self.handle(packet).await {
                            let _ = self.flush().await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => return End::abnormal(format!("malformed packet: {err}")),
                }
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            if self.overflow.load(Ordering::Acquire) {
                return End::abnormal("too slow: the outbound queue overflowed");
            }
            let now = now_ms();
            let paused_until = self.rate.paused_until(now).map(|until| {
                Instant::now() + Duration::from_millis(until.saturating_sub(now).max(0) as u64)
            });
            let read_more =
                self.pending_acks < self.config.pending_acks_max && paused_until.is_none();
            let take_events = self.outgoing.is_empty();
            inbound.reserve(READ_CHUNK_BYTES);
            // Every arm is cancellation safe: `read_buf` and `recv` lose nothing when
            // another arm wins, and the timers are recreated each turn.
            tokio::select! {
                // The client's bytes (not read while too many publishes await storage or
                // the packet rate is spent).
                read = reader.read_buf(&mut inbound), if read_more => match read {
                    Ok(0) => return End::abnormal("closed by the client"),
                    Ok(_) => {}
                    Err(err) => return End::abnormal(format!("read failed: {err}")),
                },
                // Deliveries (not taken while the QoS 1 window holds back messages).
                Some((topic, event)) = inputs.events.recv(), if take_events => {
                    self.deliver(topic, &event);
                }
                // A QoS 1 publish is stored (or lost): PUBACK, in publish order.
                Some((packet_id, error)) = inputs.committed.recv() => {
                    self.pending_acks -= 1;
                    if let Some(error) = error {
                        // No PUBACK: the client sends it again after reconnecting.
                        return End::abnormal(format!("publish not stored: {}", error.message));
                    }
                    self.encode(Packet::PubAck(PubAck::new(packet_id)));
                }
                // The rate window is over: read again (next turn).
                _ = sleep_until(paused_until) => {}
                _ = sleep_until(silent_until) => {
                    return End::abnormal("keep-alive: no packet for 1.5 x keep-alive");
                }
                _ = sleep_until(expiry) => return End::abnormal("token expired"),
                // A newer connection with this client identifier (MQTT 3.1.1 §3.1.4).
                _ = self.superseded.notified() => {
                    return End::abnormal("superseded by a new connection with the same client id");
                }
                _ = shutdown.changed() => return End::Shutdown,
            }
        }
    }

    /// One packet from the client. `Err` ends the connection.
    async fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::PubAck(ack) => {
                self.inflight.ack(ack.pkid);
                self.send_outgoing();
                Ok(())
            }
            Packet::Subscribe(subscribe) => {
                self.subscribe(subscribe).await;
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.unsubscribe(unsubscribe);
                Ok(())
            }
            Packet::PingReq => {
                self.encode(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect => Err(End::Disconnect),
            // A second CONNECT, QoS 2 flow packets (QoS 2 is never granted) and
            // server-to-client packets are protocol violations.
            other => Err(End::abnormal(format!("unexpected packet: {other:?}"))),
        }
    }

    /// A PUBLISH from the client: into the same publish path as REST. MQTT 3.1.1 has no
    /// way to refuse one, so a refusal closes the connection. A before-publish function
    /// is awaited here, holding the connection's later packets: MQTT answers PUBLISHes
    /// in order anyway, and a function's timeout is far below the keep-alive.
    async fn publish(&mut self, publish: Publish) -> Result<(), End> {
        if publish.qos == QoS::ExactlyOnce {
            return Err(End::abnormal("QoS 2 PUBLISH (QoS 2 is not supported)"));
        }
        let channel = topic::channel(&publish.topic).map_err(|err| {
            End::abnormal(format!("PUBLISH to topic '{}': {err:?}", publish.topic))
        })?;
        let message = session::message_of(publish.payload);
        let applied = apply_publish(
            &self.state,
            &self.auth,
            &self.identity,
            channel,
            vec![message],
            Transport::Realtime,
        )
        .await
        .map_err(|err| {
            metrics::counter!("tern_mqtt_refused_total", "reason" => "publish").increment(1);
            End::abnormal(format!("PUBLISH refused: {} {}", err.code, err.message))
        })?;
        if publish.qos == QoS::AtLeastOnce {
            self.pending_acks += 1;
            let committed = self.committed_tx.clone();
            let packet_id = publish.pkid;
            self.state.after_durable(
                Some(applied.key),
                applied.store_mark,
                Box::new(move |durability| {
                    let _ = committed.send((packet_id, durability.error()));
                }),
            );
        }
        Ok(())
    }

    async fn subscribe(&mut self, subscribe: Subscribe) {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            codes.push(self.subscribe_one(&filter.path, filter.qos).await);
        }
        self.encode(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
    }

    /// One topic filter of a SUBSCRIBE: attached to its channel with the granted QoS,
    /// or 0x80 (a wildcard, a name Ably refuses, no subscribe capability, too many
    /// subscriptions, a channel the hub will not attach).
    async fn subscribe_one(&mut self, filter: &str, requested: QoS) -> SubscribeReasonCode {
        let Ok(channel) = topic::channel(filter) else {
            return SubscribeReasonCode::Failure;
        };
        if !self.auth.capability.allows(channel, Operation::Subscribe) {
            return SubscribeReasonCode::Failure;
        }
        let qos = session::granted(requested);
        if let Some(existing) = self.subscriptions.get_mut(channel) {
            existing.qos = qos;
            return SubscribeReasonCode::Success(qos);
        }
        if self.subscriptions.len() >= self.config.subscriptions_per_connection_max {
            return SubscribeReasonCode::Failure;
        }
        match self.attach(channel.into(), qos, None).await {
            Some(_) => SubscribeReasonCode::Success(qos),
            None => SubscribeReasonCode::Failure,
        }
    }

    /// Attaches the connection to `channel` (from `resume_from` when a persistent
    /// session resumes) and records the subscription. `Some` holds the events to
    /// deliver first (those after `resume_from`); `None` if the hub refused.
    async fn attach(
        &mut self,
        channel: Arc<str>,
        qos: QoS,
        resume_from: Option<Cursor>,
    ) -> Option<Vec<Arc<ChannelEvent>>> {
        let key = ChannelKey::new(&self.auth.app_id, &channel);
        if let Some(cluster) = &self.state.cluster {
            if let Some(ready) = cluster.warm(&key) {
                let _ = tokio::time::timeout(WARM_WAIT, ready).await;
            }
        }
        let sink = Arc::new(Sink {
            topic: channel.clone(),
            queue: self.events_tx.clone(),
            overflow: self.overflow.clone(),
        });
        let options = AttachOptions {
            modes: flags::SUBSCRIBE,
            echo: true,
            resume_from: resume_from.clone(),
            rewind: None,
            delta: false,
        };
        let mut cursor = resume_from.clone().unwrap_or_default();
        let mut backlog = Vec::new();
        let attached = self.state.hub.attach(
            &key,
            self.id.clone(),
            options,
            sink,
            |snapshot| {
                if resume_from.is_none() || snapshot.continuity_lost {
                    if let Some(now) = Cursor::decode(&snapshot.channel_serial) {
                        cursor = now;
                    }
                }
                if snapshot.continuity_lost {
                    tracing::debug!(%channel, "mqtt session resumed after the channel log");
                }
                backlog.clone_from(&snapshot.backlog);
            },
            now_ms(),
        );
        attached.ok()?;
        self.subscriptions
            .insert(channel, Subscription { key, qos, cursor });
        Some(backlog)
    }

    /// Takes back a parked session: unacknowledged QoS 1 messages again (DUP, same
    /// packet ids), then what was taken but not sent, then each subscription from its
    /// cursor (what was published meanwhile first). A subscription the credential no
    /// longer allows is dropped.
    async fn resume(&mut self, parked: Parked) {
        // Only what the new credential may still read (it may be another one).
        let allowed = |topic: &str| self.auth.capability.allows(topic, Operation::Subscribe);
        let unacked: Vec<_> = parked
            .unacked
            .into_iter()
            .filter(|(_, message)| allowed(&message.topic))
            // Held to this node's limits too: a session may come from another node.
            .take(self.config.inflight_max)
            .collect();
        let unsent: Vec<_> = parked
            .unsent
            .into_iter()
            .filter(|(topic, _, _)| allowed(topic))
            .take(self.state.config.outbound_queue_max)
            .collect();
        for (id, message) in unacked {
            let mut publish = Publish::from_bytes(
                message.topic.clone(),
                QoS::AtLeastOnce,
                message.payload.clone(),
            );
            publish.pkid = id;
            publish.dup = true;
            self.inflight.restore(id, message);
            self.encode(Packet::Publish(publish));
        }
        for (topic, qos, payload) in unsent {
            self.outgoing.push_back(Outgoing {
                topic,
                qos,
                payload,
            });
        }
        let subscriptions_max = self.config.subscriptions_per_connection_max;
        for subscription in parked.subscriptions.into_iter().take(subscriptions_max) {
            let channel = subscription.channel;
            if !self.auth.capability.allows(&channel, Operation::Subscribe) {
                continue;
            }
            let resumed = self
                .attach(channel.clone(), subscription.qos, Some(subscription.cursor))
                .await;
            for event in resumed.unwrap_or_default() {
                self.deliver(channel.clone(), &event);
            }
        }
        self.send_outgoing();
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        for topic in &unsubscribe.topics {
            if let Some(subscription) = self.subscriptions.remove(topic.as_str()) {
                self.state.hub.detach(&subscription.key, &self.id, now_ms());
            }
        }
        self.encode(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
    }

    /// An event of a subscribed channel: each of its messages goes out as a PUBLISH
    /// with the subscription's QoS.
    fn deliver(&mut self, topic: Arc<str>, event: &ChannelEvent) {
        if !event.is_message() {
            return;
        }
        // Unsubscribed since the event was queued: not delivered.
        let Some(subscription) = self.subscriptions.get_mut(&topic) else {
            return;
        };
        match event
            .frame
            .channel_serial
            .as_deref()
            .and_then(Cursor::decode)
        {
            Some(after) => subscription.cursor = after,
            None => subscription.cursor.advance(event.origin, event.seq),
        }
        let qos = subscription.qos;
        for payload in event.payloads() {
            self.outgoing.push_back(Outgoing {
                topic: topic.clone(),
                qos,
                payload: payload.clone(),
            });
        }
        self.send_outgoing();
    }

    /// Sends what waits, QoS 1 messages while the window has room.
    fn send_outgoing(&mut self) {
        while let Some(next) = self.outgoing.front() {
            let mut publish =
                Publish::from_bytes(next.topic.to_string(), next.qos, next.payload.clone());
            if next.qos == QoS::AtLeastOnce {
                let unacked = Unacked {
                    topic: publish.topic.clone(),
                    payload: publish.payload.clone(),
                };
                let Some(packet_id) = self.inflight.send(unacked) else {
                    return;
                };
                publish.pkid = packet_id;
            }
            self.outgoing.pop_front();
            self.encode(Packet::Publish(publish));
        }
    }

    fn encode(&mut self, packet: Packet) {
        // Nothing this adapter builds is over MQTT's 256 MiB packet limit: payloads are
        // bounded by max_message_size, topics by the channel name bound.
        if let Err(err) = packet.write(&mut self.out, usize::MAX) {
            tracing::warn!(%err, "mqtt packet not encoded");
        }
    }

    /// Writes what is encoded, within `write_timeout_ms`.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.state.config.write_timeout_ms);
        match tokio::time::timeout(timeout, self.writer.write_all(&self.out)).await {
            Ok(Ok(())) => {
                self.out.clear();
                Ok(())
            }
            Ok(Err(err)) => Err(End::abnormal(format!("write failed: {err}"))),
            Err(_) => Err(End::abnormal("write timed out: the client does not read")),
        }
    }

    /// Detaches every subscription and, unless the client said DISCONNECT (or the node
    /// is stopping), publishes the last will.
    fn close(self, end: End) {
        let now = now_ms();
        for subscription in self.subscriptions.values() {
            self.state.hub.detach(&subscription.key, &self.id, now);
        }
        // Each network connection is one (a persistent session resumed by a new CONNECT
        // is a new connection, which went through `$connect` again).
        crate::hooks::record_disconnect(
            &self.state,
            crate::hooks::Ended {
                app_id: &self.auth.app_id,
                connection_id: &self.id,
                client_id: self.identity.id(),
                transport: "mqtt",
                connected_at_ms: self.connected_at_ms,
                reason: crate::hooks::EndReason::Closed,
            },
            now,
        );
        if let Some(key) = &self.session_key {
            let parked = self.persistent.then(|| self.parked());
            let expires = now.saturating_add(self.state.config.connection_state_ttl_ms as i64);
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .disconnect(key, self.number, parked, expires, now);
        }
        let End::Abnormal(reason) = end else {
            tracing::debug!(?end, "mqtt connection closed");
            return;
        };
        tracing::debug!(%reason, "mqtt connection ended");
        let Some(will) = self.will else {
            return;
        };
        let Ok(channel) = topic::channel(&will.topic) else {
            return;
        };
        let channel = channel.to_string();
        let message = session::message_of(will.message);
        let (state, auth, identity) = (self.state, self.auth, self.identity);
        // Its own task: the connection is gone, and a before-publish function may be
        // called (bounded by its timeout).
        tokio::spawn(async move {
            let published = apply_publish(
                &state,
                &auth,
                &identity,
                &channel,
                vec![message],
                Transport::Realtime,
            )
            .await;
            if let Err(err) = published {
                tracing::debug!(code = err.code, message = %err.message, "last will not published");
            }
        });
    }
}

impl Connection {
    /// What of this persistent session outlives the connection.
    fn parked(&self) -> Parked {
        Parked {
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(channel, subscription)| ParkedSubscription {
                    channel: channel.clone(),
                    qos: subscription.qos,
                    cursor: subscription.cursor.clone(),
                })
                .collect(),
            unacked: self.inflight.unacked(),
            unsent: self
                .outgoing
                .iter()
                .map(|o| (o.topic.clone(), o.qos, o.payload.clone()))
                .collect(),
        }
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A packet that announces more than `packet_bytes_max` is refused from its fixed
    /// header alone, before its body arrives; a partial packet waits, unconsumed.
    #[test]
    fn oversize_is_refused_from_the_fixed_header() {
        // Remaining length 65,536 (0x80 0x80 0x04), and no body yet.
        let mut buffer = BytesMut::from(&[0x30, 0x80, 0x80, 0x04][..]);
        assert!(matches!(
            next_packet(&mut buffer, 65_535),
            Err(CodecError::PayloadSizeLimitExceeded(65_536))
        ));
        let mut partial = BytesMut::from(&[0x30, 0x05, 0x00][..]);
        assert!(matches!(next_packet(&mut partial, 100), Ok(None)));
        assert_eq!(partial.len(), 3);
        let mut ping = BytesMut::from(&[0xc0, 0x00, 0xc0][..]);
        assert!(matches!(
            next_packet(&mut ping, 100),
            Ok(Some(Packet::PingReq))
        ));
        assert_eq!(ping.len(), 1, "exactly one packet consumed");
    }

    fn remaining_length(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                return out;
            }
        }
    }

    proptest! {
        /// Any bytes, and any body behind a well-formed fixed header of every packet
        /// type and flags, decode or are refused without a panic.
        #[test]
        fn decoding_never_panics(
            kind in 0u8..16,
            flags in 0u8..16,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = vec![(kind << 4) | flags];
            bytes.extend(remaining_length(body.len()));
            bytes.extend(&body);
            crate::mqtt::fuzzing::inbound(&bytes, 1_024);
            crate::mqtt::fuzzing::inbound(&body, 1_024);
        }
    }
}
