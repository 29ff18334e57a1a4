//! The seam between the store's logic and its two key-value engines (`redb_store`,
//! `memory_store`). Engines know prefixes, positions and bytes; rules, pages and
//! callbacks live above them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::StoreError;
use crate::item::Position;
use crate::query::Direction;
use crate::retention::TrimPlan;

/// One item on its way to an engine.
pub(crate) struct Row {
    /// Key prefix of the item's channel, shared by consecutive rows of one channel.
    pub(crate) prefix: Arc<[u8]>,
    pub(crate) position: Position,
    pub(crate) payload: Bytes,
}

/// A key-value engine holding items by `(prefix, position)` and a row count per prefix.
pub(crate) trait Backend: Send + Sync {
    /// Stores `rows` in one atomic commit; returns once it is durable. A row at a
    /// position already stored replaces it (replication may deliver twice).
    fn commit(&self, rows: &[Row]) -> Result<(), StoreError>;

    /// Visits the rows of `prefix` in `low..=high` in `direction` until `visit` returns
    /// false. Sees one consistent snapshot and does not block the writer for long.
    fn scan(
        &self,
        prefix: &[u8],
        low: Position,
        high: Position,
        direction: Direction,
        visit: &mut dyn FnMut(Position, &[u8]) -> bool,
    ) -> Result<(), StoreError>;

    /// Up to `max` channel prefixes that hold rows, in order, strictly after `after`.
    fn channels(&self, after: Option<&[u8]>, max: usize) -> Result<Vec<Vec<u8>>, StoreError>;

    /// The highest stored sequence per origin of the channel whose item prefixes start
    /// with `channel` (see [`cursor_key`]). Kept by `commit`, untouched by `trim`: a
    /// channel's sequences must continue after its items have expired.
    fn cursor(&self, channel: &[u8]) -> Result<BTreeMap<u64, u64>, StoreError>;

    /// Deletes up to `max_rows` of the oldest rows of `prefix` that `plan` dooms, in one
    /// commit. Returns how many went; fewer than `max_rows` means the channel is done.
    fn trim(&self, prefix: &[u8], plan: TrimPlan, max_rows: usize) -> Result<u64, StoreError>;
}

/// Most origins one channel's cursor row keeps (the highest sequences win). A channel
/// gets a new origin per publishing node boot, so this only trims long-dead origins.
pub(crate) const CURSOR_ORIGINS_MAX: usize = 256;

pub(crate) use crate::item::cursor_key;

/// The highest sequence per origin of each channel among `rows`.
pub(crate) fn cursor_updates(
    rows: &[Row],
) -> BTreeMap<std::borrow::Cow<'_, [u8]>, BTreeMap<u64, u64>> {
    let mut out: BTreeMap<std::borrow::Cow<'_, [u8]>, BTreeMap<u64, u64>> = BTreeMap::new();
    for row in rows {
        let seq = out
            .entry(cursor_key(&row.prefix))
            .or_default()
            .entry(row.position.origin)
            .or_default();
        *seq = (*seq).max(row.position.seq);
    }
    out
}

/// Merges `update` into a cursor row (`origin u64 ‖ seq u64`, big-endian, per entry),
/// keeping the higher sequence per origin and at most [`CURSOR_ORIGINS_MAX`] origins.
pub(crate) fn merge_cursor(old: Option<&[u8]>, update: &BTreeMap<u64, u64>) -> Vec<u8> {
    let mut merged: BTreeMap<u64, u64> = decode_cursor(old.unwrap_or_default());
    for (origin, seq) in update {
        let entry = merged.entry(*origin).or_default();
        *entry = (*entry).max(*seq);
    }
    let mut entries: Vec<(u64, u64)> = merged.into_iter().collect();
    if entries.len() > CURSOR_ORIGINS_MAX {
        entries.sort_by_key(|(_, seq)| std::cmp::Reverse(*seq));
        entries.truncate(CURSOR_ORIGINS_MAX);
    }
    entries
        .iter()
        .flat_map(|(origin, seq)| origin.to_be_bytes().into_iter().chain(seq.to_be_bytes()))
        .collect()
}

/// Reads a cursor row; trailing bytes that do not make a whole entry are ignored.
pub(crate) fn decode_cursor(bytes: &[u8]) -> BTreeMap<u64, u64> {
    bytes
        .chunks_exact(16)
        .map(|entry| {
            let (origin, seq) = entry.split_at(8);
            (
                u64::from_be_bytes(origin.try_into().expect("8 bytes")),
                u64::from_be_bytes(seq.try_into().expect("8 bytes")),
            )
        })
        .collect()
}
