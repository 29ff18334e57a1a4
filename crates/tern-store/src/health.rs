//! [`WriteHealth`]: whether writes reach the disk, shared by the writer thread (which
//! records every commit's outcome) and the store's callers (who ask it whether what they
//! appended could have been lost, and whether the node is healthy).
//!
//! Why a counter and not per-append outcomes: an edge acknowledges a publish with an
//! empty barrier append queued after the publish's items. The items and the barrier may
//! land in the same group commit or in different ones, and the items' commit may even
//! finish before the barrier is queued. So the caller notes [`WriteHealth::lost`] before
//! its items are appended, and the barrier reports failure if the count moved since:
//! every append of items that was refused, and every commit of items that failed, bumps
//! it before any later callback runs. That may fail a barrier for someone else's lost
//! write (the publish is then NACKed although stored: safe), never the other way round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::StoreError;

/// A run of failed commits ends (the node is healthy again, the run's summary logged)
/// once commits have succeeded for this long without a failure. A nearly full disk
/// fails commits between successes (redb reuses the pages a failed commit freed after it
/// reopens the file), and that must read as one run, not as a log line and a flip of
/// `/health` per commit.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(3);

/// Counts writes that did not reach the disk and tracks the current run of failed
/// commits. Logging is once per run: when it starts and when it ends.
#[derive(Default)]
pub(crate) struct WriteHealth {
    /// Appends of items refused plus commits of items that failed, since the store
    /// opened. Only grows.
    lost: AtomicU64,
    /// The latest loss, what a barrier that finds one reports.
    last_loss: Mutex<Option<StoreError>>,
    /// The run of failed commits in progress; `None` while commits succeed.
    run: Mutex<Option<FailedRun>>,
}

/// Failed commits (probes included), from the first until commits have succeeded for
/// [`HEALTHY_AFTER`].
struct FailedRun {
    /// The latest failed commit's error.
    error: StoreError,
    started: Instant,
    last_failure: Instant,
    /// Whether a commit succeeded since `last_failure`.
    succeeded_since: bool,
    /// Commits of items that failed in this run (probes not counted).
    commits: u64,
}

impl WriteHealth {
    /// Writes lost so far: note it before appending, pass it to a barrier.
    pub(crate) fn lost(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
    }

    /// `Ok` if no write was lost since [`Self::lost`] returned `since`; otherwise the
    /// latest loss.
    pub(crate) fn lost_since(&self, since: u64) -> Result<(), StoreError> {
        if self.lost() <= since {
            return Ok(());
        }
        Err(lock(&self.last_loss)
            .clone()
            .unwrap_or_else(|| StoreError::Io("an earlier write was lost".into())))
    }

    /// The latest failed commit's error while a run of failures lasts; `None` once
    /// commits have succeeded for [`HEALTHY_AFTER`].
    pub(crate) fn failing(&self) -> Option<StoreError> {
        lock(&self.run).as_ref().map(|run| run.error.clone())
    }

    /// An append of items was refused before it reached the queue.
    pub(crate) fn refused(&self, error: &StoreError) {
        self.lose(error);
    }

    /// Records the outcome of one commit (on the writer thread, before any of its
    /// callbacks run). `rows` is how many items it carried: 0 for a probe, whose
    /// failure keeps the node unhealthy but loses nothing.
    pub(crate) fn committed(&self, rows: usize, result: &Result<(), StoreError>) {
        match result {
            Ok(()) => {
                if let Some(run) = lock(&self.run).as_mut() {
                    run.succeeded_since = true;
                }
                self.settle();
            }
            Err(error) => {
                if rows > 0 {
                    self.lose(error);
                    metrics::counter!("tern_store_commit_failures_total").increment(1);
                }
                self.failed(rows > 0, error);
            }
        }
    }

    /// Ends the run of failures if commits have succeeded for [`HEALTHY_AFTER`] (called
    /// after each success and by an idle writer).
    pub(crate) fn settle(&self) {
        let mut run = lock(&self.run);
        let Some(ended) = run.as_ref() else {
            return;
        };
        if !ended.succeeded_since || ended.last_failure.elapsed() < HEALTHY_AFTER {
            return;
        }
        tracing::warn!(
            failed_commits = ended.commits,
            failing_ms = ended.last_failure.duration_since(ended.started).as_millis() as u64,
            last_error = %ended.error,
            "history commits succeed again"
        );
        *run = None;
    }

    fn lose(&self, error: &StoreError) {
        // The error first, so a barrier that sees the new count finds it.
        *lock(&self.last_loss) = Some(error.clone());
        self.lost.fetch_add(1, Ordering::SeqCst);
    }

    fn failed(&self, had_rows: bool, error: &StoreError) {
        let mut run = lock(&self.run);
        let now = Instant::now();
        match run.as_mut() {
            Some(run) => {
                run.error = error.clone();
                run.last_failure = now;
                run.succeeded_since = false;
                run.commits += u64::from(had_rows);
            }
            None => {
                tracing::error!(
                    %error,
                    "history commit failed: publishes are refused (NACK, HTTP 500) and \
                     /health answers 503 until commits succeed again"
                );
                *run = Some(FailedRun {
                    error: error.clone(),
                    started: now,
                    last_failure: now,
                    succeeded_since: false,
                    commits: u64::from(had_rows),
                });
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update above is a single assignment: a panic cannot leave it half-done.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
