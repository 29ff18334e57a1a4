//! Continuity through the core: resume from a cursor, rewind, idempotent publish, and a
//! property test over random drops and resumes.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Cursor, Hub, LogLimits, OriginId,
    Publisher, Rewind, Subscriber,
};
use tern_protocol::{flags, Data, Message};

const ALL: u64 = flags::PUBLISH | flags::SUBSCRIBE | flags::PRESENCE | flags::PRESENCE_SUBSCRIBE;

/// A client's view: what it received, in order, and the last channelSerial it saw.
#[derive(Default)]
struct Client {
    received: Mutex<Vec<String>>,
    last_serial: Mutex<String>,
}

impl Client {
    fn take(&self, event: &ChannelEvent) {
        for m in event.frame.messages.iter().flatten() {
            self.received
                .lock()
                .unwrap()
                .push(m.name.clone().unwrap_or_default());
        }
        *self.last_serial.lock().unwrap() = event.frame.channel_serial.clone().unwrap_or_default();
    }
}

struct Sink(Arc<Client>);

impl Subscriber for Sink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        self.0.take(event);
        true
    }
}

fn msg(name: &str) -> Message {
    Message {
        name: Some(name.into()),
        data: Some(Data::String("d".into())),
        ..Default::default()
    }
}

fn publisher(n: u64) -> Publisher {
    Publisher {
        connection_id: Some("pub".into()),
        frame_id: format!("pub:{n}"),
    }
}

/// Publishes `m0..m{n-1}` on `hub`, returning them as another node receives them.
fn publish_remote(hub: &Hub, key: &ChannelKey, n: u64) -> Vec<tern_core::RemoteEvent> {
    (0..n)
        .map(|i| {
            let out = hub
                .publish(key, &publisher(i), vec![msg(&format!("m{i}"))], 1)
                .unwrap();
            tern_core::RemoteEvent::from_event(&out.event.unwrap())
        })
        .collect()
}

/// Attaches `client` (resuming from its last serial if `resume`), delivering the backlog
/// the way the edge does: ATTACHED first, then backlog, then live. Returns `resumed`.
fn attach(
    hub: &Hub,
    key: &ChannelKey,
    id: &str,
    client: &Arc<Client>,
    resume: bool,
    rewind: Option<Rewind>,
) -> bool {
    let resume_from = resume.then(|| Cursor::decode(&client.last_serial.lock().unwrap()).unwrap());
    let options = AttachOptions {
        modes: ALL,
        echo: true,
        resume_from,
        rewind,
        delta: false,
    };
    let mut resumed = false;
    hub.attach(
        key,
        id.into(),
        options,
        Arc::new(Sink(client.clone())),
        |snap| {
            *client.last_serial.lock().unwrap() = snap.channel_serial.clone();
            for event in &snap.backlog {
                client.take(event);
            }
            resumed = snap.resumed;
        },
        0,
    )
    .unwrap();
    resumed
}

/// A subscriber that drops and re-attaches with its channelSerial gets RESUMED and
/// exactly the messages it missed, once each, in order.
#[test]
fn resume_replays_exactly_the_missed_messages() {
    let hub = Hub::new(OriginId(3), CoreLimits::default());
    let key = ChannelKey::new("app", "c");
    let client = Arc::new(Client::default());
    attach(&hub, &key, "s", &client, false, None);
    for i in 0..3 {
        hub.publish(&key, &publisher(i), vec![msg(&format!("m{i}"))], 1)
            .unwrap();
    }
    hub.connection_dropped("app", "s", vec![key.name.clone()], 2);
    for i in 3..6 {
        hub.publish(&key, &publisher(i), vec![msg(&format!("m{i}"))], 3)
            .unwrap();
    }
    assert!(attach(&hub, &key, "s", &client, true, None));
    hub.publish(&key, &publisher(6), vec![msg("m6")], 4)
        .unwrap();
    let expected: Vec<String> = (0..7).map(|i| format!("m{i}")).collect();
    assert_eq!(*client.received.lock().unwrap(), expected);
}

