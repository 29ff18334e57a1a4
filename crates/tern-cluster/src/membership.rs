//! Membership: who is in the cluster, by chitchat gossip over UDP, every datagram
//! authenticated with the cluster's gossip key ([`crate::gossip_auth`]). Each node publishes
//! what peers and clients need to reach it (region, client URL, QUIC address, node tag,
//! origin, load) and learns everybody else's from any one seed. chitchat's phi-accrual
//! failure detector decides who is live; [`Membership::watch`] reports the live set
//! whenever it changes, and the cluster reacts (links, presence of the departed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion,
};
use tokio::sync::watch;

use crate::gossip_auth::{AuthenticatedUdp, GossipKey, GossipStats};
use crate::ClusterError;

const KEY_REGION: &str = "region";
const KEY_CLIENT_URL: &str = "client_url";
const KEY_QUIC: &str = "quic";
const KEY_TAG: &str = "tag";
const KEY_ORIGIN: &str = "origin";
const KEY_LOAD: &str = "load";
const KEY_DEPARTED: &str = "departed";
const KEY_WEBHOOK_MARKS: &str = "webhook_marks";
/// Bytes of webhook delivered marks one node publishes at most (a few dozen rules);
/// longer values are not published (the marks are then unknown, and a takeover
/// delivers everything shadowed: duplicates, not loss).
pub const WEBHOOK_MARKS_BYTES_MAX: usize = 1024;
/// Departed node tags each node publishes (newest last), so a node that joins later
/// learns whose presence members must not come back.
pub const DEPARTED_TAGS_MAX: usize = 64;

/// What one node tells the cluster about itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Unique per node (config `server_id`).
    pub node_id: String,
    /// Changes on every start (start time in ms): a restarted node is a new incarnation.
    pub incarnation: u64,
    pub region: String,
    /// Where clients connect, e.g. `http://10.0.0.5:8080`.
    pub client_url: String,
    /// Where peers open QUIC links.
    pub quic: SocketAddr,
    /// Gossip address.
    pub gossip: SocketAddr,
    /// Prefix of the connection ids this node issues (presence members are keyed by them).
    pub tag: String,
    /// The node's origin id (hex) in cursors.
    pub origin: String,
    /// Open client connections (updated by [`Membership::set_load`]).
    pub load: u64,
    /// Tags of nodes this member saw depart (at most [`DEPARTED_TAGS_MAX`]).
    pub departed: Vec<String>,
    /// The node's webhook delivered marks, as `tern_functions::outbox::Marks` encodes
    /// them (opaque here); what a node taking over its outbox starts after.
    #[serde(skip)]
    pub webhook_marks: String,
}

/// How to join the cluster.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    pub cluster_id: String,
    pub gossip_listen: SocketAddr,
    /// What peers use to reach our gossip socket (the listen address unless behind NAT).
    pub gossip_advertise: SocketAddr,
    /// `host:port` of any existing members; empty for the first node.
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    /// A silent node is declared dead after roughly this long (phi-accrual prior).
    pub failure_detection: Duration,
    /// How long a dead node's entry stays before it is forgotten.
    pub dead_node_grace: Duration,
    /// Every member's gossip is authenticated with this key; gossip under any other is
    /// dropped.
    pub gossip_key: GossipKey,
    pub me: Member,
}

impl MembershipConfig {
    /// Production-leaning timings: gossip every 500 ms, dead after a few seconds.
    pub fn new(
        me: Member,
        gossip_listen: SocketAddr,
        seeds: Vec<String>,
        gossip_key: GossipKey,
    ) -> Self {
        MembershipConfig {
            cluster_id: "tern".into(),
            gossip_listen,
            gossip_advertise: gossip_listen,
            seeds,
            gossip_interval: Duration::from_millis(500),
            failure_detection: Duration::from_secs(2),
            dead_node_grace: Duration::from_secs(600),
            gossip_key,
            me,
        }
    }
}

/// A running membership agent.
pub struct Membership {
    handle: ChitchatHandle,
    live: watch::Receiver<Vec<Member>>,
    me: Member,
    stats: Arc<GossipStats>,
}

