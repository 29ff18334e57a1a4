//! The edge's own listener (`tern_edge::serve`) over real loopback sockets: what a client
//! that does not play along can hold, and for how long. A client that stops reading, one
//! that sends its request a byte at a time or not at all, a flood of idle connections
//! and one address opening too many are each cut off within their configured bound,
//! while well-behaved clients keep connecting and receiving. Waits are on conditions
//! with timeouts; the only sleeps pace a deliberately slow client.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tern_auth::{ApiKey, Capability, KeyRing};
use tern_core::{CoreLimits, Hub, OriginId};
use tern_edge::{EdgeConfig, EdgeState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Error, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);
const KEY: &str = "key=app.root:rootsecret";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

struct Node {
    addr: SocketAddr,
    _shutdown: watch::Sender<bool>,
}

async fn start(config: EdgeConfig) -> Node {
    install_recorder();
    let keys = KeyRing::new(vec![ApiKey {
        app_id: "app".into(),
        key_id: "root".into(),
        secret: "rootsecret".into(),
        capability: Capability::parse(r#"{"*":["*"]}"#).unwrap(),
    }]);
    let hub = Arc::new(Hub::with_journal(OriginId(1), CoreLimits::default(), None));
    let (shutdown, rx) = watch::channel(false);
    let state = Arc::new(EdgeState::new(config, hub, keys, rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tern_edge::serve(listener, state));
    Node {
        addr,
        _shutdown: shutdown,
    }
}

/// A TCP connection to the node from `source` (any address of 127.0.0.0/8).
async fn tcp_from(source: IpAddr, node: &Node) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(node.addr).await.unwrap()
}

/// A WebSocket handshake from `source`; `Err` when the server refuses it.
async fn ws_from(source: IpAddr, node: &Node, query: &str) -> Result<Ws, Error> {
    let tcp = tcp_from(source, node).await;
    let url = format!("ws://{}/?format=json&{query}", node.addr);
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)).await?;
    Ok(ws)
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(WsMessage::text(frame.to_string())).await.unwrap();
}

/// Next frame with the given action (heartbeats and others skipped).
async fn expect_action(ws: &mut Ws, action: u64) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
            .expect("closed")
            .unwrap();
        if let WsMessage::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["action"] == action {
                return v;
            }
        }
    }
}

async fn connected(source: IpAddr, node: &Node) -> Ws {
    let mut ws = ws_from(source, node, KEY).await.unwrap();
    expect_action(&mut ws, 4).await;
    ws
}

/// A realtime client that works end to end: attach, publish (ACKed), receive its echo.
/// `serial` is the connection's next msgSerial.
async fn round_trip(ws: &mut Ws, channel: &str, serial: u64) {
    send(ws, json!({"action": 10, "channel": channel})).await;
    expect_action(ws, 11).await;
    send(ws, json!({"action": 15, "channel": channel, "msgSerial": serial, "messages": [{"data": "hello"}]})).await;
    // The echo and the ACK, in either order.
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
            .expect("closed")
            .unwrap();
        let WsMessage::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["action"].as_u64() {
            Some(1) => {
                assert_eq!(v["msgSerial"], serial);
                acked = true;
            }
            Some(15) if v["channel"] == channel => {
                assert_eq!(v["messages"][0]["data"], "hello");
                echoed = true;
            }
            _ => {}
        }
    }
}

/// Everything the server sends until it closes the connection; `None` if it is still
/// open after `wait`.
async fn read_to_close(tcp: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts the server answered 503 with an Ably error body and closed the connection.
async fn assert_refused(tcp: &mut TcpStream) {
    let answer = read_to_close(tcp, Duration::from_secs(2))
        .await
        .expect("a refused connection is closed promptly");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], 42910, "{answer:?}");
    assert_eq!(body["error"]["statusCode"], 503, "{answer:?}");
}

/// `GET /health`'s WebSocket connection count.
async fn health_connections(node: &Node) -> u64 {
    let mut tcp = tcp_from(LOCAL, node).await;
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut tcp, WAIT).await.unwrap();
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    body["connections"].as_u64().unwrap()
}

/// Counts of `tern_connections_refused_total` by reason, from a recorder this test
/// binary installs once (the edge counts through the global `metrics` facade).
static REFUSED: LazyLock<Mutex<HashMap<String, Arc<AtomicU64>>>> = LazyLock::new(Default::default);

