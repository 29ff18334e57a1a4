//! Tern store: message and presence history behind a small trait. Payloads are opaque
//! bytes (the edge stores msgpack); the store knows channels, positions and time, not
//! the wire format or connections.
//!
//! # Layout
//! - [`item`]: [`ChannelRef`], [`StoredItem`], [`Position`] and the key encoding that
//!   makes a range scan return one channel's items in position order.
//! - [`query`]: [`HistoryQuery`], [`HistoryPage`], [`Direction`].
//! - `backend`: the two key-value backends, redb (a file) and memory (a `BTreeMap`).
//! - `writer`: the one writer thread: bounded queue, group commit, ordered callbacks.
//! - [`retention`]: [`RetentionRule`] and which rule applies to a channel.
//! - [`error`]: [`StoreError`], why an operation failed.
//!
//! Architecture invariant: appends complete in the order they were queued; an append's
//! callback fires only after it and everything before it is committed (for redb, with
//! `Durability::Immediate`: on disk).

mod backend;
pub mod error;
pub mod item;
pub mod query;
pub mod retention;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::StoreError;
pub use item::{ChannelRef, EventKind, Position, StoredItem};
pub use query::{Direction, HistoryPage, HistoryQuery};
pub use retention::RetentionRule;

/// Called once when an append is durable (or failed). Runs on the writer thread: keep
/// it short and never block.
pub type AppendDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// History persistence.
pub trait HistoryStore: Send + Sync {
    /// Queues items for a group commit; `done` fires after they (and everything queued
    /// before) are committed, in append order. `items` may be empty: a barrier. A full
    /// queue returns `Err(Overloaded)` at once and `done` is not called.
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError>;
    /// Reads one page, scanning at most `scan_max` rows.
    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError>;
    /// Applies retention with the wall clock passed in. Returns items deleted.
    fn trim(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Blocks until everything appended so far is committed.
    fn flush(&self);
}

/// Where and how history is kept.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// redb file; `None` keeps history in memory only.
    pub path: Option<PathBuf>,
    pub retention: Vec<RetentionRule>,
    /// Items per commit.
    pub batch_max: usize,
    /// Pending append calls before `append` refuses.
    pub queue_max: usize,
    /// Rows one query may scan.
    pub scan_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            retention: vec![RetentionRule {
                prefix: String::new(),
                max_count: 10_000,
                max_age_ms: 86_400_000,
            }],
            batch_max: 4_096,
            queue_max: 65_536,
            scan_max: 20_000,
        }
    }
}

/// Opens the store the config describes (creating the file and its directories).
pub fn open(config: &StoreConfig) -> Result<Arc<dyn HistoryStore>, StoreError> {
    let backend: Arc<dyn backend::Backend> = match &config.path {
        Some(path) => Arc::new(backend::RedbBackend::open(path)?),
        None => Arc::new(backend::MemoryBackend::default()),
    };
    Ok(Arc::new(writer::Store::start(backend, config.clone())))
}
