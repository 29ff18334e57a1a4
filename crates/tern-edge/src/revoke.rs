//! Token revocation (Ably RSA17): `POST /keys/{keyName}/revokeTokens`, the revocations
//! every node holds, and the check every credential passes.
//!
//! How a revocation reaches every node: it is published as messages on a reserved
//! channel of the app, [`CHANNEL`], which no client can name (its `[internal]`
//! qualifier is refused with 40010 by `channel_name::parse`, REST and realtime alike).
//! Every node keeps one internal subscriber on that channel per configured app, so the
//! existing machinery carries it: the hub journals it to the history store (a restart
//! reads it back before serving, [`Revocations::restore`]), the replicator sends it to
//! every node (each has "subscribers" on it) over reliable links with resend, repair and
//! `Heads` anti-entropy, and the 201 waits for the store (and `ack_replicas`) like any
//! publish. A new cluster frame would have needed its own delivery, acks, resend and
//! persistence: all of which a channel already has.
//!
//! Each node's subscriber records what arrives into its [`RevocationList`]s and wakes
//! every connection ([`Revocations::subscribe`]); a connection whose token is now
//! refused gets DISCONNECTED 40141 (or waits until `appliesAt` first).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tern_auth::{
    AuthContext, KeyRing, Revocation, RevocationError, RevocationList, RevocationTarget,
    TokenPolicy,
};
use tern_core::{AttachOptions, ChannelEvent, ChannelKey, Hub, Subscriber};
use tern_protocol::{code, flags, Data, ErrorInfo, Format, Message};
use tern_store::{ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore};
use tokio::sync::watch;

use crate::credentials::rest_auth;
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::state::EdgeState;

/// The reserved channel, in every app, that carries its revocations.
pub(crate) const CHANNEL: &str = "[internal]revocations";
/// The connection id of each node's internal subscriber on [`CHANNEL`].
const SUBSCRIBER_ID: &str = "internal-revocations";
/// Name of the messages that carry a revocation.
const MESSAGE_NAME: &str = "revoke";
/// `allowReauthMargin`: revocation is postponed by 30 s (Ably), so clients can renew.
pub(crate) const REAUTH_MARGIN_MS: i64 = 30_000;
/// How far back `issuedBefore` may be (Ably: "more than an hour in the past" is refused).
pub(crate) const ISSUED_BEFORE_PAST_MAX_MS: i64 = 3_600_000;
/// Targets one request may name (Ably: 100).
pub(crate) const TARGETS_MAX: usize = 100;

/// Who may revoke, and how many revocations an app may hold.
#[derive(Clone, Debug)]
pub struct RevocationConfig {
    /// Revocations in force per app (each target of a request is one, until no token
    /// it covers can be alive: `issuedBefore + token_ttl_max_ms`); a request that would
    /// exceed it gets 42910. Keep it well under the history retention's `max_count`,
    /// which is what brings revocations back after a restart.
    pub entries_per_app_max: usize,
    /// Key names (`appId.keyId`) with revocable tokens: only these may revoke (Ably's
    /// `revocableTokens` key setting).
    pub revocable_keys: Vec<String>,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            entries_per_app_max: 1_000,
            revocable_keys: Vec::new(),
        }
    }
}

/// The configured keys together with the revocations in force: what a presented
/// credential is checked against. Dereferences to the [`KeyRing`].
pub struct Credentials {
    pub(crate) ring: KeyRing,
    pub(crate) revocations: Arc<Revocations>,
}

impl std::ops::Deref for Credentials {
    type Target = KeyRing;

    fn deref(&self) -> &KeyRing {
        &self.ring
    }
}

/// Every app's revocations on this node.
pub(crate) struct Revocations {
    lists: Mutex<HashMap<Arc<str>, RevocationList>>,
    revocable: HashSet<String>,
    entries_max: usize,
    token_life_max_ms: i64,
    /// Bumped whenever a revocation is recorded: live connections re-check.
    changed: watch::Sender<u64>,
}