/// Resuming from further back than the log holds reports lost continuity, never a gap.
#[test]
fn resume_beyond_the_log_reports_continuity_lost() {
    let limits = CoreLimits {
        log: LogLimits {
            events_max: 2,
            bytes_max: 1 << 20,
            age_max_ms: 1_000_000,
        },
        ..Default::default()
    };
    let hub = Hub::new(OriginId(3), limits);
    let key = ChannelKey::new("app", "c");
    let client = Arc::new(Client::default());
    attach(&hub, &key, "s", &client, false, None);
    hub.detach(&key, "s", 0);
    for i in 0..5 {
        hub.publish(&key, &publisher(i), vec![msg(&format!("m{i}"))], 1)
            .unwrap();
    }
    assert!(!attach(&hub, &key, "s", &client, true, None));
    assert!(client.received.lock().unwrap().is_empty());
    // A cursor claiming events the channel never had is not resumable either.
    let forged = Arc::new(Client::default());
    *forged.last_serial.lock().unwrap() = "v1.3-ff".into();
    assert!(!attach(&hub, &key, "f", &forged, true, None));
}

/// Rewind by count replays the last N messages (cutting a multi-message frame), and by
/// time replays messages since then; live traffic follows.
#[test]
fn rewind_by_count_and_time() {
    let hub = Hub::new(OriginId(3), CoreLimits::default());
    let key = ChannelKey::new("app", "c");
    hub.publish(&key, &publisher(0), vec![msg("a"), msg("b")], 10)
        .unwrap();
    hub.publish(&key, &publisher(1), vec![msg("c")], 20)
        .unwrap();
    hub.publish(&key, &publisher(2), vec![msg("d")], 30)
        .unwrap();
    let by_count = Arc::new(Client::default());
    attach(&hub, &key, "x", &by_count, false, Some(Rewind::Count(3)));
    assert_eq!(*by_count.received.lock().unwrap(), vec!["b", "c", "d"]);
    let by_time = Arc::new(Client::default());
    attach(&hub, &key, "y", &by_time, false, Some(Rewind::Since(20)));
    hub.publish(&key, &publisher(3), vec![msg("e")], 40)
        .unwrap();
    assert_eq!(*by_time.received.lock().unwrap(), vec!["c", "d", "e"]);
}

/// A message re-published with the same client-supplied id is not delivered twice and
/// gets its original serial back; ids expire after the window.
#[test]
fn idempotent_publish_by_message_id() {
    let limits = CoreLimits {
        idempotency_window_ms: 100,
        ..Default::default()
    };
    let hub = Hub::new(OriginId(3), limits);
    let key = ChannelKey::new("app", "c");
    let client = Arc::new(Client::default());
    attach(&hub, &key, "s", &client, false, None);
    let with_id = |id: &str| Message {
        id: Some(id.into()),
        ..msg(id)
    };
    let first = hub
        .publish(&key, &publisher(0), vec![with_id("abc:0")], 1)
        .unwrap();
    let again = hub
        .publish(
            &key,
            &publisher(1),
            vec![with_id("abc:0"), with_id("abc:1")],
            50,
        )
        .unwrap();
    assert_eq!(again.serials[0], first.serials[0]);
    assert_ne!(again.serials[1], first.serials[0]);
    assert_eq!(*client.received.lock().unwrap(), vec!["abc:0", "abc:1"]);
    let dup_only = hub
        .publish(&key, &publisher(2), vec![with_id("abc:1")], 60)
        .unwrap();
    assert!(dup_only.event.is_none());
    hub.publish(&key, &publisher(3), vec![with_id("abc:0")], 500)
        .unwrap();
    assert_eq!(
        client.received.lock().unwrap().len(),
        3,
        "expired ids publish again"
    );
}

#[derive(Debug, Clone)]
enum Step {
    Publish,
    Drop(usize),
    Resume(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Publish),
        1 => (0..3usize).prop_map(Step::Drop),
        1 => (0..3usize).prop_map(Step::Resume),
    ]
}

