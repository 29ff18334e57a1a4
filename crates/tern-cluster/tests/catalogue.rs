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

mod common;

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
    fn has(&self, _: &str, _: &str) -> bool {
        false
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
    link_level_rows(&bed).await;
    frame_level_rows(&bed).await;
    sequence_rows(&bed).await;
    ack_rows(&bed).await;
    state_rows(&bed).await;
    history_rows(&bed).await;
    still_replicates(&bed).await;
}

/// Bytes that are not a frame: each drops its link, counted by reason.
async fn link_level_rows(bed: &Bed) {
    let elsewhere = Hub::new(OriginId(origin_of("x")), CoreLimits::default());
    let good = wire::encode(&event_frame(&elsewhere, &key_of("stray"), "stray", 0));
    // Version 2 is wire v2 (`framing.rs`): 3 is one no node speaks.
    let mut other_version = good.clone();
    other_version[0] = 3;
    // A v2 record of an unknown kind, and a v2 compact event that refers to a channel
    // its link never named.
    bed.dropped(
        "v2 record of unknown kind",
        true,
        &length_prefixed(&[2, 9, 0]),
        false,
        "undecodable",
    )
    .await;
    bed.dropped(
        "v2 event naming an unknown channel",
        true,
        &length_prefixed(&[2, 0, 1, 0, 5]),
        false,
        "undecodable",
    )
    .await;
    bed.dropped(
        "wrong version byte",
        true,
        &length_prefixed(&other_version),
        false,
        "version",
    )
    .await;
    bed.dropped("empty frame", true, &length_prefixed(&[]), false, "empty")
        .await;
    bed.dropped(
        "version byte and no body",
        true,
        &length_prefixed(&[wire::VERSION_V1]),
        false,
        "undecodable",
    )
    .await;
    let over = (FRAME_BYTES_MAX as u32 + 2).to_be_bytes();
    bed.dropped(
        "length prefix one over FRAME_BYTES_MAX",
        true,
        &over,
        false,
        "too_large",
    )
    .await;
    bed.dropped(
        "length prefix u32::MAX",
        true,
        &u32::MAX.to_be_bytes(),
        false,
        "too_large",
    )
    .await;
    let mut cut = length_prefixed(&good);
    cut.truncate(cut.len() - 3);
    bed.dropped("truncated body", true, &cut, true, "truncated")
        .await;
    bed.dropped("truncated length prefix", true, &[0, 0], true, "truncated")
        .await;
    let mut trailing = good.clone();
    trailing.push(0);
    bed.dropped(
        "trailing byte inside the length",
        true,
        &length_prefixed(&trailing),
        false,
        "trailing",
    )
    .await;
    bed.dropped(
        "undecodable bincode",
        true,
        &length_prefixed(&[wire::VERSION_V1, 0xff, 0xff, 0xff, 0xff]),
        false,
        "undecodable",
    )
    .await;
    // Heads (variant 4) claiming 2^60 channels (a varint: 0xfd, then a u64): refused
    // by the decode limit, without allocating for them.
    let mut claim = vec![wire::VERSION_V1, 4, 0xfd];
    claim.extend_from_slice(&(1u64 << 60).to_le_bytes());
    bed.dropped(
        "a list claiming 2^60 entries",
        true,
        &length_prefixed(&claim),
        false,
        "undecodable",
    )
    .await;
    // A length announced and never sent holds that link only; others carry on.
    let mut waiting = bed.link().await;
    waiting
        .write_all(&(FRAME_BYTES_MAX as u32).to_be_bytes())
        .await
        .unwrap();
    waiting.write_all(&[wire::VERSION_V1; 100]).await.unwrap();
    bed.probe_new_link("a frame announced at 16 MiB and never sent")
        .await;
    let _ = waiting.reset(0u32.into());

    stream_cap_row(bed).await;
}

