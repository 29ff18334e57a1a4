//! What one realtime connection does with each inbound frame. The session owns the
//! connection's identity, its attachments and its rate window; it talks to the hub and
//! queues replies through its [`Outlet`].

use std::collections::{HashMap, HashSet};
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use tern_auth::{AuthContext, ClientIdentity, Operation};
use tern_core::{AttachOptions, ChannelKey, CoreError, Publisher};
use tern_protocol::{
    action, code, flags, presence_action, ConnectionDetails, Data, ErrorInfo, Format, Message,
    PresenceMessage, ProtocolMessage, PublishResult,
};
use tokio::time::Instant;

use crate::channel_name;
use crate::connection::{error_frame, AttachmentSink, Outlet};
use crate::credentials::{
    authenticate, denied, details_client_id, granted_modes, message_client_id, presence_client_id,
    resolve_identity,
};
use crate::now_ms;
use crate::state::EdgeState;

/// How a session ended, which decides what happens to its presence members.
enum Ending {
    /// CLOSE, or a fatal protocol error: members leave now.
    Closed,
    /// The transport went away: members stay for the grace period (resume may follow).
    Dropped,
}

/// Counts MESSAGE/PRESENCE frames per one-second window.
struct RateWindow {
    started_ms: i64,
    count: u32,
}

pub(crate) struct Session {
    state: Arc<EdgeState>,
    id: Arc<str>,
    key: String,
    auth: AuthContext,
    identity: ClientIdentity,
    echo: bool,
    format: Format,
    outlet: Outlet,
    /// Attached channels: bare name → the name as the client attached it.
    attachments: HashMap<Arc<str>, Arc<str>>,
    presence_channels: HashSet<Arc<str>>,
    rate: RateWindow,
    renew_requested: bool,
    sync_counter: u64,
}

/// How long a client that does not read may hold up its own replies before it is
/// disconnected as too slow.
const SLOW_CLIENT_WAIT: Duration = Duration::from_secs(5);

fn too_slow() -> ErrorInfo {
    ErrorInfo::new(
        code::SUBSCRIBER_TOO_SLOW,
        "connection disconnected: client is not reading fast enough",
    )
}

