//! Regions: publish→deliver latency between the regions of a multi-region Tern (for
//! example `tern dev`: three regions in one process, replicating over QUIC).
//!
//! Each region gets one publisher and one subscriber connection; the subscriber attaches
//! to one channel per origin region, so every (origin, destination) pair is measured,
//! the same region included as the local baseline. Publishers first send warm-up
//! messages until every subscriber has heard from every origin (links are up), then
//! `--messages` each on an open-loop schedule. With `--topology` (regions/topology.toml),
//! the emulated one-way delay of each pair is read and subtracted: the rest is Tern's
//! overhead.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::latency::{Latency, LatencySummary};
use crate::pacer;
use crate::socket::{busy_config, ensure_loopback, Socket};
use crate::stamp::{self, Clock, Phase};
use crate::wire::{self, action, Format, Inbound};

const REGIONS_MAX: usize = 8;
const MESSAGES_MAX: u64 = 100_000;
const RATE_MAX: u64 = 10_000;
/// Warm-up messages per origin per second, until every subscriber has heard from it.
const WARMUP_RATE: u64 = 20;
/// How long the links may take to carry a first message between every pair.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the last scheduled send deliveries may still arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct RegionsArgs {
    /// A region and its client WebSocket URL, as NAME=ws://127.0.0.1:PORT (repeat).
    #[arg(long = "region", required = true)]
    pub regions: Vec<String>,
    /// Ably API key valid in every region.
    #[arg(long)]
    #[serde(skip)]
    pub key: String,
    /// Messages each region publishes in the measured window.
    #[arg(long, default_value_t = 500)]
    pub messages: u64,
    /// Messages per second each region publishes.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// regions/topology.toml: one-way `delay_ms` per region pair, subtracted as "overhead".
    #[arg(long)]
    pub topology: Option<PathBuf>,
    #[arg(long, default_value = "regions")]
    pub label: String,
}

impl RegionsArgs {
    fn regions(&self) -> anyhow::Result<Vec<(String, String)>> {
        anyhow::ensure!(
            (1..=REGIONS_MAX).contains(&self.regions.len()),
            "1..={REGIONS_MAX} --region"
        );
        anyhow::ensure!(
            (1..=MESSAGES_MAX).contains(&self.messages),
            "--messages in 1..={MESSAGES_MAX}"
        );
        anyhow::ensure!(
            (1..=RATE_MAX).contains(&self.rate),
            "--rate in 1..={RATE_MAX}"
        );
        anyhow::ensure!(
            (stamp::STAMP_BYTES..=60_000).contains(&self.payload_bytes),
            "--payload-bytes in {}..=60000",
            stamp::STAMP_BYTES
        );
        self.regions
            .iter()
            .map(|spec| {
                let (name, url) = spec
                    .split_once('=')
                    .with_context(|| format!("--region {spec}: expected NAME=URL"))?;
                ensure_loopback(url)?;
                Ok((name.to_owned(), url.to_owned()))
            })
            .collect()
    }
}

/// regions/topology.toml, as far as this command reads it.
#[derive(Deserialize)]
struct Topology {
    #[serde(default)]
    links: Vec<Link>,
}

#[derive(Deserialize)]
struct Link {
    a: String,
    b: String,
    delay_ms: f64,
}

/// One-way delay between two regions from the topology (0 within a region).
fn delay_ms(topology: Option<&Topology>, a: &str, b: &str) -> Option<f64> {
    if a == b {
        return Some(0.0);
    }
    topology?
        .links
        .iter()
        .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
        .map(|l| l.delay_ms)
}

/// What subscribers share: who has heard from whom, and the measured delivery count.
struct Shared {
    clock: Clock,
    /// `heard[dest * n + origin]`: dest's subscriber got a warm-up message from origin.
    heard: Vec<AtomicBool>,
    delivered: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }
}

