//! A real `tern serve` whose history file lives on a small tmpfs that fills up: every
//! publish answered 201 (REST) or ACK (realtime) must be in history afterwards, the ones
//! that could not be stored must get a 5xx / NACK with an Ably error code, `/health`
//! must say unhealthy while commits fail, and once the filesystem grows writes succeed
//! and `/health` is healthy again.
//!
//! Needs root (it mounts a tmpfs), as CI and every developer machine of this project run.
//! Mounting is not optional: without it the test fails loudly rather than skipping.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const KEY: &str = "test.root:rootsecret";
const CHANNEL: &str = "diskfault";
/// Size of the tmpfs the history file lives on while it fills up, and after it grows.
const SMALL_FS: &str = "3m";
const LARGE_FS: &str = "64m";
/// Bytes of data per message: big enough that the small filesystem fills in a few
/// hundred publishes.
const DATA_BYTES: usize = 4096;
/// Publishes of each kind (REST, realtime) that must fail before the disk counts as full.
const FAILURES_WANTED: usize = 3;
/// Bounds of the fill phase: it must have failed long before either.
const FILL_PUBLISHES_MAX: usize = 6000;
const FILL_TIME_MAX: Duration = Duration::from_secs(12);
/// One request or reply; only reached on failure.
const WAIT: Duration = Duration::from_secs(10);

/// A tmpfs mounted for the test, unmounted (after the server that uses it is killed)
/// when dropped, also when the test panics.
struct Fixture {
    mount: PathBuf,
    server: Option<Child>,
    /// TOML appended to the config (sections of the one `[[apps]]`, e.g. a rule).
    extra: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn mount() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={SMALL_FS}"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {SMALL_FS} tmpfs at {} failed ({status}): this test needs root \
             and mount(8); it must not be skipped",
            mount.display()
        );
        Fixture {
            mount,
            server: None,
            extra: String::new(),
            _dir: dir,
        }
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.mount)
            .status()
            .expect("running mount");
        assert!(status.success(), "remounting with size={size} failed");
    }

    /// Starts `tern serve` with its history file on the tmpfs; returns its port.
    fn start_tern(&mut self, dir: &Path) -> u16 {
        let config = dir.join("tern.toml");
        let text = config_text(&self.mount.join("history.redb")) + &self.extra;
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--port", "0"])
            .env("TERN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tern");
        let stdout = child.stdout.take().unwrap();
        self.server = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("listening on http://127.0.0.1:")
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("tern did not print its listening line in 20 s")
    }
}

