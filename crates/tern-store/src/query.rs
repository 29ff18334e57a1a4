//! History queries.

use std::collections::BTreeMap;

use crate::item::{ChannelRef, Position, StoredItem};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forwards,
    Backwards,
}

/// One page of history for one channel.
#[derive(Clone, Debug)]
pub struct HistoryQuery {
    pub channel: ChannelRef,
    /// Inclusive lower bound on timestamp.
    pub start_ms: Option<i64>,
    /// Inclusive upper bound on timestamp.
    pub end_ms: Option<i64>,
    /// Items per page, clamped to 1..=1000.
    pub limit: usize,
    pub direction: Direction,
    /// Continue strictly after this position (in `direction`).
    pub after: Option<Position>,
    /// untilAttach: keep items with `seq <= until[origin]`; other origins are excluded.
    pub until: Option<BTreeMap<u64, u64>>,
}

/// Items in query order; `next` is set when more may follow the last one.
#[derive(Clone, Debug, Default)]
pub struct HistoryPage {
    pub items: Vec<StoredItem>,
    pub next: Option<Position>,
}

impl HistoryQuery {
    pub(crate) fn keeps(&self, item: &StoredItem) -> bool {
        match &self.until {
            None => true,
            Some(until) => until.get(&item.origin).is_some_and(|seq| item.seq <= *seq),
        }
    }

    /// Inclusive position bounds of the scan, after `after` is applied.
    pub(crate) fn bounds(&self) -> Option<(Position, Position)> {
        let mut low = Position {
            timestamp_ms: self.start_ms.unwrap_or(i64::MIN),
            ..Position::MIN
        };
        let mut high = Position {
            timestamp_ms: self.end_ms.unwrap_or(i64::MAX),
            ..Position::MAX
        };
        if let Some(after) = self.after {
            match self.direction {
                Direction::Forwards => low = low.max(successor(after)?),
                Direction::Backwards => high = high.min(predecessor(after)?),
            }
        }
        (low <= high).then_some((low, high))
    }
}

fn successor(p: Position) -> Option<Position> {
    if let Some(index) = p.index.checked_add(1) {
        return Some(Position { index, ..p });
    }
    if let Some(seq) = p.seq.checked_add(1) {
        return Some(Position { seq, index: 0, ..p });
    }
    if let Some(origin) = p.origin.checked_add(1) {
        return Some(Position {
            origin,
            seq: 0,
            index: 0,
            ..p
        });
    }
    Some(Position {
        timestamp_ms: p.timestamp_ms.checked_add(1)?,
        ..Position::MIN
    })
}

fn predecessor(p: Position) -> Option<Position> {
    if let Some(index) = p.index.checked_sub(1) {
        return Some(Position { index, ..p });
    }
    if let Some(seq) = p.seq.checked_sub(1) {
        return Some(Position {
            seq,
            index: u32::MAX,
            ..p
        });
    }
    if let Some(origin) = p.origin.checked_sub(1) {
        return Some(Position {
            origin,
            seq: u64::MAX,
            index: u32::MAX,
            ..p
        });
    }
    Some(Position {
        timestamp_ms: p.timestamp_ms.checked_sub(1)?,
        ..Position::MAX
    })
}
