//! Hub behaviour through its public API, with recording subscribers and virtual time.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, RemoteEvent,
    RemoteOutcome, Subscriber,
};
use tern_protocol::{flags, presence_action, Data, Format, Message, PresenceMessage};

/// A subscriber that records what it is given and can be told to refuse (full queue).
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Arc<ChannelEvent>>>,
    capacity: Option<usize>,
}

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        let mut events = self.events.lock().unwrap();
        if self.capacity.is_some_and(|c| events.len() >= c) {
            return false;
        }
        events.push(event.clone());
        true
    }
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.is_message())
            .flat_map(|e| e.frame.messages.clone().unwrap_or_default())
            .map(|m| m.name.unwrap_or_default())
            .collect()
    }
}

const ALL: u64 = flags::PUBLISH | flags::SUBSCRIBE | flags::PRESENCE | flags::PRESENCE_SUBSCRIBE;

fn hub() -> Hub {
    Hub::new(OriginId(7), CoreLimits::default())
}

fn attach(hub: &Hub, key: &ChannelKey, conn: &str, echo: bool) -> Arc<Recorder> {
    let rec = Arc::new(Recorder::default());
    hub.attach(
        key,
        conn.into(),
        AttachOptions {
            modes: ALL,
            echo,
            resume_from: None,
            rewind: None,
            delta: false,
        },
        rec.clone(),
        |_| {},
        0,
    )
    .unwrap();
    rec
}

fn publisher(conn: &str, serial: u64) -> Publisher {
    Publisher {
        connection_id: Some(conn.into()),
        frame_id: format!("{conn}:{serial}"),
    }
}

fn msg(name: &str) -> Message {
    Message {
        name: Some(name.into()),
        data: Some(Data::String("d".into())),
        ..Default::default()
    }
}

/// Every attached subscriber gets each publish once, in order, with ids, serials and a
/// cursor that advances; the publisher's own copy is skipped only when echo is off.
#[test]
fn fan_out_in_order_with_echo_rules() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    let a = attach(&hub, &key, "A", false);
    let b = attach(&hub, &key, "B", true);
    let mut last_serial = String::new();
    for i in 0..5 {
        let out = hub
            .publish(
                &key,
                &publisher("A", i),
                vec![msg(&format!("m{i}"))],
                100 + i as i64,
            )
            .unwrap();
        assert_eq!(out.serials.len(), 1);
        let serial = out.event.unwrap().frame.channel_serial.clone().unwrap();
        assert_ne!(serial, last_serial);
        last_serial = serial;
    }
    assert!(
        a.names().is_empty(),
        "echo=false publisher must not get its own messages"
    );
    assert_eq!(b.names(), vec!["m0", "m1", "m2", "m3", "m4"]);
    let events = b.events.lock().unwrap();
    let first = &events[0].frame;
    assert_eq!(first.id.as_deref(), Some("A:0"));
    assert_eq!(first.connection_id.as_deref(), Some("A"));
    let m = &first.messages.as_ref().unwrap()[0];
    assert_eq!(m.id.as_deref(), Some("A:0:0"));
    assert_eq!(m.timestamp, Some(100));
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}

/// The encoded frame is produced once per format and shared (same allocation).
#[test]
fn frames_are_encoded_once_per_format() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    let b = attach(&hub, &key, "B", true);
    hub.publish(&key, &publisher("A", 0), vec![msg("x")], 1)
        .unwrap();
    let event = b.events.lock().unwrap()[0].clone();
    let one = event.encoded(Format::Json);
    let two = event.encoded(Format::Json);
    assert_eq!(one.as_ptr(), two.as_ptr());
    assert!(std::str::from_utf8(&one)
        .unwrap()
        .contains("\"channelSerial\""));
}

