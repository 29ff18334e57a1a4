//! Helpers shared by the cluster's socket tests: nodes assembled from a `Replicator`, a
//! `Hub` and a `LinkEndpoint` on loopback with their peers given by hand (no gossip, so
//! a test decides who knows whom), a raw peer that holds a real certificate of the
//! cluster CA but writes whatever bytes a test wants on its links, and a metrics recorder
//! so tests can read the counters the nodes keep.
#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tern_cluster::link::LinkEndpoint;
use tern_cluster::replicator::{PeerSpec, Replicator, ReplicatorConfig};
use tern_cluster::tls::{ClusterCa, NodeIdentity, NODE_NAME};
use tern_cluster::wire::{self, EventV1, FrameV1};
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, Subscriber,
};
use tern_protocol::{flags, Data, Message};

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Waits (polling, no fixed sleep) until `done`, failing after `secs`.
pub async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records the names of the messages a subscriber got, in order.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<String>>);

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut got = self.0.lock().unwrap();
        for m in event.frame.messages.iter().flatten() {
            got.push(m.name.clone().unwrap_or_default());
        }
        true
    }
}

impl Recorder {
    pub fn names(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A stable origin id per name.
pub fn origin_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// One node: hub, replicator (its journal) and QUIC endpoint, peers set by hand.
pub struct Node {
    pub name: String,
    pub region: String,
    pub hub: Arc<Hub>,
    pub replicator: Arc<Replicator>,
    pub endpoint: Arc<LinkEndpoint>,
    pub incarnation: u64,
}

impl Node {
    /// Starts node `name` of `region` with a certificate `ca` issues for `name`.
    pub fn start(ca: &ClusterCa, name: &str, region: &str, ack_replicas: usize) -> Node {
        Node::start_as(&ca.issue(name).unwrap(), name, region, ack_replicas)
    }

    /// Starts node `name` with the certificate of `identity` (whatever node it names).
    pub fn start_as(
        identity: &NodeIdentity,
        name: &str,
        region: &str,
        ack_replicas: usize,
    ) -> Node {
        let node = Node::bind(identity, name, region, ack_replicas);
        node.run();
        node
    }

    /// Node `name` with its QUIC endpoint bound but not replicating yet: peers' links
    /// connect and wait, unread, until [`Node::run`] (a node that is slow to start).
    pub fn bind(identity: &NodeIdentity, name: &str, region: &str, ack_replicas: usize) -> Node {
        Node::bind_with(identity, name, region, ack_replicas, false)
    }

    /// Starts node `name` speaking wire v1 only, as the release before wire v2 did.
    pub fn start_v1_only(ca: &ClusterCa, name: &str, region: &str, ack_replicas: usize) -> Node {
        let node = Node::bind_with(&ca.issue(name).unwrap(), name, region, ack_replicas, true);
        node.run();
        node
    }

    fn bind_with(
        identity: &NodeIdentity,
        name: &str,
        region: &str,
        ack_replicas: usize,
        v1_only: bool,
    ) -> Node {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let incarnation = 1;
        let origin = OriginId(origin_of(name));
        let replicator = Replicator::new(
            ReplicatorConfig {
                node_id: name.into(),
                incarnation,
                region: region.into(),
                ack_replicas,
                topology: None,
            },
            origin,
            None,
        );
        let hub = Arc::new(Hub::with_journal(
            origin,
            CoreLimits::default(),
            Some(replicator.clone()),
        ));
        let endpoint = if v1_only {
            LinkEndpoint::bind_v1_only(loopback(), identity)
        } else {
            LinkEndpoint::bind(loopback(), identity)
        };
        let endpoint = Arc::new(endpoint.unwrap());
        Node {
            name: name.into(),
            region: region.into(),
            hub,
            replicator,
            endpoint,
            incarnation,
        }
    }

    /// Starts replicating: accepts peers' links, applies and acknowledges what they send.
    pub fn run(&self) {
        self.replicator
            .start(self.endpoint.clone(), &self.hub, Arc::new(NoStore));
    }

    /// How other nodes know this one.
    pub fn spec(&self) -> PeerSpec {
        PeerSpec {
            node_id: self.name.clone(),
            incarnation: self.incarnation,
            region: self.region.clone(),
            quic: self.endpoint.local_addr().unwrap(),
            origin: self.hub.origin().0,
        }
    }

    /// A subscriber on `key`, recording message names.
    pub fn subscribe(&self, key: &ChannelKey) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder::default());
        let options = AttachOptions {
            modes: flags::SUBSCRIBE,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        };
        self.hub
            .attach(
                key,
                format!("{}-sub", self.name).into(),
                options,
                recorder.clone(),
                |_| {},
                now_ms(),
            )
            .unwrap();
        recorder
    }