struct RefusalRecorder;

impl metrics::Recorder for RefusalRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() != "tern_connections_refused_total" {
            return metrics::Counter::noop();
        }
        let reason = key
            .labels()
            .find(|label| label.key() == "reason")
            .map(|label| label.value().to_string())
            .unwrap_or_default();
        let count = REFUSED.lock().unwrap().entry(reason).or_default().clone();
        metrics::Counter::from_arc(count)
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn install_recorder() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = metrics::set_global_recorder(RefusalRecorder);
    });
}

/// Held by the tests that assert exact refusal counts, so that under `cargo test` (one
/// process) no other test's refusals land between their two readings.
static COUNTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn refused(reason: &str) -> u64 {
    REFUSED
        .lock()
        .unwrap()
        .get(reason)
        .map_or(0, |count| count.load(Ordering::SeqCst))
}

/// A subscriber that stops reading while its channel is flooded is cut off within the
/// write timeout although it never reads again: /health stops counting it and its
/// socket is reset (the next read fails at once instead of draining a queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_within_the_write_timeout() {
    let write_timeout = Duration::from_millis(1_000);
    let node = start(EdgeConfig {
        outbound_queue_max: 64,
        inbound_frames_per_second: 100_000,
        write_timeout_ms: write_timeout.as_millis() as u64,
        ..EdgeConfig::default()
    })
    .await;
    let mut publisher = connected(LOCAL, &node).await;
    let mut stalled = connected(LOCAL, &node).await;
    send(&mut stalled, json!({"action": 10, "channel": "flood"})).await;
    expect_action(&mut stalled, 11).await;
    assert_eq!(health_connections(&node).await, 2);
    // 24 MB: far more than the socket buffers on loopback plus 64 queued frames.
    let payload = "z".repeat(60_000);
    for serial in 0..400 {
        send(&mut publisher, json!({"action": 15, "channel": "flood", "msgSerial": serial, "messages": [{"data": payload}]})).await;
        assert_eq!(expect_action(&mut publisher, 1).await["msgSerial"], serial);
    }
    let flooded = Instant::now();
    let bound = write_timeout + Duration::from_secs(3);
    while health_connections(&node).await != 1 {
        assert!(
            flooded.elapsed() < bound,
            "the stalled connection is still counted {:?} after the flood",
            flooded.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stalled client reads again. Its socket was reset, not closed behind the
    // megabytes queued for it: the stream fails with a reset once the little its own
    // receive buffer held is read (a FIN would come only after all of them).
    let mut delivered = 0usize;
    let ended = loop {
        match tokio::time::timeout(WAIT, stalled.next()).await {
            Err(_) => panic!("the stalled client's socket is still open"),
            Ok(Some(Ok(_))) => delivered += 1,
            Ok(Some(Err(err))) => break Some(err),
            Ok(None) => break None,
        }
    };
    assert!(
        matches!(&ended, Some(Error::Io(err)) if err.kind() == std::io::ErrorKind::ConnectionReset),
        "{ended:?} after {delivered} frames"
    );
    // The publisher's own connection is unaffected.
    round_trip(&mut publisher, "after", 400).await;
}

/// A request head sent a byte every 200 ms, a connection that sends nothing, and a
/// keep-alive connection idle after its request are all closed once the header read
/// timeout has passed; only the first two count as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_missing_request_heads_are_closed_after_the_header_timeout() {
    let _counting = COUNTING.lock().await;
    let header_timeout = Duration::from_millis(1_000);
    let node = start(EdgeConfig {
        header_read_timeout_ms: header_timeout.as_millis() as u64,
        ..EdgeConfig::default()
    })
    .await;
    let refused_before = refused("header_read_timeout");
    let opened = Instant::now();
    let mut silent = tcp_from(LOCAL, &node).await;
    let mut kept = tcp_from(LOCAL, &node).await;
    let slow = tcp_from(LOCAL, &node).await;
    let (mut slow_read, mut slow_write) = slow.into_split();
    slow_write
        .write_all(b"GET /?format=json HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow_write.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    kept.write_all(b"GET /time HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    let mut buf = [0u8; 1024];
    let slow_closed = tokio::time::timeout(WAIT, slow_read.read(&mut buf)).await;
    assert!(
        matches!(slow_closed, Ok(Ok(0)) | Ok(Err(_))),
        "the slow client is still connected after {:?}: {slow_closed:?}",
        opened.elapsed()
    );
    let slow_after = opened.elapsed();
    let bound = header_timeout + Duration::from_secs(2);
    assert!(
        slow_after >= header_timeout && slow_after < bound,
        "{slow_after:?}"
    );
    for tcp in [&mut silent, &mut kept] {
        assert!(read_to_close(tcp, bound).await.is_some());
        assert!(opened.elapsed() < bound, "{:?}", opened.elapsed());
    }
    trickle.abort();
    assert_eq!(refused("header_read_timeout") - refused_before, 2);
}

/// One HTTP/1.1 response with a content-length body, read off a kept-alive connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("timed out")
            .unwrap();
        assert!(n > 0, "closed mid-response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A WebSocket handshake carrying 8 KB of query string (a long token) connects; a request
/// head over the 16 KiB default is answered 431 and closed.
#[tokio::test]
async fn request_heads_fit_long_tokens_but_are_bounded() {
    let node = start(EdgeConfig::default()).await;
    let long = format!("{KEY}&pad={}", "t".repeat(8_000));
    let mut ws = ws_from(LOCAL, &node, &long).await.unwrap();
    expect_action(&mut ws, 4).await;
    let mut tcp = tcp_from(LOCAL, &node).await;
    let huge = format!(
        "GET /time HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    // The server may close before it has read everything: a failed write is fine.
    let _ = tcp.write_all(huge.as_bytes()).await;
    let answer = read_to_close(&mut tcp, WAIT).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
}

/// Idle connections beyond `http_connections_max` are refused with a 503 at once, while an
/// upgraded WebSocket client keeps working; once the header timeout closes the idle
/// ones, new clients connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_http_cap_are_refused() {
    let _counting = COUNTING.lock().await;
    let header_timeout = Duration::from_millis(1_500);
    let node = start(EdgeConfig {
        http_connections_max: 8,
        header_read_timeout_ms: header_timeout.as_millis() as u64,
        ..EdgeConfig::default()
    })
    .await;
    let mut established = connected(LOCAL, &node).await;
    let refused_before = refused("http_connections_max");
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tcp_from(LOCAL, &node).await);
    }
    for _ in 0..4 {
        let mut extra = tcp_from(LOCAL, &node).await;
        assert_refused(&mut extra).await;
    }
    assert_eq!(refused("http_connections_max") - refused_before, 4);
    for tcp in &idle {
        let mut buf = [0u8; 16];
        let open = tcp.try_read(&mut buf);
        assert!(
            matches!(&open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "an idle connection within the cap was answered: {open:?}"
        );
    }
    round_trip(&mut established, "during", 0).await;
    for tcp in &mut idle {
        assert!(
            read_to_close(tcp, header_timeout + WAIT).await.is_some(),
            "an idle connection outlived the header timeout"
        );
    }
    let mut later = connected(LOCAL, &node).await;
    round_trip(&mut later, "after", 0).await;
}

/// With `connections_per_ip_max = 2`, a third connection from 127.0.0.1 is refused with
/// a 503 while a client from 127.0.0.2 connects and works; closing one of the first two
/// frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_cap_are_refused() {
    let _counting = COUNTING.lock().await;
    let node = start(EdgeConfig {
        connections_per_ip_max: 2,
        ..EdgeConfig::default()
    })
    .await;
    let mut first = connected(LOCAL, &node).await;
    let second = connected(LOCAL, &node).await;
    let refused_before = refused("connections_per_ip_max");
    let mut third = tcp_from(LOCAL, &node).await;
    assert_refused(&mut third).await;
    assert!(ws_from(LOCAL, &node, KEY).await.is_err());
    assert_eq!(refused("connections_per_ip_max") - refused_before, 2);
    let mut other = connected(OTHER, &node).await;
    round_trip(&mut other, "elsewhere", 0).await;
    round_trip(&mut first, "here", 0).await;
    drop(second);
    let deadline = Instant::now() + WAIT;
    let mut again = loop {
        if let Ok(ws) = ws_from(LOCAL, &node, KEY).await {
            break ws;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    expect_action(&mut again, 4).await;
    round_trip(&mut again, "again", 0).await;
}