proptest! {
    /// Random interleavings of publish, transport drop and resume for three subscribers:
    /// whenever a resume reports continuity, each subscriber's delivered sequence equals
    /// the published sequence since it first attached: no loss, no duplicate, in order.
    #[test]
    fn resumed_subscribers_see_every_message_once(
        steps in proptest::collection::vec(step(), 1..120),
        log_events in 4usize..40,
    ) {
        let limits = CoreLimits { log: LogLimits { events_max: log_events, bytes_max: 1 << 30, age_max_ms: i64::MAX / 2 }, ..Default::default() };
        let hub = Hub::new(OriginId(9), limits);
        let key = ChannelKey::new("app", "c");
        let clients: Vec<Arc<Client>> = (0..3).map(|_| Arc::new(Client::default())).collect();
        let mut attached = [true; 3];
        let mut continuous = [true; 3];
        for (i, c) in clients.iter().enumerate() {
            attach(&hub, &key, &format!("s{i}"), c, false, None);
        }
        let mut published = Vec::new();
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Publish => {
                    let name = format!("m{n}");
                    hub.publish(&key, &publisher(n as u64), vec![msg(&name)], n as i64).unwrap();
                    published.push(name);
                }
                Step::Drop(i) if attached[i] => {
                    hub.connection_dropped("app", &format!("s{i}"), vec![key.name.clone()], n as i64);
                    attached[i] = false;
                }
                Step::Resume(i) if !attached[i] => {
                    let resumed = attach(&hub, &key, &format!("s{i}"), &clients[i], true, None);
                    continuous[i] &= resumed;
                    attached[i] = true;
                }
                _ => {}
            }
        }
        for (i, client) in clients.iter().enumerate() {
            if !attached[i] {
                let resumed = attach(&hub, &key, &format!("s{i}"), client, true, None);
                continuous[i] &= resumed;
            }
            if continuous[i] {
                prop_assert_eq!(&*client.received.lock().unwrap(), &published);
            } else {
                // Continuity was reported lost: still never a duplicate, never reordered.
                let got = client.received.lock().unwrap().clone();
                let positions: Vec<usize> = got.iter().map(|g| published.iter().position(|p| p == g).unwrap()).collect();
                let increasing = positions.windows(2).all(|w| w[0] < w[1]);
                prop_assert!(increasing, "duplicate or reordered delivery: {:?}", got);
            }
        }
    }
}

/// Remote events apply in origin order: a duplicate is dropped, an early event waits
/// behind its gap (reported for repair), and filling the gap applies both; the
/// receiving node's cursor then resumes a subscriber exactly like a local one.
#[test]
fn remote_events_apply_in_origin_order() {
    use tern_core::RemoteOutcome;
    let origin_hub = Hub::new(OriginId(1), CoreLimits::default());
    let replica = Hub::new(OriginId(2), CoreLimits::default());
    let key = ChannelKey::new("app", "c");
    let client = Arc::new(Client::default());
    attach(&replica, &key, "s", &client, false, None);
    let events = publish_remote(&origin_hub, &key, 3);
    assert_eq!(
        replica.apply_remote(&key, events[0].clone(), 2).unwrap(),
        RemoteOutcome::Applied(1)
    );
    assert_eq!(
        replica.apply_remote(&key, events[0].clone(), 2).unwrap(),
        RemoteOutcome::Duplicate
    );
    assert_eq!(
        replica.apply_remote(&key, events[2].clone(), 2).unwrap(),
        RemoteOutcome::Gap {
            origin: OriginId(1),
            missing: (2, 2)
        }
    );
    assert_eq!(replica.pending_len(&key), 1);
    assert_eq!(
        replica.apply_remote(&key, events[1].clone(), 2).unwrap(),
        RemoteOutcome::Applied(2)
    );
    assert_eq!(replica.pending_len(&key), 0);
    assert_eq!(*client.received.lock().unwrap(), vec!["m0", "m1", "m2"]);
    assert_eq!(replica.cursor(&key), origin_hub.cursor(&key));
    assert_eq!(replica.events_of(&key, OriginId(1), 2, 3).len(), 2);
}

