//! Replication across regions: joining by one seed over lossy links, partitions, a
//! killed origin after replica acks, a dead node's presence, relays, replica acks and a
//! peer whose store lost a write. Each test counts messages.

use super::*;

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