impl Revocations {
    pub(crate) fn new(config: &RevocationConfig, policy: &TokenPolicy) -> Self {
        Revocations {
            lists: Mutex::new(HashMap::new()),
            revocable: config.revocable_keys.iter().cloned().collect(),
            entries_max: config.entries_per_app_max,
            token_life_max_ms: policy.ttl_max_ms.saturating_add(policy.clock_skew_ms),
            changed: watch::Sender::new(0),
        }
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, RevocationList>> {
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Woken when revocations are recorded; then see [`Self::refused_from`].
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// From when `ctx` is refused by a revocation in force (`None`: it is not).
    pub(crate) fn refused_from(&self, ctx: &AuthContext) -> Option<i64> {
        if !ctx.via_token {
            return None;
        }
        self.lists().get(ctx.app_id.as_str())?.refused_from(ctx)
    }

    /// 40141 if `ctx` is revoked at `now_ms`.
    pub(crate) fn check(&self, ctx: &AuthContext, now_ms: i64) -> Result<(), ErrorInfo> {
        match self.refused_from(ctx) {
            Some(from) if from <= now_ms => Err(revoked()),
            _ => Ok(()),
        }
    }

    /// Records the revocations one event of [`CHANNEL`] carries.
    fn record_messages<'a>(&self, app: &Arc<str>, messages: impl Iterator<Item = &'a Message>) {
        let now = now_ms();
        let mut recorded = false;
        {
            let mut lists = self.lists();
            let list = lists
                .entry(app.clone())
                .or_insert_with(|| RevocationList::new(self.entries_max, self.token_life_max_ms));
            for revocation in messages.filter_map(decode) {
                list.record(revocation, now);
                recorded = true;
            }
        }
        if recorded {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Attaches this node's internal subscriber to every app's [`CHANNEL`]; from then on
    /// the hub (and through it the cluster) delivers every revocation here.
    pub(crate) fn attach(self: &Arc<Self>, hub: &Hub, ring: &KeyRing) {
        let apps: HashSet<&str> = ring.keys().map(|key| key.app_id.as_str()).collect();
        for app in apps {
            let key = ChannelKey::new(app, CHANNEL);
            let sink = Arc::new(Sink {
                app: key.app.clone(),
                revocations: self.clone(),
            });
            let options = AttachOptions {
                modes: flags::SUBSCRIBE,
                echo: true,
                resume_from: None,
                rewind: None,
                delta: false,
            };
            if let Err(err) =
                hub.attach(&key, SUBSCRIBER_ID.into(), options, sink, |_| {}, now_ms())
            {
                tracing::error!(app, %err, "token revocations cannot be received for this app");
            }
        }
    }

    /// Reads every app's stored revocations back (after a restart). Blocking, and meant
    /// to: it runs once at boot, before the node serves, so no revoked token is accepted
    /// in the moment before its revocation is loaded.
    pub(crate) fn restore(&self, store: &dyn HistoryStore, ring: &KeyRing) {
        let apps: HashSet<&str> = ring.keys().map(|key| key.app_id.as_str()).collect();
        for app in apps {
            let app: Arc<str> = app.into();
            let mut query = HistoryQuery::new(ChannelRef {
                app: app.clone(),
                channel: CHANNEL.into(),
                kind: EventKind::Message,
            });
            query.direction = Direction::Forwards;
            query.limit = tern_store::LIMIT_MAX;
            loop {
                let page = match store.query(&query) {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::error!(%app, %err, "stored token revocations could not be read");
                        break;
                    }
                };
                let messages: Vec<Message> = page
                    .items
                    .iter()
                    .filter_map(|item| {
                        tern_protocol::decode_value(Format::Msgpack, &item.payload).ok()
                    })
                    .collect();
                self.record_messages(&app, messages.iter());
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => break,
                }
            }
        }
    }
}

/// Error for a revoked token: 40141, 401.
pub(crate) fn revoked() -> ErrorInfo {
    ErrorInfo::with_status(code::TOKEN_REVOKED, 401, "token revoked")
}

/// Waits until `ctx` is refused by a revocation (never, if it is not). Cancel-safe:
/// call it again in each round of a `select!` loop with the same receiver.
/// Not an `async fn`: it is waited on in every idle session, and an `async fn` holds
/// its arguments twice (rust-lang/rust#62958).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
pub(crate) fn until_revoked<'a>(
    revocations: &'a Revocations,
    changes: &'a mut watch::Receiver<u64>,
    ctx: &'a AuthContext,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    async move {
        loop {
            changes.borrow_and_update();
            let wait_ms = revocations
                .refused_from(ctx)
                .map(|from| from.saturating_sub(now_ms()));
            // Boxed: a revocation that covers this token but applies later is rare, and
            // inline its timer would sit in every connection's session for its life.
            let mut applies = match wait_ms {
                Some(ms) if ms <= 0 => return,
                Some(ms) => Some(Box::pin(tokio::time::sleep(Duration::from_millis(
                    ms as u64,
                )))),
                None => None,
            };
            let applied = async {
                match applies.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = applied => return,
                changed = changes.changed() => if changed.is_err() { std::future::pending::<()>().await },
            }
        }
    }
}

