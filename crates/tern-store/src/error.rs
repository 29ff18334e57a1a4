//! Why a store operation failed.

/// Errors of the history store. `Clone` because one commit's outcome is handed to every
/// append callback in the batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The operating system failed a file operation: creating the directory, reading or
    /// writing the database file (a full disk, a file size limit), or starting the
    /// writer thread. After a failed write the database file is reopened.
    #[error("history store I/O error: {0}")]
    Io(String),
    /// The database engine refused or failed an operation that is not plain I/O: the
    /// file is open in another process, needs a format upgrade, or a value is too large.
    #[error("history database error: {0}")]
    Database(String),
    /// Stored bytes do not decode: the file is damaged or holds keys this crate did not
    /// write. Reported, never panicked on.
    #[error("history store is corrupt: {0}")]
    Corrupt(String),
    /// The writer queue holds `queue_max` pending appends already. The append was not
    /// queued and its callback will not fire: shed load (NACK) and let the caller retry.
    #[error("history writer queue is full")]
    Overloaded,
    /// The writer thread has stopped, so nothing more can be appended.
    #[error("history store is closed")]
    Closed,
    /// An app or channel name is longer than [`crate::NAME_BYTES_MAX`] bytes, the most a
    /// key can hold. Nothing was queued and the callback will not fire.
    #[error("history name is {bytes} bytes, more than the {max} a key can hold", max = crate::NAME_BYTES_MAX)]
    NameTooLong {
        /// Length of the offending name.
        bytes: usize,
    },
}

impl From<redb::Error> for StoreError {
    fn from(err: redb::Error) -> Self {
        match err {
            redb::Error::Corrupted(what) => StoreError::Corrupt(what),
            redb::Error::Io(io) => StoreError::Io(io.to_string()),
            // Both follow a failed write: the file must be reopened (`redb_store` does).
            err @ (redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
                StoreError::Io(err.to_string())
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}

/// Converts any redb error (they all fold into `redb::Error`) into a [`StoreError`].
pub(crate) fn from_redb(err: impl Into<redb::Error>) -> StoreError {
    StoreError::from(err.into())
}
