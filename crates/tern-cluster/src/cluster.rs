//! One node's cluster side, assembled: the QUIC endpoint, the replicator (the hub's
//! journal) and membership by gossip, wired so that the live set drives the links and a
//! departed node's presence members are removed.
//!
//! Order of construction (the hub needs the journal, the journal needs the hub later):
//! [`ClusterNode::replicator`] → build the hub with it → [`ClusterNode::start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_core::{Hub, Journal, OriginId};

use crate::gossip_auth::{GossipKey, GossipStats};
use crate::link::LinkEndpoint;
use crate::membership::{Member, Membership, MembershipConfig};
use crate::replicator::{Barrier, PeerSpec, Replicator, ReplicatorConfig};
use crate::tls::NodeIdentity;
use crate::topology::Topology;
use crate::{ClusterError, PEERS_MAX};

/// Everything a node needs to join a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    pub node_id: String,
    pub region: String,
    /// Published for clients and `GET /regions`.
    pub client_url: String,
    pub quic_listen: SocketAddr,
    pub gossip_listen: SocketAddr,
    /// `host:port` gossip addresses of existing members (one is enough).
    pub seeds: Vec<String>,
    /// Shared by every member: authenticates each gossip datagram.
    pub gossip_key: GossipKey,
    pub ack_replicas: usize,
    pub topology: Option<Topology>,
    pub identity: Arc<NodeIdentity>,
    pub gossip_interval: Duration,
    pub failure_detection: Duration,
}

/// Called with the node id and connection-id tag of each node that departed: seen to
/// leave the live set (dead, or replaced by a restart), or reported departed by a live
/// member before this node knew it. Called once per tag.
pub type OnDeparted = Arc<dyn Fn(&str, &str) + Send + Sync>;

pub struct ClusterNode {
    membership: Arc<tokio::sync::Mutex<Option<Membership>>>,
    live: tokio::sync::watch::Receiver<Vec<Member>>,
    me: Member,
    replicator: Arc<Replicator>,
    endpoint: Arc<LinkEndpoint>,
    watcher: tokio::task::JoinHandle<()>,
    gossip_stats: Arc<GossipStats>,
}

impl ClusterNode {
    /// The replicator to install as the hub's journal. `next` receives every event
    /// first (the history store). `incarnation` must change on every start.
    pub fn replicator(
        config: &ClusterConfig,
        incarnation: u64,
        origin: OriginId,
        next: Option<Arc<dyn Journal>>,
    ) -> Arc<Replicator> {
        Replicator::new(
            ReplicatorConfig {
                node_id: config.node_id.clone(),
                incarnation,
                region: config.region.clone(),
                ack_replicas: config.ack_replicas,
                topology: config.topology.clone(),
            },
            origin,
            next,
        )
    }

    /// Binds QUIC and gossip, starts replication and joins through the seeds.
    /// `tag` is the prefix of this node's connection ids.
    pub async fn start(
        config: ClusterConfig,
        incarnation: u64,
        replicator: Arc<Replicator>,
        hub: &Arc<Hub>,
        barrier: Barrier,
        tag: String,
        on_departed: OnDeparted,
    ) -> Result<ClusterNode, ClusterError> {
        // TERN_CLUSTER_WIRE=1: speak inter-node wire v1 only, as the release before wire
        // v2 did (rolling-upgrade tests, and measuring the old format: docs/benchmarks.md).
        let endpoint = if std::env::var("TERN_CLUSTER_WIRE").as_deref() == Ok("1") {
            LinkEndpoint::bind_v1_only(config.quic_listen, &config.identity)?
        } else {
            LinkEndpoint::bind(config.quic_listen, &config.identity)?
        };
        let endpoint = Arc::new(endpoint);
        let quic = endpoint.local_addr()?;
        replicator.start(endpoint.clone(), hub, barrier);
        let me = Member {
            node_id: config.node_id.clone(),
            incarnation,
            region: config.region.clone(),
            client_url: config.client_url.clone(),
            quic,
            gossip: config.gossip_listen,
            tag,
            origin: format!("{:016x}", hub.origin().0),
            load: 0,
            departed: Vec::new(),
            webhook_marks: String::new(),
        };
        let mut membership_config = MembershipConfig::new(
            me,
            config.gossip_listen,
            config.seeds.clone(),
            config.gossip_key.clone(),
        );
        membership_config.gossip_interval = config.gossip_interval;
        membership_config.failure_detection = config.failure_detection;
        let membership = Membership::start(membership_config).await?;
        let live = membership.watch();
        let me = membership.me().clone();
        let gossip_stats = membership.gossip_stats();
        let membership = Arc::new(tokio::sync::Mutex::new(Some(membership)));
        let watcher = tokio::spawn(follow_members(
            live.clone(),
            replicator.clone(),
            me.clone(),
            on_departed,
            membership.clone(),
        ));
        Ok(ClusterNode {
            live,
            me,
            membership,
            replicator,
            endpoint,
            watcher,
            gossip_stats,
        })
    }

