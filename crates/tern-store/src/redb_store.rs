//! The redb engine: one file, ACID commits (`Durability::Immediate`: a commit returns
//! once it is on disk), MVCC readers that never block the writer.
//!
//! Three tables: `items` (key → payload, see [`crate::item`] for the key),
//! `channel_counts` (prefix → rows), kept in the same commits as `items` so count
//! retention knows how much to delete without counting, and trim can list channels, and
//! `channel_cursors` (channel → highest sequence per origin, also in the same commits).
//!
//! After a write fails with an I/O error (a full disk, a file size limit), redb fails
//! every later operation (`PreviousIo`) until the database is closed and opened again.
//! So the next operation, read or write, reopens the file first (redb recovers it to its
//! last commit), at most once a second.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    AccessGuard, Database, ReadTransaction, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};

use crate::backend::{cursor_updates, decode_cursor, merge_cursor, Backend, Row};
use crate::error::{from_redb, StoreError};
use crate::item::{key, position_of_key, Position};
use crate::query::Direction;
use crate::retention::TrimPlan;

const ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items_v1");
const COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("channel_counts_v1");
/// Channel (item prefix without the kind byte) → highest stored sequence per origin.
const CURSORS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("channel_cursors_v1");

pub(crate) struct RedbStore {
    path: PathBuf,
    /// The open file; `None` after a reopen failed (the next write tries again). Writes
    /// and reads share it; only a reopen takes it exclusively.
    db: RwLock<Option<Database>>,
    /// An operation failed with an I/O error: reopen before the next one.
    reopen: AtomicBool,
    /// When a reopen was last tried: at most one per [`REOPEN_EVERY`], since each may
    /// read the whole file (redb's recovery) and reads would otherwise retry it each.
    reopened: Mutex<Option<Instant>>,
}

/// Least time between attempts to reopen the file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

impl RedbStore {
    /// Opens (or creates) the file, creating its parent directories.
    pub(crate) fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Ok(RedbStore {
            path: path.to_path_buf(),
            db: RwLock::new(Some(open_database(path)?)),
            reopen: AtomicBool::new(false),
            reopened: Mutex::new(None),
        })
    }

    /// A read transaction on the open file. A reopen does not wait for it (it then fails
    /// if still in flight); one only happens after a failed operation.
    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        self.reopen_if_failed()?;
        let result = {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            let db = db.as_ref().ok_or_else(not_reopened)?;
            db.begin_read().map_err(from_redb)
        };
        self.note_failure(result)
    }

    /// Runs a write on the open file.
    fn write<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.reopen_if_failed()?;
        let result = {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            db.as_ref().ok_or_else(not_reopened).and_then(op)
        };
        self.note_failure(result)
    }

    /// After an I/O error redb fails everything until the file is reopened.
    fn note_failure<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Io(_)) = &result {
            self.reopen.store(true, Ordering::SeqCst);
        }
        result
    }

    fn reopen_if_failed(&self) -> Result<(), StoreError> {
        if !self.reopen.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.reopen.load(Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut reopened = self.reopened.lock().unwrap_or_else(|p| p.into_inner());
            if reopened.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
                return Err(StoreError::Io(
                    "the history file failed and is reopened at most once a second".into(),
                ));
            }
            *reopened = Some(Instant::now());
        }
        if let Some(old) = db.take() {
            // Its error is the I/O failure that latched; the file is left for the open
            // below to recover.
            let _ = old.close();
        }
        let opened = open_database(&self.path);
        // From the end of the attempt: a recovery that reads a big file for seconds
        // still leaves the writer time between attempts.
        *self.reopened.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *db = Some(opened?);
        self.reopen.store(false, Ordering::SeqCst);
        tracing::info!(path = %self.path.display(), "history file reopened after an I/O error");
        Ok(())
    }
}

fn not_reopened() -> StoreError {
    StoreError::Io("the history file could not be reopened after a failed write".into())
}

