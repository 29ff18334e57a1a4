//! Two nodes over real QUIC on loopback with mutual TLS: events published on one are
//! applied on the other, in order; a node with a certificate from another CA is refused;
//! a link counts only the events it wrote and says when its connection closed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_cluster::link::LinkEndpoint;
use tern_cluster::tls::ClusterCa;
use tern_cluster::wire::{EventV1, FrameV1};
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, RemoteOutcome,
    Subscriber,
};
use tern_protocol::{flags, Data, Message};

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut got = self.0.lock().unwrap();
        got.extend(
            event
                .frame
                .messages
                .iter()
                .flatten()
                .map(|m| m.name.clone().unwrap_or_default()),
        );
        true
    }
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// 200 events published on node A cross one QUIC link and reach a subscriber on node B
/// exactly once, in order, with binary data intact; B's cursor equals A's.
#[tokio::test]
async fn events_cross_a_mutual_tls_quic_link_in_order() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let a = LinkEndpoint::bind(loopback(), &ca.issue("a").unwrap()).unwrap();
    let b = LinkEndpoint::bind(loopback(), &ca.issue("b").unwrap()).unwrap();
    let b_addr = b.local_addr().unwrap();

    let key = ChannelKey::new("app", "room");
    let hub_a = Hub::new(OriginId(1), CoreLimits::default());
    let hub_b = Arc::new(Hub::new(OriginId(2), CoreLimits::default()));
    let recorder = Arc::new(Recorder::default());
    let options = AttachOptions {
        modes: flags::SUBSCRIBE,
        echo: true,
        resume_from: None,
        rewind: None,
        delta: false,
    };
    hub_b
        .attach(&key, "sub".into(), options, recorder.clone(), |_| {}, 0)
        .unwrap();

    let receiver_hub = hub_b.clone();
    let receiver_key = key.clone();
    let receiving = tokio::spawn(async move {
        let mut link = b.accept().await.unwrap();
        let mut applied = 0;
        while let Some(frame) = link.recv().await.unwrap() {
            let FrameV1::Event(event) = frame else {
                panic!("unexpected frame")
            };
            let outcome = receiver_hub
                .apply_remote(&receiver_key, event.to_remote().unwrap(), 0)
                .unwrap();
            assert_eq!(outcome, RemoteOutcome::Applied(1));
            applied += 1;
        }
        applied
    });

    let mut link = a.connect(b_addr, "b").await.unwrap();
    for i in 0..200u64 {
        let publisher = Publisher {
            connection_id: Some("pub".into()),
            frame_id: format!("pub:{i}"),
        };
        let message = Message {
            name: Some(format!("m{i}")),
            data: Some(Data::Binary(vec![i as u8, 0, 255].into())),
            ..Default::default()
        };
        let outcome = hub_a.publish(&key, &publisher, vec![message], 1).unwrap();
        let event = outcome.event.unwrap();
        link.send(&FrameV1::Event(EventV1::from_event("app", "room", &event)))
            .await
            .unwrap();
    }
    link.finish().await.unwrap();
    let applied = tokio::time::timeout(Duration::from_secs(20), receiving)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied, 200);
    let expected: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(*recorder.0.lock().unwrap(), expected);
    assert_eq!(hub_b.cursor(&key), hub_a.cursor(&key));
}