/// A subscriber whose queue is full is dropped from the channel; the others keep
/// receiving everything.
#[test]
fn slow_subscriber_is_dropped_without_affecting_others() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    let slow = Arc::new(Recorder {
        capacity: Some(2),
        ..Default::default()
    });
    hub.attach(
        &key,
        "S".into(),
        AttachOptions {
            modes: ALL,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        },
        slow.clone(),
        |_| {},
        0,
    )
    .unwrap();
    let fast = attach(&hub, &key, "F", true);
    for i in 0..10 {
        hub.publish(&key, &publisher("P", i), vec![msg(&i.to_string())], 1)
            .unwrap();
    }
    assert_eq!(slow.names().len(), 2);
    assert_eq!(fast.names().len(), 10);
    assert_eq!(hub.status(&key).unwrap().subscribers, 1);
}

fn enter(conn: &str, client: &str, serial: u64) -> PresenceMessage {
    PresenceMessage {
        id: Some(format!("{conn}:{serial}:0")),
        action: presence_action::ENTER,
        client_id: Some(client.into()),
        connection_id: Some(conn.into()),
        timestamp: Some(1),
        ..Default::default()
    }
}

/// The attach snapshot carries current members; a dropped connection's members leave
/// only after the grace period, a closed connection's at once.
#[test]
fn presence_snapshot_grace_and_close() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    hub.presence(&key, &publisher("A", 0), vec![enter("A", "alice", 0)], 10)
        .unwrap();
    hub.presence(&key, &publisher("B", 0), vec![enter("B", "bob", 0)], 10)
        .unwrap();
    let mut seen = 0;
    let watcher = Arc::new(Recorder::default());
    hub.attach(
        &key,
        "W".into(),
        AttachOptions {
            modes: ALL,
            echo: true,
            resume_from: None,
            rewind: None,
            delta: false,
        },
        watcher.clone(),
        |snap| seen = snap.members.len(),
        10,
    )
    .unwrap();
    assert_eq!(seen, 2);

    hub.connection_dropped("app", "A", vec![key.name.clone()], 1_000);
    hub.sweep(1_000 + 14_999);
    assert_eq!(hub.members(&key).len(), 2, "still inside the grace period");
    hub.sweep(1_000 + 15_000);
    assert_eq!(hub.members(&key).len(), 1);

    hub.connection_closed("app", "B", std::slice::from_ref(&key.name), 20_000);
    assert!(hub.members(&key).is_empty());
    let leaves: Vec<_> = watcher
        .events
        .lock()
        .unwrap()
        .iter()
        .flat_map(|e| e.frame.presence.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        leaves
            .iter()
            .filter(|p| p.action == presence_action::LEAVE)
            .count(),
        2
    );
}

/// A resumed connection (forget_dropped) keeps its members past the grace period.
#[test]
fn resumed_connection_keeps_members() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    hub.presence(&key, &publisher("A", 0), vec![enter("A", "alice", 0)], 10)
        .unwrap();
    hub.connection_dropped("app", "A", vec![key.name.clone()], 100);
    assert!(hub.forget_dropped("A"));
    hub.sweep(100_000);
    assert_eq!(hub.members(&key).len(), 1);
}

/// Presence of a departed node's connection that arrives after `node_departed` (still in
/// flight, waiting behind a gap, or repaired from a peer's log once the origin is known
/// dead) must not bring the member back: that incarnation's connections are gone for
/// good. The events still count as applied, so the origin's later events are not held up.
#[test]
fn a_departed_nodes_late_presence_does_not_come_back() {
    let key = ChannelKey::new("app", "room");
    let dead = Hub::new(OriginId(1), CoreLimits::default());
    let recorder = attach(&dead, &key, "dead-watcher", true);
    dead.publish(&key, &publisher("dead-conn", 0), vec![msg("before")], 1)
        .unwrap();
    for (serial, client) in [(1, "alice"), (2, "bob")] {
        dead.presence(
            &key,
            &publisher("dead-conn", serial),
            vec![enter("dead-conn", client, serial)],
            2,
        )
        .unwrap();
    }
    dead.publish(&key, &publisher("dead-conn", 3), vec![msg("after")], 3)
        .unwrap();
    let events: Vec<RemoteEvent> = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| RemoteEvent::from_event(e))
        .collect();
    assert_eq!(events.len(), 4);

    let survivor = hub();
    let watcher = attach(&survivor, &key, "watcher", true);
    // alice's ENTER waits behind the missing first event when the node departs.
    assert!(matches!(
        survivor.apply_remote(&key, events[1].clone(), 5).unwrap(),
        RemoteOutcome::Gap { .. }
    ));
    assert_eq!(survivor.node_departed("dead-", 10), 0);
    for event in [&events[0], &events[2], &events[3]] {
        survivor.apply_remote(&key, event.clone(), 11).unwrap();
    }
    assert!(survivor.members(&key).is_empty());
    assert_eq!(survivor.cursor(&key).get(OriginId(1)), 4);
    assert_eq!(watcher.names(), ["before", "after"]);
}