    /// Live members, this node included.
    pub fn members(&self) -> Vec<Member> {
        self.live.borrow().clone()
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Gossip datagrams dropped because they were not authentic (or stale, or
    /// undecodable) since start.
    pub fn gossip_rejected(&self) -> u64 {
        self.gossip_stats.rejected()
    }

    pub fn replication(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    /// Changes to the live set (each member as last gossiped, webhook marks included).
    pub fn watch_members(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
        self.live.clone()
    }

    /// Publishes this node's webhook delivered marks (see
    /// [`Membership::set_webhook_marks`]); `false` if too long to publish.
    pub async fn set_webhook_marks(&self, marks: &str) -> bool {
        match self.membership.lock().await.as_ref() {
            Some(membership) => membership.set_webhook_marks(marks).await,
            None => false,
        }
    }

    pub async fn set_load(&self, load: u64) {
        if let Some(membership) = self.membership.lock().await.as_ref() {
            membership.set_load(load).await;
        }
    }

    /// Leaves: stops gossip and closes the QUIC endpoint (peers see this node die).
    pub async fn shutdown(&self) {
        self.watcher.abort();
        self.replicator.set_peers(&[]);
        self.endpoint.close();
        if let Some(membership) = self.membership.lock().await.take() {
            membership.shutdown().await;
        }
    }
}

async fn follow_members(
    mut live: tokio::sync::watch::Receiver<Vec<Member>>,
    replicator: Arc<Replicator>,
    me: Member,
    on_departed: OnDeparted,
    membership: Arc<tokio::sync::Mutex<Option<Membership>>>,
) {
    let mut previous: Vec<Member> = Vec::new();
    // Tags already handled, oldest first (bounded), and what we publish.
    let mut handled: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    loop {
        let current = live.borrow_and_update().clone();
        let peers: Vec<PeerSpec> = current
            .iter()
            .filter(|m| m.node_id != me.node_id)
            .map(|m| PeerSpec {
                node_id: m.node_id.clone(),
                incarnation: m.incarnation,
                region: m.region.clone(),
                quic: m.quic,
                origin: u64::from_str_radix(&m.origin, 16).unwrap_or(0),
            })
            .take(PEERS_MAX)
            .collect();
        if current.len() > PEERS_MAX + 1 {
            tracing::warn!(
                live = current.len(),
                max = PEERS_MAX,
                "more live members than peers this node links to"
            );
        }
        replicator.set_peers(&peers);
        let live_tags: Vec<&str> = current.iter().map(|m| m.tag.as_str()).collect();
        let mut departed: Vec<(String, String)> = previous
            .iter()
            .filter(|old| {
                old.node_id != me.node_id
                    && !current
                        .iter()
                        .any(|m| m.node_id == old.node_id && m.incarnation == old.incarnation)
            })
            .map(|gone| (gone.node_id.clone(), gone.tag.clone()))
            .collect();
        // Departures other members saw before we were here (or while we were cut off).
        for member in &current {
            for tag in &member.departed {
                departed.push((format!("reported by {}", member.node_id), tag.clone()));
            }
        }
        let mut changed = false;
        for (node, tag) in departed {
            if tag.is_empty()
                || tag == me.tag
                || live_tags.contains(&tag.as_str())
                || handled.contains(&tag)
            {
                continue;
            }
            tracing::info!(%node, %tag, "member departed");
            on_departed(&node, &tag);
            handled.push_back(tag);
            if handled.len() > crate::membership::DEPARTED_TAGS_MAX * 4 {
                handled.pop_front();
            }
            changed = true;
        }
        if changed {
            let tags: Vec<String> = handled.iter().cloned().collect();
            if let Some(membership) = membership.lock().await.as_ref() {
                membership.set_departed(&tags).await;
            }
        }
        previous = current;
        if live.changed().await.is_err() {
            return;
        }
    }
}
