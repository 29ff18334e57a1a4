//! Resume: a subscriber attaches and drops its socket, a publisher publishes M messages
//! (all ACKed), then the subscriber reconnects with `resume=<connectionKey>` and
//! re-attaches with its channelSerial. Timed from the start of the reconnect until the
//! last missed message arrives; checked for RESUMED, the same connectionId, and exactly
//! M messages in order.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::SinkExt;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::latency::{Latency, LatencySummary};
use crate::socket::{busy_config, ensure_loopback, next_message, Socket};
use crate::wire::{self, action, Format, Inbound, FLAG_HAS_BACKLOG, FLAG_RESUMED};

const MISSED_MAX: u64 = 100_000;
const RUNS_MAX: usize = 50;
const WINDOW_MAX: u64 = 10_000;
const PAYLOAD_BYTES_MAX: usize = 60_000;
/// Bytes of the message index at the start of each payload.
const INDEX_BYTES: usize = 10;
/// The longest a whole replay may take before the run counts as failed.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long we keep listening after the last missed message, to catch duplicates.
const QUIET_CHECK: Duration = Duration::from_millis(300);

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct ResumeArgs {
    /// WebSocket base URL, loopback only.
    #[arg(long)]
    pub url: String,
    /// Ably API key.
    #[arg(long)]
    #[serde(skip)]
    pub key: String,
    /// Messages published while the subscriber is away.
    #[arg(long, default_value_t = 1000)]
    pub missed: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Publishes in flight before the publisher waits for ACKs.
    #[arg(long, default_value_t = 100)]
    pub window: u64,
    #[arg(long, default_value = "resume")]
    pub label: String,
}

impl ResumeArgs {
    fn validate(&self) -> anyhow::Result<()> {
        ensure_loopback(&self.url)?;
        anyhow::ensure!(
            (1..=MISSED_MAX).contains(&self.missed),
            "--missed in 1..={MISSED_MAX}"
        );
        anyhow::ensure!(
            (1..=RUNS_MAX).contains(&self.runs),
            "--runs in 1..={RUNS_MAX}"
        );
        anyhow::ensure!(
            (1..=WINDOW_MAX).contains(&self.window),
            "--window in 1..={WINDOW_MAX}"
        );
        anyhow::ensure!(
            (INDEX_BYTES + 1..=PAYLOAD_BYTES_MAX).contains(&self.payload_bytes),
            "--payload-bytes in {}..={PAYLOAD_BYTES_MAX}",
            INDEX_BYTES + 1
        );
        anyhow::ensure!(!self.key.is_empty(), "--key is required");
        Ok(())
    }
}

fn payload(index: u64, size: usize) -> String {
    let mut p = format!("{index:0width$}", width = INDEX_BYTES);
    p.push(':');
    while p.len() < size {
        p.push('x');
    }
    p
}

fn payload_index(data: &str) -> Option<u64> {
    data.get(..INDEX_BYTES)?.parse().ok()
}

/// One resume, measured.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct ResumeRun {
    reconnect_to_connected_ms: f64,
    reconnect_to_attached_ms: f64,
    reconnect_to_last_ms: f64,
    same_connection_id: bool,
    connected_error: Option<serde_json::Value>,
    attached_flags: u64,
    resumed: bool,
    has_backlog: bool,
    received: u64,
    in_order: bool,
    /// Messages that arrived after all M did (duplicates or unexpected traffic).
    extra: u64,
    /// The run's outcome matched every check.
    ok: bool,
}

