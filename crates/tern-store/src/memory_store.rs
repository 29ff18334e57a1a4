//! The memory engine: one `BTreeMap` per channel behind one mutex. Same semantics as
//! redb, nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use crate::backend::{cursor_updates, Backend, Row};
use crate::error::StoreError;
use crate::item::Position;
use crate::query::Direction;
use crate::retention::TrimPlan;

type Channels = BTreeMap<Vec<u8>, BTreeMap<Position, Bytes>>;

/// Channels whose cursor the memory engine remembers; past it new channels get none
/// (memory mode keeps nothing across restarts anyway).
const CURSOR_CHANNELS_MAX: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct MemoryStore {
    channels: Mutex<Channels>,
    cursors: Mutex<BTreeMap<Vec<u8>, BTreeMap<u64, u64>>>,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        // Every update below leaves the maps consistent, so a panic elsewhere while the
        // lock was held cannot have left them half-changed.
        self.channels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl Backend for MemoryStore {
    fn commit(&self, rows: &[Row]) -> Result<(), StoreError> {
        let mut channels = self.lock();
        for row in rows {
            let items = match channels.get_mut(&row.prefix[..]) {
                Some(items) => items,
                None => channels.entry(row.prefix.to_vec()).or_default(),
            };
            items.insert(row.position, row.payload.clone());
        }
        drop(channels);
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        for (channel, update) in cursor_updates(rows) {
            if !cursors.contains_key(channel.as_ref()) && cursors.len() >= CURSOR_CHANNELS_MAX {
                continue;
            }
            let cursor = cursors.entry(channel.to_vec()).or_default();
            for (origin, seq) in update {
                let entry = cursor.entry(origin).or_default();
                *entry = (*entry).max(seq);
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        prefix: &[u8],
        low: Position,
        high: Position,
        direction: Direction,
        visit: &mut dyn FnMut(Position, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let channels = self.lock();
        let Some(items) = channels.get(prefix) else {
            return Ok(());
        };
        let range = items.range(low..=high);
        match direction {
            Direction::Forwards => visit_rows(range, visit),
            Direction::Backwards => visit_rows(range.rev(), visit),
        }
        Ok(())
    }

    fn cursor(&self, channel: &[u8]) -> Result<BTreeMap<u64, u64>, StoreError> {
        let cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        Ok(cursors.get(channel).cloned().unwrap_or_default())
    }

    fn channels(&self, after: Option<&[u8]>, max: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let channels = self.lock();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(channels
            .range::<[u8], _>((lower, Bound::Unbounded))
            .take(max)
            .map(|(prefix, _)| prefix.clone())
            .collect())
    }

    fn trim(&self, prefix: &[u8], plan: TrimPlan, max_rows: usize) -> Result<u64, StoreError> {
        let mut channels = self.lock();
        let Some(items) = channels.get_mut(prefix) else {
            return Ok(0);
        };
        let mut deleted = 0;
        while deleted < max_rows {
            let count = items.len() as u64;
            let Some(entry) = items.first_entry() else {
                break;
            };
            if !plan.doomed(count, entry.key().timestamp_ms) {
                break;
            }
            entry.remove();
            deleted += 1;
        }
        if items.is_empty() {
            channels.remove(prefix);
        }
        Ok(deleted as u64)
    }
}

fn visit_rows<'a>(
    rows: impl Iterator<Item = (&'a Position, &'a Bytes)>,
    visit: &mut dyn FnMut(Position, &[u8]) -> bool,
) {
    for (position, payload) in rows {
        if !visit(*position, payload) {
            break;
        }
    }
}
