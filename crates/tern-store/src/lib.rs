//! Tern store: message and presence history behind a small trait, [`HistoryStore`].
//! Payloads are opaque bytes (the edge stores msgpack); the store knows apps, channels,
//! positions and time, not connections or the Ably wire format. History lives in a
//! redb file, or in memory when no path is configured; both run the same writer, so
//! ordering and callback semantics are identical.
//!
//! # Layout
//! - [`item`] — [`ChannelRef`], [`StoredItem`], [`Position`] (and its URL-safe text form),
//!   and the key layout that makes a range scan read one channel in position order.
//! - [`query`] — [`HistoryQuery`], [`HistoryPage`], [`Direction`], and the pager that
//!   turns a bounded scan into one page.
//! - [`retention`] — [`RetentionRule`], which rule applies to a channel, which rows go.
//! - `writer` — the one writer thread: bounded queue, group commit, callbacks in order,
//!   probes while commits fail.
//! - `health` — writes lost (refused or failed commits) and the current run of failed
//!   commits: what barriers and `/health` report.
//! - `store` — the [`HistoryStore`] implementation over either engine.
//! - `backend` — the trait both engines implement: `redb_store` (a file) and
//!   `memory_store` (a `BTreeMap` per channel behind a mutex).
//! - [`error`] — [`StoreError`].
//!
//! Architecture invariant: appends commit in the order they were queued; an append's
//! callback fires only after it and everything queued before it committed (for redb,
//! with `Durability::Immediate`: on disk, so an ACKed message survives `kill -9`).
//!
//! Architecture invariant: a barrier ([`HistoryStore::after_committed`]) succeeds only if
//! no write was lost (an append of items refused, a commit of items failed) since its
//! caller noted [`HistoryStore::lost_writes`], so an ACK is never sent for items that did
//! not reach the disk, whichever group commits carried them.
//!
//! Architecture invariant: every buffer is bounded: the append queue by `queue_max`,
//! a commit by `batch_max` rows (one append is never split), a query by `scan_max` rows
//! and 1000 items, a trim commit and a trim's channel list by `batch_max`.

mod backend;
pub mod error;
mod health;
pub mod item;
mod memory_store;
pub mod query;
mod redb_store;
pub mod retention;
mod store;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::StoreError;
pub use item::{ChannelRef, EventKind, Position, StoredItem, NAME_BYTES_MAX};
pub use query::{Direction, HistoryPage, HistoryQuery, LIMIT_MAX, LIMIT_MIN};
pub use retention::RetentionRule;

