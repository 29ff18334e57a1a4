//! What every handler shares.

use std::sync::{Arc, Mutex};

use tern_auth::{KeyRing, NonceCache};
use tern_core::Hub;
use tokio::sync::{watch, Semaphore};

use crate::config::EdgeConfig;

/// Renders the Prometheus text exposition for `/metrics`.
pub type MetricsRender = Box<dyn Fn() -> String + Send + Sync>;

/// Shared state of one node's edge.
pub struct EdgeState {
    pub config: EdgeConfig,
    pub hub: Arc<Hub>,
    pub keys: KeyRing,
    /// Token-request nonces seen recently (replay check); bounded by `nonce_cache_max`.
    pub(crate) nonces: Mutex<NonceCache>,
    /// One permit per open WebSocket connection.
    pub(crate) connection_permits: Arc<Semaphore>,
    pub(crate) metrics_render: Option<MetricsRender>,
    /// Flips to `true` when the node shuts down; connections then disconnect their clients.
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl EdgeState {
    pub fn new(
        config: EdgeConfig,
        hub: Arc<Hub>,
        keys: KeyRing,
        metrics_render: Option<MetricsRender>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let retain_ms = config.token_policy.request_window_ms * 2;
        EdgeState {
            nonces: Mutex::new(NonceCache::new(config.nonce_cache_max, retain_ms)),
            connection_permits: Arc::new(Semaphore::new(config.connections_max)),
            config,
            hub,
            keys,
            metrics_render,
            shutdown,
        }
    }

    /// Open WebSocket connections right now.
    pub fn connection_count(&self) -> usize {
        self.config.connections_max - self.connection_permits.available_permits()
    }
}
