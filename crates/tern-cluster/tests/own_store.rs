//! A gap a node's own store can fill: real QUIC on loopback, a raw peer that sends an
//! origin's events 1 and 3 and never answers the repair for 2 (as a node that died
//! before sending it), and a history store that holds event 2 (a copied history has it).
//! The node applies 2 from its own store, then 3, and its subscriber gets all three in
//! order, once each. And a repair asked of a node whose log has a hole its store holds,
//! or that reaches past its hub's cursor into what its store holds, is answered from
//! the store, not skipped or cut short. A restarted node that took its predecessor's
//! stored events back names their channels to every home.

mod common;

use std::sync::{Arc, Mutex};

use common::{event_frame, framed, origin_of, wait_for};
use tern_cluster::replicator::{HistoryAccess, StoredChannel};
use tern_cluster::wire::{FrameV1, ItemPosV1, ItemV1};
use tern_core::{ChannelKey, CoreLimits, Hub, OriginId, RemoteEvent};

/// A history store holding some events of one origin, and counting the reads of them.
struct Stored {
    origin: u64,
    events: Vec<RemoteEvent>,
    reads: Mutex<Vec<(u64, u64)>>,
    /// What a listing of the stored channels gives (the handoff's page).
    listed: Vec<StoredChannel>,
}

impl HistoryAccess for Stored {
    fn cursor(&self, _: &str, _: &str) -> Vec<(u64, u64)> {
        let upto = self.events.iter().map(|e| e.seq).max().unwrap_or(0);
        vec![(self.origin, upto)]
    }

    fn page(
        &self,
        _: &str,
        _: &str,
        _: bool,
        _: Option<ItemPosV1>,
        _: usize,
    ) -> (Vec<ItemV1>, bool) {
        (Vec::new(), false)
    }

    fn put(&self, _: &str, _: &str, _: bool, _: Vec<ItemV1>) {}

    fn channels(&self, _: Option<Vec<u8>>, _: usize) -> (Vec<StoredChannel>, Option<Vec<u8>>) {
        (self.listed.clone(), None)
    }

