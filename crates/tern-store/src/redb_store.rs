//! The redb engine: one file, ACID commits (`Durability::Immediate`: a commit returns
//! once it is on disk), MVCC readers that never block the writer.
//!
//! Three tables: `items` (key → payload, see [`crate::item`] for the key),
//! `channel_counts` (prefix → rows), kept in the same commits as `items` so count
//! retention knows how much to delete without counting, and trim can list channels, and
//! `channel_cursors` (channel → highest sequence per origin, also in the same commits).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{AccessGuard, Database, ReadableDatabase, ReadableTable, StorageError, TableDefinition};

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
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the file, creating its parent directories.
    pub(crate) fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|err| StoreError::Io(format!("creating {}: {err}", parent.display())))?;
        }
        let db = Database::create(path).map_err(from_redb)?;
        // Create both tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(from_redb)?;
        txn.open_table(ITEMS).map_err(from_redb)?;
        txn.open_table(COUNTS).map_err(from_redb)?;
        txn.open_table(CURSORS).map_err(from_redb)?;
        txn.commit().map_err(from_redb)?;
        Ok(RedbStore { db })
    }
}

impl Backend for RedbStore {
    fn commit(&self, rows: &[Row]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(from_redb)?;
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
                    let old = cursors.get(channel).map_err(from_redb)?;
                    merge_cursor(old.as_ref().map(|v| v.value()), &update)
                };
                cursors.insert(channel, row.as_slice()).map_err(from_redb)?;
            }
        }
        txn.commit().map_err(from_redb)
    }

    fn scan(
        &self,
        prefix: &[u8],
        low: Position,
        high: Position,
        direction: Direction,
        visit: &mut dyn FnMut(Position, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(from_redb)?;
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
        let txn = self.db.begin_read().map_err(from_redb)?;
        let cursors = txn.open_table(CURSORS).map_err(from_redb)?;
        let row = cursors.get(channel).map_err(from_redb)?;
        Ok(row.map(|v| decode_cursor(v.value())).unwrap_or_default())
    }

    fn channels(&self, after: Option<&[u8]>, max: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(from_redb)?;
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
        let txn = self.db.begin_write().map_err(from_redb)?;
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
        let txn = store.db.begin_write().unwrap();
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