fn random_id(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// Bytes a message counts against `maxMessageSize`: name, clientId, data and extras.
pub(crate) fn message_bytes(m: &Message) -> usize {
    message_size(
        m.name.as_deref(),
        m.client_id.as_deref(),
        m.data.as_ref(),
        m.extras.as_ref(),
    )
}

fn message_size(
    name: Option<&str>,
    client_id: Option<&str>,
    data: Option<&Data>,
    extras: Option<&serde_json::Value>,
) -> usize {
    let data_len = match data {
        None => 0,
        Some(Data::String(s)) => s.len(),
        Some(Data::Binary(b)) => b.len(),
        Some(Data::Json(v)) => v.to_string().len(),
    };
    name.map_or(0, str::len)
        + client_id.map_or(0, str::len)
        + data_len
        + extras.map_or(0, |e| e.to_string().len())
}

impl Session {
    /// Authenticates the connect request and sends CONNECTED. `Err` is the ERROR to send.
    pub(crate) fn open(
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
        let id: Arc<str> = random_id(12).into();
        let session = Session {
            key: format!("{}!{}", id, random_id(20)),
            id,
            echo: get("echo") != Some("false"),
            state,
            auth,
            identity,
            format,
            outlet,
            attachments: HashMap::new(),
            presence_channels: HashSet::new(),
            rate: RateWindow {
                started_ms: now,
                count: 0,
            },
            renew_requested: false,
            sync_counter: 0,
        };
        // Connection state does not yet survive its transport, so a resume or recover
        // request gets a fresh connection and says so (the SDK then re-attaches).
        let error = (get("resume").is_some() || get("recover").is_some()).then(|| {
            ErrorInfo::new(
                code::UNABLE_TO_RECOVER,
                "Unable to recover connection: connection state not found",
            )
        });
        session.outlet.send(session.connected_frame(error));
        tracing::debug!(conn_id = %session.id, format = ?format, "connected");
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

    /// The reader loop. Returns when the connection ends, after telling the hub.
    pub(crate) async fn run(mut self, mut stream: SplitStream<WebSocket>) {
        let mut shutdown = self.state.shutdown.clone();
        let overflow = self.outlet.overflow.clone();
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
                }
                // The outbound queue overflowed: this client reads too slowly.
                _ = overflow.notified() => {
                    self.outlet.finish(Some(self.disconnected(too_slow())));
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
        let channels: Vec<Arc<str>> = self
            .attachments
            .keys()
            .chain(self.presence_channels.iter())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let hub = &self.state.hub;
        match ending {
            Ending::Closed => {
                hub.connection_closed(&self.auth.app_id, &self.id, &channels, now_ms())
            }
            Ending::Dropped => {
                hub.connection_dropped(&self.auth.app_id, &self.id, channels, now_ms())
            }
        }
        tracing::debug!(conn_id = %self.id, "connection ended");
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
            action::MESSAGE => {
                self.rate_limited(&frame).or_else(|| self.publish(frame));
                None
            }
            action::PRESENCE => {
                self.rate_limited(&frame).or_else(|| self.presence(frame));
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
                self.nack(
                    frame.msg_serial,
                    ErrorInfo::new(
                        code::BAD_REQUEST,
                        "LiveObjects and annotations are not supported",
                    ),
                );
                None
            }
            other => self.fail(ErrorInfo::new(
                code::PROTOCOL_ERROR,
                format!("unexpected action {other}"),
            )),
        }
    }

    /// NACKs the frame with 42910 when the connection is over its inbound rate.
    fn rate_limited(&mut self, frame: &ProtocolMessage) -> Option<()> {
        let now = now_ms();
        if now - self.rate.started_ms >= 1_000 {
            self.rate = RateWindow {
                started_ms: now,
                count: 0,
            };
        }
        self.rate.count += 1;
        if self.rate.count <= self.state.config.inbound_frames_per_second {
            return None;
        }
        self.nack(
            frame.msg_serial,
            ErrorInfo::new(code::RATE_LIMIT, "inbound message rate exceeded"),
        );
        Some(())
    }

    fn ack(&self, msg_serial: Option<i64>, serials: Vec<String>) {
        let Some(msg_serial) = msg_serial else { return };
        self.outlet.send(ProtocolMessage {
            action: action::ACK,
            msg_serial: Some(msg_serial),
            count: Some(1),
            res: Some(vec![PublishResult {
                serials: serials.into_iter().map(Some).collect(),
            }]),
            ..Default::default()
        });
    }

    fn nack(&self, msg_serial: Option<i64>, error: ErrorInfo) {
        metrics::counter!("tern_nacks_total").increment(1);
        match msg_serial {
            Some(msg_serial) => self.outlet.send(ProtocolMessage {
                action: action::NACK,
                msg_serial: Some(msg_serial),
                count: Some(1),
                error: Some(error),
                ..Default::default()
            }),
            None => self.outlet.send(error_frame(error)),
        };
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

    fn attach(&mut self, frame: ProtocolMessage) -> Option<Ending> {
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
        let alias: Option<Arc<str>> = (name != *base).then(|| name.as_str().into());
        let sink = Arc::new(AttachmentSink {
            outlet: self.outlet.clone(),
            alias,
        });
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base.clone(),
        };
        let options = AttachOptions {
            modes,
            echo: self.echo,
        };
        self.sync_counter += 1;
        let sync_id = format!("{}-{}", self.id, self.sync_counter);
        let page_size = self.state.config.sync_page_size.max(1);
        let outlet = self.outlet.clone();
        let reply_name = name.clone();
        let result = self.state.hub.attach(
            &key,
            self.id.clone(),
            options,
            sink,
            |snapshot| {
                let mut reply_flags = modes;
                if !snapshot.members.is_empty() {
                    reply_flags |= flags::HAS_PRESENCE;
                }
                if was_attached {
                    reply_flags |= flags::RESUMED;
                }
                outlet.send(ProtocolMessage {
                    action: action::ATTACHED,
                    channel: Some(reply_name.clone()),
                    flags: Some(reply_flags),
                    channel_serial: Some(snapshot.channel_serial.clone()),
                    ..Default::default()
                });
                let pages: Vec<&[PresenceMessage]> = snapshot.members.chunks(page_size).collect();
                for (index, page) in pages.iter().enumerate() {
                    let cursor = if index + 1 == pages.len() {
                        String::new()
                    } else {
                        (index + 1).to_string()
                    };
                    outlet.send(ProtocolMessage {
                        action: action::SYNC,
                        channel: Some(reply_name.clone()),
                        channel_serial: Some(format!("{sync_id}:{cursor}")),
                        presence: Some(page.to_vec()),
                        ..Default::default()
                    });
                }
            },
            now_ms(),
        );
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

    fn publish(&mut self, frame: ProtocolMessage) -> Option<()> {
        let msg_serial = frame.msg_serial;
        match self.try_publish(frame) {
            Ok(serials) => self.ack(msg_serial, serials),
            Err(err) => self.nack(msg_serial, err),
        }
        None
    }

    fn try_publish(&mut self, frame: ProtocolMessage) -> Result<Vec<String>, ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Publish, "publish")?;
        let mut messages: Vec<Message> = frame.messages.unwrap_or_default();
        let size: usize = messages.iter().map(message_bytes).sum();
        if size > self.state.config.max_message_size {
            return Err(ErrorInfo::new(
                code::MESSAGE_TOO_LARGE,
                format!(
                    "maximum message length exceeded ({size} > {} bytes)",
                    self.state.config.max_message_size
                ),
            ));
        }
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

    fn presence(&mut self, frame: ProtocolMessage) -> Option<()> {
        let msg_serial = frame.msg_serial;
        match self.try_presence(frame) {
            Ok(()) => self.ack(msg_serial, Vec::new()),
            Err(err) => self.nack(msg_serial, err),
        }
        None
    }

    fn try_presence(&mut self, frame: ProtocolMessage) -> Result<(), ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Presence, "presence")?;
        let now = now_ms();
        let msg_serial = frame.msg_serial.unwrap_or(0);
        let mut changes = Vec::new();
        let mut size = 0;
        for (index, mut change) in frame.presence.unwrap_or_default().into_iter().enumerate() {
            if !matches!(
                change.action,
                presence_action::ENTER | presence_action::UPDATE | presence_action::LEAVE
            ) {
                return Err(ErrorInfo::new(
                    code::BAD_REQUEST,
                    format!("invalid presence action {}", change.action),
                ));
            }
            size += message_size(
                None,
                change.client_id.as_deref(),
                change.data.as_ref(),
                change.extras.as_ref(),
            );
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
        if size > self.state.config.max_message_size {
            return Err(ErrorInfo::new(
                code::MESSAGE_TOO_LARGE,
                "maximum message length exceeded",
            ));
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
        let requested = match &self.identity {
            ClientIdentity::Id(id) => Some(id.as_str()),
            _ => None,
        };
        let identity = match resolve_identity(&auth, requested) {
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
