//! Summary: reads the JSON reports of a bench run back and prints them as Markdown
//! tables, so docs/benchmarks.md is filled from the files rather than by hand; and
//! `check`, which fails a run on functional failures (loss, errors) and never on speed.
//!
//! Fan-out sweeps are labelled `SERIES@RATE` (e.g. `1x1000@500`): the runs of one series
//! differ only in the offered rate, and [`peaks`] finds each system's highest sustained
//! delivery rate in it.

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

/// A run counts as sustained while its p99 stays under this: past it, messages queue
/// up for the whole window and the server is not keeping up.
pub(crate) const SUSTAINED_P99_US: u64 = 100_000;

pub(crate) fn run(args: &SummaryArgs) -> anyhow::Result<String> {
    let reports = read_reports(&args.dir)?;
    let of_kind = |kind: &str| -> Vec<&Value> { of_kind(&reports, kind) };
    let mut out = String::new();
    let fanout = of_kind("fanout");
    out += &fanout_table(&fanout);
    out += "\n";
    out += &peaks_table(&peaks(&fanout));
    out += "\n";
    out += &connect_table(&of_kind("connect"));
    out += "\n";
    out += &idle_table(&of_kind("idle"));
    out += "\n";
    out += &resume_table(&of_kind("resume"));
    out += "\n";
    out += &regions_table(&of_kind("regions"));
    Ok(out)
}

pub(crate) fn of_kind<'a>(reports: &'a [Value], kind: &str) -> Vec<&'a Value> {
    reports
        .iter()
        .filter(|r| r["kind"].as_str() == Some(kind))
        .collect()
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct CheckArgs {
    /// Directory holding the *.json reports of one run.
    pub dir: PathBuf,
}

/// What `check` found: failures fail the run; warnings (a peer's loss, an expected
/// ceiling probe's errors) are printed only.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Findings {
    pub failures: Vec<String>,
    pub warnings: Vec<String>,
}

/// Functional checks over a run's reports. Tern's own loss or errors fail it; a peer's
/// are warnings (they are results about the peer), and so are errors in connect runs
/// labelled `ceiling…`, which probe rates until errors on purpose.
pub(crate) fn check(args: &CheckArgs) -> anyhow::Result<Findings> {
    Ok(check_reports(&read_reports(&args.dir)?))
}

fn check_reports(reports: &[Value]) -> Findings {
    let mut findings = Findings::default();
    let count = |r: &Value, key: &str| r[key].as_u64().unwrap_or(0);
    for r in reports {
        let label = r["label"].as_str().unwrap_or("");
        let target = r["target"].as_str().unwrap_or("tern");
        let ours = target.starts_with("tern");
        let problem = match r["kind"].as_str() {
            Some("fanout") => {
                let bad = [
                    "lost_deliveries",
                    "extra_deliveries",
                    "nacked",
                    "protocol_errors",
                    "socket_errors",
                ]
                .iter()
                .filter(|k| count(r, k) > 0)
                .map(|k| format!("{k} {}", count(r, k)))
                .collect::<Vec<_>>();
                (!bad.is_empty()).then(|| bad.join(", "))
            }
            Some("connect") => {
                (count(r, "errors") + count(r, "dropped_during_hold") > 0).then(|| {
                    format!(
                        "{} errors, {} dropped while idle",
                        count(r, "errors"),
                        count(r, "dropped_during_hold")
                    )
                })
            }
            Some("resume") => {
                (r["all_ok"].as_bool() != Some(true)).then(|| "a resume check failed".to_owned())
            }
            Some("regions") => (count(r, "lost") + count(r, "errors") > 0)
                .then(|| format!("lost {}, errors {}", count(r, "lost"), count(r, "errors"))),
            _ => None,
        };
        let Some(problem) = problem else { continue };
        let first = r["first_error"]
            .as_str()
            .map(|e| format!(" (first: {e:.200})"))
            .unwrap_or_default();
        let line = format!(
            "{} [{label}] {target}: {problem}{first}",
            r["kind"].as_str().unwrap_or("?")
        );
        let probe = r["kind"].as_str() == Some("connect") && label.starts_with("ceiling");
        if ours && !probe {
            findings.failures.push(line);
        } else {
            findings.warnings.push(line);
        }
    }
    findings
}