/// A peer opens more streams at once than v allows (each holding a frame that has not
/// arrived): past the cap, the next stream cannot open until others end.
async fn stream_cap_row(bed: &Bed) {
    let row = "more streams at once than v allows";
    eprintln!("row: {row}");
    let cap = tern_cluster::link::INBOUND_STREAMS_MAX as usize;
    let mut held = Vec::new();
    let mut waiting = None;
    for _ in 0..=cap {
        let mut opening = Box::pin(bed.e_connection.open_uni());
        match tokio::time::timeout(Duration::from_millis(300), &mut opening).await {
            Ok(link) => {
                let mut link = link.unwrap();
                let mut bytes = framed(&Bed::hello("e"));
                bytes.extend_from_slice(&[0, 0, 4, 0, wire::VERSION_V1]);
                link.write_all(&bytes).await.unwrap();
                held.push(link);
            }
            Err(_) => {
                waiting = Some(opening);
                break;
            }
        }
    }
    // quinn hands back credit for closed streams once an eighth of the window is free,
    // so up to that many may still be counted from earlier rows.
    assert!(
        held.len() <= cap && held.len() >= cap - cap / 8,
        "{row}: {} open at once",
        held.len()
    );
    let waiting = waiting.unwrap_or_else(|| panic!("{row}: a stream past the cap opened"));
    for mut link in held {
        let _ = link.reset(0u32.into());
    }
    let mut link = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{row}: no stream opened after the others ended"))
        .unwrap();
    link.write_all(&framed(&Bed::hello("e"))).await.unwrap();
    let (probe, name) = bed.next_probe();
    link.write_all(&framed(&probe)).await.unwrap();
    bed.probed(row, &name).await;
    link.finish().unwrap();
}

/// Well-formed frames v will not act on, and odd ones it handles within bounds.
async fn frame_level_rows(bed: &Bed) {
    let elsewhere = Hub::new(OriginId(origin_of("x")), CoreLimits::default());
    let early = event_frame(&elsewhere, &key_of("early"), "early", 0);
    bed.kept(
        "an event before the link's Hello",
        false,
        &[early],
        Some(("before_hello", 1)),
    )
    .await;
    assert!(
        bed.v.hub.status(&key_of("early")).is_none(),
        "an event before Hello was applied"
    );
    // A Skip before Hello would move the probe origin's cursor past the next probes:
    // they would be dropped as duplicates and never reach the subscriber.
    let skip_ahead = FrameV1::Skip {
        app: "app".into(),
        channel: "probe".into(),
        origin: origin_of("e"),
        upto: bed.probes.load(Ordering::SeqCst) as u64 + 100,
    };
    bed.kept(
        "a Skip before the link's Hello",
        false,
        &[skip_ahead],
        Some(("before_hello", 1)),
    )
    .await;
    let before = bed.v.hub.status(&key_of("garbage")).is_some();
    bed.kept(
        "an event whose msgpack frame is garbage",
        true,
        &[raw_event(
            "garbage",
            origin_of("x"),
            1,
            vec![0xc1, 0xff, 0x00],
        )],
        Some(("event_frame", 1)),
    )
    .await;
    assert_eq!(bed.v.hub.status(&key_of("garbage")).is_some(), before);
    bed.kept(
        "an event whose frame is msgpack but no protocol message",
        true,
        &[raw_event("garbage", origin_of("x"), 1, vec![0x93, 1, 2, 3])],
        Some(("event_frame", 1)),
    )
    .await;
    bed.kept(
        "SyncMembers with a garbage frame",
        true,
        &[FrameV1::SyncMembers {
            app: "app".into(),
            channel: "sync-garbage".into(),
            frame: vec![0xc1; 64],
        }],
        Some(("sync_members_frame", 1)),
    )
    .await;
    assert!(
        bed.v.hub.status(&key_of("sync-garbage")).is_none(),
        "garbage members made a channel"
    );
    bed.kept(
        "Synced for a channel v does not hold",
        true,
        &[FrameV1::Synced {
            app: "app".into(),
            channel: "never".into(),
            origins: vec![(origin_of("x"), 5)],
        }],
        None,
    )
    .await;
    assert!(bed.v.hub.status(&key_of("never")).is_none());
    let many = |count: usize, prefix: &str| -> Vec<(String, String)> {
        (0..count)
            .map(|n| ("app".to_string(), format!("{prefix}-{n}")))
            .collect()
    };
    let heads: Vec<HeadV1> = many(wire::ITEMS_PER_FRAME_MAX, "head")
        .into_iter()
        .map(|(app, channel)| HeadV1 {
            app,
            channel,
            origins: vec![(origin_of("x"), 7)],
        })
        .collect();
    // Of channels v holds nothing of, it copies the history of those it is the home of
    // (bounded by the backfills it runs at once) and ignores the rest.
    bed.kept(
        "Heads of 4,096 channels v holds nothing of",
        true,
        &[FrameV1::Heads { channels: heads }],
        None,
    )
    .await;
    bed.kept(
        "Interest in 4,096 channels, from v's region",
        true,
        &[FrameV1::Interest {
            channels: many(wire::ITEMS_PER_FRAME_MAX, "interest"),
            on: true,
        }],
        None,
    )
    .await;
    assert!(bed
        .v
        .replicator
        .knows_interest("e", &key_of("interest-4095")));
    assert!(bed.v.hub.status(&key_of("interest-4095")).is_none());
    let wide = |name: usize| FrameV1::Interest {
        channels: vec![("app".into(), "n".repeat(name))],
        on: true,
    };
    bed.dropped(
        "Interest in a channel named with 64 KiB",
        true,
        &framed(&wide(64 << 10)),
        false,
        "name_too_long",
    )
    .await;
    let heads = FrameV1::Heads {
        channels: vec![
            HeadV1 {
                app: "app".into(),
                channel: "c".into(),
                origins: vec![],
            };
            wire::ITEMS_PER_FRAME_MAX + 1
        ],
    };
    bed.dropped(
        "Heads of 4,097 channels",
        true,
        &framed(&heads),
        false,
        "too_many_items",
    )
    .await;
    let interest = FrameV1::Interest {
        channels: many(200_000, "i"),
        on: true,
    };
    bed.dropped(
        "Interest in 200,000 channels",
        true,
        &framed(&interest),
        false,
        "too_many_items",
    )
    .await;
}

