//! What /proc says about a process: resident memory and CPU time. Both the server's (by
//! pid) and our own, because on a small machine the load generator competes with the
//! server for the same cores and the report has to say how much each took.

use anyhow::Context;

/// Clock ticks per second in /proc/PID/stat (USER_HZ, 100 on every Linux ABI we run on).
const TICKS_PER_SEC: f64 = 100.0;

/// Resident set size in bytes, from /proc/PID/status.
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Context switches of every thread of a process so far, from
/// /proc/PID/task/*/status (the process-level status counts only the main thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Switches {
    /// The thread blocked (waited for I/O, a timer, a lock): each is a later wake-up.
    pub voluntary: u64,
    /// The thread was preempted.
    pub involuntary: u64,
    pub threads: u64,
}

pub(crate) fn switches(pid: u32) -> anyhow::Result<Switches> {
    let dir = format!("/proc/{pid}/task");
    let mut total = Switches::default();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = entry?.path().join("status");
        // A thread may exit between listing and reading: skip it.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (voluntary, involuntary) = parse_switches(&status)
            .with_context(|| format!("no ctxt_switches in {}", path.display()))?;
        total.voluntary += voluntary;
        total.involuntary += involuntary;
        total.threads += 1;
    }
    Ok(total)
}

fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// SYNs the kernel dropped because a listen queue was full, so far, for this network
/// namespace (TcpExt ListenOverflows in /proc/net/netstat). A dropped SYN costs its
/// client a retransmit one second later.
pub(crate) fn listen_overflows() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
    parse_netstat(&text, "TcpExt", "ListenOverflows").context("no TcpExt ListenOverflows")
}

fn parse_netstat(text: &str, group: &str, field: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// User plus system CPU seconds used so far, from /proc/PID/stat.
pub(crate) fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / TICKS_PER_SEC)
        .with_context(|| format!("unexpected format of {path}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds the whole machine spent busy (every state but idle and iowait) so far,
/// from /proc/stat. Compared with the server's and our own, it shows other load.
pub(crate) fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_busy_ticks(&stat)
        .map(|ticks| ticks as f64 / TICKS_PER_SEC)
        .context("unexpected format of /proc/stat")
}

fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let total: u64 = ticks.iter().take(8).sum();
    Some(total - ticks.get(3)? - ticks.get(4)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VmRSS is read in kB from /proc status text, and its absence is reported.
    #[test]
    fn vm_rss() {
        let status = "Name:\ttern\nVmPeak:\t  9 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\ttern\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    /// utime + stime are found even when the command name has spaces and parentheses.
    #[test]
    fn cpu_ticks() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert!(cpu_secs(std::process::id()).is_ok());
    }

    /// Netstat counters are found by name in the header line of their group.
    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 42 43\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(text, "TcpExt", "ListenOverflows"), Some(42));
        assert_eq!(parse_netstat(text, "TcpExt", "Nope"), None);
        assert_eq!(parse_netstat("", "TcpExt", "ListenOverflows"), None);
        assert!(listen_overflows().is_ok());
    }

    /// Context switches are summed over threads from their status files.
    #[test]
    fn context_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), Some((120, 7)));
        assert_eq!(parse_switches("Name:\tx\n"), None);
        let own = switches(std::process::id()).unwrap();
        assert!(own.threads >= 1);
    }

    /// Machine busy time excludes idle and iowait, and guest time is not counted twice.
    #[test]
    fn busy_ticks() {
        let stat = "cpu  100 1 20 500 7 0 2 3 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_busy_ticks(stat), Some(126));
        assert_eq!(parse_busy_ticks("intr 1 2"), None);
        assert!(machine_busy_secs().is_ok());
    }
}
