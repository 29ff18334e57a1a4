//! What every handler shares.

use std::sync::{Arc, Mutex};

use tern_auth::{KeyRing, NonceCache};

use crate::revoke::{Credentials, Revocations};
use tern_core::{ChannelKey, ConnectionRegistry, Hub};
use tern_protocol::{code, ErrorInfo};
use tern_store::{HistoryStore, StoreError};
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::EdgeConfig;
use crate::resume::ParkedSession;

/// Live connections (with the handle that supersedes or closes them) and parked ones.
pub(crate) type Registry =
    ConnectionRegistry<ParkedSession, Arc<crate::connections::LiveConnection>>;

/// Shared state of one node's edge.
pub struct EdgeState {
    pub config: EdgeConfig,
    pub hub: Arc<Hub>,
    /// The keys, and the token revocations in force.
    pub keys: Credentials,
    /// Token-request nonces seen recently (replay check); bounded by `nonce_cache_max`.
    pub(crate) nonces: Mutex<NonceCache>,
    /// One permit per open WebSocket connection.
    pub(crate) connection_permits: Arc<Semaphore>,
    /// Flips to `true` when the node shuts down; connections then disconnect their clients.
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) registry: Mutex<Registry>,
    /// Prefix of this node's connection ids (random per boot), so a resume key can be
    /// told apart as this node's or another's.
    pub(crate) node_tag: String,
    /// Message and presence history; `None` runs without history (tests of the edge alone).
    pub(crate) store: Option<Arc<dyn HistoryStore>>,
    /// The cluster this node belongs to; `None` for a single node.
    pub(crate) cluster: Option<Arc<dyn ClusterView>>,
    /// App statistics counted on this node.
    pub(crate) stats: crate::stats::Stats,
    /// `https://`/`wss://` on the client port (`[server.tls]`); `None`: plain HTTP.
    pub(crate) tls: Option<Arc<crate::tls::ClientTls>>,
    /// Push registries folded on this node (`push`).
    pub(crate) push: crate::push::Push,
    /// Persistent MQTT sessions parked on this node (set when its MQTT listener starts),
    /// which another node may take over (`mqtt::handoff`).
    pub(crate) mqtt_sessions: std::sync::OnceLock<crate::mqtt::SharedSessions>,
    /// Comet connections by connection key (`comet`).
    pub(crate) comet: crate::comet::Links,
    /// Signs this node's connection keys so any member can vouch for them
    /// (`connections::keys`).
    pub(crate) connection_keys: crate::connections::keys::KeySigner,
    /// Before-publish and `$connect` functions (`hooks`); `None` without any.
    pub(crate) hooks: Option<Arc<tern_functions::Hooks>>,
    /// The webhook outbox, where `connection.disconnected` events go; `None` without
    /// webhook rules.
    pub(crate) outbox: Option<Arc<tern_functions::Outbox>>,
    /// Connection records of the apps with a `connection.disconnected` rule, for the
    /// connections of departed nodes (`departures`).
    pub(crate) departures: Arc<crate::departures::Departures>,
    /// The deepest client outbound queue lately (`tern_outbound_queue_depth_max`).
    pub(crate) queue_high_water: crate::gauges::QueueHighWater,
    /// Wakes housekeeping that sleeps while the node is quiet ([`EdgeState::is_quiet`]):
    /// notified when a client connection is accepted and when the hub's first channel
    /// opens.
    housekeeping: Arc<Notify>,
    /// `tern_delivery_seconds` handles, taken by the first writer (on the node's thread,
    /// so into the node's recorder) and shared by all: none per connection.
    delivery: std::sync::OnceLock<crate::gauges::DeliveryHistograms>,
}

/// The client transports `tern_connections{transport}` counts (all listed from start).
pub const TRANSPORTS: [&str; 4] = ["ws", "comet", "sse", "mqtt"];

/// One open client connection, counted in `tern_connections{transport}` while it lives.
/// The gauge handle is taken where the connection opens (on its node's thread), so the
/// decrement reaches the same node's recorder wherever the guard is dropped.
pub(crate) struct OpenConnection(metrics::Gauge);

