//! The bad-input catalogue at the cluster boundary: what a member with a valid
//! certificate can send a node on a link, and what the node does with it. Each row is
//! the bytes (or frames) written on a link to node "v" by a raw peer, and its exact
//! outcome:
//!
//! - *dropped*: the bytes are not a frame this node accepts: the link is dropped (the
//!   stream is stopped; a peer's well-formed links are unaffected) and the refusal is
//!   counted in `tern_cluster_frames_refused_total{reason}`;
//! - *ignored*: a well-formed frame that this node will not act on (before the link's
//!   `Hello`, undecodable inside, acking what was never sent, more work than it answers
//!   at once): counted in `tern_replication_frames_ignored_total{reason}`, and the link
//!   carries on;
//! - *handled*: a frame that is odd but legal (a repair of a range nobody has, a sync of
//!   a channel nobody holds) is answered as the protocol says, within its bounds, and
//!   creates nothing.
//!
//! After every row a probe event is sent (on the same link when it must still be up,
//! on a new one when it was dropped) and must reach v's subscriber, so no row stalls the
//! node; after the whole catalogue v still replicates with a well-behaved peer "w" both
//! ways, acks included. Real QUIC on loopback, real certificates of one cluster CA.
//!
//! This file is the bed and the one test; the rows are in `catalogue/`: `links.rs`,
//! `frames.rs` and `state.rs`.

mod common;
#[path = "catalogue/frames.rs"]
mod frames;
#[path = "catalogue/links.rs"]
mod links;
#[path = "catalogue/state.rs"]
mod state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{
    channel_homed_at, counters, event_frame, framed, length_prefixed, origin_of, wait_for,
    Counters, Node, RawPeer, Recorder,
};
use tern_cluster::replicator::HistoryAccess;
use tern_cluster::tls::ClusterCa;
use tern_cluster::wire::{self, EventV1, FrameV1, HeadV1, ItemPosV1, ItemV1, FRAME_BYTES_MAX};
use tern_core::{ChannelKey, CoreLimits, Hub, OriginId};

const REFUSED: &str = "tern_cluster_frames_refused_total";
const IGNORED: &str = "tern_replication_frames_ignored_total";

/// A history store that can be made slow: `page` waits while the gate is closed.
#[derive(Default)]
struct History {
    gate_closed: Mutex<bool>,
    gate: Condvar,
    /// Page reads running now, and how many ran in all.
    reading: AtomicUsize,
    pages: AtomicUsize,
    stored: Mutex<Vec<(String, Vec<ItemV1>)>>,
}

impl History {
    fn set_gate(&self, closed: bool) {
        *self.gate_closed.lock().unwrap() = closed;
        self.gate.notify_all();
    }
}

impl HistoryAccess for History {
    fn cursor(&self, _: &str, _: &str) -> Vec<(u64, u64)> {
        Vec::new()
    }

    fn page(
        &self,
        _: &str,
        _: &str,
        _: bool,
        _: Option<ItemPosV1>,
        _: usize,
    ) -> (Vec<ItemV1>, bool) {
        self.reading.fetch_add(1, Ordering::SeqCst);
        // Bounded, so a failing test cannot leave blocking threads (and the runtime's
        // shutdown) waiting forever.
        let closed = self.gate_closed.lock().unwrap();
        let (closed, _) = self
            .gate
            .wait_timeout_while(closed, Duration::from_secs(20), |closed| *closed)
            .unwrap();
        drop(closed);
        self.reading.fetch_sub(1, Ordering::SeqCst);
        self.pages.fetch_add(1, Ordering::SeqCst);
        (Vec::new(), false)
    }

    fn put(&self, _: &str, channel: &str, _: bool, items: Vec<ItemV1>) {
        self.stored
            .lock()
            .unwrap()
            .push((channel.to_string(), items));
    }

    fn channels(
        &self,
        _: Option<Vec<u8>>,
        _: usize,
    ) -> (
        Vec<tern_cluster::replicator::StoredChannel>,
        Option<Vec<u8>>,
    ) {
        (Vec::new(), None)
    }
}

