//! Fan-out: P publishers send on a fixed schedule to C channels, each with N subscribers
//! (one connection per subscriber); every delivery's latency is measured from the time
//! the message was *scheduled* to be sent.
//!
//! The schedule is open-loop: message g (over all publishers) is due at
//! `start + g / rate`, goes to channel `g % C`, and is sent by publisher `g % P`. A
//! publisher that falls behind (its socket blocks, the machine is saturated) sends the
//! overdue messages at once, and their latency still counts from when they were due, so a
//! slow server cannot hide its stalls by slowing the load down (coordinated omission).
//!
//! Phases: subscribers connect and attach (bounded concurrency) → warm-up (sent, not
//! counted) → measured window → drain (until every expected delivery and ACK is in, or
//! `--drain-secs`) → stop and close.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

use crate::latency::{Latency, LatencySummary};
use crate::nats;
use crate::pacer;
use crate::process;
use crate::pusher;
use crate::socket::{busy_config, ensure_loopback, Protocol, Socket, Target};
use crate::stamp::{self, Clock, Phase};
use crate::summary::SUSTAINED_P99_US;
use crate::wire::{self, action, Format, Inbound};

/// Subscribers per bench process: each is a socket, and the process may hold 20k files.
const SUBSCRIBERS_MAX: usize = 9000;
const PUBLISHERS_MAX: usize = 1000;
const CHANNELS_MAX: usize = 9000;
/// Messages per second over all publishers.
const RATE_MAX: u64 = 2_000_000;
const DURATION_SECS_MAX: u64 = 600;
const WARMUP_SECS_MAX: u64 = 120;
const DRAIN_SECS_MAX: u64 = 60;
const PAYLOAD_BYTES_MAX: usize = 60_000;
/// Connections being set up at the same time (a connect storm is the `connect` command's job).
const CONNECTING_CONCURRENCY: usize = 32;
/// How long all subscribers and publishers together may take to connect and attach.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages a publisher writes before it flushes, when it is catching up.
const SEND_BATCH_MAX: usize = 1024;
/// Sent-but-unacknowledged publishes remembered for ACK latency (`ack_pending` queue).
const ACK_PENDING_MAX: usize = 262_144;
/// Frames a publisher's reader may ask its writer to send (NATS PONGs; `control` queue).
const CONTROL_QUEUE_MAX: usize = 16;
/// How long closing and joining may take once the run is over.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct FanoutArgs {
    /// Which server protocol to speak.
    #[arg(long, value_enum, default_value_t = Target::Tern)]
    pub target: Target,
    /// WebSocket base URL, loopback only (e.g. ws://127.0.0.1:8080).
    #[arg(long)]
    pub url: String,
    /// Ably API key `app.key:secret` (tern), or Pusher app `id:key:secret` (sockudo).
    #[arg(long, default_value = "")]
    #[serde(skip)]
    pub key: String,
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[arg(long, default_value_t = 100)]
    pub subscribers_per_channel: usize,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Messages per second over all publishers (open loop).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Longest wait after the last scheduled send for deliveries and ACKs still in flight.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    /// Names the scenario in the report.
    #[arg(long, default_value = "fanout")]
    pub label: String,
    /// The server's process id: its CPU use in the measured window is reported.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

impl FanoutArgs {
    fn validate(&self) -> anyhow::Result<()> {
        ensure_loopback(&self.url)?;
        let subscribers = self.channels.saturating_mul(self.subscribers_per_channel);
        anyhow::ensure!(
            (1..=SUBSCRIBERS_MAX).contains(&subscribers),
            "channels × subscribers-per-channel must be in 1..={SUBSCRIBERS_MAX}"
        );
        anyhow::ensure!(
            (1..=PUBLISHERS_MAX).contains(&self.publishers),
            "--publishers in 1..={PUBLISHERS_MAX}"
        );
        anyhow::ensure!(
            (1..=CHANNELS_MAX).contains(&self.channels),
            "--channels in 1..={CHANNELS_MAX}"
        );
        anyhow::ensure!(
            (1..=RATE_MAX).contains(&self.rate),
            "--rate in 1..={RATE_MAX}"
        );
        anyhow::ensure!(
            (1..=DURATION_SECS_MAX).contains(&self.duration_secs),
            "--duration-secs in 1..={DURATION_SECS_MAX}"
        );
        anyhow::ensure!(
            self.warmup_secs <= WARMUP_SECS_MAX,
            "--warmup-secs at most {WARMUP_SECS_MAX}"
        );
        anyhow::ensure!(
            self.drain_secs <= DRAIN_SECS_MAX,
            "--drain-secs at most {DRAIN_SECS_MAX}"
        );
        anyhow::ensure!(
            (stamp::STAMP_BYTES..=PAYLOAD_BYTES_MAX).contains(&self.payload_bytes),
            "--payload-bytes in {}..={PAYLOAD_BYTES_MAX}",
            stamp::STAMP_BYTES
        );
        self.target.ensure_key(&self.key)?;
        if self.target.protocol() == Protocol::Pusher {
            pusher::App::parse(&self.key)?;
        }
        Ok(())
    }

    fn channel_names(&self) -> Vec<String> {
        // Unique per run, so a server's history and resume state from earlier runs can't leak in.
        let run = crate::unix_time_secs();
        (0..self.channels)
            .map(|c| match self.target.protocol() {
                Protocol::Nats => format!("bench.{run}.{c}"),
                Protocol::Ably(_) | Protocol::Pusher => format!("bench-{run}-{c}"),
            })
            .collect()
    }
}

