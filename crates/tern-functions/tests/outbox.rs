//! The outbox and its delivery task against a real store and a real HTTP function on
//! loopback: the bound on undelivered events, the delivered mark across a reopen, that
//! only this node's own events are delivered, the takeover of a dead origin's shadow
//! rows from its mark, and lifecycle events folded from several nodes' reports.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tern_core::{ChannelEvent, ChannelKey, OriginId};
use tern_functions::{Mode, Outbox, RuleConfig, Source};
use tern_protocol::{Data, Message, ProtocolMessage};

const ORIGIN: OriginId = OriginId(7);

/// A function on loopback: answers 503 while `down`, else 200 and keeps the serials of
/// the items it got.
#[derive(Clone, Default)]
struct Function {
    down: Arc<AtomicBool>,
    serials: Arc<Mutex<Vec<String>>>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Closes the connection with every answer (`connection: close`).
    one_shot: Arc<AtomicBool>,
}

impl Function {
    async fn start(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let function = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                function.connections.fetch_add(1, Ordering::SeqCst);
                let function = function.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let function = function.clone();
                            async move {
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let status = function.receive(&body);
                                // One-shot: the answer closes the connection.
                                let connection = if function.one_shot.load(Ordering::SeqCst) {
                                    "close"
                                } else {
                                    "keep-alive"
                                };
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .header(hyper::header::CONNECTION, connection)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        port
    }

    fn receive(&self, body: &[u8]) -> u16 {
        if self.down.load(Ordering::SeqCst) {
            return 503;
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let json: Value = serde_json::from_slice(body).unwrap();
        let mut serials = self.serials.lock().unwrap();
        for item in json["items"].as_array().unwrap() {
            serials.push(item["serial"].as_str().unwrap().to_string());
        }
        200
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn serials(&self) -> Vec<String> {
        self.serials.lock().unwrap().clone()
    }
}

fn rule(port: u16, outbox_items_max: u64) -> tern_functions::Rule {
    RuleConfig {
        id: "r".into(),
        app: "app".into(),
        channel_filter: None,
        sources: vec![Source::Message],
        url: format!("http://127.0.0.1:{port}/hook"),
        headers: Vec::new(),
        mode: Mode::Batched,
        batch_window_ms: 10,
        batch_items_max: 4,
        request_bytes_max: 1 << 20,
        enveloped: true,
        signing_key: None,
        outbox_items_max,
        request_timeout_ms: 2_000,
        retry_delay_initial_ms: 50,
        retry_delay_max_ms: 200,
        retry_for_ms: 600_000,
        site: "tern".into(),
    }
    .validate()
    .unwrap()
}

/// One event of one message with serial `s<seq>`, from `origin`.
fn event(origin: OriginId, seq: u64) -> ChannelEvent {
    let message = Message {
        id: Some(format!("c:{seq}:0")),
        data: Some(Data::String(format!("d{seq}"))),
        timestamp: Some(1_000 + seq as i64),
        serial: Some(format!("s{seq}")),
        ..Message::default()
    };
    let frame = ProtocolMessage {
        action: tern_protocol::action::MESSAGE,
        channel: Some("ch".into()),
        timestamp: Some(1_000 + seq as i64),
        messages: Some(vec![message]),
        ..ProtocolMessage::default()
    };
    ChannelEvent::new(origin, seq, None, frame)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn serials(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|seq| format!("s{seq}")).collect()
}

/// With the function down, at most `outbox_items_max` events wait; the rest are dropped
/// (not queued), and once the function is back exactly the kept ones arrive, in order.
#[tokio::test]
async fn undelivered_events_are_bounded() {
    let function = Function::default();
    function.down.store(true, Ordering::SeqCst);
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store.clone(), ORIGIN, vec![rule(port, 10)]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    for seq in 1..=25 {
        outbox.record(&key, &event(ORIGIN, seq));
    }
    assert_eq!(outbox.rules()[0].undelivered(), 10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(function.serials().is_empty());
    function.down.store(false, Ordering::SeqCst);
    wait_for("10 delivered", || function.serials().len() >= 10).await;
    assert_eq!(function.serials(), serials(1..=10));
    wait_for("the outbox to drain", || {
        outbox.rules()[0].undelivered() == 0
    })
    .await;
    // Room again: new events are taken.
    outbox.record(&key, &event(ORIGIN, 26));
    wait_for("the 11th", || function.serials().len() >= 11).await;
    assert_eq!(function.serials().last().unwrap(), "s26");
}

/// Events accepted by another node (another origin) are that node's to deliver.
#[tokio::test]
async fn only_own_events_are_delivered() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    outbox.record(&key, &event(OriginId(99), 1));
    outbox.record(&key, &event(ORIGIN, 2));
    outbox.record(
        &key,
        &ChannelEvent::new(ORIGIN, 3, None, {
            let mut frame = event(ORIGIN, 3).frame;
            frame.messages = None;
            frame
        }),
    );
    wait_for("own event", || !function.serials().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(function.serials(), ["s2"]);
    let other = ChannelKey::new("other-app", "ch");
    outbox.record(&other, &event(ORIGIN, 4));
    assert_eq!(outbox.rules()[0].undelivered(), 0, "another app's channel");
}

/// After a reopen of the same redb file, delivery resumes after the delivered mark:
/// the delivered events are not sent again and the new ones are, with the outbox
/// sequence continuing.
#[tokio::test]
async fn resumes_after_the_delivered_mark() {
    let dir = tempfile::tempdir().unwrap();
    let config = tern_store::StoreConfig {
        path: Some(dir.path().join("history.redb")),
        ..tern_store::StoreConfig::default()
    };
    let function = Function::default();
    let port = function.start().await;
    let key = ChannelKey::new("app", "ch");
    {
        let store = tern_store::open(&config).unwrap();
        let outbox = Outbox::open(store.clone(), ORIGIN, vec![rule(port, 100)]).unwrap();
        let tasks = tern_functions::spawn(&outbox);
        for seq in 1..=6 {
            outbox.record(&key, &event(ORIGIN, seq));
        }
        wait_for("6 delivered", || outbox.rules()[0].undelivered() == 0).await;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        // The mark is written after the last 2xx; let it reach the file.
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .unwrap();
    }
    assert_eq!(function.serials(), serials(1..=6));
    let store = tern_store::open(&config).unwrap();
    let outbox = Outbox::open(store, OriginId(8), vec![rule(port, 100)]).unwrap();
    assert_eq!(outbox.rules()[0].undelivered(), 0);
    let _tasks = tern_functions::spawn(&outbox);
    outbox.record(&key, &event(OriginId(8), 7));
    wait_for("the 7th", || function.serials().len() >= 7).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(function.serials(), serials(1..=7));
}

/// Events whose clock steps backwards (a wall-clock adjustment, another publisher's
/// timestamp) are still delivered in the order they were recorded: outbox positions
/// never go back.
#[tokio::test]
async fn order_survives_a_clock_step_back() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    for seq in 1..=6 {
        let mut stepped = event(ORIGIN, seq);
        // Timestamps 1006, 1005, … 1001: each earlier than the one before.
        stepped.frame.timestamp = Some(1_007 - seq as i64);
        outbox.record(&key, &ChannelEvent::new(ORIGIN, seq, None, stepped.frame));
    }
    wait_for("6 delivered", || function.serials().len() >= 6).await;
    assert_eq!(function.serials(), serials(1..=6));
}

/// Events larger than the byte bounds are loaded and sent a few at a time (never more
/// than two requests' worth in memory), and all of them arrive, in order.
#[tokio::test]
async fn byte_bounds_split_but_lose_nothing() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let mut rule = rule(port, 100);
    rule.config.request_bytes_max = 2_000;
    let outbox = Outbox::open(store, ORIGIN, vec![rule]).unwrap();
    let key = ChannelKey::new("app", "ch");
    for seq in 1..=20 {
        let mut big = event(ORIGIN, seq).frame;
        big.messages.as_mut().unwrap()[0].data = Some(Data::String("x".repeat(900)));
        outbox.record(&key, &ChannelEvent::new(ORIGIN, seq, None, big));
    }
    // Started after the rows are committed, so its first loads meet the byte bound.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _tasks = tern_functions::spawn(&outbox);
    wait_for("20 delivered", || function.serials().len() >= 20).await;
    assert_eq!(function.serials(), serials(1..=20));
    assert!(
        function.requests() >= 10,
        "at most two ~1 KB events per 2 KB request"
    );
}

/// When retention has removed every outbox row but the newest delivered mark is still
/// there (marks are written later than their rows), a reopened outbox continues its
/// numbering after the mark, so its count of undelivered events (and the bound on it)
/// stays right.
#[tokio::test]
async fn numbering_continues_after_rows_expire() {
    let dir = tempfile::tempdir().unwrap();
    let config = tern_store::StoreConfig {
        path: Some(dir.path().join("history.redb")),
        retention: vec![tern_functions::outbox::retention_rule(100)],
        ..tern_store::StoreConfig::default()
    };
    let function = Function::default();
    let port = function.start().await;
    let key = ChannelKey::new("app", "ch");
    {
        let store = tern_store::open(&config).unwrap();
        let outbox = Outbox::open(store.clone(), ORIGIN, vec![rule(port, 100)]).unwrap();
        let tasks = tern_functions::spawn(&outbox);
        for seq in 1..=3 {
            outbox.record(&key, &event(ORIGIN, seq));
        }
        wait_for("3 delivered", || outbox.rules()[0].undelivered() == 0).await;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        // The rows carry 1970 timestamps (the events'), the mark today's: a trim now
        // removes the rows and keeps the mark.
        let trimmed = tokio::task::spawn_blocking(move || {
            store.flush();
            store.trim(tern_store_now_ms())
        });
        assert_eq!(trimmed.await.unwrap().unwrap(), 3);
    }
    function.down.store(true, Ordering::SeqCst);
    let store = tern_store::open(&config).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    outbox.record(&key, &event(ORIGIN, 4));
    assert_eq!(outbox.rules()[0].undelivered(), 1);
    let _tasks = tern_functions::spawn(&outbox);
    function.down.store(false, Ordering::SeqCst);
    wait_for("the 4th", || function.serials().len() >= 4).await;
    assert_eq!(function.serials(), serials(1..=4));
}

fn tern_store_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Requests to a function that keeps its connections open reuse one connection; when
/// the function closes it, the next request opens another and nothing is lost.
#[tokio::test]
async fn connections_are_kept_alive() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    for seq in 1..=3 {
        outbox.record(&key, &event(ORIGIN, seq));
        wait_for("a delivery", || function.serials().len() as u64 >= seq).await;
    }
    assert_eq!(function.requests(), 3);
    assert_eq!(function.connections.load(Ordering::SeqCst), 1);
    function.one_shot.store(true, Ordering::SeqCst);
    for seq in 4..=6 {
        outbox.record(&key, &event(ORIGIN, seq));
        wait_for("a delivery", || function.serials().len() as u64 >= seq).await;
    }
    assert_eq!(function.serials(), serials(1..=6));
    // The first one-shot answer (the 4th request) closes the kept connection; the 5th
    // and the 6th open one each.
    assert_eq!(
        function.connections.load(Ordering::SeqCst),
        3,
        "then one per request"
    );
}

/// Shadows every other origin's events and aggregates every app (a test placement).
struct ShadowAll;

impl tern_functions::Placement for ShadowAll {
    fn shadows(&self, _key: &ChannelKey, _origin: OriginId) -> bool {
        true
    }
    fn aggregates(&self, _app: &str) -> bool {
        true
    }
}

/// `event(origin, seq)` accepted at `seq` seconds.
fn event_at_seconds(origin: OriginId, seq: u64) -> ChannelEvent {
    let mut event = event(origin, seq);
    event.frame.timestamp = Some(seq as i64 * 1000);
    event
}

/// A dead origin's shadow rows wait until a takeover, which delivers those accepted from
/// its mark less the skew on, in order, then what repair brings later; once only.
#[tokio::test]
async fn a_takeover_delivers_the_dead_origins_shadow_rows_from_its_mark() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    outbox.set_placement(Arc::new(ShadowAll));
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    let dead = OriginId(99);
    for seq in 1..=20 {
        outbox.record(&key, &event_at_seconds(dead, seq));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(function.serials().is_empty(), "shadows wait for a takeover");
    assert_eq!(
        outbox.rules()[0].undelivered(),
        0,
        "shadows are not this node's outbox"
    );

    // The dead node's mark: everything accepted before 10 s was delivered.
    assert_eq!(outbox.take_over(dead, "app/r=10000;other/x=5"), 1);
    assert_eq!(outbox.take_over(dead, "app/r=10000"), 0, "once");
    // From 10 s less the skew (1 s): s9 on.
    wait_for("s9..s20", || function.serials().len() >= 12).await;
    assert_eq!(function.serials(), serials(9..=20));
    // An event of the dead origin that repair brings later is delivered too.
    outbox.record(&key, &event_at_seconds(dead, 21));
    wait_for("s21", || function.serials().len() >= 13).await;
    assert_eq!(function.serials().last().unwrap(), "s21");
}

/// Without a published mark, a takeover delivers every shadow row kept.
#[tokio::test]
async fn a_takeover_without_a_mark_delivers_everything_shadowed() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    outbox.set_placement(Arc::new(ShadowAll));
    let key = ChannelKey::new("app", "ch");
    for seq in 1..=5 {
        outbox.record(&key, &event_at_seconds(OriginId(98), seq));
    }
    assert_eq!(outbox.take_over(OriginId(98), ""), 1);
    wait_for("s1..s5", || function.serials().len() >= 5).await;
    assert_eq!(function.serials(), serials(1..=5));
}

