//! `tern-bench`: a black-box load generator for Tern and the peers we compare it with.
//!
//! It talks the wire protocols itself (the Ably realtime protocol over WebSocket, JSON or
//! msgpack, for Tern; the NATS text protocol over WebSocket for nats-server; the Pusher
//! protocol plus its HTTP events API for Sockudo) and depends on no Tern crate, so it
//! measures what a client sees and nothing else.
//!
//! # Layout
//!
//! - `fanout`: open-loop publishers → channels → subscribers; delivery rate, loss and
//!   publish→deliver latency from the *scheduled* send time (no coordinated omission).
//! - `connect`: opens N idle connections at a fixed rate; connect latency and the
//!   server's resident memory per connection.
//! - `resume`: a subscriber misses M messages, resumes, and is timed until the last one.
//! - `idle`: wake-ups, CPU time and RSS of idle server processes.
//! - `regions`: publish→deliver latency between the regions of a multi-region Tern, and
//!   the overhead above the emulated link delay.
//! - `summary`: reads a run's JSON reports back and prints Markdown tables; `check`.
//! - `plot`: PNG plots of a run (latency vs load, peak deliveries/s, RSS per connection).
//! - `socket`: WebSocket dialing with timeouts, and the loopback-only guard.
//! - `wire`: Ably ProtocolMessage frames (JSON or msgpack) as this client reads and writes them.
//! - `nats`: the NATS text protocol reader (MSG / PING / PONG / -ERR).
//! - `pusher`: Pusher subscribe/events over WebSocket, signed HTTP publishes, response reader.
//! - `stamp`: payloads that carry their scheduled send time.
//! - `pacer`: a thread that wakes publishers when messages are due, finer than tokio's 1 ms timer.
//! - `latency`: HdrHistogram wrapper and its printable / JSON summary.
//! - `process`: RSS and CPU time of the server (and of this process) from /proc.
//!
//! Every loop is bounded in count and in time; every target must be a loopback address.

mod connect;
mod fanout;
mod idle;
mod latency;
mod nats;
mod pacer;
mod plot;
mod process;
mod pusher;
mod regions;
mod resume;
mod socket;
mod stamp;
mod summary;
mod wire;

use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "tern-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Write the results as JSON to this file (its directory is created).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Tokio worker threads for the load generator (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publishers → channels → subscribers: delivery rate, loss and latency.
    Fanout(fanout::FanoutArgs),
    /// Open many idle connections at a fixed rate; connect latency and server RSS.
    Connect(connect::ConnectArgs),
    /// A subscriber misses M messages and resumes: time until the last one arrives.
    Resume(resume::ResumeArgs),
    /// CPU wake-ups, CPU time and RSS of idle server processes over a window.
    Idle(idle::IdleArgs),
    /// Cross-region publish→deliver latency on a multi-region Tern.
    Regions(regions::RegionsArgs),
    /// Print the JSON reports in a directory as Markdown tables.
    Summary(summary::SummaryArgs),
    /// Exit non-zero if a run's reports show a functional failure of Tern (loss, errors).
    Check(summary::CheckArgs),
    /// Draw PNG plots from the JSON reports in a directory.
    Plot(plot::PlotArgs),
}

/// The largest worker pool we allow: the point is to load the server, not the client.
const THREADS_MAX: usize = 64;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        anyhow::ensure!(
            (1..=THREADS_MAX).contains(&threads),
            "--threads must be in 1..={THREADS_MAX}"
        );
        runtime.worker_threads(threads);
    }
    runtime
        .build()?
        .block_on(run(cli.command, cli.json.as_deref()))
}

async fn run(command: Command, json: Option<&Path>) -> anyhow::Result<()> {
    match command {
        Command::Fanout(args) => print_and_write(json, &fanout::run(args).await?),
        Command::Connect(args) if args.worker => connect::run_worker(args).await,
        Command::Connect(args) => print_and_write(json, &connect::run(args).await?),
        Command::Resume(args) => print_and_write(json, &resume::run(args).await?),
        Command::Idle(args) => print_and_write(json, &idle::run(args).await?),
        Command::Regions(args) => print_and_write(json, &regions::run(args).await?),
        Command::Summary(args) => {
            print!("{}", summary::run(&args)?);
            Ok(())
        }
        Command::Check(args) => {
            let findings = summary::check(&args)?;
            for warning in &findings.warnings {
                println!("warning: {warning}");
            }
            for failure in &findings.failures {
                println!("FAILED: {failure}");
            }
            anyhow::ensure!(
                findings.failures.is_empty(),
                "{} functional failure(s) in {}",
                findings.failures.len(),
                args.dir.display()
            );
            println!("check: no functional failure in {}", args.dir.display());
            Ok(())
        }
        Command::Plot(args) => {
            for path in plot::run(&args)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

/// Prints a measurement's summary and writes its JSON report, if asked to.
fn print_and_write(json: Option<&Path>, report: &(impl Serialize + Display)) -> anyhow::Result<()> {
    println!("{report}");
    write_json(json, report)
}

fn write_json(path: Option<&Path>, report: &impl Serialize) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Seconds since the Unix epoch, for stamping reports.
pub(crate) fn unix_time_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