/// When each message is due and where it goes; the same for every publisher.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    start_ns: u64,
    rate: u64,
    publishers: u64,
    channels: u64,
    /// Messages (over all publishers) sent during warm-up.
    warmup_msgs: u64,
    /// Messages sent in all: warm-up plus the measured window.
    total_msgs: u64,
}

impl Schedule {
    fn new(args: &FanoutArgs, start_ns: u64) -> Schedule {
        Schedule {
            start_ns,
            rate: args.rate,
            publishers: args.publishers as u64,
            channels: args.channels as u64,
            warmup_msgs: args.rate * args.warmup_secs,
            total_msgs: args.rate * (args.warmup_secs + args.duration_secs),
        }
    }

    fn due_ns(&self, g: u64) -> u64 {
        let offset = u128::from(g) * 1_000_000_000 / u128::from(self.rate);
        self.start_ns + u64::try_from(offset).unwrap_or(u64::MAX)
    }

    fn end_ns(&self) -> u64 {
        self.due_ns(self.total_msgs)
    }

    fn phase(&self, g: u64) -> Phase {
        if g < self.warmup_msgs {
            Phase::Warmup
        } else {
            Phase::Measured
        }
    }

    fn channel(&self, g: u64) -> usize {
        (g % self.channels) as usize
    }
}

/// Counters every task adds to; read by the drain loop and the report.
#[derive(Default)]
struct Counters {
    delivered_measured: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    protocol_errors: AtomicU64,
    socket_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn protocol_error(&self, what: impl fmt::Display) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        self.remember(what);
    }

    fn socket_error(&self, what: impl fmt::Display) {
        self.socket_errors.fetch_add(1, Ordering::Relaxed);
        self.remember(what);
    }

    fn remember(&self, what: impl fmt::Display) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            let mut text = what.to_string();
            text.truncate(300);
            *first = Some(text);
        }
    }
}

