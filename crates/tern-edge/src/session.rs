//! What one realtime connection does with each inbound frame. The session owns the
//! connection's identity, its attachments, its reply window and its rate window; it
//! talks to the hub and queues replies through its [`Outlet`]. When its transport drops,
//! what must survive is parked in the registry for a resume.
//!
//! # Layout
//! - here: opening (auth, resume/recover), the reader loop, dispatch, ending.
//! - `attach`: ATTACH/DETACH (modes, params, rewind, resume), client SYNC.
//! - `publish`: MESSAGE/PRESENCE (rates, msgSerial replies, checks, ACK/NACK).
//! - `hooked`: publishes waiting for a before-publish function, and those held behind
//!   them, applied in msgSerial order.
//! - `reauth`: in-band AUTH and re-checking attachments against the new capability.
//! - `derived`: derived (`[filter=…]`) channels: filtered, read-only attachments.

use std::collections::{HashMap, HashSet};
use std::future::pending;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::distr::{Alphanumeric, SampleString};
use tern_auth::{AuthContext, ClientIdentity};
use tern_core::{KeyChain, ResumeError};
use tern_functions::hook::order::{Pipeline, Ticket};
use tern_functions::hook::PublishVerdict;
use tern_protocol::{action, code, ConnectionDetails, ErrorInfo, Format, ProtocolMessage};
use tokio::task::JoinSet;
use tokio::time::Instant;

mod attach;
mod derived;
mod hooked;
mod publish;
mod reauth;

pub(crate) use derived::read_only;

use attach::{Attached, WARM_WAIT};
use publish::RateWindow;

use crate::connections::{ConnectionInfo, LiveConnection, Woken, ID_RANDOM_LEN};
use crate::credentials::{authenticate, details_client_id, resolve_identity};
use crate::hooks::Arrival;
use crate::now_ms;
use crate::outlet::{error_frame, Outlet};
use crate::resume::{ParkedSession, Reply, ReplyWindow};
use crate::state::EdgeState;
use crate::stats::{AppStats, OpenConnection};

/// What a transport hands the session: one client frame at a time, or its end.
pub(crate) enum Received {
    /// One encoded frame (a WebSocket message), decoded by the session.
    Encoded(Bytes),
    /// One frame the transport decoded (a comet request body carries an array of them).
    Decoded(Box<ProtocolMessage>),
    /// Input the transport refused (over a size limit, undecodable): the connection
    /// fails with this ERROR, as it would for a bad frame.
    Refused(ErrorInfo),
    /// The transport went away: the connection is parked for a resume.
    Gone,
}

/// A transport's inbound side, read by [`Session::run`].
pub(crate) trait Inbound: Send {
    /// The next thing the client sent. Must be cancel-safe: the session drops it when
    /// another of its inputs (overflow, supersede, token timer, shutdown) fires first.
    fn next(&mut self) -> impl std::future::Future<Output = Received> + Send;
}

/// How a session ended, which decides what happens to its state.
enum Ending {
    /// CLOSE, or a fatal protocol error: state is discarded, members leave now.
    Closed,
    /// The transport went away: state is parked for a resume, members stay for the
    /// grace period.
    Dropped,
}