/// Sequence numbers and ranges at and past the limits.
async fn sequence_rows(bed: &Bed) {
    let x = origin_of("x");
    let seq_max = wire::SEQ_MAX;
    let frame = tern_protocol::encode(
        tern_protocol::Format::Msgpack,
        &tern_protocol::ProtocolMessage {
            action: tern_protocol::action::MESSAGE,
            // Timestamped now, so it stays in v's log (which is trimmed by age).
            timestamp: Some(common::now_ms()),
            messages: Some(vec![tern_protocol::Message::default()]),
            ..Default::default()
        },
    )
    .to_vec();
    // An event off the link's order (a repair or Sync answer) for a channel v does not
    // keep is not taken: it would make a channel nobody routes to v.
    // (v is not its home in r1, e is, and v has no subscriber on it.)
    let unkept = (0..)
        .map(|i| format!("unkept-{i}"))
        .find(|name| bed.v.replicator.home_in(&key_of(name), "r1").as_deref() == Some("e"))
        .expect("a channel e is the home of");
    bed.kept(
        "a link-less event for a channel v does not keep",
        true,
        &[raw_event(&unkept, x, 1, frame.clone())],
        Some(("answer_unheld", 1)),
    )
    .await;
    assert!(bed.v.hub.status(&key_of(&unkept)).is_none(), "not created");
    // v keeps "absurd" (a subscriber): its link-less events are taken.
    let _absurd = bed.v.subscribe(&key_of("absurd"));
    bed.kept(
        "an event at SEQ_MAX (a gap of 2^62 to repair)",
        true,
        &[raw_event("absurd", x, seq_max, frame.clone())],
        None,
    )
    .await;
    assert_eq!(bed.v.hub.pending_len(&key_of("absurd")), 1, "held, bounded");
    wait_for("v asks e for the gap", 10, || {
        bed.to_e(|f| match f {
            FrameV1::Repair {
                channel, from, to, ..
            } if channel == "absurd" => Some((*from, *to)),
            _ => None,
        })
        .contains(&(1, seq_max - 1))
    })
    .await;
    bed.dropped(
        "an event at u64::MAX",
        true,
        &framed(&raw_event("absurd", x, u64::MAX, frame.clone())),
        false,
        "seq_too_high",
    )
    .await;
    let skip = |upto: u64| FrameV1::Skip {
        app: "app".into(),
        channel: "absurd".into(),
        origin: x,
        upto,
    };
    bed.dropped(
        "Skip to u64::MAX",
        true,
        &framed(&skip(u64::MAX)),
        false,
        "seq_too_high",
    )
    .await;
    // Skipping to SEQ_MAX applies the held event (the cursor reaches SEQ_MAX) and
    // nothing overflows; a repair of everything is then answered from the log.
    bed.kept("Skip to SEQ_MAX", true, &[skip(seq_max - 1)], None)
        .await;
    assert_eq!(
        bed.v.hub.cursor(&key_of("absurd")).get(OriginId(x)),
        seq_max
    );
    let repair = |channel: &str, from: u64, to: u64| FrameV1::Repair {
        app: "app".into(),
        channel: channel.into(),
        origin: x,
        from,
        to,
    };
    bed.kept(
        "Repair of 1..=SEQ_MAX where the cursor is at SEQ_MAX",
        true,
        &[repair("absurd", 1, seq_max)],
        None,
    )
    .await;
    let answer = || {
        bed.to_e(|f| match f {
            FrameV1::Event(e) if e.channel == "absurd" => Some(("event", e.seq)),
            FrameV1::Skip { channel, upto, .. } if channel == "absurd" => Some(("skip", *upto)),
            _ => None,
        })
    };
    wait_for("the answer from v's log", 10, || answer().len() == 2).await;
    assert_eq!(
        answer(),
        vec![("skip", seq_max - 1), ("event", seq_max)],
        "a Skip of what the log never had, then the one event it has"
    );
    bed.kept(
        "Repair with from > to",
        true,
        &[repair("absurd", 10, 5)],
        None,
    )
    .await;
    bed.kept(
        "Repair of 1..=SEQ_MAX of a channel v does not hold",
        true,
        &[repair("nowhere", 1, seq_max)],
        None,
    )
    .await;
    assert!(bed.v.hub.status(&key_of("nowhere")).is_none());
    bed.dropped(
        "Repair to u64::MAX",
        true,
        &framed(&repair("absurd", 1, u64::MAX)),
        false,
        "seq_too_high",
    )
    .await;
    let hello = FrameV1::Hello {
        node_id: "e".into(),
        incarnation: 1,
        origin: origin_of("e"),
        epoch: 1,
        first: u64::MAX,
    };
    bed.dropped(
        "Hello resending from u64::MAX",
        false,
        &framed(&hello),
        false,
        "seq_too_high",
    )
    .await;
}

