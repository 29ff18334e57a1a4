//! The one writer thread: a bounded queue of appends, group commit, callbacks in
//! append order.
//!
//! Architecture invariant: appends commit in the order they were queued, and an
//! append's callback fires only after it and everything queued before it committed.
//! One thread and one FIFO queue give this without any further bookkeeping.
//!
//! Every commit's outcome goes to [`WriteHealth`] before its callbacks run. During a
//! run of failed commits, when nothing is queued, the thread probes the engine with an
//! empty commit every [`PROBE_EVERY`], so a node that a load balancer took out of
//! rotation (no more publishes) still notices that space came back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use crate::backend::{Backend, Row};
use crate::error::StoreError;
use crate::health::WriteHealth;
use crate::AppendDone;

/// How often an idle writer retries the engine while commits fail.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// While appends keep coming (the next batch began within [`BUSY_GAP`] of the one
/// before), the writer sleeps this long between batches and takes what came meanwhile,
/// instead of parking on the queue: a parked writer is woken by each append, a futex
/// wake on the publisher's thread and a context switch here, per publish (about 12 % of
/// a node's CPU at 10,000 publishes/s, 10 × 10 fan-out). A commit waits at most this
/// much longer under load; an idle writer parks and wakes at once as before.
const LINGER: Duration = Duration::from_micros(500);
const BUSY_GAP: Duration = Duration::from_millis(2);
/// Empty lingers in a row after which the writer parks again.
const LINGERS_IDLE: u32 = 4;

/// The writer's queue holds these.
enum Request {
    Append {
        rows: Vec<Row>,
        done: AppendDone,
    },
    /// Answered once everything queued before it is committed.
    Flush(SyncSender<()>),
}

impl Request {
    fn rows(&self) -> usize {
        match self {
            Request::Append { rows, .. } => rows.len(),
            Request::Flush(_) => 0,
        }
    }
}

/// What to tell when a batch is committed.
enum Waiter {
    Done(AppendDone),
    Flush(SyncSender<()>),
}

/// Owns the writer thread. Dropping it closes the queue, lets the thread drain and
/// commit what is queued, and joins it.
pub(crate) struct Writer {
    /// `history_append` queue, `queue_max` requests deep. `None` only during drop.
    queue: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

/// Starts the writer thread over `backend`; it reports every commit to `health`.
pub(crate) fn spawn_writer(
    backend: Arc<dyn Backend>,
    health: Arc<WriteHealth>,
    queue_max: usize,
    batch_max: usize,
    thread_start: Option<crate::ThreadStart>,
) -> Result<Writer, StoreError> {
    let (queue, requests) = mpsc::sync_channel(queue_max.max(1));
    let batch_max = batch_max.max(1);
    let thread = std::thread::Builder::new()
        .name("tern-history-writer".into())
        .spawn(move || {
            if let Some(start) = thread_start {
                start();
            }
            write_loop(backend.as_ref(), &health, &requests, batch_max)
        })
        .map_err(|err| StoreError::Io(format!("starting the history writer: {err}")))?;
    Ok(Writer {
        queue: Some(queue),
        thread_id: thread.thread().id(),
        thread: Some(thread),
    })
}

impl Writer {
    /// Queues an append without blocking; a full queue is `Overloaded` and `done` is
    /// dropped uncalled.
    pub(crate) fn append(&self, rows: Vec<Row>, done: AppendDone) -> Result<(), StoreError> {
        self.try_append(rows, done).map_err(|(error, _)| error)
    }

    /// Like [`Self::append`], but a refused append hands `done` back to the caller.
    pub(crate) fn try_append(
        &self,
        rows: Vec<Row>,
        done: AppendDone,
    ) -> Result<(), (StoreError, AppendDone)> {
        let Some(queue) = self.queue.as_ref() else {
            return Err((StoreError::Closed, done));
        };
        let unqueued = |request: Request| match request {
            Request::Append { done, .. } => done,
            Request::Flush(_) => unreachable!("an append was sent"),
        };
        match queue.try_send(Request::Append { rows, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(request)) => Err((StoreError::Overloaded, unqueued(request))),
            Err(TrySendError::Disconnected(request)) => {
                Err((StoreError::Closed, unqueued(request)))
            }
        }
    }