/// Everything the run's tasks share.
#[derive(Clone)]
struct Run {
    clock: Clock,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
}

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<FanoutReport> {
    args.validate()?;
    let started_unix_secs = crate::unix_time_secs();
    let channels = Arc::new(args.channel_names());
    let (stop_tx, stop) = watch::channel(false);
    let run = Run {
        clock: Clock::start(),
        counters: Arc::new(Counters::default()),
        stop,
    };

    let subscribers = tokio::time::timeout(SETUP_TIMEOUT, open_subscribers(&args, &channels, &run))
        .await
        .context("subscribers did not connect and attach in time")??;
    let publisher_sockets = tokio::time::timeout(SETUP_TIMEOUT, open_publishers(&args, run.clock))
        .await
        .context("publishers did not connect in time")??;

    // Everyone is attached: start the clock a little ahead so every publisher is waiting.
    let schedule = Schedule::new(&args, run.clock.now_ns() + 50_000_000);
    let cpu = tokio::spawn(sample_cpu(args.server_pid, schedule, run.clock));
    let due = (0..schedule.total_msgs)
        .map(move |g| (schedule.due_ns(g), (g % schedule.publishers) as usize));
    let nudges = pacer::spawn(run.clock, args.publishers, due);
    let publishers = publisher_sockets
        .into_iter()
        .zip(nudges)
        .enumerate()
        .map(|(index, (socket, nudges))| {
            spawn_publisher(
                index as u64,
                socket,
                nudges,
                schedule,
                &args,
                &channels,
                &run,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let send_timeout =
        Duration::from_secs(args.warmup_secs + args.duration_secs + args.drain_secs + 10);
    let mut sends = Vec::with_capacity(publishers.len());
    let mut sinks = Vec::with_capacity(publishers.len());
    let mut readers = Vec::with_capacity(publishers.len());
    for publisher in publishers {
        readers.push(publisher.reader);
        match tokio::time::timeout(send_timeout, publisher.sender).await {
            Ok(Ok((send, sink))) => {
                sends.push(send);
                sinks.push(sink);
            }
            Ok(Err(join)) => run
                .counters
                .socket_error(format!("publisher task failed: {join}")),
            Err(_) => run
                .counters
                .socket_error("publisher did not finish its schedule in time"),
        }
    }
    let sent_total: u64 = sends.iter().map(|s| s.sent_total).sum();
    let expected: u64 = sends
        .iter()
        .map(|s| s.sent_measured_per_channel.iter().sum::<u64>())
        .sum::<u64>()
        * args.subscribers_per_channel as u64;

    let drain_ms = drain(&args, &run, schedule, expected, sent_total).await;
    let cpu = cpu.await.unwrap_or_default();
    let _ = stop_tx.send(true);

    let mut latency = Latency::new();
    let mut received = 0;
    for result in join_all(subscribers, &run.counters).await {
        latency.merge(&result.latency);
        received += result.measured;
    }
    let mut ack_latency = Latency::new();
    for result in join_all(readers, &run.counters).await {
        ack_latency.merge(&result.latency);
    }
    close_publishers(args.target, sinks).await;

    let published_measured: u64 = sends
        .iter()
        .map(|s| s.sent_measured_per_channel.iter().sum::<u64>())
        .sum();
    let counters = &run.counters;
    let latency = latency.summary();
    let lost_deliveries = expected.saturating_sub(received);
    let errors = counters.protocol_errors.load(Ordering::Relaxed)
        + counters.socket_errors.load(Ordering::Relaxed);
    let sustained = lost_deliveries == 0 && errors == 0 && latency.p99_us < SUSTAINED_P99_US;
    let first_error = counters
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(FanoutReport {
        kind: "fanout",
        label: args.label.clone(),
        target: args.target,
        started_unix_secs,
        subscribers: args.channels * args.subscribers_per_channel,
        published: sent_total,
        published_measured,
        publish_rate_achieved: published_measured as f64 / args.duration_secs as f64,
        expected_deliveries: expected,
        received_deliveries: received,
        lost_deliveries,
        extra_deliveries: received.saturating_sub(expected),
        deliveries_per_sec: received as f64 / args.duration_secs as f64,
        latency,
        sustained,
        ack_latency: args.target.acknowledges().then(|| ack_latency.summary()),
        acked: counters.acked.load(Ordering::Relaxed),
        nacked: counters.nacked.load(Ordering::Relaxed),
        send_lag_max_ms: sends.iter().map(|s| s.lag_ns_max).max().unwrap_or(0) as f64 / 1e6,
        drain_ms,
        server_cpu_cores: cpu.server_cpu_cores,
        bench_cpu_cores: cpu.bench_cpu_cores,
        machine_cpu_cores: cpu.machine_cpu_cores,
        protocol_errors: counters.protocol_errors.load(Ordering::Relaxed),
        socket_errors: counters.socket_errors.load(Ordering::Relaxed),
        first_error,
        args,
    })
}

/// Waits after the last scheduled send until every expected delivery (and, for tern,
/// every ACK) is in, or `--drain-secs` pass. Returns how long it waited.
async fn drain(args: &FanoutArgs, run: &Run, schedule: Schedule, expected: u64, sent: u64) -> u64 {
    let end = run.clock.instant_at(schedule.end_ns());
    tokio::time::sleep_until(end.into()).await;
    let deadline = end + Duration::from_secs(args.drain_secs);
    let counters = &run.counters;
    loop {
        let delivered = counters.delivered_measured.load(Ordering::Relaxed);
        let answered =
            counters.acked.load(Ordering::Relaxed) + counters.nacked.load(Ordering::Relaxed);
        let acks_done = !args.target.acknowledges() || answered >= sent;
        if (delivered >= expected && acks_done) || std::time::Instant::now() >= deadline {
            return end.elapsed().as_millis() as u64;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CPU use over the measured window, in cores.
#[derive(Default)]
struct CpuUse {
    server_cpu_cores: Option<f64>,
    bench_cpu_cores: Option<f64>,
    machine_cpu_cores: Option<f64>,
}

/// Reads CPU time at the start and the end of the measured window.
async fn sample_cpu(server_pid: Option<u32>, schedule: Schedule, clock: Clock) -> CpuUse {
    let sample = || {
        let server = server_pid.and_then(|pid| process::cpu_secs(pid).ok());
        let bench = process::cpu_secs(std::process::id()).ok();
        let machine = process::machine_busy_secs().ok();
        (std::time::Instant::now(), server, bench, machine)
    };
    let window_start = clock.instant_at(schedule.due_ns(schedule.warmup_msgs));
    tokio::time::sleep_until(window_start.into()).await;
    let (t0, server0, bench0, machine0) = sample();
    tokio::time::sleep_until(clock.instant_at(schedule.end_ns()).into()).await;
    let (t1, server1, bench1, machine1) = sample();
    let secs = (t1 - t0).as_secs_f64().max(1e-9);
    let rate = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / secs);
    CpuUse {
        server_cpu_cores: rate(server0, server1),
        bench_cpu_cores: rate(bench0, bench1),
        machine_cpu_cores: rate(machine0, machine1),
    }
}

async fn join_all<T>(handles: Vec<JoinHandle<T>>, counters: &Counters) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        let abort = handle.abort_handle();
        match tokio::time::timeout(TEARDOWN_TIMEOUT, handle).await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(join)) => counters.socket_error(format!("task failed: {join}")),
            Err(_) => {
                abort.abort();
                counters.socket_error("task did not stop in time");
            }
        }
    }
    results
}

// ---- subscribers ----

enum SubscriberSocket {
    Ably(Socket, Format),
    Nats(Socket, nats::Reader),
    Pusher(Socket),
}

/// What one subscriber saw.
struct SubscriberResult {
    latency: Latency,
    measured: u64,
}

async fn open_subscribers(
    args: &FanoutArgs,
    channels: &Arc<Vec<String>>,
    run: &Run,
) -> anyhow::Result<Vec<JoinHandle<SubscriberResult>>> {
    let connecting = Arc::new(Semaphore::new(CONNECTING_CONCURRENCY));
    let mut setups = JoinSet::new();
    for s in 0..args.channels * args.subscribers_per_channel {
        let channel = channels[s % args.channels].clone();
        let connecting = connecting.clone();
        let (target, url, key) = (args.target, args.url.clone(), args.key.clone());
        setups.spawn(async move {
            let _permit = connecting.acquire_owned().await?;
            open_subscriber(target, &url, &key, &channel).await
        });
    }
    let mut sockets = Vec::with_capacity(setups.len());
    while let Some(setup) = setups.join_next().await {
        sockets.push(setup.context("subscriber setup task failed")??);
    }
    Ok(sockets
        .into_iter()
        .map(|socket| tokio::spawn(subscribe(socket, run.clone())))
        .collect())
}

async fn open_subscriber(
    target: Target,
    url: &str,
    key: &str,
    channel: &str,
) -> anyhow::Result<SubscriberSocket> {
    match target.protocol() {
        Protocol::Ably(format) => {
            let (mut socket, _) =
                wire::open(&wire::connect_url(url, key, format, ""), busy_config()).await?;
            wire::attach(&mut socket, format, channel, None).await?;
            Ok(SubscriberSocket::Ably(socket, format))
        }
        Protocol::Nats => {
            let (socket, reader) =
                nats::open(url, &format!("SUB {channel} 1\r\n"), busy_config()).await?;
            Ok(SubscriberSocket::Nats(socket, reader))
        }
        Protocol::Pusher => {
            let app = pusher::App::parse(key)?;
            let mut socket =
                pusher::open(&pusher::connect_url(url, &app.key), busy_config()).await?;
            pusher::subscribe(&mut socket, channel).await?;
            Ok(SubscriberSocket::Pusher(socket))
        }
    }
}

/// What a subscriber does with one frame.
enum Next {
    Continue,
    /// Send this frame (a NATS PONG, a Pusher pong), then continue.
    Reply(Message),
    /// The connection is over.
    Stop,
}

/// Receives until told to stop or the socket fails, then closes politely.
async fn subscribe(socket: SubscriberSocket, mut run: Run) -> SubscriberResult {
    let mut result = SubscriberResult {
        latency: Latency::new(),
        measured: 0,
    };
    let (mut socket, mut nats_reader, ably_format) = match socket {
        SubscriberSocket::Ably(socket, format) => (socket, None, Some(format)),
        SubscriberSocket::Nats(socket, reader) => (socket, Some(reader), None),
        SubscriberSocket::Pusher(socket) => (socket, None, None),
    };
    loop {
        tokio::select! {
            // Stop: watch::Receiver::changed is cancellation safe.
            _ = run.stop.changed() => break,
            // A frame: StreamExt::next is cancellation safe (tungstenite keeps partial frames).
            message = socket.next() => {
                let (data, binary) = match message {
                    Some(Ok(Message::Text(text))) => (bytes::Bytes::from(text), false),
                    Some(Ok(Message::Binary(data))) => (data, true),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => { run.counters.socket_error(format!("subscriber: {e}")); break; }
                    None => { run.counters.socket_error("subscriber: server closed the socket"); break; }
                };
                let next = match (nats_reader.as_mut(), ably_format) {
                    (Some(reader), _) => on_nats_data(reader, &data, &run, &mut result),
                    (None, Some(_)) => on_ably_frame(&data, binary, &run, &mut result),
                    (None, None) => on_pusher_frame(&data, &run, &mut result),
                };
                match next {
                    Next::Continue => {}
                    Next::Reply(frame) => {
                        if socket.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Next::Stop => break,
                }
            }
        }
    }
    if let Some(format) = ably_format {
        // Tell the server we are done, so it does not keep our state for a resume.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(wire::close_frame(format)),
        )
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    result
}

fn record(payload: &[u8], run: &Run, result: &mut SubscriberResult) -> bool {
    let now_ns = run.clock.now_ns();
    match stamp::decode(payload) {
        Some((due_ns, Phase::Measured)) => {
            result.latency.record_ns(now_ns.saturating_sub(due_ns));
            result.measured += 1;
            true
        }
        Some((_, Phase::Warmup)) => false,
        None => {
            run.counters
                .protocol_error("a delivery without our time stamp");
            false
        }
    }
}

fn on_ably_frame(data: &[u8], binary: bool, run: &Run, result: &mut SubscriberResult) -> Next {
    let mut measured = 0;
    if wire::for_each_message_data(data, binary, |payload| {
        measured += u64::from(record(payload, run, result));
    }) {
        run.counters
            .delivered_measured
            .fetch_add(measured, Ordering::Relaxed);
        return Next::Continue;
    }
    let frame = match Inbound::decode(data, binary) {
        Ok(frame) => frame,
        Err(e) => {
            run.counters.protocol_error(format!("subscriber: {e:#}"));
            return Next::Continue;
        }
    };
    if frame.action == action::MESSAGE {
        let mut measured = 0;
        for message in &frame.messages {
            let payload = message.data.as_deref().unwrap_or("");
            measured += u64::from(record(payload.as_bytes(), run, result));
        }
        run.counters
            .delivered_measured
            .fetch_add(measured, Ordering::Relaxed);
        return Next::Continue;
    }
    if frame.is_failure() {
        run.counters.protocol_error(format!(
            "subscriber got action {} error {}",
            frame.action,
            frame.error.unwrap_or_default()
        ));
        if matches!(frame.action, action::DISCONNECTED | action::ERROR) {
            return Next::Stop;
        }
    }
    Next::Continue
}

fn on_nats_data(
    reader: &mut nats::Reader,
    data: &[u8],
    run: &Run,
    result: &mut SubscriberResult,
) -> Next {
    let mut pings = 0;
    let mut measured = 0;
    let fed = reader.feed(data, |op| match op {
        nats::Op::Msg { payload } => measured += u64::from(record(payload, run, result)),
        nats::Op::Ping => pings += 1,
        nats::Op::Err(e) => run.counters.protocol_error(format!("subscriber: {e}")),
        _ => {}
    });
    run.counters
        .delivered_measured
        .fetch_add(measured, Ordering::Relaxed);
    if let Err(e) = fed {
        run.counters.protocol_error(format!("subscriber: {e:#}"));
        return Next::Stop;
    }
    if pings > 0 {
        // One PONG answers every PING so far: the server only checks that we are alive.
        return Next::Reply(nats::frame(nats::PONG));
    }
    Next::Continue
}

fn on_pusher_frame(data: &[u8], run: &Run, result: &mut SubscriberResult) -> Next {
    // The fast path, as for Ably: an event named b carries one stamp as its data.
    if let Some(payload) = pusher::event_data(data, PUSHER_EVENT) {
        let measured = u64::from(record(payload, run, result));
        run.counters
            .delivered_measured
            .fetch_add(measured, Ordering::Relaxed);
        return Next::Continue;
    }
    let text = String::from_utf8_lossy(data);
    let event = match pusher::Inbound::parse(&text) {
        Ok(event) => event,
        Err(e) => {
            run.counters.protocol_error(format!("subscriber: {e:#}"));
            return Next::Continue;
        }
    };
    match event.event.as_ref() {
        PUSHER_EVENT => {
            let payload = event.data.as_deref().unwrap_or("");
            let measured = u64::from(record(payload.as_bytes(), run, result));
            run.counters
                .delivered_measured
                .fetch_add(measured, Ordering::Relaxed);
            Next::Continue
        }
        "pusher:ping" => Next::Reply(pusher::pong_frame()),
        "pusher:error" => {
            run.counters
                .protocol_error(format!("subscriber: {text:.300}"));
            Next::Continue
        }
        _ => Next::Continue,
    }
}

/// The event name publishers use on Pusher (and the message name on Ably).
const PUSHER_EVENT: &str = "b";

// ---- publishers ----

/// A publisher's write side: a WebSocket, or HTTP requests (Pusher).
enum PublishSink {
    Ws(SplitSink<Socket, Message>),
    Http(HttpPublisher),
}

/// A publisher's read side: ACKs and PINGs over the WebSocket, or HTTP outcomes.
enum PublishStream {
    Ws(SplitStream<Socket>),
    Http(mpsc::Receiver<HttpOutcome>),
}

/// One publish, encoded for its sink.
enum Frame {
    Ws(Message),
    /// A whole HTTP request, and when it was due.
    Http(Vec<u8>, u64),
}

/// Sends each publish as its own HTTP request on its own TCP connection: Sockudo answers
/// every API request with `Connection: close`, so keep-alive and pipelining are not
/// possible. At most [`HTTP_IN_FLIGHT_MAX`] requests are in flight; past that the
/// schedule waits, and the wait counts in the latency.
struct HttpPublisher {
    authority: Arc<str>,
    in_flight: Arc<Semaphore>,
    /// Outcomes for the reader (`http_outcomes` queue); bounded by the in-flight limit.
    outcomes: mpsc::Sender<HttpOutcome>,
    clock: Clock,
}

/// One HTTP publish: when it was due, when its response arrived, and what it said.
struct HttpOutcome {
    due_ns: u64,
    done_ns: u64,
    result: anyhow::Result<pusher::Response>,
}

/// HTTP publishes in flight per publisher (each is a TCP connection).
const HTTP_IN_FLIGHT_MAX: usize = 256;

impl HttpPublisher {
    async fn send(&self, request: Vec<u8>, due_ns: u64) -> anyhow::Result<()> {
        let permit = self.in_flight.clone().acquire_owned().await?;
        let (authority, outcomes, clock) =
            (self.authority.clone(), self.outcomes.clone(), self.clock);
        tokio::spawn(async move {
            let result = pusher::post(&authority, &request).await;
            let done_ns = clock.now_ns();
            let _ = outcomes
                .send(HttpOutcome {
                    due_ns,
                    done_ns,
                    result,
                })
                .await;
            drop(permit);
        });
        Ok(())
    }
}

impl PublishSink {
    /// Queues a frame; it may be written at once when the buffer fills.
    async fn feed(&mut self, frame: Frame) -> anyhow::Result<()> {
        match (self, frame) {
            (PublishSink::Ws(sink), Frame::Ws(message)) => Ok(sink.feed(message).await?),
            (PublishSink::Http(http), Frame::Http(request, due_ns)) => {
                http.send(request, due_ns).await
            }
            _ => anyhow::bail!("a frame for the wrong kind of publisher"),
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            PublishSink::Ws(sink) => Ok(sink.flush().await?),
            PublishSink::Http(_) => Ok(()),
        }
    }

    /// Closes politely: an Ably CLOSE first, then the WebSocket close or a TCP shutdown.
    async fn close(mut self, target: Target) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            match (&mut self, target.protocol()) {
                (PublishSink::Ws(sink), Protocol::Ably(format)) => {
                    sink.send(wire::close_frame(format)).await?;
                    sink.close().await?;
                }
                (PublishSink::Ws(sink), _) => sink.close().await?,
                (PublishSink::Http(http), _) => {
                    // Wait for the requests still in flight.
                    let _ = http.in_flight.acquire_many(HTTP_IN_FLIGHT_MAX as u32).await;
                }
            }
            anyhow::Ok(())
        })
        .await;
    }
}