pub(crate) async fn run(args: ResumeArgs) -> anyhow::Result<ResumeReport> {
    args.validate()?;
    let started_unix_secs = crate::unix_time_secs();
    let mut runs = Vec::with_capacity(args.runs);
    let mut failures = Vec::new();
    for run in 0..args.runs {
        let channel = format!("resume-bench-{started_unix_secs}-{run}");
        match tokio::time::timeout(REPLAY_TIMEOUT * 2, one_run(&args, &channel)).await {
            Ok(Ok(result)) => runs.push(result),
            Ok(Err(e)) => failures.push(format!("run {run}: {e:#}")),
            Err(_) => failures.push(format!("run {run}: timed out")),
        }
    }
    let mut total = Latency::new();
    for r in &runs {
        total.record_ns((r.reconnect_to_last_ms * 1e6) as u64);
    }
    Ok(ResumeReport {
        kind: "resume",
        label: args.label.clone(),
        started_unix_secs,
        all_ok: failures.is_empty() && runs.iter().all(|r| r.ok),
        reconnect_to_last: total.summary(),
        runs,
        failures,
        args,
    })
}

async fn one_run(args: &ResumeArgs, channel: &str) -> anyhow::Result<ResumeRun> {
    let url = wire::connect_url(&args.url, &args.key, Format::Json, "");
    let (mut subscriber, first) = wire::open(&url, busy_config())
        .await
        .context("subscriber connect")?;
    anyhow::ensure!(
        !first.connection_key.is_empty(),
        "CONNECTED has no connectionDetails.connectionKey"
    );
    let attached = wire::attach(&mut subscriber, Format::Json, channel, None).await?;
    let serial = attached
        .channel_serial
        .context("ATTACHED has no channelSerial")?;
    // Unclean drop: no CLOSE, no WebSocket close frame; the server must keep our state.
    drop(subscriber);

    publish_all(args, channel)
        .await
        .context("publishing the missed messages")?;

    let began = Instant::now();
    let resume_url = wire::connect_url(
        &args.url,
        &args.key,
        Format::Json,
        &format!("&resume={}", wire::query_escape(&first.connection_key)),
    );
    let (mut subscriber, again) = wire::open(&resume_url, busy_config())
        .await
        .context("resume connect")?;
    let connected_at = began.elapsed();
    let attached = wire::attach(&mut subscriber, Format::Json, channel, Some(&serial)).await?;
    let attached_at = began.elapsed();

    let mut received = 0u64;
    let mut in_order = true;
    let deadline = tokio::time::Instant::now() + REPLAY_TIMEOUT;
    while received < args.missed {
        let frame = read_text(&mut subscriber, deadline)
            .await
            .with_context(|| {
                format!(
                    "replay stopped after {received} of {} messages",
                    args.missed
                )
            })?;
        received += count_messages(&frame, channel, received, &mut in_order)?;
    }
    let last_at = began.elapsed();
    let mut extra = 0u64;
    let quiet_until = tokio::time::Instant::now() + QUIET_CHECK;
    while let Ok(frame) = read_text(&mut subscriber, quiet_until).await {
        extra += count_messages(&frame, channel, u64::MAX, &mut true)?;
    }
    let _ = subscriber.send(wire::close_frame(Format::Json)).await;

    let resumed = attached.flags & FLAG_RESUMED != 0;
    let same_connection_id = again.connection_id == first.connection_id;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(ResumeRun {
        reconnect_to_connected_ms: ms(connected_at),
        reconnect_to_attached_ms: ms(attached_at),
        reconnect_to_last_ms: ms(last_at),
        same_connection_id,
        ok: resumed
            && same_connection_id
            && again.error.is_none()
            && in_order
            && received + extra == args.missed,
        connected_error: again.error,
        attached_flags: attached.flags,
        resumed,
        has_backlog: attached.flags & FLAG_HAS_BACKLOG != 0,
        received,
        in_order,
        extra,
    })
}