/// One system's best sustained point in one fan-out series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Peak {
    pub series: String,
    pub target: String,
    /// The highest deliveries/s of a sustained run (no loss, no error, p99 under
    /// [`SUSTAINED_P99_US`]); 0 if none was.
    pub deliveries_per_sec: f64,
    /// The run nearest half that rate (offered deliveries/s), and its p99.
    pub half_peak_deliveries_per_sec: Option<f64>,
    pub half_peak_p99_us: Option<u64>,
}

/// The series part of a `SERIES@RATE` label.
pub(crate) fn series(label: &str) -> Option<&str> {
    label.split_once('@').map(|(s, _)| s)
}

/// Whether `series` was run at more than one rate.
pub(crate) fn is_sweep(fanout: &[&Value], series: &str) -> bool {
    let mut rates: Vec<u64> = fanout
        .iter()
        .filter(|r| r["label"].as_str().and_then(self::series) == Some(series))
        .filter_map(|r| r["args"]["rate"].as_u64())
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates.len() > 1
}

/// Offered deliveries per second: publish rate × subscribers per channel.
pub(crate) fn offered(r: &Value) -> f64 {
    let a = &r["args"];
    a["rate"].as_f64().unwrap_or(0.0) * a["subscribers_per_channel"].as_f64().unwrap_or(0.0)
}

pub(crate) fn sustained(r: &Value) -> bool {
    let zero = |k: &str| r[k].as_u64() == Some(0);
    zero("lost_deliveries")
        && zero("protocol_errors")
        && zero("socket_errors")
        && r["latency"]["p99_us"]
            .as_u64()
            .is_some_and(|p| p < SUSTAINED_P99_US)
}

/// Each (series, target)'s peak, in the order they first appear. Only series run at more
/// than one rate (sweeps) have a peak.
pub(crate) fn peaks(fanout: &[&Value]) -> Vec<Peak> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in fanout {
        let (Some(series), Some(target)) =
            (r["label"].as_str().and_then(series), r["target"].as_str())
        else {
            continue;
        };
        if !is_sweep(fanout, series) {
            continue; // one rate: no peak to find
        }
        let key = (series.to_owned(), target.to_owned());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(series_name, target)| {
            let runs: Vec<&&Value> = fanout
                .iter()
                .filter(|r| {
                    r["target"].as_str() == Some(&target)
                        && r["label"].as_str().and_then(series) == Some(&series_name)
                })
                .collect();
            let deliveries_per_sec = runs
                .iter()
                .filter(|r| sustained(r))
                .filter_map(|r| r["deliveries_per_sec"].as_f64())
                .fold(0.0, f64::max);
            let half = runs
                .iter()
                .filter(|_| deliveries_per_sec > 0.0)
                .min_by(|a, b| {
                    let d = |r: &Value| (offered(r) - deliveries_per_sec / 2.0).abs();
                    d(a).total_cmp(&d(b))
                });
            Peak {
                series: series_name,
                target,
                deliveries_per_sec,
                half_peak_deliveries_per_sec: half.map(|r| offered(r)),
                half_peak_p99_us: half.and_then(|r| r["latency"]["p99_us"].as_u64()),
            }
        })
        .collect()
}