impl Membership {
    /// Binds the gossip socket and starts gossiping.
    pub async fn start(config: MembershipConfig) -> Result<Membership, ClusterError> {
        let me = config.me.clone();
        let chitchat_id =
            ChitchatId::new(me.node_id.clone(), me.incarnation, config.gossip_advertise);
        let failure_detector_config = FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1_000,
            max_interval: Duration::from_secs(10),
            initial_interval: config.failure_detection,
            dead_node_grace_period: config.dead_node_grace,
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.gossip_listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config,
            marked_for_deletion_grace_period: Duration::from_secs(900),
            catchup_callback: None,
            // A node counts once it has published where to reach it.
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.contains_key(KEY_QUIC) && state.contains_key(KEY_REGION)
            })),
            protocol_version: ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_REGION.to_string(), me.region.clone()),
            (KEY_CLIENT_URL.to_string(), me.client_url.clone()),
            (KEY_QUIC.to_string(), me.quic.to_string()),
            (KEY_TAG.to_string(), me.tag.clone()),
            (KEY_ORIGIN.to_string(), me.origin.clone()),
            (KEY_LOAD.to_string(), me.load.to_string()),
        ];
        let stats = Arc::new(GossipStats::default());
        let transport = AuthenticatedUdp::new(config.gossip_key.clone(), stats.clone());
        let handle = spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .map_err(|e| ClusterError::Gossip(format!("{e:#}")))?;
        let watcher = handle.with_chitchat(|c| c.live_nodes_watcher()).await;
        let (tx, live) = watch::channel(members_of(&watcher.borrow()));
        tokio::spawn(forward_live(watcher, tx));
        Ok(Membership {
            handle,
            live,
            me,
            stats,
        })
    }

    /// What the gossip transport refused so far.
    pub fn gossip_stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }

    /// This node as published.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Changes to the live set.
    pub fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.live.clone()
    }

    /// Publishes this node's load (open client connections).
    pub async fn set_load(&self, load: u64) {
        self.handle
            .with_chitchat(|c| c.self_node_state().set(KEY_LOAD, load))
            .await;
    }

    /// Publishes the tags of nodes this node saw depart (the newest
    /// [`DEPARTED_TAGS_MAX`]).
    pub async fn set_departed(&self, tags: &[String]) {
        let start = tags.len().saturating_sub(DEPARTED_TAGS_MAX);
        let value = tags[start..].join(",");
        self.handle
            .with_chitchat(|c| c.self_node_state().set(KEY_DEPARTED, value.clone()))
            .await;
    }

    /// Publishes this node's webhook delivered marks (at most
    /// [`WEBHOOK_MARKS_BYTES_MAX`] bytes; a longer value is refused with `false`).
    pub async fn set_webhook_marks(&self, marks: &str) -> bool {
        if marks.len() > WEBHOOK_MARKS_BYTES_MAX {
            return false;
        }
        let value = marks.to_string();
        self.handle
            .with_chitchat(|c| c.self_node_state().set(KEY_WEBHOOK_MARKS, value.clone()))
            .await;
        true
    }

    /// Stops gossiping. Peers will see this node go silent and declare it dead.
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

async fn forward_live(
    mut watcher: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    tx: watch::Sender<Vec<Member>>,
) {
    while watcher.changed().await.is_ok() {
        let members = members_of(&watcher.borrow_and_update());
        tx.send_if_modified(|current| {
            if *current == members {
                false
            } else {
                *current = members;
                true
            }
        });
    }
}

fn members_of(nodes: &BTreeMap<ChitchatId, NodeState>) -> Vec<Member> {
    let mut members: Vec<Member> = nodes
        .iter()
        .filter_map(|(id, state)| member_of(id, state))
        .collect();
    members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    // Two incarnations of one node can both look live briefly: keep the newest.
    members.dedup_by(|later, earlier| {
        if later.node_id != earlier.node_id {
            return false;
        }
        if later.incarnation > earlier.incarnation {
            std::mem::swap(later, earlier);
        }
        true
    });
    members
}

fn member_of(id: &ChitchatId, state: &NodeState) -> Option<Member> {
    Some(Member {
        node_id: id.node_id.to_string(),
        incarnation: id.generation_id,
        region: state.get(KEY_REGION)?.to_string(),
        client_url: state.get(KEY_CLIENT_URL).unwrap_or_default().to_string(),
        quic: state.get(KEY_QUIC)?.parse().ok()?,
        gossip: id.gossip_advertise_addr,
        tag: state.get(KEY_TAG).unwrap_or_default().to_string(),
        origin: state.get(KEY_ORIGIN).unwrap_or_default().to_string(),
        load: state
            .get(KEY_LOAD)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0),
        departed: state
            .get(KEY_DEPARTED)
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
            .take(DEPARTED_TAGS_MAX)
            .map(str::to_string)
            .collect(),
        webhook_marks: state
            .get(KEY_WEBHOOK_MARKS)
            .filter(|m| m.len() <= WEBHOOK_MARKS_BYTES_MAX)
            .unwrap_or_default()
            .to_string(),
    })
}
