//! Whole-node tests over real sockets on loopback: a real edge router, raw WebSocket
//! clients speaking the Ably protocol, and bad input of every kind. Waits are on
//! conditions with timeouts, never on sleeps.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tern_auth::{ApiKey, Capability, KeyRing};
use tern_core::{CoreLimits, Hub, OriginId};
use tern_edge::{EdgeConfig, EdgeState};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

struct Node {
    port: u16,
    keys: KeyRing,
    _shutdown: watch::Sender<bool>,
}

fn keys() -> KeyRing {
    let key = |id: &str, secret: &str, cap: &str| ApiKey {
        app_id: "app".into(),
        key_id: id.into(),
        secret: secret.into(),
        capability: Capability::parse(cap).unwrap(),
    };
    KeyRing::new(vec![
        key("root", "rootsecret", r#"{"*":["*"]}"#),
        key("sub", "subsecret", r#"{"open:*":["subscribe"]}"#),
    ])
}

async fn start(config: EdgeConfig) -> Node {
    start_with_store(config, tern_store::StoreConfig::default()).await
}

async fn start_with_store(config: EdgeConfig, store: tern_store::StoreConfig) -> Node {
    let store = tern_store::open(&store).unwrap();
    let journal = Arc::new(tern_edge::history::StoreJournal {
        store: store.clone(),
    });
    let hub = Arc::new(Hub::with_journal(
        OriginId(1),
        CoreLimits::default(),
        Some(journal),
    ));
    let (shutdown, rx) = watch::channel(false);
    let state = Arc::new(EdgeState::new(config, hub, keys(), None, rx).with_store(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, tern_edge::router(state)).await });
    Node {
        port,
        keys: keys(),
        _shutdown: shutdown,
    }
}

async fn connect(node: &Node, query: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{}/?format=json&{query}", node.port);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(WsMessage::text(frame.to_string())).await.unwrap();
}

/// Next protocol frame, skipping heartbeats.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
            .expect("closed")
            .unwrap();
        if let WsMessage::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["action"] != 0 || v.get("id").is_some() {
                return v;
            }
        }
    }
}

/// Next frame with the given action.
async fn expect_action(ws: &mut Ws, action: u64) -> Value {
    loop {
        let v = next(ws).await;
        if v["action"] == action {
            return v;
        }
    }
}

/// True once the server has closed the socket.
async fn closed(ws: &mut Ws) -> bool {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => return false,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(WsMessage::Close(_)))) => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn connected(node: &Node, query: &str) -> (Ws, Value) {
    let mut ws = connect(node, query).await;
    let hello = expect_action(&mut ws, 4).await;
    (ws, hello)
}

async fn attach(ws: &mut Ws, channel: &str) -> Value {
    send(ws, json!({"action": 10, "channel": channel})).await;
    expect_action(ws, 11).await
}

/// CONNECTED carries every connectionDetails field ably-js reads, and an id without ':'.
#[tokio::test]
async fn connected_has_full_details() {
    let node = start(EdgeConfig::default()).await;
    let (_ws, hello) = connected(&node, "key=app.root:rootsecret&clientId=bob").await;
    let id = hello["connectionId"].as_str().unwrap();
    assert!(!id.contains(':'));
    let d = &hello["connectionDetails"];
    assert!(d["connectionKey"].is_string());
    assert_eq!(d["clientId"], "bob");
    assert_eq!(d["maxMessageSize"], 65536);
    assert_eq!(d["maxIdleInterval"], 15000);
    assert_eq!(d["connectionStateTtl"], 120000);
    assert!(d["serverId"].is_string());
}

/// ATTACHED grants the capability's modes; publish is ACKed with serials and fanned
/// out with id, connectionId, timestamp and channelSerial; HEARTBEAT ids are echoed.
#[tokio::test]
async fn attach_publish_ack_fanout_heartbeat() {
    let node = start(EdgeConfig::default()).await;
    let (mut a, hello) = connected(&node, "key=app.root:rootsecret").await;
    let (mut b, _) = connected(&node, "key=app.root:rootsecret").await;
    let attached = attach(&mut b, "room").await;
    assert_eq!(attached["flags"], 983040);
    assert!(attached["channelSerial"].is_string());
    send(&mut a, json!({"action": 15, "channel": "room", "msgSerial": 0, "messages": [{"name": "n", "data": "d"}]})).await;
    let ack = expect_action(&mut a, 1).await;
    assert_eq!(ack["msgSerial"], 0);
    assert_eq!(ack["res"][0]["serials"].as_array().unwrap().len(), 1);
    let msg = expect_action(&mut b, 15).await;
    assert_eq!(msg["connectionId"], hello["connectionId"]);
    assert!(msg["timestamp"].is_i64());
    assert!(msg["channelSerial"].is_string());
    assert_eq!(msg["messages"][0]["data"], "d");
    send(&mut b, json!({"action": 0, "id": "ping-1"})).await;
    assert_eq!(expect_action(&mut b, 0).await["id"], "ping-1");
}

