//! In-process clusters over real gossip (chitchat, UDP, authenticated with a gossip
//! key) and real mutual-TLS QUIC on loopback: joining through one seed, lossy links,
//! partitions, a killed origin after replica acks, a dead node's presence members, and
//! gossip that is not authentic (another key, forged, truncated). Each test counts
//! messages.
//!
//! This file is the harness (nodes, stores, waits); the tests are in `cluster/`:
//! `replication.rs`, `interest.rs` and `gossip.rs`.

#[path = "cluster/gossip.rs"]
mod gossip;
#[path = "cluster/interest.rs"]
mod interest;
#[path = "cluster/replication.rs"]
mod replication;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_cluster::cluster::{ClusterConfig, ClusterNode};
use tern_cluster::gossip_auth::{GossipKey, OVERHEAD_LEN, UDP_PAYLOAD_MAX};
use tern_cluster::replicator::LocalStore;
use tern_cluster::tls::ClusterCa;
use tern_cluster::topology::Topology;
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, Subscriber,
};
use tern_protocol::{flags, presence_action, Data, Message, PresenceMessage};

#[derive(Default)]
struct Recorder(Mutex<Vec<(OriginId, u64, String)>>);

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut got = self.0.lock().unwrap();
        for m in event.frame.messages.iter().flatten() {
            got.push((event.origin, event.seq, m.name.clone().unwrap_or_default()));
        }
        true
    }
}

impl Recorder {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, n)| n.clone())
            .collect()
    }
}

struct TestNode {
    name: String,
    hub: Arc<Hub>,
    cluster: ClusterNode,
    recorder: Arc<Recorder>,
    gossip: SocketAddr,
    /// Tags this node was told departed.
    departed: Arc<Mutex<Vec<String>>>,
    store: Arc<TestStore>,
}

/// The local history store as link acks see it: everything commits at once, until
/// `lose_a_write` makes it report a write it lost (a failed commit, a full queue).
#[derive(Default)]
struct TestStore {
    lost: std::sync::atomic::AtomicU64,
}

impl TestStore {
    fn lose_a_write(&self) {
        self.lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LocalStore for TestStore {
    fn lost_writes(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn after_committed(&self, since: u64, then: Box<dyn FnOnce(bool) + Send>) {
        then(self.lost_writes() <= since);
    }
}

fn room() -> ChannelKey {
    ChannelKey::new("app", "room")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The gossip key of the tests' clusters.
fn cluster_key() -> GossipKey {
    GossipKey::from_hex(&"5a".repeat(32)).unwrap()
}

/// Starts a node of `region` joining through `seeds`; a subscriber records "room".
async fn start(
    ca: &ClusterCa,
    name: &str,
    region: &str,
    seeds: &[&TestNode],
    topology: Option<Topology>,
    ack_replicas: usize,
) -> TestNode {
    start_keyed(
        ca,
        &cluster_key(),
        name,
        region,
        seeds,
        topology,
        ack_replicas,
    )
    .await
}

/// [`start`] with a gossip key of its own.
async fn start_keyed(
    ca: &ClusterCa,
    gossip_key: &GossipKey,
    name: &str,
    region: &str,
    seeds: &[&TestNode],
    topology: Option<Topology>,
    ack_replicas: usize,
) -> TestNode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let gossip = free_udp();
    let config = ClusterConfig {
        node_id: name.into(),
        region: region.into(),
        client_url: format!("http://{name}"),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        gossip_listen: gossip,
        seeds: seeds.iter().map(|n| n.gossip.to_string()).collect(),
        gossip_key: gossip_key.clone(),
        ack_replicas,
        topology,
        identity: Arc::new(ca.issue(name).unwrap()),
        gossip_interval: Duration::from_millis(100),
        failure_detection: Duration::from_millis(500),
    };
    let origin = OriginId(rand_origin(name));
    let incarnation = 1;
    let replicator = ClusterNode::replicator(&config, incarnation, origin, None);
    let hub = Arc::new(Hub::with_journal(
        origin,
        CoreLimits::default(),
        Some(replicator.clone()),
    ));
    let recorder = Arc::new(Recorder::default());
    hub.attach(
        &room(),
        format!("{name}-subscriber").into(),
        AttachOptions {
            modes: flags::SUBSCRIBE | flags::PRESENCE_SUBSCRIBE,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        },
        recorder.clone(),
        |_| {},
        0,
    )
    .unwrap();
    let departed_hub = hub.clone();
    let departed = Arc::new(Mutex::new(Vec::new()));
    let departed_log = departed.clone();
    let store = Arc::new(TestStore::default());
    let cluster = ClusterNode::start(
        config,
        incarnation,
        replicator,
        &hub,
        store.clone(),
        name.into(),
        Arc::new(move |_node: &str, tag: &str| {
            departed_log.lock().unwrap().push(tag.to_string());
            departed_hub.node_departed(&format!("{tag}-"), now_ms());
        }),
    )
    .await
    .unwrap();
    TestNode {
        name: name.into(),
        hub,
        cluster,
        recorder,
        gossip,
        departed,
        store,
    }
}

fn rand_origin(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn publish(node: &TestNode, name: String) {
    publish_on(node, &room(), &name);
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_members(nodes: &[&TestNode], count: usize) {
    wait_for("membership", 20, || {
        nodes.iter().all(|n| n.cluster.members().len() == count)
    })
    .await;
}

/// Every node's subscriber has every message of every origin exactly once, each
/// origin's in publish order.
fn assert_exactly_once_in_order(nodes: &[&TestNode], published: &[(String, Vec<String>)]) {
    for node in nodes {
        let got = node.recorder.names();
        let total: usize = published.iter().map(|(_, names)| names.len()).sum();
        assert_eq!(
            got.len(),
            total,
            "{}: every message exactly once",
            node.name
        );
        for (origin, names) in published {
            let from_origin: Vec<&String> = got
                .iter()
                .filter(|n| n.starts_with(&format!("{origin}/")))
                .collect();
            let expected: Vec<&String> = names.iter().collect();
            assert_eq!(
                from_origin, expected,
                "{}: {origin}'s messages in order",
                node.name
            );
        }
    }
}

fn lossy_topology(delay_ms: u64, loss_percent: f64) -> Topology {
    Topology::parse(&format!(
        r#"regions = ["r1", "r2", "r3"]
[[links]]
a = "r1"
b = "r2"
delay_ms = {delay_ms}
loss_percent = {loss_percent}
[[links]]
a = "r1"
b = "r3"
delay_ms = {delay_ms}
loss_percent = {loss_percent}
[[links]]
a = "r2"
b = "r3"
delay_ms = {delay_ms}
loss_percent = {loss_percent}
"#
    ))
    .unwrap()
}

fn publish_on(node: &TestNode, key: &ChannelKey, name: &str) {
    let publisher = Publisher {
        connection_id: Some(format!("{}-publisher", node.name).into()),
        frame_id: format!("{}:{name}", node.name),
    };
    let message = Message {
        name: Some(name.into()),
        data: Some(Data::String("x".into())),
        ..Default::default()
    };
    node.hub
        .publish(key, &publisher, vec![message], now_ms())
        .unwrap();
}