impl OpenConnection {
    pub(crate) fn new(transport: &'static str) -> OpenConnection {
        debug_assert!(TRANSPORTS.contains(&transport));
        let gauge = metrics::gauge!("tern_connections", "transport" => transport);
        gauge.increment(1.0);
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How waiting for a publish to be durable ended.
#[derive(Debug)]
pub(crate) enum Durability {
    /// Committed to this node's store and, in a cluster, confirmed by the replicas.
    Stored,
    /// This node's store lost a write the publish may be part of (a failed commit, a
    /// full queue): it may not be stored.
    StoreFailed,
    /// Stored here, but the replicas did not confirm in time.
    ReplicasTimedOut,
}

impl Durability {
    fn of(stored: Result<(), StoreError>, replicated: bool) -> Durability {
        match (stored, replicated) {
            (Err(_), _) => Durability::StoreFailed,
            (Ok(()), true) => Durability::Stored,
            (Ok(()), false) => Durability::ReplicasTimedOut,
        }
    }

    /// The error a client gets instead of an ACK (realtime) or a 201 (REST); `None`
    /// when stored.
    pub(crate) fn error(&self) -> Option<ErrorInfo> {
        match self {
            Durability::Stored => None,
            // The cause is in the node's log and /health, not for clients.
            Durability::StoreFailed => Some(ErrorInfo::new(
                code::INTERNAL,
                "published, but not stored: the history store failed",
            )),
            Durability::ReplicasTimedOut => Some(ErrorInfo::new(
                code::TIMEOUT,
                "published, but not confirmed stored on a replica in time",
            )),
        }
    }
}

/// A live member of the cluster, as the edge addresses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    pub node_id: String,
    pub region: String,
    /// Where its clients (and forwarded requests) connect.
    pub client_url: String,
}

/// What the edge needs from the cluster (implemented where the node is wired).
pub trait ClusterView: Send + Sync {
    /// Runs `then(true)` once this node's latest event on `channel` is stored on the
    /// configured number of replicas (`ack_replicas`), in call order; `then(false)` when
    /// that timed out. `None` (a reply that published nothing) only keeps the order.
    fn after_replicated(&self, channel: Option<&ChannelKey>, then: Box<dyn FnOnce(bool) + Send>);
    /// Before a node's first subscriber attaches to a channel it does not receive:
    /// `Some` completes (or is dropped) once the channel's state has arrived from
    /// another node, so the ATTACHED reply, presence SYNC and resume see all of it.
    fn warm(&self, _channel: &ChannelKey) -> Option<tokio::sync::oneshot::Receiver<()>> {
        None
    }
    /// Where REST reads of `channel` go when this node does not keep all of it: the
    /// client URL of the channel's home in this region. `None` serves them here.
    fn home_url(&self, _channel: &ChannelKey) -> Option<String> {
        None
    }
    /// The live member whose connection ids start with `tag` (`connections` routes
    /// `/connections/{id}` to it); `None` when no live member has it.
    fn node_by_tag(&self, _tag: &str) -> Option<NodeRef> {
        None
    }
    /// The live nodes by region, for the admin port's `GET /regions`.
    fn regions(&self) -> serde_json::Value;
    /// The client URLs of every other live node (`GET /stats` adds up their
    /// statistics).
    fn peer_urls(&self) -> Vec<String> {
        Vec::new()
    }
}

impl EdgeState {
    /// The edge of one node. `keys` verify presented tokens under
    /// `config.token_policy` (lifetime, clock skew), the same policy token requests
    /// are issued under.
    pub fn new(
        config: EdgeConfig,
        hub: Arc<Hub>,
        keys: KeyRing,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let retain_ms = config.token_policy.nonce_retain_ms();
        let keys = keys.with_policy(config.token_policy.clone());
        let revocations = Arc::new(Revocations::new(&config.revocation, &config.token_policy));
        revocations.attach(&hub, &keys);
        let keys = Credentials {
            ring: keys,
            revocations,
        };
        let housekeeping = Arc::new(Notify::new());
        let wake = housekeeping.clone();
        hub.on_channel_opened(Box::new(move || wake.notify_one()));
        EdgeState {
            housekeeping,
            delivery: std::sync::OnceLock::new(),
            nonces: Mutex::new(NonceCache::new(config.nonce_cache_max, retain_ms)),
            registry: Mutex::new(Registry::new(config.parked_connections_max)),
            node_tag: {
                use rand::distr::{Alphanumeric, SampleString};
                Alphanumeric.sample_string(&mut rand::rng(), 6)
            },
            connection_permits: Arc::new(Semaphore::new(config.connections_max)),
            stats: crate::stats::Stats::new(config.stats.clone()),
            tls: None,
            mqtt_sessions: std::sync::OnceLock::new(),
            comet: crate::comet::Links::default(),
            queue_high_water: Default::default(),
            connection_keys: crate::connections::keys::KeySigner::random(),
            config,
            hub,
            keys,
            shutdown,
            store: None,
            cluster: None,
            push: crate::push::Push::default(),
            hooks: None,
            outbox: None,
            departures: Arc::default(),
        }
    }