/// Called once when an append is durable (or failed). Runs on the writer thread: keep
/// it short and never block (calling [`HistoryStore::flush`] from it returns at once).
pub type AppendDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One page of [`HistoryStore::message_channels`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelPage {
    /// `(app, channel)` of the channels on the page with stored messages.
    pub channels: Vec<(String, String)>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<Vec<u8>>,
}

/// History persistence. Implementations are shared as `Arc<dyn HistoryStore>`.
pub trait HistoryStore: Send + Sync {
    /// Queues items for a group commit; `done` fires after they are committed, in
    /// append order across all calls (appends are FIFO and so are callbacks). `items`
    /// may be empty: `done` still fires in order, after everything queued before it
    /// (the edge uses this to keep ACK/NACK order). An item at a position already
    /// stored replaces it. If the writer queue is full this returns
    /// `Err(StoreError::Overloaded)` at once and `done` is not called; likewise for
    /// `NameTooLong` and `Closed`.
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError>;

    /// Reads one page. Scans at most `scan_max` rows so a sparse `until` filter cannot
    /// make a query unbounded; if the budget runs out, returns what was found with
    /// `next` set to the last scanned position. Sees only committed appends and never
    /// blocks the writer for long. Blocking: call it off any async runtime.
    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError>;

    /// Applies retention (call periodically with the wall clock passed in): per
    /// channel, deletes the oldest items beyond `max_count` and every item older than
    /// `now_ms - max_age_ms`. Returns items deleted. Blocking, in `batch_max`-row
    /// commits.
    fn trim(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Blocks until everything appended so far is committed (used at shutdown and in
    /// tests).
    fn flush(&self);

    /// The highest committed sequence per origin (`(origin, seq)`, by origin) of a
    /// channel, messages and presence together. It outlives retention: a node that
    /// dropped an idle channel from memory continues its sequences from here.
    /// Blocking (one read).
    fn cursor(&self, _app: &str, _channel: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(Vec::new())
    }

    /// The channels with stored messages, a page at a time in key order: looks at up
    /// to `max` of the store's channel rows after the token `after` (`None`: the first)
    /// and returns the `(app, channel)` of those that hold messages, with the token to
    /// go on from (`None` once the last row was seen). Blocking.
    fn message_channels(
        &self,
        _after: Option<&[u8]>,
        _max: usize,
    ) -> Result<ChannelPage, StoreError> {
        Ok(ChannelPage::default())
    }

    /// How many appends with items were refused since the store opened. A caller that
    /// sees it change across its own appends must not report them as stored.
    fn refused_appends(&self) -> u64 {
        0
    }

    /// Writes lost since the store opened: appends of items refused, and commits of
    /// items that failed. Note it before appending and pass it to
    /// [`Self::after_committed`]. Only grows.
    fn lost_writes(&self) -> u64;

    /// Runs `then` once everything appended so far is committed, in call order with
    /// other appends: `Ok` if no write was lost since [`Self::lost_writes`] returned
    /// `since`, else the latest loss. (The caller's items may have been committed in an
    /// earlier group commit than this barrier, even before it was queued; a failure of
    /// someone else's write may also fail it, which errs on the safe side.) If the writer
    /// refuses the barrier (queue full, closed), `then` gets that error at once: a
    /// refused barrier never reports success.
    fn after_committed(&self, since: u64, then: AppendDone);

    /// Why writes fail: the latest failed commit's error from a failed commit until
    /// commits (publishes, or a probe every second while idle) have succeeded for 3 s
    /// without a failure; `None` otherwise. The 3 s keep a nearly full disk, where some
    /// commits still succeed, from reading as healthy between failures.
    fn failing(&self) -> Option<StoreError>;

    /// Runs `f`; what it appends to this store (from this thread) is queued as one
    /// append, committed together or not at all: an event's history rows and its
    /// webhook outbox rows, so no function is ever sent an event whose own commit
    /// failed. Each part's `done` still fires, in order. Nested calls join the outer
    /// one. The default (an engine with no commits to share) just runs `f`.
    fn in_one_commit(&self, f: &mut dyn FnMut()) {
        f()
    }
}

/// Where and how history is kept. Zero capacities are raised to 1.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// redb file (parent directories are created); `None` = memory mode.
    pub path: Option<PathBuf>,
    /// Per channel-name prefix; default one rule, prefix "", 10,000 items, 24 h.
    pub retention: Vec<RetentionRule>,
    /// Items per commit, default 4096. Bigger batches mean fewer fsyncs; one append is
    /// never split. Also the rows per trim commit.
    pub batch_max: usize,
    /// Pending append calls before `append` refuses with `Overloaded`, default 65,536.
    pub queue_max: usize,
    /// Rows one query may scan, default 20,000.
    pub scan_max: usize,
}

impl StoreConfig {
    pub fn default_retention() -> Vec<RetentionRule> {
        vec![RetentionRule {
            prefix: String::new(),
            max_count: 10_000,
            max_age_ms: 24 * 60 * 60 * 1000,
        }]
    }
    pub const fn default_batch_max() -> usize {
        4096
    }
    pub const fn default_queue_max() -> usize {
        65_536
    }
    pub const fn default_scan_max() -> usize {
        20_000
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            retention: StoreConfig::default_retention(),
            batch_max: StoreConfig::default_batch_max(),
            queue_max: StoreConfig::default_queue_max(),
            scan_max: StoreConfig::default_scan_max(),
        }
    }
}

/// Opens the store the config describes: the redb file at `path` (created with its
/// parent directories if missing) or, without a path, memory. Starts the writer thread,
/// which stops after draining its queue when the last `Arc` is dropped.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn HistoryStore>, StoreError> {
    open_with(config, None)
}

/// Runs first on the store's writer thread: lets a process running several nodes point
/// the thread's `metrics` at its node's recorder (metrics recorded there, commit times
/// and what completion callbacks count, are that node's).
pub type ThreadStart = Arc<dyn Fn() + Send + Sync>;

/// [`open`], calling `thread_start` first on the writer thread.
pub fn open_with(
    config: &StoreConfig,
    thread_start: Option<ThreadStart>,
) -> Result<Arc<dyn HistoryStore>, StoreError> {
    let backend: Arc<dyn backend::Backend> = match &config.path {
        Some(path) => Arc::new(redb_store::RedbStore::open(path)?),
        None => Arc::new(memory_store::MemoryStore::default()),
    };
    Ok(Arc::new(store::Store::start(
        backend,
        config,
        thread_start,
    )?))
}