/// A client frame the reader loop could not finish at once (see `Session::finish_frame`).
enum Unfinished {
    /// Its replies need room in the queue first, or it is a CLOSE.
    Frame(Box<ProtocolMessage>),
    /// It was handled: an ATTACH waits for its channel to warm.
    Warming,
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

/// Connection ids are `<node tag>-<random>` and keys `<id>!<secret>` (see `Session::open`).
/// The secrets a key may have: this version issues `connections::keys::SECRET_LEN` (32);
/// earlier ones issued 20 random characters, which a rolling upgrade still meets.
const SECRET_LEN_MIN: usize = 20;
const SECRET_LEN_MAX: usize = 64;

/// Whether `key` has the shape of a key some Tern node issued (this one or another):
/// anything else cannot name a connection anywhere (80018, not 80008).
fn is_connection_key(key: &str) -> bool {
    let Some((id, secret)) = tern_core::registry::split_key(key) else {
        return false;
    };
    crate::connections::node_tag_of(id).is_some()
        && (SECRET_LEN_MIN..=SECRET_LEN_MAX).contains(&secret.len())
        && secret.bytes().all(|b| b.is_ascii_alphanumeric())
}

pub(crate) struct Session {
    state: Arc<EdgeState>,
    id: Arc<str>,
    key: String,
    /// Registry generation of this transport's claim on the connection.
    generation: u64,
    /// Its handle in the registry: woken when a resume on another transport takes this
    /// connection over, or when `DELETE /connections/{id}` closes it.
    live: Arc<LiveConnection>,
    auth: AuthContext,
    identity: ClientIdentity,
    echo: bool,
    format: Format,
    outlet: Outlet,
    /// Attached channels: bare name → the name as the client attached it.
    attachments: HashMap<Arc<str>, Attached>,
    /// Derived (filtered) attachments, by `[filter=…]name` (see `derived`).
    derived: HashMap<Arc<str>, derived::Derived>,
    presence_channels: HashSet<Arc<str>>,
    replies: ReplyWindow,
    /// A resume or recover was asked for and failed: channel serials from before are
    /// not honoured (channels re-attach without RESUMED).
    continuity_lost: bool,
    rate: RateWindow,
    /// ATTACH, DETACH, HEARTBEAT and other control frames, bounded apart from
    /// publishes so a flood of them (each takes a channel lock, may create a channel and
    /// tell the cluster) is refused without slowing the connection's publishes.
    control_rate: RateWindow,
    renew_requested: bool,
    /// `remainPresentFor` (ms): how long this connection's presence outlives its
    /// transport, instead of the node's default grace period.
    remain_present_for_ms: Option<i64>,
    sync_counter: u64,
    /// An ATTACH waiting for the channel's state from another node (see
    /// `ClusterView::warm`); frames after it wait too, so order is kept.
    /// Boxed: rare, and a `ProtocolMessage` inline would be held in every
    /// connection's session for its life.
    warming: Option<Box<(tokio::sync::oneshot::Receiver<()>, ProtocolMessage)>>,
    /// The app's statistics (`None` past `stats.apps_max`), and this connection counted
    /// as open in them until the session is dropped.
    stats: Option<Arc<AppStats>>,
    _counted: Option<OpenConnection>,
    /// Publishes held back while an earlier one waits for its before-publish function
    /// (see `hooked`), bounded by the app's `connection_pending_max`.
    pipeline: Pipeline<hooked::Held, PublishVerdict>,
    /// The function calls in flight; aborted when the session ends.
    calls: JoinSet<PublishVerdict>,
    /// Which pipeline entry each call decides.
    call_tickets: HashMap<tokio::task::Id, Ticket>,
    /// Ably's name of this transport (`web_socket`, `comet`).
    transport: &'static str,
    /// When the connection was first opened (kept across resumes).
    connected_at_ms: i64,
    /// The clientId and capability the `$connect` function gave, if it changed them.
    /// Boxed: rare, and inline it would be held in every connection's session.
    from_function: Option<Box<(ClientIdentity, tern_auth::Capability)>>,
}

impl Session {
    /// Authenticates the connect request, resumes or recovers the connection if asked,
    /// and sends CONNECTED. `Err` is the ERROR to send.
    /// `transport` is ably-js's name for it (`web_socket`, `comet`).
    pub(crate) async fn open(
        state: Arc<EdgeState>,
        query: &HashMap<String, String>,
        format: Format,
        outlet: Outlet,
        arrival: Arrival,
    ) -> Result<Session, ErrorInfo> {
        let now = now_ms();
        let get = |name: &str| query.get(name).map(String::as_str);
        let token = get("access_token").or_else(|| get("accessToken"));
        let mut auth = authenticate(&state.keys, get("key"), token, now)?;
        let mut identity = resolve_identity(&auth, get("clientId"))?;
        let requested = get("resume").or_else(|| get("recover"));
        let new_id =
            || -> Arc<str> { format!("{}-{}", state.node_tag, random_id(ID_RANDOM_LEN)).into() };
        let (id, parked, error) = match requested {
            None => (new_id(), None, None),
            Some(key) if !is_connection_key(key) => (
                new_id(),
                None,
                Some(ErrorInfo::new(
                    code::INVALID_CONNECTION_KEY,
                    "Unable to recover connection: not a connection key",
                )),
            ),
            Some(key) => {
                match take_parked(&state, key, &auth.app_id, identity.id(), SUPERSEDE_WAIT).await {
                    Ok((id, parked, keys)) => (id, Some((parked, keys)), None),
                    Err(error) => (new_id(), None, Some(error)),
                }
            }
        };
        // A new connection (not a resumed one) goes through the app's `$connect`
        // function, if any; a resumed one keeps what the function gave it then.
        let (from_function, connected_at_ms) = match &parked {
            Some((parked, _)) => {
                if let Some((function_identity, capability)) = &parked.from_function {
                    identity = function_identity.clone();
                    auth.capability = auth.capability.intersect(capability);
                }
                (
                    parked.from_function.clone().map(Box::new),
                    parked.info.connected_at_ms,
                )
            }
            None => {
                let changed =
                    crate::hooks::on_connect(&state, &id, arrival, &mut auth, &mut identity)
                        .await?;
                if state.departures.tracks(&auth.app_id) {
                    let opened = crate::departures::Record::Opened {
                        id: id.to_string(),
                        opened: crate::departures::Opened {
                            client_id: identity.id().map(str::to_owned),
                            transport: arrival.transport.into(),
                            connected_at: now,
                        },
                    };
                    crate::departures::publish(&state.hub, &auth.app_id, &[opened]);
                }
                (
                    changed.then(|| Box::new((identity.clone(), auth.capability.clone()))),
                    now,
                )
            }
        };
        // A key issued by another node (its region failed, or DNS moved the client): the
        // connection cannot continue here, but channel cursors mean the same on every
        // node, so channels may still resume from their channelSerials. A key of this
        // node that is unknown or expired means continuity is lost.
        let foreign = requested
            .filter(|key| is_connection_key(key))
            .and_then(tern_core::registry::split_key)
            .is_some_and(|(id, _)| {
                id.split_once('-')
                    .is_none_or(|(tag, _)| tag != state.node_tag)
            });
        let secret = state.connection_keys.secret_for(&id);
        let stats = state.stats.app(&auth.app_id, now);
        let counted = stats
            .as_ref()
            .map(|stats| stats.connection_opened(parked.is_none()));
        if let Some(stats) = &stats {
            outlet.set_stats(stats.clone());
        }
        // After a resume, the key it presented stays good beside the new one: this
        // CONNECTED may be lost with its transport (see `KeyChain`).
        let (keys, replies, presence_channels, predecessors) = match parked {
            Some((parked, keys)) => {
                state.hub.forget_dropped(&id);
                (
                    keys.issue(secret.clone()),
                    parked.replies,
                    parked.presence_channels,
                    parked.info.predecessors,
                )
            }
            None => {
                // A resume another node's key names: take that connection over, so
                // this one owns its channel too (`connections::handover`).
                let predecessors = match requested {
                    Some(key) if foreign => {
                        crate::connections::handover::claim(
                            &state,
                            key,
                            &id,
                            &auth.app_id,
                            identity.id(),
                        )
                        .await
                    }
                    _ => Vec::new(),
                };
                (
                    KeyChain::new(secret.clone()),
                    ReplyWindow::default(),
                    HashSet::new(),
                    predecessors,
                )
            }
        };
        let live = LiveConnection::new(ConnectionInfo {
            app_id: auth.app_id.clone(),
            client_id: identity.id().map(str::to_string),
            transport: arrival.transport,
            connected_at_ms,
            predecessors,
        });
        let generation = state
            .registry()
            .register(Arc::clone(&id), keys, live.clone());
        state.arrived();
        let pending_max = state
            .hooks
            .as_ref()
            .map_or(1, |hooks| hooks.connection_pending_max(&auth.app_id));
        let session = Session {
            key: format!("{id}!{secret}"),
            id,
            generation,
            live,
            echo: get("echo") != Some("false"),
            state,
            auth,
            identity,
            format,
            outlet,
            attachments: HashMap::new(),
            derived: HashMap::new(),
            presence_channels,
            replies,
            continuity_lost: error.is_some() && !foreign,
            rate: RateWindow::new(now),
            control_rate: RateWindow::new(now),
            renew_requested: false,
            remain_present_for_ms: get("remainPresentFor").and_then(|v| v.parse().ok()),
            sync_counter: 0,
            warming: None,
            pipeline: Pipeline::new(pending_max),
            calls: JoinSet::new(),
            call_tickets: HashMap::new(),
            transport: arrival.transport,
            connected_at_ms,
            from_function,
            stats,
            _counted: counted,
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

    /// When the token timer next fires: at expiry, or first, `token_renew_notice_ms`
    /// before it, to ask for renewal (AUTH), as Ably does 30 s ahead. Only a token that
    /// lives longer than the notice is asked (decided on its whole lifetime, so the answer
    /// does not change as it ages): a short token, like one a client cannot renew, just
    /// expires and the client gets the DISCONNECTED 40142 the SDK expects.
    fn token_deadline(&self, now: i64) -> Option<Instant> {
        let expires = self.auth.expires_ms?;
        let at = match self.renew_at() {
            Some(at) if !self.renew_requested => at.min(expires),
            _ => expires,
        };
        Some(Instant::now() + Duration::from_millis((at - now).max(0) as u64))
    }

    /// When to ask this connection's token to renew, if at all.
    fn renew_at(&self) -> Option<i64> {
        let notice = self.state.config.token_renew_notice_ms;
        let expires = self.auth.expires_ms?;
        let issued = self.auth.issued_ms?;
        (notice > 0 && expires - issued > notice).then_some(expires - notice)
    }

    /// Whether the token timer that just fired is the renewal notice (not expiry).
    fn renewal_due(&self, now: i64) -> bool {
        !self.renew_requested
            && self.renew_at().is_some_and(|at| now >= at)
            && self.auth.expires_ms.is_some_and(|expires| now < expires)
    }

    /// The reader loop. Returns when the connection ends, after telling the hub and
    /// parking or discarding the connection's state.
    ///
    /// Not an `async fn`: an `async fn` keeps each argument twice in its future, as
    /// captured and as moved into its body (rust-lang/rust#62958), and this future
    /// lives as long as the connection, so the whole `Session` would be held twice by
    /// every idle connection. An `async move` block uses what it captures in place.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold the Session twice"
    )]
    pub(crate) fn run(
        mut self,
        mut inbound: impl Inbound,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let mut shutdown = self.state.shutdown.clone();
            let shared = self.outlet.shared.clone();
            let live = self.live.clone();
            let revocations = self.state.keys.revocations.clone();
            let mut revocation_changes = revocations.subscribe();
            // The token's timer, armed only for a token that expires. Boxed: inline, a
            // timer would sit in every connection's future (most, with a key, have none).
            let mut token_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
            let ending = loop {
                match self.token_deadline(now_ms()) {
                    Some(deadline) => match &mut token_timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => token_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    },
                    None => token_timer = None,
                }
                // The arms below do not wait: the select's output (the largest of its
                // arms' values) would be held across their waits in every idle
                // connection's future. A client frame that has to wait is finished
                // after it, boxed.
                let unfinished = tokio::select! {
                    // A before-publish function answered: apply what is now at the front.
                    // Cancel-safe: `join_next_with_id` is.
                    Some(joined) = self.calls.join_next_with_id(), if !self.calls.is_empty() => {
                        self.verdict_arrived(joined);
                        None
                    }
                    // A client frame. Cancel-safe: `Inbound::next` is. Not read while the
                    // connection's held-back publishes are at their bound.
                    received = inbound.next(), if !self.pipeline.is_full() => {
                        // Boxed: it may be held across the waits of `finish_frame`, and
                        // inline it would make every idle connection's task a frame larger.
                        let frame: Box<ProtocolMessage> = match received {
                            Received::Encoded(bytes) => match tern_protocol::decode(self.format, &bytes) {
                                Ok(frame) => Box::new(frame),
                                Err(err) => break self.fail_with(err.to_error_info()),
                            },
                            Received::Decoded(frame) => frame,
                            Received::Refused(error) => break self.fail_with(error),
                            Received::Gone => break Ending::Dropped,
                        };
                        if self.outlet.has_headroom() && frame.action != action::CLOSE {
                            if let Some(ending) = self.handle(*frame) {
                                break ending;
                            }
                            self.warming.is_some().then_some(Unfinished::Warming)
                        } else {
                            Some(Unfinished::Frame(frame))
                        }
                    }
                    // The outbound queue overflowed: this client reads too slowly.
                    _ = shared.overflowed() => {
                        self.outlet.finish(Some(self.disconnected(too_slow())));
                        break Ending::Dropped;
                    }
                    _ = live.woken() => match live.why() {
                        // The client resumed this connection on a new transport.
                        Woken::Superseded => {
                            self.outlet.finish(Some(self.disconnected(ErrorInfo::new(
                                code::CONNECTION_SUPERSEDED, "connection resumed on another transport",
                            ))));
                            break Ending::Dropped;
                        }
                        // `DELETE /connections/{id}`: closed for good; ably-js goes FAILED.
                        Woken::Closed => break self.fail_with(crate::connections::closed_by_request()),
                    },
                    // Token renewal notice, then expiry.
                    _ = async { match token_timer.as_mut() { Some(timer) => timer.await, None => pending().await } } => {
                        if self.renewal_due(now_ms()) {
                            self.renew_requested = true;
                            self.outlet.send(ProtocolMessage { action: action::AUTH, ..Default::default() });
                            None
                        } else {
                            self.outlet.finish(Some(self.disconnected(ErrorInfo::new(code::TOKEN_EXPIRED, "token expired"))));
                            break Ending::Dropped;
                        }
                    }
                    // A token revocation covers this connection's token (and applies now).
                    _ = crate::revoke::until_revoked(&revocations, &mut revocation_changes, &self.auth) => {
                        self.outlet.finish(Some(self.disconnected(crate::revoke::revoked())));
                        break Ending::Dropped;
                    }
                    // The node is shutting down: the client reconnects (elsewhere, if it can).
                    _ = shutdown.changed() => {
                        self.outlet.finish(Some(self.disconnected(ErrorInfo::with_status(
                            code::DISCONNECTED, 503, "server shutting down",
                        ))));
                        break Ending::Dropped;
                    }
                };
                // Boxed: rare, and inline these waits would make every idle connection's
                // future as large as the largest of them.
                if let Some(unfinished) = unfinished {
                    if let Some(ending) = Box::pin(self.finish_frame(unfinished)).await {
                        break ending;
                    }
                }
            };
            self.outlet.finish(None);
            self.end(ending);
        }
    }

    /// The waits of a client frame, then the frame: room in the queue for its replies
    /// (a client that does not read is disconnected after SLOW_CLIENT_WAIT), the held
    /// publishes settled before a CLOSE, and an ATTACH waiting for its channel to warm.
    async fn finish_frame(&mut self, unfinished: Unfinished) -> Option<Ending> {
        if let Unfinished::Frame(frame) = unfinished {
            if !self.outlet.has_headroom() && !self.outlet.headroom(SLOW_CLIENT_WAIT).await {
                self.outlet.finish(Some(self.disconnected(too_slow())));
                return Some(Ending::Dropped);
            }
            if frame.action == action::CLOSE {
                // Publishes sent before the CLOSE are answered before CLOSED.
                self.settle_held().await;
            }
            if let Some(ending) = self.handle(*frame) {
                return Some(ending);
            }
        }
        if let Some(mut warming) = self.warming.take() {
            let _ = tokio::time::timeout(WARM_WAIT, &mut warming.0).await;
            let (_, frame) = *warming;
            return self.attach_now(frame);
        }
        None
    }

    fn end(mut self, ending: Ending) {
        self.detach_all_derived();
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
                if self.state.departures.tracks(&self.auth.app_id) {
                    let ended = [crate::departures::Record::Ended {
                        id: self.id.to_string(),
                    }];
                    crate::departures::publish(hub, &self.auth.app_id, &ended);
                }
                crate::hooks::record_disconnect(
                    &self.state,
                    crate::hooks::Ended {
                        app_id: &self.auth.app_id,
                        connection_id: &self.id,
                        client_id: self.identity_id().as_deref(),
                        transport: self.transport,
                        connected_at_ms: self.connected_at_ms,
                        reason: crate::hooks::EndReason::Closed,
                    },
                    now,
                );
            }
            Ending::Dropped => {
                // Order matters: the hub lets go of the connection id before a resume
                // can take the parked state and attach under the same id.
                let grace_ms = self
                    .remain_present_for_ms
                    .unwrap_or(hub.limits().presence_leave_grace_ms);
                hub.connection_dropped_for(&self.auth.app_id, &self.id, channels, now, grace_ms);
                let parked = ParkedSession {
                    info: self.live.info.clone(),
                    replies: self.replies,
                    presence_channels: self.presence_channels,
                    from_function: self.from_function.map(|given| *given),
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
        self.identity.id().map(str::to_owned)
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
        Some(self.fail_with(error))
    }

    fn fail_with(&self, error: ErrorInfo) -> Ending {
        self.outlet.finish(Some(error_frame(error)));
        Ending::Closed
    }

    /// The connection key this transport was given in CONNECTED (a comet transport's
    /// URLs are named by it).
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    fn handle(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        if !matches!(
            frame.action,
            action::MESSAGE | action::PRESENCE | action::ANNOTATION
        ) {
            if let Some(refused) = self.control_over_rate(&frame) {
                return refused;
            }
        }
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
            action::MESSAGE | action::PRESENCE | action::ANNOTATION => {
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
            action::SYNC => {
                self.resync(frame);
                None
            }
            action::ACTIVATE => None,
            action::OBJECT | action::OBJECT_SYNC => {
                self.send_reply(
                    frame.msg_serial,
                    None,
                    Reply::Nack(ErrorInfo::new(
                        code::BAD_REQUEST,
                        "LiveObjects are not supported",
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

    fn channel_error(&self, channel: String, error: ErrorInfo) -> Option<Ending> {
        self.outlet.send(ProtocolMessage {
            action: action::ERROR,
            channel: Some(channel),
            error: Some(error),
            ..Default::default()
        });
        None
    }
}

/// The connection ERROR for a WebSocket message over `max_frame_size`. Its msgSerial
/// was never read, so it cannot be NACKed and the connection cannot go on in order;
/// an ERROR (not a plain close, which ably-js would answer by resuming and re-sending
/// the same message) ends it with a reason the SDK reports.
pub(crate) fn frame_too_large(max_frame_size: usize) -> ErrorInfo {
    ErrorInfo::new(
        code::MESSAGE_TOO_LARGE,
        format!("WebSocket message over the maximum frame size of {max_frame_size} bytes"),
    )
}

/// Takes the parked state (and key chain) of the connection named by a resume/recover
/// key, superseding a transport that still holds it, for a client of `app_id` acting
/// as `client_id` (a resume here, or a handover to another node), waiting at most
/// `supersede_wait` for a live transport to let go. `Err` is the error the new
/// CONNECTED carries.
pub(crate) async fn take_parked(
    state: &EdgeState,
    key: &str,
    app_id: &str,
    client_id: Option<&str>,
    supersede_wait: Duration,
) -> Result<(Arc<str>, ParkedSession, KeyChain), ErrorInfo> {
    let unable = |why: &str| {
        ErrorInfo::new(
            code::UNABLE_TO_RECOVER,
            format!("Unable to recover connection: {why}"),
        )
    };
    let give_up = Instant::now() + supersede_wait;
    loop {
        let result = state.registry().resume(key, now_ms());
        match result {
            Ok((id, parked, keys)) => {
                // A clientId the `$connect` function attached is the connection's
                // own: the client presents its original credentials again.
                let function_given = parked.from_function.is_some() && client_id.is_none();
                if parked.info.app_id != app_id
                    || (parked.info.client_id.is_some()
                        && parked.info.client_id.as_deref() != client_id
                        && !function_given)
                {
                    return Err(unable("credentials do not match the connection"));
                }
                return Ok((id, parked, keys));
            }
            Err(ResumeError::Live(live)) if Instant::now() < give_up => {
                live.supersede();
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
