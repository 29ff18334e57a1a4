//! Dialing WebSockets: one place for timeouts, buffer sizes and the loopback-only rule.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::wire::Format;

/// A client WebSocket over plain TCP (no TLS: loopback only).
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Which server, and so which wire protocol, a command talks to.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Target {
    /// Ably realtime protocol, JSON format (text frames).
    Tern,
    /// Ably realtime protocol, msgpack format (binary frames).
    TernMsgpack,
    /// NATS text protocol over nats-server's WebSocket listener.
    Nats,
    /// Pusher protocol (Sockudo): WebSocket subscribers, HTTP events API publishers.
    Sockudo,
}

/// The wire protocol a [`Target`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Ably(Format),
    Nats,
    Pusher,
}

impl Target {
    pub(crate) fn protocol(self) -> Protocol {
        match self {
            Target::Tern => Protocol::Ably(Format::Json),
            Target::TernMsgpack => Protocol::Ably(Format::Msgpack),
            Target::Nats => Protocol::Nats,
            Target::Sockudo => Protocol::Pusher,
        }
    }

    /// Whether `--key` is needed: an Ably key, or a Pusher app's `id:key:secret`.
    pub(crate) fn needs_key(self) -> bool {
        self.protocol() != Protocol::Nats
    }

    /// Fails unless `key` is given where this target needs one.
    pub(crate) fn ensure_key(self, key: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.needs_key() || !key.is_empty(),
            "--key is required for --target {self}"
        );
        Ok(())
    }

    /// Whether the server answers every publish (Ably ACK, HTTP response); NATS does not.
    pub(crate) fn acknowledges(self) -> bool {
        self.protocol() != Protocol::Nats
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Tern => "tern",
            Target::TernMsgpack => "tern-msgpack",
            Target::Nats => "nats",
            Target::Sockudo => "sockudo",
        })
    }
}

/// How long a TCP connect plus WebSocket upgrade may take before it counts as an error.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Buffer sizes for a socket that carries load (fan-out subscribers and publishers).
pub(crate) fn busy_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .write_buffer_size(64 * 1024)
}

/// Buffer sizes for a socket that mostly sits idle: thousands of them share the client's
/// memory, and the client's footprint is not what we measure.
pub(crate) fn idle_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Refuses any URL whose host is not a loopback address: this tool generates load and
/// must never point it at another machine.
pub(crate) fn ensure_loopback(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost" | "::1"),
        "{url}: the host must be 127.0.0.1, localhost or [::1] (load stays on this machine)"
    );
    Ok(())
}

/// Opens a WebSocket to `url` with Nagle off, within [`DIAL_TIMEOUT`].
pub(crate) async fn dial(url: &str, config: WebSocketConfig) -> anyhow::Result<Socket> {
    let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    let (socket, _response) = tokio::time::timeout(DIAL_TIMEOUT, connecting)
        .await
        .context("WebSocket connect timed out")?
        .context("WebSocket connect failed")?;
    Ok(socket)
}

/// The next message on `socket`, by `deadline`; `late` is the error when none comes in
/// time. A closed socket or a failed read is an error too.
pub(crate) async fn next_message(
    socket: &mut Socket,
    deadline: tokio::time::Instant,
    late: &'static str,
) -> anyhow::Result<Message> {
    Ok(tokio::time::timeout_at(deadline, socket.next())
        .await
        .context(late)?
        .context("socket closed")??)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only loopback hosts pass the guard, with or without a port, path or query.
    #[test]
    fn loopback_guard() {
        for ok in [
            "ws://127.0.0.1:8080/?key=a",
            "ws://localhost:1",
            "ws://[::1]:80/",
            "ws://127.0.0.1",
        ] {
            assert!(ensure_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ws://10.0.0.1:80/",
            "wss://127.0.0.1:80/",
            "ws://example.com/",
            "http://127.0.0.1/",
            "ws://127.0.0.1.evil:80/",
        ] {
            assert!(ensure_loopback(bad).is_err(), "{bad}");
        }
    }
}
