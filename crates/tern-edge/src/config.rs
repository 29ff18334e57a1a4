//! The edge's own typed config. Only `tern-server` reads files and env; it fills this in.

use tern_auth::TokenPolicy;

/// Limits and timings for client connections and REST.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Sent as `connectionDetails.serverId`.
    pub server_id: String,
    /// Largest message (name + data + clientId + extras) a client may publish (40009).
    pub max_message_size: usize,
    /// Largest WebSocket message or REST body accepted at all.
    pub max_frame_size: usize,
    /// Messages (or presence messages) one publish may carry (40009 beyond).
    pub messages_per_publish_max: usize,
    /// Longest client-supplied message id (40009 beyond); ids are remembered per channel
    /// for idempotency, so they must stay small.
    pub message_id_bytes_max: usize,
    /// Frames queued for one connection before it counts as too slow (80020).
    pub outbound_queue_max: usize,
    /// MESSAGE/PRESENCE frames a connection may send per second before NACK 42910.
    pub inbound_frames_per_second: u32,
    /// Other frames (ATTACH, DETACH, HEARTBEAT, AUTH, …) a connection may send per
    /// second; beyond it an ATTACH/DETACH gets a channel ERROR 42910 and the rest are
    /// dropped. At least `channels_per_connection_max`, so a resume re-attaching every
    /// channel at once fits.
    pub control_frames_per_second: u32,
    /// Channels one connection may have attached at once (90000 beyond).
    pub channels_per_connection_max: usize,
    /// Presence members per SYNC frame.
    pub sync_page_size: usize,
    /// The server sends something at least this often (`connectionDetails.maxIdleInterval`).
    pub max_idle_interval_ms: u64,
    /// How long connection state outlives its transport (`connectionStateTtl`).
    pub connection_state_ttl_ms: u64,
    /// Concurrent WebSocket connections accepted by this node.
    pub connections_max: usize,
    /// TCP connections not (yet) upgraded to WebSocket: handshakes in progress and REST
    /// clients. Beyond it a new connection gets a 503 and is closed, so connections that
    /// never send a request cannot pile up (`listener`).
    pub http_connections_max: usize,
    /// TCP connections (WebSocket and HTTP) from one source address; 0 = no limit. Off by
    /// default: behind a reverse proxy or a NAT every client has the same address.
    pub connections_per_ip_max: usize,
    /// Longest request line plus headers (a WebSocket handshake with its query string
    /// included) read from a client; larger → 431. At least 8,192 (hyper's minimum).
    pub request_head_bytes_max: usize,
    /// A request's head must arrive within this, counted from the connection's start or
    /// the end of its previous request; otherwise the connection is closed (slowloris).
    /// It is also how long an idle keep-alive connection lasts, so it is longer than an
    /// SDK usually leaves a pooled connection idle: a client reusing a connection the
    /// server is closing at that moment gets "socket hang up" (seen with 10 s and a test
    /// that waits 10 s between requests).
    pub header_read_timeout_ms: u64,
    /// Longest one write to a WebSocket client (a frame, a flush, a heartbeat) may take.
    /// A client that does not read for this long is disconnected (80020) and its socket
    /// reset, so a stalled writer never pins a connection.
    pub write_timeout_ms: u64,
    /// A comet client with no receive open for this long has stopped polling: its
    /// transport counts as dropped (the connection is parked; presence leaves after the
    /// grace period). A client polls again as soon as a receive answers.
    pub comet_poll_timeout_ms: u64,
    /// Token lifetimes and the token-request timestamp window.
    pub token_policy: TokenPolicy,
    /// Token-request nonces remembered for replay detection; when full, token requests
    /// are refused (42910) until entries expire, never evicted early.
    pub nonce_cache_max: usize,
    /// Send an AUTH request this long before a token expires, so the client renews in band.
    pub token_renew_notice_ms: i64,
    /// Dropped connections kept for resume at once (the oldest goes first beyond it).
    pub parked_connections_max: usize,
    /// Replies remembered per connection for re-sent msgSerials.
    pub reply_window_max: usize,
    /// Browser origins (`https://app.example.com`) allowed credentialed REST requests,
    /// which ably-js makes whenever it sends an `Authorization` header; `"*"` allows
    /// every origin (development only). Others get `Access-Control-Allow-Origin: *`
    /// without credentials.
    pub cors_allowed_origins: Vec<String>,
    /// App statistics (`GET /stats`).
    pub stats: StatsConfig,
    /// Token revocation: which keys may revoke, how many revocations an app holds.
    pub revocation: crate::revoke::RevocationConfig,
    /// Bounds on each app's push registrations and subscriptions.
    pub push: crate::push::registry::PushLimits,
}