/// Malformed JSON gets ERROR 40000 and a closed connection; another connection on the
/// same node is unaffected.
#[tokio::test]
async fn malformed_json_fails_only_that_connection() {
    let node = start(EdgeConfig::default()).await;
    let (mut good, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut bad, _) = connected(&node, "key=app.root:rootsecret").await;
    bad.send(WsMessage::text("{not json")).await.unwrap();
    let err = expect_action(&mut bad, 9).await;
    assert_eq!(err["error"]["code"], 40000);
    assert!(err["error"]["message"].is_string());
    assert!(closed(&mut bad).await);
    send(&mut good, json!({"action": 0, "id": "still-here"})).await;
    assert_eq!(expect_action(&mut good, 0).await["id"], "still-here");
}

/// Arbitrary binary garbage and an unknown action each get a protocol ERROR, no panic.
#[tokio::test]
async fn garbage_and_unknown_actions_get_errors() {
    let node = start(EdgeConfig::default()).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    send(&mut ws, json!({"action": 99})).await;
    assert_eq!(expect_action(&mut ws, 9).await["error"]["code"], 80013);
    let mut ws = connect(&node, "key=app.root:rootsecret&format=msgpack").await;
    let _connected = ws.next().await;
    ws.send(WsMessage::binary(vec![0xc1, 0xff, 0x00, 0x13]))
        .await
        .unwrap();
    assert!(closed(&mut ws).await);
}

/// Oversized publish → NACK 40009; publish without capability → NACK 40160; attach
/// outside the capability → channel ERROR 40160.
#[tokio::test]
async fn size_and_capability_refusals() {
    let node = start(EdgeConfig::default()).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    let big = "x".repeat(70_000);
    send(
        &mut ws,
        json!({"action": 15, "channel": "c", "msgSerial": 0, "messages": [{"data": big}]}),
    )
    .await;
    let nack = expect_action(&mut ws, 2).await;
    assert_eq!(
        (nack["msgSerial"].clone(), nack["error"]["code"].clone()),
        (json!(0), json!(40009))
    );

    let (mut sub, _) = connected(&node, "key=app.sub:subsecret").await;
    assert_eq!(attach(&mut sub, "open:x").await["flags"], 262144 | 524288);
    send(
        &mut sub,
        json!({"action": 15, "channel": "open:x", "msgSerial": 0, "messages": [{"data": "d"}]}),
    )
    .await;
    assert_eq!(expect_action(&mut sub, 2).await["error"]["code"], 40160);
    send(&mut sub, json!({"action": 10, "channel": "closed"})).await;
    let err = expect_action(&mut sub, 9).await;
    assert_eq!(
        (err["channel"].clone(), err["error"]["code"].clone()),
        (json!("closed"), json!(40160))
    );
    assert_eq!(err["error"]["statusCode"], 401);
}

/// Presence without a clientId → 91000; with someone else's clientId → 40012; a
/// message with someone else's clientId → 40012.
#[tokio::test]
async fn client_id_rules() {
    let node = start(EdgeConfig::default()).await;
    let (mut anon, _) = connected(&node, "key=app.root:rootsecret").await;
    send(
        &mut anon,
        json!({"action": 14, "channel": "p", "msgSerial": 0, "presence": [{"action": 2}]}),
    )
    .await;
    assert_eq!(expect_action(&mut anon, 2).await["error"]["code"], 91000);
    let (mut bob, _) = connected(&node, "key=app.root:rootsecret&clientId=bob").await;
    send(&mut bob, json!({"action": 14, "channel": "p", "msgSerial": 0, "presence": [{"action": 2, "clientId": "eve"}]})).await;
    assert_eq!(expect_action(&mut bob, 2).await["error"]["code"], 40012);
    send(&mut bob, json!({"action": 15, "channel": "p", "msgSerial": 1, "messages": [{"clientId": "eve", "data": "x"}]})).await;
    assert_eq!(expect_action(&mut bob, 2).await["error"]["code"], 40012);
}

