//! Unit tests of gap repair: the answer from the log and the store, the throttle.

use super::*;

/// A burst behind one gap asks once per round trip; a range reaching further asks at
/// once; the table is bounded.
#[test]
fn a_gap_asks_once_per_round_trip() {
    use std::time::Duration;
    let key = ChannelKey::new("app", "room");
    let rtt = Duration::from_millis(100);
    let at = Duration::from_millis;
    let mut asked = Asked::default();
    assert!(asked.should_ask(&key, 7, (1, 4), at(0), rtt));
    assert!(!asked.should_ask(&key, 7, (1, 4), at(50), rtt));
    assert!(!asked.should_ask(&key, 7, (1, 3), at(100), rtt));
    assert!(asked.should_ask(&key, 7, (1, 5), at(100), rtt), "further");
    assert!(!asked.should_ask(&key, 7, (1, 5), at(150), rtt));
    assert!(asked.should_ask(&key, 7, (1, 5), at(201), rtt), "again");
    assert!(
        asked.should_ask(&key, 8, (1, 5), at(201), rtt),
        "another origin"
    );
    for i in 0..ASKED_MAX {
        asked.should_ask(
            &ChannelKey::new("app", &format!("c{i}")),
            1,
            (1, 1),
            at(0),
            rtt,
        );
    }
    assert!(asked.len() <= ASKED_MAX);
}
use tern_core::CoreLimits;
use tern_protocol::Message;

fn hub_with(count: usize) -> (Hub, ChannelKey) {
    crate::test_support::hub_with(7, count)
}

#[test]
fn answers_from_the_log_within_the_cursor() {
    let (hub, key) = hub_with(3);
    let parts = answer(&hub, &key, OriginId(7), 2, 10);
    let seqs: Vec<u64> = parts
        .iter()
        .map(|p| match p {
            RepairPart::Event(e) => e.seq,
            RepairPart::Skip(_) => panic!("nothing to skip"),
        })
        .collect();
    assert_eq!(seqs, vec![2, 3]);
    assert!(answer(&hub, &key, OriginId(7), 4, 10).is_empty());
    assert!(answer(&hub, &key, OriginId(8), 1, 10).is_empty());
}

#[test]
fn skips_what_the_log_no_longer_has() {
    let limits = CoreLimits::default();
    let (hub, key) = hub_with(limits.log.events_max + 5);
    let parts = answer(&hub, &key, OriginId(7), 1, 3);
    assert!(matches!(parts[..], [RepairPart::Skip(3)]), "{parts:?}");
}

/// A hole between logged events or after the last one (an event that was never
/// logged here: a departed connection's presence, say) is skipped where it falls, so
/// the asker applies everything after it now instead of waiting for its next `Heads`
/// (the seed sweep with idle channels dropped, seed 71, found the trailing one).
#[test]
fn skips_holes_after_the_first_logged_event_where_they_fall() {
    // An answer as `e<seq>` for an event and `s<upto>` for a `Skip`.
    let parts = |hub: &Hub, key: &ChannelKey, from, to| -> Vec<String> {
        answer(hub, key, OriginId(7), from, to)
            .iter()
            .map(|p| match p {
                RepairPart::Event(e) => format!("e{}", e.seq),
                RepairPart::Skip(upto) => format!("s{upto}"),
            })
            .collect()
    };
    let (hub, key) = hub_with(5);
    // The log holds 1..=5 (no holes): nothing skipped.
    assert_eq!(parts(&hub, &key, 2, 4), ["e2", "e3", "e4"]);
    // Past the cursor nothing is answered (the asker's range is clipped to it).
    assert_eq!(parts(&hub, &key, 4, 9), ["e4", "e5"]);
    // Holes made by a log that lacks 2 and 4 (as after `skip_remote` over no-ops).
    let gappy = Hub::new(OriginId(1), CoreLimits::default());
    let remote = |seq: u64| tern_core::RemoteEvent {
        origin: OriginId(7),
        seq,
        publisher: None,
        frame: tern_protocol::ProtocolMessage {
            messages: Some(vec![Message {
                id: Some(format!("m{seq}")),
                ..Default::default()
            }]),
            ..Default::default()
        },
    };
    gappy.apply_remote(&key, remote(1), 0).unwrap();
    gappy.skip_remote(&key, OriginId(7), 2, 0);
    gappy.apply_remote(&key, remote(3), 0).unwrap();
    gappy.skip_remote(&key, OriginId(7), 5, 0);
    assert_eq!(parts(&gappy, &key, 1, 5), ["e1", "s2", "e3", "s5"]);
}

