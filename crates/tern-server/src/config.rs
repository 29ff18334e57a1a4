//! Tern's configuration: one TOML file (`tern serve --config FILE`) or the embedded dev
//! config (`tern dev`), overridden by CLI flags and `TERN_*` env vars, then validated.
//! Every setting is documented in `config.example.toml` at the repository root.

use serde::Deserialize;
use tern_auth::{ApiKey, Capability, KeyRing, TokenPolicy};
use tern_core::CoreLimits;
use tern_edge::EdgeConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub connection: ConnectionSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub history: HistorySection,
    #[serde(default)]
    pub stats: StatsSection,
    #[serde(default)]
    pub push: PushSection,
    #[serde(default)]
    pub mqtt: MqttSection,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// The monitoring listener (`admin.rs`).
    #[serde(default)]
    pub admin: crate::admin::AdminSection,
    /// Absent: a single node. Present: this node joins a cluster.
    pub cluster: Option<ClusterSection>,
}

/// `[cluster]`: membership, links and replication (see config.example.toml).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's region, e.g. "eu-west".
    pub region: String,
    /// Unique per node; defaults to server.server_id.
    #[serde(default)]
    pub node_id: Option<String>,
    /// UDP address of the QUIC link listener.
    pub quic_listen: std::net::SocketAddr,
    /// UDP address of the gossip listener (its own port).
    pub gossip_listen: std::net::SocketAddr,
    /// Gossip `host:port` of existing members; one is enough. Empty for the first node.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// What clients use to reach this node (for `GET /regions`); defaults to
    /// `http://HOST:PORT` of [server].
    #[serde(default)]
    pub client_url: Option<String>,
    /// Peers that must store a publish before it is ACKed (0 = ACK once stored here);
    /// one of them in another region whenever one is live.
    #[serde(default = "default_ack_replicas")]
    pub ack_replicas: usize,
    /// PEM files: the cluster CA certificate, this node's certificate and PKCS#8 key
    /// (`tern certs` writes them).
    pub ca_cert: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// File holding the cluster's gossip key: 32 random bytes as 64 hex digits, the
    /// same on every member (`tern certs` writes `gossip.key`). Every gossip datagram
    /// is authenticated with it. Required; an `Option` only so that a missing key gets
    /// an error that says what to do.
    #[serde(default)]
    pub gossip_key: Option<std::path::PathBuf>,
    /// Emulate the WAN between regions from this topology file (local test clusters
    /// only; leave unset in production).
    #[serde(default)]
    pub emulate_topology: Option<std::path::PathBuf>,
    #[serde(default = "default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// Roughly how long a silent node takes to be declared dead.
    #[serde(default = "default_failure_detection_ms")]
    pub failure_detection_ms: u64,
}

fn default_ack_replicas() -> usize {
    1
}
fn default_gossip_interval_ms() -> u64 {
    200
}
fn default_failure_detection_ms() -> u64 {
    1000
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum HistoryMode {
    /// Persistent: an embedded redb file that survives restarts.
    Redb,
    /// In memory only: history is lost on restart.
    Memory,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySection {
    pub mode: HistoryMode,
    pub path: std::path::PathBuf,
    pub batch_max: usize,
    pub queue_max: usize,
    pub scan_max: usize,
    pub retention: Vec<RetentionSection>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Channel-name prefix ("" = every channel); the longest matching prefix wins.
    pub prefix: String,
    pub max_count: u64,
    pub max_age_ms: i64,
}

impl Default for HistorySection {
    fn default() -> Self {
        let store = tern_store::StoreConfig::default();
        HistorySection {
            mode: HistoryMode::Redb,
            path: "tern-data/history.redb".into(),
            batch_max: store.batch_max,
            queue_max: store.queue_max,
            scan_max: store.scan_max,
            retention: store
                .retention
                .iter()
                .map(|r| RetentionSection {
                    prefix: r.prefix.clone(),
                    max_count: r.max_count,
                    max_age_ms: r.max_age_ms,
                })
                .collect(),
        }
    }
}

/// `[stats]`: app statistics (`GET /stats`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsSection {
    pub minutes_max: usize,
    pub apps_max: usize,
    /// Accept `POST /stats` fixtures (test suites only).
    pub fixtures: bool,
}

impl Default for StatsSection {
    fn default() -> Self {
        let stats = tern_edge::StatsConfig::default();
        StatsSection {
            minutes_max: stats.minutes_max,
            apps_max: stats.apps_max,
            fixtures: stats.fixtures,
        }
    }
}

/// `[push]`: bounds on each app's push registrations and subscriptions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushSection {
    pub devices_max: usize,
    pub subscriptions_max: usize,
    pub name_bytes_max: usize,
    pub recipient_bytes_max: usize,
    pub metadata_bytes_max: usize,
    pub deliveries_per_publish_max: usize,
}

