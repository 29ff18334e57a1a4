//! Payloads that carry their own scheduled send time, so a subscriber in the same process
//! can compute publish→deliver latency without any side channel.
//!
//! Layout: 20 decimal digits of nanoseconds since the run's [`Clock`] epoch, one phase byte
//! (`m` measured, `w` warm-up), then `x` padding up to the payload size. Only ASCII digits
//! and letters, so the payload is a valid JSON string body and NATS payload as is.

use std::time::{Duration, Instant};

/// Bytes taken by the time stamp and the phase byte; the smallest payload we can send.
pub(crate) const STAMP_BYTES: usize = 21;

/// A monotonic clock shared by every task of one run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn start() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the epoch.
    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant that is `ns` nanoseconds after the epoch.
    pub(crate) fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// Which part of a run a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Sent during warm-up: delivered but not counted.
    Warmup,
    /// Sent inside the measured window: counted for loss and latency.
    Measured,
}

/// Builds a payload of exactly `size` bytes (at least [`STAMP_BYTES`]).
pub(crate) fn encode(scheduled_ns: u64, phase: Phase, size: usize) -> String {
    debug_assert!(size >= STAMP_BYTES);
    let mut payload = String::with_capacity(size.max(STAMP_BYTES));
    payload.push_str(&format!("{scheduled_ns:020}"));
    payload.push(match phase {
        Phase::Warmup => 'w',
        Phase::Measured => 'm',
    });
    while payload.len() < size {
        payload.push('x');
    }
    debug_assert_eq!(payload.len(), size.max(STAMP_BYTES));
    payload
}

/// Reads the scheduled time and phase back; `None` if the payload is not one of ours.
pub(crate) fn decode(payload: &[u8]) -> Option<(u64, Phase)> {
    let digits = payload.get(..20)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let scheduled_ns = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let phase = match payload.get(20)? {
        b'm' => Phase::Measured,
        b'w' => Phase::Warmup,
        _ => return None,
    };
    Some((scheduled_ns, phase))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stamp survives the round trip at every size, and the size is exact.
    #[test]
    fn round_trip() {
        for size in [STAMP_BYTES, 22, 100, 1000] {
            for (ns, phase) in [(0, Phase::Warmup), (123_456_789_012, Phase::Measured)] {
                let payload = encode(ns, phase, size);
                assert_eq!(payload.len(), size);
                assert_eq!(decode(payload.as_bytes()), Some((ns, phase)));
            }
        }
    }

    /// Foreign or truncated payloads are rejected, never misread.
    #[test]
    fn rejects_foreign() {
        for bad in [
            &b""[..],
            b"hello",
            b"0000000000000000000",
            b"00000000000000000001z",
        ] {
            assert_eq!(decode(bad), None);
        }
    }
}