fn peaks_table(peaks: &[Peak]) -> String {
    let mut t = String::from(
        "| series | target | peak sustained deliveries/s | tern ÷ this | run nearest half peak (deliveries/s) | its p99 ms |\n\
         |---|---|---|---|---|---|\n",
    );
    for p in peaks {
        let tern = peaks
            .iter()
            .find(|q| q.series == p.series && q.target == "tern")
            .map(|q| q.deliveries_per_sec);
        let ratio = tern
            .filter(|_| p.deliveries_per_sec > 0.0)
            .map_or("-".to_owned(), |t| {
                format!("{:.2}", t / p.deliveries_per_sec)
            });
        t += &format!(
            "| {} | {} | {:.0} | {} | {} | {} |\n",
            p.series,
            p.target,
            p.deliveries_per_sec,
            ratio,
            p.half_peak_deliveries_per_sec
                .map_or("-".to_owned(), |d| format!("{d:.0}")),
            p.half_peak_p99_us
                .map_or("-".to_owned(), |us| ms(&Value::from(us))),
        );
    }
    t
}

pub(crate) fn read_reports(dir: &Path) -> anyhow::Result<Vec<Value>> {
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

/// CPU microseconds per unit of work: cores used ÷ units per second.
fn per_unit_us(cores: &Value, per_sec: &Value) -> String {
    match (cores.as_f64(), per_sec.as_f64()) {
        (Some(c), Some(n)) if n > 0.0 => format!("{:.1}", c * 1e6 / n),
        _ => "-".to_owned(),
    }
}

fn num(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map_or("-".to_owned(), |n| format!("{n:.decimals$}"))
}

fn fanout_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | target | pubs → ch × subs | msg/s | deliveries/s | lost / expected | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | ack p50 / p99 ms | cores: server / bench / machine | server µs per delivery | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
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
            "| {} | {} | {} → {} × {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
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
            per_unit_us(&r["server_cpu_cores"], &r["deliveries_per_sec"]),
            errors,
        );
    }
    t
}

fn connect_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | target | connections × processes | offered/s | ok | errors | connected/s | limit | connect p50 / p99 / max ms | server cores in storm | server µs per connection | server RSS before → held (MiB) | KiB per connection |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |b| format!("{:.1}", b / 1048576.0))
    };
    for r in reports {
        let l = &r["latency"];
        t += &format!(
            "| {} | {} | {} × {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} → {} | {} |\n",
            r["label"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
            r["args"]["connections"],
            r["args"]["processes"].as_u64().unwrap_or(1),
            r["args"]["rate"],
            r["successes"],
            r["errors"],
            num(&r["connected_per_sec"], 0),
            r["limit"].as_str().unwrap_or("-"),
            ms(&l["p50_us"]),
            ms(&l["p99_us"]),
            ms(&l["max_us"]),
            num(&r["server_cpu_cores_storm"], 2),
            per_unit_us(&r["server_cpu_cores_storm"], &r["connected_per_sec"]),
            mib(&r["rss_before_bytes"]),
            mib(&r["rss_held_bytes"]),
            r["bytes_per_connection_held"]
                .as_f64()
                .map_or("-".to_owned(), |b| format!("{:.1}", b / 1024.0)),
        );
    }
    t
}

fn idle_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | process | threads | wake-ups/s | preemptions/s | CPU ms/s | RSS MiB |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        for p in r["processes"].as_array().into_iter().flatten() {
            t += &format!(
                "| {} ({} s) | {} | {} | {} | {} | {} | {} |\n",
                r["label"].as_str().unwrap_or(""),
                r["secs"],
                p["name"].as_str().unwrap_or(""),
                p["threads"],
                num(&p["wakeups_per_sec"], 1),
                num(&p["preemptions_per_sec"], 1),
                num(&p["cpu_ms_per_sec"], 2),
                p["rss_end_bytes"]
                    .as_f64()
                    .map_or("-".to_owned(), |b| format!("{:.1}", b / 1048576.0)),
            );
        }
    }
    t
}