/// The published mark is the earliest accepted time still undelivered (not the newest
/// delivered row's), and the present once nothing waits.
#[tokio::test]
async fn the_mark_is_the_earliest_undelivered_accepted_time() {
    let function = Function::default();
    function.down.store(true, Ordering::SeqCst);
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![rule(port, 100)]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", "ch");
    // Accepted out of order (stamped before the lock): 5 s, then 3 s, then 7 s.
    for seq in [5, 3, 7] {
        outbox.record(&key, &event_at_seconds(ORIGIN, seq));
    }
    let marks = outbox.marks();
    assert_eq!(marks, "app/r=3000", "the earliest accepted still waiting");
    function.down.store(false, Ordering::SeqCst);
    wait_for("delivered", || outbox.rules()[0].undelivered() == 0).await;
    let mark: i64 = outbox.marks().trim_start_matches("app/r=").parse().unwrap();
    assert!(
        mark > 1_000_000_000_000,
        "nothing waits: the present ({mark})"
    );
}

/// An occupancy report event from `origin`: `connections` attachments on `room`.
fn report(origin: OriginId, seq: u64, connections: u64) -> ChannelEvent {
    use tern_functions::lifecycle::{report_message, Metrics, Report};
    let frame = ProtocolMessage {
        action: tern_protocol::action::MESSAGE,
        channel: Some(tern_functions::lifecycle::OCCUPANCY_CHANNEL.into()),
        timestamp: Some(1_000 + seq as i64),
        messages: Some(vec![report_message(&Report {
            channel: "room".into(),
            metrics: Metrics {
                connections,
                subscribers: connections,
                ..Metrics::default()
            },
        })]),
        ..ProtocolMessage::default()
    };
    ChannelEvent::new(origin, seq, None, frame)
}

