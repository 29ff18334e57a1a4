//! Latency recording: an HdrHistogram in microseconds, and the summary we print and save.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The largest latency we can record; anything slower is clamped to it (and shows as max).
const LATENCY_US_MAX: u64 = 120_000_000;

/// Microsecond latencies with three significant figures.
pub(crate) struct Latency {
    histogram: Histogram<u64>,
}

impl Latency {
    pub(crate) fn new() -> Latency {
        let histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
            .expect("static histogram bounds are valid");
        Latency { histogram }
    }

    pub(crate) fn record_ns(&mut self, latency_ns: u64) {
        let latency_us = (latency_ns / 1_000).clamp(1, LATENCY_US_MAX);
        self.histogram.saturating_record(latency_us);
    }

    pub(crate) fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        self.histogram
            .add(&other.histogram)
            .expect("histograms share bounds");
    }

    /// Every recorded value in microseconds (at the histogram's precision), for handing
    /// a histogram to another process.
    pub(crate) fn values_us(&self) -> Vec<u64> {
        let mut values = Vec::with_capacity(self.histogram.len() as usize);
        for v in self.histogram.iter_recorded() {
            let us = self.histogram.highest_equivalent(v.value_iterated_to());
            values.extend(std::iter::repeat_n(us, v.count_at_value() as usize));
        }
        values
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let h = &self.histogram;
        let at = |q: f64| h.value_at_quantile(q);
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: h.max(),
        }
    }
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub(crate) struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return f.write_str("no samples");
        }
        write!(
            f,
            "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            Ms(self.p50_us),
            Ms(self.p90_us),
            Ms(self.p99_us),
            Ms(self.p999_us),
            Ms(self.max_us),
            self.count
        )
    }
}

/// Microseconds printed as milliseconds with enough digits to read sub-millisecond values.
struct Ms(u64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 as f64 / 1000.0;
        if ms < 10.0 {
            write!(f, "{ms:.2}ms")
        } else {
            write!(f, "{ms:.0}ms")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles come out in microseconds, merged histograms add up, and absurd values clamp.
    #[test]
    fn records_merges_and_clamps() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for ms in 1..=100u64 {
            a.record_ns(ms * 1_000_000);
        }
        b.record_ns(u64::MAX);
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 101);
        assert!((50_900..=51_100).contains(&s.p50_us), "{s:?}");
        assert!(s.max_us >= LATENCY_US_MAX && s.max_us <= LATENCY_US_MAX + LATENCY_US_MAX / 500);
        assert_eq!(Latency::new().summary().to_string(), "no samples");
    }
}
