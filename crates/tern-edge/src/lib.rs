//! Tern edge: the client-facing server. One axum router serves the Ably realtime
//! protocol over WebSocket at `/` and the Ably REST API beside it, on one port. Each
//! WebSocket connection is one task (plus its writer); it converts protocol frames into
//! calls on the core [`tern_core::Hub`] and core events back into frames.
//!
//! # Layout
//! - [`config`]: [`EdgeConfig`], the limits and timings the edge enforces.
//! - `listener`: [`serve`], the client port: accepts TCP connections and serves HTTP on
//!   them with the caps and timeouts a client meets before it is a WebSocket.
//! - `state`: [`EdgeState`], what every handler shares (hub, keys, nonce cache, limits).
//! - `connection`: the realtime connection task (reader loop, writer whose every write
//!   is bounded by `write_timeout_ms`, heartbeats, token expiry, slow-subscriber
//!   disconnect).
//! - `session`: what one connection does with each inbound frame.
//! - `outlet`: a connection's bounded queue between its session and its transport
//!   (WebSocket writer or comet long-polls), below both so neither imports the other.
//! - `comet`: the comet transport (ably-js's HTTP fallback): the same session, its
//!   frames carried by long-poll receives and send requests.
//! - `budget`: what one publish or presence frame may carry (count, id, bytes), the
//!   same check for REST and realtime.
//! - `publish`: the one publish path after each transport's own channel checks (budget,
//!   clientIds, before-publish function, hub, counters, the store mark to answer on),
//!   the annotation path, and the one mapping of core refusals to Ably errors.
//! - `connections`: per-connection push (`@connections`): `POST`/`GET`/`DELETE
//!   /connections/{id}`, routed to the node that holds the connection; a connection's
//!   own channel `[connection]<id>`.
//! - `forward`: node-to-node HTTP, the edge's one way to ask another node: a channel
//!   read sent to the channel's home, a request sent to the node holding a connection;
//!   a forwarded request (`x-tern-forwarded`) is served where it lands.
//! - `inbound`: unenveloped publishes (`?enveloped=false`, inbound webhooks).
//! - `batch`: batch publish (`POST /messages`) and batch presence (`GET /presence`).
//! - `rest`: REST handlers (`/time`, publish, presence, channel status, token requests).
//! - [`push`]: push admin (device registrations, channel subscriptions, push publish),
//!   kept as a log on an internal channel of each app.
//! - [`mqtt`]: MQTT 3.1.1 (TCP, and WebSocket) on its own port, [`mqtt::serve`]; publishes
//!   through `rest::apply_publish`, PUBACK after the commit.
//! - `stats`: app statistics (`GET /stats`, `POST /stats` fixtures) and what counts them.
//! - [`history`]: the journal into the history store and the REST history endpoints.
//! - `messages`: mutable messages (get by serial, update/delete/append, versions) and
//!   annotations (publish, read, summaries): checks shared by REST and realtime, routes.
//! - `credentials`: turning query params and headers into an [`tern_auth::AuthContext`].
//! - `channel_name`: `[?param=value]name` and `[filter=…]name` qualifiers and the
//!   `rewind` param.
//! - `filter`: subscription filter expressions (derived channels): parse, evaluate.
//! - `resume`: what of a connection survives its transport (reply window, presence).
//! - `revoke`: token revocation (`POST /keys/{keyName}/revokeTokens`), carried to every
//!   node on a reserved channel, and the check every token passes.
//! - `response`: Ably-shaped HTTP error responses, response formats, CORS.
//! - `hooks`: the node's synchronous functions seen from the edge: a before-publish
//!   verdict applied to messages, the `$connect` call, `connection.disconnected` written
//!   to the webhook outbox (`tern_functions`).
//! - `departures`: connection records on `[internal]connections`, folded on every node,
//!   so a survivor reports a departed node's connections as disconnected.
//!
//! Architecture invariant: the edge reaches other nodes in two ways only. Channel events
//! go through the core (the hub's journal, which the cluster drives). A request only
//! another node can answer (a REST channel read on a node that does not keep the
//! channel, a push to or DELETE of a connection held elsewhere, push delivery at the
//! push home, batch presence from each channel's home, app statistics from every node,
//! an MQTT or realtime connection handed over) is sent to that node's client port over
//! HTTP, always through `forward.rs`; where the nodes are it learns only from the
//! `ClusterView` trait.
//! It never holds channel state of its own beyond what one connection has attached.

mod batch;
mod budget;
mod channel_name;
mod comet;
pub mod config;
mod connection;
mod connections;
mod credentials;
mod departures;
mod filter;
mod forward;
pub use forward::DURABLE_WITHIN;
mod gauges;
pub mod history;
mod hooks;
mod inbound;
mod listener;
mod messages;
pub mod mqtt;
mod outlet;
mod publish;
pub mod push;
mod response;
mod rest;
mod resume;
mod revoke;
mod session;
mod sse;
mod state;
mod stats;
pub mod tls;

pub use config::{EdgeConfig, MqttConfig, StatsConfig};
pub use listener::serve;
pub use push::registry::PushLimits;
pub use revoke::RevocationConfig;
pub use state::{ClusterView, EdgeState, NodeRef, TRANSPORTS};

