//! A crashed origin's gap that nobody can fill (`tern_replication::stalls`), over real
//! QUIC: a raw peer e relays events 2 and 3 of member d's origin, and event 1 never
//! comes from anyone. The node asks e for it and holds 2 and 3 back. d leaves the
//! membership: the node waits, however long (d may be behind a partition, its link
//! holding event 1). d comes back as another incarnation (it crashed): once the gap has
//! stood still and d's first origin has been gone for `GAP_GIVE_UP` (the driver's clock
//! moved by a test hook), the node skips 1 and its subscriber gets 2 and 3, in order,
//! once each. A live origin's gap (e's own) is never given up: its link resends. Each
//! gap is asked for once, for its hole alone, and an event behind a gap already asked
//! for within a round trip asks nothing more.

mod common;

use std::time::Duration;

use common::{event_frame, framed, origin_of, wait_for};
use tern_cluster::replicator::PeerSpec;
use tern_cluster::wire::FrameV1;
use tern_core::{ChannelKey, CoreLimits, Hub, OriginId};
use tern_replication::stalls::GAP_GIVE_UP;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origins_gap_nobody_fills_is_given_up() {
    let (v, e, connection) = common::node_and_raw_peer().await;
    // d, a member of r2 (its address answers nothing: its links never come up).
    let d_as = |origin: u64, incarnation: u64| PeerSpec {
        node_id: "d".into(),
        incarnation,
        region: "r2".into(),
        quic: common::loopback(),
        origin,
    };
    let first = origin_of("d");
    v.replicator.set_peers(&[e.spec("r1"), d_as(first, 1)]);
    let key = ChannelKey::new("app", "stalled");
    let seen = v.subscribe(&key);
    let d = OriginId(origin_of("d"));
    let dead = Hub::new(d, CoreLimits::default());
    let own = Hub::new(OriginId(origin_of("e")), CoreLimits::default());
    let mut frames = Vec::new();
    for n in 1..=3 {
        frames.push(event_frame(&dead, &key, &format!("d{n}"), 0));
        frames.push(event_frame(&own, &key, &format!("e{n}"), 0));
    }
    // d's 2 and 3 as answers (off the link's order), and e's own 2 and 3 on its link.
    let mut link = common::link_from_e(&connection).await;
    for (i, frame) in frames.iter().enumerate() {
        let FrameV1::Event(event) = frame else {
            unreachable!()
        };
        let (is_d, n) = (i % 2 == 0, i / 2 + 1);
        if n == 1 {
            continue;
        }
        let mut event = event.clone();
        event.link_seq = if is_d { 0 } else { n as u64 - 1 };
        link.write_all(&framed(&FrameV1::Event(event)))
            .await
            .unwrap();
    }
    let asked = || {
        e.received(|f| match f {
            FrameV1::Repair {
                origin, from, to, ..
            } => Some((*origin, *from, *to)),
            _ => None,
        })
    };
    wait_for("v to ask e for both gaps", 10, || asked().len() >= 2).await;
    // Each gap asked once, for its hole: 3 waits right behind 2, so it reports the hole
    // 2 left, already asked (it reported 1..=2 before, and asked again).
    let e_origin = origin_of("e");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(asked().len(), 2, "{:?}", asked());
    assert!(asked().contains(&(d.0, 1, 1)), "{:?}", asked());
    assert!(asked().contains(&(e_origin, 1, 1)), "{:?}", asked());
    // d3 again, behind the same gap, within a round trip: not asked again
    // (`repair::Asked`; each answer would carry the whole range).
    let FrameV1::Event(mut again) = frames[4].clone() else {
        unreachable!()
    };
    again.link_seq = 0;
    link.write_all(&framed(&FrameV1::Event(again)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(asked().len(), 2, "{:?}", asked());
    assert!(seen.names().is_empty(), "held back: {:?}", seen.names());

    // d leaves: gone, not known to have crashed, so it is waited for.
    v.replicator.set_peers(&[e.spec("r1")]);
    v.replicator.skip_dead_gaps_after(Duration::ZERO);
    v.replicator.skip_dead_gaps_after(GAP_GIVE_UP * 10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.names().is_empty(),
        "d may be partitioned: {:?}",
        seen.names()
    );

    // d is back as another incarnation: not before its first origin has been gone, and
    // the gap still, for GAP_GIVE_UP.
    v.replicator
        .set_peers(&[e.spec("r1"), d_as(origin_of("d again"), 2)]);
    v.replicator
        .skip_dead_gaps_after(GAP_GIVE_UP - Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.names().is_empty(), "too soon: {:?}", seen.names());

    v.replicator
        .skip_dead_gaps_after(GAP_GIVE_UP + Duration::from_secs(1));
    wait_for("d2 and d3 delivered", 10, || seen.names().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.names(), ["d2", "d3"], "e's own gap waits for its link");
    assert_eq!(v.hub.held_back(&key, d), None);
    assert_eq!(
        v.hub.held_back(&key, OriginId(origin_of("e"))),
        Some((0, 2))
    );
}