async fn open_publishers(
    args: &FanoutArgs,
    clock: Clock,
) -> anyhow::Result<Vec<(PublishSink, PublishStream)>> {
    let mut publishers = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        let socket = match args.target.protocol() {
            // echo=false: a publisher never wants its own messages back.
            Protocol::Ably(format) => {
                let url = wire::connect_url(&args.url, &args.key, format, "&echo=false");
                wire::open(&url, busy_config()).await?.0
            }
            Protocol::Nats => nats::open(&args.url, "", busy_config()).await?.0,
            Protocol::Pusher => {
                let (outcomes, outcomes_rx) = mpsc::channel(HTTP_IN_FLIGHT_MAX);
                let http = HttpPublisher {
                    authority: http_authority(&args.url).into(),
                    in_flight: Arc::new(Semaphore::new(HTTP_IN_FLIGHT_MAX)),
                    outcomes,
                    clock,
                };
                publishers.push((PublishSink::Http(http), PublishStream::Http(outcomes_rx)));
                continue;
            }
        };
        let (sink, stream) = socket.split();
        publishers.push((PublishSink::Ws(sink), PublishStream::Ws(stream)));
    }
    Ok(publishers)
}

/// `127.0.0.1:6001` from `ws://127.0.0.1:6001/...`: where the HTTP API listens too.
fn http_authority(url: &str) -> &str {
    let rest = url.strip_prefix("ws://").unwrap_or(url);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

struct Publisher {
    /// Runs the schedule; gives back the write half for a clean close.
    sender: JoinHandle<(SendResult, PublishSink)>,
    /// Reads ACKs (tern), HTTP responses (Pusher) or PINGs (nats) until the run stops.
    reader: JoinHandle<AckResult>,
}

/// What one publisher sent.
struct SendResult {
    sent_total: u64,
    sent_measured_per_channel: Vec<u64>,
    /// The furthest behind schedule a send started: client-side saturation shows here.
    lag_ns_max: u64,
}

struct AckResult {
    latency: Latency,
}

fn spawn_publisher(
    index: u64,
    (sink, stream): (PublishSink, PublishStream),
    nudges: pacer::Nudges,
    schedule: Schedule,
    args: &FanoutArgs,
    channels: &Arc<Vec<String>>,
    run: &Run,
) -> anyhow::Result<Publisher> {
    let (ack_pending_tx, ack_pending_rx) = mpsc::channel::<(u64, u64)>(ACK_PENDING_MAX);
    let (control_tx, control_rx) = mpsc::channel::<Message>(CONTROL_QUEUE_MAX);
    let reader = tokio::spawn(read_publisher_socket(
        args.target,
        stream,
        ack_pending_rx,
        control_tx,
        run.clone(),
    ));
    let pusher_app = match args.target.protocol() {
        Protocol::Pusher => Some(pusher::App::parse(&args.key)?),
        _ => None,
    };
    let host = http_authority(&args.url).to_owned();
    let (target, payload_bytes, channels, run) = (
        args.target,
        args.payload_bytes,
        channels.clone(),
        run.clone(),
    );
    let sender = tokio::spawn(async move {
        let mut sink = sink;
        let make = |g: u64, msg_serial: u64| {
            let due_ns = schedule.due_ns(g);
            let payload = stamp::encode(due_ns, schedule.phase(g), payload_bytes);
            let channel = &channels[schedule.channel(g)];
            if matches!(target.protocol(), Protocol::Ably(_)) {
                // Full queue: this publish's ACK latency goes unmeasured, nothing else.
                let _ = ack_pending_tx.try_send((msg_serial, due_ns));
            }
            match (target.protocol(), &pusher_app) {
                (Protocol::Ably(format), _) => {
                    Frame::Ws(wire::publish_frame(format, channel, msg_serial, &payload))
                }
                (Protocol::Nats, _) => Frame::Ws(nats::publish(channel, &payload)),
                (Protocol::Pusher, Some(app)) => Frame::Http(
                    pusher::publish_request(app, &host, crate::unix_time_secs(), channel, &payload),
                    due_ns,
                ),
                (Protocol::Pusher, None) => unreachable!("the app was parsed above"),
            }
        };
        let result =
            send_schedule(index, schedule, &run, &mut sink, make, control_rx, nudges).await;
        (result, sink)
    });
    Ok(Publisher { sender, reader })
}

/// Sends publisher `index`'s share of the schedule, on time or as soon as it can.
async fn send_schedule(
    index: u64,
    schedule: Schedule,
    run: &Run,
    sink: &mut PublishSink,
    mut make: impl FnMut(u64, u64) -> Frame,
    mut control: mpsc::Receiver<Message>,
    mut nudges: pacer::Nudges,
) -> SendResult {
    let mut result = SendResult {
        sent_total: 0,
        sent_measured_per_channel: vec![0; schedule.channels as usize],
        lag_ns_max: 0,
    };
    let mut g = index;
    let mut msg_serial = 0;
    while g < schedule.total_msgs {
        let now_ns = run.clock.now_ns();
        let due_ns = schedule.due_ns(g);
        if due_ns > now_ns {
            nudges.wait_until(&run.clock, due_ns).await;
            continue;
        }
        result.lag_ns_max = result.lag_ns_max.max(now_ns - due_ns);
        while let Ok(frame) = control.try_recv() {
            if let Err(e) = sink.feed(Frame::Ws(frame)).await {
                run.counters.socket_error(format!("publisher: {e:#}"));
                return result;
            }
        }
        let mut batch = 0;
        while g < schedule.total_msgs && batch < SEND_BATCH_MAX && schedule.due_ns(g) <= now_ns {
            if let Err(e) = sink.feed(make(g, msg_serial)).await {
                run.counters.socket_error(format!("publisher: {e:#}"));
                return result;
            }
            result.sent_total += 1;
            if schedule.phase(g) == Phase::Measured {
                result.sent_measured_per_channel[schedule.channel(g)] += 1;
            }
            g += schedule.publishers;
            msg_serial += 1;
            batch += 1;
        }
        if let Err(e) = sink.flush().await {
            run.counters.socket_error(format!("publisher: {e:#}"));
            return result;
        }
    }
    result
}

/// Reads a publisher's socket: ACK/NACK (tern) or HTTP responses (Pusher), with latency
/// from the scheduled time; PING (nats: the writer answers) and errors; until the run stops.
async fn read_publisher_socket(
    target: Target,
    stream: PublishStream,
    ack_pending: mpsc::Receiver<(u64, u64)>,
    control: mpsc::Sender<Message>,
    run: Run,
) -> AckResult {
    let mut acks = AckTracker {
        pending: ack_pending,
        oldest: None,
        latency: Latency::new(),
    };
    match stream {
        PublishStream::Ws(stream) => {
            read_publisher_ws(target, stream, &mut acks, control, run).await
        }
        PublishStream::Http(outcomes) => read_publisher_http(outcomes, &mut acks, run).await,
    }
    AckResult {
        latency: acks.latency,
    }
}

async fn read_publisher_ws(
    target: Target,
    mut stream: SplitStream<Socket>,
    acks: &mut AckTracker,
    control: mpsc::Sender<Message>,
    mut run: Run,
) {
    let mut nats_reader = nats::Reader::default();
    loop {
        let message = tokio::select! {
            // Stop: cancellation safe.
            _ = run.stop.changed() => break,
            // A frame: cancellation safe.
            message = stream.next() => message,
        };
        let (data, binary) = match message {
            Some(Ok(Message::Text(text))) => (bytes::Bytes::from(text), false),
            Some(Ok(Message::Binary(data))) => (data, true),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                run.counters.socket_error(format!("publisher: {e}"));
                break;
            }
            None => {
                run.counters
                    .socket_error("publisher: server closed the socket");
                break;
            }
        };
        let keep_going = match target.protocol() {
            Protocol::Nats => on_publisher_nats_data(&data, &mut nats_reader, &control, &run),
            _ => on_publisher_ably_frame(&data, binary, acks, &run),
        };
        if !keep_going {
            break;
        }
    }
}

