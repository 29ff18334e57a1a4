//! Catalogue rows about acks, channel state and copied history: acks of positions
//! never sent, state requests for channels nobody holds, history requests and pages.

use super::*;

/// Acks of positions v never sent count for nothing and do not stop v's link to e.
pub(super) async fn ack_rows(bed: &Bed) {
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
pub(super) async fn state_rows(bed: &Bed) {
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
pub(super) async fn history_rows(bed: &Bed) {
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

    // v copies a channel it is the home of, which its store lacks, from e, whose Heads
    // lists it (`backfill::source`: the node that listed more than v's store holds).
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
    wait_for("v asks e for the history", 10, || {
        !bed.e
            .received(|f| match f {
                FrameV1::Backfill { channel, .. } if **channel == *key.name => Some(()),
                _ => None,
            })
            .is_empty()
    })
    .await;
    let mut link = bed.e_connection.open_uni().await.unwrap();
    let mut bytes = framed(&Bed::hello("e"));
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

/// A `Skip` for a channel v keeps (its home) but has not open, as after v dropped it
/// while idle, is remembered: the next `Heads` with that range asks for nothing. (It
/// was recorded only on an open channel, so v asked for the same range every round for
/// as long as the peer held the channel.) A `Skip` for a channel v does not keep opens
/// nothing.
pub(super) async fn skip_rows(bed: &Bed) {
    let x = origin_of("x");
    let skip = |key: &ChannelKey, upto: u64| FrameV1::Skip {
        app: "app".into(),
        channel: key.name.to_string(),
        origin: x,
        upto,
    };
    let kept = channel_homed_at(&bed.v, "v", "skipped");
    assert!(bed.v.hub.status(&kept).is_none(), "not open on v");
    bed.kept(
        "a Skip for a channel v keeps but has not open",
        true,
        &[skip(&kept, 5)],
        None,
    )
    .await;
    assert_eq!(bed.v.hub.cursor(&kept).get(OriginId(x)), 5, "remembered");

    // e's heads then list it at 5, and a second kept channel v has only to 2 of: v asks
    // for the second's 3..=4 and nothing of the first (the asks go out in the order of
    // the heads, on one link).
    let behind = channel_homed_at(&bed.v, "v", "behind");
    bed.kept(
        "a Skip opening a second kept channel",
        true,
        &[skip(&behind, 2)],
        None,
    )
    .await;
    let head = |key: &ChannelKey, seq: u64| HeadV1 {
        app: "app".into(),
        channel: key.name.to_string(),
        origins: vec![(x, seq)],
    };
    bed.kept(
        "Heads of a skipped range",
        true,
        &[FrameV1::Heads {
            channels: vec![head(&kept, 5), head(&behind, 4)],
        }],
        None,
    )
    .await;
    let asked = |key: &ChannelKey| {
        let name = key.name.to_string();
        bed.to_e(move |f| match f {
            FrameV1::Repair {
                channel, from, to, ..
            } if *channel == name => Some((*from, *to)),
            _ => None,
        })
    };
    wait_for("v asks e for the second channel's gap", 10, || {
        asked(&behind) == [(3, 4)]
    })
    .await;
    assert_eq!(asked(&kept), [], "nothing asked again of the skipped range");

    let unkept = channel_homed_at(&bed.v, "e", "skip-unkept");
    bed.kept(
        "a Skip for a channel v does not keep",
        true,
        &[skip(&unkept, 5)],
        None,
    )
    .await;
    assert!(bed.v.hub.status(&unkept).is_none(), "not created");
}

/// An idle channel whose events a peer has not acknowledged stays in memory: its log
/// answers that peer's repairs, and without it a repair of events the link is about to
/// resend would be answered with a `Skip`. Once every link acknowledged them it may
/// leave (`Journal::may_drop`).
pub(super) async fn drop_rows(bed: &Bed) {
    // Homed at e in r1: v's events go to e, w (r2) and f (r3); e and f ack only when
    // this test says so.
    let key = channel_homed_at(&bed.v, "e", "unacked");
    bed.v.publish(&key, "held");
    let name = key.name.to_string();
    let position = |peer: &RawPeer| {
        let name = name.clone();
        peer.received(move |f| match f {
            FrameV1::Event(e) if e.channel == name && e.link_seq > 0 => Some(e.link_seq),
            _ => None,
        })
        .last()
        .copied()
    };
    wait_for("e and f got the event", 10, || {
        position(&bed.e).is_some() && position(&bed.f).is_some()
    })
    .await;
    // Long after the idle period (`channel_idle_retain_ms`).
    let later = || common::now_ms() + 10 * 60_000;
    bed.v.hub.sweep(later());
    assert!(
        bed.v.hub.status(&key).is_some(),
        "kept while e and f have not acknowledged its event"
    );

    let stored = |(incarnation, epoch): (u64, u64), upto| FrameV1::Stored {
        incarnation,
        epoch,
        upto,
    };
    bed.kept(
        "Stored of the channel's event from e",
        true,
        &[stored(bed.v_to_e, position(&bed.e).unwrap())],
        None,
    )
    .await;
    // v took e's ack before the row's probe (one ordered link); f still holds out.
    bed.v.hub.sweep(later());
    assert!(bed.v.hub.status(&key).is_some(), "kept while f has not");
    let v_to_f = bed
        .f
        .received(|f| match f {
            FrameV1::Hello {
                incarnation, epoch, ..
            } => Some((*incarnation, *epoch)),
            _ => None,
        })
        .last()
        .copied()
        .expect("v said Hello to f");
    let mut link = bed.f_connection.open_uni().await.unwrap();
    let mut bytes = framed(&Bed::hello("f"));
    bytes.extend(framed(&stored(v_to_f, position(&bed.f).unwrap())));
    link.write_all(&bytes).await.unwrap();
    wait_for("dropped once every link acknowledged it", 10, || {
        bed.v.hub.sweep(later());
        bed.v.hub.status(&key).is_none()
    })
    .await;
    link.finish().unwrap();
}