    /// Publishes one message called `name` on `key`.
    pub fn publish(&self, key: &ChannelKey, name: &str) -> Arc<ChannelEvent> {
        publish_on(&self.hub, key, name)
    }

    /// Publishes `name` on `key` and waits until `ack_replicas` peers stored it.
    pub async fn publish_acked(&self, key: &ChannelKey, name: &str) -> bool {
        self.publish(key, name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.replicator.after_replicated(
            Some(key),
            Box::new(move |ok| {
                let _ = tx.send(ok);
            }),
        );
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .expect("the replica ack came or timed out within 15 s")
            .unwrap()
    }
}

/// Publishes one message called `name` on `key` of `hub`.
pub fn publish_on(hub: &Hub, key: &ChannelKey, name: &str) -> Arc<ChannelEvent> {
    let publisher = Publisher {
        connection_id: Some("publisher".into()),
        frame_id: format!("publisher:{name}"),
    };
    let message = Message {
        name: Some(name.into()),
        data: Some(Data::String("x".into())),
        ..Default::default()
    };
    hub.publish(key, &publisher, vec![message], now_ms())
        .unwrap()
        .event
        .unwrap()
}

/// A well-formed event of origin `hub` (a scratch hub standing for another node) as a
/// frame: published there, so its msgpack and sequence are what a real node sends.
pub fn event_frame(hub: &Hub, key: &ChannelKey, name: &str, link_seq: u64) -> FrameV1 {
    let event = publish_on(hub, key, name);
    let mut frame = EventV1::from_event(&key.app, &key.name, &event);
    frame.link_seq = link_seq;
    FrameV1::Event(frame)
}

/// A channel whose home in `node`'s region is `home` (by the node's own view).
pub fn channel_homed_at(node: &Node, home: &str, prefix: &str) -> ChannelKey {
    (0..10_000)
        .map(|n| ChannelKey::new("app", &format!("{prefix}-{n}")))
        .find(|key| {
            node.replicator
                .home_of(key)
                .as_deref()
                .unwrap_or(&node.name)
                == home
        })
        .expect("some channel has that home")
}

/// `version ‖ bincode` of `frame` behind its length prefix, as a link carries it.
pub fn framed(frame: &FrameV1) -> Vec<u8> {
    length_prefixed(&wire::encode(frame))
}

/// `body` behind a big-endian u32 length prefix.
pub fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A cluster member that holds a real certificate of the cluster CA but is driven by
/// the test: it opens links and writes any bytes on them, and collects every frame the
/// nodes send it (their answers, their `Hello`s, their events).
pub struct RawPeer {
    pub name: String,
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
    /// Frames the nodes sent this peer, in arrival order.
    pub received: Arc<Mutex<Vec<FrameV1>>>,
}

impl RawPeer {
    /// A raw peer presenting `identity`'s certificate (whatever node it names).
    pub fn bind(name: &str, identity: &NodeIdentity) -> RawPeer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = QuicServerConfig::try_from(identity.server_config().unwrap()).unwrap();
        let client = QuicClientConfig::try_from(identity.client_config().unwrap()).unwrap();
        let mut endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(server)),
            loopback(),
        )
        .unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepting = endpoint.clone();
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if let Ok(connection) = incoming.await {
                    tokio::spawn(collect_streams(connection, sink.clone()));
                }
            }
        });
        RawPeer {
            name: name.into(),
            addr: endpoint.local_addr().unwrap(),
            endpoint,
            received,
        }
    }

    /// How nodes know this peer (its QUIC address is its raw endpoint).
    pub fn spec(&self, region: &str) -> PeerSpec {
        PeerSpec {
            node_id: self.name.clone(),
            incarnation: 1,
            region: region.into(),
            quic: self.addr,
            origin: origin_of(&self.name),
        }
    }

    /// Dials `to` (the node then links back on this same connection).
    pub async fn dial(&self, to: SocketAddr) -> quinn::Connection {
        let connection = self.endpoint.connect(to, NODE_NAME).unwrap().await.unwrap();
        tokio::spawn(collect_streams(connection.clone(), self.received.clone()));
        connection
    }

    /// The frames received so far that `pick` selects.
    pub fn received<T>(&self, pick: impl Fn(&FrameV1) -> Option<T>) -> Vec<T> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter_map(pick)
            .collect()
    }

    /// The `Hello` a node sends this peer (its incarnation and link epoch), once it came.
    pub async fn hello_from(&self, node: &str) -> (u64, u64) {
        let mut found = None;
        wait_for("the node's Hello", 10, || {
            found = self
                .received(|f| match f {
                    FrameV1::Hello {
                        node_id,
                        incarnation,
                        epoch,
                        ..
                    } if node_id == node => Some((*incarnation, *epoch)),
                    _ => None,
                })
                .last()
                .copied();
            found.is_some()
        })
        .await;
        found.unwrap()
    }
}