fn decode(message: &Message) -> Option<Revocation> {
    if message.name.as_deref() != Some(MESSAGE_NAME) {
        return None;
    }
    match &message.data {
        Some(Data::String(text)) => serde_json::from_str(text).ok(),
        _ => None,
    }
}

/// This node's subscriber on one app's [`CHANNEL`].
struct Sink {
    app: Arc<str>,
    revocations: Arc<Revocations>,
}

impl Subscriber for Sink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let messages = event.frame.messages.iter().flatten();
        self.revocations.record_messages(&self.app, messages);
        // Never full: dropping this subscriber would stop revocations arriving.
        true
    }
}

/// The body of `POST /keys/{keyName}/revokeTokens` (ably-js `auth.revokeTokens`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevokeRequest {
    targets: Vec<String>,
    #[serde(default)]
    issued_before: Option<i64>,
    #[serde(default)]
    allow_reauth_margin: Option<bool>,
}

/// One target's outcome (`TokenRevocationSuccessResult` / `…FailureResult`).
#[derive(Serialize)]
#[serde(untagged)]
enum TargetOutcome {
    Revoked {
        target: String,
        #[serde(rename = "issuedBefore")]
        issued_before: i64,
        #[serde(rename = "appliesAt")]
        applies_at: i64,
    },
    Failed {
        target: String,
        error: ErrorInfo,
    },
}

/// `POST /keys/{keyName}/revokeTokens`: revokes the tokens of the named key that match
/// each target, answered as a batch (201, a result per target).
pub(crate) async fn revoke_tokens(
    State(state): State<Arc<EdgeState>>,
    Path(key_name): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let now = now_ms();
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now)?;
    check_revoker(&state.keys.revocations, &auth, &key_name)?;
    let request: RevokeRequest = crate::rest::decode_body(request_format(&headers), &bytes)?;
    let (issued_before, applies_at) = times(&request, now, state.keys.policy())?;
    let parsed: Vec<(String, Result<RevocationTarget, ErrorInfo>)> = request
        .targets
        .into_iter()
        .map(|spec| {
            let target = RevocationTarget::parse(&spec)
                .map_err(|err| ErrorInfo::new(code::INVALID_PARAMETER_VALUE, err.to_string()));
            (spec, target)
        })
        .collect();
    let revocations: Vec<Revocation> = parsed
        .iter()
        .filter_map(|(_, target)| target.as_ref().ok())
        .map(|target| Revocation {
            key_name: key_name.clone(),
            target: target.clone(),
            issued_before,
            applies_at,
        })
        .collect();
    admit(
        &state.keys.revocations,
        &auth.app_id,
        revocations.len(),
        now,
    )?;
    publish(&state, &auth.app_id, &revocations, now).await?;
    let results: Vec<Result<TargetOutcome, TargetOutcome>> = parsed
        .into_iter()
        .map(|(target, parsed)| match parsed {
            Ok(_) => Ok(TargetOutcome::Revoked {
                target,
                issued_before,
                applies_at,
            }),
            Err(error) => Err(TargetOutcome::Failed { target, error }),
        })
        .collect();
    let format = response_format(&headers, q.get("format").map(String::as_str));
    Ok(body(
        StatusCode::CREATED,
        format,
        &crate::batch::BatchResult::of(results),
    ))
}

