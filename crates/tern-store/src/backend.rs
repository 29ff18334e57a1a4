//! The key-value backends: redb (a file, ACID, MVCC readers) and memory. Both hold two
//! tables: items (key → payload) and channels (channel prefix → nothing), the latter so
//! retention can walk every channel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::StoreError;

const ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
const CHANNELS: TableDefinition<&[u8], ()> = TableDefinition::new("channels");

/// One batch of writes: new items and the channel prefixes they belong to.
pub(crate) struct Batch {
    pub(crate) puts: Vec<(Vec<u8>, Bytes)>,
    pub(crate) channels: BTreeSet<Vec<u8>>,
}

pub(crate) trait Backend: Send + Sync {
    /// Commits a batch atomically and durably.
    fn write(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Visits keys in `low..=high` in order (or reverse) until `visit` returns false.
    fn scan(
        &self,
        low: &[u8],
        high: &[u8],
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError>;
    fn channels(&self) -> Result<Vec<Vec<u8>>, StoreError>;
}

type RangeEntry<'a> = Result<
    (
        redb::AccessGuard<'a, &'static [u8]>,
        redb::AccessGuard<'a, &'static [u8]>,
    ),
    redb::StorageError,
>;

pub(crate) struct RedbBackend {
    db: Database,
}

impl RedbBackend {
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(StoreError::db)?;
        }
        let db = Database::create(path).map_err(StoreError::db)?;
        let txn = db.begin_write().map_err(StoreError::db)?;
        txn.open_table(ITEMS).map_err(StoreError::db)?;
        txn.open_table(CHANNELS).map_err(StoreError::db)?;
        txn.commit().map_err(StoreError::db)?;
        Ok(RedbBackend { db })
    }
}

impl Backend for RedbBackend {
    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::db)?;
        {
            let mut items = txn.open_table(ITEMS).map_err(StoreError::db)?;
            for (key, value) in &batch.puts {
                items
                    .insert(key.as_slice(), value.as_ref())
                    .map_err(StoreError::db)?;
            }
            let mut channels = txn.open_table(CHANNELS).map_err(StoreError::db)?;
            for prefix in &batch.channels {
                channels
                    .insert(prefix.as_slice(), ())
                    .map_err(StoreError::db)?;
            }
        }
        txn.commit().map_err(StoreError::db)
    }

    fn scan(
        &self,
        low: &[u8],
        high: &[u8],
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::db)?;
        let items = txn.open_table(ITEMS).map_err(StoreError::db)?;
        let range = items.range::<&[u8]>(low..=high).map_err(StoreError::db)?;
        let entries: Box<dyn Iterator<Item = RangeEntry<'_>>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for entry in entries {
            let (key, value) = entry.map_err(StoreError::db)?;
            if !visit(key.value(), value.value()) {
                break;
            }
        }
        Ok(())
    }

    fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::db)?;
        {
            let mut items = txn.open_table(ITEMS).map_err(StoreError::db)?;
            for key in keys {
                items.remove(key.as_slice()).map_err(StoreError::db)?;
            }
        }
        txn.commit().map_err(StoreError::db)
    }

    fn channels(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::db)?;
        let channels = txn.open_table(CHANNELS).map_err(StoreError::db)?;
        let mut out = Vec::new();
        for entry in channels.iter().map_err(StoreError::db)? {
            out.push(entry.map_err(StoreError::db)?.0.value().to_vec());
        }
        Ok(out)
    }
}

/// Items and channel prefixes.
type MemoryState = (BTreeMap<Vec<u8>, Bytes>, BTreeSet<Vec<u8>>);

#[derive(Default)]
pub(crate) struct MemoryBackend {
    state: Mutex<MemoryState>,
}

impl MemoryBackend {
    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut state = self.lock();
        for (key, value) in &batch.puts {
            state.0.insert(key.clone(), value.clone());
        }
        state.1.extend(batch.channels.iter().cloned());
        Ok(())
    }

    fn scan(
        &self,
        low: &[u8],
        high: &[u8],
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let state = self.lock();
        let range = state.0.range::<[u8], _>((
            std::ops::Bound::Included(low),
            std::ops::Bound::Included(high),
        ));
        let entries: Box<dyn Iterator<Item = (&Vec<u8>, &Bytes)>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for (key, value) in entries {
            if !visit(key, value) {
                break;
            }
        }
        Ok(())
    }

    fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut state = self.lock();
        for key in keys {
            state.0.remove(key);
        }
        Ok(())
    }

    fn channels(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.lock().1.iter().cloned().collect())
    }
}