    /// Blocks until everything queued so far is committed. From the writer thread (a
    /// callback), it returns at once: waiting there would wait for itself.
    pub(crate) fn flush(&self) {
        if std::thread::current().id() == self.thread_id {
            return;
        }
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel(1);
        // Blocks while the queue is full: a flush is a wait, not a publish to shed.
        if queue.send(Request::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the loop once it has committed everything queued.
        self.queue.take();
        // A callback may drop the last handle on the writer thread itself; joining
        // there would deadlock, and the thread finishes on its own anyway.
        if std::thread::current().id() != self.thread_id {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn write_loop(
    backend: &dyn Backend,
    health: &WriteHealth,
    requests: &Receiver<Request>,
    batch_max: usize,
) {
    // Reused across batches; each holds at most batch_max requests (plus the rows of
    // one oversized append).
    let mut rows: Vec<Row> = Vec::new();
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut pace = Pace::default();
    while let Some(first) = pace.next(backend, health, requests) {
        let mut queued_rows = first.rows();
        take(first, &mut rows, &mut waiters);
        while queued_rows < batch_max && waiters.len() < batch_max {
            let Ok(request) = requests.try_recv() else {
                break;
            };
            queued_rows += request.rows();
            take(request, &mut rows, &mut waiters);
        }
        let result = if rows.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let result = commit(backend, &rows);
            metrics::histogram!("tern_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            health.committed(rows.len(), &result);
            result
        };
        rows.clear();
        // One oversized append must not pin its memory for the life of the store.
        rows.shrink_to(batch_max);
        for waiter in waiters.drain(..) {
            match waiter {
                Waiter::Done(done) => {
                    let result = result.clone();
                    // A panicking callback must not stop persistence for everyone.
                    let _ = catch_unwind(AssertUnwindSafe(move || done(result)));
                }
                Waiter::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

/// How the writer waits for its next batch: parked on the queue when appends are
/// sparse, sleeping [`LINGER`] between batches while they are frequent.
#[derive(Default)]
struct Pace {
    /// When the previous batch began.
    last_batch: Option<std::time::Instant>,
    busy: bool,
}

impl Pace {
    /// The first request of the next batch; `None` once the queue is closed and
    /// drained.
    fn next(
        &mut self,
        backend: &dyn Backend,
        health: &WriteHealth,
        requests: &Receiver<Request>,
    ) -> Option<Request> {
        if self.busy && health.failing().is_none() {
            for _ in 0..LINGERS_IDLE {
                std::thread::sleep(LINGER);
                match requests.try_recv() {
                    Ok(request) => return Some(self.began(request)),
                    Err(mpsc::TryRecvError::Disconnected) => return None,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
            }
        }
        let request = next_request(backend, health, requests)?;
        Some(self.began(request))
    }

    fn began(&mut self, request: Request) -> Request {
        let now = std::time::Instant::now();
        self.busy = self
            .last_batch
            .is_some_and(|last| now.duration_since(last) < BUSY_GAP);
        self.last_batch = Some(now);
        request
    }
}

/// The next request; `None` once the queue is closed and drained. During a run of
/// failed commits, an idle wait is cut into [`PROBE_EVERY`] slices, each ended by a
/// probe commit (which also lets the run end while nothing is published).
fn next_request(
    backend: &dyn Backend,
    health: &WriteHealth,
    requests: &Receiver<Request>,
) -> Option<Request> {
    loop {
        if health.failing().is_none() {
            return requests.recv().ok();
        }
        match requests.recv_timeout(PROBE_EVERY) {
            Ok(request) => return Some(request),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {
                health.committed(0, &commit(backend, &[]));
                health.settle();
            }
        }
    }
}

/// One commit; a panicking engine is a failed commit, not a dead writer (which would
/// leave every later callback unfired).
fn commit(backend: &dyn Backend, rows: &[Row]) -> Result<(), StoreError> {
    catch_unwind(AssertUnwindSafe(|| backend.commit(rows)))
        .unwrap_or_else(|_| Err(StoreError::Database("the history engine panicked".into())))
}

fn take(request: Request, rows: &mut Vec<Row>, waiters: &mut Vec<Waiter>) {
    match request {
        Request::Append {
            rows: mut new_rows,
            done,
        } => {
            rows.append(&mut new_rows);
            waiters.push(Waiter::Done(done));
        }
        Request::Flush(ack) => waiters.push(Waiter::Flush(ack)),
    }
}
