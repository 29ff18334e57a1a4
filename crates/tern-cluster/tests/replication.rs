//! Three in-process nodes replicating over real mutual-TLS QUIC links on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_cluster::link::LinkEndpoint;
use tern_cluster::replicator::{spawn_replication, ReplicationJournal};
use tern_cluster::tls::ClusterCa;
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, Subscriber,
};
use tern_protocol::{flags, Data, Message};

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

/// Messages published on all three nodes reach the subscriber on every node: each
/// exactly once, each origin's messages in order, and all cursors end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_every_message_once_in_origin_order() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let key = ChannelKey::new("app", "room");
    let endpoints: Vec<Arc<LinkEndpoint>> = (0..3)
        .map(|_| {
            Arc::new(
                LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), &ca.issue().unwrap()).unwrap(),
            )
        })
        .collect();
    let addrs: Vec<_> = endpoints.iter().map(|e| e.local_addr().unwrap()).collect();
    let mut hubs = Vec::new();
    let mut recorders = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let origin = OriginId(100 + i as u64);
        let journal = ReplicationJournal::new(origin, None);
        let hub = Arc::new(Hub::with_journal(
            origin,
            CoreLimits::default(),
            Some(journal.clone()),
        ));
        let recorder = Arc::new(Recorder::default());
        let options = AttachOptions {
            modes: flags::SUBSCRIBE,
            echo: true,
            resume_from: None,
            rewind: None,
        };
        hub.attach(
            &key,
            format!("sub-{i}").into(),
            options,
            recorder.clone(),
            |_| {},
            0,
        )
        .unwrap();
        let peers = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| *a)
            .collect();
        spawn_replication(endpoint.clone(), hub.clone(), journal, peers);
        hubs.push(hub);
        recorders.push(recorder);
    }
    let per_node = 100;
    for n in 0..per_node {
        for (i, hub) in hubs.iter().enumerate() {
            let publisher = Publisher {
                connection_id: Some(format!("c{i}").into()),
                frame_id: format!("c{i}:{n}"),
            };
            let message = Message {
                name: Some(format!("n{i}-{n}")),
                data: Some(Data::String("x".into())),
                ..Default::default()
            };
            hub.publish(&key, &publisher, vec![message], 1).unwrap();
        }
    }
    let total = 3 * per_node;
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorders.iter().any(|r| r.0.lock().unwrap().len() < total) {
        assert!(Instant::now() < deadline, "replication did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for recorder in &recorders {
        let got = recorder.0.lock().unwrap();
        assert_eq!(got.len(), total, "no duplicates");
        for origin in 100..103 {
            let seqs: Vec<u64> = got
                .iter()
                .filter(|(o, _, _)| o.0 == origin)
                .map(|(_, s, _)| *s)
                .collect();
            assert_eq!(
                seqs,
                (1..=per_node as u64).collect::<Vec<_>>(),
                "origin {origin} in order"
            );
        }
    }
    let cursor = hubs[0].cursor(&key);
    assert!(hubs.iter().all(|h| h.cursor(&key) == cursor));
}

/// Events a peer never received (published before the link existed, as after a
/// partition) are repaired on the next event: the receiver reports the gap, the origin
/// answers from its log, and the subscriber gets everything once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_repaired_from_the_origin_log() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let key = ChannelKey::new("app", "gappy");
    let a_end =
        Arc::new(LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), &ca.issue().unwrap()).unwrap());
    let b_end =
        Arc::new(LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), &ca.issue().unwrap()).unwrap());
    let (a_addr, b_addr) = (a_end.local_addr().unwrap(), b_end.local_addr().unwrap());
    let a_journal = ReplicationJournal::new(OriginId(1), None);
    let hub_a = Arc::new(Hub::with_journal(
        OriginId(1),
        CoreLimits::default(),
        Some(a_journal.clone()),
    ));
    let b_journal = ReplicationJournal::new(OriginId(2), None);
    let hub_b = Arc::new(Hub::with_journal(
        OriginId(2),
        CoreLimits::default(),
        Some(b_journal.clone()),
    ));
    let recorder = Arc::new(Recorder::default());
    let options = AttachOptions {
        modes: flags::SUBSCRIBE,
        echo: true,
        resume_from: None,
        rewind: None,
    };
    hub_b
        .attach(&key, "sub".into(), options, recorder.clone(), |_| {}, 0)
        .unwrap();
    let publish = |n: u64| {
        let publisher = Publisher {
            connection_id: Some("p".into()),
            frame_id: format!("p:{n}"),
        };
        let message = Message {
            name: Some(format!("m{n}")),
            ..Default::default()
        };
        hub_a.publish(&key, &publisher, vec![message], 1).unwrap();
    };
    for n in 0..10 {
        publish(n); // no links yet: B misses these
    }
    spawn_replication(a_end, hub_a.clone(), a_journal, vec![b_addr]);
    spawn_replication(b_end, hub_b.clone(), b_journal, vec![a_addr]);
    for n in 10..15 {
        publish(n);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.0.lock().unwrap().len() < 15 {
        assert!(Instant::now() < deadline, "gap was not repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let names: Vec<String> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, n)| n.clone())
        .collect();
    assert_eq!(names, (0..15).map(|n| format!("m{n}")).collect::<Vec<_>>());
    assert_eq!(hub_b.cursor(&key), hub_a.cursor(&key));
}