/// Node "v" (r1) under test, well-behaved "w" (r2), and two raw members: "e" of v's
/// region (its interest counts) and "f" of r3 (the home v copies history from).
struct Bed {
    counters: &'static Counters,
    v: Node,
    w: Node,
    e: RawPeer,
    f: RawPeer,
    e_connection: quinn::Connection,
    f_connection: quinn::Connection,
    /// v's incarnation and the epoch of its link to e (from v's `Hello` to e).
    v_to_e: (u64, u64),
    history: Arc<History>,
    /// Stands for e's origin: probes are its events, published here.
    probe_hub: Hub,
    probe_key: ChannelKey,
    probes_seen: Arc<Recorder>,
    probes: AtomicUsize,
}

impl Bed {
    async fn new() -> Bed {
        let counters = counters();
        let ca = ClusterCa::generate().unwrap();
        let v = Node::start(&ca, "v", "r1", 1);
        let w = Node::start(&ca, "w", "r2", 1);
        let history = Arc::new(History::default());
        v.replicator.set_history(history.clone());
        let e = RawPeer::bind("e", &ca.issue("e").unwrap());
        let f = RawPeer::bind("f", &ca.issue("f").unwrap());
        let v_addr = v.endpoint.local_addr().unwrap();
        // The raw peers dial first, so v's links to them ride the same connections. A
        // dial returns before v's side of the handshake is done: until v has taken both
        // connections it would dial e and f itself, and the tie-break between the two
        // connections of a pair could close the raw peer's.
        let e_connection = e.dial(v_addr).await;
        let f_connection = f.dial(v_addr).await;
        wait_for("v to take e's and f's connections", 10, || {
            v.endpoint.peer_nodes() == [("e".to_string(), e.addr), ("f".to_string(), f.addr)]
        })
        .await;
        v.replicator
            .set_peers(&[w.spec(), e.spec("r1"), f.spec("r3")]);
        w.replicator.set_peers(&[v.spec()]);
        let v_to_e = e.hello_from("v").await;
        f.hello_from("v").await;
        let probe_key = ChannelKey::new("app", "probe");
        let probes_seen = v.subscribe(&probe_key);
        Bed {
            counters,
            v,
            w,
            e,
            f,
            e_connection,
            f_connection,
            v_to_e,
            history,
            probe_hub: Hub::new(OriginId(origin_of("e")), CoreLimits::default()),
            probe_key,
            probes_seen,
            probes: AtomicUsize::new(0),
        }
    }

    fn hello(name: &str) -> FrameV1 {
        FrameV1::Hello {
            node_id: name.into(),
            incarnation: 1,
            origin: origin_of(name),
            epoch: 1,
            first: 1,
        }
    }

    /// A new link from e to v, its `Hello` written.
    async fn link(&self) -> quinn::SendStream {
        let mut link = self.e_connection.open_uni().await.unwrap();
        link.write_all(&framed(&Bed::hello("e"))).await.unwrap();
        link
    }

    /// The next probe event from e's origin, as a frame.
    fn next_probe(&self) -> (FrameV1, String) {
        let n = self.probes.fetch_add(1, Ordering::SeqCst);
        let name = format!("probe-{n}");
        (
            event_frame(&self.probe_hub, &self.probe_key, &name, 0),
            name,
        )
    }

    /// Waits until v's subscriber got the probe `name`: the link (and v) still work.
    async fn probed(&self, row: &str, name: &str) {
        wait_for(&format!("{row}: the probe after it"), 10, || {
            self.probes_seen.names().iter().any(|n| n == name)
        })
        .await;
    }

    /// Sends a probe on a new link and waits for it.
    async fn probe_new_link(&self, row: &str) {
        let mut link = self.link().await;
        let (probe, name) = self.next_probe();
        link.write_all(&framed(&probe)).await.unwrap();
        self.probed(row, &name).await;
        link.finish().unwrap();
    }

    fn count(&self, name: &str, reason: &str) -> u64 {
        self.counters.get(name, &[("reason", reason)])
    }