    fn events(&self, _: &str, _: &str, origin: u64, from: u64, to: u64) -> (Vec<RemoteEvent>, u64) {
        self.reads.lock().unwrap().push((from, to));
        let events = self
            .events
            .iter()
            .filter(|e| origin == self.origin && (from..=to).contains(&e.seq))
            .cloned()
            .collect();
        (events, from)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_nodes_own_store_holds_is_filled_from_it() {
    let (v, e, connection) = common::node_and_raw_peer().await;

    // e's origin publishes m1, m2 and m3; v's store holds m2 (copied history).
    let key = ChannelKey::new("app", "gap");
    let source = Hub::new(OriginId(origin_of("e")), CoreLimits::default());
    let frames: Vec<FrameV1> = (1..=3)
        .map(|n| event_frame(&source, &key, &format!("m{n}"), n))
        .collect();
    let stored = source.events_of(&key, OriginId(origin_of("e")), 2, 2);
    let history = Arc::new(Stored {
        origin: origin_of("e"),
        events: stored.iter().map(|e| RemoteEvent::from_event(e)).collect(),
        reads: Mutex::new(Vec::new()),
        listed: Vec::new(),
    });
    v.replicator.set_history(history.clone());
    let seen = v.subscribe(&key);

    // The link carries m1 and m3 (link positions 1 and 3); m2 never comes.
    let mut link = common::link_from_e(&connection).await;
    link.write_all(&framed(&frames[0])).await.unwrap();
    link.write_all(&framed(&frames[2])).await.unwrap();

    wait_for("v's subscriber to get m1, m2 and m3", 10, || {
        seen.names().len() >= 3
    })
    .await;
    assert_eq!(seen.names(), ["m1", "m2", "m3"]);
    assert_eq!(
        *history.reads.lock().unwrap(),
        [(2, 2)],
        "the gap, read once"
    );
    // v asked e too (e never answers).
    let asked = e.received(|f| match f {
        FrameV1::Repair { from, to, .. } => Some((*from, *to)),
        _ => None,
    });
    assert_eq!(asked, [(2, 2)]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(seen.names(), ["m1", "m2", "m3"], "nothing twice");
}

/// A repair asked of a node whose log has a hole its store holds (the channel was
/// dropped while idle and came back; here a skip over events its log never kept) is
/// answered with the stored events, not a `Skip` over them (the soak's seed 42605: a
/// restarted home was skipped past two messages, and its store never got them); and
/// what the request asks past the hub's cursor comes from the store (seed 114877).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_in_the_log_is_answered_from_the_store() {
    let (v, e, connection) = common::node_and_raw_peer().await;

    // A third origin, d, published m1 to m4. v's hub went past 1..=2 without logging
    // them and holds m3; v's store holds m1, m2 and m4 (a copied history reaches past
    // the hub).
    let key = ChannelKey::new("app", "hole");
    let d = OriginId(origin_of("d"));
    let source = Hub::new(d, CoreLimits::default());
    for n in 1..=4 {
        common::publish_on(&source, &key, &format!("m{n}"));
    }
    let event = |seq| RemoteEvent::from_event(&source.events_of(&key, d, seq, seq)[0]);
    let history = Arc::new(Stored {
        origin: d.0,
        events: vec![event(2), event(4), event(1)],
        reads: Mutex::new(Vec::new()),
        listed: Vec::new(),
    });
    v.replicator.set_history(history.clone());
    let _seen = v.subscribe(&key);
    v.hub.skip_remote(&key, d, 2, common::now_ms());
    v.hub
        .apply_remote(&key, event(3), common::now_ms())
        .unwrap();
    assert_eq!(
        v.hub.events_of(&key, d, 1, 3).len(),
        1,
        "the log holds m3 only"
    );

    let mut link = common::link_from_e(&connection).await;
    let repair = FrameV1::Repair {
        app: "app".into(),
        channel: "hole".into(),
        origin: d.0,
        from: 1,
        to: 4,
    };
    link.write_all(&framed(&repair)).await.unwrap();

    // The answer as `e<seq>` for an event and `s<upto>` for a `Skip`.
    let answer = || {
        e.received(|f| match f {
            FrameV1::Event(ev) if ev.origin == d.0 => Some(format!("e{}", ev.seq)),
            FrameV1::Skip { origin, upto, .. } if *origin == d.0 => Some(format!("s{upto}")),
            _ => None,
        })
    };
    wait_for("v's answer", 10, || answer().len() >= 4).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(answer(), ["e1", "e2", "e3", "e4"]);
    assert_eq!(
        *history.reads.lock().unwrap(),
        [(1, 2), (4, 4)],
        "the hole and what lies past the hub, read once each"
    );
}

/// A restarted node that took its predecessor's stored events back into its hub
/// (`recover`, here the call the server makes after it) names each stored channel
/// listing that origin to the channel's homes, after the settle time, though it found
/// its peers within the start-up window (seed 131187: its hub dropped the channel while
/// idle before any `Heads` named the adopted message, and no other store had it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_names_what_it_adopted_to_the_homes() {
    let (v, e, _connection) = common::node_and_raw_peer().await;
    let before = OriginId(origin_of("v-before"));
    let named = common::channel_homed_at(&v, "e", "adopted");
    let other = common::channel_homed_at(&v, "e", "never");
    v.replicator.set_history(Arc::new(Stored {
        origin: before.0,
        events: Vec::new(),
        reads: Mutex::new(Vec::new()),
        listed: vec![
            (named.clone(), vec![(before.0, 3), (origin_of("e"), 1)]),
            (other.clone(), vec![(origin_of("e"), 4)]),
        ],
    }));
    let heads = || {
        e.received(|f| match f {
            FrameV1::Heads { channels } => Some(
                channels
                    .iter()
                    .map(|h| (h.channel.clone(), h.origins.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .concat()
    };
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(heads().is_empty(), "finding e at start-up is no handoff");

    v.replicator.on_adopted(&[before.0]);
    wait_for("v to name the adopted channel to e", 10, || {
        !heads().is_empty()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        heads(),
        [(
            named.name.to_string(),
            vec![(before.0, 3), (origin_of("e"), 1)]
        )]
    );
}