/// Bad credentials get a connection ERROR with the right code: wrong secret 40101,
/// garbage token in the 4014x range, expired token 40142.
#[tokio::test]
async fn bad_credentials() {
    let node = start(EdgeConfig::default()).await;
    let mut ws = connect(&node, "key=app.root:wrong").await;
    assert_eq!(expect_action(&mut ws, 9).await["error"]["code"], 40101);
    let mut ws = connect(&node, "access_token=garbage").await;
    let code = expect_action(&mut ws, 9).await["error"]["code"]
        .as_u64()
        .unwrap();
    assert!((40140..40150).contains(&code), "{code}");
    let key = node.keys.get("app.root").unwrap().clone();
    let now = tern_edge::now_ms();
    let expired = node
        .keys
        .issue_token(&key, None, &Capability::all(), 1_000, now - 10_000);
    let mut ws = connect(&node, &format!("access_token={}", expired.token)).await;
    assert_eq!(expect_action(&mut ws, 9).await["error"]["code"], 40142);
}

/// A token connection is asked to renew (AUTH) before expiry, renews in band and keeps
/// its connectionId; left alone, it is disconnected with 40142 at expiry.
#[tokio::test]
async fn token_renewal_and_expiry() {
    let config = EdgeConfig {
        token_renew_notice_ms: 600,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let key = node.keys.get("app.root").unwrap().clone();
    let now = tern_edge::now_ms();
    let token = node
        .keys
        .issue_token(&key, Some("bob"), &Capability::all(), 1_500, now);
    let (mut ws, hello) = connected(&node, &format!("access_token={}", token.token)).await;
    expect_action(&mut ws, 17).await;
    let fresh = node.keys.issue_token(
        &key,
        Some("bob"),
        &Capability::all(),
        60_000,
        tern_edge::now_ms(),
    );
    send(
        &mut ws,
        json!({"action": 17, "auth": {"accessToken": fresh.token}}),
    )
    .await;
    let again = expect_action(&mut ws, 4).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);

    let short = node
        .keys
        .issue_token(&key, None, &Capability::all(), 1_200, tern_edge::now_ms());
    let (mut ws, _) = connected(&node, &format!("access_token={}", short.token)).await;
    expect_action(&mut ws, 17).await;
    let gone = expect_action(&mut ws, 6).await;
    assert_eq!(gone["error"]["code"], 40142);
    assert!(closed(&mut ws).await);
}

/// A flood of publishes past the inbound rate is NACKed with 42910 and the connection
/// keeps working.
#[tokio::test]
async fn inbound_flood_is_rate_limited() {
    let config = EdgeConfig {
        inbound_frames_per_second: 50,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    for serial in 0..200 {
        send(
            &mut ws,
            json!({"action": 15, "channel": "f", "msgSerial": serial, "messages": [{"data": "x"}]}),
        )
        .await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 200 {
        let v = next(&mut ws).await;
        match v["action"].as_u64() {
            Some(1) => acks += 1,
            Some(2) => {
                assert_eq!(v["error"]["code"], 42910);
                limited += 1;
            }
            _ => {}
        }
    }
    assert!(limited > 0 && acks >= 50, "acks {acks} limited {limited}");
    send(&mut ws, json!({"action": 0, "id": "alive"})).await;
    assert_eq!(expect_action(&mut ws, 0).await["id"], "alive");
}

/// A subscriber that stops reading is disconnected once its bounded queue is full,
/// while a reading subscriber on the same channel receives every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_disconnected_others_unaffected() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let config = EdgeConfig {
        outbound_queue_max: 64,
        inbound_frames_per_second: 100_000,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let (mut publisher, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut slow, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut fast, _) = connected(&node, "key=app.root:rootsecret").await;
    attach(&mut slow, "busy").await;
    attach(&mut fast, "busy").await;
    let payload = "y".repeat(32_000);
    let total = 600;
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        while counter.load(Ordering::SeqCst) < total {
            expect_action(&mut fast, 15).await;
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    for serial in 0..total {
        send(&mut publisher, json!({"action": 15, "channel": "busy", "msgSerial": serial, "messages": [{"data": payload}]})).await;
        assert_eq!(expect_action(&mut publisher, 1).await["msgSerial"], serial);
        // Pace the publisher to the reading subscriber, so only the stalled one lags.
        while received.load(Ordering::SeqCst) + 16 < serial {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received.load(Ordering::SeqCst), total);
    // The stalled subscriber's stream ends with DISCONNECTED 80020 and a close.
    let mut saw_disconnect = false;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(WAIT, slow.next()).await {
        if let WsMessage::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["action"] == 6 {
                assert_eq!(v["error"]["code"], 80020);
                saw_disconnect = true;
            }
        }
    }
    assert!(saw_disconnect);
}

/// REST errors carry the exact content type, X-Ably headers and error body.
#[tokio::test]
async fn rest_error_shape_and_time() {
    let node = start(EdgeConfig::default()).await;
    let base = format!("http://127.0.0.1:{}", node.port);
    let (status, headers, body) =
        http(&format!("{base}/channels/x/messages"), "POST", None, "{}").await;
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        headers.get("x-ably-errorcode").map(String::as_str),
        Some("40101")
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], 40101);
    assert_eq!(v["error"]["statusCode"], 401);
    let (status, _, body) = http(&format!("{base}/time"), "GET", None, "").await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Vec<i64>>(&body).unwrap()[0] > 1_600_000_000_000);
}