impl Default for PushSection {
    fn default() -> Self {
        let push = tern_edge::PushLimits::default();
        PushSection {
            devices_max: push.devices_max,
            subscriptions_max: push.subscriptions_max,
            name_bytes_max: push.name_bytes_max,
            recipient_bytes_max: push.recipient_bytes_max,
            metadata_bytes_max: push.metadata_bytes_max,
            deliveries_per_publish_max: push.deliveries_per_publish_max,
        }
    }
}

/// `[mqtt]`: the MQTT 3.1.1 listener (docs/mqtt.md). Off unless enabled; `tern dev`
/// turns it on for every region.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    pub enabled: bool,
    /// Defaults to `server.host`.
    pub host: Option<String>,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    pub packet_bytes_max: usize,
    pub subscriptions_per_connection_max: usize,
    pub inflight_max: usize,
    pub pending_acks_max: usize,
    pub connect_timeout_ms: u64,
    pub sessions_max: usize,
}

impl Default for MqttSection {
    fn default() -> Self {
        let mqtt = tern_edge::MqttConfig::default();
        MqttSection {
            enabled: false,
            host: None,
            port: 1883,
            packet_bytes_max: mqtt.packet_bytes_max,
            subscriptions_per_connection_max: mqtt.subscriptions_per_connection_max,
            inflight_max: mqtt.inflight_max,
            pending_acks_max: mqtt.pending_acks_max,
            connect_timeout_ms: mqtt.connect_timeout_ms,
            sessions_max: mqtt.sessions_max,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// `connectionDetails.serverId`; defaults to `tern-<host>-<port>`.
    pub server_id: Option<String>,
    /// Browser origins allowed credentialed REST requests (see `EdgeConfig`).
    pub cors_allowed_origins: Vec<String>,
    /// `https://` and `wss://` on the client port.
    pub tls: Option<TlsSection>,
}

/// `[server.tls]`: PEM files, read at start and again on SIGHUP.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The certificate chain, leaf first (e.g. Let's Encrypt's `fullchain.pem`).
    pub cert: std::path::PathBuf,
    /// Its private key (e.g. `privkey.pem`).
    pub key: std::path::PathBuf,
}

/// A deserialization error of the merged config (file and `--set`s) loses its place in
/// the file: the same error from the file alone carries it, so that one is reported
/// when the file alone fails the same way (otherwise a `--set` caused it).
fn placed(text: &str, err: toml::de::Error) -> anyhow::Error {
    match toml::from_str::<Config>(text) {
        Err(in_file) if in_file.message() == err.message() => {
            // The merged error's Display names the key ("in `server.port`"), the file's
            // shows the line: keep both.
            let text = err.to_string();
            let key = text.strip_prefix(err.message()).unwrap_or_default().trim();
            anyhow::anyhow!("{}{key}", in_file)
        }
        _ => err.into(),
    }
}

/// A capability's JSON error placed at its line and column in the file, when the file
/// holds that capability (see `config_location`).
fn capability_error(
    text: &str,
    [app, key]: [usize; 2],
    json: &str,
    name: &str,
) -> Option<anyhow::Error> {
    use crate::config_location::{json_error_location, json_message, Step};
    let err = serde_json::from_str::<Capability>(json).err()?;
    let path = [
        Step::Key("apps"),
        Step::Index(app),
        Step::Key("keys"),
        Step::Index(key),
        Step::Key("capability"),
    ];
    let at = json_error_location(text, &path, json, &err)?;
    let message = json_message(&err);
    Some(anyhow::anyhow!(
        "{at}: {name}: invalid capability: {message}"
    ))
}

/// One `--set dotted.key=value` (see [`Config::parse_with`]).
fn apply_override(table: &mut toml::Table, entry: &str) -> anyhow::Result<()> {
    let (path, raw) = entry
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--set {entry:?}: expected dotted.key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys
        .split_last()
        .filter(|(last, _)| !last.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--set {entry:?}: empty key"))?;
    let mut at = table;
    for key in parents {
        let next = at
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next
            .as_table_mut()
            .ok_or_else(|| anyhow::anyhow!("--set {entry:?}: {key} is not a table"))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: default_host(),
            port: 8080,
            server_id: None,
            cors_allowed_origins: EdgeConfig::default().cors_allowed_origins,
            tls: None,
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    pub messages_per_publish_max: usize,
    pub message_id_bytes_max: usize,
    pub outbound_queue_max: usize,
    pub inbound_frames_per_second: u32,
    pub control_frames_per_second: u32,
    pub channels_per_connection_max: usize,
    pub sync_page_size: usize,
    pub connections_max: usize,
    pub http_connections_max: usize,
    pub connections_per_ip_max: usize,
    pub request_head_bytes_max: usize,
    pub channels_max: usize,
    pub channels_per_app_max: usize,
    pub presence_members_max: usize,
    pub nonce_cache_max: usize,
    pub parked_connections_max: usize,
    pub revocations_per_app_max: usize,
    pub reply_window_max: usize,
    pub channel_log_events_max: usize,
    pub channel_log_bytes_max: usize,
    pub idempotency_window_ms: i64,
    pub idempotency_ids_max: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let edge = EdgeConfig::default();
        let core = CoreLimits::default();
        LimitsSection {
            max_message_size: edge.max_message_size,
            max_frame_size: edge.max_frame_size,
            messages_per_publish_max: edge.messages_per_publish_max,
            message_id_bytes_max: edge.message_id_bytes_max,
            outbound_queue_max: edge.outbound_queue_max,
            inbound_frames_per_second: edge.inbound_frames_per_second,
            control_frames_per_second: edge.control_frames_per_second,
            channels_per_connection_max: edge.channels_per_connection_max,
            sync_page_size: edge.sync_page_size,
            connections_max: edge.connections_max,
            http_connections_max: edge.http_connections_max,
            connections_per_ip_max: edge.connections_per_ip_max,
            request_head_bytes_max: edge.request_head_bytes_max,
            channels_max: core.channels_max,
            channels_per_app_max: core.channels_per_app_max,
            presence_members_max: core.presence_members_max,
            nonce_cache_max: edge.nonce_cache_max,
            parked_connections_max: edge.parked_connections_max,
            revocations_per_app_max: edge.revocation.entries_per_app_max,
            reply_window_max: edge.reply_window_max,
            channel_log_events_max: core.log.events_max,
            channel_log_bytes_max: core.log.bytes_max,
            idempotency_window_ms: core.idempotency_window_ms,
            idempotency_ids_max: core.idempotency_ids_max,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionSection {
    pub max_idle_interval_ms: u64,
    pub connection_state_ttl_ms: u64,
    pub presence_leave_grace_ms: i64,
    pub token_renew_notice_ms: i64,
    pub header_read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub comet_poll_timeout_ms: u64,
}

impl Default for ConnectionSection {
    fn default() -> Self {
        let edge = EdgeConfig::default();
        ConnectionSection {
            max_idle_interval_ms: edge.max_idle_interval_ms,
            connection_state_ttl_ms: edge.connection_state_ttl_ms,
            presence_leave_grace_ms: CoreLimits::default().presence_leave_grace_ms,
            token_renew_notice_ms: edge.token_renew_notice_ms,
            header_read_timeout_ms: edge.header_read_timeout_ms,
            write_timeout_ms: edge.write_timeout_ms,
            comet_poll_timeout_ms: edge.comet_poll_timeout_ms,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub token_ttl_default_ms: i64,
    pub token_ttl_max_ms: i64,
    pub token_request_window_ms: i64,
    pub token_clock_skew_ms: i64,
}

impl Default for AuthSection {
    fn default() -> Self {
        let policy = TokenPolicy::default();
        AuthSection {
            token_ttl_default_ms: policy.ttl_default_ms,
            token_ttl_max_ms: policy.ttl_max_ms,
            token_request_window_ms: policy.request_window_ms,
            token_clock_skew_ms: policy.clock_skew_ms,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Webhook rules (`[[apps.rules]]`, see `rules.rs`).
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleSection>,
    /// Before-publish functions (`[[apps.before_publish]]`, see `hooks.rs`).
    #[serde(default)]
    pub before_publish: Vec<crate::hooks::FunctionSection>,
    /// The `$connect` function (`[apps.on_connect]`, see `hooks.rs`).
    pub on_connect: Option<crate::hooks::FunctionSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    pub secret: String,
    #[serde(default = "default_capability")]
    pub capability: String,
    /// The key may revoke the tokens issued from it (Ably's `revocableTokens`).
    #[serde(default)]
    pub revocable_tokens: bool,
}

fn default_capability() -> String {
    r#"{"*":["*"]}"#.into()
}

/// The config `tern dev` runs with: one app, one full-capability development key.
pub const DEV_CONFIG: &str = r#"
[server]
host = "127.0.0.1"
port = 8080
server_id = "tern-dev"
# Local development: browser apps on any origin may call REST with credentials.
cors_allowed_origins = ["*"]

[history]
mode = "redb"
path = "tern-data/dev/history.redb"

# MQTT on a free port per region, printed at start.
[mqtt]
enabled = true
port = 0

[[apps]]
id = "dev"

[[apps.keys]]
id = "root"
secret = "dev-secret-change-me"
capability = '{"*":["*"]}'
"#;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    /// Parses TOML; errors name the key and line.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse_with(text, &[])
    }

    /// Parses `text` after applying `overrides` (`--set`): each `dotted.key=value`
    /// replaces (or adds) that key, the value read as TOML (`8080`, `["a:1"]`,
    /// `true`) or, if it is not TOML, as a string. For running a production config on
    /// one machine with other addresses, ports or folders.
    pub fn parse_with(text: &str, overrides: &[String]) -> anyhow::Result<Config> {
        let mut table: toml::Table = toml::from_str(text)?;
        for entry in overrides {
            apply_override(&mut table, entry)?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|err| placed(text, err))?;
        config.validate_in(text)?;
        Ok(config)
    }

    /// Checks what serde cannot: names, capabilities, and limits that must agree.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_in("")
    }

    /// [`Config::validate`], naming the line of `text` (the file) that holds a bad
    /// capability.
    fn validate_in(&self, text: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.apps.is_empty(),
            "config needs at least one [[apps]] entry"
        );
        self.admin.validate()?;
        let p = &self.push;
        for (name, value) in [
            ("push.devices_max", p.devices_max),
            ("push.subscriptions_max", p.subscriptions_max),
            ("push.name_bytes_max", p.name_bytes_max),
            ("push.recipient_bytes_max", p.recipient_bytes_max),
            ("push.metadata_bytes_max", p.metadata_bytes_max),
            (
                "push.deliveries_per_publish_max",
                p.deliveries_per_publish_max,
            ),
        ] {
            anyhow::ensure!(value > 0, "{name} must be > 0");
        }
        if let Some(cluster) = &self.cluster {
            anyhow::ensure!(
                valid_name(&cluster.region),
                "cluster.region '{}' must be [A-Za-z0-9_-]+",
                cluster.region
            );
            if let Some(node_id) = &cluster.node_id {
                anyhow::ensure!(
                    valid_name(node_id),
                    "cluster.node_id '{node_id}' must be [A-Za-z0-9_-]+"
                );
            }
            anyhow::ensure!(
                cluster.quic_listen != cluster.gossip_listen,
                "cluster.quic_listen and cluster.gossip_listen must differ"
            );
            anyhow::ensure!(
                cluster.gossip_key.is_some(),
                "cluster.gossip_key is required: a file with the cluster's gossip key, \
                 64 hex digits shared by every member (`tern certs` writes gossip.key)"
            );
            anyhow::ensure!(
                cluster.ack_replicas <= 16,
                "cluster.ack_replicas {} is more than 16",
                cluster.ack_replicas
            );
        }
        let mut names = std::collections::HashSet::new();
        for (app_index, app) in self.apps.iter().enumerate() {
            anyhow::ensure!(
                valid_name(&app.id),
                "apps.id '{}' must be [A-Za-z0-9_-]+",
                app.id
            );
            for (key_index, key) in app.keys.iter().enumerate() {
                anyhow::ensure!(
                    valid_name(&key.id),
                    "apps.keys.id '{}' must be [A-Za-z0-9_-]+",
                    key.id
                );
                anyhow::ensure!(
                    !key.secret.is_empty(),
                    "apps.keys.secret of key '{}' is empty",
                    key.id
                );
                Capability::parse(&key.capability).map_err(|e| {
                    let name = format!("apps.keys.capability of key '{}.{}'", app.id, key.id);
                    capability_error(text, [app_index, key_index], &key.capability, &name)
                        .unwrap_or_else(|| anyhow::anyhow!("{name}: {e}"))
                })?;
                anyhow::ensure!(
                    names.insert(format!("{}.{}", app.id, key.id)),
                    "duplicate key {}.{}",
                    app.id,
                    key.id
                );
            }
        }
        crate::rules::rules(self, "tern")?;
        crate::hooks::hooks(self, "tern")?;
        let l = &self.limits;
        anyhow::ensure!(
            l.max_message_size > 0,
            "limits.max_message_size must be > 0"
        );
        anyhow::ensure!(
            l.max_frame_size >= l.max_message_size,
            "limits.max_frame_size must be >= limits.max_message_size"
        );
        // An event between nodes holds one publish (its bytes plus the fields the server
        // adds to each message) and must stay well under the cluster frame limit (16 MiB).
        anyhow::ensure!(
            l.max_frame_size <= 4 << 20,
            "limits.max_frame_size must be <= 4194304"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&l.messages_per_publish_max),
            "limits.messages_per_publish_max must be 1..=10000"
        );
        anyhow::ensure!(
            (1..=1_024).contains(&l.message_id_bytes_max),
            "limits.message_id_bytes_max must be 1..=1024"
        );
        anyhow::ensure!(
            l.outbound_queue_max > 0,
            "limits.outbound_queue_max must be > 0"
        );
        anyhow::ensure!(
            l.control_frames_per_second as usize >= l.channels_per_connection_max,
            "limits.control_frames_per_second must be >= limits.channels_per_connection_max \
             (a resume re-attaches every channel at once)"
        );
        anyhow::ensure!(l.sync_page_size > 0, "limits.sync_page_size must be > 0");
        anyhow::ensure!(l.connections_max > 0, "limits.connections_max must be > 0");
        anyhow::ensure!(
            l.http_connections_max > 0,
            "limits.http_connections_max must be > 0"
        );
        anyhow::ensure!(
            l.request_head_bytes_max >= 8_192,
            "limits.request_head_bytes_max must be >= 8192"
        );
        anyhow::ensure!(
            self.connection.header_read_timeout_ms > 0,
            "connection.header_read_timeout_ms must be > 0"
        );
        anyhow::ensure!(
            self.connection.write_timeout_ms > 0,
            "connection.write_timeout_ms must be > 0"
        );
        anyhow::ensure!(
            self.connection.comet_poll_timeout_ms > 0,
            "connection.comet_poll_timeout_ms must be > 0"
        );
        anyhow::ensure!(
            self.connection.max_idle_interval_ms >= 1_000,
            "connection.max_idle_interval_ms must be >= 1000"
        );
        anyhow::ensure!(
            self.auth.token_ttl_max_ms >= self.auth.token_ttl_default_ms,
            "auth.token_ttl_max_ms must be >= token_ttl_default_ms"
        );
        anyhow::ensure!(
            self.auth.token_clock_skew_ms >= 0,
            "auth.token_clock_skew_ms must be >= 0"
        );
        anyhow::ensure!(
            self.limits.revocations_per_app_max >= 1,
            "limits.revocations_per_app_max must be >= 1"
        );
        anyhow::ensure!(
            self.stats.minutes_max >= 1,
            "stats.minutes_max must be >= 1"
        );
        self.validate_mqtt()
    }

    fn validate_mqtt(&self) -> anyhow::Result<()> {
        let m = &self.mqtt;
        // Room for a topic and the packet's own fields beside a largest message.
        anyhow::ensure!(
            m.packet_bytes_max >= 1_024 && m.packet_bytes_max <= self.limits.max_frame_size,
            "mqtt.packet_bytes_max must be >= 1024 and <= limits.max_frame_size"
        );
        anyhow::ensure!(
            m.subscriptions_per_connection_max > 0,
            "mqtt.subscriptions_per_connection_max must be > 0"
        );
        anyhow::ensure!(
            (1..=65_535).contains(&m.inflight_max),
            "mqtt.inflight_max must be 1 to 65535 (MQTT packet ids)"
        );
        anyhow::ensure!(m.pending_acks_max > 0, "mqtt.pending_acks_max must be > 0");
        anyhow::ensure!(
            m.connect_timeout_ms > 0,
            "mqtt.connect_timeout_ms must be > 0"
        );
        anyhow::ensure!(m.sessions_max > 0, "mqtt.sessions_max must be > 0");
        Ok(())
    }

    /// The MQTT listener's address and limits, `None` when it is off.
    pub fn mqtt(&self) -> Option<(String, u16, tern_edge::MqttConfig)> {
        let m = &self.mqtt;
        m.enabled.then(|| {
            (
                m.host.clone().unwrap_or_else(|| self.server.host.clone()),
                m.port,
                tern_edge::MqttConfig {
                    packet_bytes_max: m.packet_bytes_max,
                    subscriptions_per_connection_max: m.subscriptions_per_connection_max,
                    inflight_max: m.inflight_max,
                    pending_acks_max: m.pending_acks_max,
                    connect_timeout_ms: m.connect_timeout_ms,
                    sessions_max: m.sessions_max,
                },
            )
        })
    }

    pub fn key_ring(&self) -> KeyRing {
        let keys = self
            .apps
            .iter()
            .flat_map(|app| {
                app.keys.iter().map(move |key| ApiKey {
                    app_id: app.id.clone(),
                    key_id: key.id.clone(),
                    secret: key.secret.clone(),
                    capability: Capability::parse(&key.capability)
                        .unwrap_or_else(|_| Capability::all()),
                })
            })
            .collect();
        KeyRing::new(keys)
    }

    /// Where clients reach this node, as published to the cluster.
    pub fn client_url(&self) -> String {
        self.cluster
            .as_ref()
            .and_then(|c| c.client_url.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}://{}:{}",
                    self.scheme(),
                    self.server.host,
                    self.server.port
                )
            })
    }

    /// `https` with `[server.tls]`, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn server_id(&self) -> String {
        self.server
            .server_id
            .clone()
            .unwrap_or_else(|| format!("tern-{}-{}", self.server.host, self.server.port))
    }

