//! [`Store`]: the [`HistoryStore`] over either engine. Appends go through the writer
//! thread; queries and trims run on the caller's thread.

use std::sync::Arc;

use crate::backend::{Backend, Row};
use crate::error::StoreError;
use crate::health::WriteHealth;
use crate::item::{channel_of_prefix, message_channel_of_prefix, ChannelRef, StoredItem};
use crate::query::{HistoryPage, HistoryQuery, Pager};
use crate::retention::{rule_for, RetentionRule, TrimPlan};
use crate::writer::{spawn_writer, Writer};
use crate::{AppendDone, ChannelPage, HistoryStore, StoreConfig};

pub(crate) struct Store {
    /// Declared first so it drops (drains and joins the writer) before the rest.
    writer: Writer,
    backend: Arc<dyn Backend>,
    retention: Vec<RetentionRule>,
    /// Rows per trim commit and channels per trim page.
    batch_max: usize,
    /// Rows one query may scan.
    scan_max: usize,
    /// Appends of items refused so far (see `HistoryStore::refused_appends`).
    refused: std::sync::atomic::AtomicU64,
    /// Writes lost and the current run of failed commits (see `HistoryStore::lost_writes`).
    health: Arc<WriteHealth>,
}

impl Store {
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        config: &StoreConfig,
        thread_start: Option<crate::ThreadStart>,
    ) -> Result<Store, StoreError> {
        let batch_max = config.batch_max.max(1);
        let health = Arc::new(WriteHealth::default());
        // Listed in /metrics from the start, so an alert on it has a series to watch.
        metrics::counter!("tern_store_commit_failures_total").increment(0);
        Ok(Store {
            writer: spawn_writer(
                backend.clone(),
                health.clone(),
                config.queue_max,
                batch_max,
                thread_start,
            )?,
            backend,
            retention: config.retention.clone(),
            batch_max,
            scan_max: config.scan_max.max(1),
            refused: std::sync::atomic::AtomicU64::new(0),
            health,
        })
    }

    /// Deletes what `plan` dooms in one channel, `batch_max` rows per commit so the
    /// writer is never held up for long.
    fn trim_channel(&self, prefix: &[u8], plan: TrimPlan) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let chunk = self.backend.trim(prefix, plan, self.batch_max)?;
            deleted += chunk;
            if chunk < self.batch_max as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Encodes each item's channel once per run of items in the same channel.
fn rows(items: Vec<(ChannelRef, StoredItem)>) -> Result<Vec<Row>, StoreError> {
    let mut rows = Vec::with_capacity(items.len());
    let mut last: Option<(ChannelRef, Arc<[u8]>)> = None;
    for (channel, item) in items {
        let prefix = match &last {
            Some((last_channel, prefix)) if *last_channel == channel => prefix.clone(),
            _ => {
                let prefix: Arc<[u8]> = channel.key_prefix()?.into();
                last = Some((channel, prefix.clone()));
                prefix
            }
        };
        rows.push(Row {
            prefix,
            position: item.position(),
            payload: item.payload,
        });
    }
    Ok(rows)
}

/// The appends of one [`HistoryStore::in_one_commit`] on this thread, not queued yet.
struct Group {
    /// Which store opened it (its address): appends to another store go as they come.
    store: usize,
    rows: Vec<Row>,
    dones: Vec<AppendDone>,
}

thread_local! {
    static GROUP: std::cell::RefCell<Option<Group>> = const { std::cell::RefCell::new(None) };
}

/// Ends this thread's group when dropped, also when the closure panics.
struct GroupScope;

impl Drop for GroupScope {
    fn drop(&mut self) {
        GROUP.with(|g| g.borrow_mut().take());
    }
}

impl Store {
    fn id(&self) -> usize {
        self as *const Store as usize
    }

    fn count_refused(&self, error: &StoreError) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.health.refused(error);
    }
}

impl HistoryStore for Store {
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError> {
        let has_items = !items.is_empty();
        let result = rows(items).and_then(|rows| {
            // Inside `in_one_commit`: kept for the group's one append; otherwise queued now.
            let ungrouped = GROUP.with(|g| match g.borrow_mut().as_mut() {
                Some(group) if group.store == self.id() => {
                    group.rows.extend(rows);
                    group.dones.push(done);
                    None
                }
                _ => Some((rows, done)),
            });
            match ungrouped {
                Some((rows, done)) => self.writer.append(rows, done),
                None => Ok(()),
            }
        });
        if let (Err(error), true) = (&result, has_items) {
            self.count_refused(error);
        }
        result
    }