/// Failing over to a node that is behind: the client resumes there with a cursor ahead
/// of that node for some origin. When those events reach the node, the client does not
/// get them again; later ones it gets once, in order.
#[test]
fn resuming_on_a_node_that_is_behind_delivers_nothing_twice() {
    let origin_hub = Hub::new(OriginId(1), CoreLimits::default());
    let ahead = Hub::new(OriginId(2), CoreLimits::default());
    let behind = Hub::new(OriginId(3), CoreLimits::default());
    let key = ChannelKey::new("app", "c");
    let client = Arc::new(Client::default());
    attach(&ahead, &key, "s", &client, false, None);
    attach(
        &behind,
        &key,
        "watcher",
        &Arc::new(Client::default()),
        false,
        None,
    );
    let events = publish_remote(&origin_hub, &key, 6);
    // `ahead` has m0..m3 (the client saw them), `behind` only m0..m1.
    for event in &events[..4] {
        ahead.apply_remote(&key, event.clone(), 2).unwrap();
    }
    for event in &events[..2] {
        behind.apply_remote(&key, event.clone(), 2).unwrap();
    }
    // The client's node dies; it resumes on `behind` with its channelSerial.
    attach(&behind, &key, "s2", &client, true, None);
    for event in &events[2..] {
        behind.apply_remote(&key, event.clone(), 3).unwrap();
    }
    let expected: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    assert_eq!(*client.received.lock().unwrap(), expected);
}

/// A client that fails over to a node behind the one it left (it has seen origin O up
/// to 10, this node only up to 8) keeps a channelSerial that never goes back: ATTACHED
/// and every event until this node catches up carry O:10, so a second failover cannot
/// replay O:9 and O:10. The events it already has are not delivered again.
#[test]
fn a_client_ahead_of_its_new_node_keeps_a_serial_that_never_goes_back() {
    let key = ChannelKey::new("app", "c");
    let origin = Hub::new(OriginId(1), CoreLimits::default());
    let behind = Hub::new(OriginId(2), CoreLimits::default());
    let other = Hub::new(OriginId(3), CoreLimits::default());
    let from_origin = publish_remote(&origin, &key, 11);
    for event in &from_origin[..8] {
        behind.apply_remote(&key, event.clone(), 1).unwrap();
    }
    let client = Arc::new(Client::default());
    let mut seen = Cursor::new();
    seen.advance(OriginId(1), 10);
    *client.last_serial.lock().unwrap() = seen.encode();
    let serial_of = |client: &Client| Cursor::decode(&client.last_serial.lock().unwrap()).unwrap();

    assert!(attach(&behind, &key, "s", &client, true, None));
    assert_eq!(
        serial_of(&client).get(OriginId(1)),
        10,
        "ATTACHED covers what the client saw"
    );

    let other_publisher = Publisher {
        connection_id: Some("other".into()),
        frame_id: "other:0".into(),
    };
    let from_other = other
        .publish(&key, &other_publisher, vec![msg("p0")], 1)
        .unwrap();
    let from_other = tern_core::RemoteEvent::from_event(&from_other.event.unwrap());
    behind.apply_remote(&key, from_other, 2).unwrap();
    let serial = serial_of(&client);
    assert_eq!((serial.get(OriginId(1)), serial.get(OriginId(3))), (10, 1));

    // The node catches up: what the client has is not sent again; then live as usual.
    for event in &from_origin[8..] {
        behind.apply_remote(&key, event.clone(), 3).unwrap();
    }
    let serial = serial_of(&client);
    assert_eq!((serial.get(OriginId(1)), serial.get(OriginId(3))), (11, 1));
    assert_eq!(
        *client.received.lock().unwrap(),
        vec!["p0".to_string(), "m10".to_string()]
    );
}