    pub fn edge_config(&self) -> EdgeConfig {
        let l = &self.limits;
        EdgeConfig {
            server_id: self.server_id(),
            max_message_size: l.max_message_size,
            max_frame_size: l.max_frame_size,
            messages_per_publish_max: l.messages_per_publish_max,
            message_id_bytes_max: l.message_id_bytes_max,
            outbound_queue_max: l.outbound_queue_max,
            inbound_frames_per_second: l.inbound_frames_per_second,
            control_frames_per_second: l.control_frames_per_second,
            channels_per_connection_max: l.channels_per_connection_max,
            sync_page_size: l.sync_page_size,
            max_idle_interval_ms: self.connection.max_idle_interval_ms,
            connection_state_ttl_ms: self.connection.connection_state_ttl_ms,
            connections_max: l.connections_max,
            http_connections_max: l.http_connections_max,
            connections_per_ip_max: l.connections_per_ip_max,
            request_head_bytes_max: l.request_head_bytes_max,
            header_read_timeout_ms: self.connection.header_read_timeout_ms,
            write_timeout_ms: self.connection.write_timeout_ms,
            comet_poll_timeout_ms: self.connection.comet_poll_timeout_ms,
            token_policy: TokenPolicy {
                ttl_default_ms: self.auth.token_ttl_default_ms,
                ttl_max_ms: self.auth.token_ttl_max_ms,
                request_window_ms: self.auth.token_request_window_ms,
                clock_skew_ms: self.auth.token_clock_skew_ms,
            },
            nonce_cache_max: l.nonce_cache_max,
            token_renew_notice_ms: self.connection.token_renew_notice_ms,
            parked_connections_max: l.parked_connections_max,
            reply_window_max: l.reply_window_max,
            cors_allowed_origins: self.server.cors_allowed_origins.clone(),
            stats: tern_edge::StatsConfig {
                minutes_max: self.stats.minutes_max,
                apps_max: self.stats.apps_max,
                fixtures: self.stats.fixtures,
            },
            revocation: tern_edge::RevocationConfig {
                entries_per_app_max: l.revocations_per_app_max,
                revocable_keys: self
                    .apps
                    .iter()
                    .flat_map(|app| {
                        app.keys
                            .iter()
                            .filter(|key| key.revocable_tokens)
                            .map(move |key| format!("{}.{}", app.id, key.id))
                    })
                    .collect(),
            },
            push: tern_edge::PushLimits {
                devices_max: self.push.devices_max,
                subscriptions_max: self.push.subscriptions_max,
                name_bytes_max: self.push.name_bytes_max,
                recipient_bytes_max: self.push.recipient_bytes_max,
                metadata_bytes_max: self.push.metadata_bytes_max,
                deliveries_per_publish_max: self.push.deliveries_per_publish_max,
            },
        }
    }

