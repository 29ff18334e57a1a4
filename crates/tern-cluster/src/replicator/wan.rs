//! The emulated WAN's timer (local multi-region runs only; production never waits here).

use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::lock;

/// Waits for an emulated frame's due time. tokio's timer has millisecond granularity
/// and rounds up, which would add up to a millisecond to every emulated link; so it
/// sleeps on tokio to within two milliseconds and leaves the rest to [`PreciseTimer`]
/// (an OS thread whose timed waits are good to tens of microseconds), instead of
/// spinning a runtime worker. Only emulated links (`emulate_topology`) ever wait here.
pub(super) async fn wait_until(at: Instant) {
    let now = Instant::now();
    if at <= now {
        return;
    }
    let coarse = at - now;
    if coarse > Duration::from_millis(2) {
        tokio::time::sleep(coarse - Duration::from_millis(2)).await;
    }
    if Instant::now() >= at {
        return;
    }
    let (tx, rx) = oneshot::channel();
    PreciseTimer::get().wake_at(at, tx);
    let _ = rx.await;
}

/// One thread that fires oneshots at their deadlines with OS timer precision.
struct PreciseTimer {
    due: Mutex<std::collections::BTreeMap<(Instant, u64), oneshot::Sender<()>>>,
    next_id: std::sync::atomic::AtomicU64,
    thread: std::thread::Thread,
}

impl PreciseTimer {
    fn get() -> &'static PreciseTimer {
        static TIMER: OnceLock<PreciseTimer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let thread = std::thread::Builder::new()
                .name("tern-wan-emulation".into())
                .spawn(|| loop {
                    let timer = PreciseTimer::get();
                    let now = Instant::now();
                    let next = {
                        let mut due = lock(&timer.due);
                        while let Some(entry) = due.first_entry() {
                            if entry.key().0 > now {
                                break;
                            }
                            let _ = entry.remove().send(());
                        }
                        due.keys().next().map(|(at, _)| *at)
                    };
                    match next {
                        Some(at) => std::thread::park_timeout(at.saturating_duration_since(now)),
                        None => std::thread::park(),
                    }
                })
                .expect("spawning the WAN emulation timer thread")
                .thread()
                .clone();
            PreciseTimer {
                due: Mutex::new(std::collections::BTreeMap::new()),
                next_id: std::sync::atomic::AtomicU64::new(0),
                thread,
            }
        })
    }

    fn wake_at(&self, at: Instant, then: oneshot::Sender<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.due).insert((at, id), then);
        self.thread.unpark();
    }
}
