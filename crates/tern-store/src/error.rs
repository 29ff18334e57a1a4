//! Store errors.

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database file or engine failed (I/O, corruption, a redb error).
    #[error("history database error: {0}")]
    Database(String),
    /// The writer queue is full: the caller should shed load.
    #[error("history writer queue is full")]
    Overloaded,
    /// The writer thread is gone (the store is shutting down).
    #[error("history store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn db(err: impl std::fmt::Display) -> Self {
        StoreError::Database(err.to_string())
    }
}