/// Empty channels are dropped after the retention period and the channel limit holds.
#[test]
fn idle_channels_are_swept_and_limit_holds() {
    let limits = CoreLimits {
        channels_max: 2,
        channel_idle_retain_ms: 50,
        ..Default::default()
    };
    let hub = Hub::new(OriginId(1), limits);
    hub.publish(
        &ChannelKey::new("a", "1"),
        &publisher("P", 0),
        vec![msg("x")],
        0,
    )
    .unwrap();
    hub.publish(
        &ChannelKey::new("a", "2"),
        &publisher("P", 1),
        vec![msg("x")],
        0,
    )
    .unwrap();
    assert!(hub
        .publish(
            &ChannelKey::new("a", "3"),
            &publisher("P", 2),
            vec![msg("x")],
            0
        )
        .is_err());
    hub.sweep(49);
    assert_eq!(hub.channel_count(), 2);
    hub.sweep(50);
    assert_eq!(hub.channel_count(), 0);
    assert!(hub
        .publish(
            &ChannelKey::new("a", "3"),
            &publisher("P", 3),
            vec![msg("x")],
            60
        )
        .is_ok());
}

#[derive(Debug, Clone)]
enum Op {
    Attach(usize),
    Detach(usize),
    Publish(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize).prop_map(Op::Attach),
        (0..4usize).prop_map(Op::Detach),
        (0..4usize).prop_map(Op::Publish),
    ]
}

proptest! {
    /// For any interleaving of attach, detach and publish, each subscriber receives
    /// exactly the publishes made while it was attached, in publish order, once.
    #[test]
    fn subscribers_get_exactly_what_was_published_while_attached(ops in proptest::collection::vec(op(), 1..80)) {
        let hub = hub();
        let key = ChannelKey::new("app", "c");
        let mut recorders: Vec<Option<Arc<Recorder>>> = vec![None; 4];
        let mut expected: Vec<Vec<String>> = vec![Vec::new(); 4];
        let mut received: Vec<Vec<String>> = vec![Vec::new(); 4];
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Attach(i) => {
                    if recorders[i].is_none() {
                        recorders[i] = Some(attach(&hub, &key, &format!("c{i}"), true));
                    }
                }
                Op::Detach(i) => {
                    if let Some(rec) = recorders[i].take() {
                        hub.detach(&key, &format!("c{i}"), 0);
                        received[i].extend(rec.names());
                    }
                }
                Op::Publish(p) => {
                    let name = format!("m{n}");
                    hub.publish(&key, &publisher(&format!("p{p}"), n as u64), vec![msg(&name)], n as i64).unwrap();
                    for i in 0..4 {
                        if recorders[i].is_some() {
                            expected[i].push(name.clone());
                        }
                    }
                }
            }
        }
        for i in 0..4 {
            if let Some(rec) = recorders[i].take() {
                received[i].extend(rec.names());
            }
            prop_assert_eq!(&received[i], &expected[i]);
        }
    }
}

/// Keeps the highest sequence per origin of every channel, as the history store does.
#[derive(Default)]
struct CursorJournal(Mutex<std::collections::HashMap<ChannelKey, tern_core::Cursor>>);

