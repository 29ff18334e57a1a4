//! The standard Prometheus process metrics (`process_*`), read from `/proc/self` at each
//! scrape and written as exposition text with the node's labels. The whole process's:
//! under `tern dev` every region reports the same process.
//!
//! Parsing is split from reading so it can be tested on fixed text.

use std::fmt::Write;

/// What one scrape read of the process.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` off Linux or when /proc is not mounted.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let (cpu_ticks, start_ticks) = parse_stat(&stat)?;
        Some(ProcessStats {
            cpu_seconds: cpu_ticks as f64 / ticks,
            resident_bytes: status_kib(&status, "VmRSS:")? * 1024,
            virtual_bytes: status_kib(&status, "VmSize:")? * 1024,
            start_time_seconds: boot_time(&boot)? as f64 + start_ticks as f64 / ticks,
            open_fds,
            max_fds: max_open_files(&limits),
        })
    }

    /// The exposition text, every series with `labels` (`node="…",region="…"`).
    pub fn render(&self, labels: &str) -> String {
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n"
            );
        };
        series(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds",
            self.cpu_seconds,
        );
        series(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes",
            self.resident_bytes as f64,
        );
        series(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes",
            self.virtual_bytes as f64,
        );
        series(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds",
            self.start_time_seconds,
        );
        series(
            "process_open_fds",
            "gauge",
            "Open file descriptors",
            self.open_fds as f64,
        );
        if let Some(max) = self.max_fds {
            series(
                "process_max_fds",
                "gauge",
                "Limit on open file descriptors",
                max as f64,
            );
        }
        out
    }
}

/// (utime + stime, starttime) in clock ticks from `/proc/self/stat`. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_text() {
        let stat = "4242 (tern (dev) x) S 1 4242 4242 0 -1 4194560 1869 0 0 0 250 50 0 0 20 0 9 0 123456 1000 200 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((300, 123456)));
        let status = "Name:\ttern\nVmSize:\t  123456 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(2048));
        assert_eq!(status_kib(status, "VmSize:"), Some(123456));
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(parse_stat("garbage"), None);
    }

    /// This process reads as itself: some CPU, some memory, a start time in the past.
    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().expect("/proc is mounted on Linux");
        assert!(stats.resident_bytes > 0 && stats.virtual_bytes >= stats.resident_bytes);
        assert!(stats.open_fds > 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(stats.start_time_seconds > 1.0e9 && stats.start_time_seconds <= now + 1.0);
        let text = stats.render(r#"node="n",region="r""#);
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total{node=\"n\",region=\"r\"} "));
    }
}