    /// Calls `hooks` before publishes and connections, and writes
    /// `connection.disconnected` events to `outbox`.
    pub fn with_functions(
        mut self,
        hooks: Option<Arc<tern_functions::Hooks>>,
        outbox: Option<Arc<tern_functions::Outbox>>,
    ) -> Self {
        self.hooks = hooks.filter(|hooks| !hooks.is_empty());
        if let Some(outbox) = &outbox {
            self.departures.attach(&self.hub, &outbox.disconnect_apps());
        }
        self.outbox = outbox;
        self
    }

    /// A node of the cluster departed (gossip): its connections cannot report their
    /// end. `emitter`: this node is the one that reports them (the live member with the
    /// oldest incarnation); see `departures`.
    pub fn node_departed(&self, tag: &str, emitter: bool) {
        let now = crate::now_ms();
        for (app, connections) in self.departures.depart(tag, emitter) {
            let mut ended = Vec::with_capacity(connections.len());
            for (id, opened) in connections {
                crate::hooks::record_disconnect(
                    self,
                    crate::hooks::Ended {
                        app_id: &app,
                        connection_id: &id,
                        client_id: opened.client_id.as_deref(),
                        transport: crate::hooks::transport_name(&opened.transport),
                        connected_at_ms: opened.connected_at,
                        reason: crate::hooks::EndReason::NodeLost,
                    },
                    now,
                );
                ended.push(crate::departures::Record::Ended { id });
            }
            tracing::info!(%app, %tag, reported = ended.len(), "reported a departed node's connections as disconnected");
            crate::departures::publish(&self.hub, &app, &ended);
        }
    }