impl tern_core::Journal for CursorJournal {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        let mut cursors = self.0.lock().unwrap();
        cursors
            .entry(key.clone())
            .or_default()
            .advance(event.origin, event.seq);
    }

    fn restore(&self, key: &ChannelKey) -> tern_core::Cursor {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

/// A channel dropped while idle continues from its journal when it comes back: this
/// node's sequence goes on (a restart at 1 would look like duplicates to every node
/// still holding the channel, and be lost there). Events keep a channel alive: it is
/// dropped only after a quiet retain period.
#[test]
fn a_channel_dropped_while_idle_continues_its_sequences() {
    let journal = Arc::new(CursorJournal::default());
    let limits = CoreLimits {
        channel_idle_retain_ms: 1_000,
        ..CoreLimits::default()
    };
    let hub = Hub::with_journal(OriginId(7), limits, Some(journal.clone()));
    let key = ChannelKey::new("app", "quiet");
    let first = hub
        .publish(&key, &publisher("A", 0), vec![msg("one")], 0)
        .unwrap();
    assert_eq!(first.event.unwrap().seq, 1);
    let remote = Hub::new(OriginId(9), CoreLimits::default());
    let from_remote = remote
        .publish(&key, &publisher("R", 0), vec![msg("r")], 0)
        .unwrap();
    let outcome = hub
        .apply_remote(
            &key,
            RemoteEvent::from_event(&from_remote.event.unwrap()),
            900,
        )
        .unwrap();
    assert_eq!(outcome, RemoteOutcome::Applied(1));
    // The remote event at 900 counts as activity: not idle for the retain period yet.
    hub.sweep(1_500);
    assert_eq!(hub.channel_count(), 1);
    hub.sweep(1_900);
    assert_eq!(
        hub.channel_count(),
        0,
        "dropped after a quiet retain period"
    );

    let again = hub
        .publish(&key, &publisher("A", 1), vec![msg("two")], 2_000)
        .unwrap();
    assert_eq!(again.event.unwrap().seq, 2, "this node's sequence goes on");
    // Another origin's events are not claimed: the log that held them is gone, so they
    // come back through repair from peers (a gap), not as a Skip from here.
    assert_eq!(hub.cursor(&key).get(OriginId(9)), 0);
    let next_remote = remote
        .publish(&key, &publisher("R", 1), vec![msg("r2")], 2_000)
        .unwrap();
    assert_eq!(
        hub.apply_remote(
            &key,
            RemoteEvent::from_event(&next_remote.event.unwrap()),
            2_000
        )
        .unwrap(),
        RemoteOutcome::Gap {
            origin: OriginId(9),
            missing: (1, 1)
        }
    );
}

/// A `Skip` over a hole (an event that was a no-op on every node that still has the
/// origin's log) must not throw away the events already here waiting behind the hole:
/// they apply, in order, and reach subscribers.
#[test]
fn a_skip_over_a_hole_applies_the_events_waiting_behind_it() {
    let key = ChannelKey::new("app", "holes");
    let node = hub();
    let recorder = attach(&node, &key, "watcher", true);
    let events = published_remotely(&key, 4);
    node.apply_remote(&key, events[0].clone(), 1).unwrap();
    // Event 2 is the hole; 3 and 4 wait behind it.
    assert!(matches!(
        node.apply_remote(&key, events[2].clone(), 1).unwrap(),
        RemoteOutcome::Gap { .. }
    ));
    node.apply_remote(&key, events[3].clone(), 1).unwrap();
    // The skip reaches past what is waiting (as a `Synced` cursor or a repair `Skip` can).
    assert_eq!(node.skip_remote(&key, OriginId(1), 3, 1), 2);
    assert_eq!(node.cursor(&key).get(OriginId(1)), 4);
    let names: Vec<String> = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .flat_map(|e| e.frame.messages.clone().unwrap_or_default())
        .filter_map(|m| m.name)
        .collect();
    assert_eq!(names, vec!["m0", "m2", "m3"]);
}

/// One app cannot take every channel of the node: past `channels_per_app_max` its new
/// channels are refused while another app still gets its own, and an app's swept
/// channels are given back to it.
#[test]
fn one_app_cannot_exhaust_the_node() {
    let limits = CoreLimits {
        channels_max: 10,
        channels_per_app_max: 3,
        channel_idle_retain_ms: 50,
        ..Default::default()
    };
    let hub = Hub::new(OriginId(1), limits);
    let publish = |app: &str, name: &str, now: i64| {
        hub.publish(
            &ChannelKey::new(app, name),
            &publisher("P", 0),
            vec![msg("x")],
            now,
        )
    };
    for name in ["1", "2", "3"] {
        publish("greedy", name, 0).unwrap();
    }
    assert_eq!(
        publish("greedy", "4", 0).unwrap_err(),
        tern_core::CoreError::TooManyAppChannels(3)
    );
    publish("other", "1", 0).unwrap();
    assert_eq!(hub.channel_count(), 4);
    hub.sweep(60);
    assert_eq!(hub.channel_count(), 0);
    publish("greedy", "4", 60).unwrap();
}

/// A connection's own grace period (`remainPresentFor`) decides when its members leave,
/// clamped to `PRESENCE_GRACE_MAX_MS` so a client cannot pin its presence for ever.
#[test]
fn remain_present_for_sets_the_grace_period() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    hub.presence(&key, &publisher("A", 0), vec![enter("A", "alice", 0)], 10)
        .unwrap();
    hub.presence(&key, &publisher("B", 0), vec![enter("B", "bob", 0)], 10)
        .unwrap();
    hub.connection_dropped_for("app", "A", vec![key.name.clone()], 100, 5_000);
    hub.connection_dropped_for("app", "B", vec![key.name.clone()], 100, i64::MAX);
    hub.sweep(100 + 4_999);
    assert_eq!(hub.members(&key).len(), 2);
    hub.sweep(100 + 5_000);
    assert_eq!(hub.members(&key).len(), 1, "alice left after her 5 s");
    hub.sweep(100 + tern_core::hub::PRESENCE_GRACE_MAX_MS);
    assert!(hub.members(&key).is_empty(), "bob's grace was clamped");
}

