//! Connect: opens N connections at a fixed rate (open loop), keeps them idle, and reads
//! the server's resident memory before and after: bytes per idle connection.
//!
//! A process may hold 20,000 open files on this machine, so with `--processes K` the
//! connections are spread over K worker processes (this binary, `connect --worker`),
//! each opening its share at `rate / K`. A worker prints one JSON line when its storm is
//! over ([`WorkerStorm`]), holds its connections until its stdin closes, then prints a
//! second line ([`WorkerDone`]) and exits; the parent reads the server's memory while
//! every worker holds.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::latency::{Latency, LatencySummary};
use crate::nats;
use crate::process::{self, rss_bytes};
use crate::pusher;
use crate::socket::{ensure_loopback, idle_config, Protocol, Socket, Target};
use crate::wire;

/// The bench process may hold 20k files; leave room for everything else it opens.
const CONNECTIONS_PER_PROCESS_MAX: usize = 9000;
/// Connection attempts started per second by one process.
const RATE_PER_PROCESS_MAX: u64 = 20_000;
const PROCESSES_MAX: usize = 8;
const HOLD_SECS_MAX: u64 = 120;
/// How long a finished connection storm is left to settle before memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// The longest a storm may take, from the first attempt to the last outcome.
const STORM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker holds its connections at most if nobody closes its stdin.
const WORKER_HOLD_MAX: Duration = Duration::from_secs(HOLD_SECS_MAX + 120);
/// How long closing every held connection may take.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Connection attempts started per second, over all processes.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Load-generator processes to spread the connections over (at most 9,000 each).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// How long the connections stay open and idle once all are up.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// The server's process id, to read its VmRSS and CPU time from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long, default_value = "connect")]
    pub label: String,
    /// Run as one worker of a multi-process storm (see the module docs).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub worker: bool,
}

impl ConnectArgs {
    fn validate(&self) -> anyhow::Result<()> {
        ensure_loopback(&self.url)?;
        anyhow::ensure!(
            (1..=PROCESSES_MAX).contains(&self.processes),
            "--processes in 1..={PROCESSES_MAX}"
        );
        let connections_max = CONNECTIONS_PER_PROCESS_MAX * self.processes;
        anyhow::ensure!(
            (1..=connections_max).contains(&self.connections),
            "--connections in 1..={connections_max} ({CONNECTIONS_PER_PROCESS_MAX} per process: \
             a process may open 20k files; add --processes for more)"
        );
        let rate_max = RATE_PER_PROCESS_MAX * self.processes as u64;
        anyhow::ensure!(
            (1..=rate_max).contains(&self.rate),
            "--rate in 1..={rate_max} ({RATE_PER_PROCESS_MAX} per process)"
        );
        anyhow::ensure!(
            self.hold_secs <= HOLD_SECS_MAX,
            "--hold-secs at most {HOLD_SECS_MAX}"
        );
        self.target.ensure_key(&self.key)?;
        Ok(())
    }