/// Minimal HTTP/1.1 client over a raw socket (keeps the dev-dependency list short).
async fn http(
    url: &str,
    method: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = TcpStream::connect(host).await.unwrap();
    let auth = auth
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} /{path} HTTP/1.1\r\nhost: {host}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// Collects MESSAGE data strings from `ws` until `count` have arrived.
async fn collect_data(ws: &mut Ws, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < count {
        let v = expect_action(ws, 15).await;
        for m in v["messages"].as_array().unwrap() {
            got.push(m["data"].as_str().unwrap().to_string());
        }
    }
    got
}

/// A subscriber whose transport drops resumes with its connectionKey (same
/// connectionId, new key), re-attaches with its channelSerial, and receives exactly the
/// messages published while it was away, then live ones; nothing twice.
#[tokio::test]
async fn resume_replays_missed_messages_exactly_once() {
    let node = start(EdgeConfig::default()).await;
    let (mut publisher, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut sub, hello) = connected(&node, "key=app.root:rootsecret").await;
    let attached = attach(&mut sub, "r").await;
    let mut serial = attached["channelSerial"].as_str().unwrap().to_string();
    let publish = |n: i64| json!({"action": 15, "channel": "r", "msgSerial": n, "messages": [{"data": format!("m{n}")}]});
    for n in 0..3 {
        send(&mut publisher, publish(n)).await;
        expect_action(&mut publisher, 1).await;
    }
    for _ in 0..3 {
        let v = expect_action(&mut sub, 15).await;
        serial = v["channelSerial"].as_str().unwrap().to_string();
    }
    drop(sub);
    for n in 3..8 {
        send(&mut publisher, publish(n)).await;
        expect_action(&mut publisher, 1).await;
    }
    let key = hello["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap();
    let (mut sub, again) = connected(&node, &format!("key=app.root:rootsecret&resume={key}")).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);
    assert!(again.get("error").is_none());
    assert_ne!(
        again["connectionDetails"]["connectionKey"]
            .as_str()
            .unwrap(),
        key
    );
    send(
        &mut sub,
        json!({"action": 10, "channel": "r", "channelSerial": serial}),
    )
    .await;
    let reattached = expect_action(&mut sub, 11).await;
    let flags = reattached["flags"].as_u64().unwrap();
    assert_ne!(flags & 4, 0, "RESUMED");
    assert_ne!(flags & 2, 0, "HAS_BACKLOG");
    send(&mut publisher, publish(8)).await;
    let got = collect_data(&mut sub, 6).await;
    assert_eq!(got, vec!["m3", "m4", "m5", "m6", "m7", "m8"]);
    // Once the client has resumed with the new key, the old one is spent: a resume
    // with it gets a new connection and 80008.
    drop(sub);
    let newer = again["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap();
    let (_, third) = connected(&node, &format!("key=app.root:rootsecret&resume={newer}")).await;
    assert_eq!(third["connectionId"], hello["connectionId"]);
    let (_, stale) = connected(&node, &format!("key=app.root:rootsecret&resume={key}")).await;
    assert_ne!(stale["connectionId"], hello["connectionId"]);
    assert_eq!(stale["error"]["code"], 80008);
}

/// A resume whose CONNECTED the client never read (its transport was cut first) leaves
/// the client with only the key it resumed with: resuming with that key again continues
/// the connection (same id, no error, RESUMED, each missed message once), whether the
/// server has seen the cut transport close or still holds it open.
#[tokio::test]
async fn resume_can_be_retried_with_the_same_key_when_its_connected_was_lost() {
    let node = start(EdgeConfig::default()).await;
    let (mut publisher, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut sub, hello) = connected(&node, "key=app.root:rootsecret").await;
    let serial = attach(&mut sub, "retry").await["channelSerial"]
        .as_str()
        .unwrap()
        .to_string();
    drop(sub);
    let key = hello["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap();
    let resume = format!("key=app.root:rootsecret&resume={key}");
    let publish = |n: i64| json!({"action": 15, "channel": "retry", "msgSerial": n, "messages": [{"data": format!("m{n}")}]});
    // The server takes the resume and issues a new key the client never sees.
    let (lost, _) = connected(&node, &resume).await;
    for n in 0..2 {
        send(&mut publisher, publish(n)).await;
        expect_action(&mut publisher, 1).await;
    }
    drop(lost);
    let (mut second, again) = connected(&node, &resume).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);
    assert!(again.get("error").is_none(), "{again}");
    // Cut again before the client reads anything, but this time the server still
    // holds the transport open: the retried resume supersedes it.
    let (mut third, once_more) = connected(&node, &resume).await;
    assert_eq!(once_more["connectionId"], hello["connectionId"]);
    assert!(once_more.get("error").is_none(), "{once_more}");
    assert!(
        closed(&mut second).await,
        "the superseded transport is closed"
    );
    send(
        &mut third,
        json!({"action": 10, "channel": "retry", "channelSerial": serial}),
    )
    .await;
    let reattached = expect_action(&mut third, 11).await;
    assert_ne!(reattached["flags"].as_u64().unwrap() & 4, 0, "RESUMED");
    send(&mut publisher, publish(2)).await;
    assert_eq!(collect_data(&mut third, 3).await, vec!["m0", "m1", "m2"]);
}

/// After a resume, a publish re-sent with the same msgSerial is ACKed again with the
/// same serial and is not delivered twice.
#[tokio::test]
async fn resent_msg_serial_is_acked_not_republished() {
    let node = start(EdgeConfig::default()).await;
    let (mut watcher, _) = connected(&node, "key=app.root:rootsecret").await;
    attach(&mut watcher, "d").await;
    let (mut ws, hello) = connected(&node, "key=app.root:rootsecret").await;
    let frame =
        json!({"action": 15, "channel": "d", "msgSerial": 0, "messages": [{"data": "once"}]});
    send(&mut ws, frame.clone()).await;
    let first = expect_action(&mut ws, 1).await;
    drop(ws);
    let key = hello["connectionDetails"]["connectionKey"]
        .as_str()
        .unwrap();
    let (mut ws, again) = connected(&node, &format!("key=app.root:rootsecret&resume={key}")).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);
    send(&mut ws, frame).await;
    let second = expect_action(&mut ws, 1).await;
    assert_eq!(first["res"], second["res"]);
    send(
        &mut ws,
        json!({"action": 15, "channel": "d", "msgSerial": 1, "messages": [{"data": "next"}]}),
    )
    .await;
    expect_action(&mut ws, 1).await;
    assert_eq!(collect_data(&mut watcher, 2).await, vec!["once", "next"]);
}

