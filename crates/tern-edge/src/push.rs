//! Push notifications (Ably push admin, RSH1): device registrations, channel
//! subscriptions and push publish.
//!
//! State. An app's push state is the fold of a log of [`registry::Mutation`]s published
//! on an internal channel of the app, [`PUSH_CHANNEL`] (a name clients can neither
//! attach nor publish to: `channel_name::parse` refuses it). So every change is
//! journaled, stored and replicated like a message: ACKed (200/201) only once durable,
//! kept across restarts, copied to the channel's home in every region. The home of that
//! channel in a region serves all push requests of its region (other nodes forward
//! them, `to_home`) and folds the stored log into a [`registry::Registry`] in memory;
//! it refolds from its store whenever the channel's cursor shows events it has not
//! folded (changes made in another region), in stored order, which is the same on every
//! node, so every region converges on the same registry.
//!
//! Delivery. Only the `ablyChannel` transport is delivered: a message named
//! `__ably_push__` whose data is the JSON of the notification, published on the channel
//! the recipient names, with the recipient's `ablyKey` (which must be a key of the same
//! app allowed to publish there; `ablyUrl` is ignored, delivery stays on this cluster).
//! FCM, APNs and web push registrations are stored but nothing is sent to them: Tern
//! runs offline and holds no credentials for those services.
//!
//! # Layout
//! - [`registry`]: the pure registry and its mutations (no I/O).
//! - `rest`: the `/push/*` handlers and who may call them.
//! - `delivery`: turning a notification into `__ably_push__` messages.

pub(crate) mod delivery;
pub mod registry;
pub(crate) mod rest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tern_core::{ChannelKey, Cursor, OriginId};
use tern_protocol::{code, Data, ErrorInfo, Format, Message};
use tern_store::{ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, Position};

use registry::{Mutation, PushLimits, Registry};

use crate::state::EdgeState;

/// The internal channel holding an app's push log. It starts with `[` and is no
/// `[?params]` qualifier, so no client can attach, publish or read it.
pub const PUSH_CHANNEL: &str = "[tern]push";
/// Name of the log's messages (its version: a later format gets a new name).
const MUTATION_NAME: &str = "tern.push.v1";

/// The folded registry of one app on this node, and how much of the log it covers.
#[derive(Default)]
pub(crate) struct AppPush {
    pub(crate) registry: Registry,
    /// What has been folded in: the log's events per origin (`cursor`) and the last
    /// stored position (`last`); `None` until first loaded, and after a write whose
    /// outcome is unknown.
    folded: Option<Folded>,
}

/// How much of the stored log a registry holds.
#[derive(Clone, Debug, Default)]
struct Folded {
    cursor: Cursor,
    last: Option<Position>,
}

/// Every app's push state on this node. Each app's is behind an async mutex held for
/// a whole request, so a write is checked against, and applied to, the state it read.
#[derive(Default)]
pub(crate) struct Push {
    apps: Mutex<HashMap<String, Arc<tokio::sync::Mutex<AppPush>>>>,
}

pub(crate) fn channel_key(app: &str) -> ChannelKey {
    ChannelKey::new(app, PUSH_CHANNEL)
}

impl Push {
    fn app(&self, app: &str) -> Arc<tokio::sync::Mutex<AppPush>> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(app.to_string()).or_default().clone()
    }
}

/// The app's registry, up to date with everything this node has of the log: when the
/// push channel's cursor shows events not folded in (written in another region, or at
/// a node that was the home before), the stored log is read on from the last folded
/// position; if that still misses some (an event that sorts before what was folded),
/// the whole log is folded again, so the fold always follows the stored order.
pub(crate) async fn load(
    state: &EdgeState,
    app: &str,
) -> Result<tokio::sync::OwnedMutexGuard<AppPush>, ErrorInfo> {
    let mut guard = state.push.app(app).lock_owned().await;
    let mut live = state.hub.cursor(&channel_key(app));
    let Some(store) = state.store.clone() else {
        // Without a store the log lives only in the hub: what this node applied.
        guard.folded.get_or_insert_with(Folded::default);
        return Ok(guard);
    };
    // The store's cursor too: history copied in by a backfill (a new home) reaches the
    // store without passing the hub.
    let stored = {
        let (store, app) = (store.clone(), app.to_string());
        tokio::task::spawn_blocking(move || store.cursor(&app, PUSH_CHANNEL))
            .await
            .map_err(|e| ErrorInfo::new(code::INTERNAL, e.to_string()))?
            .map_err(|e| ErrorInfo::new(code::INTERNAL, format!("reading the push log: {e}")))?
    };
    for (origin, seq) in stored {
        live.advance(OriginId(origin), seq);
    }
    if guard
        .folded
        .as_ref()
        .is_some_and(|f| f.cursor.covers(&live))
    {
        return Ok(guard);
    }
    let limits = state.config.push.clone();
    let app = app.to_string();
    let start = match guard.folded.take() {
        Some(folded) => Some((std::mem::take(&mut guard.registry), folded)),
        None => None,
    };
    let (registry, folded) = tokio::task::spawn_blocking(move || {
        if let Some((registry, folded)) = start {
            let (registry, folded) = fold_stored(store.as_ref(), &app, &limits, registry, folded)?;
            if folded.cursor.covers(&live) {
                return Ok((registry, folded));
            }
        }
        fold_stored(
            store.as_ref(),
            &app,
            &limits,
            Registry::default(),
            Folded::default(),
        )
    })
    .await
    .map_err(|e| ErrorInfo::new(code::INTERNAL, e.to_string()))??;
    guard.registry = registry;
    guard.folded = Some(folded);
    Ok(guard)
}