/// Narrowing an attachment's modes (a re-authenticated connection lost subscribe)
/// stops its deliveries and counts it by its new modes; `leave` removes one
/// connection's members on one channel with a broadcast LEAVE, and nobody else's.
#[test]
fn restricted_modes_stop_deliveries_and_leave_is_per_connection() {
    let hub = hub();
    let key = ChannelKey::new("app", "room");
    let a = attach(&hub, &key, "A", true);
    let b = attach(&hub, &key, "B", true);
    hub.publish(&key, &publisher("B", 0), vec![msg("before")], 1)
        .unwrap();
    assert_eq!(hub.restrict_modes(&key, "A", flags::PUBLISH), Some(ALL));
    assert_eq!(hub.restrict_modes(&key, "nobody", flags::PUBLISH), None);
    let other = ChannelKey::new("app", "elsewhere");
    assert_eq!(hub.restrict_modes(&other, "A", flags::PUBLISH), None);
    hub.publish(&key, &publisher("B", 1), vec![msg("after")], 2)
        .unwrap();
    assert_eq!(a.names(), vec!["before"]);
    assert_eq!(b.names(), vec!["before", "after"]);
    let status = hub.status(&key).unwrap();
    assert_eq!((status.connections, status.subscribers), (2, 1));
    assert_eq!((status.publishers, status.presence_subscribers), (2, 1));

    hub.presence(&key, &publisher("A", 2), vec![enter("A", "alice", 2)], 3)
        .unwrap();
    hub.presence(&key, &publisher("B", 3), vec![enter("B", "bob", 3)], 3)
        .unwrap();
    hub.leave(&key, "A", 4);
    let members = hub.members(&key);
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].client_id.as_deref(), Some("bob"));
    let leaves = b
        .events
        .lock()
        .unwrap()
        .iter()
        .flat_map(|e| e.frame.presence.clone().unwrap_or_default())
        .filter(|p| p.action == presence_action::LEAVE)
        .count();
    assert_eq!(leaves, 1);
    assert_eq!(
        hub.status(&key).unwrap().connections,
        2,
        "leave does not detach"
    );
}

