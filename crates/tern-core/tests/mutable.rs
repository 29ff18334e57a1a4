//! Changes and annotations of messages through the hub's public API.

use std::sync::{Arc, Mutex};

use tern_core::mutation::apply_change;
use tern_core::{
    AttachOptions, ChannelEvent, ChannelKey, CoreLimits, Hub, OriginId, Publisher, RemoteEvent,
    Rewind, SerialPosition, Subscriber,
};
use tern_protocol::{action, flags, message_action, Annotation, Data, Message};

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Arc<ChannelEvent>>>,
}

impl Subscriber for Recorder {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        self.events.lock().unwrap().push(event.clone());
        true
    }
}

impl Recorder {
    fn actions(&self) -> Vec<u8> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.frame.action)
            .collect()
    }
    fn messages(&self) -> Vec<Message> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .flat_map(|e| e.frame.messages.clone().unwrap_or_default())
            .collect()
    }
}

fn attach(
    hub: &Hub,
    key: &ChannelKey,
    conn: &str,
    modes: u64,
    rewind: Option<Rewind>,
) -> Arc<Recorder> {
    let rec = Arc::new(Recorder::default());
    let options = AttachOptions {
        modes,
        echo: true,
        resume_from: None,
        rewind,
        delta: false,
    };
    // The backlog (rewind) is what the connection sends first: record it as delivered.
    let backlog = rec.clone();
    let reply = move |snapshot: &tern_core::AttachSnapshot| {
        backlog
            .events
            .lock()
            .unwrap()
            .extend(snapshot.backlog.iter().cloned());
    };
    hub.attach(key, conn.into(), options, rec.clone(), reply, 0)
        .unwrap();
    rec
}

fn publisher(id: &str) -> Publisher {
    Publisher {
        connection_id: None,
        frame_id: id.into(),
    }
}

fn text(message: &Message) -> &str {
    match &message.data {
        Some(Data::String(s)) => s,
        other => panic!("not text: {other:?}"),
    }
}

fn publish(hub: &Hub, key: &ChannelKey, message: Message, now_ms: i64) -> String {
    let outcome = hub
        .publish(
            key,
            &publisher(&format!("p{now_ms}")),
            vec![message],
            now_ms,
        )
        .unwrap();
    outcome.serials[0].clone().unwrap()
}

fn change(
    hub: &Hub,
    key: &ChannelKey,
    serial: &str,
    action: u8,
    data: &str,
    now_ms: i64,
) -> String {
    let (original, changes) = hub.logged_message(key, serial);
    let latest = tern_core::mutation::latest(original.unwrap(), changes);
    let made = apply_change(
        &latest,
        Message {
            action: Some(action),
            data: Some(Data::String(data.into())),
            ..Default::default()
        },
    )
    .unwrap();
    publish(hub, key, made, now_ms)
}

/// A change keeps the message's serial, gets a version serial that sorts after it even
/// when the clock is behind the message's time, and reaches subscribers as its own event.
#[test]
fn a_change_is_an_event_named_by_its_version() {
    let hub = Hub::new(OriginId(7), CoreLimits::default());
    let key = ChannelKey::new("app", "ch");
    let rec = attach(&hub, &key, "c1", flags::SUBSCRIBE, None);
    let serial = publish(
        &hub,
        &key,
        Message {
            data: Some(Data::String("a".into())),
            ..Default::default()
        },
        5_000,
    );
    // A node whose clock is a second behind makes the change.
    let version = change(&hub, &key, &serial, message_action::UPDATE, "b", 4_000);
    assert!(version > serial, "{version} sorts after {serial}");
    let at = SerialPosition::decode(&version).unwrap();
    assert_eq!(at.timestamp_ms, 5_001);
    let got = rec.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].serial.as_deref(), Some(serial.as_str()));
    assert_eq!(got[1].action, Some(message_action::UPDATE));
    assert_eq!(
        got[1].version.as_ref().unwrap().serial.as_deref(),
        Some(version.as_str())
    );
    assert_eq!(got[1].version.as_ref().unwrap().timestamp, Some(5_001));
    let (original, changes) = hub.logged_message(&key, &serial);
    assert_eq!(text(&original.unwrap()), "a");
    assert_eq!(changes.len(), 1);
}

