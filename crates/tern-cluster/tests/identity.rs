//! A link's node id comes from the peer's certificate, not from what the peer says: a
//! member with a valid certificate for one node cannot speak for another over real QUIC
//! on loopback (its `Hello` is refused, its acks count for nobody), a certificate that
//! names no node links to nobody, and a dial that reaches another node than gossip
//! said opens no link.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{counters, framed, wait_for, Node, RawPeer};
use tern_cluster::link::LinkEndpoint;
use tern_cluster::tls::{ClusterCa, NodeIdentity, NODE_NAME};
use tern_cluster::wire::FrameV1;
use tern_core::ChannelKey;

const REFUSED: &str = "tern_cluster_hello_refused_total";

/// Member "b" (a valid certificate, for "b") opens a link to "v" saying it is "a" and
/// acknowledges, as "a", the event "v" is waiting for "a" to store. "v" closes b's
/// connection and counts it; the publish is not acknowledged on b's word: only once the
/// real "a" (slow to start) has stored it, and "a"'s own link and events are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_another_node_is_refused_and_the_real_node_is_unaffected() {
    let counters = counters();
    let ca = ClusterCa::generate().unwrap();
    let v = Node::start(&ca, "v", "r1", 1);
    // The real "a": its endpoint is up (v's link connects) but it reads nothing yet.
    let a = Node::bind(&ca.issue("a").unwrap(), "a", "r2", 1);
    v.replicator.set_peers(&[a.spec()]);
    let key = ChannelKey::new("app", "room");
    let on_a = a.subscribe(&key);
    let on_v = v.subscribe(&key);

    v.publish(&key, "v/0");
    let acked = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let flag = acked.clone();
    v.replicator.after_replicated(
        Some(&key),
        Box::new(move |ok| {
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(ok);
        }),
    );

    // "b" says it is "a", then acks v's first link positions on every early epoch.
    let b = RawPeer::bind("b", &ca.issue("b").unwrap());
    let connection = b.dial(v.endpoint.local_addr().unwrap()).await;
    let mut link = connection.open_uni().await.unwrap();
    let hello = FrameV1::Hello {
        node_id: "a".into(),
        incarnation: a.incarnation,
        origin: a.hub.origin().0,
        epoch: 1,
        first: 1,
    };
    let mut bytes = framed(&hello);
    for epoch in 1..=4 {
        bytes.extend(framed(&FrameV1::Stored {
            incarnation: v.incarnation,
            epoch,
            upto: 1,
        }));
    }
    link.write_all(&bytes).await.unwrap();
    wait_for("v to act on b's claim", 10, || {
        connection.close_reason().is_some() || acked.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        !acked.load(Ordering::SeqCst),
        "b's acks counted as a's: the publish was acknowledged though a stored nothing"
    );
    let refusal = connection.close_reason().unwrap();
    assert!(
        matches!(&refusal, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"hello names another node"),
        "{refusal:?}"
    );
    assert_eq!(counters.get(REFUSED, &[("reason", "node_id_mismatch")]), 1);

    // The real "a" starts: it stores the event, acks it, and its own events reach v.
    a.run();
    a.replicator.set_peers(&[v.spec()]);
    let ok = tokio::time::timeout(Duration::from_secs(15), rx)
        .await
        .unwrap()
        .unwrap();
    assert!(ok, "acknowledged once a stored it");
    assert_eq!(on_a.names(), vec!["v/0".to_string()]);
    assert!(a.publish_acked(&key, "a/0").await, "a's own link acks");
    wait_for("a's event on v", 10, || on_v.names().len() == 2).await;
    assert_eq!(on_v.names(), vec!["v/0".to_string(), "a/0".to_string()]);
    assert_eq!(
        counters.get(REFUSED, &[("reason", "node_id_mismatch")]),
        1,
        "the real a was never refused"
    );
}