impl Fixture {
    /// Kills the server (SIGKILL: nothing is flushed on the way out) and starts it again
    /// on the same history file; returns its new port.
    fn restart(&mut self, dir: &Path) -> u16 {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_tern(dir)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Only the child this test started, by its handle.
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn config_text(history: &Path) -> String {
    format!(
        r#"
[server]
host = "127.0.0.1"
port = 0

[limits]
inbound_frames_per_second = 1000000

[history]
mode = "redb"
path = "{}"

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{{"*":["*"]}}'
revocable_tokens = true
"#,
        history.display()
    )
}

/// Minimal HTTP/1.1 client over a raw socket: status and body.
async fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} got no answer in {WAIT:?}"));
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// How one publish was answered.
#[derive(Debug)]
enum Answer {
    Stored,
    /// Refused: HTTP status (REST) or the error's statusCode (realtime), and Ably code.
    Refused {
        status: u64,
        code: u64,
    },
}

fn message(id: &str) -> Value {
    json!({ "id": id, "name": "fill", "data": format!("{id}:{}", "x".repeat(DATA_BYTES)) })
}

async fn rest_publish(port: u16, id: &str) -> Answer {
    let path = format!("/channels/{CHANNEL}/messages?key={KEY}");
    let (status, body) = http(port, "POST", &path, &message(id).to_string()).await;
    if status == 201 {
        return Answer::Stored;
    }
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("REST {status} without a JSON body: {body}"));
    Answer::Refused {
        status: status as u64,
        code: body["error"]["code"].as_u64().expect("an Ably error code"),
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A realtime connection that publishes one message at a time.
struct Realtime {
    ws: Ws,
    msg_serial: u64,
}

impl Realtime {
    async fn connect(port: u16) -> Realtime {
        let url = format!("ws://127.0.0.1:{port}/?key={KEY}&format=json");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        loop {
            if next_frame(&mut ws).await["action"] == 4 {
                break;
            }
        }
        Realtime { ws, msg_serial: 0 }
    }

    async fn publish(&mut self, id: &str) -> Answer {
        let serial = self.msg_serial;
        self.msg_serial += 1;
        self.send(serial, id).await
    }

    /// Sends a MESSAGE frame with `msg_serial` (a re-sent one: the same serial and
    /// message as before) and waits for its ACK or NACK.
    async fn send(&mut self, serial: u64, id: &str) -> Answer {
        let frame = json!({
            "action": 15,
            "channel": CHANNEL,
            "msgSerial": serial,
            "messages": [message(id)],
        });
        self.ws
            .send(WsMessage::text(frame.to_string()))
            .await
            .unwrap();
        loop {
            let reply = next_frame(&mut self.ws).await;
            let action = reply["action"].as_u64();
            if action != Some(1) && action != Some(2) {
                continue;
            }
            assert_eq!(reply["msgSerial"], serial, "replies in msgSerial order");
            if action == Some(1) {
                return Answer::Stored;
            }
            return Answer::Refused {
                status: reply["error"]["statusCode"].as_u64().expect("statusCode"),
                code: reply["error"]["code"].as_u64().expect("an Ably error code"),
            };
        }
    }
}

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection closed")
            .unwrap();
        if let WsMessage::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Every message id in the channel's history, oldest first, following `Link: next`.
async fn history_ids(port: u16) -> Vec<String> {
    let mut ids = Vec::new();
    let mut path = format!("/channels/{CHANNEL}/messages?key={KEY}&limit=1000&direction=forwards");
    for _page in 0..100 {
        let (body, next) = history_page(port, &path).await;
        let items: Vec<Value> = serde_json::from_str(&body).unwrap();
        ids.extend(items.iter().map(|m| m["id"].as_str().unwrap().to_string()));
        match next {
            Some(query) => path = format!("/channels/{CHANNEL}/messages?{query}"),
            None => return ids,
        }
    }
    panic!("history has more than 100 pages");
}

/// One page of history and the query of its next page. Retries for a while: right
/// after a failed write the history file is being reopened (at most once a second),
/// and reads fail meanwhile.
async fn history_page(port: u16, path: &str) -> (String, Option<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body, next) = http_with_next(port, path).await;
        if status == 200 {
            return (body, next);
        }
        assert!(
            Instant::now() < deadline,
            "history read failed for {WAIT:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET with the `rel="next"` query of its Link header.
async fn http_with_next(port: u16, path: &str) -> (u16, String, Option<String>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("history answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let next = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("link:"))
        .and_then(|l| {
            l.split(", ")
                .find(|part| part.ends_with("rel=\"next\""))
                .and_then(|part| part.split("<./messages?").nth(1))
                .and_then(|rest| rest.split('>').next())
                .map(str::to_string)
        });
    (status, body.to_string(), next)
}

async fn health(port: u16) -> (u16, Value) {
    let (status, body) = http(port, "GET", "/health", "").await;
    (status, serde_json::from_str(&body).unwrap())
}

async fn assert_unhealthy(port: u16) {
    let (status, body) = health(port).await;
    assert_eq!(status, 503, "/health while commits fail: {body}");
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("history")),
        "{body}"
    );
}

/// What the publishes got, by id.
#[derive(Default)]
struct Tally {
    stored: Vec<String>,
    refused: Vec<(String, Answer)>,
}

impl Tally {
    fn record(&mut self, id: String, answer: Answer) {
        match answer {
            Answer::Stored => self.stored.push(id),
            refused => self.refused.push((id, refused)),
        }
    }

    fn refused_with(&self, prefix: &str) -> usize {
        self.refused
            .iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .count()
    }
}

/// Fills the disk: alternate REST and realtime publishes until both have been refused a
/// few times (the disk is full) or the bounds run out; with `check_health`, `/health`
/// must say unhealthy right after the first refusal.
async fn fill(port: u16, realtime: &mut Realtime, check_health: bool) -> Tally {
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut n = 0;
    let mut unhealthy_seen = !check_health;
    while (tally.refused_with("rest-") < FAILURES_WANTED
        || tally.refused_with("rt-") < FAILURES_WANTED)
        && n < FILL_PUBLISHES_MAX
        && started.elapsed() < FILL_TIME_MAX
    {
        let id = format!("rest-{n}");
        let answer = rest_publish(port, &id).await;
        tally.record(id, answer);
        let id = format!("rt-{n}");
        let answer = realtime.publish(&id).await;
        tally.record(id, answer);
        n += 1;
        if !tally.refused.is_empty() && !unhealthy_seen {
            assert_unhealthy(port).await;
            unhealthy_seen = true;
        }
    }
    assert!(
        tally.refused_with("rest-") >= FAILURES_WANTED
            && tally.refused_with("rt-") >= FAILURES_WANTED,
        "the disk filled but publishes were not refused: {} of {} publishes answered as \
         stored, {} refused, after {:?}",
        tally.stored.len(),
        2 * n,
        tally.refused.len(),
        started.elapsed()
    );
    tally
}

/// Every publish answered as stored is in history, and nothing is there twice; returns
/// the ids in history.
async fn assert_all_acked_stored_once(port: u16, tally: &Tally) -> Vec<String> {
    let ids = history_ids(port).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    let lost: Vec<&String> = tally
        .stored
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged publishes are not in history: {:?}",
        lost.len(),
        tally.stored.len(),
        &lost[..lost.len().min(10)]
    );
    ids
}

/// The disk fills: every 201/ACK is in history exactly once, every refusal is a 5xx/NACK
/// with an Ably 5xxxx code, `/health` is 503 while commits fail, and after the
/// filesystem grows, publishes are stored again and `/health` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_nacks_and_recovers_with_nothing_acked_lost() {
    let mut fixture = Fixture::mount();
    let config_dir = tempfile::tempdir().unwrap();
    let port = fixture.start_tern(config_dir.path());
    let mut realtime = Realtime::connect(port).await;
    // Right after the first refusal, `/health` says commits are failing.
    let mut tally = fill(port, &mut realtime, true).await;
    assert_unhealthy(port).await;
    for (id, answer) in &tally.refused {
        assert!(
            matches!(
                answer,
                Answer::Refused {
                    status: 500..=599,
                    code: 50000..=59999
                }
            ),
            "{id} refused with {answer:?}, not a 5xx with an Ably 5xxxx code"
        );
    }
    // A refused REST publish retried with its message id (as the SDKs retry a 5xx) is
    // known to the hub, but its write was lost: the retry must not be answered 201
    // unless it is stored now.
    let refused_rest: Vec<String> = tally
        .refused
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| id.starts_with("rest-"))
        .collect();
    for id in &refused_rest {
        let answer = rest_publish(port, id).await;
        tally.record(id.clone(), answer);
    }
    // Whatever was acknowledged while the disk filled is stored.
    assert_all_acked_stored_once(port, &tally).await;

    // Space returns: publishes are stored again (soon, not necessarily the first one
    // after the remount) and the node is healthy.
    fixture.resize(LARGE_FS);
    let recovering = Instant::now();
    let mut m = 0;
    loop {
        let rest_id = format!("rest-after-{m}");
        let rest = rest_publish(port, &rest_id).await;
        let rt_id = format!("rt-after-{m}");
        let rt = realtime.publish(&rt_id).await;
        let both_stored = matches!((&rest, &rt), (Answer::Stored, Answer::Stored));
        tally.record(rest_id, rest);
        tally.record(rt_id, rt);
        m += 1;
        if both_stored {
            break;
        }
        assert!(
            recovering.elapsed() < WAIT,
            "publishes still refused {WAIT:?} after the filesystem grew"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Healthy once commits have kept succeeding for a while (3 s: a nearly full disk
    // fails some commits between successes).
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = health(port).await;
        if status == 200 {
            assert_eq!(body["status"], "ok", "{body}");
            break;
        }
        assert_eq!(body["status"], "unhealthy", "{body}");
        assert!(
            Instant::now() < deadline,
            "/health still {status} {WAIT:?} after publishes were stored again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Retried once space has returned, every refused REST publish is stored (once).
    for id in &refused_rest {
        let answer = rest_publish(port, id).await;
        assert!(
            matches!(answer, Answer::Stored),
            "retried {id} answered {answer:?}"
        );
        tally.record(id.clone(), answer);
    }

    // A NACKed message re-sent with its msgSerial (as after a resume) is answered from
    // the connection's reply window, not applied again: still a NACK, although commits
    // succeed now, because it was never stored.
    let (resent, _) = tally
        .refused
        .iter()
        .find(|(id, _)| id.starts_with("rt-") && !id.starts_with("rt-after"))
        .expect("a refused realtime publish");
    let resent = resent.clone();
    let serial: u64 = resent["rt-".len()..].parse().unwrap();
    let answer = realtime.send(serial, &resent).await;
    assert!(
        matches!(answer, Answer::Refused { code: 50000, .. }),
        "re-sent {resent} answered {answer:?}"
    );
    tally.record(resent, answer);

    let ids = assert_all_acked_stored_once(port, &tally).await;
    eprintln!(
        "disk fault: {} publishes acknowledged (all in history), {} refused, {} items in history",
        tally.stored.len(),
        tally.refused.len(),
        ids.len()
    );
}

/// A token of the test key for `client_id` (the server verifies it: same key and
/// secret).
fn token_for(client_id: &str) -> String {
    let key = tern_auth::ApiKey::from_key_string(KEY, tern_auth::Capability::all()).unwrap();
    let ring = tern_auth::KeyRing::new(vec![key.clone()]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Issued a second back, so it is older than a revocation made right after.
    ring.issue_token(
        &key,
        Some(client_id),
        &key.capability,
        3_600_000,
        now - 1_000,
    )
    .token
}

/// POST /keys/test.root/revokeTokens for one clientId: stored (201) or refused.
async fn revoke(port: u16, client_id: &str) -> Answer {
    let path = format!("/keys/test.root/revokeTokens?key={KEY}");
    let body = json!({ "targets": [format!("clientId:{client_id}")] }).to_string();
    let (status, body) = http(port, "POST", &path, &body).await;
    if status == 201 {
        return Answer::Stored;
    }
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("revokeTokens {status} without a JSON body: {body}"));
    Answer::Refused {
        status: status as u64,
        code: body["error"]["code"].as_u64().expect("an Ably error code"),
    }
}

/// The Ably error code a REST read with `token` gets (0: it was served).
async fn token_refusal(port: u16, token: &str) -> u64 {
    let (status, body) = http(
        port,
        "GET",
        &format!("/channels/x/messages?access_token={token}"),
        "",
    )
    .await;
    if status == 200 {
        return 0;
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    body["error"]["code"].as_u64().expect("an Ably error code")
}

/// A token revocation's 201 is a promise too: while the disk is full revocations are
/// refused with a 5xx, and after the disk grows and the node is killed and restarted,
/// every revocation answered 201 is in force (its token refused with 40141).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_revocations_are_acknowledged_only_when_stored() {
    let mut fixture = Fixture::mount();
    let config_dir = tempfile::tempdir().unwrap();
    let mut port = fixture.start_tern(config_dir.path());
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut n = 0;
    // Fill with publishes, revoking between them, until revocations are refused.
    while refused < FAILURES_WANTED && n < FILL_PUBLISHES_MAX && started.elapsed() < FILL_TIME_MAX {
        let _ = rest_publish(port, &format!("fill-{n}")).await;
        let client_id = format!("client-{n}");
        let token = token_for(&client_id);
        match revoke(port, &client_id).await {
            Answer::Stored => acked.push((client_id, token)),
            Answer::Refused { status, code } => {
                assert!(
                    (500..=599).contains(&status) && (50000..=59999).contains(&code),
                    "revocation refused with {status}/{code}, not a 5xx with an Ably 5xxxx code"
                );
                refused += 1;
            }
        }
        n += 1;
    }
    assert!(
        refused >= FAILURES_WANTED,
        "the disk filled but revocations were not refused ({} acknowledged)",
        acked.len()
    );

    fixture.resize(LARGE_FS);
    let recovering = Instant::now();
    loop {
        let client_id = format!("after-{}", acked.len());
        let token = token_for(&client_id);
        if let Answer::Stored = revoke(port, &client_id).await {
            acked.push((client_id, token));
            break;
        }
        assert!(
            recovering.elapsed() < WAIT,
            "revocations still refused {WAIT:?} after the filesystem grew"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    port = fixture.restart(config_dir.path());
    for (client_id, token) in &acked {
        assert_eq!(
            token_refusal(port, token).await,
            40141,
            "acknowledged revocation of {client_id} lost in the restart"
        );
    }
    assert_eq!(token_refusal(port, &token_for("never-revoked")).await, 0);
    eprintln!(
        "revocations: {} acknowledged (all in force after a restart), {refused} refused",
        acked.len()
    );
}

/// A push device registration (`PUT /push/deviceRegistrations/{id}`) with `bytes` of
/// metadata: whether it was answered as stored, or how it was refused.
async fn register_device(port: u16, id: &str, bytes: usize) -> Answer {
    let device = json!({
        "id": id,
        "platform": "android",
        "formFactor": "phone",
        "metadata": { "fill": "x".repeat(bytes) },
        "push": { "recipient": { "transportType": "fcm", "registrationToken": id } },
    });
    let path = format!("/push/deviceRegistrations/{id}?key={KEY}");
    let (status, body) = http(port, "PUT", &path, &device.to_string()).await;
    if status == 200 {
        return Answer::Stored;
    }
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("push {status} without a JSON body: {body}"));
    Answer::Refused {
        status: status as u64,
        code: body["error"]["code"].as_u64().expect("an Ably error code"),
    }
}

/// Every registered device id, following `Link: next`; retried like history reads
/// while the history file is being reopened.
async fn device_ids(port: u16) -> Vec<String> {
    let mut ids = Vec::new();
    let mut path = format!("/push/deviceRegistrations?key={KEY}&limit=1000");
    for _page in 0..100 {
        let deadline = Instant::now() + WAIT;
        let (body, head) = loop {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
                .await
                .expect("device list in time")
                .unwrap();
            let text = String::from_utf8_lossy(&raw).to_string();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            if head.split(' ').nth(1) == Some("200") {
                break (body.to_string(), head.to_string());
            }
            assert!(
                Instant::now() < deadline,
                "device list failed: {head} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let items: Vec<Value> = serde_json::from_str(&body).unwrap();
        ids.extend(items.iter().map(|d| d["id"].as_str().unwrap().to_string()));
        let next = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("link:"))
            .and_then(|l| {
                l.split(", ")
                    .find(|part| part.ends_with("rel=\"next\""))
                    .and_then(|part| part.split("<./deviceRegistrations?").nth(1))
                    .and_then(|rest| rest.split('>').next())
                    .map(str::to_string)
            });
        match next {
            Some(query) => path = format!("/push/deviceRegistrations?{query}&key={KEY}"),
            None => return ids,
        }
    }
    panic!("the device list has more than 100 pages");
}

fn assert_devices_kept(ids: &[String], tally: &Tally, when: &str) {
    let listed: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(listed.len(), ids.len(), "a device listed twice {when}");
    let lost: Vec<&String> = tally
        .stored
        .iter()
        .filter(|id| !listed.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged registrations are gone {when}: {:?}",
        lost.len(),
        tally.stored.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Push registrations while the disk fills: every registration answered 200 is listed
/// (also after the filesystem grows and after a SIGKILL restart, when the registry is
/// folded again from the stored log), every refusal is a 5xx with an Ably 5xxxx code,
/// and once there is space again registrations are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_push_registrations_and_keeps_every_acked_one() {
    let mut fixture = Fixture::mount();
    let config_dir = tempfile::tempdir().unwrap();
    let port = fixture.start_tern(config_dir.path());
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut n = 0;
    while tally.refused.len() < FAILURES_WANTED
        && n < FILL_PUBLISHES_MAX
        && started.elapsed() < FILL_TIME_MAX
    {
        let id = format!("device-{n}");
        // Just under the default metadata bound (4,096 bytes of JSON).
        let answer = register_device(port, &id, DATA_BYTES - 100).await;
        tally.record(id, answer);
        n += 1;
    }
    assert!(
        tally.refused.len() >= FAILURES_WANTED,
        "the disk filled but registrations were not refused: {} stored after {:?}",
        tally.stored.len(),
        started.elapsed()
    );
    for (id, answer) in &tally.refused {
        assert!(
            matches!(
                answer,
                Answer::Refused {
                    status: 500..=599,
                    code: 50000..=59999
                }
            ),
            "{id} refused with {answer:?}, not a 5xx with an Ably 5xxxx code"
        );
    }
    assert_devices_kept(&device_ids(port).await, &tally, "while the disk is full");

    fixture.resize(LARGE_FS);
    let recovering = Instant::now();
    for m in 0.. {
        let id = format!("device-after-{m}");
        let answer = register_device(port, &id, 16).await;
        let stored = matches!(answer, Answer::Stored);
        tally.record(id, answer);
        if stored {
            break;
        }
        assert!(
            recovering.elapsed() < WAIT,
            "registrations still refused {WAIT:?} after the filesystem grew"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_devices_kept(&device_ids(port).await, &tally, "after the disk grew");

    // Only the child this test started, by its handle.
    if let Some(mut child) = fixture.server.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let port = fixture.start_tern(config_dir.path());
    assert_devices_kept(&device_ids(port).await, &tally, "after a SIGKILL restart");
}

/// An Ably-shaped refusal: a 5xx status with an Ably 5xxxx code.
fn assert_server_refusal(what: &str, status: u16, body: &str) {
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|b| b["error"]["code"].as_u64());
    assert!(
        (500..=599).contains(&status) && code.is_some_and(|c| (50000..=59999).contains(&c)),
        "{what} refused with {status} {body}, not a 5xx with an Ably 5xxxx code"
    );
}

/// Changes (PATCH) and annotations (POST) are acknowledged only once stored: while the
/// disk fills, every one answered 200/201 is, after the filesystem grows, among the
/// message's versions (by its version serial) or annotations exactly once, and every
/// other one got a 5xx with an Ably 5xxxx code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_acknowledges_only_stored_changes_and_annotations() {
    let mut fixture = Fixture::mount();
    let config_dir = tempfile::tempdir().unwrap();
    let port = fixture.start_tern(config_dir.path());
    let messages = format!("/channels/{CHANNEL}/messages");
    let (status, body) = http(
        port,
        "POST",
        &format!("{messages}?key={KEY}"),
        r#"{"data":"a"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let serial = serde_json::from_str::<Value>(&body).unwrap()["serials"][0]
        .as_str()
        .unwrap()
        .to_string();
    let change_path = format!("{messages}/{serial}?key={KEY}");
    let annotations_path = format!("{messages}/{serial}/annotations?key={KEY}");
    let change =
        |n: usize| json!({ "action": 1, "data": format!("v{n}:{}", "x".repeat(DATA_BYTES)) });
    let annotation = |n: usize| json!([{ "type": "fill:total.v1", "name": format!("a{n}"), "data": "x".repeat(DATA_BYTES) }]);

    let (mut versions_acked, mut annotations_acked) = (Vec::new(), Vec::new());
    let (mut changes_refused, mut annotations_refused) = (0, 0);
    let started = Instant::now();
    let mut n = 0;
    while (changes_refused < FAILURES_WANTED || annotations_refused < FAILURES_WANTED)
        && n < FILL_PUBLISHES_MAX
        && started.elapsed() < FILL_TIME_MAX
    {
        let (status, body) = http(port, "PATCH", &change_path, &change(n).to_string()).await;
        if status == 200 {
            let answer: Value = serde_json::from_str(&body).unwrap();
            versions_acked.push(answer["versionSerial"].as_str().unwrap().to_string());
        } else {
            assert_server_refusal("a change", status, &body);
            changes_refused += 1;
        }
        let (status, body) =
            http(port, "POST", &annotations_path, &annotation(n).to_string()).await;
        if status == 201 {
            annotations_acked.push(format!("a{n}"));
        } else {
            assert_server_refusal("an annotation", status, &body);
            annotations_refused += 1;
        }
        n += 1;
    }
    assert!(
        changes_refused >= FAILURES_WANTED && annotations_refused >= FAILURES_WANTED,
        "the disk filled but changes ({changes_refused} refused) or annotations \
         ({annotations_refused} refused) were not refused after {n} of each"
    );
    assert!(!versions_acked.is_empty() && !annotations_acked.is_empty());

    fixture.resize(LARGE_FS);
    let recovering = Instant::now();
    loop {
        let (status, _) = http(port, "PATCH", &change_path, &change(n).to_string()).await;
        if status == 200 {
            break;
        }
        assert!(
            recovering.elapsed() < WAIT,
            "changes still refused after the filesystem grew"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = http(
        port,
        "GET",
        &format!("{messages}/{serial}/versions?key={KEY}&limit=1000"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored: Vec<String> = serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .iter()
        .filter_map(|v| v["version"]["serial"].as_str().map(str::to_string))
        .collect();
    for version in &versions_acked {
        let copies = stored.iter().filter(|s| *s == version).count();
        assert_eq!(
            copies, 1,
            "acknowledged change {version} is stored {copies} times"
        );
    }
    let (status, body) = http(
        port,
        "GET",
        &format!("{messages}/{serial}/annotations?key={KEY}&limit=1000"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored: Vec<String> = serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str().map(str::to_string))
        .collect();
    for name in &annotations_acked {
        let copies = stored.iter().filter(|s| *s == name).count();
        assert_eq!(
            copies, 1,
            "acknowledged annotation {name} is stored {copies} times"
        );
    }
}

/// A function (an HTTP endpoint) that answers 204 and keeps the bodies, or 503 while it
/// is down: a minimal HTTP/1.1 server over raw sockets, kept-alive connections included.
struct Function {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Function {
    async fn start() -> Function {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kept, answering) = (bodies.clone(), up.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Function::serve(stream, kept.clone(), answering.clone()));
            }
        });
        Function { port, bodies, up }
    }

    async fn serve(
        mut stream: TcpStream,
        bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            // One request: the head, then content-length bytes of body.
            let head_end = loop {
                if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_end + length {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).to_string();
            buffer.drain(..head_end + length);
            let answer: &[u8] = if up.load(std::sync::atomic::Ordering::SeqCst) {
                bodies.lock().unwrap().push(body);
                b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            };
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    /// How many times each message id (`"id":"<id>"` in a body) reached the function.
    fn deliveries(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for body in self.bodies.lock().unwrap().iter() {
            let items: Value = serde_json::from_str(body).expect("a JSON webhook body");
            let mut stack = vec![&items];
            while let Some(value) = stack.pop() {
                match value {
                    Value::Object(map) => {
                        if let (Some(Value::String(id)), Some(_)) = (map.get("id"), map.get("data"))
                        {
                            *counts.entry(id.clone()).or_default() += 1;
                        }
                        stack.extend(map.values());
                    }
                    Value::Array(list) => stack.extend(list),
                    _ => {}
                }
            }
        }
        counts
    }
}

/// The webhook outbox is written in the commit that stores the message, before the
/// ACK: with the disk full, publishes are refused and none of them is promised to the
/// function; every one answered 201 / ACK reaches the function. The function is down
/// (503) while the disk fills, and the server is SIGKILLed once the disk has room
/// again, so every delivery comes from the outbox on disk (a delivery repeated carries
/// the same message id, which is what a function de-duplicates on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_webhooks_reach_the_function_for_every_acked_publish() {
    let function = Function::start().await;
    let mut fixture = Fixture::mount();
    fixture.extra = format!(
        r#"
[[apps.rules]]
id = "diskfault-hook"
channel_filter = "^{CHANNEL}$"
events = ["channel.message"]
url = "http://127.0.0.1:{}/hook"
request_mode = "batched"
batch_window_ms = 50
retry_delay_initial_ms = 100
retry_delay_max_ms = 500
"#,
        function.port
    );
    let config_dir = tempfile::tempdir().unwrap();
    let port = fixture.start_tern(config_dir.path());
    let mut realtime = Realtime::connect(port).await;
    let tally = fill(port, &mut realtime, false).await;
    // Room again, then a SIGKILL: what was promised must come from the store.
    fixture.resize(LARGE_FS);
    let port = fixture.restart(config_dir.path());
    assert!(
        function.bodies.lock().unwrap().is_empty(),
        "the function was down"
    );
    function.up.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let got = function.deliveries();
        let missing: Vec<&String> = tally
            .stored
            .iter()
            .filter(|id| !got.contains_key(id.as_str()))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged publishes never reached the function: {:?}",
        missing.len(),
        tally.stored.len(),
        &missing[..missing.len().min(10)]
    );
    // No phantom: whatever reached the function is in history. A publish refused with a
    // 5xx may still be there: a commit that fails at its last step (the disk filling as
    // it syncs) can be on disk when the file is reopened, which is why a 5xx is "not
    // known to be stored" and the SDKs retry it with the same message id. Its webhook
    // is then that message's, in the same commit, never one for a message that is not.
    let got = function.deliveries();
    let history: std::collections::HashSet<String> = history_ids(port).await.into_iter().collect();
    let phantom: Vec<&String> = got.keys().filter(|id| !history.contains(*id)).collect();
    assert!(
        phantom.is_empty(),
        "the function got messages that are not in history: {phantom:?}"
    );
    let refused_stored = tally
        .refused
        .iter()
        .filter(|(id, _)| history.contains(id))
        .count();
    let again: usize = got.values().map(|c| c - 1).sum();
    eprintln!(
        "webhooks on a full disk: {} acknowledged, {} refused ({refused_stored} of them \
         stored all the same, and delivered), every acknowledged one delivered; {again} \
         deliveries repeated (same id)",
        tally.stored.len(),
        tally.refused.len()
    );
    // And the server still serves.
    assert_eq!(http(port, "GET", "/health", "").await.0, 200);
}