/// Another node applying the same events (in origin order) holds the same message and
/// changes under the same serials.
#[test]
fn changes_replicate_with_their_serials() {
    let origin = Hub::new(OriginId(7), CoreLimits::default());
    let replica = Hub::new(OriginId(9), CoreLimits::default());
    let key = ChannelKey::new("app", "ch");
    let rec = attach(&origin, &key, "c1", flags::SUBSCRIBE, None);
    let serial = publish(
        &origin,
        &key,
        Message {
            data: Some(Data::String("x".into())),
            ..Default::default()
        },
        10,
    );
    change(&origin, &key, &serial, message_action::APPEND, "y", 11);
    for event in rec.events.lock().unwrap().iter() {
        replica
            .apply_remote(&key, RemoteEvent::from_event(event), 12)
            .unwrap();
    }
    assert_eq!(
        replica.logged_message(&key, &serial),
        origin.logged_message(&key, &serial)
    );
}

/// A rewind after changes replays each message once, in its latest version (appends
/// joined, read back as an update), with the channel's current serial.
#[test]
fn rewind_replays_latest_versions() {
    let hub = Hub::new(OriginId(7), CoreLimits::default());
    let key = ChannelKey::new("app", "ch");
    let first = publish(
        &hub,
        &key,
        Message {
            data: Some(Data::String("1".into())),
            ..Default::default()
        },
        10,
    );
    let second = publish(
        &hub,
        &key,
        Message {
            data: Some(Data::String("Hello".into())),
            ..Default::default()
        },
        11,
    );
    let appended = change(&hub, &key, &second, message_action::APPEND, " World", 12);
    change(&hub, &key, &first, message_action::DELETE, "", 13);
    let rec = attach(&hub, &key, "late", flags::SUBSCRIBE, Some(Rewind::Count(1)));
    let got = rec.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].serial.as_deref(), Some(second.as_str()));
    assert_eq!(text(&got[0]), "Hello World");
    assert_eq!(got[0].action, Some(message_action::UPDATE));
    assert_eq!(
        got[0].version.as_ref().unwrap().serial.as_deref(),
        Some(appended.as_str())
    );
    let all = attach(
        &hub,
        &key,
        "later",
        flags::SUBSCRIBE,
        Some(Rewind::Count(10)),
    )
    .messages();
    let actions: Vec<_> = all.iter().map(|m| m.action).collect();
    assert_eq!(
        actions,
        [Some(message_action::DELETE), Some(message_action::UPDATE)]
    );
}

/// Annotations reach only attachments with ANNOTATION_SUBSCRIBE, get serials after their
/// message's, and messages do not reach an annotation-only attachment.
#[test]
fn annotations_go_to_annotation_subscribers_only() {
    let hub = Hub::new(OriginId(7), CoreLimits::default());
    let key = ChannelKey::new("app", "ch");
    let messages_only = attach(&hub, &key, "m", flags::SUBSCRIBE, None);
    let annotations_only = attach(&hub, &key, "a", flags::ANNOTATION_SUBSCRIBE, None);
    let serial = publish(&hub, &key, Message::default(), 1_000);
    let annotation = Annotation {
        kind: Some("reaction:distinct.v1".into()),
        name: Some("👍".into()),
        client_id: Some("x".into()),
        message_serial: Some(serial.clone()),
        ..Default::default()
    };
    let (serials, _) = hub
        .annotate(&key, &publisher("ann"), vec![annotation], 900)
        .unwrap();
    assert!(serials[0] > serial);
    assert_eq!(messages_only.actions(), [action::MESSAGE]);
    assert_eq!(annotations_only.actions(), [action::ANNOTATION]);
    let events = annotations_only.events.lock().unwrap();
    let got = &events[0].frame.annotations.as_ref().unwrap()[0];
    assert_eq!(got.serial.as_ref(), Some(&serials[0]));
    assert_eq!(got.action, Some(0));
    assert_eq!(got.id.as_deref(), Some("ann:0"));
}