/// A certificate signed by the cluster CA but naming no node (as `tern certs` made them
/// before node ids) cannot bind an endpoint, and a peer presenting one has its
/// connection closed as soon as the handshake completes; counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_a_node_id_links_to_nobody() {
    let counters = counters();
    let ca = ClusterCa::generate().unwrap();
    let legacy = legacy_identity(&ca);
    let _ = rustls::crypto::ring::default_provider().install_default();
    assert!(
        LinkEndpoint::bind(common::loopback(), &legacy).is_err(),
        "a node cannot start with it"
    );
    let v = Node::start(&ca, "v", "r1", 1);
    let old = RawPeer::bind("old", &legacy);
    let connection = old.dial(v.endpoint.local_addr().unwrap()).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("v closes the connection");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"certificate names no node"),
        "{closed:?}"
    );
    assert_eq!(counters.get(REFUSED, &[("reason", "no_node_id")]), 1);
}

/// Gossip says node "a" is at an address where member "b" answers (say b took a's old
/// port): v refuses to open a's link on b's connection (counted) and sends b nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_answered_by_another_node_opens_no_link() {
    let counters = counters();
    let ca = ClusterCa::generate().unwrap();
    let v = Node::start(&ca, "v", "r1", 1);
    let b = RawPeer::bind("b", &ca.issue("b").unwrap());
    let mut stale = b.spec("r2");
    stale.node_id = "a".into();
    v.replicator.set_peers(&[stale]);
    v.publish(&ChannelKey::new("app", "room"), "v/0");
    let nothing_for_b = || b.received(|f| Some(f.clone())).is_empty();
    wait_for("the refusal, or a's frames on b", 10, || {
        counters.get(REFUSED, &[("reason", "dialed_other_node")]) >= 1 || !nothing_for_b()
    })
    .await;
    assert!(nothing_for_b(), "b got frames meant for a");
    // v keeps retrying a's link (every 200 ms) and refusing it each time.
    let before = counters.get(REFUSED, &[("reason", "dialed_other_node")]);
    wait_for("a retry, refused again", 10, || {
        counters.get(REFUSED, &[("reason", "dialed_other_node")]) > before
    })
    .await;
    assert!(nothing_for_b(), "b got frames meant for a");
}

/// A certificate of the cluster CA in the shape `tern certs` issued before node ids: the
/// DNS name every node has, no `tern-node:` URI.
fn legacy_identity(ca: &ClusterCa) -> NodeIdentity {
    let (ca_pem, ca_key_pem) = ca.to_pem();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tern cluster CA");
    let issuer = rcgen::Issuer::new(ca_params, rcgen::KeyPair::from_pem(&ca_key_pem).unwrap());
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![NODE_NAME.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let identity = NodeIdentity::from_pem(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        ca_pem.as_bytes(),
    )
    .unwrap();
    assert!(identity.node_id().is_err(), "names no node");
    identity
}

/// A node that connects again from another address (as after a restart) replaces its
/// old connection, which v closes: one connection per node id, however many ports a
/// member dials from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_new_connection_replaces_its_old_one() {
    let ca = ClusterCa::generate().unwrap();
    let v = Node::start(&ca, "v", "r1", 1);
    let identity = ca.issue("b").unwrap();
    let first = RawPeer::bind("b", &identity);
    let second = RawPeer::bind("b", &identity);
    let v_addr = v.endpoint.local_addr().unwrap();
    let old = first.dial(v_addr).await;
    // b's dial returns when b's side of the handshake is done; v's side is done only once
    // b's last flight reached it, and v takes the connection then. Until it has, b's
    // second connection could finish its handshake on v first and be the one replaced.
    wait_for("v to take b's first connection", 10, || {
        v.endpoint.peer_nodes() == [("b".to_string(), first.addr)]
    })
    .await;
    let new = second.dial(v_addr).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), old.closed())
        .await
        .expect("v closes b's old connection");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason.as_ref() == b"replaced"),
        "{closed:?}"
    );
    assert!(new.close_reason().is_none(), "the new one stays");
    assert_eq!(
        v.endpoint.peer_nodes(),
        [("b".to_string(), second.addr)],
        "v links b on its new connection only"
    );
    wait_for("one connection", 10, || v.endpoint.connection_count() == 1).await;
}