/// App statistics: what is kept per app, and whether test fixtures may be written.
#[derive(Clone, Debug)]
pub struct StatsConfig {
    /// Minutes of statistics kept per app (the newest; fixtures count too). Each kept
    /// minute takes about 100–700 bytes (only its non-zero counters are stored).
    pub minutes_max: usize,
    /// Apps whose statistics this node keeps; an app beyond it is not counted (and a
    /// warning is logged). Apps come from the config, so this only bounds memory.
    pub apps_max: usize,
    /// Accept `POST /stats` fixtures (Ably's sandbox: test suites write statistics and
    /// read them back), from a key with every operation on every channel. Off in
    /// production: nobody may forge statistics.
    pub fixtures: bool,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            minutes_max: 60 * 24 * 7,
            apps_max: 64,
            fixtures: false,
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            server_id: "tern-1".into(),
            max_message_size: 65_536,
            max_frame_size: 524_288,
            messages_per_publish_max: 1_000,
            message_id_bytes_max: 256,
            outbound_queue_max: 4_096,
            inbound_frames_per_second: 1_000,
            control_frames_per_second: 2_000,
            channels_per_connection_max: 1_000,
            sync_page_size: 100,
            max_idle_interval_ms: 15_000,
            connection_state_ttl_ms: 120_000,
            connections_max: 19_000,
            http_connections_max: 8_192,
            connections_per_ip_max: 0,
            request_head_bytes_max: 16_384,
            header_read_timeout_ms: 30_000,
            write_timeout_ms: 10_000,
            comet_poll_timeout_ms: 15_000,
            token_policy: TokenPolicy::default(),
            nonce_cache_max: 100_000,
            token_renew_notice_ms: 30_000,
            parked_connections_max: 100_000,
            reply_window_max: 1_000,
            cors_allowed_origins: Vec::new(),
            stats: StatsConfig::default(),
            revocation: crate::revoke::RevocationConfig::default(),
            push: crate::push::registry::PushLimits::default(),
        }
    }
}

/// The MQTT 3.1.1 listener (`mqtt`): what one MQTT connection may hold. Connections
/// count against `EdgeConfig::connections_max` like WebSocket ones.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Largest MQTT packet accepted, counted as its remaining length (topic, packet id
    /// and payload). A client that announces a larger one is disconnected before its
    /// bytes are read; MQTT 3.1.1 has no other refusal. The payload is then also held to
    /// `max_message_size` by the publish budget.
    pub packet_bytes_max: usize,
    /// Topics one connection may subscribe to at once; beyond it SUBACK 0x80.
    pub subscriptions_per_connection_max: usize,
    /// QoS 1 messages sent to a subscriber and not yet acknowledged (PUBACK). While the
    /// window is full, further messages wait in the connection's queue
    /// (`outbound_queue_max`), whose overflow ends the connection.
    pub inflight_max: usize,
    /// QoS 1 publishes of one connection waiting to be stored before their PUBACK; at the
    /// bound the connection's socket is not read until one is answered.
    pub pending_acks_max: usize,
    /// The CONNECT packet must arrive within this of the TCP connection opening.
    pub connect_timeout_ms: u64,
    /// Persistent sessions (`clean_session = 0`) parked at once after their connection
    /// ended, each for `connection_state_ttl_ms`; beyond it the one expiring soonest is
    /// dropped. Each holds its subscriptions and up to `inflight_max` unacknowledged
    /// messages (payloads shared with the channel log while it holds them).
    pub sessions_max: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            packet_bytes_max: 66_560,
            subscriptions_per_connection_max: 1_000,
            inflight_max: 100,
            pending_acks_max: 1_000,
            connect_timeout_ms: 10_000,
            sessions_max: 10_000,
        }
    }
}