pub(crate) async fn run(args: RegionsArgs) -> anyhow::Result<RegionsReport> {
    let regions = args.regions()?;
    let topology = match &args.topology {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                toml::from_str::<Topology>(&text)
                    .with_context(|| format!("in {}", path.display()))?,
            )
        }
        None => None,
    };
    let started_unix_secs = crate::unix_time_secs();
    let n = regions.len();
    let run_id = crate::unix_time_secs();
    let channels: Arc<Vec<String>> = Arc::new(
        regions
            .iter()
            .map(|(name, _)| format!("regions-{run_id}-from-{name}"))
            .collect(),
    );
    let shared = Arc::new(Shared {
        clock: Clock::start(),
        heard: (0..n * n).map(|_| AtomicBool::new(false)).collect(),
        delivered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    });

    // Subscribers: one connection per destination region, attached to every origin's channel.
    let (stop_tx, stop) = watch::channel(false);
    let mut subscribers = Vec::with_capacity(n);
    for (dest, (name, url)) in regions.iter().enumerate() {
        let (mut socket, _) = wire::open(
            &wire::connect_url(url, &args.key, Format::Json, ""),
            busy_config(),
        )
        .await
        .with_context(|| format!("connecting to {name}"))?;
        for channel in channels.iter() {
            wire::attach(&mut socket, Format::Json, channel, None).await?;
        }
        let task = subscribe(
            dest,
            n,
            socket,
            channels.clone(),
            shared.clone(),
            stop.clone(),
        );
        subscribers.push(tokio::spawn(task));
    }
    let mut publishers = Vec::with_capacity(n);
    for (name, url) in &regions {
        let url = wire::connect_url(url, &args.key, Format::Json, "&echo=false");
        let (socket, _) = wire::open(&url, busy_config())
            .await
            .with_context(|| format!("connecting a publisher to {name}"))?;
        publishers.push(socket);
    }

    let warmup_ms = warm_up(&mut publishers, &channels, &shared, args.payload_bytes).await?;

    // Measured: every origin publishes on the same open-loop schedule.
    let start_ns = shared.clock.now_ns() + 20_000_000;
    let period_ns = 1_000_000_000 / args.rate;
    let messages = args.messages;
    let due = (0..messages * n as u64).map(move |k| {
        (
            start_ns + (k / n as u64) * period_ns,
            (k % n as u64) as usize,
        )
    });
    let nudges = pacer::spawn(shared.clock, n, due);
    let mut sends = Vec::with_capacity(n);
    for (origin, (mut socket, mut nudges)) in publishers.into_iter().zip(nudges).enumerate() {
        let (channels, shared, messages, payload_bytes) = (
            channels.clone(),
            shared.clone(),
            args.messages,
            args.payload_bytes,
        );
        sends.push(tokio::spawn(async move {
            for i in 0..messages {
                let due_ns = start_ns + i * period_ns;
                nudges.wait_until(&shared.clock, due_ns).await;
                while shared.clock.now_ns() < due_ns {
                    // Woken by the fallback timer a little early or late: wait again.
                    nudges.wait_until(&shared.clock, due_ns).await;
                }
                let payload = stamp::encode(due_ns, Phase::Measured, payload_bytes);
                let frame =
                    wire::publish_frame(Format::Json, &channels[origin], 1_000_000 + i, &payload);
                if let Err(e) = socket.send(frame).await {
                    shared.error(format!("publisher: {e}"));
                    break;
                }
            }
            socket
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for send in sends {
        sockets.push(send.await.context("publisher task failed")?);
    }
    let expected = args.messages * (n * n) as u64;
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while shared.delivered.load(Ordering::Relaxed) < expected
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    for mut socket in sockets {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            socket.send(wire::close_frame(Format::Json)).await?;
            socket.close(None).await
        })
        .await;
    }

    let mut pairs = Vec::with_capacity(n * n);
    let mut per_dest = Vec::with_capacity(n);
    for subscriber in subscribers {
        per_dest.push(subscriber.await.context("subscriber task failed")?);
    }
    for (dest, latencies) in per_dest.iter().enumerate() {
        for (origin, latency) in latencies.iter().enumerate() {
            let summary = latency.summary();
            let delay = delay_ms(topology.as_ref(), &regions[origin].0, &regions[dest].0);
            // Faster than the emulated delay: the links do not apply it (yet), and
            // "overhead" would be meaningless.
            let delay_applied = delay
                .filter(|&d| d > 0.0 && summary.count > 0)
                .map(|d| summary.p50_us as f64 / 1000.0 >= d);
            let overhead = |us: u64| {
                delay
                    .filter(|_| delay_applied != Some(false))
                    .map(|d| us as f64 / 1000.0 - d)
            };
            pairs.push(RegionPair {
                from: regions[origin].0.clone(),
                to: regions[dest].0.clone(),
                delivered: summary.count,
                lost: args.messages.saturating_sub(summary.count),
                delay_ms: delay,
                delay_applied,
                overhead_p50_ms: overhead(summary.p50_us),
                overhead_p99_ms: overhead(summary.p99_us),
                latency: summary,
            });
        }
    }
    let first_error = shared
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(RegionsReport {
        kind: "regions",
        label: args.label.clone(),
        started_unix_secs,
        topology: args.topology.as_ref().map(|p| p.display().to_string()),
        warmup_ms,
        lost: pairs.iter().map(|p| p.lost).sum(),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error,
        pairs,
        args,
    })
}

/// Publishes warm-up messages from every origin until every subscriber has heard from
/// every origin; returns how long that took.
async fn warm_up(
    publishers: &mut [Socket],
    channels: &[String],
    shared: &Shared,
    payload_bytes: usize,
) -> anyhow::Result<u64> {
    let began = std::time::Instant::now();
    let mut serial = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / WARMUP_RATE));
    while !shared.heard.iter().all(|h| h.load(Ordering::Relaxed)) {
        anyhow::ensure!(
            began.elapsed() < WARMUP_TIMEOUT,
            "some region never delivered another's messages within {WARMUP_TIMEOUT:?} (replication links down?)"
        );
        tick.tick().await;
        for (origin, socket) in publishers.iter_mut().enumerate() {
            let payload = stamp::encode(shared.clock.now_ns(), Phase::Warmup, payload_bytes);
            socket
                .send(wire::publish_frame(
                    Format::Json,
                    &channels[origin],
                    serial,
                    &payload,
                ))
                .await?;
        }
        serial += 1;
    }
    Ok(began.elapsed().as_millis() as u64)
}

