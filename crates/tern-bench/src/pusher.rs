//! The Pusher protocol (what Sockudo speaks), as much as a benchmark needs.
//!
//! Subscribers: a WebSocket to `/app/KEY?protocol=7`, `pusher:connection_established`
//! in, `pusher:subscribe` out, `pusher_internal:subscription_succeeded` in, then events
//! `{"event":…,"channel":…,"data":"…"}`; `pusher:ping` is answered with `pusher:pong`.
//!
//! Publishers: Pusher has no publish over the socket for servers, so they POST to the
//! HTTP events API (`/apps/ID/events`), signed with HMAC-SHA256 of the method, path and
//! sorted query (Pusher's "auth_signature"). Sockudo closes the connection after every
//! API response, so [`post`] makes one TCP connection per request.

use std::borrow::Cow;

use anyhow::Context;
use futures_util::SinkExt;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::socket::{dial, next_message, Socket, DIAL_TIMEOUT};
use crate::wire::REPLY_TIMEOUT;

/// The largest HTTP response head we accept before calling the stream garbage.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// The largest HTTP response body we accept (the events API answers `{}`).
const BODY_BYTES_MAX: usize = 1024 * 1024;

/// A Pusher app's credentials, given on the command line as `id:key:secret`.
#[derive(Clone, Debug)]
pub(crate) struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl App {
    pub(crate) fn parse(text: &str) -> anyhow::Result<App> {
        let mut parts = text.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("a Pusher app is given as id:key:secret");
        };
        anyhow::ensure!(
            [id, key, secret].iter().all(|p| !p.is_empty()),
            "a Pusher app is given as id:key:secret, none of them empty"
        );
        Ok(App {
            id: id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// A server→client event; `data` borrows from the frame when it is a plain string.
#[derive(Deserialize, Debug)]
pub(crate) struct Inbound<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "crate::wire::borrowed_str")]
    pub data: Option<Cow<'a, str>>,
}

impl<'a> Inbound<'a> {
    /// Parses an event. Error events carry an object as `data`, which does not parse as a
    /// string: the caller reports the whole frame then.
    pub(crate) fn parse(text: &'a str) -> anyhow::Result<Inbound<'a>> {
        serde_json::from_str(text).with_context(|| format!("unexpected Pusher frame {text:.200}"))
    }
}

/// The fast path for deliveries (see `wire::for_each_message_data`): the raw string data
/// of an event named `event`, or None if the frame is anything else (then parse it).
/// Sockudo writes `{"event":…,"channel":…,"data":"…"}`.
pub(crate) fn event_data<'a>(frame: &'a [u8], event: &str) -> Option<&'a [u8]> {
    let head = frame.strip_prefix(b"{\"event\":\"")?;
    let rest = head.strip_prefix(event.as_bytes())?.strip_prefix(b"\"")?;
    let at = memchr::memmem::find(rest, b"\"data\":\"")?;
    let value = &rest[at + 8..];
    let end = memchr::memchr(b'"', value)?;
    Some(&value[..end])
}

#[derive(Serialize)]
struct Subscribe<'a> {
    event: &'static str,
    data: SubscribeData<'a>,
}

#[derive(Serialize)]
struct SubscribeData<'a> {
    channel: &'a str,
}

/// `{"event":"pusher:pong","data":{}}`
pub(crate) fn pong_frame() -> Message {
    Message::text(r#"{"event":"pusher:pong","data":{}}"#)
}

/// The WebSocket URL for an app key, as pusher-js 8 would use (protocol 7).
pub(crate) fn connect_url(base: &str, app_key: &str) -> String {
    let base = base.trim_end_matches('/');
    format!("{base}/app/{app_key}?protocol=7&client=tern-bench&version=0.1&flash=false")
}

/// Dials and waits for `pusher:connection_established`.
pub(crate) async fn open(url: &str, config: WebSocketConfig) -> anyhow::Result<Socket> {
    let mut socket = dial(url, config).await?;
    next_event(&mut socket, "pusher:connection_established")
        .await
        .context("waiting for pusher:connection_established")?;
    Ok(socket)
}

/// Subscribes to a public channel and waits until the server confirms it.
pub(crate) async fn subscribe(socket: &mut Socket, channel: &str) -> anyhow::Result<()> {
    let subscribe = Subscribe {
        event: "pusher:subscribe",
        data: SubscribeData { channel },
    };
    let text = serde_json::to_string(&subscribe).expect("subscribe serializes");
    socket.send(Message::text(text)).await?;
    next_event(socket, "pusher_internal:subscription_succeeded")
        .await
        .with_context(|| format!("subscribing to {channel}"))
}

/// Reads frames until an event named `name`, within [`REPLY_TIMEOUT`]; answers pings and
/// fails on `pusher:error` or a closed socket.
async fn next_event(socket: &mut Socket, name: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let message = next_message(socket, deadline, "no reply in time").await?;
        let Message::Text(text) = message else {
            continue;
        };
        let event = match Inbound::parse(text.as_str()) {
            Ok(frame) => frame.event.into_owned(),
            Err(e) => anyhow::bail!("{e:#}"),
        };
        if event == name {
            return Ok(());
        }
        match event.as_str() {
            "pusher:ping" => socket.send(pong_frame()).await?,
            "pusher:error" => anyhow::bail!("server sent {}", text.as_str()),
            _ => {}
        }
    }
}

// ---- HTTP events API ----

