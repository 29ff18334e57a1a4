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
//! - `comet`: the comet transport (ably-js's HTTP fallback): the same session, its
//!   frames carried by long-poll receives and send requests.
//! - `budget`: what one publish or presence frame may carry (count, id, bytes), the
//!   same check for REST and realtime.
//! - `batch`: batch publish (`POST /messages`) and batch presence (`GET /presence`).
//! - `rest`: REST handlers (`/time`, publish, presence, channel status, token requests).
//! - `stats`: app statistics (`GET /stats`, `POST /stats` fixtures) and what counts them.
//! - [`history`]: the journal into the history store and the REST history endpoints.
//! - `credentials`: turning query params and headers into an [`tern_auth::AuthContext`].
//! - `channel_name`: `[?param=value]name` qualifiers and the `rewind` param.
//! - `resume`: what of a connection survives its transport (reply window, presence).
//! - `response`: Ably-shaped HTTP error responses, response formats, CORS.
//!
//! Architecture invariant: the edge talks to other nodes only through the core; it never
//! holds channel state of its own beyond what one connection has attached.

mod batch;
mod budget;
mod channel_name;
mod comet;
pub mod config;
mod connection;
mod credentials;
mod forward;
pub mod history;
mod listener;
mod response;
mod rest;
mod resume;
mod session;
mod state;
mod stats;

pub use config::{EdgeConfig, StatsConfig};
pub use listener::serve;
pub use state::{ClusterView, EdgeState};

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
        .route("/regions", get(rest::regions))
        .route("/metrics", get(rest::metrics))
        .route("/keys/{key_name}/requestToken", post(rest::request_token))
        .merge(channel_reads(state.clone()))
        .route("/channels/{channel}/messages", post(rest::publish))
        .route("/messages", post(batch::publish))
        .route("/presence", get(batch::presence))
        .route("/stats", get(stats::get).post(stats::post_fixtures))
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
