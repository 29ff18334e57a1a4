//! In-process clusters over real gossip (chitchat, UDP, authenticated with a gossip
//! key) and real mutual-TLS QUIC on loopback: joining through one seed, lossy links,
//! partitions, a killed origin after replica acks, a dead node's presence members, and
//! gossip that is not authentic (another key, forged, truncated). Each test counts
//! messages.

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

/// Three regions join through one seed each (C knows only B) over links that drop 10%
/// of event frames; every message published on every node reaches every subscriber
/// exactly once, in origin order, cursors converge, and each pair of nodes shares one
/// QUIC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_by_one_seed_and_replicate_over_lossy_links_exactly_once() {
    let ca = ClusterCa::generate().unwrap();
    let topology = lossy_topology(2, 10.0);
    let a = start(&ca, "a", "r1", &[], Some(topology.clone()), 1).await;
    let b = start(&ca, "b", "r2", &[&a], Some(topology.clone()), 1).await;
    let c = start(&ca, "c", "r3", &[&b], Some(topology.clone()), 1).await;
    let nodes = [&a, &b, &c];
    wait_members(&nodes, 3).await;
    let mut published = Vec::new();
    for node in nodes {
        published.push((node.name.clone(), Vec::new()));
    }
    for n in 0..200 {
        for (i, node) in nodes.iter().enumerate() {
            let name = format!("{}/{n}", node.name);
            publish(node, name.clone());
            published[i].1.push(name);
        }
    }
    wait_for("all deliveries", 60, || {
        nodes.iter().all(|n| n.recorder.len() >= 600)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once_in_order(&nodes, &published);
    let cursor = a.hub.cursor(&room());
    assert!(nodes.iter().all(|n| n.hub.cursor(&room()) == cursor));
    // Both directions of every pair share one QUIC connection (a duplicate from both
    // dialing at once is closed).
    wait_for("one connection per pair", 10, || {
        nodes
            .iter()
            .all(|n| n.cluster.replication().link_connections() == 2)
    })
    .await;
}

/// Region C is cut off from A and B while all three publish; after the partition heals,
/// every subscriber has every message exactly once, in origin order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_converges_after_heal_with_no_loss_or_duplicate() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 0).await;
    let b = start(&ca, "b", "r2", &[&a], None, 0).await;
    let c = start(&ca, "c", "r3", &[&a], None, 0).await;
    let nodes = [&a, &b, &c];
    wait_members(&nodes, 3).await;
    let mut published: Vec<(String, Vec<String>)> =
        nodes.iter().map(|n| (n.name.clone(), Vec::new())).collect();
    let mut round = |nodes: &[&TestNode; 3], from: usize, to: usize| {
        for n in from..to {
            for (i, node) in nodes.iter().enumerate() {
                let name = format!("{}/{n}", node.name);
                publish(node, name.clone());
                published[i].1.push(name);
            }
        }
    };
    round(&nodes, 0, 50);
    for (x, y) in [(&a, &c), (&b, &c)] {
        x.cluster.replication().set_partitioned(&y.name, true);
        y.cluster.replication().set_partitioned(&x.name, true);
    }
    round(&nodes, 50, 150);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.recorder.len() < 450, "the partition held");
    for (x, y) in [(&a, &c), (&b, &c)] {
        x.cluster.replication().set_partitioned(&y.name, false);
        y.cluster.replication().set_partitioned(&x.name, false);
    }
    round(&nodes, 150, 200);
    wait_for("convergence", 60, || {
        nodes.iter().all(|n| n.recorder.len() >= 600)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once_in_order(&nodes, &published);
}

/// With ack_replicas = 1, every publish acknowledged before the origin is killed is on
/// both survivors afterwards: on B, which acked it, and on C, which was slower and
/// gets what it lacks from B by anti-entropy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_killing_the_origin() {
    let ca = ClusterCa::generate().unwrap();
    let topology = Topology::parse(
        r#"regions = ["r1", "r2", "r3"]
[[links]]
a = "r1"
b = "r2"
delay_ms = 5
[[links]]
a = "r1"
b = "r3"
delay_ms = 2000
[[links]]
a = "r2"
b = "r3"
delay_ms = 5
"#,
    )
    .unwrap();
    let a = start(&ca, "a", "r1", &[], Some(topology.clone()), 1).await;
    let b = start(&ca, "b", "r2", &[&a], Some(topology.clone()), 1).await;
    let c = start(&ca, "c", "r3", &[&a], Some(topology.clone()), 1).await;
    wait_members(&[&a, &b, &c], 3).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    for n in 0..100 {
        let name = format!("a/{n}");
        publish(&a, name.clone());
        let acked = acked.clone();
        a.cluster.replication().after_replicated(
            Some(&room()),
            Box::new(move |ok| {
                if ok {
                    acked.lock().unwrap().push(name);
                }
            }),
        );
    }
    wait_for("acks", 20, || acked.lock().unwrap().len() == 100).await;
    // Kill the origin right after the last ACK: frames still in its 2 s delay queue
    // towards C die with it.
    assert!(c.recorder.len() < 100, "C is behind when A dies");
    a.cluster.shutdown().await;
    drop(a);
    let acked = acked.lock().unwrap().clone();
    for node in [&b, &c] {
        wait_for("survivors to hold every acked message", 20, || {
            node.recorder.len() >= acked.len()
        })
        .await;
        assert_eq!(
            node.recorder.names(),
            acked,
            "{}: all acked, once, in order",
            node.name
        );
    }
}