/// Records what the hub journals.
#[derive(Default)]
struct JournalLog(Mutex<Vec<(u64, u64, usize)>>);

impl tern_core::Journal for JournalLog {
    fn record(&self, _key: &ChannelKey, event: &Arc<ChannelEvent>) {
        let count = event.message_count();
        self.0
            .lock()
            .unwrap()
            .push((event.origin.0, event.seq, count));
    }
}

/// A retried publish (same message ids) is answered with the first serials and not
/// applied again, but the original event is journaled again so the retry's reply waits
/// for a write of its own (the first one may have been lost to a failed commit).
#[test]
fn a_retried_publish_is_journaled_again_not_applied_again() {
    let journal = Arc::new(JournalLog::default());
    let hub = Hub::with_journal(OriginId(1), CoreLimits::default(), Some(journal.clone()));
    let key = ChannelKey::new("app", "room");
    let watcher = attach(&hub, &key, "W", true);
    let with_id = |id: &str| Message {
        id: Some(id.into()),
        ..msg(id)
    };
    let first = hub
        .publish(
            &key,
            &publisher("P", 0),
            vec![with_id("a"), with_id("b")],
            1,
        )
        .unwrap();
    let again = hub
        .publish(
            &key,
            &publisher("P", 1),
            vec![with_id("a"), with_id("b")],
            2,
        )
        .unwrap();
    assert_eq!(again.serials, first.serials);
    assert!(again.event.is_none(), "nothing new applied");
    assert_eq!(watcher.names(), ["a", "b"], "delivered once");
    assert_eq!(*journal.0.lock().unwrap(), vec![(1, 1, 2), (1, 1, 2)]);
    // Mixed: the known id's event again, then the new message as a new event.
    hub.publish(
        &key,
        &publisher("P", 2),
        vec![with_id("a"), with_id("c")],
        3,
    )
    .unwrap();
    assert_eq!(
        *journal.0.lock().unwrap(),
        vec![(1, 1, 2), (1, 1, 2), (1, 1, 2), (1, 2, 1)]
    );
}

/// App statistics see each app's channels: created and the most held since the last
/// report (which starts a new period), and how many are held now after idle ones go.
#[test]
fn app_channel_counts_report_opened_peak_and_held() {
    let limits = CoreLimits {
        channel_idle_retain_ms: 50,
        ..Default::default()
    };
    let hub = Hub::new(OriginId(1), limits);
    for (serial, (app, channel)) in [("a", "1"), ("a", "2"), ("b", "1")].into_iter().enumerate() {
        hub.publish(
            &ChannelKey::new(app, channel),
            &publisher("P", serial as u64),
            vec![msg("x")],
            0,
        )
        .unwrap();
    }
    let mut counts = hub.take_app_channels();
    counts.sort_by(|x, y| x.app.cmp(&y.app));
    let summary: Vec<(&str, usize, u64, usize)> = counts
        .iter()
        .map(|c| (&*c.app, c.held, c.opened, c.peak))
        .collect();
    assert_eq!(summary, vec![("a", 2, 2, 2), ("b", 1, 1, 1)]);
    // A new period: nothing opened, the peak is what is held.
    hub.sweep(50);
    assert_eq!(
        hub.take_app_channels(),
        Vec::new(),
        "all swept, nothing opened"
    );
    hub.publish(
        &ChannelKey::new("a", "3"),
        &publisher("P", 9),
        vec![msg("x")],
        60,
    )
    .unwrap();
    hub.sweep(110);
    let counts = hub.take_app_channels();
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (
            &*counts[0].app,
            counts[0].held,
            counts[0].opened,
            counts[0].peak
        ),
        ("a", 0, 1, 1)
    );
}