    pub fn store_config(&self) -> tern_store::StoreConfig {
        let h = &self.history;
        tern_store::StoreConfig {
            path: (h.mode == HistoryMode::Redb).then(|| h.path.clone()),
            retention: h
                .retention
                .iter()
                .map(|r| tern_store::RetentionRule {
                    prefix: r.prefix.clone(),
                    max_count: r.max_count,
                    max_age_ms: r.max_age_ms,
                })
                // Each app's push log is its push state: never trimmed.
                .chain(std::iter::once(tern_store::RetentionRule {
                    prefix: tern_edge::push::PUSH_CHANNEL.to_string(),
                    max_count: u64::MAX,
                    max_age_ms: i64::MAX,
                }))
                .chain(crate::rules::outbox_retention(self))
                .chain(crate::rules::occupancy_retention(self))
                .collect(),
            batch_max: h.batch_max,
            queue_max: h.queue_max,
            scan_max: h.scan_max,
        }
    }

    pub fn core_limits(&self) -> CoreLimits {
        CoreLimits {
            channels_max: self.limits.channels_max,
            channels_per_app_max: self.limits.channels_per_app_max,
            presence_members_max: self.limits.presence_members_max,
            presence_leave_grace_ms: self.connection.presence_leave_grace_ms,
            channel_idle_retain_ms: self.connection.connection_state_ttl_ms as i64,
            log: tern_core::LogLimits {
                events_max: self.limits.channel_log_events_max,
                bytes_max: self.limits.channel_log_bytes_max,
                age_max_ms: self.connection.connection_state_ttl_ms as i64,
            },
            idempotency_window_ms: self.limits.idempotency_window_ms,
            idempotency_ids_max: self.limits.idempotency_ids_max,
            ..CoreLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example config parses and validates.
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../config.example.toml");
        let config = Config::parse(text).unwrap();
        assert!(config.key_ring().keys().count() >= 1);
    }

    /// The commented `[cluster]` section of the example config, uncommented, parses and
    /// validates (so it names every required field, `gossip_key` included).
    #[test]
    fn example_cluster_section_parses_when_uncommented() {
        let text = include_str!("../../../config.example.toml");
        let start = text.find("# [cluster]").unwrap();
        let end = start + text[start..].find("\n\n").unwrap();
        let section: String = text[start..end]
            .lines()
            .map(|line| format!("{}\n", line.strip_prefix("# ").unwrap_or(line)))
            .collect();
        let config = Config::parse(&format!("[[apps]]\nid='a'\n{section}")).unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(
            cluster.gossip_key.as_deref(),
            Some(std::path::Path::new("certs/gossip.key"))
        );
    }

    /// The embedded dev config parses and validates.
    #[test]
    fn dev_config_parses() {
        let config = Config::parse(DEV_CONFIG).unwrap();
        assert!(config.key_ring().get("dev.root").is_some());
    }

    /// The production configs of regions/ parse and validate as they are.
    #[test]
    fn region_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions");
        for region in ["us-east", "eu-west", "ap-south"] {
            let text = std::fs::read_to_string(dir.join(format!("{region}.toml"))).unwrap();
            let config = Config::parse(&text).unwrap_or_else(|e| panic!("{region}: {e:#}"));
            let cluster = config.cluster.expect("a [cluster] section");
            assert_eq!(cluster.region, region);
            assert!(config.server.tls.is_some(), "{region} serves TLS");
        }
    }