/// The channel name decoders, for the fuzzer (`fuzz/`). Not part of the crate's API.
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::BTreeMap;

    pub use tern_core::Rewind;

    /// `channel_name::CHANNEL_NAME_MAX`.
    pub const CHANNEL_NAME_MAX: usize = crate::channel_name::CHANNEL_NAME_MAX;
    /// `channel_name::REWIND_COUNT_MAX`.
    pub const REWIND_COUNT_MAX: usize = crate::channel_name::REWIND_COUNT_MAX;

    /// `channel_name::parse`: the bare name and the qualifier's params.
    pub fn parse_channel_name(
        name: &str,
    ) -> Result<(&str, BTreeMap<String, String>), &'static str> {
        crate::channel_name::parse(name).map(|parsed| (parsed.base, parsed.params))
    }

    /// `channel_name::parse`: the base64 filter of a derived channel (`[filter=…]`).
    pub fn channel_filter(name: &str) -> Option<&str> {
        crate::channel_name::parse(name).ok()?.filter
    }

    /// `filter::FILTER_BYTES_MAX`.
    pub const FILTER_BYTES_MAX: usize = crate::filter::FILTER_BYTES_MAX;

    /// `filter::decode` then `Filter::selects` on a message with a name and headers:
    /// whether it selects it, or why the filter was refused.
    pub fn filter_selects(encoded: &str) -> Result<bool, String> {
        let filter = crate::filter::decode(encoded)?;
        let message = tern_protocol::Message {
            name: Some("order".into()),
            extras: Some(serde_json::json!({"headers": {"a": 1, "b": "x", "c": true}})),
            ..Default::default()
        };
        Ok(filter.selects(&message))
    }

    /// `channel_name::parse_rewind`.
    pub fn parse_rewind(value: &str, now_ms: i64) -> Result<Rewind, &'static str> {
        crate::channel_name::parse_rewind(value, now_ms)
    }
}

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

/// Milliseconds since the Unix epoch: the one clock read of the edge.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The router for one node: WebSocket at `/`, REST beside it.
/// The REST reads of a channel's state: served by the channel's home in this region
/// (see `forward`).
fn channel_reads(state: Arc<EdgeState>) -> Router<Arc<EdgeState>> {
    Router::new()
        .route("/channels/{channel}", get(rest::channel_status))
        .route("/channels/{channel}/messages", get(history::messages))
        .route("/channels/{channel}/messages/{serial}", get(messages::get))
        .route(
            "/channels/{channel}/messages/{serial}/versions",
            get(messages::versions),
        )
        .route(
            "/channels/{channel}/messages/{serial}/annotations",
            get(messages::annotations),
        )
        .route("/channels/{channel}/presence", get(rest::presence))
        .route(
            "/channels/{channel}/presence/history",
            get(history::presence_history),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            forward::to_home,
        ))
}

/// The push admin routes (`push`): served by the home of the app's push log in this
/// region.
fn push_routes(state: Arc<EdgeState>) -> Router<Arc<EdgeState>> {
    Router::new()
        .route(
            "/push/deviceRegistrations",
            get(push::rest::list_devices)
                .post(push::rest::register)
                .delete(push::rest::delete_devices),
        )
        .route(
            "/push/deviceRegistrations/{id}",
            get(push::rest::get_device)
                .put(push::rest::put_device)
                .patch(push::rest::patch_device)
                .delete(push::rest::delete_device),
        )
        .route(
            "/push/channelSubscriptions",
            get(push::rest::list_subscriptions)
                .post(push::rest::subscribe)
                .delete(push::rest::unsubscribe),
        )
        .route("/push/channels", get(push::rest::list_channels))
        .route("/push/publish", post(push::rest::publish))
        .route(push::delivery::PUBLISHED_PATH, post(push::rest::published))
        .route_layer(axum::middleware::from_fn_with_state(state, push::to_home))
}

/// Per-connection push (`connections`): served by the node that holds the connection.
fn connection_routes(state: Arc<EdgeState>) -> Router<Arc<EdgeState>> {
    Router::new()
        .route(
            "/connections/{id}",
            get(connections::get).delete(connections::delete),
        )
        .route("/connections/{id}/messages", post(connections::publish))
        .route(
            "/connections/{id}/handover",
            post(connections::handover::give),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            connections::to_holder,
        ))
}

pub fn router(state: Arc<EdgeState>) -> Router {
    let body_limit = state.config.max_frame_size;
    Router::new()
        .route("/", get(connection::upgrade))
        .route("/comet/connect", get(comet::connect))
        .route("/comet/{key}/recv", get(comet::recv))
        .route("/comet/{key}/send", post(comet::send))
        .route("/comet/{key}/close", get(comet::close).post(comet::close))
        .route(
            "/comet/{key}/disconnect",
            get(comet::disconnect).post(comet::disconnect),
        )
        .route("/time", get(rest::time))
        .route("/health", get(rest::health))
        .route("/keys/{key_name}/requestToken", post(rest::request_token))
        .route("/keys/{key_name}/revokeTokens", post(revoke::revoke_tokens))
        .merge(channel_reads(state.clone()))
        .merge(push_routes(state.clone()))
        .merge(connection_routes(state.clone()))
        .route("/channels/{channel}/messages", post(rest::publish))
        .route(
            "/channels/{channel}/messages/{serial}",
            axum::routing::patch(messages::change),
        )
        .route(
            "/channels/{channel}/messages/{serial}/annotations",
            post(messages::annotate),
        )
        .route("/messages", post(batch::publish))
        .route("/presence", get(batch::presence))
        .route("/stats", get(stats::get).post(stats::post_fixtures))
        .route("/sse", get(sse::sse))
        .route("/event-stream", get(sse::event_stream))
        .route("/mqtt/sessions/{client_id}", get(mqtt::handoff::give))
        .fallback(rest::not_found)
        // Ably answers a known path with the wrong method as an unknown one (404/40400,
        // with an error body the SDKs read), not a bare 405.
        .method_not_allowed_fallback(rest::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            stats::count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            response::body_too_large,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            response::cors,
        ))
        .with_state(state)
}