/// Acks of positions v never sent count for nothing and do not stop v's link to e.
async fn ack_rows(bed: &Bed) {
    let key = channel_homed_at(&bed.v, "e", "to-e");
    let sent_to_e = |name: &str| {
        let name = name.to_string();
        move || {
            bed.to_e(|f| match f {
                FrameV1::Event(event) => Some(event.clone()),
                _ => None,
            })
            .iter()
            .filter(|event| {
                event.to_remote().is_ok_and(|r| {
                    r.frame
                        .messages
                        .iter()
                        .flatten()
                        .any(|m| m.name.as_deref() == Some(&name))
                })
            })
            .map(|event| event.link_seq)
            .next()
        }
    };
    bed.v.publish(&key, "to-e/0");
    let mut position = None;
    wait_for("v's event on its link to e", 10, || {
        position = sent_to_e("to-e/0")();
        position.is_some()
    })
    .await;
    let (incarnation, epoch) = bed.v_to_e;
    let stored = |upto: u64| FrameV1::Stored {
        incarnation,
        epoch,
        upto,
    };
    bed.kept(
        "Stored for positions v never sent",
        true,
        &[stored(position.unwrap() + 1_000)],
        Some(("stored_unsent", 1)),
    )
    .await;
    bed.kept(
        "Stored for another incarnation of v",
        true,
        &[FrameV1::Stored {
            incarnation: incarnation + 1,
            epoch,
            upto: 1,
        }],
        None,
    )
    .await;
    bed.v.publish(&key, "to-e/1");
    wait_for("v's next event still goes to e", 10, || {
        sent_to_e("to-e/1")().is_some()
    })
    .await;
}

