//! Idle: what a server costs when nothing happens. Over a window, for each process:
//! thread wake-ups per second (voluntary context switches summed over its threads), CPU
//! time, and resident memory. Several processes are watched over the same window, so
//! peers started side by side are compared under the same conditions.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::process;

const SECS_MAX: u64 = 300;
const PROCESSES_MAX: usize = 16;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub(crate) struct IdleArgs {
    /// A process to watch, as NAME=PID (repeat for several).
    #[arg(long = "pid", required = true)]
    pub pids: Vec<String>,
    /// How long to watch.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long, default_value = "idle")]
    pub label: String,
}

impl IdleArgs {
    fn targets(&self) -> anyhow::Result<Vec<(String, u32)>> {
        anyhow::ensure!(
            (1..=SECS_MAX).contains(&self.secs),
            "--secs in 1..={SECS_MAX}"
        );
        anyhow::ensure!(
            self.pids.len() <= PROCESSES_MAX,
            "at most {PROCESSES_MAX} --pid"
        );
        self.pids
            .iter()
            .map(|spec| {
                let (name, pid) = spec
                    .split_once('=')
                    .with_context(|| format!("--pid {spec}: expected NAME=PID"))?;
                let pid = pid
                    .parse()
                    .with_context(|| format!("--pid {spec}: not a process id"))?;
                Ok((name.to_owned(), pid))
            })
            .collect()
    }
}

/// One process at one moment.
struct Sample {
    at: Instant,
    switches: process::Switches,
    cpu_secs: f64,
    rss_bytes: u64,
}

fn sample(pid: u32) -> anyhow::Result<Sample> {
    Ok(Sample {
        at: Instant::now(),
        switches: process::switches(pid)?,
        cpu_secs: process::cpu_secs(pid)?,
        rss_bytes: process::rss_bytes(pid)?,
    })
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<IdleReport> {
    let targets = args.targets()?;
    let started_unix_secs = crate::unix_time_secs();
    let mut first = Vec::with_capacity(targets.len());
    for (name, pid) in &targets {
        first.push(sample(*pid).with_context(|| format!("reading {name} (pid {pid})"))?);
    }
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let mut processes = Vec::with_capacity(targets.len());
    for ((name, pid), a) in targets.into_iter().zip(first) {
        let b = sample(pid).with_context(|| format!("reading {name} (pid {pid}) again"))?;
        let secs = (b.at - a.at).as_secs_f64().max(1e-9);
        let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        processes.push(IdleProcess {
            name,
            pid,
            threads: b.switches.threads,
            wakeups_per_sec: per_sec(a.switches.voluntary, b.switches.voluntary),
            preemptions_per_sec: per_sec(a.switches.involuntary, b.switches.involuntary),
            cpu_ms_per_sec: (b.cpu_secs - a.cpu_secs).max(0.0) * 1000.0 / secs,
            rss_start_bytes: a.rss_bytes,
            rss_end_bytes: b.rss_bytes,
        });
    }
    Ok(IdleReport {
        kind: "idle",
        label: args.label.clone(),
        started_unix_secs,
        secs: args.secs,
        processes,
    })
}

#[derive(Serialize)]
pub(crate) struct IdleReport {
    kind: &'static str,
    label: String,
    started_unix_secs: u64,
    secs: u64,
    processes: Vec<IdleProcess>,
}

#[derive(Serialize)]
struct IdleProcess {
    name: String,
    pid: u32,
    threads: u64,
    /// Voluntary context switches per second over all threads: each is a thread that
    /// went to sleep and was woken again.
    wakeups_per_sec: f64,
    /// Involuntary context switches per second (preempted; should be ~0 when idle).
    preemptions_per_sec: f64,
    /// CPU milliseconds used per second (user + system).
    cpu_ms_per_sec: f64,
    rss_start_bytes: u64,
    rss_end_bytes: u64,
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "idle [{}] over {}s", self.label, self.secs)?;
        for p in &self.processes {
            write!(
                f,
                "\n  {} (pid {}): {} threads, {:.1} wake-ups/s, {:.1} preemptions/s, {:.2} ms CPU/s, RSS {:.1} → {:.1} MiB",
                p.name,
                p.pid,
                p.threads,
                p.wakeups_per_sec,
                p.preemptions_per_sec,
                p.cpu_ms_per_sec,
                p.rss_start_bytes as f64 / 1048576.0,
                p.rss_end_bytes as f64 / 1048576.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NAME=PID specs parse; anything else is refused before any sampling.
    #[test]
    fn pid_specs() {
        let args = |pids: &[&str], secs| IdleArgs {
            pids: pids.iter().map(|s| s.to_string()).collect(),
            secs,
            label: "t".into(),
        };
        assert_eq!(
            args(&["tern=12", "nats=7"], 1).targets().unwrap(),
            [("tern".to_owned(), 12), ("nats".to_owned(), 7)]
        );
        assert!(args(&["tern"], 1).targets().is_err());
        assert!(args(&["tern=x"], 1).targets().is_err());
        assert!(args(&["tern=1"], 0).targets().is_err());
    }
}