/// An event's data size is Ably's message size (name, clientId, data, extras) summed
/// over its messages: the id the server assigns is not part of it, so a delivery
/// counts what was published.
#[test]
fn event_data_bytes_is_ablys_message_size() {
    let hub = hub();
    let key = ChannelKey::new("a", "sizes");
    let rec = attach(&hub, &key, "S", true);
    let mut two = msg("name");
    two.client_id = Some("cid".into());
    hub.publish(&key, &publisher("P", 0), vec![msg("x"), two], 0)
        .unwrap();
    let events = rec.events.lock().unwrap();
    let event = events.iter().find(|e| e.is_message()).unwrap();
    assert!(event.frame.messages.as_ref().unwrap()[0].id.is_some());
    // "x" + "d", then "name" + "cid" + "d".
    assert_eq!(event.data_bytes(), 2 + 8);
    assert_eq!(event.presence_count(), 0);
}

/// `sweep` says whether anything still waits for it (an empty channel to retire, a
/// dropped connection's members, a channel opened since the last report), and every
/// channel that opens calls the hub's `on_channel_opened`, so housekeeping can sleep in
/// between.
#[test]
fn sweep_says_when_it_has_nothing_left() {
    let limits = CoreLimits {
        channel_idle_retain_ms: 50,
        ..Default::default()
    };
    let hub = Hub::new(OriginId(1), limits);
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = opened.clone();
    hub.on_channel_opened(Box::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    assert!(!hub.sweep(0), "an empty hub waits for nothing");
    let key = ChannelKey::new("a", "1");
    hub.publish(&key, &publisher("P", 0), vec![msg("x")], 0)
        .unwrap();
    assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 1);
    hub.take_app_channels();
    assert!(hub.sweep(49), "an empty channel waits to be retired");
    assert!(!hub.sweep(50), "retired: nothing left");
    let _watcher = attach(&hub, &key, "W", true);
    assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert!(hub.sweep(60), "opened since the last report");
    hub.take_app_channels();
    assert!(!hub.sweep(61), "a channel with a subscriber holds still");
    hub.presence(&key, &publisher("A", 0), vec![enter("A", "alice", 0)], 70)
        .unwrap();
    hub.connection_dropped("a", "A", vec![key.name.clone()], 100);
    assert!(
        hub.sweep(101),
        "a dropped connection's member waits to leave"
    );
}

/// Anti-entropy pages (`cursors_from`) pass their `skip` on and cover every channel in
/// turn, also when a node holds more channels than a page takes; each page is at most
/// `max` long, and one page of `max` ≥ all channels lists each once.
#[test]
fn cursor_pages_cover_every_channel_in_turn() {
    let hub = hub();
    let keys: Vec<ChannelKey> = (0..7)
        .map(|i| ChannelKey::new("app", &format!("c{i}")))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        hub.publish(key, &publisher("A", i as u64), vec![msg("m")], 100)
            .unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    let mut skip = 0;
    for _ in 0..7 {
        let (page, next) = hub.cursors_from(skip, 3);
        assert_eq!(page.len(), 3);
        for (key, cursor) in page {
            assert_eq!(cursor.get(OriginId(7)), 1, "{key:?}'s cursor");
            *seen.entry(key.name.to_string()).or_insert(0) += 1;
        }
        skip = next;
    }
    // 7 pages of 3 over 7 channels: each listed exactly 3 times.
    assert_eq!(seen.len(), 7);
    assert!(seen.values().all(|&n| n == 3), "{seen:?}");
    let (all, _) = hub.cursors_from(5, 100);
    let mut names: Vec<String> = all.iter().map(|(k, _)| k.name.to_string()).collect();
    names.sort();
    assert_eq!(names, (0..7).map(|i| format!("c{i}")).collect::<Vec<_>>());
    assert!(Hub::new(OriginId(1), CoreLimits::default())
        .cursors_from(3, 10)
        .0
        .is_empty());
}

/// Pages that cross shard boundaries and wrap around the end: over 200 channels (spread
/// over every shard), 200 pages of 37 list each channel exactly 37 times.
#[test]
fn cursor_pages_cross_shards_and_wrap() {
    let hub = hub();
    for i in 0..200u64 {
        let key = ChannelKey::new("app", &format!("c{i}"));
        hub.publish(&key, &publisher("A", i), vec![msg("m")], 100)
            .unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    let mut skip = 0;
    for _ in 0..200 {
        let (page, next) = hub.cursors_from(skip, 37);
        assert_eq!(page.len(), 37);
        for (key, _) in page {
            *seen.entry(key.name.to_string()).or_insert(0) += 1;
        }
        skip = next;
    }
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|&n| n == 37), "{seen:?}");
}