/// Publishes `missed` messages with up to `window` unacknowledged, and waits for every ACK.
async fn publish_all(args: &ResumeArgs, channel: &str) -> anyhow::Result<()> {
    let url = wire::connect_url(&args.url, &args.key, Format::Json, "&echo=false");
    let (mut publisher, _) = wire::open(&url, busy_config()).await?;
    let mut sent = 0u64;
    let mut acked = 0u64;
    let deadline = tokio::time::Instant::now() + REPLAY_TIMEOUT;
    while acked < args.missed {
        while sent < args.missed && sent - acked < args.window {
            let data = payload(sent, args.payload_bytes);
            publisher
                .feed(wire::publish_frame(Format::Json, channel, sent, &data))
                .await?;
            sent += 1;
        }
        publisher.flush().await?;
        let text = read_text(&mut publisher, deadline).await?;
        let frame = Inbound::parse(&text)?;
        match frame.action {
            action::ACK => acked += frame.count.unwrap_or(1),
            action::NACK => anyhow::bail!("publish refused: {text}"),
            _ if frame.is_failure() => anyhow::bail!("publisher got {text}"),
            _ => {}
        }
    }
    let _ = publisher.send(wire::close_frame(Format::Json)).await;
    Ok(())
}

async fn read_text(socket: &mut Socket, deadline: tokio::time::Instant) -> anyhow::Result<String> {
    loop {
        let message = next_message(socket, deadline, "timed out").await?;
        if let Message::Text(text) = message {
            return Ok(text.as_str().to_owned());
        }
    }
}

/// Counts this channel's messages in a frame, checking each index is `next` (then next+1…).
fn count_messages(
    text: &str,
    channel: &str,
    next: u64,
    in_order: &mut bool,
) -> anyhow::Result<u64> {
    let frame = Inbound::parse(text)?;
    if frame.is_failure() {
        anyhow::bail!("subscriber got {text}");
    }
    if frame.action != action::MESSAGE || frame.channel.as_deref() != Some(channel) {
        return Ok(0);
    }
    let mut n = 0;
    for message in &frame.messages {
        let index = message.data.as_deref().and_then(payload_index);
        if index != Some(next.wrapping_add(n)) {
            *in_order = false;
        }
        n += 1;
    }
    Ok(n)
}

#[derive(Serialize)]
pub(crate) struct ResumeReport {
    kind: &'static str,
    label: String,
    started_unix_secs: u64,
    args: ResumeArgs,
    all_ok: bool,
    /// Reconnect start → last missed message, over the successful runs.
    reconnect_to_last: LatencySummary,
    runs: Vec<ResumeRun>,
    failures: Vec<String>,
}

impl fmt::Display for ResumeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "resume [{}] {} missed × {} B, {} runs: {}",
            self.label,
            self.args.missed,
            self.args.payload_bytes,
            self.args.runs,
            if self.all_ok {
                "all ok"
            } else {
                "CHECKS FAILED"
            }
        )?;
        writeln!(
            f,
            "  reconnect → last missed message: {}",
            self.reconnect_to_last
        )?;
        for (i, r) in self.runs.iter().enumerate() {
            writeln!(
                f,
                "  run {i}: connected {:.2}ms attached {:.2}ms last {:.2}ms; resumed={} same_id={} flags={} received={} in_order={} extra={}",
                r.reconnect_to_connected_ms,
                r.reconnect_to_attached_ms,
                r.reconnect_to_last_ms,
                r.resumed,
                r.same_connection_id,
                r.attached_flags,
                r.received,
                r.in_order,
                r.extra
            )?;
        }
        for failure in &self.failures {
            writeln!(f, "  FAILED {failure}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Payload indexes round-trip and frames are counted only for our channel, in order.
    #[test]
    fn counting_and_order() {
        let p = payload(42, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(payload_index(&p), Some(42));
        let frame = format!(
            r#"{{"action":15,"channel":"c","messages":[{{"data":"{}"}},{{"data":"{}"}}]}}"#,
            payload(5, 20),
            payload(6, 20)
        );
        let mut in_order = true;
        assert_eq!(count_messages(&frame, "c", 5, &mut in_order).unwrap(), 2);
        assert!(in_order);
        assert_eq!(
            count_messages(&frame, "other", 5, &mut in_order).unwrap(),
            0
        );
        assert_eq!(count_messages(&frame, "c", 4, &mut in_order).unwrap(), 2);
        assert!(!in_order);
        assert!(count_messages(r#"{"action":6,"error":{}}"#, "c", 0, &mut in_order).is_err());
    }
}
