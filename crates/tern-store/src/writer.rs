//! The one writer thread: a bounded queue of appends, group commit, callbacks in
//! append order.
//!
//! Architecture invariant: appends commit in the order they were queued, and an
//! append's callback fires only after it and everything queued before it committed.
//! One thread and one FIFO queue give this without any further bookkeeping.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};

use crate::backend::{Backend, Row};
use crate::error::StoreError;
use crate::AppendDone;

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

/// Starts the writer thread over `backend`.
pub(crate) fn spawn_writer(
    backend: Arc<dyn Backend>,
    queue_max: usize,
    batch_max: usize,
) -> Result<Writer, StoreError> {
    let (queue, requests) = mpsc::sync_channel(queue_max.max(1));
    let batch_max = batch_max.max(1);
    let thread = std::thread::Builder::new()
        .name("tern-history-writer".into())
        .spawn(move || write_loop(backend.as_ref(), &requests, batch_max))
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
        let queue = self.queue.as_ref().ok_or(StoreError::Closed)?;
        match queue.try_send(Request::Append { rows, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StoreError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
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

fn write_loop(backend: &dyn Backend, requests: &Receiver<Request>, batch_max: usize) {
    // Reused across batches; each holds at most batch_max requests (plus the rows of
    // one oversized append).
    let mut rows: Vec<Row> = Vec::new();
    let mut waiters: Vec<Waiter> = Vec::new();
    while let Ok(first) = requests.recv() {
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
            backend.commit(&rows)
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