    /// Makes this node a cluster member: ACKs also wait for replicas, the admin port's
    /// `/regions` lists the cluster.
    pub fn with_cluster(mut self, cluster: Arc<dyn ClusterView>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Signs connection keys under `secret`, which every member of the cluster shares,
    /// instead of a secret of this node's own: any member can then vouch for a key
    /// another issued (`connections::keys`).
    pub fn with_connection_key_secret(mut self, secret: [u8; 32]) -> Self {
        self.connection_keys = crate::connections::keys::KeySigner::new(secret);
        self
    }

    /// Prefix of the connection ids this node issues (published to the cluster, which
    /// removes a dead node's presence members by it).
    pub fn node_tag(&self) -> &str {
        &self.node_tag
    }

    /// Serves the client port over TLS.
    pub fn with_tls(mut self, tls: Arc<crate::tls::ClientTls>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves history from `store` and makes ACKs wait for it (the hub's journal must
    /// write into the same store).
    /// Token revocations stored before a restart are read back here.
    pub fn with_store(mut self, store: Arc<dyn HistoryStore>) -> Self {
        self.keys
            .revocations
            .restore(store.as_ref(), &self.keys.ring);
        self.store = Some(store);
        self
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Periodic housekeeping (about once a second): presence of dropped connections,
    /// idle channels, expired parked connections, and the app statistics' gauges and
    /// minutes. Returns `true` when the node is steady: no connection (live or parked),
    /// nothing waiting in the hub, the queue high-water window at zero. Then the next calls would only sample unchanged gauges until
    /// [`EdgeState::activity`] fires, so the caller may sleep until then or the next
    /// minute (which the statistics must close); a later call takes the samples it
    /// skipped.
    pub fn sweep(&self, now_ms: i64) -> bool {
        self.stats.fill(now_ms);
        let hub_waiting = self.hub.sweep(now_ms);
        let expired = self.registry().sweep(now_ms);
        for (id, parked) in expired {
            if self.departures.tracks(&parked.info.app_id) {
                let ended = [crate::departures::Record::Ended { id: id.to_string() }];
                crate::departures::publish(&self.hub, &parked.info.app_id, &ended);
            }
            crate::hooks::record_disconnect(
                self,
                crate::hooks::Ended {
                    app_id: &parked.info.app_id,
                    connection_id: &id,
                    client_id: parked.info.client_id.as_deref(),
                    transport: parked.info.transport,
                    connected_at_ms: parked.info.connected_at_ms,
                    reason: crate::hooks::EndReason::Expired,
                },
                now_ms,
            );
        }
        self.stats.tick(now_ms, self.hub.take_app_channels());
        self.queue_high_water.tick();
        !hub_waiting
            && self.connection_count() == 0
            && self.registry().is_empty()
            && self.stats.is_steady()
            && self.queue_high_water.is_settled()
    }

    /// Resolves when something may have ended a steady state (see
    /// [`EdgeState::sweep`]): a client connection was accepted, a session opened, or the
    /// hub opened a channel (also if that happened since the last call).
    pub async fn activity(&self) {
        self.housekeeping.notified().await
    }

    /// The node's `tern_delivery_seconds` handles (see [`EdgeState::delivery`]).
    pub(crate) fn delivery_histograms(&self) -> &crate::gauges::DeliveryHistograms {
        self.delivery
            .get_or_init(crate::gauges::DeliveryHistograms::new)
    }

    /// A client connection arrived (any listener): wakes quiet housekeeping.
    pub(crate) fn arrived(&self) {
        self.housekeeping.notify_one();
    }

    /// Runs `then` once everything applied so far is durable: committed to the history
    /// store (when there is one) and stored on `ack_replicas` peers (in a cluster), in
    /// call order. `store_mark` is [`Self::store_mark`] taken before the publish was
    /// applied: if any store write was lost since, the outcome is `StoreFailed`, because
    /// the publish's own items may be among them. Replies to publishes go through here so
    /// an ACK means "stored" and ACKs/NACKs keep msgSerial order.
    pub(crate) fn after_durable(
        &self,
        channel: Option<ChannelKey>,
        store_mark: u64,
        then: Box<dyn FnOnce(Durability) + Send>,
    ) {
        let cluster = self.cluster.clone();
        let after_store = move |stored: Result<(), StoreError>| match cluster {
            // Still through the cluster's queue, so the reply keeps its place in line; but
            // a publish that is not stored here has nothing for replicas to confirm.
            Some(cluster) => {
                let channel = channel.filter(|_| stored.is_ok());
                cluster.after_replicated(
                    channel.as_ref(),
                    Box::new(move |replicated| then(Durability::of(stored, replicated))),
                );
            }
            None => then(Durability::of(stored, true)),
        };
        match &self.store {
            Some(store) => store.after_committed(store_mark, Box::new(after_store)),
            None => after_store(Ok(())),
        }
    }

    /// The history store's count of lost writes: take it before applying a publish and
    /// hand it to [`Self::after_durable`] (0 without a store).
    pub(crate) fn store_mark(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.lost_writes())
    }

    /// Why this node cannot store what it is sent: `Some` while the history store's
    /// commits fail (for `/health`).
    pub(crate) fn unhealthy(&self) -> Option<String> {
        Some(self.store.as_ref()?.failing()?.to_string())
    }

    /// Waits until everything applied so far is durable (on replicas: this node's
    /// latest event on `channel`); see [`Self::after_durable`] for `store_mark`.
    pub(crate) async fn durable(&self, channel: ChannelKey, store_mark: u64) -> Durability {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_durable(
            Some(channel),
            store_mark,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        );
        // Dropped unanswered: the store's writer is gone.
        rx.await.unwrap_or(Durability::StoreFailed)
    }

    /// `/health`'s answer: healthy (200 `ok`) unless the history store's commits fail
    /// (503 `unhealthy` with a `reason`), with this node's id and counts.
    pub fn health_report(&self) -> (bool, serde_json::Value) {
        let mut body = serde_json::json!({
            "status": "ok",
            "serverId": self.config.server_id,
            "connections": self.connection_count(),
            "channels": self.hub.channel_count(),
        });
        match self.unhealthy() {
            Some(reason) => {
                body["status"] = "unhealthy".into();
                body["reason"] = reason.into();
                (false, body)
            }
            None => (true, body),
        }
    }

    /// The cluster's live nodes by region; `None` for a node that is not in a cluster.
    pub fn cluster_regions(&self) -> Option<serde_json::Value> {
        self.cluster.as_ref().map(|cluster| cluster.regions())
    }

    /// Sets the gauges that are read rather than counted (channels held), just before
    /// `/metrics` is rendered.
    pub fn refresh_gauges(&self) {
        metrics::gauge!("tern_channels").set(self.hub.channel_count() as f64);
    }

    /// Open WebSocket connections right now.
    pub fn connection_count(&self) -> usize {
        self.config.connections_max - self.connection_permits.available_permits()
    }
}