    fn in_one_commit(&self, f: &mut dyn FnMut()) {
        if GROUP.with(|g| g.borrow().is_some()) {
            f();
            return;
        }
        GROUP.with(|g| {
            *g.borrow_mut() = Some(Group {
                store: self.id(),
                rows: Vec::new(),
                dones: Vec::new(),
            })
        });
        let scope = GroupScope;
        f();
        let group = GROUP.with(|g| g.borrow_mut().take());
        drop(scope);
        let Some(group) = group.filter(|g| !g.dones.is_empty()) else {
            return;
        };
        let has_items = !group.rows.is_empty();
        let dones = group.dones;
        let done: AppendDone = Box::new(move |committed| {
            for done in dones {
                let committed = committed.clone();
                // One part's panicking callback must not keep the others from firing.
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(committed)));
            }
        });
        // Refused (queue full, closed): counted as one refused append, and every part
        // hears of it through its `done`, as a failed commit.
        if let Err((error, done)) = self.writer.try_append(group.rows, done) {
            if has_items {
                self.count_refused(&error);
            }
            done(Err(error));
        }
    }

    fn refused_appends(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lost_writes(&self) -> u64 {
        self.health.lost()
    }

    fn after_committed(&self, since: u64, then: AppendDone) {
        let health = self.health.clone();
        let barrier: AppendDone =
            Box::new(move |committed| then(committed.and_then(|()| health.lost_since(since))));
        // A refused barrier has nothing queued to wait for, but the caller's items may
        // have been refused too: it can only report failure, never an early success.
        if let Err((error, barrier)) = self.writer.try_append(Vec::new(), barrier) {
            barrier(Err(error));
        }
    }

    fn failing(&self) -> Option<StoreError> {
        self.health.failing()
    }

    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let prefix = query.channel.key_prefix()?;
        let Some((low, high)) = query.range() else {
            return Ok(HistoryPage::default());
        };
        let mut pager = Pager::new(query, self.scan_max);
        self.backend.scan(
            &prefix,
            low,
            high,
            query.direction,
            &mut |position, payload| pager.offer(position, payload),
        )?;
        Ok(pager.finish())
    }

    fn trim(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        // A damaged channel is reported after the others are trimmed, not instead.
        let mut first_error = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let channels = self.backend.channels(after.as_deref(), self.batch_max)?;
            for prefix in &channels {
                let Some(channel) = channel_of_prefix(prefix) else {
                    first_error.get_or_insert(StoreError::Corrupt(format!(
                        "malformed channel prefix of {} bytes",
                        prefix.len()
                    )));
                    continue;
                };
                let Some(rule) = rule_for(&self.retention, channel) else {
                    continue;
                };
                match self.trim_channel(prefix, TrimPlan::new(rule, now_ms)) {
                    Ok(n) => deleted += n,
                    Err(err) => {
                        first_error.get_or_insert(err);
                    }
                }
            }
            if channels.len() < self.batch_max {
                break;
            }
            after = channels.last().cloned();
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(deleted),
        }
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn message_channels(
        &self,
        after: Option<&[u8]>,
        max: usize,
    ) -> Result<ChannelPage, StoreError> {
        let prefixes = self.backend.channels(after, max)?;
        let next = (prefixes.len() >= max)
            .then(|| prefixes.last().cloned())
            .flatten();
        let channels = prefixes
            .iter()
            .filter_map(|prefix| message_channel_of_prefix(prefix))
            .filter_map(|(app, channel)| {
                let app = std::str::from_utf8(app).ok()?;
                let channel = std::str::from_utf8(channel).ok()?;
                Some((app.to_string(), channel.to_string()))
            })
            .collect();
        Ok(ChannelPage { channels, next })
    }

    fn cursor(&self, app: &str, channel: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let prefix = ChannelRef::new(app, channel, crate::item::EventKind::Message).key_prefix()?;
        Ok(self
            .backend
            .cursor(crate::backend::cursor_key(&prefix).as_ref())?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    //! The write-failure contract through the store's API, over a test double of the
    //! engine whose commits fail on demand (a real full disk is in
    //! `crates/tern-server/tests/disk_fault.rs`).

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::*;
    use crate::item::{EventKind, Position};
    use crate::memory_store::MemoryStore;
    use crate::query::Direction;

    /// Long enough for any callback on a loaded machine; only reached on failure.
    const WAIT: Duration = Duration::from_secs(30);

    /// The memory engine, but commits fail (or panic) while told to.
    #[derive(Default)]
    struct FlakyDisk {
        inner: MemoryStore,
        full: AtomicBool,
        panics: AtomicBool,
        commits: AtomicU64,
    }

    impl Backend for FlakyDisk {
        fn commit(&self, rows: &[Row]) -> Result<(), StoreError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            if self.panics.load(Ordering::SeqCst) {
                panic!("engine panics on purpose");
            }
            if self.full.load(Ordering::SeqCst) {
                return Err(StoreError::Io(
                    "No space left on device (os error 28)".into(),
                ));
            }
            self.inner.commit(rows)
        }
        fn scan(
            &self,
            prefix: &[u8],
            low: Position,
            high: Position,
            direction: Direction,
            visit: &mut dyn FnMut(Position, &[u8]) -> bool,
        ) -> Result<(), StoreError> {
            self.inner.scan(prefix, low, high, direction, visit)
        }
        fn channels(&self, after: Option<&[u8]>, max: usize) -> Result<Vec<Vec<u8>>, StoreError> {
            self.inner.channels(after, max)
        }
        fn cursor(&self, channel: &[u8]) -> Result<BTreeMap<u64, u64>, StoreError> {
            self.inner.cursor(channel)
        }
        fn trim(&self, prefix: &[u8], plan: TrimPlan, max_rows: usize) -> Result<u64, StoreError> {
            self.inner.trim(prefix, plan, max_rows)
        }
    }

    fn start(config: StoreConfig) -> (Arc<FlakyDisk>, Store) {
        let disk = Arc::new(FlakyDisk::default());
        let store = Store::start(disk.clone(), &config, None).unwrap();
        (disk, store)
    }

    fn items(seq: u64) -> Vec<(ChannelRef, StoredItem)> {
        let item = StoredItem {
            timestamp_ms: 1,
            origin: 1,
            seq,
            index: 0,
            payload: Bytes::from_static(b"p"),
        };
        vec![(ChannelRef::new("app", "c", EventKind::Message), item)]
    }

    /// Appends `items` with a callback that reports into the returned receiver.
    fn append(store: &Store, seq: u64) -> mpsc::Receiver<Result<(), StoreError>> {
        let (tx, rx) = mpsc::channel();
        store
            .append(items(seq), Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        rx
    }

    fn barrier(store: &Store, since: u64) -> mpsc::Receiver<Result<(), StoreError>> {
        let (tx, rx) = mpsc::channel();
        store.after_committed(since, Box::new(move |r| tx.send(r).unwrap()));
        rx
    }

    /// Holds the writer thread in a callback until the returned sender is used, so that
    /// what is appended meanwhile lands in one group commit.
    fn hold_writer(store: &Store) -> mpsc::Sender<()> {
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        store
            .append(
                Vec::new(),
                Box::new(move |_| {
                    started_tx.send(()).unwrap();
                    let _ = release_rx.recv_timeout(WAIT);
                }),
            )
            .unwrap();
        started_rx.recv_timeout(WAIT).unwrap();
        release_tx
    }

    /// What one `in_one_commit` appends is one commit, even where a commit takes one
    /// append at most (`batch_max` 1): it fails or succeeds whole, and every part's
    /// callback hears the same.
    #[test]
    fn appends_in_one_commit_are_committed_together() {
        let (disk, store) = start(StoreConfig {
            batch_max: 1,
            ..StoreConfig::default()
        });
        let group = |store: &Store| {
            let mut parts = Vec::new();
            store.in_one_commit(&mut || {
                parts.push(append(store, parts.len() as u64 * 10 + 1));
                parts.push(append(store, parts.len() as u64 * 10 + 1));
            });
            parts
        };
        let before = disk.commits.load(Ordering::SeqCst);
        for done in group(&store) {
            assert!(done.recv_timeout(WAIT).unwrap().is_ok());
        }
        assert_eq!(
            disk.commits.load(Ordering::SeqCst) - before,
            1,
            "one commit"
        );
        disk.full.store(true, Ordering::SeqCst);
        let failed: Vec<_> = group(&store)
            .iter()
            .map(|done| done.recv_timeout(WAIT).unwrap().is_err())
            .collect();
        assert_eq!(failed, [true, true], "both parts failed with their commit");
        disk.full.store(false, Ordering::SeqCst);
        // Outside a group, appends go as they come again.
        let before = disk.commits.load(Ordering::SeqCst);
        append(&store, 100).recv_timeout(WAIT).unwrap().unwrap();
        append(&store, 101).recv_timeout(WAIT).unwrap().unwrap();
        assert!(disk.commits.load(Ordering::SeqCst) - before >= 2);
    }

    /// The publish's items are committed (and fail) in an earlier group commit than its
    /// barrier, before the barrier is even queued: the barrier still reports the failure.
    #[test]
    fn barrier_reports_a_failed_commit_of_an_earlier_batch() {
        let (disk, store) = start(StoreConfig::default());
        let since = store.lost_writes();
        disk.full.store(true, Ordering::SeqCst);
        let items_done = append(&store, 1);
        assert!(items_done.recv_timeout(WAIT).unwrap().is_err());
        disk.full.store(false, Ordering::SeqCst);
        let result = barrier(&store, since).recv_timeout(WAIT).unwrap();
        assert!(matches!(result, Err(StoreError::Io(_))), "{result:?}");
    }

    /// Items and barrier in the same failed group commit: the barrier fails.
    #[test]
    fn barrier_reports_a_failed_commit_of_its_own_batch() {
        let (disk, store) = start(StoreConfig::default());
        let release = hold_writer(&store);
        let since = store.lost_writes();
        let items_done = append(&store, 1);
        let barrier_done = barrier(&store, since);
        disk.full.store(true, Ordering::SeqCst);
        release.send(()).unwrap();
        assert!(items_done.recv_timeout(WAIT).unwrap().is_err());
        assert!(barrier_done.recv_timeout(WAIT).unwrap().is_err());
        assert_eq!(disk.commits.load(Ordering::SeqCst), 1, "one group commit");
    }

    /// A failure before the caller noted `lost_writes` does not fail its barrier, and a
    /// success after failures does not hide one in between.
    #[test]
    fn barrier_counts_only_losses_since_its_mark() {
        let (disk, store) = start(StoreConfig::default());
        disk.full.store(true, Ordering::SeqCst);
        assert!(append(&store, 1).recv_timeout(WAIT).unwrap().is_err());
        disk.full.store(false, Ordering::SeqCst);
        let since = store.lost_writes();
        assert_eq!(since, 1);
        assert!(append(&store, 2).recv_timeout(WAIT).unwrap().is_ok());
        assert!(barrier(&store, since).recv_timeout(WAIT).unwrap().is_ok());

        disk.full.store(true, Ordering::SeqCst);
        assert!(append(&store, 3).recv_timeout(WAIT).unwrap().is_err());
        disk.full.store(false, Ordering::SeqCst);
        assert!(append(&store, 4).recv_timeout(WAIT).unwrap().is_ok());
        assert!(barrier(&store, since).recv_timeout(WAIT).unwrap().is_err());
    }

    /// A barrier refused because the queue is full reports the refusal at once: never
    /// an early success. An append of items refused meanwhile fails later barriers too.
    #[test]
    fn refused_barrier_and_refused_items_fail_the_barrier() {
        let (_disk, store) = start(StoreConfig {
            queue_max: 1,
            ..StoreConfig::default()
        });
        let release = hold_writer(&store);
        let since = store.lost_writes();
        let _queued = append(&store, 1);
        let refused = barrier(&store, since).recv_timeout(WAIT).unwrap();
        assert_eq!(refused, Err(StoreError::Overloaded));
        assert_eq!(
            store.append(items(2), Box::new(|_| panic!("refused append's callback"))),
            Err(StoreError::Overloaded)
        );
        release.send(()).unwrap();
        let later = barrier(&store, since).recv_timeout(WAIT).unwrap();
        assert_eq!(later, Err(StoreError::Overloaded));
    }

    /// `failing` reports the error while commits fail; with nothing queued the writer
    /// probes the engine, so it clears by itself once the engine can write again.
    #[test]
    fn failing_clears_by_probe_once_the_engine_recovers() {
        let (disk, store) = start(StoreConfig::default());
        assert_eq!(store.failing(), None);
        disk.full.store(true, Ordering::SeqCst);
        assert!(append(&store, 1).recv_timeout(WAIT).unwrap().is_err());
        assert!(matches!(store.failing(), Some(StoreError::Io(_))));
        // Probes fail while the disk is full: still failing, and nothing more is lost.
        let commits = disk.commits.load(Ordering::SeqCst);
        let deadline = Instant::now() + WAIT;
        while disk.commits.load(Ordering::SeqCst) == commits {
            assert!(Instant::now() < deadline, "no probe commit");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(store.failing().is_some());
        assert_eq!(store.lost_writes(), 1);
        disk.full.store(false, Ordering::SeqCst);
        while store.failing().is_some() {
            assert!(
                Instant::now() < deadline,
                "still failing after the disk recovered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(store.lost_writes(), 1);
    }

    /// A nearly full disk fails some commits between successes: one success does not
    /// end the run (the node stays unhealthy), and neither does a probe.
    #[test]
    fn failing_lasts_through_a_success_between_failures() {
        let (disk, store) = start(StoreConfig::default());
        disk.full.store(true, Ordering::SeqCst);
        assert!(append(&store, 1).recv_timeout(WAIT).unwrap().is_err());
        disk.full.store(false, Ordering::SeqCst);
        assert!(append(&store, 2).recv_timeout(WAIT).unwrap().is_ok());
        assert!(
            store.failing().is_some(),
            "one success right after a failure"
        );
        disk.full.store(true, Ordering::SeqCst);
        assert!(append(&store, 3).recv_timeout(WAIT).unwrap().is_err());
        assert!(store.failing().is_some());
        assert_eq!(store.lost_writes(), 2);
    }

    /// An engine that panics in a commit fails that commit's callbacks and barrier; the
    /// writer lives on and later commits succeed.
    #[test]
    fn panicking_engine_is_a_failed_commit() {
        let (disk, store) = start(StoreConfig::default());
        let since = store.lost_writes();
        disk.panics.store(true, Ordering::SeqCst);
        assert!(append(&store, 1).recv_timeout(WAIT).unwrap().is_err());
        assert!(barrier(&store, since).recv_timeout(WAIT).unwrap().is_err());
        disk.panics.store(false, Ordering::SeqCst);
        let since = store.lost_writes();
        assert!(append(&store, 2).recv_timeout(WAIT).unwrap().is_ok());
        assert!(barrier(&store, since).recv_timeout(WAIT).unwrap().is_ok());
    }

    /// Appends arriving one every 100 µs are taken a few per commit (the writer sleeps
    /// between batches instead of being woken by each), every one is committed, in
    /// order; after a pause the next append is still committed at once.
    #[test]
    fn frequent_appends_share_commits_and_a_lone_one_is_not_held() {
        let (disk, store) = start(StoreConfig::default());
        let before = disk.commits.load(Ordering::SeqCst);
        let count = 200;
        let (tx, rx) = mpsc::channel();
        for seq in 1..=count {
            let tx = tx.clone();
            store
                .append(items(seq), Box::new(move |r| tx.send((seq, r)).unwrap()))
                .unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        let done: Vec<u64> = (0..count)
            .map(|_| {
                let (seq, result) = rx.recv_timeout(WAIT).unwrap();
                result.unwrap();
                seq
            })
            .collect();
        assert_eq!(done, (1..=count).collect::<Vec<_>>(), "in append order");
        let commits = disk.commits.load(Ordering::SeqCst) - before;
        assert!(
            commits <= count / 2,
            "{commits} commits for {count} appends"
        );
        // Idle (the writer parks after 2 ms of nothing), then one append: committed
        // without waiting for more.
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        append(&store, count + 1)
            .recv_timeout(WAIT)
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
}