/// Records each HTTP publish's outcome: a 200 is its ACK, anything else a NACK.
async fn read_publisher_http(
    mut outcomes: mpsc::Receiver<HttpOutcome>,
    acks: &mut AckTracker,
    mut run: Run,
) {
    loop {
        let outcome = tokio::select! {
            // Stop: cancellation safe.
            _ = run.stop.changed() => break,
            // An outcome: mpsc::Receiver::recv is cancellation safe.
            outcome = outcomes.recv() => match outcome {
                Some(outcome) => outcome,
                None => break,
            },
        };
        match outcome.result {
            Ok(response) if response.status == 200 => {
                run.counters.acked.fetch_add(1, Ordering::Relaxed);
                acks.latency
                    .record_ns(outcome.done_ns.saturating_sub(outcome.due_ns));
            }
            Ok(response) => {
                run.counters.nacked.fetch_add(1, Ordering::Relaxed);
                run.counters.protocol_error(format!(
                    "events API answered {}: {:.200}",
                    response.status, response.body
                ));
            }
            Err(e) => {
                run.counters.nacked.fetch_add(1, Ordering::Relaxed);
                run.counters.socket_error(format!("events API: {e:#}"));
            }
        }
    }
}

/// Matches ACKs to the scheduled send times of the publishes they answer.
struct AckTracker {
    /// (msgSerial, due ns) of every publish sent, oldest first.
    pending: mpsc::Receiver<(u64, u64)>,
    /// Taken from `pending` but not yet acknowledged.
    oldest: Option<(u64, u64)>,
    latency: Latency,
}

