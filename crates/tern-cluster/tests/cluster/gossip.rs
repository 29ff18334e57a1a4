//! Gossip that is not authentic (another key, forged, truncated) is dropped and counted,
//! and the cluster carries on.

use super::*;

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
