//! Catalogue rows at the frame level: well-formed frames the node will not act on, odd
//! ones it handles within bounds, and sequence numbers and ranges at and past the limits.

use super::*;

/// Well-formed frames v will not act on, and odd ones it handles within bounds.
pub(super) async fn frame_level_rows(bed: &Bed) {
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
pub(super) async fn sequence_rows(bed: &Bed) {
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
