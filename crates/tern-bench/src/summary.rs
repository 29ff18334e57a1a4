//! Summary: reads the JSON reports of a bench run back and prints them as Markdown
//! tables, so docs/benchmarks.md is filled from the files rather than by hand.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// Reports read from one directory; more means something else is in it.
const REPORTS_MAX: usize = 1000;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SummaryArgs {
    /// Directory holding the *.json reports of one run.
    pub dir: PathBuf,
}

pub(crate) fn run(args: &SummaryArgs) -> anyhow::Result<String> {
    let reports = read_reports(&args.dir)?;
    let of_kind = |kind: &str| -> Vec<&Value> {
        reports
            .iter()
            .filter(|r| r["kind"].as_str() == Some(kind))
            .collect()
    };
    let mut out = String::new();
    out += &fanout_table(&of_kind("fanout"));
    out += "\n";
    out += &connect_table(&of_kind("connect"));
    out += "\n";
    out += &resume_table(&of_kind("resume"));
    Ok(out)
}

fn read_reports(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    anyhow::ensure!(
        paths.len() <= REPORTS_MAX,
        "more than {REPORTS_MAX} reports in {}",
        dir.display()
    );
    // Oldest first, so tables follow the order the scenarios ran in.
    paths.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut reports = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(report) if report["kind"].is_string() => reports.push(report),
            _ => {} // not one of ours
        }
    }
    Ok(reports)
}

fn ms(us: &Value) -> String {
    match us.as_f64() {
        Some(us) if us < 10_000.0 => format!("{:.2}", us / 1000.0),
        Some(us) => format!("{:.0}", us / 1000.0),
        None => "-".to_owned(),
    }
}

fn num(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map_or("-".to_owned(), |n| format!("{n:.decimals$}"))
}

fn fanout_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | target | pubs → ch × subs | msg/s | deliveries/s | lost / expected | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | ack p50 / p99 ms | cores: server / bench / machine | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let a = &r["args"];
        let l = &r["latency"];
        let ack = &r["ack_latency"];
        let ack = if ack.is_null() {
            "-".to_owned()
        } else {
            format!("{} / {}", ms(&ack["p50_us"]), ms(&ack["p99_us"]))
        };
        let errors =
            r["protocol_errors"].as_u64().unwrap_or(0) + r["socket_errors"].as_u64().unwrap_or(0);
        t += &format!(
            "| {} | {} | {} → {} × {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |\n",
            r["label"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
            a["publishers"],
            a["channels"],
            a["subscribers_per_channel"],
            a["rate"],
            num(&r["deliveries_per_sec"], 0),
            r["lost_deliveries"],
            r["expected_deliveries"],
            ms(&l["p50_us"]),
            ms(&l["p90_us"]),
            ms(&l["p99_us"]),
            ms(&l["p999_us"]),
            ms(&l["max_us"]),
            ack,
            num(&r["server_cpu_cores"], 2),
            num(&r["bench_cpu_cores"], 2),
            num(&r["machine_cpu_cores"], 2),
            errors,
        );
    }
    t
}

fn connect_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | target | connections | attempted/s | ok | errors | dropped idle | connect p50 / p99 / max ms | server RSS before → held (MiB) | KiB per connection |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |b| format!("{:.1}", b / 1048576.0))
    };
    for r in reports {
        let l = &r["latency"];
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} → {} | {} |\n",
            r["label"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
            r["args"]["connections"],
            r["args"]["rate"],
            r["successes"],
            r["errors"],
            r["dropped_during_hold"],
            ms(&l["p50_us"]),
            ms(&l["p99_us"]),
            ms(&l["max_us"]),
            mib(&r["rss_before_bytes"]),
            mib(&r["rss_held_bytes"]),
            r["bytes_per_connection_held"]
                .as_f64()
                .map_or("-".to_owned(), |b| format!("{:.1}", b / 1024.0)),
        );
    }
    t
}

fn resume_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | missed × bytes | runs | all checks ok | reconnect → last message p50 / max ms | per run (ms) |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in reports {
        let a = &r["args"];
        let s = &r["reconnect_to_last"];
        let runs: Vec<String> = r["runs"]
            .as_array()
            .map(|runs| {
                runs.iter()
                    .map(|run| num(&run["reconnect_to_last_ms"], 1))
                    .collect()
            })
            .unwrap_or_default();
        t += &format!(
            "| {} | {} × {} | {} | {} | {} / {} | {} |\n",
            r["label"].as_str().unwrap_or(""),
            a["missed"],
            a["payload_bytes"],
            a["runs"],
            r["all_ok"],
            ms(&s["p50_us"]),
            ms(&s["max_us"]),
            runs.join(", "),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fan-out report becomes one table row with latencies in milliseconds.
    #[test]
    fn fanout_row() {
        let r: Value = serde_json::json!({
            "kind": "fanout", "label": "s1", "target": "tern",
            "args": {"publishers": 1, "channels": 1, "subscribers_per_channel": 100, "rate": 1000},
            "deliveries_per_sec": 99999.6, "lost_deliveries": 0, "expected_deliveries": 10,
            "latency": {"p50_us": 1234, "p90_us": 2000, "p99_us": 15000, "p999_us": 20000, "max_us": 30000},
            "ack_latency": null, "server_cpu_cores": 0.5, "bench_cpu_cores": 0.25,
            "machine_cpu_cores": 0.8, "protocol_errors": 0, "socket_errors": 1
        });
        let table = fanout_table(&[&r]);
        let row = table.lines().nth(2).unwrap();
        assert_eq!(
            row,
            "| s1 | tern | 1 → 1 × 100 | 1000 | 100000 | 0 / 10 | 1.23 | 2.00 | 15 | 20 | 30 | - | 0.50 / 0.25 / 0.80 | 1 |"
        );
    }
}