/// Opens (or creates) the file with every table, creating its parent directories.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| StoreError::Io(format!("creating {}: {err}", parent.display())))?;
    }
    let db = Database::create(path).map_err(from_redb)?;
    // Create the tables up front so readers never meet a missing table.
    let txn = db.begin_write().map_err(from_redb)?;
    txn.open_table(ITEMS).map_err(from_redb)?;
    txn.open_table(COUNTS).map_err(from_redb)?;
    txn.open_table(CURSORS).map_err(from_redb)?;
    txn.commit().map_err(from_redb)?;
    Ok(db)
}

impl Backend for RedbStore {
    fn commit(&self, rows: &[Row]) -> Result<(), StoreError> {
        self.write(|db| commit_rows(db, rows))
    }

    fn scan(
        &self,
        prefix: &[u8],
        low: Position,
        high: Position,
        direction: Direction,
        visit: &mut dyn FnMut(Position, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.begin_read()?;
        let items = txn.open_table(ITEMS).map_err(from_redb)?;
        let (low, high) = (key(prefix, low), key(prefix, high));
        let range = items
            .range(low.as_slice()..=high.as_slice())
            .map_err(from_redb)?;
        match direction {
            Direction::Forwards => visit_rows(range, prefix, visit),
            Direction::Backwards => visit_rows(range.rev(), prefix, visit),
        }
    }

    fn cursor(&self, channel: &[u8]) -> Result<BTreeMap<u64, u64>, StoreError> {
        let txn = self.begin_read()?;
        let cursors = txn.open_table(CURSORS).map_err(from_redb)?;
        let row = cursors.get(channel).map_err(from_redb)?;
        Ok(row.map(|v| decode_cursor(v.value())).unwrap_or_default())
    }

    fn channels(&self, after: Option<&[u8]>, max: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.begin_read()?;
        let counts = txn.open_table(COUNTS).map_err(from_redb)?;
        let lower = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut out = Vec::new();
        for entry in counts
            .range::<&[u8]>((lower, std::ops::Bound::Unbounded))
            .map_err(from_redb)?
            .take(max)
        {
            out.push(entry.map_err(from_redb)?.0.value().to_vec());
        }
        Ok(out)
    }

    fn trim(&self, prefix: &[u8], plan: TrimPlan, max_rows: usize) -> Result<u64, StoreError> {
        self.write(|db| trim_rows(db, prefix, plan, max_rows))
    }
}

/// Stores `rows` and their channels' counts and cursors in one transaction.
fn commit_rows(db: &Database, rows: &[Row]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(from_redb)?;
    {
        let mut items = txn.open_table(ITEMS).map_err(from_redb)?;
        let mut added: BTreeMap<&[u8], u64> = BTreeMap::new();
        let mut row_key = Vec::new();
        for row in rows {
            row_key.clear();
            row_key.extend_from_slice(&row.prefix);
            row_key.extend_from_slice(&row.position.to_bytes());
            let replaced = items
                .insert(row_key.as_slice(), row.payload.as_ref())
                .map_err(from_redb)?
                .is_some();
            if !replaced {
                *added.entry(&row.prefix).or_default() += 1;
            }
        }
        let mut counts = txn.open_table(COUNTS).map_err(from_redb)?;
        for (prefix, new_rows) in added {
            let old = counts.get(prefix).map_err(from_redb)?.map(|c| c.value());
            counts
                .insert(prefix, old.unwrap_or(0).saturating_add(new_rows))
                .map_err(from_redb)?;
        }
        let mut cursors = txn.open_table(CURSORS).map_err(from_redb)?;
        for (channel, update) in cursor_updates(rows) {
            let row = {
                let old = cursors.get(channel.as_ref()).map_err(from_redb)?;
                merge_cursor(old.as_ref().map(|v| v.value()), &update)
            };
            cursors
                .insert(channel.as_ref(), row.as_slice())
                .map_err(from_redb)?;
        }
    }
    txn.commit().map_err(from_redb)
}

/// Deletes up to `max_rows` of the oldest rows of `prefix` that `plan` dooms.
fn trim_rows(
    db: &Database,
    prefix: &[u8],
    plan: TrimPlan,
    max_rows: usize,
) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(from_redb)?;
    let deleted = {
        let mut items = txn.open_table(ITEMS).map_err(from_redb)?;
        let mut counts = txn.open_table(COUNTS).map_err(from_redb)?;
        let count = counts
            .get(prefix)
            .map_err(from_redb)?
            .map_or(0, |c| c.value());
        let doomed = doomed_keys(&items, prefix, plan, count, max_rows)?;
        for doomed_key in &doomed {
            items.remove(doomed_key.as_slice()).map_err(from_redb)?;
        }
        let left = count.saturating_sub(doomed.len() as u64);
        if left == 0 {
            counts.remove(prefix).map_err(from_redb)?;
        } else {
            counts.insert(prefix, left).map_err(from_redb)?;
        }
        doomed.len() as u64
    };
    txn.commit().map_err(from_redb)?;
    Ok(deleted)
}

