//! History queries and how one page is assembled from a scan.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::item::{ChannelRef, Position, StoredItem};

/// Smallest and largest page a query may ask for; other limits are clamped.
pub const LIMIT_MIN: usize = 1;
/// See [`LIMIT_MIN`].
pub const LIMIT_MAX: usize = 1000;

/// Which way a query reads: oldest first or newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forwards,
    Backwards,
}

/// One page of one channel's history.
#[derive(Clone, Debug)]
pub struct HistoryQuery {
    pub channel: ChannelRef,
    /// Inclusive lower bound on timestamp.
    pub start_ms: Option<i64>,
    /// Inclusive upper bound on timestamp.
    pub end_ms: Option<i64>,
    /// Items per page, clamped to `LIMIT_MIN..=LIMIT_MAX`.
    pub limit: usize,
    pub direction: Direction,
    /// Pagination: continue strictly after this position, in `direction`.
    pub after: Option<Position>,
    /// untilAttach: keep only items with `seq <= until[origin]`; items from origins not
    /// in the map are excluded. `None` = no filter.
    pub until: Option<BTreeMap<u64, u64>>,
}

/// Items in query order.
#[derive(Clone, Debug, Default)]
pub struct HistoryPage {
    pub items: Vec<StoredItem>,
    /// `Some(pos)` if there may be more items after the last returned one: pass it back
    /// as [`HistoryQuery::after`] to read on.
    pub next: Option<Position>,
}

impl HistoryQuery {
    /// Ably's defaults: the newest 100 items of `channel`, newest first, no bounds.
    pub fn new(channel: ChannelRef) -> HistoryQuery {
        HistoryQuery {
            channel,
            start_ms: None,
            end_ms: None,
            limit: 100,
            direction: Direction::Backwards,
            after: None,
            until: None,
        }
    }

    /// Inclusive position range to scan once bounds and `after` apply; `None` if empty.
    pub(crate) fn range(&self) -> Option<(Position, Position)> {
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
                Direction::Forwards => low = low.max(after.successor()?),
                Direction::Backwards => high = high.min(after.predecessor()?),
            }
        }
        (low <= high).then_some((low, high))
    }

    fn keeps(&self, position: &Position) -> bool {
        match &self.until {
            None => true,
            Some(until) => until
                .get(&position.origin)
                .is_some_and(|seq| position.seq <= *seq),
        }
    }
}

/// Collects one page from rows offered in scan order, and says when to stop scanning.
pub(crate) struct Pager<'q> {
    query: &'q HistoryQuery,
    limit: usize,
    scan_max: usize,
    scanned: usize,
    page: HistoryPage,
}

impl<'q> Pager<'q> {
    pub(crate) fn new(query: &'q HistoryQuery, scan_max: usize) -> Pager<'q> {
        let limit = query.limit.clamp(LIMIT_MIN, LIMIT_MAX);
        Pager {
            query,
            limit,
            scan_max: scan_max.max(1),
            scanned: 0,
            page: HistoryPage {
                items: Vec::with_capacity(limit.min(64)),
                next: None,
            },
        }
    }

    /// Takes the next row of the scan; returns whether the scan should go on.
    pub(crate) fn offer(&mut self, position: Position, payload: &[u8]) -> bool {
        if self.page.items.len() == self.limit {
            // A row exists beyond a full page: the caller may read on from the last one.
            self.page.next = self.page.items.last().map(StoredItem::position);
            return false;
        }
        self.scanned += 1;
        if self.query.keeps(&position) {
            self.page.items.push(StoredItem {
                timestamp_ms: position.timestamp_ms,
                origin: position.origin,
                seq: position.seq,
                index: position.index,
                payload: Bytes::copy_from_slice(payload),
            });
        }
        if self.scanned >= self.scan_max {
            // Out of budget (a sparse `until` filter): resume after the last row looked
            // at, whether or not it was kept.
            self.page.next = Some(position);
            return false;
        }
        true
    }

    pub(crate) fn finish(self) -> HistoryPage {
        self.page
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::EventKind;

    fn at(timestamp_ms: i64, origin: u64, seq: u64) -> Position {
        Position {
            timestamp_ms,
            origin,
            seq,
            index: 0,
        }
    }

    fn query(limit: usize) -> HistoryQuery {
        HistoryQuery {
            limit,
            direction: Direction::Forwards,
            ..HistoryQuery::new(ChannelRef::new("a", "c", EventKind::Message))
        }
    }

    /// A full page stops on the row after it and points `next` at its last item; a
    /// page that ends with the rows has no `next`.
    #[test]
    fn full_page_sets_next() {
        let q = query(2);
        let mut pager = Pager::new(&q, 100);
        assert!(pager.offer(at(1, 1, 1), b"a"));
        assert!(pager.offer(at(2, 1, 2), b"b"));
        assert!(!pager.offer(at(3, 1, 3), b"c"));
        let page = pager.finish();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.next, Some(at(2, 1, 2)));

        let mut pager = Pager::new(&q, 100);
        assert!(pager.offer(at(1, 1, 1), b"a"));
        assert!(pager.offer(at(2, 1, 2), b"b"));
        assert_eq!(pager.finish().next, None);
    }

    /// The scan budget cuts the page short and `next` resumes after the last row
    /// scanned, even one the `until` filter dropped.
    #[test]
    fn scan_budget_bounds_sparse_filters() {
        let mut q = query(10);
        q.until = Some(BTreeMap::from([(1, 5)]));
        let mut pager = Pager::new(&q, 3);
        assert!(pager.offer(at(1, 1, 1), b"kept"));
        assert!(pager.offer(at(2, 2, 1), b"other origin"));
        assert!(!pager.offer(at(3, 1, 6), b"past until"));
        let page = pager.finish();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.next, Some(at(3, 1, 6)));
    }

    /// Limits are clamped: 0 reads one item, a huge limit reads at most LIMIT_MAX.
    #[test]
    fn limits_are_clamped() {
        assert_eq!(Pager::new(&query(0), 1).limit, LIMIT_MIN);
        assert_eq!(Pager::new(&query(usize::MAX), 1).limit, LIMIT_MAX);
    }

    /// `after` excludes its own position in either direction, and an empty range (start
    /// after end, or nothing after the last position) scans nothing.
    #[test]
    fn range_applies_after_and_bounds() {
        let mut q = query(10);
        q.after = Some(at(5, 1, 1));
        assert_eq!(q.range().map(|r| r.0), at(5, 1, 1).successor());
        q.direction = Direction::Backwards;
        assert_eq!(q.range().map(|r| r.1), at(5, 1, 1).predecessor());
        q.after = Some(Position::MIN);
        assert_eq!(q.range(), None);
        let mut q = query(10);
        q.start_ms = Some(10);
        q.end_ms = Some(9);
        assert_eq!(q.range(), None);
    }
}
