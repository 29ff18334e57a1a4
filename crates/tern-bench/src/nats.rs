//! The NATS text protocol over nats-server's WebSocket listener, as much as a benchmark
//! needs: CONNECT / SUB / PUB / PING / PONG out, INFO / MSG / PING / PONG / +OK / -ERR in.
//!
//! A WebSocket message may hold several protocol lines, and nothing promises that one
//! line or payload does not span two messages, so [`Reader`] buffers across messages.

use anyhow::Context;
use bytes::Bytes;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::socket::{dial, next_message, Socket};
use crate::wire::REPLY_TIMEOUT;

/// The largest control line we accept before calling the stream garbage.
const LINE_BYTES_MAX: usize = 64 * 1024;
/// The largest MSG payload we accept (nats-server's default max_payload is 1 MiB).
const PAYLOAD_BYTES_MAX: usize = 8 * 1024 * 1024;

/// One server→client operation; `Msg` borrows its payload from the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Info,
    Msg { payload: &'a [u8] },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Accumulates bytes from WebSocket messages and yields complete operations.
#[derive(Default)]
pub(crate) struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// Appends `data` and calls `each` for every complete operation, in order.
    /// An incomplete tail stays buffered for the next call.
    pub(crate) fn feed(&mut self, data: &[u8], mut each: impl FnMut(Op<'_>)) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some((op, used)) = parse_one(&self.buf[at..])? {
            each(op);
            at += used;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

/// Parses one operation at the start of `buf`: `Some((op, bytes used))`, or `None` if
/// more bytes are needed.
fn parse_one(buf: &[u8]) -> anyhow::Result<Option<(Op<'_>, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        anyhow::ensure!(buf.len() <= LINE_BYTES_MAX, "NATS control line too long");
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).context("NATS control line is not UTF-8")?;
    let after_line = end + 2;
    let verb = line.split_ascii_whitespace().next().unwrap_or("");
    let op = match verb.to_ascii_uppercase().as_str() {
        "MSG" => {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let size: usize = line
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("bad NATS MSG line {line:?}"))?;
            anyhow::ensure!(size <= PAYLOAD_BYTES_MAX, "NATS payload too large");
            let total = after_line + size + 2;
            if buf.len() < total {
                return Ok(None);
            }
            anyhow::ensure!(
                &buf[after_line + size..total] == b"\r\n",
                "NATS payload not followed by CRLF"
            );
            let payload = &buf[after_line..after_line + size];
            return Ok(Some((Op::Msg { payload }, total)));
        }
        "INFO" => Op::Info,
        "PING" => Op::Ping,
        "PONG" => Op::Pong,
        "+OK" => Op::Ok,
        "-ERR" => Op::Err(line.to_owned()),
        _ => anyhow::bail!("unexpected NATS line {line:?}"),
    };
    Ok(Some((op, after_line)))
}

/// A binary WebSocket message holding NATS protocol text.
pub(crate) fn frame(text: impl Into<Bytes>) -> Message {
    Message::Binary(text.into())
}

pub(crate) const PONG: &[u8] = b"PONG\r\n";

/// `PUB subject n\r\npayload\r\n`
pub(crate) fn publish(subject: &str, payload: &str) -> Message {
    frame(format!("PUB {subject} {}\r\n{payload}\r\n", payload.len()))
}

/// Dials, reads INFO, sends CONNECT plus `then` (e.g. `SUB ...`), then PING, and waits
/// for the PONG that proves the server has processed everything before it.
pub(crate) async fn open(
    url: &str,
    then: &str,
    config: WebSocketConfig,
) -> anyhow::Result<(Socket, Reader)> {
    let mut socket = dial(url, config).await?;
    let mut reader = Reader::default();
    let hello = format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\n{then}PING\r\n");
    socket.send(frame(hello)).await?;
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let message = next_message(&mut socket, deadline, "no PONG in time").await?;
        let data = match message {
            Message::Binary(b) => b,
            Message::Text(t) => Bytes::from(t),
            _ => continue,
        };
        let mut pong = false;
        let mut error = None;
        let mut pings = 0;
        reader.feed(&data, |op| match op {
            Op::Pong => pong = true,
            Op::Ping => pings += 1,
            Op::Err(e) => error = Some(e),
            _ => {}
        })?;
        if let Some(error) = error {
            anyhow::bail!("nats-server: {error}");
        }
        for _ in 0..pings {
            socket.send(frame(PONG)).await?;
        }
        if pong {
            return Ok((socket, reader));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(reader: &mut Reader, chunk: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        reader
            .feed(chunk, |op| seen.push(format!("{op:?}")))
            .unwrap();
        seen
    }

    /// Several operations in one message, and one split across three, come out whole.
    #[test]
    fn buffers_across_messages() {
        let mut r = Reader::default();
        let got = ops(&mut r, b"INFO {\"a\":1}\r\nMSG s 1 5\r\nhello\r\nPING\r\n");
        assert_eq!(
            got,
            ["Info", "Msg { payload: [104, 101, 108, 108, 111] }", "Ping"]
        );
        assert!(ops(&mut r, b"MSG s.x 1 rep").is_empty());
        assert!(ops(&mut r, b"ly 3\r\nab").is_empty());
        assert_eq!(
            ops(&mut r, b"c\r\n+OK\r\n"),
            ["Msg { payload: [97, 98, 99] }", "Ok"]
        );
        assert!(r.buf.is_empty());
    }

    /// Garbage is an error, not a panic or a silent skip.
    #[test]
    fn rejects_garbage() {
        let mut r = Reader::default();
        assert!(r.feed(b"WHAT\r\n", |_| {}).is_err());
        let mut r = Reader::default();
        assert!(r.feed(b"MSG s 1 3\r\nabcd\r\n", |_| {}).is_err());
        let mut r = Reader::default();
        assert!(r.feed(b"MSG s 1 x\r\n", |_| {}).is_err());
    }

    /// PUB carries the exact payload length.
    #[test]
    fn publish_line() {
        let m = publish("bench.0", "12345");
        assert_eq!(m.into_data().as_ref(), b"PUB bench.0 5\r\n12345\r\n");
    }
}