/// The keys of up to `max_rows` oldest rows of `prefix` that `plan` dooms.
fn doomed_keys(
    items: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    plan: TrimPlan,
    count: u64,
    max_rows: usize,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let (low, high) = (key(prefix, Position::MIN), key(prefix, Position::MAX));
    let mut doomed = Vec::new();
    for entry in items
        .range(low.as_slice()..=high.as_slice())
        .map_err(from_redb)?
    {
        if doomed.len() >= max_rows {
            break;
        }
        let (row_key, _) = entry.map_err(from_redb)?;
        let position = position_of_key(prefix, row_key.value())?;
        if !plan.doomed(
            count.saturating_sub(doomed.len() as u64),
            position.timestamp_ms,
        ) {
            break;
        }
        doomed.push(row_key.value().to_vec());
    }
    Ok(doomed)
}

type RangeRow<'a> = Result<
    (
        AccessGuard<'a, &'static [u8]>,
        AccessGuard<'a, &'static [u8]>,
    ),
    StorageError,
>;

fn visit_rows<'a>(
    rows: impl Iterator<Item = RangeRow<'a>>,
    prefix: &[u8],
    visit: &mut dyn FnMut(Position, &[u8]) -> bool,
) -> Result<(), StoreError> {
    for row in rows {
        let (row_key, payload) = row.map_err(from_redb)?;
        let position = position_of_key(prefix, row_key.value())?;
        if !visit(position, payload.value()) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{ChannelRef, EventKind};

    /// A key this crate never writes, inside a channel's range, makes queries and
    /// trims fail with Corrupt instead of panicking.
    #[test]
    fn foreign_keys_are_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("h.redb")).unwrap();
        let prefix = ChannelRef::new("a", "c", EventKind::Message)
            .key_prefix()
            .unwrap();
        let mut short_key = prefix.clone();
        short_key.push(0x80);
        let db = store.db.read().unwrap();
        let txn = db.as_ref().unwrap().begin_write().unwrap();
        txn.open_table(ITEMS)
            .unwrap()
            .insert(short_key.as_slice(), b"junk".as_slice())
            .unwrap();
        txn.commit().unwrap();

        let scan = store.scan(
            &prefix,
            Position::MIN,
            Position::MAX,
            Direction::Forwards,
            &mut |_, _| true,
        );
        assert!(matches!(scan, Err(StoreError::Corrupt(_))), "{scan:?}");
        let plan = TrimPlan {
            max_count: 0,
            cutoff_ms: 0,
        };
        let trim = store.trim(&prefix, plan, 10);
        assert!(matches!(trim, Err(StoreError::Corrupt(_))), "{trim:?}");
    }
}
