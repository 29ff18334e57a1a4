//! Routing by interest: a node receives a channel only while it has subscribers or is
//! its home, and a first subscriber's node gets the channel's state (presence members
//! older than the log, everything once when its region's home dies).

use super::*;

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
