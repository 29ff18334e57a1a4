//! The seam between the store's logic and its two key-value engines (`redb_store`,
//! `memory_store`). Engines know prefixes, positions and bytes; rules, pages and
//! callbacks live above them.

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

    /// Deletes up to `max_rows` of the oldest rows of `prefix` that `plan` dooms, in one
    /// commit. Returns how many went; fewer than `max_rows` means the channel is done.
    fn trim(&self, prefix: &[u8], plan: TrimPlan, max_rows: usize) -> Result<u64, StoreError>;
}
