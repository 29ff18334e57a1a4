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
        key("meta", "metasecret", r#"{"open:*":["channel-metadata"]}"#),
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
    let state = Arc::new(EdgeState::new(config, hub, keys(), rx).with_store(store));
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
    // The four core modes and annotation_publish: Ably's default grant for `*`.
    assert_eq!(attached["flags"], 983040 | 2097152);
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

/// A token that lives less than the renewal notice (30 s by default, as Ably) is not
/// asked to renew: it gets no AUTH and is disconnected with 40142 (status 401) when it
/// expires, so a client holding only such a token sees the DISCONNECTED the SDK expects
/// instead of failing with 40171.
#[tokio::test]
async fn token_expiry_disconnects_without_an_auth_request() {
    let node = start(EdgeConfig::default()).await;
    let key = node.keys.get("app.root").unwrap().clone();
    let token = node
        .keys
        .issue_token(&key, None, &Capability::all(), 1_000, tern_edge::now_ms());
    let (mut ws, _) = connected(&node, &format!("access_token={}", token.token)).await;
    let frame = next(&mut ws).await;
    assert_eq!(frame["action"], 6, "DISCONNECTED, not {frame}");
    assert_eq!(frame["error"]["code"], 40142);
    assert_eq!(frame["error"]["statusCode"], 401);
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

/// After in-band AUTH with a narrower token, a channel whose capability is gone gets
/// channel ERROR 40160 and no further messages, and its presence member leaves; a
/// channel that keeps subscribe stays attached but its member leaves where presence
/// is gone. The connection itself stays up (same connectionId).
#[tokio::test]
async fn reauth_with_narrower_capability_fails_lost_channels() {
    let node = start(EdgeConfig::default()).await;
    let key = node.keys.get("app.root").unwrap().clone();
    let broad = Capability::parse(
        r#"{"lost":["subscribe","presence"],"kept":["subscribe","presence","publish"]}"#,
    )
    .unwrap();
    let token = node
        .keys
        .issue_token(&key, Some("bob"), &broad, 60_000, tern_edge::now_ms());
    let (mut bob, hello) = connected(&node, &format!("access_token={}", token.token)).await;
    let (mut watcher, _) = connected(&node, "key=app.root:rootsecret").await;
    for (serial, channel) in ["lost", "kept"].into_iter().enumerate() {
        attach(&mut bob, channel).await;
        attach(&mut watcher, channel).await;
        send(&mut bob, json!({"action": 14, "channel": channel, "msgSerial": serial, "presence": [{"action": 2}]})).await;
        assert_eq!(expect_action(&mut bob, 1).await["msgSerial"], serial);
    }

    let narrow = Capability::parse(r#"{"kept":["subscribe"]}"#).unwrap();
    let token = node
        .keys
        .issue_token(&key, Some("bob"), &narrow, 60_000, tern_edge::now_ms());
    send(
        &mut bob,
        json!({"action": 17, "auth": {"accessToken": token.token}}),
    )
    .await;
    let again = expect_action(&mut bob, 4).await;
    assert_eq!(again["connectionId"], hello["connectionId"]);
    let failed = expect_action(&mut bob, 9).await;
    assert_eq!(failed["channel"], "lost");
    assert_eq!(
        (
            failed["error"]["code"].clone(),
            failed["error"]["statusCode"].clone()
        ),
        (json!(40160), json!(401))
    );

    // bob's member leaves both channels: "lost" is gone, "kept" no longer allows presence.
    let mut left = Vec::new();
    while left.len() < 2 {
        let frame = expect_action(&mut watcher, 14).await;
        for member in frame["presence"].as_array().unwrap() {
            if member["action"] == 3 && member["clientId"] == "bob" {
                left.push(frame["channel"].as_str().unwrap().to_owned());
            }
        }
    }
    left.sort();
    assert_eq!(left, ["kept", "lost"]);

    // Published in this order, so "lost" would be queued to bob before "kept".
    for (serial, channel) in ["lost", "kept"].into_iter().enumerate() {
        send(&mut watcher, json!({"action": 15, "channel": channel, "msgSerial": serial, "messages": [{"data": channel}]})).await;
        assert_eq!(expect_action(&mut watcher, 1).await["msgSerial"], serial);
    }
    let delivered = expect_action(&mut bob, 15).await;
    assert_eq!(delivered["channel"], "kept");
    assert_eq!(delivered["messages"][0]["data"], "kept");
    // Publishing on "kept" is refused now; the connection is still usable.
    send(
        &mut bob,
        json!({"action": 15, "channel": "kept", "msgSerial": 2, "messages": [{"data": "x"}]}),
    )
    .await;
    assert_eq!(expect_action(&mut bob, 2).await["error"]["code"], 40160);
}

/// A JWT living longer than the node's `token_ttl_max_ms` (or with an absurd exp such
/// as 1e300) is refused at connect with 40144, as is one whose nbf is past the skew;
/// one within both connects.
#[tokio::test]
async fn jwt_lifetime_and_skew_at_connect() {
    let config = EdgeConfig {
        token_policy: tern_auth::TokenPolicy {
            ttl_max_ms: 60_000,
            ..tern_auth::TokenPolicy::default()
        },
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let key = node.keys.get("app.root").unwrap().clone();
    let now_s = tern_edge::now_ms() / 1000;
    for refused in [
        json!({"iat": now_s, "exp": now_s + 120}),
        json!({"exp": 1e300}),
        json!({"exp": now_s + 50, "nbf": now_s + 40}),
    ] {
        let jwt = tern_auth::sign_jwt(&key, &refused);
        let mut ws = connect(&node, &format!("access_token={jwt}")).await;
        let error = expect_action(&mut ws, 9).await;
        assert_eq!(error["error"]["code"], 40144, "{refused}");
    }
    let jwt = tern_auth::sign_jwt(
        &key,
        &json!({"iat": now_s, "exp": now_s + 50, "nbf": now_s + 5}),
    );
    connected(&node, &format!("access_token={jwt}")).await;
}

/// A WebSocket message over `max_frame_size` ends the connection with ERROR 40009 (so
/// the SDK fails with that reason instead of resuming and re-sending it); others on
/// the node are unaffected.
#[tokio::test]
async fn oversized_websocket_message_gets_error_40009() {
    let config = EdgeConfig {
        max_message_size: 512,
        max_frame_size: 1_024,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let (mut other, _) = connected(&node, "key=app.root:rootsecret").await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    let big = "x".repeat(2_000);
    send(
        &mut ws,
        json!({"action": 15, "channel": "c", "msgSerial": 0, "messages": [{"data": big}]}),
    )
    .await;
    let error = expect_action(&mut ws, 9).await;
    assert_eq!(error["error"]["code"], 40009);
    assert!(error.get("channel").is_none());
    assert!(closed(&mut ws).await);
    send(&mut other, json!({"action": 0, "id": "still-here"})).await;
    assert_eq!(expect_action(&mut other, 0).await["id"], "still-here");
}

/// A client frame many times the WebSocket read buffer (512 bytes) but within the
/// limits arrives whole (the buffer grows for it), and the connection goes on.
#[tokio::test]
async fn websocket_message_larger_than_the_read_buffer_arrives_whole() {
    let node = start(EdgeConfig::default()).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    attach(&mut ws, "big").await;
    let big: String = (0..40_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    send(
        &mut ws,
        json!({"action": 15, "channel": "big", "msgSerial": 0, "messages": [{"data": big}]}),
    )
    .await;
    let echoed = expect_action(&mut ws, 15).await;
    assert_eq!(echoed["messages"][0]["data"], big.as_str());
    send(&mut ws, json!({"action": 0, "id": "after"})).await;
    assert_eq!(expect_action(&mut ws, 0).await["id"], "after");
}

/// A REST body over `max_frame_size` is an Ably error: 413 with `X-Ably-ErrorCode:
/// 40009` and an ErrorInfo body, not axum's plain-text answer.
#[tokio::test]
async fn oversized_rest_body_is_an_ably_error() {
    let config = EdgeConfig {
        max_message_size: 512,
        max_frame_size: 1_024,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let url = format!("http://127.0.0.1:{}/channels/c/messages", node.port);
    let body = json!({"data": "x".repeat(2_000)}).to_string();
    let (status, headers, text) =
        http(&url, "POST", Some(&basic("app.root:rootsecret")), &body).await;
    assert_eq!(status, 413);
    assert_eq!(
        headers.get("x-ably-errorcode").map(String::as_str),
        Some("40009")
    );
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["error"]["code"].clone(), v["error"]["statusCode"].clone()),
        (json!(40009), json!(413))
    );
}

/// Channel status needs `channel-metadata` (as on Ably): a subscribe-only key is
/// refused with 40160; a key with just `channel-metadata` reads it.
#[tokio::test]
async fn channel_status_needs_channel_metadata() {
    let node = start(EdgeConfig::default()).await;
    let url = format!("http://127.0.0.1:{}/channels/open:x", node.port);
    let (status, headers, _) = http(&url, "GET", Some(&basic("app.sub:subsecret")), "").await;
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("x-ably-errorcode").map(String::as_str),
        Some("40160")
    );
    let (status, _, body) = http(&url, "GET", Some(&basic("app.meta:metasecret")), "").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channelId"], "open:x");
}

/// Browsers: an origin not configured gets `Access-Control-Allow-Origin: *` and never
/// `Allow-Credentials`; a configured origin is reflected with credentials allowed.
#[tokio::test]
async fn cors_reflects_only_configured_origins() {
    let config = EdgeConfig {
        cors_allowed_origins: vec!["https://app.example.com".to_owned()],
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let url = format!("http://127.0.0.1:{}/time", node.port);
    for method in ["GET", "OPTIONS"] {
        let (_, headers, _) =
            http_with(&url, method, &[("origin", "https://evil.example")], "").await;
        assert_eq!(
            headers
                .get("access-control-allow-origin")
                .map(String::as_str),
            Some("*")
        );
        assert!(
            !headers.contains_key("access-control-allow-credentials"),
            "{method}"
        );
        let (_, headers, _) =
            http_with(&url, method, &[("origin", "https://app.example.com")], "").await;
        assert_eq!(
            headers
                .get("access-control-allow-origin")
                .map(String::as_str),
            Some("https://app.example.com")
        );
        assert_eq!(
            headers
                .get("access-control-allow-credentials")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(headers.get("vary").map(String::as_str), Some("Origin"));
    }
}

/// A full token-request nonce cache refuses further requests with 429 / 42910 rather
/// than forgetting nonces that could then be replayed.
#[tokio::test]
async fn full_nonce_cache_refuses_token_requests() {
    let config = EdgeConfig {
        nonce_cache_max: 1,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let url = format!("http://127.0.0.1:{}/keys/app.root/requestToken", node.port);
    let request = |nonce: &str| {
        let mut req = tern_auth::TokenRequest {
            key_name: "app.root".into(),
            ttl: None,
            capability: None,
            client_id: None,
            timestamp: tern_edge::now_ms(),
            nonce: nonce.into(),
            mac: String::new(),
        };
        req.mac = tern_auth::sign_token_request("rootsecret", &req);
        serde_json::to_string(&req).unwrap()
    };
    let first = request("0123456789abcdef");
    let (status, _, _) = http(&url, "POST", None, &first).await;
    assert_eq!(status, 200);
    let (status, headers, _) = http(&url, "POST", None, &request("fedcba9876543210")).await;
    assert_eq!(status, 429);
    assert_eq!(
        headers.get("x-ably-errorcode").map(String::as_str),
        Some("42910")
    );
    let (status, headers, _) = http(&url, "POST", None, &first).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("x-ably-errorcode").map(String::as_str),
        Some("40105")
    );
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

/// A flood of ATTACH/DETACH/HEARTBEAT frames past `control_frames_per_second` is
/// refused (ATTACH → channel ERROR 42910, heartbeats unanswered) without touching the
/// connection's publishes, and attaching works again in the next second.
#[tokio::test]
async fn control_frame_flood_is_rate_limited() {
    let config = EdgeConfig {
        control_frames_per_second: 20,
        ..EdgeConfig::default()
    };
    let node = start(config).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    for i in 0..100 {
        send(
            &mut ws,
            json!({"action": 10, "channel": format!("flood-{i}")}),
        )
        .await;
    }
    for i in 0..50 {
        send(&mut ws, json!({"action": 0, "id": format!("hb-{i}")})).await;
    }
    send(
        &mut ws,
        json!({"action": 15, "channel": "p", "msgSerial": 0, "messages": [{"data": "x"}]}),
    )
    .await;
    let (mut attached, mut refused, mut heartbeats) = (0, 0, 0);
    loop {
        let v = next(&mut ws).await;
        match v["action"].as_u64() {
            Some(11) => attached += 1,
            Some(9) => {
                assert_eq!(v["error"]["code"], 42910);
                assert!(v["channel"].as_str().unwrap().starts_with("flood-"));
                refused += 1;
            }
            Some(0) => heartbeats += 1,
            Some(1) => break,
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert!(attached <= 21, "attached {attached}");
    assert!(refused >= 70, "refused {refused}");
    assert!(heartbeats <= 21, "heartbeats {heartbeats}");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(attach(&mut ws, "later").await["action"], 11);
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
    // A known path with a method it does not serve is an unknown endpoint, as on Ably.
    for (method, path) in [("GET", "/keys/app.root/requestToken"), ("DELETE", "/time")] {
        let (status, headers, body) = http(&format!("{base}{path}"), method, None, "").await;
        assert_eq!(status, 404, "{method} {path}");
        assert_eq!(
            headers.get("x-ably-errorcode").map(String::as_str),
            Some("40400")
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], 40400);
    }
}

/// Minimal HTTP/1.1 client over a raw socket (keeps the dev-dependency list short).
async fn http(
    url: &str,
    method: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    let auth: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    http_with(url, method, &auth, body).await
}

/// `Basic` authorization header value for a whole key.
fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// [`http`] with any extra request headers.
async fn http_with(
    url: &str,
    method: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = TcpStream::connect(host).await.unwrap();
    let extra: String = extra
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} /{path} HTTP/1.1\r\nhost: {host}\r\n{extra}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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

/// A recover key that no Tern node could have issued gets a new connection with 80018
/// (invalid connection key), as Ably answers ably-js's `unrecoverableConnection`; a
/// well-formed key this node does not know is 80008.
#[tokio::test]
async fn malformed_recover_key_is_80018() {
    let node = start(EdgeConfig::default()).await;
    for key in ["_____!ablyjs_test_fake-key____", "nonsense", "a-b!c"] {
        let (_, hello) = connected(&node, &format!("key=app.root:rootsecret&recover={key}")).await;
        assert_eq!(hello["error"]["code"], 80018, "{key}");
        assert!(!hello["connectionKey"]
            .as_str()
            .unwrap_or_default()
            .contains(key));
    }
    let unknown = "abcdef-abcdefghijkl!abcdefghijklmnopqrst";
    let (_, hello) = connected(&node, &format!("key=app.root:rootsecret&recover={unknown}")).await;
    assert_eq!(hello["error"]["code"], 80008);
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

/// An ATTACH flagged ATTACH_RESUME (the client was attached before) does not replay the
/// rewind: those messages were delivered already (RTL4j, ably-js `resume_rewind_1`).
#[tokio::test]
async fn attach_resume_skips_rewind() {
    let node = start(EdgeConfig::default()).await;
    let (mut publisher, _) = connected(&node, "key=app.root:rootsecret").await;
    send(
        &mut publisher,
        json!({"action": 15, "channel": "rr", "msgSerial": 0, "messages": [{"data": "old"}]}),
    )
    .await;
    expect_action(&mut publisher, 1).await;
    let (mut sub, _) = connected(&node, "key=app.root:rootsecret").await;
    send(
        &mut sub,
        json!({"action": 10, "channel": "rr", "params": {"rewind": "1"}, "flags": 32}),
    )
    .await;
    let attached = expect_action(&mut sub, 11).await;
    assert_eq!(attached["flags"].as_u64().unwrap() & 2, 0, "no backlog");
    send(
        &mut publisher,
        json!({"action": 15, "channel": "rr", "msgSerial": 1, "messages": [{"data": "new"}]}),
    )
    .await;
    assert_eq!(collect_data(&mut sub, 1).await, vec!["new"]);
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
    // The link carries no credentials; the client adds its own, as the SDKs do.
    assert!(
        !link.contains("key=") && !link.contains("rootsecret"),
        "{link}"
    );
    let (_, _, body) = http(
        &format!("{base}?{query}&envelope=json&key=app.root:rootsecret"),
        "GET",
        None,
        "",
    )
    .await;
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

/// A SYNC sent by the client (ably-js `channel.sync()`) is answered with a full presence
/// sync of the attached channel, its last page with an empty cursor; with no members,
/// one empty page still ends the client's sync.
#[tokio::test]
async fn client_sync_gets_a_full_presence_sync() {
    let node = start(EdgeConfig::default()).await;
    let (mut member, _) = connected(&node, "key=app.root:rootsecret&clientId=m").await;
    send(
        &mut member,
        json!({"action": 14, "channel": "s", "msgSerial": 0, "presence": [{"action": 2, "data": "hi"}]}),
    )
    .await;
    expect_action(&mut member, 1).await;
    let (mut ws, _) = connected(&node, "key=app.root:rootsecret").await;
    attach(&mut ws, "s").await;
    expect_action(&mut ws, 16).await;
    send(&mut ws, json!({"action": 16, "channel": "s"})).await;
    let sync = expect_action(&mut ws, 16).await;
    assert!(sync["channelSerial"].as_str().unwrap().ends_with(':'));
    let members = sync["presence"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["clientId"], "m");
    attach(&mut ws, "empty").await;
    send(&mut ws, json!({"action": 16, "channel": "empty"})).await;
    let sync = expect_action(&mut ws, 16).await;
    assert_eq!(sync["channel"], "empty");
    assert_eq!(sync["presence"], json!([]));
}