/// Reads every stream the other side opens on `connection`, frame by frame.
async fn collect_streams(connection: quinn::Connection, sink: Arc<Mutex<Vec<FrameV1>>>) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let sink = sink.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 4];
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                match wire::decode(&body) {
                    Ok(frame) => sink.lock().unwrap().push(frame),
                    Err(err) => panic!("a node sent bytes that are not a frame: {err}"),
                }
            }
        });
    }
}

/// Counters the code under test increments, by name and labels, for this test binary.
#[derive(Default)]
pub struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

fn counter_key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let name = counter_key(key.name(), &labels);
        let cell = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(cell)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// This test binary's counters (installed as the global recorder on first use; call it
/// before starting nodes so no increment is missed).
pub fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(counters).expect("no other recorder in this test binary");
        counters
    })
}

impl Counters {
    /// The counter `name{labels}` now (0 if never incremented).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&counter_key(name, labels))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The counter `name` summed over all its labels.
    #[allow(dead_code)]
    pub fn total(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// A node without a history store: everything journaled is "committed" at once and no
/// write is ever lost.
pub struct NoStore;

impl tern_cluster::replicator::LocalStore for NoStore {
    fn lost_writes(&self) -> u64 {
        0
    }

    fn after_committed(&self, _since: u64, then: Box<dyn FnOnce(bool) + Send>) {
        then(true);
    }
}

/// Node v, and a raw peer e (region r1) whose connection v has taken and whose link
/// from v has said `Hello`.
pub async fn node_and_raw_peer() -> (Node, RawPeer, quinn::Connection) {
    let ca = ClusterCa::generate().unwrap();
    let v = Node::start(&ca, "v", "r1", 0);
    let e = RawPeer::bind("e", &ca.issue("e").unwrap());
    let connection = e.dial(v.endpoint.local_addr().unwrap()).await;
    wait_for("v to take e's connection", 10, || {
        v.endpoint.peer_nodes() == [("e".to_string(), e.addr)]
    })
    .await;
    v.replicator.set_peers(&[e.spec("r1")]);
    e.hello_from("v").await;
    (v, e, connection)
}

/// e's link to v, its `Hello` written (link positions from 1).
pub async fn link_from_e(connection: &quinn::Connection) -> quinn::SendStream {
    let mut link = connection.open_uni().await.unwrap();
    let hello = FrameV1::Hello {
        node_id: "e".into(),
        incarnation: 1,
        origin: origin_of("e"),
        epoch: 1,
        first: 1,
    };
    link.write_all(&framed(&hello)).await.unwrap();
    link
}