fn regions_table(reports: &[&Value]) -> String {
    let mut t = String::from(
        "| scenario | from → to | delivered / lost | p50 ms | p99 ms | max ms | link delay ms | overhead p50 / p99 ms |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        for p in r["pairs"].as_array().into_iter().flatten() {
            let l = &p["latency"];
            let delay = match (p["delay_ms"].as_f64(), p["delay_applied"].as_bool()) {
                (Some(d), Some(false)) => format!("{d:.0} (not applied)"),
                (Some(d), _) => format!("{d:.0}"),
                (None, _) => "-".to_owned(),
            };
            t += &format!(
                "| {} | {} → {} | {} / {} | {} | {} | {} | {} | {} / {} |\n",
                r["label"].as_str().unwrap_or(""),
                p["from"].as_str().unwrap_or(""),
                p["to"].as_str().unwrap_or(""),
                p["delivered"],
                p["lost"],
                ms(&l["p50_us"]),
                ms(&l["p99_us"]),
                ms(&l["max_us"]),
                delay,
                num(&p["overhead_p50_ms"], 2),
                num(&p["overhead_p99_ms"], 2),
            );
        }
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

    fn fanout(
        label: &str,
        target: &str,
        rate: u64,
        delivered: f64,
        p99_us: u64,
        lost: u64,
    ) -> Value {
        serde_json::json!({
            "kind": "fanout", "label": label, "target": target,
            "args": {"rate": rate, "subscribers_per_channel": 1000},
            "deliveries_per_sec": delivered, "lost_deliveries": lost,
            "protocol_errors": 0, "socket_errors": 0,
            "latency": {"p99_us": p99_us}
        })
    }

    /// The peak is the best sustained run; overloaded or lossy runs do not count, and
    /// the half-peak point is the run offered nearest half of it.
    #[test]
    fn peaks_per_series_and_target() {
        let runs = [
            fanout("1x1000@250", "tern", 250, 250_000.0, 900, 0),
            fanout("1x1000@500", "tern", 500, 500_000.0, 2_000, 0),
            fanout("1x1000@1000", "tern", 1000, 990_000.0, 400_000, 0),
            fanout("1x1000@250", "nats", 250, 250_000.0, 800, 0),
            fanout("1x1000@500", "nats", 500, 499_000.0, 3_000, 7),
            fanout("other@1", "tern", 1, 1.0, 1, 0),
        ];
        let refs: Vec<&Value> = runs.iter().collect();
        let p = peaks(&refs);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].target.as_str(), p[0].deliveries_per_sec),
            ("tern", 500_000.0)
        );
        assert_eq!(p[0].half_peak_p99_us, Some(900));
        assert_eq!(
            (p[1].target.as_str(), p[1].deliveries_per_sec),
            ("nats", 250_000.0)
        );
        let table = peaks_table(&p);
        assert!(
            table.contains("| 1x1000 | nats | 250000 | 2.00 |"),
            "{table}"
        );
    }

    /// Tern's loss fails a run; a peer's loss and a ceiling probe's errors only warn.
    #[test]
    fn check_fails_only_on_tern_function() {
        let ok = fanout("a@1", "tern-msgpack", 1, 1.0, 1, 0);
        let peer_loss = fanout("a@1", "sockudo", 1, 1.0, 1, 3);
        let probe = serde_json::json!({"kind": "connect", "label": "ceiling-40k", "target": "tern", "errors": 9});
        assert_eq!(
            check_reports(&[ok.clone(), peer_loss, probe])
                .failures
                .len(),
            0
        );
        let loss = fanout("a@1", "tern", 1, 1.0, 1, 1);
        let connect = serde_json::json!({"kind": "connect", "label": "idle-1k", "target": "tern", "errors": 1, "first_error": "boom"});
        let resume = serde_json::json!({"kind": "resume", "label": "r", "all_ok": false});
        let f = check_reports(&[ok, loss, connect, resume]);
        assert_eq!(f.failures.len(), 3, "{f:?}");
        assert!(f.failures[1].contains("first: boom"), "{f:?}");
    }

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
            "| s1 | tern | 1 → 1 × 100 | 1000 | 100000 | 0 / 10 | 1.23 | 2.00 | 15 | 20 | 30 | - | 0.50 / 0.25 / 0.80 | 5.0 | 1 |"
        );
    }
}