/// Folds the app's stored push log after `folded.last` into `registry`, oldest first.
/// Blocking (store reads).
fn fold_stored(
    store: &dyn HistoryStore,
    app: &str,
    limits: &PushLimits,
    mut registry: Registry,
    mut folded: Folded,
) -> Result<(Registry, Folded), ErrorInfo> {
    let mut query = HistoryQuery::new(ChannelRef {
        app: app.into(),
        channel: PUSH_CHANNEL.into(),
        kind: EventKind::Message,
    });
    query.direction = Direction::Forwards;
    query.limit = tern_store::LIMIT_MAX;
    query.after = folded.last;
    loop {
        let page = store
            .query(&query)
            .map_err(|e| ErrorInfo::new(code::INTERNAL, format!("reading the push log: {e}")))?;
        for item in &page.items {
            folded.cursor.advance(OriginId(item.origin), item.seq);
            folded.last = Some(item.position());
            match decode_mutation(&item.payload) {
                // A refused mutation had no effect where it was made either.
                Some(mutation) => {
                    let _ = registry.apply(&mutation, limits);
                }
                None => {
                    metrics::counter!("tern_push_log_undecodable_total").increment(1);
                }
            }
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok((registry, folded)),
        }
    }
}

fn decode_mutation(payload: &[u8]) -> Option<Mutation> {
    let message: Message = tern_protocol::decode_value(Format::Msgpack, payload).ok()?;
    if message.name.as_deref() != Some(MUTATION_NAME) {
        return None;
    }
    match message.data? {
        Data::String(json) => serde_json::from_str(&json).ok(),
        _ => None,
    }
}

/// Applies `mutation` to `app`'s registry: checked against it first (a refusal changes
/// nothing and journals nothing), then journaled on the push channel and, once durable
/// (stored, and on replicas in a cluster), folded in.
pub(crate) async fn write(
    state: &EdgeState,
    app: &mut AppPush,
    app_id: &str,
    mutation: Mutation,
) -> Result<(), ErrorInfo> {
    let limits = &state.config.push;
    app.registry.check(&mutation, limits)?;
    if !app.registry.changes(&mutation) {
        // Already so, and durable (the registry is folded from the stored log): nothing
        // to write, so repeating a request cannot grow the log.
        return Ok(());
    }
    let json = serde_json::to_string(&mutation)
        .map_err(|e| ErrorInfo::new(code::INTERNAL, e.to_string()))?;
    let message = Message {
        name: Some(MUTATION_NAME.into()),
        data: Some(Data::String(json)),
        ..Message::default()
    };
    let key = channel_key(app_id);
    let publisher = crate::publish::request_publisher();
    let store_mark = state.store_mark();
    let outcome = state
        .hub
        .publish(&key, &publisher, vec![message], crate::now_ms())
        .map_err(crate::publish::core_error)?;
    if let Some(error) = state.durable(key, store_mark).await.error() {
        // Unknown whether it is stored: fold again from the store on the next request.
        app.folded = None;
        return Err(error);
    }
    // The caller holds the app's lock: the registry is the one checked above.
    app.registry.apply(&mutation, limits)?;
    if let (Some(event), Some(folded)) = (outcome.event, app.folded.as_mut()) {
        let position = Position {
            timestamp_ms: event.timestamp_ms(),
            origin: event.origin.0,
            seq: event.seq,
            index: 0,
        };
        folded.cursor.advance(event.origin, event.seq);
        // Folded in stored order only if it sorts last; otherwise fold again next time.
        if folded.last.is_some_and(|last| last >= position) {
            app.folded = None;
        } else {
            folded.last = Some(position);
        }
    }
    metrics::counter!("tern_push_mutations_total").increment(1);
    Ok(())
}