/// Two nodes' reports open the channel once; when the last reporting node leaves the
/// cluster the channel closes, though no report said so.
#[tokio::test]
async fn lifecycle_is_the_clusters_and_a_departed_node_stops_counting() {
    let function = Function::default();
    let port = function.start().await;
    let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
    let mut lifecycle = rule(port, 100);
    lifecycle.config.sources = vec![Source::Lifecycle];
    let lifecycle = lifecycle.config.validate().unwrap();
    let outbox = Outbox::open(store, ORIGIN, vec![lifecycle]).unwrap();
    let _tasks = tern_functions::spawn(&outbox);
    let key = ChannelKey::new("app", tern_functions::lifecycle::OCCUPANCY_CHANNEL);
    outbox.record(&key, &report(OriginId(1), 1, 1));
    outbox.record(&key, &report(OriginId(2), 1, 2));
    outbox.record(&key, &report(OriginId(1), 2, 0));
    wait_for("opened", || function.serials().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        function.serials().len(),
        1,
        "one channel.opened for two nodes"
    );
    assert!(function.serials()[0].ends_with(":opened"));
    outbox.forget_origin(OriginId(2), 5_000);
    wait_for("closed", || function.serials().len() == 2).await;
    assert!(function.serials()[1].ends_with(":closed"));
}