/// Only the key itself (basic auth, not a token: 40162) may revoke its tokens, and only
/// if its tokens are revocable (40160).
fn check_revoker(
    revocations: &Revocations,
    auth: &AuthContext,
    key_name: &str,
) -> Result<(), ErrorInfo> {
    if auth.via_token {
        return Err(ErrorInfo::with_status(
            code::REVOCATION_NEEDS_BASIC_AUTH,
            401,
            "tokens can only be revoked with basic auth (the key itself)",
        ));
    }
    if auth.key_name != key_name {
        return Err(ErrorInfo::with_status(
            code::INVALID_CREDENTIALS,
            401,
            "the key in the path is not the key authenticating the request",
        ));
    }
    if !revocations.revocable.contains(key_name) {
        return Err(ErrorInfo::with_status(
            code::CAPABILITY_DENIED,
            401,
            format!("key '{key_name}' does not have revocable tokens enabled"),
        ));
    }
    Ok(())
}

/// `issuedBefore` (default now; not in the future, at most an hour back) and
/// `appliesAt` (now, or 30 s on with `allowReauthMargin`).
fn times(request: &RevokeRequest, now: i64, policy: &TokenPolicy) -> Result<(i64, i64), ErrorInfo> {
    if request.targets.is_empty() || request.targets.len() > TARGETS_MAX {
        return Err(ErrorInfo::new(
            code::INVALID_PARAMETER_VALUE,
            format!("targets must name 1 to {TARGETS_MAX} targets"),
        ));
    }
    let issued_before = request.issued_before.unwrap_or(now);
    if issued_before > now.saturating_add(policy.clock_skew_ms)
        || issued_before < now.saturating_sub(ISSUED_BEFORE_PAST_MAX_MS)
    {
        return Err(ErrorInfo::new(
            code::INVALID_PARAMETER_VALUE,
            "issuedBefore must not be in the future nor more than an hour in the past",
        ));
    }
    let margin = if request.allow_reauth_margin == Some(true) {
        REAUTH_MARGIN_MS
    } else {
        0
    };
    Ok((issued_before, now.saturating_add(margin)))
}

fn admit(revocations: &Revocations, app: &str, count: usize, now: i64) -> Result<(), ErrorInfo> {
    let mut lists = revocations.lists();
    let list = lists.entry(app.into()).or_insert_with(|| {
        RevocationList::new(revocations.entries_max, revocations.token_life_max_ms)
    });
    list.admit(count, now).map_err(|err| match err {
        RevocationError::TooMany(_) => ErrorInfo::new(code::RATE_LIMIT, err.to_string()),
    })
}

/// Publishes the revocations on the app's [`CHANNEL`] and waits until they are durable
/// (stored here and, in a cluster, on the replicas), as a REST publish does. This node's
/// own subscriber records them as the hub fans them out, before this returns.
async fn publish(
    state: &EdgeState,
    app: &str,
    revocations: &[Revocation],
    now: i64,
) -> Result<(), ErrorInfo> {
    if revocations.is_empty() {
        return Ok(());
    }
    let key = ChannelKey::new(app, CHANNEL);
    let (publisher, messages) = crate::publish::records("revoke", MESSAGE_NAME, revocations, now);
    let store_mark = state.store_mark();
    state
        .hub
        .publish(&key, &publisher, messages, now)
        .map_err(crate::publish::core_error)?;
    match state.durable(key, store_mark).await.error() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