/// Reads one destination region's deliveries until told to stop; one histogram per origin.
async fn subscribe(
    dest: usize,
    n: usize,
    mut socket: Socket,
    channels: Arc<Vec<String>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Latency> {
    let mut latencies: Vec<Latency> = (0..n).map(|_| Latency::new()).collect();
    loop {
        let message = tokio::select! {
            // Stop: cancellation safe.
            _ = stop.changed() => break,
            // A frame: cancellation safe.
            message = socket.next() => message,
        };
        let (data, binary) = match message {
            Some(Ok(Message::Text(text))) => (bytes::Bytes::from(text), false),
            Some(Ok(Message::Binary(data))) => (data, true),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.error(format!("subscriber: {e}"));
                break;
            }
            None => {
                shared.error("subscriber: server closed the socket".to_owned());
                break;
            }
        };
        let now_ns = shared.clock.now_ns();
        let frame = match Inbound::decode(&data, binary) {
            Ok(frame) => frame,
            Err(e) => {
                shared.error(format!("subscriber: {e:#}"));
                continue;
            }
        };
        if frame.action != action::MESSAGE {
            if frame.is_failure() {
                shared.error(format!("subscriber got action {}", frame.action));
            }
            continue;
        }
        let Some(origin) = channels
            .iter()
            .position(|c| Some(c.as_str()) == frame.channel.as_deref())
        else {
            continue;
        };
        for message in &frame.messages {
            match stamp::decode(message.data.as_deref().unwrap_or("").as_bytes()) {
                Some((_, Phase::Warmup)) => {
                    shared.heard[dest * n + origin].store(true, Ordering::Relaxed)
                }
                Some((due_ns, Phase::Measured)) => {
                    latencies[origin].record_ns(now_ns.saturating_sub(due_ns));
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                }
                None => shared.error("a delivery without our time stamp".to_owned()),
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        socket.send(wire::close_frame(Format::Json)).await?;
        socket.close(None).await
    })
    .await;
    latencies
}

#[derive(Serialize)]
pub(crate) struct RegionsReport {
    kind: &'static str,
    label: String,
    started_unix_secs: u64,
    args: RegionsArgs,
    topology: Option<String>,
    /// Until every region had delivered a warm-up message from every other.
    warmup_ms: u64,
    lost: u64,
    errors: u64,
    first_error: Option<String>,
    pairs: Vec<RegionPair>,
}

#[derive(Serialize)]
struct RegionPair {
    from: String,
    to: String,
    delivered: u64,
    lost: u64,
    /// Publish (scheduled time) → delivery in `to`.
    latency: LatencySummary,
    /// The emulated one-way delay from the topology, if given.
    delay_ms: Option<f64>,
    /// Whether deliveries took at least `delay_ms` (p50): false means the links do not
    /// emulate the delay. None within a region or without a topology.
    delay_applied: Option<bool>,
    /// Latency minus `delay_ms`: what Tern adds.
    overhead_p50_ms: Option<f64>,
    overhead_p99_ms: Option<f64>,
}

impl fmt::Display for RegionsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "regions [{}] {} messages per origin at {}/s, warm-up {} ms, lost {}, errors {}",
            self.label, self.args.messages, self.args.rate, self.warmup_ms, self.lost, self.errors
        )?;
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        for p in &self.pairs {
            write!(
                f,
                "\n  {:>9} → {:<9} {}  delay {} ms{}, overhead p50 {} p99 {} ms",
                p.from,
                p.to,
                p.latency,
                opt(p.delay_ms),
                if p.delay_applied == Some(false) {
                    " (NOT applied by the links)"
                } else {
                    ""
                },
                opt(p.overhead_p50_ms),
                opt(p.overhead_p99_ms)
            )?;
        }
        if let Some(e) = &self.first_error {
            write!(f, "\n  first error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays are symmetric, zero within a region, and unknown pairs stay unknown.
    #[test]
    fn topology_delays() {
        let topology: Topology = toml::from_str(
            r#"regions = ["a", "b", "c"]
[[links]]
a = "a"
b = "b"
delay_ms = 40
loss_percent = 0
"#,
        )
        .unwrap();
        assert_eq!(delay_ms(Some(&topology), "b", "a"), Some(40.0));
        assert_eq!(delay_ms(Some(&topology), "c", "c"), Some(0.0));
        assert_eq!(delay_ms(Some(&topology), "a", "c"), None);
        assert_eq!(delay_ms(None, "a", "b"), None);
    }

    /// The repository's topology file parses and names a delay for every pair.
    #[test]
    fn repository_topology_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../regions/topology.toml");
        let topology: Topology = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (a, b) in [
            ("us-east", "eu-west"),
            ("us-east", "ap-south"),
            ("eu-west", "ap-south"),
        ] {
            assert!(delay_ms(Some(&topology), a, b).is_some(), "{a} {b}");
        }
    }
}