/// A node dies: its presence members leave on every surviving node, by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_presence_members_leave_everywhere() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 0).await;
    let b = start(&ca, "b", "r2", &[&a], None, 0).await;
    let c = start(&ca, "c", "r3", &[&a], None, 0).await;
    wait_members(&[&a, &b, &c], 3).await;
    for (i, node) in [&a, &b].iter().enumerate() {
        let publisher = Publisher {
            connection_id: Some(format!("{}-conn", node.name).into()),
            frame_id: format!("{}-conn:{i}", node.name),
        };
        let enter = PresenceMessage {
            action: presence_action::ENTER,
            client_id: Some(format!("user-{}", node.name)),
            connection_id: Some(format!("{}-conn", node.name)),
            data: Some(Data::String("here".into())),
            ..Default::default()
        };
        node.hub
            .presence(&room(), &publisher, vec![enter], now_ms())
            .unwrap();
    }
    wait_for("presence everywhere", 10, || {
        [&a, &b, &c]
            .iter()
            .all(|n| n.hub.members(&room()).len() == 2)
    })
    .await;
    a.cluster.shutdown().await;
    for node in [&b, &c] {
        wait_for("the dead node's member to leave", 20, || {
            let members = node.hub.members(&room());
            members.len() == 1 && members[0].client_id.as_deref() == Some("user-b")
        })
        .await;
    }
}

/// A node that joins a running cluster through one seed gets the live traffic and,
/// for a channel it holds, what was published before it joined (from the origins'
/// logs): every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_with_one_seed_gets_live_traffic_and_the_backlog() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 1).await;
    let b = start(&ca, "b", "r2", &[&a], None, 1).await;
    wait_members(&[&a, &b], 2).await;
    let mut published: Vec<(String, Vec<String>)> = [&a, &b]
        .iter()
        .map(|n| (n.name.clone(), Vec::new()))
        .collect();
    for n in 0..50 {
        for (i, node) in [&a, &b].iter().enumerate() {
            let name = format!("{}/{n}", node.name);
            publish(node, name.clone());
            published[i].1.push(name);
        }
    }
    let d = start(&ca, "d", "r3", &[&b], None, 1).await;
    wait_members(&[&a, &b, &d], 3).await;
    for n in 50..100 {
        for (i, node) in [&a, &b].iter().enumerate() {
            let name = format!("{}/{n}", node.name);
            publish(node, name.clone());
            published[i].1.push(name);
        }
    }
    wait_for("the joiner to catch up", 20, || d.recorder.len() >= 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once_in_order(&[&a, &b, &d], &published);
}

/// A node that joins after another died learns from a live member's gossip that the
/// dead node departed (so its presence members cannot come back there either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_learns_who_departed_before_it_came() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 0).await;
    let b = start(&ca, "b", "r2", &[&a], None, 0).await;
    wait_members(&[&a, &b], 2).await;
    a.cluster.shutdown().await;
    wait_for("b to see a depart", 20, || {
        b.departed.lock().unwrap().contains(&"a".to_string())
    })
    .await;
    let c = start(&ca, "c", "r3", &[&b], None, 0).await;
    wait_members(&[&b, &c], 2).await;
    wait_for("c to learn that a departed", 20, || {
        c.departed.lock().unwrap().contains(&"a".to_string())
    })
    .await;
    assert!(!c.departed.lock().unwrap().contains(&"b".to_string()));
}

