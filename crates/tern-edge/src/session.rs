//! What one realtime connection does with each inbound frame. The session owns the
//! connection's identity, its attachments, its reply window and its rate window; it
//! talks to the hub and queues replies through its [`Outlet`]. When its transport drops,
//! what must survive is parked in the registry for a resume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use tern_auth::{AuthContext, ClientIdentity, Operation};
use tern_core::{AttachOptions, ChannelKey, CoreError, Cursor, KeyChain, Publisher, ResumeError};
use tern_protocol::{
    action, code, flags, presence_action, ConnectionDetails, ErrorInfo, Format, Message,
    PresenceMessage, ProtocolMessage, PublishResult,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::channel_name;
use crate::connection::{error_frame, AttachmentSink, Outbound, Outlet};
use crate::credentials::{
    authenticate, denied, details_client_id, granted_modes, message_client_id, presence_client_id,
    resolve_identity,
};
use crate::now_ms;
use crate::resume::{ParkedSession, Reply, ReplyWindow, Seen};
use crate::state::EdgeState;

/// How a session ended, which decides what happens to its state.
enum Ending {
    /// CLOSE, or a fatal protocol error: state is discarded, members leave now.
    Closed,
    /// The transport went away: state is parked for a resume, members stay for the
    /// grace period.
    Dropped,
}

/// Counts MESSAGE/PRESENCE frames per one-second window.
struct RateWindow {
    started_ms: i64,
    count: u32,
}

/// How long a client that does not read may hold up its own replies before it is
/// disconnected as too slow.
const SLOW_CLIENT_WAIT: Duration = Duration::from_secs(5);
/// How long a resume waits for the connection's previous transport to let go.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(2);

fn too_slow() -> ErrorInfo {
    ErrorInfo::new(
        code::SUBSCRIBER_TOO_SLOW,
        "connection disconnected: client is not reading fast enough",
    )
}

fn random_id(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

pub(crate) struct Session {
    state: Arc<EdgeState>,
    id: Arc<str>,
    key: String,
    /// Registry generation of this transport's claim on the connection.
    generation: u64,
    /// Woken when a resume on another transport takes this connection over.
    superseded: Arc<Notify>,
    auth: AuthContext,
    identity: ClientIdentity,
    echo: bool,
    format: Format,
    outlet: Outlet,
    /// Attached channels: bare name → the name as the client attached it.
    attachments: HashMap<Arc<str>, Arc<str>>,
    presence_channels: HashSet<Arc<str>>,
    replies: ReplyWindow,
    /// A resume or recover was asked for and failed: channel serials from before are
    /// not honoured (channels re-attach without RESUMED).
    continuity_lost: bool,
    rate: RateWindow,
    renew_requested: bool,
    sync_counter: u64,
    /// An ATTACH waiting for the channel's state from another node (see
    /// `ClusterView::warm`); frames after it wait too, so order is kept.
    warming: Option<(tokio::sync::oneshot::Receiver<()>, ProtocolMessage)>,
}

/// Longest an ATTACH waits for the channel's state from another node (the cluster gives
/// up a little sooner and the attach goes ahead with what this node has).
const WARM_WAIT: Duration = Duration::from_secs(4);

impl Session {
    /// Authenticates the connect request, resumes or recovers the connection if asked,
    /// and sends CONNECTED. `Err` is the ERROR to send.
    pub(crate) async fn open(
        state: Arc<EdgeState>,
        query: &HashMap<String, String>,
        format: Format,
        outlet: Outlet,
    ) -> Result<Session, ErrorInfo> {
        let now = now_ms();
        let get = |name: &str| query.get(name).map(String::as_str);
        let token = get("access_token").or_else(|| get("accessToken"));
        let auth = authenticate(&state.keys, get("key"), token, now)?;
        let identity = resolve_identity(&auth, get("clientId"))?;
        let requested = get("resume").or_else(|| get("recover"));
        let new_id = || -> Arc<str> { format!("{}-{}", state.node_tag, random_id(12)).into() };
        let (id, parked, error) = match requested {
            None => (new_id(), None, None),
            Some(key) => match take_parked(&state, key, &auth, &identity).await {
                Ok((id, parked, keys)) => (id, Some((parked, keys)), None),
                Err(error) => (new_id(), None, Some(error)),
            },
        };
        // A key issued by another node (its region failed, or DNS moved the client): the
        // connection cannot continue here, but channel cursors mean the same on every
        // node, so channels may still resume from their channelSerials. A key of this
        // node that is unknown or expired means continuity is lost.
        let foreign = requested
            .and_then(tern_core::registry::split_key)
            .is_some_and(|(id, _)| {
                id.split_once('-')
                    .is_none_or(|(tag, _)| tag != state.node_tag)
            });
        let superseded = Arc::new(Notify::new());
        let secret = random_id(20);
        // After a resume, the key it presented stays good beside the new one: this
        // CONNECTED may be lost with its transport (see `KeyChain`).
        let (keys, replies, presence_channels) = match parked {
            Some((parked, keys)) => {
                state.hub.forget_dropped(&id);
                (
                    keys.issue(secret.clone()),
                    parked.replies,
                    parked.presence_channels,
                )
            }
            None => (
                KeyChain::new(secret.clone()),
                ReplyWindow::default(),
                HashSet::new(),
            ),
        };
        let generation = state
            .registry()
            .register(Arc::clone(&id), keys, superseded.clone());
        let session = Session {
            key: format!("{id}!{secret}"),
            id,
            generation,
            superseded,
            echo: get("echo") != Some("false"),
            state,
            auth,
            identity,
            format,
            outlet,
            attachments: HashMap::new(),
            presence_channels,
            replies,
            continuity_lost: error.is_some() && !foreign,
            rate: RateWindow {
                started_ms: now,
                count: 0,
            },
            renew_requested: false,
            sync_counter: 0,
            warming: None,
        };
        session.outlet.send(session.connected_frame(error));
        tracing::debug!(conn_id = %session.id, format = ?format, resumed = requested.is_some() && !session.continuity_lost, "connected");
        Ok(session)
    }

    fn connected_frame(&self, error: Option<ErrorInfo>) -> ProtocolMessage {
        let config = &self.state.config;
        ProtocolMessage {
            action: action::CONNECTED,
            connection_id: Some(self.id.to_string()),
            error,
            connection_details: Some(ConnectionDetails {
                connection_key: Some(self.key.clone()),
                client_id: details_client_id(&self.auth, &self.identity),
                max_message_size: Some(config.max_message_size as u64),
                max_idle_interval: Some(config.max_idle_interval_ms),
                connection_state_ttl: Some(config.connection_state_ttl_ms),
                server_id: Some(config.server_id.clone()),
                max_inbound_rate: Some(u64::from(config.inbound_frames_per_second)),
                max_frame_size: Some(config.max_frame_size as u64),
                site_code: None,
            }),
            ..Default::default()
        }
    }

    /// When the token timer next fires: first to ask for renewal, then at expiry.
    fn token_deadline(&self, now: i64) -> Option<Instant> {
        let expires = self.auth.expires_ms?;
        let remaining = (expires - now).max(0);
        let notice = self.state.config.token_renew_notice_ms.min(remaining / 2);
        let at = if self.renew_requested {
            expires
        } else {
            expires - notice
        };
        Some(Instant::now() + Duration::from_millis((at - now).max(0) as u64))
    }

    /// The reader loop. Returns when the connection ends, after telling the hub and
    /// parking or discarding the connection's state.
    pub(crate) async fn run(mut self, mut stream: SplitStream<WebSocket>) {
        let mut shutdown = self.state.shutdown.clone();
        let overflow = self.outlet.overflow.clone();
        let superseded = self.superseded.clone();
        let ending = loop {
            let deadline = self.token_deadline(now_ms());
            tokio::select! {
                // A client frame. Cancel-safe: SplitStream::next loses nothing if dropped.
                frame = stream.next() => {
                    let bytes = match frame {
                        Some(Ok(WsMessage::Text(text))) => Bytes::from(text),
                        Some(Ok(WsMessage::Binary(bytes))) => bytes,
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                        Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break Ending::Dropped,
                    };
                    if !self.outlet.headroom(SLOW_CLIENT_WAIT).await {
                        self.outlet.finish(Some(self.disconnected(too_slow())));
                        break Ending::Dropped;
                    }
                    if let Some(ending) = self.handle(bytes) {
                        break ending;
                    }
                    if let Some((ready, frame)) = self.warming.take() {
                        let _ = tokio::time::timeout(WARM_WAIT, ready).await;
                        if let Some(ending) = self.attach_now(frame) {
                            break ending;
                        }
                    }
                }
                // The outbound queue overflowed: this client reads too slowly.
                _ = overflow.notified() => {
                    self.outlet.finish(Some(self.disconnected(too_slow())));
                    break Ending::Dropped;
                }
                // The client resumed this connection on a new transport.
                _ = superseded.notified() => {
                    self.outlet.finish(Some(self.disconnected(ErrorInfo::new(
                        code::CONNECTION_SUPERSEDED, "connection resumed on another transport",
                    ))));
                    break Ending::Dropped;
                }
                // Token renewal notice, then expiry.
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => pending().await } } => {
                    if !self.renew_requested {
                        self.renew_requested = true;
                        self.outlet.send(ProtocolMessage { action: action::AUTH, ..Default::default() });
                    } else {
                        self.outlet.finish(Some(self.disconnected(ErrorInfo::new(code::TOKEN_EXPIRED, "token expired"))));
                        break Ending::Dropped;
                    }
                }
                // The node is shutting down: the client reconnects (elsewhere, if it can).
                _ = shutdown.changed() => {
                    self.outlet.finish(Some(self.disconnected(ErrorInfo::with_status(
                        code::DISCONNECTED, 503, "server shutting down",
                    ))));
                    break Ending::Dropped;
                }
            }
        };
        self.outlet.finish(None);
        self.end(ending);
    }

    fn end(self, ending: Ending) {
        let channels: Vec<Arc<str>> = self
            .attachments
            .keys()
            .chain(self.presence_channels.iter())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let hub = &self.state.hub;
        let now = now_ms();
        match ending {
            Ending::Closed => {
                hub.connection_closed(&self.auth.app_id, &self.id, &channels, now);
                self.state.registry().remove(&self.id, self.generation);
            }
            Ending::Dropped => {
                // Order matters: the hub lets go of the connection id before a resume
                // can take the parked state and attach under the same id.
                hub.connection_dropped(&self.auth.app_id, &self.id, channels, now);
                let parked = ParkedSession {
                    app_id: self.auth.app_id.clone(),
                    client_id: self.identity_id(),
                    replies: self.replies,
                    presence_channels: self.presence_channels,
                };
                let deadline = now + self.state.config.connection_state_ttl_ms as i64;
                self.state
                    .registry()
                    .park(&self.id, self.generation, parked, deadline);
            }
        }
        tracing::debug!(conn_id = %self.id, "connection ended");
    }

    fn identity_id(&self) -> Option<String> {
        match &self.identity {
            ClientIdentity::Id(id) => Some(id.clone()),
            _ => None,
        }
    }

    fn disconnected(&self, error: ErrorInfo) -> ProtocolMessage {
        ProtocolMessage {
            action: action::DISCONNECTED,
            error: Some(error),
            ..Default::default()
        }
    }

    /// Ends the connection with a fatal ERROR.
    fn fail(&self, error: ErrorInfo) -> Option<Ending> {
        self.outlet.finish(Some(error_frame(error)));
        Some(Ending::Closed)
    }

    fn handle(&mut self, bytes: Bytes) -> Option<Ending> {
        let frame = match tern_protocol::decode(self.format, &bytes) {
            Ok(frame) => frame,
            Err(err) => return self.fail(err.to_error_info()),
        };
        match frame.action {
            action::HEARTBEAT => {
                self.outlet.send(ProtocolMessage {
                    action: action::HEARTBEAT,
                    id: frame.id,
                    ..Default::default()
                });
                None
            }
            action::ATTACH => self.attach(frame),
            action::DETACH => self.detach(frame),
            action::MESSAGE | action::PRESENCE => {
                self.publish_or_present(frame);
                None
            }
            action::CLOSE => {
                self.outlet.finish(Some(ProtocolMessage {
                    action: action::CLOSED,
                    ..Default::default()
                }));
                Some(Ending::Closed)
            }
            action::DISCONNECT => Some(Ending::Dropped),
            action::AUTH => self.reauthorize(frame),
            action::SYNC | action::ACTIVATE => None,
            action::OBJECT | action::OBJECT_SYNC | action::ANNOTATION => {
                self.send_reply(
                    frame.msg_serial,
                    None,
                    Reply::Nack(ErrorInfo::new(
                        code::BAD_REQUEST,
                        "LiveObjects and annotations are not supported",
                    )),
                );
                None
            }
            other => self.fail(ErrorInfo::new(
                code::PROTOCOL_ERROR,
                format!("unexpected action {other}"),
            )),
        }
    }

    /// True (and the window advanced) when the connection is over its inbound rate.
    fn over_rate(&mut self) -> bool {
        let now = now_ms();
        if now - self.rate.started_ms >= 1_000 {
            self.rate = RateWindow {
                started_ms: now,
                count: 0,
            };
        }
        self.rate.count += 1;
        self.rate.count > self.state.config.inbound_frames_per_second
    }

    /// MESSAGE and PRESENCE: de-duplicate by msgSerial, rate-limit, apply, reply.
    fn publish_or_present(&mut self, frame: ProtocolMessage) {
        let msg_serial = frame.msg_serial;
        // Whose replicas the ACK waits for.
        let channel = frame
            .channel
            .as_deref()
            .and_then(|name| channel_name::parse(name).ok())
            .map(|parsed| ChannelKey {
                app: self.auth.app_id.as_str().into(),
                name: parsed.base.into(),
            });
        if let Some(serial) = msg_serial {
            match self.replies.check(serial) {
                Seen::New => {}
                Seen::Again(reply) => return self.send_reply(msg_serial, channel, reply),
                Seen::Forgotten => {
                    return self.send_reply(msg_serial, channel, Reply::Ack(Vec::new()))
                }
            }
        }
        let reply = if self.over_rate() {
            Reply::Nack(ErrorInfo::new(
                code::RATE_LIMIT,
                "inbound message rate exceeded",
            ))
        } else {
            let refused_before = self.state.refused_appends();
            let result = if frame.action == action::MESSAGE {
                self.publish(frame)
            } else {
                self.presence(frame).map(|()| Vec::new())
            };
            match result {
                // The history store refused an append meanwhile (its queue was full):
                // maybe this one, so it must not be ACKed as stored.
                Ok(_) if self.state.refused_appends() != refused_before => Reply::Nack(
                    ErrorInfo::new(code::INTERNAL, "history store overloaded: not stored"),
                ),
                Ok(serials) => Reply::Ack(serials),
                Err(err) => Reply::Nack(err),
            }
        };
        if let Some(serial) = msg_serial {
            self.replies
                .record(serial, reply.clone(), self.state.config.reply_window_max);
        }
        self.send_reply(msg_serial, channel, reply);
    }

    /// Queues an ACK/NACK once everything applied before it is durable, so replies stay
    /// in msgSerial order and an ACK means "stored".
    fn send_reply(&self, msg_serial: Option<i64>, channel: Option<ChannelKey>, reply: Reply) {
        let frame = match (msg_serial, reply) {
            (None, Reply::Ack(_)) => return,
            (None, Reply::Nack(error)) => error_frame(error),
            (Some(serial), Reply::Ack(serials)) => ProtocolMessage {
                action: action::ACK,
                msg_serial: Some(serial),
                count: Some(1),
                res: Some(vec![PublishResult { serials }]),
                ..Default::default()
            },
            (Some(serial), Reply::Nack(error)) => {
                metrics::counter!("tern_nacks_total").increment(1);
                ProtocolMessage {
                    action: action::NACK,
                    msg_serial: Some(serial),
                    count: Some(1),
                    error: Some(error),
                    ..Default::default()
                }
            }
        };
        let outlet = self.outlet.clone();
        self.state.after_durable(
            channel,
            Box::new(move |replicated| {
                if replicated || frame.action != action::ACK {
                    outlet.send(frame);
                    return;
                }
                metrics::counter!("tern_nacks_total").increment(1);
                outlet.send(ProtocolMessage {
                    action: action::NACK,
                    msg_serial: frame.msg_serial,
                    count: Some(1),
                    error: Some(ErrorInfo::new(
                        code::TIMEOUT,
                        "published, but not confirmed stored on a replica in time",
                    )),
                    ..Default::default()
                });
            }),
        );
    }

    fn channel_error(&self, channel: String, error: ErrorInfo) -> Option<Ending> {
        self.outlet.send(ProtocolMessage {
            action: action::ERROR,
            channel: Some(channel),
            error: Some(error),
            ..Default::default()
        });
        None
    }

    /// ATTACH; on a channel this node does not receive yet, first waits (in `run`) for
    /// its state from the cluster.
    fn attach(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        self.attach_with(frame, true)
    }

    /// ATTACH once the channel's state is here (or waiting for it gave up).
    fn attach_now(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        self.attach_with(frame, false)
    }

    fn attach_with(&mut self, frame: ProtocolMessage, may_wait: bool) -> Option<Ending> {
        // Kept only when the attach may have to wait for the cluster.
        let original = (may_wait && self.state.cluster.is_some()).then(|| frame.clone());
        let Some(name) = frame.channel else {
            return self.fail(ErrorInfo::new(code::BAD_REQUEST, "ATTACH without channel"));
        };
        let parsed = match channel_name::parse(&name) {
            Ok(parsed) => parsed,
            Err(reason) => {
                return self.channel_error(name.clone(), ErrorInfo::new(code::BAD_REQUEST, reason))
            }
        };
        let base: Arc<str> = parsed.base.into();
        let granted = granted_modes(&self.auth.capability, &base);
        let requested = frame.flags.unwrap_or(0) & flags::MODES_MASK;
        let modes = if requested != 0 {
            granted & requested
        } else {
            granted
        };
        if modes == 0 {
            return self.channel_error(name, denied("attach", &base));
        }
        let was_attached = self.attachments.contains_key(&base);
        if !was_attached && self.attachments.len() >= self.state.config.channels_per_connection_max
        {
            return self.channel_error(
                name,
                ErrorInfo::new(
                    code::CHANNEL_OPERATION_FAILED,
                    "too many channels attached on this connection",
                ),
            );
        }
        let mut params = parsed.params;
        params.extend(frame.params.unwrap_or_default());
        // A channelSerial means "continue from here"; it wins over rewind. After a failed
        // connection resume it is not honoured: continuity is already lost.
        let resume_from = frame
            .channel_serial
            .as_deref()
            .filter(|_| !self.continuity_lost)
            .map(Cursor::decode);
        let rewind = match params.get("rewind") {
            Some(value) if resume_from.is_none() => {
                match channel_name::parse_rewind(value, now_ms()) {
                    Ok(rewind) => Some(rewind),
                    Err(reason) => {
                        return self.channel_error(
                            name,
                            ErrorInfo::new(code::INVALID_PARAMETER_VALUE, reason),
                        )
                    }
                }
            }
            _ => None,
        };
        let echoed: BTreeMap<String, String> =
            params.into_iter().filter(|(k, _)| k == "rewind").collect();
        let unreadable_serial = matches!(resume_from, Some(None));
        let options = AttachOptions {
            modes,
            echo: self.echo,
            resume_from: resume_from.flatten(),
            rewind,
        };
        let alias: Option<Arc<str>> = (name != *base).then(|| name.as_str().into());
        let sink = Arc::new(AttachmentSink {
            outlet: self.outlet.clone(),
            alias: alias.clone(),
        });
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base.clone(),
        };
        if let (Some(original), Some(cluster)) = (original, &self.state.cluster) {
            if let Some(ready) = cluster.warm(&key) {
                self.warming = Some((ready, original));
                return None;
            }
        }
        self.sync_counter += 1;
        let sync_id = format!("{}-{}", self.id, self.sync_counter);
        let page_size = self.state.config.sync_page_size.max(1);
        let outlet = self.outlet.clone();
        let reply_name = name.clone();
        let result = self.state.hub.attach(&key, self.id.clone(), options, sink, |snapshot| {
            let mut reply_flags = modes;
            if !snapshot.members.is_empty() {
                reply_flags |= flags::HAS_PRESENCE;
            }
            if snapshot.resumed {
                reply_flags |= flags::RESUMED;
            }
            if !snapshot.backlog.is_empty() {
                reply_flags |= flags::HAS_BACKLOG;
            }
            let error = (snapshot.continuity_lost || unreadable_serial).then(|| {
                ErrorInfo::new(code::MESSAGES_EXPIRED, "continuity lost: messages since the given channelSerial are no longer retained")
            });
            outlet.send(ProtocolMessage {
                action: action::ATTACHED,
                channel: Some(reply_name.clone()),
                flags: Some(reply_flags),
                channel_serial: Some(snapshot.channel_serial.clone()),
                params: (!echoed.is_empty()).then_some(echoed),
                error,
                ..Default::default()
            });
            let pages: Vec<&[PresenceMessage]> = snapshot.members.chunks(page_size).collect();
            for (index, page) in pages.iter().enumerate() {
                let cursor = if index + 1 == pages.len() { String::new() } else { (index + 1).to_string() };
                outlet.send(ProtocolMessage {
                    action: action::SYNC,
                    channel: Some(reply_name.clone()),
                    channel_serial: Some(format!("{sync_id}:{cursor}")),
                    presence: Some(page.to_vec()),
                    ..Default::default()
                });
            }
            for event in &snapshot.backlog {
                outlet.push(match &alias {
                    None => Outbound::Event(event.clone()),
                    Some(alias) => Outbound::AliasedEvent(event.clone(), alias.clone()),
                });
            }
        }, now_ms());
        match result {
            Ok(()) => {
                self.attachments.insert(base, name.into());
                None
            }
            Err(err) => self.channel_error(name, core_error(err)),
        }
    }

    fn detach(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        let Some(name) = frame.channel else {
            return self.fail(ErrorInfo::new(code::BAD_REQUEST, "DETACH without channel"));
        };
        if let Ok(parsed) = channel_name::parse(&name) {
            if self.attachments.remove(parsed.base).is_some() {
                let key = ChannelKey::new(&self.auth.app_id, parsed.base);
                self.state.hub.detach(&key, &self.id, now_ms());
            }
        }
        self.outlet.send(ProtocolMessage {
            action: action::DETACHED,
            channel: Some(name),
            ..Default::default()
        });
        None
    }

    /// Resolves the channel of a MESSAGE/PRESENCE frame and checks `op` on it.
    fn channel_for(
        &self,
        frame: &ProtocolMessage,
        op: Operation,
        op_name: &str,
    ) -> Result<Arc<str>, ErrorInfo> {
        let name = frame
            .channel
            .as_deref()
            .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, "frame without channel"))?;
        let parsed = channel_name::parse(name)
            .map_err(|reason| ErrorInfo::new(code::BAD_REQUEST, reason))?;
        if !self.auth.capability.allows(parsed.base, op) {
            return Err(denied(op_name, parsed.base));
        }
        Ok(parsed.base.into())
    }

    fn publish(&mut self, frame: ProtocolMessage) -> Result<Vec<Option<String>>, ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Publish, "publish")?;
        let mut messages: Vec<Message> = frame.messages.unwrap_or_default();
        crate::budget::check_messages(&messages, &self.state.config)?;
        for message in &mut messages {
            message.client_id = message_client_id(&self.identity, message.client_id.as_deref())?;
            message.connection_id = None;
            message.connection_key = None;
        }
        let count = messages.len() as u64;
        let publisher = Publisher {
            connection_id: Some(self.id.clone()),
            frame_id: format!("{}:{}", self.id, frame.msg_serial.unwrap_or(0)),
        };
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base,
        };
        let outcome = self
            .state
            .hub
            .publish(&key, &publisher, messages, now_ms())
            .map_err(core_error)?;
        metrics::counter!("tern_messages_published_total").increment(count);
        Ok(outcome.serials)
    }

    fn presence(&mut self, frame: ProtocolMessage) -> Result<(), ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Presence, "presence")?;
        let now = now_ms();
        let msg_serial = frame.msg_serial.unwrap_or(0);
        let supplied = frame.presence.unwrap_or_default();
        crate::budget::check_presence(&supplied, &self.state.config)?;
        let mut changes = Vec::with_capacity(supplied.len());
        for (index, mut change) in supplied.into_iter().enumerate() {
            if !matches!(
                change.action,
                presence_action::ENTER | presence_action::UPDATE | presence_action::LEAVE
            ) {
                return Err(ErrorInfo::new(
                    code::BAD_REQUEST,
                    format!("invalid presence action {}", change.action),
                ));
            }
            change.client_id = Some(presence_client_id(
                &self.identity,
                change.client_id.as_deref(),
            )?);
            change.id = Some(
                change
                    .id
                    .unwrap_or_else(|| format!("{}:{msg_serial}:{index}", self.id)),
            );
            change.connection_id = Some(self.id.to_string());
            change.timestamp = Some(now);
            changes.push(change);
        }
        let publisher = Publisher {
            connection_id: Some(self.id.clone()),
            frame_id: format!("{}:{msg_serial}", self.id),
        };
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base.clone(),
        };
        self.state
            .hub
            .presence(&key, &publisher, changes, now)
            .map_err(core_error)?;
        self.presence_channels.insert(base);
        Ok(())
    }

    /// In-band AUTH: a new token replaces the old one on the same connection.
    fn reauthorize(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        let Some(token) = frame.auth.and_then(|a| a.access_token) else {
            return self.fail(ErrorInfo::new(
                code::BAD_REQUEST,
                "AUTH without accessToken",
            ));
        };
        let auth = match authenticate(&self.state.keys, None, Some(&token), now_ms()) {
            Ok(auth) => auth,
            Err(err) => return self.fail(err),
        };
        let requested = self.identity_id();
        let identity = match resolve_identity(&auth, requested.as_deref()) {
            Ok(identity) if auth.app_id == self.auth.app_id && identity == self.identity => {
                identity
            }
            _ => {
                return self.fail(ErrorInfo::new(
                    code::INCOMPATIBLE_CREDENTIALS,
                    "new token is for a different app or clientId",
                ))
            }
        };
        self.auth = auth;
        self.identity = identity;
        self.renew_requested = false;
        self.outlet.send(self.connected_frame(None));
        None
    }
}