#[derive(Serialize)]
struct Event<'a> {
    name: &'a str,
    channels: [&'a str; 1],
    data: &'a str,
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// One signed `POST /apps/ID/events` request publishing `data` as event `b` on `channel`.
/// `host` is the Host header (`127.0.0.1:PORT`); `timestamp` is Unix seconds.
pub(crate) fn publish_request(
    app: &App,
    host: &str,
    timestamp: u64,
    channel: &str,
    data: &str,
) -> Vec<u8> {
    let body = serde_json::to_string(&Event {
        name: "b",
        channels: [channel],
        data,
    })
    .expect("event serializes");
    let path = format!("/apps/{}/events", app.id);
    // Keys in alphabetical order, as the signature requires.
    let query = format!(
        "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        app.key,
        hex(&Md5::digest(body.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(app.secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!(
        "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends one HTTP/1.1 request on a new TCP connection to `authority` (`host:port`) and
/// reads one response, all within [`DIAL_TIMEOUT`].
pub(crate) async fn post(authority: &str, request: &[u8]) -> anyhow::Result<Response> {
    tokio::time::timeout(DIAL_TIMEOUT, async {
        let mut tcp = tokio::net::TcpStream::connect(authority)
            .await
            .context("HTTP connect failed")?;
        tcp.set_nodelay(true)?;
        tcp.write_all(request).await?;
        let mut reader = ResponseReader::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "server closed the connection before answering");
            let mut response = None;
            reader.feed(&buf[..n], |r| {
                response.get_or_insert(r);
            })?;
            if let Some(response) = response {
                return Ok(response);
            }
        }
    })
    .await
    .context("HTTP request timed out")?
}

/// One HTTP response: its status and body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: String,
}

/// Accumulates bytes from a keep-alive connection and yields complete responses, in
/// order. Only `Content-Length` bodies are understood (what the events API sends).
#[derive(Default)]
pub(crate) struct ResponseReader {
    buf: Vec<u8>,
}

impl ResponseReader {
    /// Appends `data` and calls `each` for every complete response.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(Response),
    ) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some((response, used)) = parse_response(&self.buf[at..])? {
            each(response);
            at += used;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

/// Parses one response at the start of `buf`: `Some((response, bytes used))`, or `None`
/// if more bytes are needed.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(Response, usize)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        anyhow::ensure!(buf.len() <= HEAD_BYTES_MAX, "HTTP response head too long");
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("HTTP head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let mut length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!("unsupported Transfer-Encoding {value:?}");
        }
    }
    anyhow::ensure!(length <= BODY_BYTES_MAX, "HTTP response body too large");
    let total = head_end + 4 + length;
    if buf.len() < total {
        return Ok(None);
    }
    let body = String::from_utf8_lossy(&buf[head_end + 4..total]).into_owned();
    Ok(Some((Response { status, body }, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature matches Pusher's documented example (docs "Generating
    /// authentication signatures": app 3, key 278d425bdf160c739803, secret
    /// 7ad3773142a6692b25b8, timestamp 1353088179).
    #[test]
    fn signature_matches_pusher_example() {
        let app = App::parse("3:278d425bdf160c739803:7ad3773142a6692b25b8").unwrap();
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            hex(&Md5::digest(body.as_bytes())),
            "ec365a775a4cd0599faeb73354201b6f"
        );
        let query = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f";
        let mut mac = Hmac::<Sha256>::new_from_slice(app.secret.as_bytes()).unwrap();
        mac.update(format!("POST\n/apps/3/events\n{query}").as_bytes());
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
        let request = String::from_utf8(publish_request(&app, "h:1", 7, "c", "d")).unwrap();
        assert!(request.starts_with("POST /apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=7&auth_version=1.0&body_md5="));
        assert!(request.ends_with("\r\n\r\n{\"name\":\"b\",\"channels\":[\"c\"],\"data\":\"d\"}"));
    }

    /// Pipelined responses split anywhere come out whole and in order.
    #[test]
    fn reads_pipelined_responses() {
        let mut reader = ResponseReader::default();
        let mut seen = Vec::new();
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 429 Too Many\r\nContent-Length: 3\r\n\r\nno!";
        for chunk in wire.chunks(7) {
            reader.feed(chunk, |r| seen.push(r)).unwrap();
        }
        assert_eq!(
            seen,
            [
                Response {
                    status: 200,
                    body: "{}".into()
                },
                Response {
                    status: 429,
                    body: "no!".into()
                }
            ]
        );
        let mut reader = ResponseReader::default();
        assert!(reader
            .feed(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                |_| {}
            )
            .is_err());
        assert!(reader.feed(b"garbage\r\n\r\n", |_| {}).is_err());
    }

    /// Events parse with string data borrowed; error events with object data do not.
    #[test]
    fn inbound_events() {
        let e = Inbound::parse(r#"{"event":"b","channel":"c","data":"0001m"}"#).unwrap();
        assert_eq!(e.event, "b");
        assert!(matches!(e.data, Some(Cow::Borrowed("0001m"))));
        assert!(Inbound::parse(r#"{"event":"pusher:error","data":{"code":4001}}"#).is_err());
        let frame = br#"{"event":"b","channel":"c","data":"0001m"}"#;
        assert_eq!(event_data(frame, "b"), Some(&b"0001m"[..]));
        assert_eq!(event_data(br#"{"event":"bb","data":"x"}"#, "b"), None);
        assert_eq!(
            event_data(br#"{"event":"pusher:ping","data":{}}"#, "b"),
            None
        );
        assert!(App::parse("a:b").is_err());
        assert_eq!(
            connect_url("ws://127.0.0.1:6001/", "k"),
            "ws://127.0.0.1:6001/app/k?protocol=7&client=tern-bench&version=0.1&flash=false"
        );
    }
}
