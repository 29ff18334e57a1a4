//! The comet transport over real sockets on loopback: raw HTTP requests against a real
//! edge router (ably-js's own comet client is exercised in `tests/js/test/comet.test.mjs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tern_auth::{ApiKey, Capability, KeyRing};
use tern_core::{CoreLimits, Hub, OriginId};
use tern_edge::{EdgeConfig, EdgeState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(10);
const KEY: &str = "app.root:rootsecret";

struct Node {
    port: u16,
    _shutdown: watch::Sender<bool>,
}

async fn start(config: EdgeConfig) -> Node {
    let keys = KeyRing::new(vec![ApiKey {
        app_id: "app".into(),
        key_id: "root".into(),
        secret: "rootsecret".into(),
        capability: Capability::parse(r#"{"*":["*"]}"#).unwrap(),
    }]);
    let hub = Arc::new(Hub::new(OriginId(1), CoreLimits::default()));
    let (shutdown, rx) = watch::channel(false);
    let state = Arc::new(EdgeState::new(config, hub, keys, rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, tern_edge::router(state)).await });
    Node {
        port,
        _shutdown: shutdown,
    }
}

/// One HTTP/1.1 request on its own connection; the body de-chunked if it was chunked.
async fn request(
    node: &Node,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: tern\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("response within the wait")
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

async fn json_request(node: &Node, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = request(node, method, path, "application/json", body.as_bytes()).await;
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    (status, value)
}

/// Connects with `stream=false` and `extra` params: the connection key and CONNECTED.
async fn connect(node: &Node, extra: &str) -> (String, Value) {
    let (status, frames) = json_request(
        node,
        "GET",
        &format!("/comet/connect?key={KEY}&stream=false{extra}"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{frames}");
    let connected = frames[0].clone();
    assert_eq!(connected["action"], 4, "{frames}");
    let key = connected["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    (key, connected)
}

/// A comet connection's queue has the WebSocket's bound: a client that does not poll
/// while its channel is busy is disconnected (80020) and its connection dropped; the
/// publisher on the same channel is not held up.
#[tokio::test]
async fn unpolled_queue_overflows_to_80020() {
    let node = start(EdgeConfig {
        outbound_queue_max: 16,
        ..EdgeConfig::default()
    })
    .await;
    let (key, _) = connect(&node, "").await;
    let (status, _) = json_request(
        &node,
        "POST",
        &format!("/comet/{key}/send"),
        r#"[{"action":10,"channel":"busy"}]"#,
    )
    .await;
    assert_eq!(status, 204);
    let url = format!("ws://127.0.0.1:{}/?format=json&key={KEY}", node.port);
    let (mut publisher, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for serial in 0..40 {
        let frame = json!({"action": 15, "channel": "busy", "msgSerial": serial, "messages": [{"data": serial}]});
        publisher
            .send(WsMessage::text(frame.to_string()))
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 40 {
        let msg = tokio::time::timeout(WAIT, publisher.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let frame: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if frame["action"] == 1 {
            acked += 1;
        }
    }
    let (status, frames) = json_request(&node, "GET", &format!("/comet/{key}/recv"), "").await;
    assert_eq!(status, 200);
    assert_eq!(
        frames.as_array().unwrap().len(),
        1,
        "queued frames are dropped: {frames}"
    );
    assert_eq!(frames[0]["action"], 6);
    assert_eq!(frames[0]["error"]["code"], 80020);
    let (status, frames) = json_request(&node, "GET", &format!("/comet/{key}/recv"), "").await;
    assert_eq!(status, 404);
    assert_eq!(frames[0]["action"], 6);
}

/// A receive with nothing to send answers with a HEARTBEAT at `max_idle_interval_ms`,
/// not before, so the client's idle timer never fires on a quiet healthy connection.
#[tokio::test]
async fn quiet_receive_answers_with_a_heartbeat() {
    let node = start(EdgeConfig {
        max_idle_interval_ms: 400,
        ..EdgeConfig::default()
    })
    .await;
    let (key, connected) = connect(&node, "").await;
    assert_eq!(connected["connectionDetails"]["maxIdleInterval"], 400);
    let started = Instant::now();
    let (status, frames) = json_request(&node, "GET", &format!("/comet/{key}/recv"), "").await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(frames, json!([{"action": 0}]));
}

/// Without `stream=false` a receive streams one JSON array per line (ably-js's Node
/// transport splits on newlines) and ends at `max_idle_interval_ms`.
#[tokio::test]
async fn streamed_receive_is_one_array_per_line() {
    let node = start(EdgeConfig {
        max_idle_interval_ms: 500,
        ..EdgeConfig::default()
    })
    .await;
    let (status, body) = request(&node, "GET", &format!("/comet/connect?key={KEY}"), "", b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(text.ends_with('\n'));
    assert_eq!(lines[0][0]["action"], 4);
    let key = lines[0][0]["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let recv = {
        let path = format!("/comet/{key}/recv");
        let node = &node;
        async move { request(node, "GET", &path, "", b"").await }
    };
    let send = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = r#"[{"action":0,"id":"a"}]"#;
        let (status, _) = json_request(&node, "POST", &format!("/comet/{key}/send"), body).await;
        assert_eq!(status, 204);
        let body = r#"[{"action":0,"id":"b"}]"#;
        json_request(&node, "POST", &format!("/comet/{key}/send"), body).await
    };
    let ((status, body), _) = tokio::join!(recv, send);
    assert_eq!(status, 200);
    let ids: Vec<Value> = String::from_utf8(body)
        .unwrap()
        .lines()
        .flat_map(|l| serde_json::from_str::<Vec<Value>>(l).unwrap())
        .map(|frame| frame["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("a"), json!("b")]);
}

/// `format=msgpack`: bodies both ways are msgpack arrays of frames.
#[tokio::test]
async fn msgpack_bodies_are_msgpack_arrays() {
    let node = start(EdgeConfig::default()).await;
    let path = format!("/comet/connect?key={KEY}&format=msgpack");
    let (status, body) = request(&node, "GET", &path, "", b"").await;
    assert_eq!(status, 200);
    let frames: Vec<Value> = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(frames[0]["action"], 4);
    let key = frames[0]["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let ping = rmp_serde::to_vec_named(&vec![json!({"action": 0, "id": "mp"})]).unwrap();
    let send = format!("/comet/{key}/send");
    let (status, _) = request(&node, "POST", &send, "application/x-msgpack", &ping).await;
    assert_eq!(status, 204);
    let (status, body) = request(&node, "GET", &format!("/comet/{key}/recv"), "", b"").await;
    assert_eq!(status, 200);
    let frames: Vec<Value> = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(frames, vec![json!({"action": 0, "id": "mp"})]);
}

/// CLOSE through `/close` ends the connection for good: no resume takes it back.
#[tokio::test]
async fn close_discards_the_connection() {
    let node = start(EdgeConfig::default()).await;
    let (key, connected) = connect(&node, "").await;
    let (status, _) = json_request(&node, "POST", &format!("/comet/{key}/close"), "").await;
    assert_eq!(status, 204);
    let (_, frames) = json_request(&node, "GET", &format!("/comet/{key}/recv"), "").await;
    assert_eq!(frames[0]["action"], 8, "CLOSED: {frames}");
    let (_, resumed) = connect(&node, &format!("&resume={key}")).await;
    assert_ne!(resumed["connectionId"], connected["connectionId"]);
    assert_eq!(resumed["error"]["code"], 80008);
}

/// A streamed receive whose client stopped reading (its socket full, so hyper no longer
/// polls the body) holds nothing a newer receive needs: the client's next receive, on a
/// new HTTP connection, gets the connection's frames at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_does_not_block_the_next_receive() {
    let node = start(EdgeConfig {
        max_idle_interval_ms: 2_000,
        ..EdgeConfig::default()
    })
    .await;
    // Streamed (no `stream=false`): this connect's response streams until the deadline.
    let (status, body) = request(&node, "GET", &format!("/comet/connect?key={KEY}"), "", b"").await;
    assert_eq!(status, 200);
    let first: Vec<Value> =
        serde_json::from_slice(body.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let key = first[0]["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let attach = r#"[{"action":10,"channel":"firehose"}]"#;
    let (status, _) = json_request(&node, "POST", &format!("/comet/{key}/send"), attach).await;
    assert_eq!(status, 204);
    // A streamed receive that reads nothing, through a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(([127, 0, 0, 1], node.port).into())
        .await
        .unwrap();
    let head = format!("GET /comet/{key}/recv HTTP/1.1\r\nhost: tern\r\n\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    let url = format!("ws://127.0.0.1:{}/?format=json&key={KEY}", node.port);
    let (mut publisher, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let payload = "z".repeat(32_000);
    let total = 600;
    for serial in 0..total {
        let frame = json!({"action": 15, "channel": "firehose", "msgSerial": serial, "messages": [{"data": payload}]});
        publisher
            .send(WsMessage::text(frame.to_string()))
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < total {
        let msg = tokio::time::timeout(WAIT, publisher.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let frame: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if frame["action"] == 1 {
            acked += 1;
        }
    }
    let started = Instant::now();
    let (status, body) = request(&node, "GET", &format!("/comet/{key}/recv"), "", b"").await;
    assert_eq!(status, 200);
    let frames: usize = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Vec<Value>>(l).unwrap().len())
        .sum();
    assert!(frames > 0, "the new receive got frames");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}