impl AckTracker {
    /// Records the ACK of msgSerials `first..first + count`.
    fn ack(&mut self, first: u64, count: u64, now_ns: u64) {
        let end = first + count;
        while let Some((serial, due_ns)) =
            self.oldest.take().or_else(|| self.pending.try_recv().ok())
        {
            if serial >= end {
                self.oldest = Some((serial, due_ns));
                break;
            }
            // Serials below `first` were NACKed or their ACK was lost: not measured.
            if serial >= first {
                self.latency.record_ns(now_ns.saturating_sub(due_ns));
            }
        }
    }
}

/// Returns false when the connection is over.
fn on_publisher_ably_frame(data: &[u8], binary: bool, acks: &mut AckTracker, run: &Run) -> bool {
    let now_ns = run.clock.now_ns();
    let frame = match Inbound::decode(data, binary) {
        Ok(frame) => frame,
        Err(e) => {
            run.counters.protocol_error(format!("publisher: {e:#}"));
            return true;
        }
    };
    let count = frame.count.unwrap_or(1);
    match frame.action {
        action::ACK => {
            run.counters.acked.fetch_add(count, Ordering::Relaxed);
            acks.ack(frame.msg_serial.unwrap_or(0), count, now_ns);
            true
        }
        action::NACK => {
            run.counters.nacked.fetch_add(count, Ordering::Relaxed);
            run.counters
                .protocol_error(format!("NACK: {}", frame.error.unwrap_or_default()));
            true
        }
        _ if frame.is_failure() => {
            run.counters.protocol_error(format!(
                "publisher got action {} error {}",
                frame.action,
                frame.error.unwrap_or_default()
            ));
            !matches!(frame.action, action::DISCONNECTED | action::ERROR)
        }
        _ => true,
    }
}