/// A node whose certificate comes from a different CA cannot open a link, even when it
/// trusts the cluster CA itself: the server side verifies client certificates.
#[tokio::test]
async fn a_node_from_another_ca_is_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let stranger_ca = ClusterCa::generate().unwrap();
    let member = LinkEndpoint::bind(loopback(), &ca.issue("member").unwrap()).unwrap();
    let mut identity = stranger_ca.issue("stranger").unwrap();
    identity.ca = ca.issue("stranger").unwrap().ca;
    let stranger = LinkEndpoint::bind(loopback(), &identity).unwrap();
    let addr = member.local_addr().unwrap();
    let accepting = tokio::spawn(async move { member.accept().await.map(|_| ()) });
    // In TLS 1.3 the client may finish its side before the server rejects its
    // certificate, so the refusal shows on the server, and the link is unusable.
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let mut link = stranger.connect(addr, "member").await?;
        let frame = FrameV1::Repair {
            app: "a".into(),
            channel: "c".into(),
            origin: 1,
            from: 1,
            to: 1,
        };
        link.send(&frame).await?;
        link.finish().await
    })
    .await
    .unwrap();
    assert!(
        attempt.is_err(),
        "a stranger's link must not deliver anything"
    );
    // The server refuses the stranger's certificate during the handshake: no link
    // from it ever reaches `accept`.
    match tokio::time::timeout(Duration::from_secs(2), accepting).await {
        Err(_elapsed) => {}
        Ok(accepted) => assert!(
            accepted.unwrap().is_err(),
            "the server must refuse the stranger's certificate"
        ),
    }
}

/// A frame over the limit the receiver enforces is refused by the sender before a byte
/// is written, and the link stays usable: the next frame arrives and nothing else.
#[tokio::test]
async fn an_oversized_frame_is_not_sent_and_the_link_survives() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let a = LinkEndpoint::bind(loopback(), &ca.issue("a").unwrap()).unwrap();
    let b = LinkEndpoint::bind(loopback(), &ca.issue("b").unwrap()).unwrap();
    let b_addr = b.local_addr().unwrap();
    let receiving = tokio::spawn(async move {
        let mut link = b.accept().await.unwrap();
        let mut frames = Vec::new();
        while let Some(frame) = link.recv().await.unwrap() {
            frames.push(frame);
        }
        frames
    });
    let mut link = a.connect(b_addr, "b").await.unwrap();
    let event = |frame_len: usize| {
        FrameV1::Event(EventV1 {
            app: "app".into(),
            channel: "room".into(),
            origin: 1,
            seq: 1,
            publisher: None,
            frame: vec![7; frame_len],
            link_seq: 1,
        })
    };
    let refused = link.send(&event(tern_cluster::wire::FRAME_BYTES_MAX)).await;
    assert!(
        matches!(refused, Err(tern_cluster::ClusterError::FrameTooLarge(_))),
        "{refused:?}"
    );
    link.send(&event(3)).await.unwrap();
    link.finish().await.unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(10), receiving)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frames, vec![event(3)]);
}

/// A link counts an event as written only when a flush wrote it, and tells its sender
/// when its connection closes: the replicator counts what crossed (`events_sent_to`) and
/// reconnects an idle link before queueing more into a dead stream.
#[tokio::test]
async fn a_closed_link_says_so_and_counts_only_what_it_wrote() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate().unwrap();
    let a = LinkEndpoint::bind(loopback(), &ca.issue("a").unwrap()).unwrap();
    let b = LinkEndpoint::bind(loopback(), &ca.issue("b").unwrap()).unwrap();
    let key = ChannelKey::new("app", "room");
    let hub = Hub::new(OriginId(1), CoreLimits::default());
    let event = |i: u64| {
        let publisher = Publisher {
            connection_id: Some("pub".into()),
            frame_id: format!("pub:{i}"),
        };
        let message = Message {
            name: Some(format!("m{i}")),
            ..Default::default()
        };
        let event = hub
            .publish(&key, &publisher, vec![message], 1)
            .unwrap()
            .event;
        FrameV1::Event(EventV1::from_event("app", "room", &event.unwrap()))
    };

    let mut link = a.connect(b.local_addr().unwrap(), "b").await.unwrap();
    link.queue(&event(0)).await.unwrap();
    assert_eq!(link.events_written(), 0, "queued is not written");
    link.send(&event(1)).await.unwrap();
    assert_eq!(link.events_written(), 2);

    b.close();
    tokio::time::timeout(Duration::from_secs(10), link.closed())
        .await
        .expect("the link sees its connection close");
    link.queue(&event(2)).await.unwrap();
    assert!(link.flush().await.is_err(), "a closed link writes nothing");
    assert_eq!(link.events_written(), 2);
}