/// Middleware on the `/push` routes: in a cluster, every push request of a region is
/// served by the home of the app's push channel in that region (where the log is
/// stored); other nodes forward it there unchanged.
pub(crate) async fn to_home(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let url = state.cluster.as_ref().and_then(|cluster| {
        if request.headers().contains_key(crate::forward::FORWARDED) {
            return None;
        }
        let app = rest::app_of(&state, &request)?;
        cluster.home_url(&channel_key(&app))
    });
    let Some(url) = url else {
        return next.run(request).await;
    };
    // Read (bounded as the handler would) before forwarding: a body over the limit is
    // refused here rather than buffered for the home.
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, state.config.max_frame_size).await {
        Ok(bytes) => {
            let within = crate::forward::answer_within(&state, &parts.method);
            let request = Request::from_parts(parts, axum::body::Body::from(bytes));
            crate::forward::forward(&url, request, within).await
        }
        Err(_) => crate::response::error_response(ErrorInfo::with_status(
            code::MESSAGE_TOO_LARGE,
            413,
            format!(
                "request body larger than {} bytes",
                state.config.max_frame_size
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry::Device;
    use tern_store::StoredItem;

    fn state() -> (EdgeState, Arc<dyn HistoryStore>) {
        let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
        let hub = Arc::new(tern_core::Hub::new(
            OriginId(1),
            tern_core::CoreLimits::default(),
        ));
        let (_shutdown, watch) = tokio::sync::watch::channel(false);
        let state = EdgeState::new(
            crate::EdgeConfig::default(),
            hub,
            tern_auth::KeyRing::new(Vec::new()),
            watch,
        )
        .with_store(store.clone());
        (state, store)
    }

    fn put(id: &str, client_id: &str) -> Mutation {
        Mutation::PutDeviceV1 {
            device: Device {
                id: id.into(),
                client_id: Some(client_id.into()),
                platform: "ios".into(),
                form_factor: "phone".into(),
                metadata: None,
                device_secret: None,
                recipient: serde_json::json!({ "transportType": "apns", "deviceToken": "t" }),
                identity_token: "token".into(),
            },
        }
    }

    /// Stores `mutation` as the push log's item at (`timestamp_ms`, `origin`, `seq`)
    /// without passing the hub, as a backfill from another region does.
    fn store_directly(store: &dyn HistoryStore, position: (i64, u64, u64), mutation: &Mutation) {
        let message = Message {
            name: Some(MUTATION_NAME.into()),
            data: Some(Data::String(serde_json::to_string(mutation).unwrap())),
            ..Message::default()
        };
        let (timestamp_ms, origin, seq) = position;
        let item = StoredItem {
            timestamp_ms,
            origin,
            seq,
            index: 0,
            payload: tern_protocol::encode_value(Format::Msgpack, &message),
        };
        let channel = ChannelRef {
            app: "app".into(),
            channel: PUSH_CHANNEL.into(),
            kind: EventKind::Message,
        };
        store
            .append(vec![(channel, item)], Box::new(|_| {}))
            .unwrap();
        store.flush();
    }

    async fn client_of(state: &EdgeState, id: &str) -> Option<String> {
        let app = load(state, "app").await.unwrap();
        app.registry.device(id).and_then(|d| d.client_id.clone())
    }

    /// Log items that reach the store without passing the hub (a backfill to a new
    /// home) are folded on the next request: the store's cursor counts, not only the
    /// hub's.
    #[tokio::test]
    async fn log_copied_into_the_store_is_folded() {
        let (state, store) = state();
        assert_eq!(client_of(&state, "d1").await, None);
        store_directly(store.as_ref(), (1_000, 7, 1), &put("d1", "a"));
        assert_eq!(client_of(&state, "d1").await.as_deref(), Some("a"));
        store_directly(store.as_ref(), (2_000, 7, 2), &put("d1", "b"));
        assert_eq!(client_of(&state, "d1").await.as_deref(), Some("b"));
    }

    /// An item that arrives late but sorts before what was folded (written earlier in
    /// another region) makes the node fold the whole log again, so the registry follows
    /// the stored order, as on every other node.
    #[tokio::test]
    async fn a_late_item_that_sorts_earlier_refolds_in_stored_order() {
        let (state, store) = state();
        store_directly(store.as_ref(), (2_000, 7, 1), &put("d1", "newer"));
        assert_eq!(client_of(&state, "d1").await.as_deref(), Some("newer"));
        store_directly(store.as_ref(), (1_000, 8, 1), &put("d1", "older"));
        assert_eq!(client_of(&state, "d1").await.as_deref(), Some("newer"));
        store_directly(store.as_ref(), (500, 8, 2), &put("d2", "late"));
        assert_eq!(client_of(&state, "d2").await.as_deref(), Some("late"));
    }
}