/// Returns false when the connection is over.
fn on_publisher_nats_data(
    data: &[u8],
    reader: &mut nats::Reader,
    control: &mpsc::Sender<Message>,
    run: &Run,
) -> bool {
    let mut pings = 0;
    let fed = reader.feed(data, |op| match op {
        nats::Op::Ping => pings += 1,
        nats::Op::Err(e) => run.counters.protocol_error(format!("publisher: {e}")),
        _ => {}
    });
    for _ in 0..pings {
        // The writer may be done already; nats-server tolerates a missed PING.
        let _ = control.try_send(nats::frame(nats::PONG));
    }
    if let Err(e) = fed {
        run.counters.protocol_error(format!("publisher: {e:#}"));
        return false;
    }
    true
}

async fn close_publishers(target: Target, sinks: Vec<PublishSink>) {
    for sink in sinks {
        sink.close(target).await;
    }
}

// ---- report ----

#[derive(Serialize)]
pub(crate) struct FanoutReport {
    kind: &'static str,
    label: String,
    target: Target,
    started_unix_secs: u64,
    args: FanoutArgs,
    subscribers: usize,
    /// Messages published, warm-up included.
    published: u64,
    /// Messages published inside the measured window.
    published_measured: u64,
    publish_rate_achieved: f64,
    expected_deliveries: u64,
    received_deliveries: u64,
    lost_deliveries: u64,
    extra_deliveries: u64,
    deliveries_per_sec: f64,
    /// Publish (scheduled time) → delivery at a subscriber.
    latency: LatencySummary,
    /// No loss, no error, and p99 under [`SUSTAINED_P99_US`]: the server kept up.
    sustained: bool,
    /// Publish (scheduled time) → ACK at the publisher (tern) or HTTP response (sockudo).
    ack_latency: Option<LatencySummary>,
    acked: u64,
    nacked: u64,
    send_lag_max_ms: f64,
    drain_ms: u64,
    /// Server CPU seconds per second over the measured window (2.0 = both cores).
    server_cpu_cores: Option<f64>,
    /// This process's CPU seconds per second over the measured window.
    bench_cpu_cores: Option<f64>,
    /// All processes on the machine: what exceeds server + bench is someone else's load.
    machine_cpu_cores: Option<f64>,
    protocol_errors: u64,
    socket_errors: u64,
    first_error: Option<String>,
}

