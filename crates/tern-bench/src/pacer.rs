//! Precise wake-ups for open-loop publishers.
//!
//! Tokio's timer has a resolution of one millisecond, so a publisher that sleeps until a
//! message is due wakes up to ~1 ms late, and that lateness would be counted as server
//! latency (latency runs from the scheduled time). A pacer is one OS thread that walks
//! the whole schedule in order, sleeps with the kernel's high-resolution timer
//! (`std::thread::sleep`, tens of microseconds late), and nudges the publisher that owns
//! each message through a capacity-1 queue. A nudge that finds the queue full is dropped:
//! that publisher is awake already and sends everything due when it runs.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::stamp::Clock;

/// The pacer sleeps until this long before a message is due and spins the rest: a
/// kernel sleep overshoots by tens of microseconds, and nudging early would send early.
const SLEEP_NS_MIN: u64 = 20_000;

/// Receives nudges from the pacer.
pub(crate) struct Nudges {
    rx: mpsc::Receiver<()>,
    /// The pacer is gone: only the tokio timer is left.
    closed: bool,
}

impl Nudges {
    /// Waits until `due_ns`: woken by the pacer, or by the tokio timer a little after
    /// `due_ns` as a fallback (the pacer is gone or starved of CPU). A stale nudge, left
    /// from a message already sent, only makes it look at the clock again.
    pub(crate) async fn wait_until(&mut self, clock: &Clock, due_ns: u64) {
        while clock.now_ns() < due_ns {
            let fallback = clock.instant_at(due_ns) + Duration::from_millis(2);
            if self.closed {
                tokio::time::sleep_until(clock.instant_at(due_ns).into()).await;
                continue;
            }
            tokio::select! {
                // A nudge: cancellation safe.
                nudge = self.rx.recv() => self.closed = nudge.is_none(),
                // The fallback: cancellation safe.
                _ = tokio::time::sleep_until(fallback.into()) => return,
            }
        }
    }
}

/// Starts a pacer thread for `owners` publishers. `due` yields (due ns on `clock`, owner
/// index) in time order; the thread ends when it is exhausted or every [`Nudges`] is
/// dropped.
pub(crate) fn spawn(
    clock: Clock,
    owners: usize,
    due: impl Iterator<Item = (u64, usize)> + Send + 'static,
) -> Vec<Nudges> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..owners).map(|_| mpsc::channel(1)).unzip();
    std::thread::Builder::new()
        .name("tern-bench-pacer".into())
        .spawn(move || {
            for (due_ns, owner) in due {
                let now_ns = clock.now_ns();
                if due_ns > now_ns + SLEEP_NS_MIN {
                    std::thread::sleep(Duration::from_nanos(due_ns - now_ns - SLEEP_NS_MIN));
                }
                // The last few microseconds: a sleep may overshoot them, so spin.
                while clock.now_ns() < due_ns {
                    std::hint::spin_loop();
                }
                let Some(sender) = senders.get(owner) else {
                    continue;
                };
                if let Err(mpsc::error::TrySendError::Closed(())) = sender.try_send(()) {
                    if senders.iter().all(|s| s.is_closed()) {
                        return;
                    }
                }
            }
        })
        .expect("spawning the pacer thread");
    receivers
        .into_iter()
        .map(|rx| Nudges { rx, closed: false })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each owner is nudged for its own messages, no earlier than they are due.
    #[tokio::test]
    async fn nudges_owners_on_time() {
        let clock = Clock::start();
        let start = clock.now_ns() + 5_000_000;
        let schedule = (0..6u64).map(move |g| (start + g * 2_000_000, (g % 2) as usize));
        let mut nudges = spawn(clock, 2, schedule);
        for g in 0..6u64 {
            let due_ns = start + g * 2_000_000;
            nudges[(g % 2) as usize].wait_until(&clock, due_ns).await;
            assert!(clock.now_ns() >= due_ns);
        }
    }
}