/// Two regions of two nodes, a subscriber on each: a message crosses to the other region
/// once (to the channel's home there), which passes it on inside its region; every
/// subscriber gets every message once, in order. Then the home dies mid-stream and the
/// region's other node (the new home) still gets everything, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_per_region_through_a_relay_that_can_die() {
    let ca = ClusterCa::generate().unwrap();
    let topology = Topology::parse(
        "regions = [\"r1\", \"r2\"]\n[[links]]\na = \"r1\"\nb = \"r2\"\ndelay_ms = 5\n",
    )
    .unwrap();
    let a1 = start(&ca, "a1", "r1", &[], Some(topology.clone()), 1).await;
    let a2 = start(&ca, "a2", "r1", &[&a1], Some(topology.clone()), 1).await;
    let b1 = start(&ca, "b1", "r2", &[&a1], Some(topology.clone()), 1).await;
    let b2 = start(&ca, "b2", "r2", &[&a1], Some(topology.clone()), 1).await;
    let all = [&a1, &a2, &b1, &b2];
    wait_members(&all, 4).await;
    // Everyone has a subscriber on the room; a1 and b-home must know their region's.
    wait_for("interest within each region", 10, || {
        let knows =
            |n: &TestNode, peer: &str| n.cluster.replication().knows_interest(peer, &room());
        knows(&a1, "a2") && knows(&b1, "b2") && knows(&b2, "b1")
    })
    .await;
    let mut published: Vec<(String, Vec<String>)> = vec![("a1".into(), Vec::new())];
    for n in 0..200 {
        let name = format!("a1/{n}");
        publish(&a1, name.clone());
        published[0].1.push(name);
    }
    wait_for("every subscriber", 30, || {
        all.iter().all(|n| n.recorder.len() >= 200)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once_in_order(&all, &published);
    let to_b1 = a1.cluster.replication().events_sent_to("b1");
    let to_b2 = a1.cluster.replication().events_sent_to("b2");
    assert_eq!(
        to_b1 + to_b2,
        200,
        "one copy per message crossed to r2: {to_b1} + {to_b2}"
    );
    assert!(
        to_b1 == 0 || to_b2 == 0,
        "all through one relay: {to_b1} + {to_b2}"
    );
    assert_eq!(a1.cluster.replication().events_sent_to("a2"), 200);

    // The relay dies while a1 keeps publishing; b-other must still get everything once.
    let (relay, other) = if to_b1 > 0 { (&b1, &b2) } else { (&b2, &b1) };
    for n in 200..300 {
        let name = format!("a1/{n}");
        publish(&a1, name.clone());
        published[0].1.push(name);
        if n == 220 {
            relay.cluster.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let survivors = [&a1, &a2, other];
    wait_for("the relay's region to get everything", 30, || {
        survivors.iter().all(|n| n.recorder.len() >= 300)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once_in_order(&survivors, &published);
}

/// With ack_replicas = 1 and another region live, the ACK waits for a replica in that
/// region, not just the faster one next door: losing the whole region loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_waits_for_a_replica_in_another_region() {
    let ca = ClusterCa::generate().unwrap();
    let topology = Topology::parse(
        "regions = [\"r1\", \"r2\"]\n[[links]]\na = \"r1\"\nb = \"r2\"\ndelay_ms = 400\n",
    )
    .unwrap();
    let a1 = start(&ca, "a1", "r1", &[], Some(topology.clone()), 1).await;
    let a2 = start(&ca, "a2", "r1", &[&a1], Some(topology.clone()), 1).await;
    let b1 = start(&ca, "b1", "r2", &[&a1], Some(topology.clone()), 1).await;
    wait_members(&[&a1, &a2, &b1], 3).await;
    publish(&a1, "a1/0".into());
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    a1.cluster.replication().after_replicated(
        Some(&room()),
        Box::new(move |ok| {
            let _ = tx.send((ok, started.elapsed()));
        }),
    );
    let (ok, took) = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap();
    assert!(ok);
    assert!(
        took >= Duration::from_millis(780),
        "acked after {took:?}: before a round trip to r2 (2 x 400 ms)"
    );
    assert_eq!(b1.recorder.names(), vec!["a1/0".to_string()]);
}

/// Waits for the channel state a first subscriber on `node` waits for (the node must
/// not receive `key` yet), then returns the clientIds of its presence members.
async fn warm_members(node: &TestNode, key: &ChannelKey) -> Vec<Option<String>> {
    let ready = node
        .cluster
        .replication()
        .warm(key)
        .expect("not received here yet");
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .unwrap()
        .unwrap();
    node.hub
        .members(key)
        .into_iter()
        .map(|m| m.client_id)
        .collect()
}

/// `client` enters presence on `key` at `node` from connection `conn`.
fn enter_on(node: &TestNode, key: &ChannelKey, client: &str, conn: &str) {
    let member = PresenceMessage {
        action: presence_action::ENTER,
        id: Some(format!("{conn}:0:0")),
        client_id: Some(client.into()),
        connection_id: Some(conn.into()),
        timestamp: Some(now_ms()),
        ..Default::default()
    };
    let publisher = Publisher {
        connection_id: Some(conn.into()),
        frame_id: format!("{conn}:0"),
    };
    node.hub
        .presence(key, &publisher, vec![member], now_ms())
        .unwrap();
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

/// Interest routing over two regions of two nodes. A channel nobody subscribes to
/// reaches only its home in each region (its storage replica there), not the other
/// node. A first subscriber on that other node gets the channel's state from the home
/// before it attaches (presence members, the log to resume from) and from then on every
/// message exactly once; after it detaches, the node stops receiving the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_a_channel_only_while_it_has_subscribers_or_is_its_home() {
    let ca = ClusterCa::generate().unwrap();
    let topology = Topology::parse(
        "regions = [\"r1\", \"r2\"]\n[[links]]\na = \"r1\"\nb = \"r2\"\ndelay_ms = 5\n",
    )
    .unwrap();
    let a1 = start(&ca, "a1", "r1", &[], Some(topology.clone()), 1).await;
    let a2 = start(&ca, "a2", "r1", &[&a1], Some(topology.clone()), 1).await;
    let b1 = start(&ca, "b1", "r2", &[&a1], Some(topology.clone()), 1).await;
    let b2 = start(&ca, "b2", "r2", &[&a1], Some(topology.clone()), 1).await;
    wait_members(&[&a1, &a2, &b1, &b2], 4).await;
    let key = ChannelKey::new("app", "quiet");
    let holds = |n: &TestNode| n.hub.status(&key).is_some();

    // a1 publishes and has a member on the channel; nobody subscribes.
    enter_on(&a1, &key, "alice", "a1-conn");
    for n in 0..10 {
        publish_on(&a1, &key, &format!("a1/{n}"));
    }
    wait_for("the channel's home in r2", 10, || {
        [&b1, &b2]
            .iter()
            .any(|n| n.hub.cursor(&key).get(OriginId(rand_origin("a1"))) == 11)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (home, other) = if holds(&b1) { (&b1, &b2) } else { (&b2, &b1) };
    assert!(holds(home));
    assert!(
        !holds(other),
        "{} has no subscriber and is not the home: it never got the channel (not even from Heads)",
        other.name
    );
    assert_eq!(a1.cluster.replication().events_sent_to(&other.name), 0);

    // A first subscriber on the other node: the state comes first.
    let members = warm_members(other, &key).await;
    assert_eq!(
        members,
        vec![Some("alice".to_string())],
        "presence came with the state"
    );
    let from = {
        let mut cursor = tern_core::Cursor::new();
        cursor.advance(OriginId(rand_origin("a1")), 6); // the member and a1/0..a1/4
        cursor
    };
    let recorder = Arc::new(Recorder::default());
    let mut backlog = Vec::new();
    other
        .hub
        .attach(
            &key,
            "late-subscriber".into(),
            AttachOptions {
                modes: flags::SUBSCRIBE | flags::PRESENCE_SUBSCRIBE,
                echo: true,
                resume_from: Some(from),
                rewind: None,
                delta: false,
            },
            recorder.clone(),
            |snapshot| {
                assert!(snapshot.resumed, "the log came with the state");
                backlog = snapshot
                    .backlog
                    .iter()
                    .flat_map(|e| e.frame.messages.iter().flatten())
                    .map(|m| m.name.clone().unwrap_or_default())
                    .collect();
            },
            now_ms(),
        )
        .unwrap();
    assert_eq!(
        backlog,
        (5..10).map(|n| format!("a1/{n}")).collect::<Vec<_>>()
    );
    for n in 10..30 {
        publish_on(&a1, &key, &format!("a1/{n}"));
    }
    wait_for("live messages on the late subscriber", 10, || {
        recorder.len() >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        recorder.names(),
        (10..30).map(|n| format!("a1/{n}")).collect::<Vec<_>>(),
        "every live message once, in order"
    );
    assert_eq!(
        a1.cluster.replication().events_sent_to(&other.name),
        0,
        "still one copy per region: through the home"
    );
    assert!(
        home.cluster.replication().events_sent_to(&other.name) >= 20,
        "the home relayed them"
    );

    // Detached: the node stops receiving the channel.
    other.hub.detach(&key, "late-subscriber", now_ms());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = other.hub.cursor(&key).get(OriginId(rand_origin("a1")));
    for n in 30..40 {
        publish_on(&a1, &key, &format!("a1/{n}"));
    }
    wait_for("the home", 10, || {
        home.hub.cursor(&key).get(OriginId(rand_origin("a1"))) == before + 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        other.hub.cursor(&key).get(OriginId(rand_origin("a1"))),
        before,
        "no subscriber any more: no events"
    );
}

/// Sends `datagrams` to `node`'s gossip port from a plain UDP socket and waits until
/// the node has refused them all; exactly those are counted.
async fn send_raw(node: &TestNode, datagrams: &[Vec<u8>]) {
    let before = node.cluster.gossip_rejected();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for datagram in datagrams {
        socket.send_to(datagram, node.gossip).await.unwrap();
    }
    let expected = before + datagrams.len() as u64;
    wait_for("the datagrams to be refused", 10, || {
        node.cluster.gossip_rejected() >= expected
    })
    .await;
    assert_eq!(node.cluster.gossip_rejected(), expected);
}

/// The cluster of `a` and `b` still works: both see exactly both, and a message
/// published on `a` reaches `b`.
async fn assert_cluster_unaffected(a: &TestNode, b: &TestNode, message: &str) {
    for node in [a, b] {
        let names: Vec<String> = node
            .cluster
            .members()
            .into_iter()
            .map(|m| m.node_id)
            .collect();
        assert_eq!(
            names,
            vec![a.name.clone(), b.name.clone()],
            "{}'s members",
            node.name
        );
    }
    let before = b.recorder.len();
    publish(a, message.into());
    wait_for("the message to cross", 10, || b.recorder.len() > before).await;
    assert!(b.recorder.names().contains(&message.to_string()));
}

/// A node whose gossip key differs never appears in the live set of the others (nor
/// they in its own), though it gossips at them all along; their cluster is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_key_never_joins() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 1).await;
    let b = start(&ca, "b", "r2", &[&a], None, 1).await;
    wait_members(&[&a, &b], 2).await;
    let other_key = GossipKey::random();
    let x = start_keyed(&ca, &other_key, "x", "r3", &[&a, &b], None, 1).await;
    // x's SYNs to its seeds are refused; watch for long enough that x has tried many
    // times (gossip every 100 ms), checking the live sets at every step.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.cluster.gossip_rejected() < 10 || b.cluster.gossip_rejected() < 10 {
        assert!(
            Instant::now() < deadline,
            "x's gossip never reached a and b"
        );
        for node in [&a, &b] {
            assert!(
                node.cluster.members().iter().all(|m| m.node_id != "x"),
                "x joined {}",
                node.name
            );
        }
        let seen_by_x: Vec<String> = x.cluster.members().into_iter().map(|m| m.node_id).collect();
        assert!(seen_by_x.iter().all(|n| n == "x"), "x sees {seen_by_x:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // a and b dropped x's gossip unread, so they never even answered it.
    assert_eq!(x.cluster.gossip_rejected(), 0, "a and b sent x nothing");
    assert_cluster_unaffected(&a, &b, "a/after-x").await;
    assert!(x.recorder.names().is_empty(), "x got no traffic");
}

/// Forged and garbage datagrams sent to a gossip port from a plain UDP socket (random
/// bytes, a plausible header with a made-up tag, a maximal datagram, a real-looking
/// chitchat message without a tag) are dropped and counted; nothing panics and the
/// cluster carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_gossip_is_dropped_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 1).await;
    let b = start(&ca, "b", "r2", &[&a], None, 1).await;
    wait_members(&[&a, &b], 2).await;
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    // Pseudo-random bytes of many lengths (deterministic, xorshift).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for len in [OVERHEAD_LEN, 64, 200, 1_400, 9_000] {
        let bytes = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        datagrams.push(bytes);
    }
    // Version 1, the current time, a chitchat header (magic 45139, V0, SYN), a zero tag.
    let mut forged = vec![1u8];
    forged.extend_from_slice(&(now_ms() as u64).to_be_bytes());
    forged.extend_from_slice(&45_139u16.to_le_bytes());
    forged.extend_from_slice(&[0, 0, 0, 0]);
    forged.extend_from_slice(&[0u8; 32]);
    datagrams.push(forged);
    // What an unauthenticated chitchat node would send (no header, no tag).
    let mut plain_chitchat = 45_139u16.to_le_bytes().to_vec();
    plain_chitchat.extend_from_slice(&[0, 3]);
    datagrams.push(plain_chitchat);
    datagrams.push(vec![0xff; UDP_PAYLOAD_MAX]);
    send_raw(&a, &datagrams).await;
    send_raw(&b, &datagrams).await;
    assert_cluster_unaffected(&a, &b, "a/after-garbage").await;
}

/// Datagrams shorter than the tag (empty, one byte, one short of header and tag) are
/// dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_gossip_is_dropped_and_counted() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 1).await;
    let b = start(&ca, "b", "r2", &[&a], None, 1).await;
    wait_members(&[&a, &b], 2).await;
    let datagrams: Vec<Vec<u8>> = [0, 1, 31, 32, OVERHEAD_LEN - 1]
        .into_iter()
        .map(|len| vec![1u8; len])
        .collect();
    send_raw(&a, &datagrams).await;
    assert_cluster_unaffected(&a, &b, "a/after-truncated").await;
}

/// A member who entered long ago (their ENTER is out of every channel log) still
/// reaches a node whose first subscriber arrives now: the channel's state carries the
/// current members, not just the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscribers_node_gets_members_older_than_the_log() {
    let ca = ClusterCa::generate().unwrap();
    let a1 = start(&ca, "a1", "r1", &[], None, 1).await;
    let a2 = start(&ca, "a2", "r1", &[&a1], None, 1).await;
    wait_members(&[&a1, &a2], 2).await;
    let key = ChannelKey::new("app", "old-members");
    let (home, late) = match a1.cluster.replication().home_of(&key) {
        None => (&a1, &a2),
        Some(_) => (&a2, &a1),
    };
    enter_on(home, &key, "old-timer", "old-conn");
    let log_max = CoreLimits::default().log.events_max;
    for n in 0..log_max + 10 {
        publish_on(home, &key, &format!("m{n}"));
    }
    assert!(
        home.hub.log_len(&key) <= log_max,
        "the ENTER is out of the log"
    );
    let members = warm_members(late, &key).await;
    assert_eq!(members, vec![Some("old-timer".to_string())]);
}

/// Subscribes a fresh recorder to `key` on `node`, after the channel's state arrived
/// (as the edge does on a first attach).
async fn subscribe(node: &TestNode, key: &ChannelKey, id: &str) -> Arc<Recorder> {
    if let Some(ready) = node.cluster.replication().warm(key) {
        let _ = tokio::time::timeout(Duration::from_secs(5), ready).await;
    }
    let recorder = Arc::new(Recorder::default());
    node.hub
        .attach(
            key,
            id.into(),
            AttachOptions {
                modes: flags::SUBSCRIBE,
                echo: true,
                resume_from: None,
                rewind: None,
                delta: false,
            },
            recorder.clone(),
            |_| {},
            now_ms(),
        )
        .unwrap();
    recorder
}

/// Two regions of three nodes; one channel with subscribers on one node per region,
/// neither of them the channel's home there, and publishers in both regions (also not
/// homes). The home of the channel in r2 (the relay r1's messages cross to, which passes
/// them to r2's subscriber) is killed mid-stream. Each subscriber still gets every
/// message exactly once, in each origin's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_subscribers_get_everything_once_when_their_regions_home_dies() {
    let ca = ClusterCa::generate().unwrap();
    let topology = Topology::parse(
        "regions = [\"r1\", \"r2\"]\n[[links]]\na = \"r1\"\nb = \"r2\"\ndelay_ms = 5\n",
    )
    .unwrap();
    let a1 = start(&ca, "a1", "r1", &[], Some(topology.clone()), 1).await;
    let a2 = start(&ca, "a2", "r1", &[&a1], Some(topology.clone()), 1).await;
    let a3 = start(&ca, "a3", "r1", &[&a1], Some(topology.clone()), 1).await;
    let b1 = start(&ca, "b1", "r2", &[&a1], Some(topology.clone()), 1).await;
    let b2 = start(&ca, "b2", "r2", &[&a1], Some(topology.clone()), 1).await;
    let b3 = start(&ca, "b3", "r2", &[&a1], Some(topology.clone()), 1).await;
    let all = [&a1, &a2, &a3, &b1, &b2, &b3];
    wait_members(&all, 6).await;
    let r1 = [&a1, &a2, &a3];
    let r2 = [&b1, &b2, &b3];
    let home_in = |region: &[&TestNode; 3], key: &ChannelKey| -> String {
        let asker = region[0];
        asker
            .cluster
            .replication()
            .home_of(key)
            .unwrap_or_else(|| asker.name.clone())
    };
    // A channel whose homes are neither a1/b1 (the publishers) nor a2/b3 (subscribers):
    // then a3 or b2 is each region's home, and the other kind of node exists too.
    let key = (0..1000)
        .map(|n| ChannelKey::new("app", &format!("sparse-{n}")))
        .find(|k| home_in(&r1, k) == "a3" && home_in(&r2, k) == "b2")
        .expect("some channel has these homes");
    let east = subscribe(&a2, &key, "east-subscriber").await;
    let west = subscribe(&b3, &key, "west-subscriber").await;
    wait_for("interest known", 10, || {
        a1.cluster.replication().knows_interest("a2", &key)
            && b2.cluster.replication().knows_interest("b3", &key)
            && b1.cluster.replication().knows_interest("b3", &key)
    })
    .await;

    let mut published: Vec<(String, Vec<String>)> =
        vec![("a1".into(), Vec::new()), ("b1".into(), Vec::new())];
    let mut relayed = 0;
    for n in 0..300 {
        for (i, node) in [&a1, &b1].iter().enumerate() {
            let name = format!("{}/{n}", node.name);
            publish_on(node, &key, &name);
            published[i].1.push(name);
        }
        if n == 150 {
            relayed = b2.cluster.replication().events_sent_to("b3");
            b2.cluster.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        relayed > 100,
        "r1's messages reached b3 through r2's home while it lived ({relayed} relayed)"
    );
    wait_for("both subscribers", 30, || {
        east.len() >= 600 && west.len() >= 600
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (who, recorder) in [("a2", &east), ("b3", &west)] {
        let got = recorder.names();
        assert_eq!(got.len(), 600, "{who}: every message exactly once");
        for (origin, names) in &published {
            let from_origin: Vec<&String> = got
                .iter()
                .filter(|n| n.starts_with(&format!("{origin}/")))
                .collect();
            assert_eq!(
                from_origin,
                names.iter().collect::<Vec<_>>(),
                "{who}: {origin}'s messages in order"
            );
        }
    }
}

/// A peer whose history store lost a write after its link from the origin began does
/// not acknowledge that link's events as stored any more: with ack_replicas = 1 the
/// origin's wait for a replica times out (false) instead of confirming an event the
/// peer may not have stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_lost_a_write_does_not_acknowledge_it() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, "a", "r1", &[], None, 1).await;
    let b = start(&ca, "b", "r2", &[&a], None, 1).await;
    wait_members(&[&a, &b], 2).await;
    let replicated = |name: &str| {
        publish(&a, name.into());
        let (tx, rx) = tokio::sync::oneshot::channel();
        a.cluster.replication().after_replicated(
            Some(&room()),
            Box::new(move |ok| {
                let _ = tx.send(ok);
            }),
        );
        rx
    };
    let first = tokio::time::timeout(Duration::from_secs(10), replicated("a/0"));
    assert!(first.await.unwrap().unwrap(), "stored on b: acknowledged");

    b.store.lose_a_write();
    let second = tokio::time::timeout(Duration::from_secs(20), replicated("a/1"));
    assert!(
        !second.await.unwrap().unwrap(),
        "b lost a write after the link began: a/1 must not count as stored there"
    );
    assert_eq!(
        b.recorder.names(),
        vec!["a/0", "a/1"],
        "delivered all the same"
    );
}