impl fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.args;
        writeln!(
            f,
            "fanout [{}] target={} {} pub → {} ch × {} sub, {} B at {} msg/s for {}s (+{}s warm-up)",
            self.label,
            self.target,
            a.publishers,
            a.channels,
            a.subscribers_per_channel,
            a.payload_bytes,
            a.rate,
            a.duration_secs,
            a.warmup_secs
        )?;
        writeln!(
            f,
            "  published {} in window ({:.0} msg/s), deliveries {}/{} expected ({} lost, {} extra), {:.0} deliveries/s",
            self.published_measured,
            self.publish_rate_achieved,
            self.received_deliveries,
            self.expected_deliveries,
            self.lost_deliveries,
            self.extra_deliveries,
            self.deliveries_per_sec
        )?;
        writeln!(f, "  latency  {}", self.latency)?;
        if let Some(ack) = &self.ack_latency {
            writeln!(
                f,
                "  ack      {}  (acked {}, nacked {})",
                ack, self.acked, self.nacked
            )?;
        }
        write!(
            f,
            "  send lag max {:.1}ms, drain {}ms, errors: protocol {} socket {}",
            self.send_lag_max_ms, self.drain_ms, self.protocol_errors, self.socket_errors
        )?;
        let cores = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
        write!(
            f,
            "\n  cpu cores used: server {} bench {} whole machine {}",
            cores(self.server_cpu_cores),
            cores(self.bench_cpu_cores),
            cores(self.machine_cpu_cores)
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "\n  first error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(publishers: usize, channels: usize, rate: u64) -> FanoutArgs {
        FanoutArgs {
            target: Target::Tern,
            url: "ws://127.0.0.1:1".into(),
            key: "a.b:c".into(),
            publishers,
            channels,
            subscribers_per_channel: 2,
            payload_bytes: 100,
            rate,
            duration_secs: 3,
            warmup_secs: 1,
            drain_secs: 1,
            label: "t".into(),
            server_pid: None,
        }
    }

    /// The schedule spreads messages evenly in time and over channels, and each
    /// publisher owns every P-th message.
    #[test]
    fn schedule_is_even() {
        let s = Schedule::new(&args(3, 10, 1000), 5_000);
        assert_eq!(s.total_msgs, 4000);
        assert_eq!(s.warmup_msgs, 1000);
        assert_eq!(s.due_ns(0), 5_000);
        assert_eq!(s.due_ns(1), 5_000 + 1_000_000);
        assert_eq!(s.end_ns(), 5_000 + 4_000_000_000);
        assert_eq!(s.phase(999), Phase::Warmup);
        assert_eq!(s.phase(1000), Phase::Measured);
        let mut per_channel = [0u64; 10];
        for g in 0..s.total_msgs {
            per_channel[s.channel(g)] += 1;
        }
        assert!(per_channel.iter().all(|&n| n == 400));
    }

    /// Batched ACKs measure each publish once; publishes NACKed earlier are skipped, and a
    /// publish not yet ACKed stays pending.
    #[test]
    fn ack_tracker() {
        let (tx, rx) = mpsc::channel(8);
        for serial in 0..5u64 {
            tx.try_send((serial, serial * 1_000_000)).unwrap();
        }
        let mut acks = AckTracker {
            pending: rx,
            oldest: None,
            latency: Latency::new(),
        };
        acks.ack(1, 2, 10_000_000); // serial 0 was NACKed: skipped; 1 and 2 measured
        assert_eq!(acks.latency.summary().count, 2);
        assert_eq!(acks.oldest, Some((3, 3_000_000)));
        acks.ack(3, 2, 10_000_000);
        let s = acks.latency.summary();
        assert_eq!(s.count, 4);
        assert!((8_990..=9_010).contains(&s.max_us), "{s:?}");
        assert_eq!(acks.oldest, None);
    }

    /// Limits are enforced before any socket opens.
    #[test]
    fn validation() {
        assert!(args(1, 1, 1000).validate().is_ok());
        let mut a = args(1, 1, 1000);
        a.url = "ws://192.168.1.1:80".into();
        assert!(a.validate().is_err());
        let mut a = args(1, 10, 1000);
        a.subscribers_per_channel = 1000;
        assert!(a.validate().is_err());
        let mut a = args(1, 1, 1000);
        a.payload_bytes = 10;
        assert!(a.validate().is_err());
        assert!(args(1, 1, RATE_MAX + 1).validate().is_err());
        let mut a = args(1, 1, 1000);
        a.key.clear();
        assert!(a.validate().is_err());
    }
}