/// A late resume with an older key that is still good (an attempt the client gave up
/// on, reaching the server after the client resumed with it again) does not spend the
/// newer key the client holds: the client's next resume with it continues the
/// connection.
#[tokio::test]
async fn a_late_resume_with_an_older_key_leaves_the_newer_one_good() {
    let node = start(EdgeConfig::default()).await;
    let (first, hello) = connected(&node, "key=app.root:rootsecret").await;
    drop(first);
    let key = |hello: &Value| {
        let key = hello["connectionDetails"]["connectionKey"]
            .as_str()
            .unwrap();
        format!("key=app.root:rootsecret&resume={key}")
    };
    let (current, again) = connected(&node, &key(&hello)).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);
    // The late attempt supersedes the client's transport; nobody reads its CONNECTED.
    let (_late, _) = connected(&node, &key(&hello)).await;
    drop(current);
    let (_, latest) = connected(&node, &key(&again)).await;
    assert_eq!(latest["connectionId"], hello["connectionId"]);
    assert!(latest.get("error").is_none(), "{latest}");
}

/// Rewind by count on attach: HAS_BACKLOG, the params echoed, the last N messages
/// before live ones; an unparsable rewind fails the attach.
#[tokio::test]
async fn rewind_on_attach() {
    let node = start(EdgeConfig::default()).await;
    let (mut publisher, _) = connected(&node, "key=app.root:rootsecret").await;
    for n in 0..5 {
        send(&mut publisher, json!({"action": 15, "channel": "w", "msgSerial": n, "messages": [{"data": format!("m{n}")}]})).await;
        expect_action(&mut publisher, 1).await;
    }
    let (mut sub, _) = connected(&node, "key=app.root:rootsecret").await;
    send(&mut sub, json!({"action": 10, "channel": "[?rewind=2]w"})).await;
    let attached = expect_action(&mut sub, 11).await;
    assert_eq!(attached["channel"], "[?rewind=2]w");
    assert_ne!(attached["flags"].as_u64().unwrap() & 2, 0);
    assert_eq!(attached["params"]["rewind"], "2");
    send(
        &mut publisher,
        json!({"action": 15, "channel": "w", "msgSerial": 5, "messages": [{"data": "m5"}]}),
    )
    .await;
    assert_eq!(collect_data(&mut sub, 3).await, vec!["m3", "m4", "m5"]);
    send(
        &mut sub,
        json!({"action": 10, "channel": "v", "params": {"rewind": "soon"}}),
    )
    .await;
    let err = expect_action(&mut sub, 9).await;
    assert_eq!(
        (err["channel"].clone(), err["error"]["code"].clone()),
        (json!("v"), json!(40003))
    );
}

