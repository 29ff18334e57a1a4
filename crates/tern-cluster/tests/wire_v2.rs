//! Wire v2 in a cluster in the middle of a rolling upgrade (issue 17): a node that
//! speaks only wire v1 (as the previous release does) and two that speak v2 replicate
//! with each other both ways, acks included, every message once and in order; the v2
//! pair finds out it can use v2 and does, and the v1 node is never sent a v2 record
//! (it would drop the link and count a refusal). Real QUIC on loopback.

mod common;

use common::{counters, wait_for, Node};
use tern_cluster::tls::ClusterCa;
use tern_core::ChannelKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_node_and_v2_nodes_replicate_both_ways() {
    let counters = counters();
    let ca = ClusterCa::generate().unwrap();
    let old = Node::start_v1_only(&ca, "old", "r1", 1);
    let a = Node::start(&ca, "a", "r2", 1);
    let b = Node::start(&ca, "b", "r3", 1);
    let nodes = [&old, &a, &b];
    let specs: Vec<_> = nodes.iter().map(|n| n.spec()).collect();
    for node in nodes {
        node.replicator.set_peers(&specs);
    }
    let key = ChannelKey::new("app", "upgrade");
    let subscribers: Vec<_> = nodes.iter().map(|n| n.subscribe(&key)).collect();
    let refused_before = counters.total("tern_cluster_frames_refused_total");
    let mut expected = Vec::new();
    for n in 0..30 {
        for node in nodes {
            let name = format!("{}/{n}", node.name);
            assert!(node.publish_acked(&key, &name).await, "{name} acked");
            expected.push(name);
        }
    }
    wait_for("every message everywhere", 20, || {
        subscribers
            .iter()
            .all(|s| s.names().len() == expected.len())
    })
    .await;
    // Once each, and in each origin's order (origins interleave as their acks race).
    for (node, subscriber) in nodes.iter().zip(&subscribers) {
        let got = subscriber.names();
        assert_eq!(got.len(), expected.len(), "on {}", node.name);
        for origin in nodes {
            let prefix = format!("{}/", origin.name);
            let of = |names: &[String]| -> Vec<String> {
                names
                    .iter()
                    .filter(|n| n.starts_with(&prefix))
                    .cloned()
                    .collect()
            };
            assert_eq!(
                of(&got),
                of(&expected),
                "{}'s on {}",
                origin.name,
                node.name
            );
        }
    }
    // The new nodes know each other as v2 and the old one as v1; the old node knows
    // nothing (it does not ask).
    // (The old node's answer never comes: its peers take it for v1 when their probe
    // times out.)
    wait_for("probes answered or timed out", 25, || {
        a.endpoint.peer_wire_versions() == [("b".to_string(), 2), ("old".to_string(), 1)]
            && b.endpoint.peer_wire_versions() == [("a".to_string(), 2), ("old".to_string(), 1)]
    })
    .await;
    assert_eq!(
        old.endpoint.peer_wire_versions(),
        [("a".to_string(), 0), ("b".to_string(), 0)]
    );
    assert_eq!(
        counters.total("tern_cluster_frames_refused_total"),
        refused_before,
        "no node refused a frame"
    );
}
