//! Connect: opens N connections at a fixed rate (open loop), keeps them idle, and reads
//! the server's resident memory before and after: bytes per idle connection.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::latency::{Latency, LatencySummary};
use crate::nats;
use crate::process::rss_bytes;
use crate::pusher;
use crate::socket::{ensure_loopback, idle_config, Protocol, Socket, Target};
use crate::wire;

/// The bench process may hold 20k files; leave room for everything else it opens.
const CONNECTIONS_MAX: usize = 9000;
/// Connection attempts started per second.
const RATE_MAX: u64 = 20_000;
const HOLD_SECS_MAX: u64 = 120;
/// How long a finished connection storm is left to settle before memory is read.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct ConnectArgs {
    #[arg(long, value_enum, default_value_t = Target::Tern)]
    pub target: Target,
    /// WebSocket base URL, loopback only.
    #[arg(long)]
    pub url: String,
    /// Ably API key (tern), or Pusher app `id:key:secret` (sockudo).
    #[arg(long, default_value = "")]
    #[serde(skip)]
    pub key: String,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connection attempts started per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// How long the connections stay open and idle once all are up.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// The server's process id, to read its VmRSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long, default_value = "connect")]
    pub label: String,
}

impl ConnectArgs {
    fn validate(&self) -> anyhow::Result<()> {
        ensure_loopback(&self.url)?;
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX).contains(&self.connections),
            "--connections in 1..={CONNECTIONS_MAX} (the process may open 20k files; run several processes for more)"
        );
        anyhow::ensure!(
            (1..=RATE_MAX).contains(&self.rate),
            "--rate in 1..={RATE_MAX}"
        );
        anyhow::ensure!(
            self.hold_secs <= HOLD_SECS_MAX,
            "--hold-secs at most {HOLD_SECS_MAX}"
        );
        anyhow::ensure!(
            !self.target.needs_key() || !self.key.is_empty(),
            "--key is required for --target {}",
            self.target
        );
        Ok(())
    }
}

async fn open_one(args: &ConnectArgs) -> anyhow::Result<Socket> {
    match args.target.protocol() {
        Protocol::Ably(format) => {
            let url = wire::connect_url(&args.url, &args.key, format, "");
            Ok(wire::open(&url, idle_config()).await?.0)
        }
        Protocol::Nats => Ok(nats::open(&args.url, "", idle_config()).await?.0),
        Protocol::Pusher => {
            let app = pusher::App::parse(&args.key)?;
            pusher::open(&pusher::connect_url(&args.url, &app.key), idle_config()).await
        }
    }
}

/// Holds a connection open, answering WebSocket pings, until told to stop.
/// Returns whether the server dropped it first.
async fn hold(mut socket: Socket, mut stop: watch::Receiver<bool>) -> bool {
    let dropped = loop {
        tokio::select! {
            // Stop: cancellation safe.
            _ = stop.changed() => break false,
            // Frames (heartbeats, NATS PINGs we may leave unanswered for the short hold):
            // reading keeps tungstenite answering WebSocket pings. Cancellation safe.
            message = socket.next() => match message {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break true,
            },
        }
    };
    if !dropped {
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    }
    dropped
}