    /// Worker `index`'s share of the connections and of the rate.
    fn share(&self, index: usize) -> (usize, u64) {
        let k = self.processes;
        let connections = self.connections / k + usize::from(index < self.connections % k);
        let rate = (self.rate / k as u64).max(1);
        (connections, rate)
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

/// What a storm (one process's or all workers') came to.
#[derive(Default)]
struct StormOutcome {
    latency: Option<Latency>,
    errors: u64,
    first_error: Option<String>,
}

impl StormOutcome {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// Connections being held: in this process, or in worker processes.
enum Held {
    Local {
        stop: watch::Sender<bool>,
        holders: JoinSet<bool>,
    },
    Workers(Vec<(Child, BufReader<ChildStdout>)>),
}

impl Held {
    /// Closes every connection; returns how many the server dropped while they were idle.
    async fn release(self) -> u64 {
        let mut dropped = 0u64;
        match self {
            Held::Local { stop, mut holders } => {
                let _ = stop.send(true);
                let deadline = tokio::time::Instant::now() + TEARDOWN_TIMEOUT;
                while let Ok(Some(joined)) =
                    tokio::time::timeout_at(deadline, holders.join_next()).await
                {
                    dropped += u64::from(joined.unwrap_or(true));
                }
                holders.abort_all();
            }
            Held::Workers(workers) => {
                for (mut child, mut stdout) in workers {
                    drop(child.stdin.take()); // EOF: the worker closes its connections
                    let line = tokio::time::timeout(TEARDOWN_TIMEOUT, read_line(&mut stdout)).await;
                    if let Ok(Ok(line)) = line {
                        if let Ok(done) = serde_json::from_str::<WorkerDone>(&line) {
                            dropped += done.dropped_during_hold;
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    let _ = child.kill().await;
                }
            }
        }
        dropped
    }
}

/// Opens this process's share of connections on an open-loop schedule and waits for the
/// outcome of every attempt.
async fn storm_local(args: &ConnectArgs, connections: usize, rate: u64) -> (StormOutcome, Held) {
    let (stop_tx, stop) = watch::channel(false);
    // One outcome per attempt: Ok(connect latency ns) or Err(reason). Bounded by N.
    let (outcome_tx, mut outcome_rx) = mpsc::channel::<Result<u64, String>>(connections);
    let mut holders = JoinSet::new();
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    for i in 0..connections {
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
    let mut outcome = StormOutcome {
        latency: Some(Latency::new()),
        ..StormOutcome::default()
    };
    // Each attempt reports within the dial and reply timeouts; bound the wait anyway.
    let deadline = start + STORM_TIMEOUT;
    for _ in 0..connections {
        match tokio::time::timeout_at(deadline, outcome_rx.recv()).await {
            Ok(Some(Ok(ns))) => outcome.latency.as_mut().map_or((), |l| l.record_ns(ns)),
            Ok(Some(Err(e))) => outcome.error(e),
            Ok(None) | Err(_) => outcome.error("attempt never finished".to_owned()),
        }
    }
    let held = Held::Local {
        stop: stop_tx,
        holders,
    };
    (outcome, held)
}

/// What a worker prints when its storm is over.
#[derive(Serialize, Deserialize)]
struct WorkerStorm {
    /// Connect latency of every successful attempt, in microseconds.
    latency_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// What a worker prints when it has closed its connections.
#[derive(Serialize, Deserialize)]
struct WorkerDone {
    dropped_during_hold: u64,
}

async fn read_line(stdout: &mut BufReader<ChildStdout>) -> anyhow::Result<String> {
    let mut line = String::new();
    let n = stdout.read_line(&mut line).await?;
    anyhow::ensure!(n > 0, "worker exited early");
    Ok(line)
}

/// Starts one worker process per share and waits for every storm to finish.
async fn storm_workers(args: &ConnectArgs) -> anyhow::Result<(StormOutcome, Held)> {
    let exe = std::env::current_exe().context("finding this program to start workers")?;
    let mut workers = Vec::with_capacity(args.processes);
    for index in 0..args.processes {
        let (connections, rate) = args.share(index);
        let mut child = tokio::process::Command::new(&exe)
            .arg("connect")
            .arg("--worker")
            .args(["--target", &args.target.to_string(), "--url", &args.url])
            .args(["--key", &args.key, "--label", &args.label])
            .args(["--connections", &connections.to_string()])
            .args(["--rate", &rate.to_string(), "--hold-secs", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a connect worker")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        workers.push((child, stdout));
    }
    let mut outcome = StormOutcome {
        latency: Some(Latency::new()),
        ..StormOutcome::default()
    };
    for (_, stdout) in &mut workers {
        let line = tokio::time::timeout(STORM_TIMEOUT + Duration::from_secs(10), read_line(stdout))
            .await
            .context("a worker's storm did not finish in time")??;
        let storm: WorkerStorm =
            serde_json::from_str(&line).context("reading a worker's storm report")?;
        if let Some(latency) = outcome.latency.as_mut() {
            for us in storm.latency_us {
                latency.record_ns(us * 1_000);
            }
        }
        outcome.errors += storm.errors;
        if let Some(e) = storm.first_error {
            outcome.first_error.get_or_insert(e);
        }
    }
    Ok((outcome, Held::Workers(workers)))
}

/// The worker side: storm, report, hold until stdin closes, close, report.
pub(crate) async fn run_worker(args: ConnectArgs) -> anyhow::Result<()> {
    args.validate()?;
    let (outcome, held) = storm_local(&args, args.connections, args.rate).await;
    let latency_us = outcome
        .latency
        .as_ref()
        .map(Latency::values_us)
        .unwrap_or_default();
    let storm = WorkerStorm {
        latency_us,
        errors: outcome.errors,
        first_error: outcome.first_error,
    };
    println!("{}", serde_json::to_string(&storm)?);
    // Hold until the parent closes our stdin (or exits), bounded in time.
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WORKER_HOLD_MAX, tokio::io::stdin().read_to_end(&mut sink)).await;
    let dropped_during_hold = held.release().await;
    println!(
        "{}",
        serde_json::to_string(&WorkerDone {
            dropped_during_hold
        })?
    );
    Ok(())
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
    let server_cpu_before = args.server_pid.and_then(|pid| process::cpu_secs(pid).ok());
    let machine_before = process::machine_busy_secs().ok();
    let overflows_before = process::listen_overflows().ok();

    let start = std::time::Instant::now();
    let (outcome, held) = if args.processes == 1 {
        storm_local(&args, args.connections, args.rate).await
    } else {
        storm_workers(&args).await?
    };
    let all_up_secs = start.elapsed().as_secs_f64();
    let server_cpu_after = args.server_pid.and_then(|pid| process::cpu_secs(pid).ok());
    let machine_after = process::machine_busy_secs().ok();
    let listen_overflows = overflows_before
        .zip(process::listen_overflows().ok())
        .map(|(a, b)| b.saturating_sub(a));
    let cores = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / all_up_secs);

    tokio::time::sleep(SETTLE).await;
    let rss_open = rss("with connections open")?;
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_held = rss("after the hold")?;
    let dropped_during_hold = held.release().await;
    tokio::time::sleep(SETTLE).await;
    let rss_after_close = rss("after closing")?;

    let latency = outcome.latency.unwrap_or_else(Latency::new);
    let successes = latency.summary().count;
    let per_connection = |rss: Option<u64>| {
        rss.zip(rss_before)
            .filter(|_| successes > 0)
            .map(|(now, before)| (now as f64 - before as f64) / successes as f64)
    };
    let connected_per_sec = successes as f64 / all_up_secs.max(1e-9);
    let limit = limit(
        &args,
        outcome.errors,
        outcome.first_error.as_deref(),
        listen_overflows,
        connected_per_sec,
    );
    Ok(ConnectReport {
        kind: "connect",
        label: args.label.clone(),
        target: args.target,
        started_unix_secs,
        successes,
        errors: outcome.errors,
        first_error: outcome.first_error,
        dropped_during_hold,
        storm_secs: all_up_secs,
        connected_per_sec,
        limit,
        listen_overflows,
        server_cpu_cores_storm: cores(server_cpu_before, server_cpu_after),
        machine_cpu_cores_storm: cores(machine_before, machine_after),
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

/// What stopped the run from going faster, in words: errors first, then whether the
/// offered rate was met, and if not, whether SYNs were dropped or the CPU ran out.
fn limit(
    args: &ConnectArgs,
    errors: u64,
    first_error: Option<&str>,
    listen_overflows: Option<u64>,
    achieved: f64,
) -> String {
    if errors > 0 {
        let e = first_error.unwrap_or("unknown");
        let what = if e.contains("Too many open files") || e.contains("os error 24") {
            "open files limit"
        } else if e.contains("Address not available") || e.contains("os error 99") {
            "ephemeral ports"
        } else if e.contains("timed out") || e.contains("in time") {
            "timeouts"
        } else {
            "errors"
        };
        let dropped = match listen_overflows {
            Some(n) if n > 0 => format!("; {n} SYNs dropped on a full listen queue"),
            _ => String::new(),
        };
        return format!("{what}: {errors} failed{dropped}, first: {e:.160}");
    }
    // The schedule ends when the last offered connection is due; the last handshakes
    // finish a little after, so allow some slack before calling the run saturated.
    let offered = args.rate as f64;
    let overflows = listen_overflows.unwrap_or(0);
    if achieved < 0.8 * offered && overflows > 0 {
        format!(
            "listen queue: {achieved:.0}/s of {offered:.0}/s offered; the kernel dropped {overflows} SYNs \
             (full accept queue), each retried by its client 1 s later"
        )
    } else if achieved < 0.8 * offered {
        format!(
            "CPU: {achieved:.0}/s of {offered:.0}/s offered (server and {} load-generator process(es) share 2 cores)",
            args.processes
        )
    } else {
        "none: the offered rate was met with no error".to_owned()
    }
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
    /// From the first attempt until every attempt had an outcome (workers included).
    storm_secs: f64,
    /// Successful connections over `storm_secs`.
    connected_per_sec: f64,
    /// What stopped the run from going faster.
    limit: String,
    /// SYNs dropped on a full listen queue during the storm (whole network namespace).
    listen_overflows: Option<u64>,
    /// Server CPU seconds per second during the storm.
    server_cpu_cores_storm: Option<f64>,
    /// All processes on the machine during the storm.
    machine_cpu_cores_storm: Option<f64>,
    /// WebSocket upgrade + CONNECTED (tern), INFO + PONG (nats), connection_established (sockudo).
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
            "connect [{}] target={} {} connections at {}/s over {} process(es) (held {}s)",
            self.label,
            self.target,
            self.args.connections,
            self.args.rate,
            self.args.processes,
            self.args.hold_secs
        )?;
        writeln!(
            f,
            "  ok {} errors {} dropped while idle {}; {:.0} connected/s; limit: {}",
            self.successes,
            self.errors,
            self.dropped_during_hold,
            self.connected_per_sec,
            self.limit
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