/// State requests for channels nobody holds are answered empty and create nothing.
async fn state_rows(bed: &Bed) {
    bed.kept(
        "Sync of a channel v does not hold",
        true,
        &[FrameV1::Sync {
            app: "app".into(),
            channel: "unknown".into(),
        }],
        None,
    )
    .await;
    wait_for("Synced with an empty cursor", 10, || {
        bed.to_e(|f| match f {
            FrameV1::Synced {
                channel, origins, ..
            } if channel == "unknown" => Some(origins.is_empty()),
            _ => None,
        })
        .contains(&true)
    })
    .await;
    assert!(bed.v.hub.status(&key_of("unknown")).is_none());
    bed.kept(
        "Backfill of a channel v has no history of",
        true,
        &[FrameV1::Backfill {
            app: "app".into(),
            channel: "unknown".into(),
            presence: false,
            after: Some((i64::MIN, u64::MAX, u64::MAX, u32::MAX)),
        }],
        None,
    )
    .await;
    wait_for("an empty last page", 10, || {
        bed.to_e(|f| match f {
            FrameV1::BackfillItems {
                channel,
                items,
                more,
                ..
            } if channel == "unknown" => Some(items.is_empty() && !more),
            _ => None,
        })
        .contains(&true)
    })
    .await;
    assert!(bed.v.hub.status(&key_of("unknown")).is_none());
}

/// Copying history: more requests than v reads at once, pages nobody asked for, pages
/// of garbage.
async fn history_rows(bed: &Bed) {
    // The store is slow: v reads a bounded number of pages at once and ignores (counts)
    // requests past that; the asker asks again later.
    bed.history.set_gate(true);
    let flood: Vec<FrameV1> = (0..200)
        .map(|n| FrameV1::Backfill {
            app: "app".into(),
            channel: "flood".into(),
            presence: false,
            after: Some((n, 0, 0, 0)),
        })
        .collect();
    let cap = tern_cluster::replicator::BACKFILL_ANSWERS_MAX;
    bed.kept(
        "200 Backfill requests while the store is slow",
        true,
        &flood,
        Some(("backfill_busy", 200 - cap as u64)),
    )
    .await;
    wait_for("the reads v started", 10, || {
        bed.history.reading.load(Ordering::SeqCst) == cap
    })
    .await;
    bed.history.set_gate(false);
    let answers = || {
        bed.to_e(|f| match f {
            FrameV1::BackfillItems { channel, .. } if channel == "flood" => Some(()),
            _ => None,
        })
        .len()
    };
    wait_for("the pages v read", 10, || answers() == cap).await;
    assert_eq!(bed.history.pages.load(Ordering::SeqCst), cap + 1);

    let page = |channel: &str, payload: Vec<u8>| FrameV1::BackfillItems {
        app: "app".into(),
        channel: channel.into(),
        presence: false,
        items: vec![ItemV1 {
            position: (1, origin_of("x"), 1, 0),
            payload,
        }],
        more: true,
    };
    bed.kept(
        "BackfillItems nobody asked for",
        true,
        &[page("unasked", vec![0x80])],
        None,
    )
    .await;
    assert!(bed.history.stored.lock().unwrap().is_empty(), "stored");

    // v copies a channel it is the home of from f (r3's home): Heads from e starts it.
    let key = channel_homed_at(&bed.v, "v", "copy");
    bed.kept(
        "Heads of a channel v is the home of and has nothing of",
        true,
        &[FrameV1::Heads {
            channels: vec![HeadV1 {
                app: "app".into(),
                channel: key.name.to_string(),
                origins: vec![(origin_of("x"), 3)],
            }],
        }],
        None,
    )
    .await;
    wait_for("v asks f for the history", 10, || {
        !bed.f
            .received(|f| match f {
                FrameV1::Backfill { channel, .. } if **channel == *key.name => Some(()),
                _ => None,
            })
            .is_empty()
    })
    .await;
    let mut link = bed.f_connection.open_uni().await.unwrap();
    let mut bytes = framed(&Bed::hello("f"));
    let mut garbage = page(&key.name, vec![0xc1, 0xc1]);
    if let FrameV1::BackfillItems { more, .. } = &mut garbage {
        *more = false;
    }
    bytes.extend(framed(&garbage));
    link.write_all(&bytes).await.unwrap();
    wait_for("the page stored", 10, || {
        !bed.history.stored.lock().unwrap().is_empty()
    })
    .await;
    link.finish().unwrap();
    // Opaque bytes are stored as sent (the store knows no wire format); history reads
    // skip an item that does not decode.
    assert_eq!(
        bed.history.stored.lock().unwrap()[0].0,
        key.name.to_string()
    );
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