/// A remote presence event that changes nothing here (the member was seeded from the
/// home while this node warmed the channel) is delivered to nobody, but logged as the
/// origin's: a peer repairing that sequence from this node gets it and has the member.
#[test]
fn a_presence_event_already_known_here_is_logged_for_repair() {
    let key = ChannelKey::new("app", "room");
    let origin = Hub::new(OriginId(1), CoreLimits::default());
    let at_origin = attach(&origin, &key, "origin-watcher", true);
    origin
        .presence(
            &key,
            &publisher("o-conn", 1),
            vec![enter("o-conn", "alice", 1)],
            2,
        )
        .unwrap();
    let entered = RemoteEvent::from_event(&at_origin.events.lock().unwrap()[0]);

    let warmed = hub();
    assert_eq!(warmed.seed_members(&key, origin.members(&key), 3), 1);
    let watcher = attach(&warmed, &key, "watcher", true);
    warmed.apply_remote(&key, entered, 4).unwrap();
    assert!(
        watcher.events.lock().unwrap().is_empty(),
        "nothing new to deliver"
    );
    assert_eq!(warmed.cursor(&key).get(OriginId(1)), 1);
    let logged = warmed.events_of(&key, OriginId(1), 1, 1);
    assert_eq!(logged.len(), 1, "the repair answer has the event");

    let peer = Hub::new(OriginId(9), CoreLimits::default());
    peer.apply_remote(&key, RemoteEvent::from_event(&logged[0]), 5)
        .unwrap();
    let members: Vec<String> = peer
        .members(&key)
        .into_iter()
        .filter_map(|m| m.client_id)
        .collect();
    assert_eq!(members, ["alice"]);
}

/// A gap reports up to the highest missing event below the one that arrived, not over the
/// events already waiting right below it: a burst of events behind one hole reports the
/// same gap each time, not a range growing with each event (each ask for it answered
/// with the events already waiting). Holes below a waiting run stay in the range.
#[test]
fn a_gap_reports_the_holes_below_the_event_not_what_waits_right_below_it() {
    let key = ChannelKey::new("app", "burst");
    let node = hub();
    let events = published_remotely(&key, 9);
    let gap = |from, to| RemoteOutcome::Gap {
        origin: OriginId(1),
        missing: (from, to),
    };
    let apply = |seq: usize| node.apply_remote(&key, events[seq - 1].clone(), 1).unwrap();
    assert_eq!(apply(3), gap(1, 2));
    assert_eq!(
        apply(4),
        gap(1, 2),
        "4 opens no hole: 3 waits right below it"
    );
    assert_eq!(apply(5), gap(1, 2));
    assert_eq!(
        apply(8),
        gap(1, 7),
        "8 opens 6..=7: asked with the first hole"
    );
    assert_eq!(
        apply(9),
        gap(1, 7),
        "9 waits right behind 8: the holes below are 1..=7"
    );
    assert_eq!(apply(1), RemoteOutcome::Applied(1));
    assert_eq!(
        apply(2),
        RemoteOutcome::Applied(4),
        "2, then 3, 4 and 5 waiting"
    );
    assert_eq!(apply(7), gap(6, 6));
    assert_eq!(apply(6), RemoteOutcome::Applied(4));
    assert_eq!(node.cursor(&key).get(OriginId(1)), 9);
}

/// `count` one-message publishes of origin 1 on `key` (sequences 1..=count), as another
/// node's replicator sends them.
fn published_remotely(key: &ChannelKey, count: u64) -> Vec<RemoteEvent> {
    let origin = Hub::new(OriginId(1), CoreLimits::default());
    (0..count)
        .map(|i| {
            let out = origin
                .publish(key, &publisher("o", i), vec![msg(&format!("m{i}"))], 1)
                .unwrap();
            RemoteEvent::from_event(&out.event.unwrap())
        })
        .collect()
}