/// A channel a node dropped while idle (or never held) is answered from its store:
/// the stored events in order within the store's cursor, and no `Skip` for a hole
/// (another node may have that event).
#[test]
fn a_channel_not_in_memory_is_answered_from_the_store() {
    let (hub, key) = hub_with(5);
    let stored: Vec<_> = [4, 1, 2, 5]
        .iter()
        .flat_map(|&seq| hub.events_of(&key, OriginId(7), seq, seq))
        .map(|event| RemoteEvent::from_event(&event))
        .collect();
    let dropped = Hub::new(OriginId(1), CoreLimits::default());
    assert!(from_store(&dropped, &key, OriginId(7), 1));
    assert!(!from_store(&hub, &key, OriginId(7), 5));
    assert!(from_store(&hub, &key, OriginId(7), 6));
    let parts: Vec<String> = answer_stored(stored.clone(), 5, 2, 9)
        .iter()
        .map(|p| match p {
            RepairPart::Event(e) => format!("e{}", e.seq),
            RepairPart::Skip(upto) => format!("s{upto}"),
        })
        .collect();
    assert_eq!(parts, ["e2", "e4", "e5"]);
    assert!(
        answer_stored(stored, 5, 6, 9).is_empty(),
        "past the stored cursor"
    );
}

/// A gap this node's own store can fill (a copied history holds the missing event;
/// its sender is gone): the stored events of the gap, in order and once each,
/// applied, let the hub take the event it held back past the gap.
#[test]
fn a_gap_is_filled_from_the_nodes_own_store() {
    let (source, key) = hub_with(3);
    let event = |seq| RemoteEvent::from_event(&source.events_of(&key, OriginId(7), seq, seq)[0]);
    let hub = Hub::new(OriginId(1), CoreLimits::default());
    hub.apply_remote(&key, event(1), 0).unwrap();
    let gap = hub.apply_remote(&key, event(3), 0).unwrap();
    assert!(matches!(
        gap,
        tern_core::RemoteOutcome::Gap {
            missing: (2, 2),
            ..
        }
    ));
    let stored = vec![event(3), event(1), event(2), event(2)];
    let filling = own_store(stored, 2, 2);
    assert_eq!(filling.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
    for event in filling {
        hub.apply_remote(&key, event, 0).unwrap();
    }
    assert_eq!(
        hub.cursor(&key).get(OriginId(7)),
        3,
        "the held-back event followed"
    );
}

/// A log answer's holes the store holds are filled from it (seed 42605: a channel
/// dropped while idle came back with a log that lacked its first events, and the
/// peer skipped the asker past them); what the store lacks where its read was whole
/// is still skipped, and the answer stops before a hole it cannot vouch for.
#[test]
fn a_log_answer_fills_its_holes_from_the_store() {
    let (source, key) = hub_with(9);
    let event = |seq| RemoteEvent::from_event(&source.events_of(&key, OriginId(7), seq, seq)[0]);
    let logged = |seqs: &[u64]| -> Vec<RepairPart> {
        seqs.iter()
            .map(|&seq| RepairPart::Event(source.events_of(&key, OriginId(7), seq, seq)[0].clone()))
            .collect()
    };
    let show = |parts: &[RepairPart]| -> Vec<String> {
        parts
            .iter()
            .map(|p| match p {
                RepairPart::Event(e) => format!("e{}", e.seq),
                RepairPart::Skip(upto) => format!("s{upto}"),
            })
            .collect()
    };
    // The log lacks 1..=3 and 6: its answer from 1 is s3 e4 e5 s6 e7.
    let mut parts = vec![RepairPart::Skip(3)];
    parts.extend(logged(&[4, 5]));
    parts.push(RepairPart::Skip(6));
    parts.extend(logged(&[7]));
    assert_eq!(holes(&parts, 1), Some((1, 6)));
    assert_eq!(holes(&logged(&[1, 2]), 1), None);
    // The store holds 1, 2 and 6 (not 3): 3 is skipped, the rest filled.
    let stored = vec![event(6), event(2), event(1)];
    let filled = fill_holes(parts.clone(), 1, stored.clone(), (1, 6), 1);
    assert_eq!(show(&filled), ["e1", "e2", "s3", "e4", "e5", "e6", "e7"]);
    // A read whole only from 2 cannot vouch for 1: no `Skip` from there on, only
    // events (the asker holds them back and asks for 1 again).
    let unvouched = fill_holes(parts.clone(), 1, vec![event(2)], (1, 6), 2);
    assert_eq!(show(&unvouched), ["e2", "e4", "e5", "e7"]);
    // One whole from 4 fills 1 and 2 and cannot vouch for 3.
    let partial = fill_holes(parts.clone(), 1, stored.clone(), (1, 6), 4);
    assert_eq!(show(&partial), ["e1", "e2", "e4", "e5", "e6", "e7"]);
    // A read that ends at 2 (the window): the holes past it are not skipped.
    let cut = fill_holes(parts.clone(), 1, stored, (1, 2), 1);
    assert_eq!(show(&cut), ["e1", "e2", "e4", "e5", "e7"]);
    let cut = fill_holes(parts.clone(), 1, vec![event(1)], (1, 2), 1);
    assert_eq!(show(&cut), ["e1", "s2", "e4", "e5", "e7"]);
    // No read at all (the store's slots were busy): the log's events, no `Skip`.
    let busy = fill_holes(parts, 1, Vec::new(), (1, 6), u64::MAX);
    assert_eq!(show(&busy), ["e4", "e5", "e7"]);
    // The window is bounded: a long hole is read from its start, HOLE_READ_MAX at a time.
    let long = vec![RepairPart::Skip(HOLE_READ_MAX * 3)];
    assert_eq!(holes(&long, 1), Some((1, HOLE_READ_MAX)));
}

/// What a request asks past the hub's cursor is the store's to answer.
#[test]
fn past_the_hubs_cursor_is_the_stores() {
    let (hub, key) = hub_with(3);
    assert_eq!(past_log(&hub, &key, OriginId(7), 2, 3), None);
    assert_eq!(past_log(&hub, &key, OriginId(7), 2, 5), Some((4, 5)));
    assert_eq!(past_log(&hub, &key, OriginId(7), 5, 6), Some((5, 6)));
    assert_eq!(past_log(&hub, &key, OriginId(8), 1, 2), Some((1, 2)));
}

/// Both drivers answer a request through `plan` and `finish`: the log's events, and
/// from the store past the hub's cursor; a hub without the origin's events answers
/// from the store alone; a store short of a span or not read adds nothing.
#[test]
fn a_planned_answer_is_finished_with_the_store() {
    let (hub, key) = hub_with(3);
    let (store, _) = hub_with(5);
    let seqs = |parts: &[RepairPart]| -> Vec<u64> {
        parts
            .iter()
            .map(|p| match p {
                RepairPart::Event(e) => e.seq,
                RepairPart::Skip(upto) => panic!("skip {upto}"),
            })
            .collect()
    };
    let stored = |(from, to): (u64, u64)| {
        let events = store.events_of(&key, OriginId(7), from, to);
        Reading::Read(Read {
            events: events.iter().map(|e| RemoteEvent::from_event(e)).collect(),
            upto: 5,
            whole_from: from,
        })
    };
    let planned = plan(&hub, &key, OriginId(7), 2, 5);
    assert!(planned.reads_store());
    assert_eq!(seqs(&finish(planned, 2, 5, stored)), [2, 3, 4, 5]);
    let planned = plan(&hub, &key, OriginId(7), 2, 5);
    assert_eq!(seqs(&finish(planned, 2, 5, |_| Reading::Short)), [2, 3]);
    let planned = plan(&hub, &key, OriginId(7), 2, 5);
    assert_eq!(seqs(&finish(planned, 2, 5, |_| Reading::Busy)), [2, 3]);
    let planned = plan(&hub, &key, OriginId(7), 1, 3);
    assert!(!planned.reads_store());
    let unread = |_| -> Reading { unreachable!("nothing to read") };
    assert_eq!(seqs(&finish(planned, 1, 3, unread)), [1, 2, 3]);
    let planned = plan(&hub, &key, OriginId(7), 4, 5);
    assert!(matches!(planned, Plan::Store));
    assert_eq!(seqs(&finish(planned, 4, 5, stored)), [4, 5]);
    let planned = plan(&hub, &key, OriginId(7), 4, 5);
    assert!(finish(planned, 4, 5, |_| Reading::Short).is_empty());
}

/// The store's part of an answer past the hub's cursor goes to the hub too, up to the
/// first event the store lacks; what the hub has, a hole, or a log answer adds nothing.
#[test]
fn what_the_store_answered_past_the_hub_goes_to_the_hub() {
    let (hub, key) = hub_with(3);
    let (store, _) = hub_with(8);
    let event =
        |seq: u64| RepairPart::Event(store.events_of(&key, OriginId(7), seq, seq)[0].clone());
    let seqs = |events: Vec<RemoteEvent>| -> Vec<u64> { events.iter().map(|e| e.seq).collect() };
    // Events 2..=3 from the log, 4..=5 from the store, 7 past a hole the store has.
    let parts = [event(2), event(3), event(4), event(5), event(7)];
    assert_eq!(seqs(past_hub(&hub, &key, OriginId(7), &parts)), [4, 5]);
    let planned = plan(&hub, &key, OriginId(7), 1, 3);
    let logged = finish(planned, 1, 3, |_| Reading::Short);
    assert!(past_hub(&hub, &key, OriginId(7), &logged).is_empty());
    assert!(past_hub(&hub, &key, OriginId(7), &[event(6)]).is_empty());
    assert!(past_hub(&hub, &key, OriginId(7), &[RepairPart::Skip(5)]).is_empty());
    // Another origin the hub has none of: from its first event.
    let (other, other_key) = crate::test_support::hub_with(9, 2);
    let theirs: Vec<RepairPart> = other
        .events_of(&other_key, OriginId(9), 1, 2)
        .into_iter()
        .map(RepairPart::Event)
        .collect();
    assert_eq!(
        seqs(past_hub(&hub, &other_key, OriginId(9), &theirs)),
        [1, 2]
    );
}