    /// A *dropped* row: `bytes` (after a `Hello` when `hello`) stop the link, counted
    /// under `reason`; a new link then works. `finish` ends the stream after the bytes
    /// (for rows that are cut short): the refusal then shows in the count only.
    async fn dropped(&self, row: &str, hello: bool, bytes: &[u8], finish: bool, reason: &str) {
        eprintln!("row: {row}");
        let before = self.count(REFUSED, reason);
        let mut link = if hello {
            self.link().await
        } else {
            self.e_connection.open_uni().await.unwrap()
        };
        // The node may stop the stream before it has read everything.
        let _ = link.write_all(bytes).await;
        if finish {
            let _ = link.finish();
        } else {
            let stopped = tokio::time::timeout(Duration::from_secs(10), link.stopped())
                .await
                .unwrap_or_else(|_| panic!("{row}: the link was not dropped"));
            assert!(matches!(stopped, Ok(Some(_))), "{row}: {stopped:?}");
        }
        wait_for(&format!("{row}: counted as {reason}"), 10, || {
            self.count(REFUSED, reason) > before
        })
        .await;
        assert_eq!(self.count(REFUSED, reason), before + 1, "{row}");
        self.probe_new_link(row).await;
    }

    /// A row whose frames (after a `Hello` when `hello`) leave the link up: a probe
    /// written after them on the same link arrives, and `ignored` (reason, how many)
    /// were counted by then.
    async fn kept(&self, row: &str, hello: bool, frames: &[FrameV1], ignored: Option<(&str, u64)>) {
        eprintln!("row: {row}");
        let before = ignored.map(|(reason, _)| self.count(IGNORED, reason));
        let mut link = if hello {
            self.link().await
        } else {
            self.e_connection.open_uni().await.unwrap()
        };
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.extend(framed(frame));
        }
        if !hello {
            bytes.extend(framed(&Bed::hello("e")));
        }
        let (probe, name) = self.next_probe();
        bytes.extend(framed(&probe));
        link.write_all(&bytes).await.unwrap();
        self.probed(row, &name).await;
        if let (Some((reason, expected)), Some(before)) = (ignored, before) {
            assert_eq!(
                self.count(IGNORED, reason) - before,
                expected,
                "{row}: ignored and counted as {reason}"
            );
        }
        link.finish().unwrap();
    }

    /// Frames v has sent e so far that `pick` selects.
    fn to_e<T>(&self, pick: impl Fn(&FrameV1) -> Option<T>) -> Vec<T> {
        self.e.received(pick)
    }
}

fn key_of(channel: &str) -> ChannelKey {
    ChannelKey::new("app", channel)
}

/// An event frame whose msgpack `frame` is `frame`.
fn raw_event(channel: &str, origin: u64, seq: u64, frame: Vec<u8>) -> FrameV1 {
    FrameV1::Event(EventV1 {
        app: "app".into(),
        channel: channel.into(),
        origin,
        seq,
        publisher: None,
        frame,
        link_seq: 0,
    })
}

/// Every row of the catalogue against one node, then a check that it still replicates
/// with a well-behaved peer, both ways, acks advancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_has_its_outcome_and_the_node_still_replicates() {
    let bed = Bed::new().await;
    bed.probe_new_link("start").await;
    links::link_level_rows(&bed).await;
    frames::frame_level_rows(&bed).await;
    frames::sequence_rows(&bed).await;
    state::ack_rows(&bed).await;
    state::state_rows(&bed).await;
    state::history_rows(&bed).await;
    state::skip_rows(&bed).await;
    state::drop_rows(&bed).await;
    still_replicates(&bed).await;
}

/// After the catalogue, v and the well-behaved w replicate both ways, acks advancing.
async fn still_replicates(bed: &Bed) {
    let key = key_of("after");
    let on_v = bed.v.subscribe(&key);
    let on_w = bed.w.subscribe(&key);
    for n in 0..20 {
        assert!(
            bed.v.publish_acked(&key, &format!("v/{n}")).await,
            "w acked v's event"
        );
        assert!(
            bed.w.publish_acked(&key, &format!("w/{n}")).await,
            "v acked w's event"
        );
    }
    wait_for("both ways", 10, || {
        on_v.names().len() == 40 && on_w.names().len() == 40
    })
    .await;
    let expected: Vec<String> = (0..20)
        .flat_map(|n| [format!("v/{n}"), format!("w/{n}")])
        .collect();
    assert_eq!(on_v.names(), expected);
    assert_eq!(on_w.names(), expected);
}