pub(crate) async fn run(args: ConnectArgs) -> anyhow::Result<ConnectReport> {
    args.validate()?;
    let started_unix_secs = crate::unix_time_secs();
    let rss = |when: &str| -> anyhow::Result<Option<u64>> {
        args.server_pid
            .map(rss_bytes)
            .transpose()
            .with_context(|| format!("server RSS {when}"))
    };
    let rss_before = rss("before")?;

    let (stop_tx, stop) = watch::channel(false);
    // One outcome per attempt: Ok(connect latency ns) or Err(reason). Bounded by N.
    let (outcome_tx, mut outcome_rx) = mpsc::channel::<Result<u64, String>>(args.connections);
    let mut holders = JoinSet::new();
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    for i in 0..args.connections {
        tokio::time::sleep_until(start + period * i as u32).await;
        let (args, outcome_tx, stop) = (args.clone(), outcome_tx.clone(), stop.clone());
        holders.spawn(async move {
            let began = std::time::Instant::now();
            match open_one(&args).await {
                Ok(socket) => {
                    let _ = outcome_tx.send(Ok(began.elapsed().as_nanos() as u64)).await;
                    hold(socket, stop).await
                }
                Err(e) => {
                    let _ = outcome_tx.send(Err(format!("{e:#}"))).await;
                    false
                }
            }
        });
    }
    drop(outcome_tx);
    let open_secs = start.elapsed().as_secs_f64();

    let mut latency = Latency::new();
    let mut errors = 0u64;
    let mut first_error = None;
    // Each attempt reports within the dial and reply timeouts; bound the wait anyway.
    let outcomes_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for _ in 0..args.connections {
        match tokio::time::timeout_at(outcomes_deadline, outcome_rx.recv()).await {
            Ok(Some(Ok(ns))) => latency.record_ns(ns),
            Ok(Some(Err(e))) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) | Err(_) => {
                errors += 1;
                first_error.get_or_insert_with(|| "attempt never finished".to_owned());
            }
        }
    }
    let all_up_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let rss_open = rss("with connections open")?;
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_held = rss("after the hold")?;

    let _ = stop_tx.send(true);
    let mut dropped_during_hold = 0u64;
    let teardown_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(joined)) =
        tokio::time::timeout_at(teardown_deadline, holders.join_next()).await
    {
        dropped_during_hold += u64::from(joined.unwrap_or(true));
    }
    holders.abort_all();
    tokio::time::sleep(SETTLE).await;
    let rss_after_close = rss("after closing")?;

    let successes = latency.summary().count;
    let per_connection = |rss: Option<u64>| {
        rss.zip(rss_before)
            .filter(|_| successes > 0)
            .map(|(now, before)| (now as f64 - before as f64) / successes as f64)
    };
    Ok(ConnectReport {
        kind: "connect",
        label: args.label.clone(),
        target: args.target,
        started_unix_secs,
        successes,
        errors,
        first_error,
        dropped_during_hold,
        open_secs,
        attempts_per_sec: args.connections as f64 / open_secs.max(1e-9),
        connected_per_sec: successes as f64 / all_up_secs.max(1e-9),
        latency: latency.summary(),
        rss_before_bytes: rss_before,
        rss_open_bytes: rss_open,
        rss_held_bytes: rss_held,
        rss_after_close_bytes: rss_after_close,
        bytes_per_connection_open: per_connection(rss_open),
        bytes_per_connection_held: per_connection(rss_held),
        args,
    })
}

#[derive(Serialize)]
pub(crate) struct ConnectReport {
    kind: &'static str,
    label: String,
    target: Target,
    started_unix_secs: u64,
    args: ConnectArgs,
    successes: u64,
    errors: u64,
    first_error: Option<String>,
    /// Connections the server closed while they sat idle.
    dropped_during_hold: u64,
    /// Time to start every attempt (the open-loop schedule).
    open_secs: f64,
    attempts_per_sec: f64,
    /// Successful connections over the time until the last attempt finished.
    connected_per_sec: f64,
    /// WebSocket upgrade + CONNECTED (tern) or INFO + PONG (nats).
    latency: LatencySummary,
    rss_before_bytes: Option<u64>,
    rss_open_bytes: Option<u64>,
    rss_held_bytes: Option<u64>,
    rss_after_close_bytes: Option<u64>,
    bytes_per_connection_open: Option<f64>,
    bytes_per_connection_held: Option<f64>,
}

impl fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: Option<u64>| {
            b.map_or("-".to_owned(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            })
        };
        let kib = |b: Option<f64>| b.map_or("-".to_owned(), |b| format!("{:.1} KiB", b / 1024.0));
        writeln!(
            f,
            "connect [{}] target={} {} connections at {}/s (held {}s)",
            self.label, self.target, self.args.connections, self.args.rate, self.args.hold_secs
        )?;
        writeln!(
            f,
            "  ok {} errors {} dropped while idle {}; {:.0} connected/s",
            self.successes, self.errors, self.dropped_during_hold, self.connected_per_sec
        )?;
        writeln!(f, "  connect latency {}", self.latency)?;
        write!(
            f,
            "  server RSS before {} open {} held {} after close {}; per connection {} (held {})",
            mib(self.rss_before_bytes),
            mib(self.rss_open_bytes),
            mib(self.rss_held_bytes),
            mib(self.rss_after_close_bytes),
            kib(self.bytes_per_connection_open),
            kib(self.bytes_per_connection_held)
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "\n  first error: {e}")?;
        }
        Ok(())
    }
}