/// Takes the parked state (and key chain) of the connection named by a resume/recover
/// key, superseding a transport that still holds it. `Err` is the error the new
/// CONNECTED carries.
async fn take_parked(
    state: &EdgeState,
    key: &str,
    auth: &AuthContext,
    identity: &ClientIdentity,
) -> Result<(Arc<str>, ParkedSession, KeyChain), ErrorInfo> {
    let unable = |why: &str| {
        ErrorInfo::new(
            code::UNABLE_TO_RECOVER,
            format!("Unable to recover connection: {why}"),
        )
    };
    let give_up = Instant::now() + SUPERSEDE_WAIT;
    loop {
        let result = state.registry().resume(key, now_ms());
        match result {
            Ok((id, parked, keys)) => {
                let client_id = match identity {
                    ClientIdentity::Id(id) => Some(id.clone()),
                    _ => None,
                };
                if parked.app_id != auth.app_id
                    || (parked.client_id.is_some() && parked.client_id != client_id)
                {
                    return Err(unable("credentials do not match the connection"));
                }
                return Ok((id, parked, keys));
            }
            Err(ResumeError::Live(superseded)) if Instant::now() < give_up => {
                superseded.notify_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(ResumeError::Live(_)) => {
                return Err(unable("connection is still active elsewhere"))
            }
            Err(ResumeError::Expired) => return Err(unable("connection state expired")),
            Err(ResumeError::Unknown) => return Err(unable("connection not found")),
        }
    }
}

/// Ably error for a refusal from the core.
fn core_error(err: CoreError) -> ErrorInfo {
    use tern_core::presence::PresenceError;
    match err {
        CoreError::TooManyChannels(_) => {
            ErrorInfo::new(code::CHANNEL_OPERATION_FAILED, err.to_string())
        }
        CoreError::Presence(PresenceError::TooManyMembers(_)) => {
            ErrorInfo::new(code::TOO_MANY_PRESENCE_MEMBERS, err.to_string())
        }
        CoreError::Presence(PresenceError::NoClientId) => {
            ErrorInfo::new(code::PRESENCE_NO_CLIENT_ID, err.to_string())
        }
    }
}