/// Browsers' `envelope=json` history: status, the Link header inside the body, and the
/// page of messages; following `next` yields the rest.
#[tokio::test]
async fn history_envelope_for_browsers() {
    let node = start(EdgeConfig::default()).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    for n in 0..3 {
        send(&mut ws, json!({"action": 15, "channel": "h", "msgSerial": n, "messages": [{"data": format!("m{n}")}]})).await;
        expect_action(&mut ws, 1).await;
    }
    let base = format!("http://127.0.0.1:{}/channels/h/messages", node.port);
    let (status, headers, body) = http(
        &format!("{base}?envelope=json&limit=2&key=app.root:rootsecret"),
        "GET",
        None,
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["statusCode"], 200);
    let data: Vec<&str> = v["response"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, vec!["m2", "m1"]);
    let link = v["headers"]["link"].as_str().unwrap();
    let next = link
        .split(", ")
        .find(|l| l.ends_with("rel=\"next\""))
        .unwrap();
    let query = next
        .trim_start_matches("<./messages?")
        .split('>')
        .next()
        .unwrap();
    let (_, _, body) = http(&format!("{base}?{query}&envelope=json"), "GET", None, "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"][0]["data"], "m0");
    assert!(!v["headers"]["link"].as_str().unwrap().contains("next"));
}

/// When the history store's queue overflows, a publish it may have refused is NACKed,
/// never ACKed: every ACKed message is in history afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_store_refused_are_nacked_and_every_ack_is_in_history() {
    let dir = std::env::temp_dir().join(format!("tern-edge-overload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = tern_store::StoreConfig {
        path: Some(dir.join("history.redb")),
        queue_max: 1,
        ..Default::default()
    };
    let config = EdgeConfig {
        inbound_frames_per_second: 100_000,
        ..EdgeConfig::default()
    };
    let node = start_with_store(config, store).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    let total = 400;
    for serial in 0..total {
        send(
            &mut ws,
            json!({"action": 15, "channel": "busy", "msgSerial": serial,
            "messages": [{"name": "n", "data": format!("m{serial}")}]}),
        )
        .await;
    }
    let (mut acked, mut nacked) = (Vec::new(), 0);
    while acked.len() + nacked < total {
        let reply = next(&mut ws).await;
        match reply["action"].as_u64() {
            Some(1) => acked.push(format!("m{}", reply["msgSerial"])),
            Some(2) => {
                assert_eq!(reply["error"]["code"], 50000);
                nacked += 1;
            }
            _ => {}
        }
    }
    assert!(nacked > 0, "the store queue overflowed at least once");
    let (status, _, body) = http(
        &format!(
            "http://127.0.0.1:{}/channels/busy/messages?limit=1000&key=app.root:rootsecret",
            node.port
        ),
        "GET",
        None,
        "",
    )
    .await;
    assert_eq!(status, 200);
    let history: Vec<Value> = serde_json::from_str(&body).unwrap();
    let stored: std::collections::HashSet<String> = history
        .iter()
        .map(|m| m["data"].as_str().unwrap().to_string())
        .collect();
    for data in &acked {
        assert!(stored.contains(data), "ACKed {data} is in history");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
