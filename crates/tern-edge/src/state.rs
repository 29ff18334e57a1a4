//! What every handler shares.

use std::sync::{Arc, Mutex};

use tern_auth::{KeyRing, NonceCache};
use tern_core::{ConnectionRegistry, Hub};
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::EdgeConfig;
use crate::resume::ParkedSession;

/// Live connections (with the handle that supersedes them) and parked ones.
pub(crate) type Registry = ConnectionRegistry<ParkedSession, Arc<Notify>>;

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
    pub(crate) registry: Mutex<Registry>,
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
            registry: Mutex::new(Registry::new(config.parked_connections_max)),
            connection_permits: Arc::new(Semaphore::new(config.connections_max)),
            config,
            hub,
            keys,
            metrics_render,
            shutdown,
        }
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Periodic housekeeping (about once a second): presence of dropped connections,
    /// idle channels, expired parked connections.
    pub fn sweep(&self, now_ms: i64) {
        self.hub.sweep(now_ms);
        self.registry().sweep(now_ms);
    }

    /// Runs `then` once everything applied so far is durable (committed to the history
    /// store, when there is one), in call order. Replies to publishes go through here so
    /// an ACK means "stored" and ACKs/NACKs keep msgSerial order.
    pub(crate) fn after_durable(&self, then: Box<dyn FnOnce() + Send>) {
        then();
    }

    /// Open WebSocket connections right now.
    pub fn connection_count(&self) -> usize {
        self.config.connections_max - self.connection_permits.available_permits()
    }
}