    /// `--set` replaces nested keys with TOML values (or strings), and a key that
    /// no section knows is still refused.
    #[test]
    fn overrides_apply_before_validation() {
        let set = |pairs: &[&str]| pairs.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let config = Config::parse_with(
            DEV_CONFIG,
            &set(&[
                "server.port=9000",
                "server.host=10.1.2.3",
                "history.path=/data/h.redb",
            ]),
        )
        .unwrap();
        assert_eq!(config.server.port, 9000);
        assert_eq!(config.server.host, "10.1.2.3");
        assert_eq!(
            config.history.path,
            std::path::PathBuf::from("/data/h.redb")
        );
        let err = Config::parse_with(DEV_CONFIG, &set(&["server.nonsense=1"])).unwrap_err();
        assert!(format!("{err:#}").contains("nonsense"), "{err:#}");
        assert!(Config::parse_with(DEV_CONFIG, &set(&["server.port"])).is_err());
    }

    /// Unknown keys are refused with the key's name; bad capabilities name the key.
    #[test]
    fn bad_configs_are_refused_with_reasons() {
        let err = Config::parse("[server]\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        let err = Config::parse(
            "[[apps]]\nid='a'\n[[apps.keys]]\nid='k'\nsecret='s'\ncapability='nope'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a.k"), "{err}");
    }

    /// A capability's JSON error names the file's line and column, not the JSON
    /// string's; so does a type error, also when `--set`s were applied.
    #[test]
    fn config_errors_name_the_file_line() {
        let text = "[server]\nport = 8080\n\n[[apps]]\nid = 'a'\n\n[[apps.keys]]\nid = 'k'\n\
                    secret = 's'\ncapability = '{\"*\":[\"publish\",]}'\n";
        let err = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(
            err.starts_with("line 10, column 31: apps.keys.capability of key 'a.k': invalid capability: trailing comma"),
            "{err}"
        );
        let text = "[[apps]]\nid = 'a'\n[[apps.keys]]\nid = 'k'\nsecret = 's'\n\
                    capability = \"\"\"\n{\n  \"chat:*\": [\"publish\"],\n  \"x\": \"subscribe\"\n}\n\"\"\"\n";
        let err = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(err.starts_with("line 9, column 18: "), "{err}");
        assert!(err.contains("expected an array"), "{err}");
        let set = ["server.host=h".to_string()];
        let err = format!(
            "{:#}",
            Config::parse_with("[server]\nport = 'x'\n[[apps]]\nid = 'a'\n", &set).unwrap_err()
        );
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("server.port"), "{err}");
    }

    /// The connection limits reach the edge from TOML, and values hyper or the listener
    /// cannot work with are refused by name.
    #[test]
    fn connection_limits() {
        let base = "[[apps]]\nid='a'\n";
        let config = Config::parse(&format!(
            "[limits]\nhttp_connections_max=10\nconnections_per_ip_max=3\n\
             request_head_bytes_max=32768\n[connection]\nheader_read_timeout_ms=500\n\
             write_timeout_ms=700\ncomet_poll_timeout_ms=900\n{base}"
        ))
        .unwrap();
        let edge = config.edge_config();
        assert_eq!(
            (
                edge.http_connections_max,
                edge.connections_per_ip_max,
                edge.request_head_bytes_max
            ),
            (10, 3, 32_768)
        );
        assert_eq!(
            (
                edge.header_read_timeout_ms,
                edge.write_timeout_ms,
                edge.comet_poll_timeout_ms
            ),
            (500, 700, 900)
        );
        for (section, key, value) in [
            ("limits", "request_head_bytes_max", "8191"),
            ("limits", "http_connections_max", "0"),
            ("connection", "header_read_timeout_ms", "0"),
            ("connection", "write_timeout_ms", "0"),
            ("connection", "comet_poll_timeout_ms", "0"),
        ] {
            let err = Config::parse(&format!("[{section}]\n{key}={value}\n{base}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    /// A `[cluster]` section parses with defaults; bad names and clashing ports are refused.
    #[test]
    fn cluster_section() {
        let base = "[[apps]]\nid='a'\n[cluster]\nca_cert='ca.pem'\ncert='n.pem'\nkey='n.key'\ngossip_key='gossip.key'\n";
        let ok = format!("{base}region='eu-west'\nquic_listen='127.0.0.1:7400'\ngossip_listen='127.0.0.1:7401'\nseeds=['10.0.0.1:7401']\n");
        let config = Config::parse(&ok).unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.ack_replicas, 1);
        assert_eq!(cluster.seeds, vec!["10.0.0.1:7401".to_string()]);
        let bad_region = ok.replace("eu-west", "eu west");
        assert!(Config::parse(&bad_region)
            .unwrap_err()
            .to_string()
            .contains("region"));
        let clash = ok.replace("7401'\nseeds", "7400'\nseeds");
        assert!(Config::parse(&clash)
            .unwrap_err()
            .to_string()
            .contains("differ"));
        let unknown = format!("{ok}gossip_port=1\n");
        assert!(Config::parse(&unknown)
            .unwrap_err()
            .to_string()
            .contains("gossip_port"));
    }

    /// `[stats]` reaches the edge; fixtures are off unless asked for.
    #[test]
    fn stats_section() {
        let base = "[[apps]]\nid='a'\n";
        let config = Config::parse(base).unwrap();
        assert!(!config.edge_config().stats.fixtures);
        let config = Config::parse(&format!(
            "[stats]\nfixtures = true\nminutes_max = 60\napps_max = 2\n{base}"
        ))
        .unwrap();
        let stats = config.edge_config().stats;
        assert_eq!(
            (stats.fixtures, stats.minutes_max, stats.apps_max),
            (true, 60, 2)
        );
        let err = Config::parse(&format!("[stats]\nminutes_max = 0\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stats.minutes_max"), "{err}");
    }

    /// `[mqtt]` is off by default; enabled, it listens on `server.host` unless given
    /// its own, and its limits are checked.
    #[test]
    fn mqtt_section() {
        let base = "[[apps]]\nid='a'\n";
        assert!(Config::parse(base).unwrap().mqtt().is_none());
        let config = Config::parse(&format!(
            "[server]\nhost='127.0.0.2'\n[mqtt]\nenabled = true\nport = 0\ninflight_max = 7\n{base}"
        ))
        .unwrap();
        let (host, port, mqtt) = config.mqtt().unwrap();
        assert_eq!(
            (host.as_str(), port, mqtt.inflight_max),
            ("127.0.0.2", 0, 7)
        );
        for (bad, key) in [
            ("inflight_max = 0", "mqtt.inflight_max"),
            ("inflight_max = 70000", "mqtt.inflight_max"),
            ("packet_bytes_max = 10", "mqtt.packet_bytes_max"),
            ("packet_bytes_max = 99999999", "mqtt.packet_bytes_max"),
            ("subscriptions_per_connection_max = 0", "mqtt.subscriptions"),
        ] {
            let err = Config::parse(&format!("[mqtt]\n{bad}\n{base}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    /// A `[cluster]` without `gossip_key` is refused, naming the field and `tern certs`.
    #[test]
    fn cluster_section_requires_a_gossip_key() {
        let ok = "[[apps]]\nid='a'\n[cluster]\nregion='r'\nquic_listen='127.0.0.1:7400'\n\
                  gossip_listen='127.0.0.1:7401'\nca_cert='ca.pem'\ncert='n.pem'\nkey='n.key'\n\
                  gossip_key='gossip.key'\n";
        Config::parse(ok).unwrap();
        let missing = ok.replace("gossip_key='gossip.key'\n", "");
        let err = Config::parse(&missing).unwrap_err().to_string();
        assert!(err.contains("cluster.gossip_key is required"), "{err}");
        assert!(err.contains("tern certs"), "{err}");
    }
}
