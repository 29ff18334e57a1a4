//! The store through its public API, in both engines.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tempfile::TempDir;
use tern_store::{
    open, ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, Position, RetentionRule,
    StoreConfig, StoreError, StoredItem,
};

/// Long enough for any callback on a loaded 2-core machine; only reached on failure.
const WAIT: Duration = Duration::from_secs(30);

/// An open store and, for redb, the directory that holds its file.
struct Opened {
    store: Arc<dyn HistoryStore>,
    _dir: Option<TempDir>,
}

/// The same config opened in memory and as a redb file.
fn both(config: StoreConfig) -> Vec<Opened> {
    let dir = tempfile::tempdir().unwrap();
    let redb = StoreConfig {
        path: Some(dir.path().join("nested/dir/history.redb")),
        ..config.clone()
    };
    vec![
        Opened {
            store: open(&config).unwrap(),
            _dir: None,
        },
        Opened {
            store: open(&redb).unwrap(),
            _dir: Some(dir),
        },
    ]
}

fn channel(name: &str) -> ChannelRef {
    ChannelRef::new("app", name, EventKind::Message)
}

fn item(timestamp_ms: i64, seq: u64) -> StoredItem {
    StoredItem {
        timestamp_ms,
        origin: 7,
        seq,
        index: 0,
        payload: Bytes::from(format!("p{seq}")),
    }
}

/// Appends and waits until committed.
fn append_all(store: &Arc<dyn HistoryStore>, items: Vec<(ChannelRef, StoredItem)>) {
    let (tx, rx) = mpsc::channel();
    store
        .append(items, Box::new(move |result| tx.send(result).unwrap()))
        .unwrap();
    rx.recv_timeout(WAIT).unwrap().unwrap();
}

fn query(name: &str, direction: Direction, limit: usize) -> HistoryQuery {
    HistoryQuery {
        limit,
        direction,
        ..HistoryQuery::new(channel(name))
    }
}

/// Follows `next` to the end; fails if pages never end.
fn read_all(
    store: &Arc<dyn HistoryStore>,
    mut q: HistoryQuery,
    pages_max: usize,
) -> Vec<StoredItem> {
    let mut seen = Vec::new();
    for _ in 0..pages_max {
        let page = store.query(&q).unwrap();
        seen.extend(page.items);
        match page.next {
            Some(next) => q.after = Some(next),
            None => return seen,
        }
    }
    panic!("more than {pages_max} pages");
}

fn seqs(items: &[StoredItem]) -> Vec<u64> {
    items.iter().map(|i| i.seq).collect()
}

#[derive(Debug, Clone)]
struct Case {
    items: Vec<(i64, u64, u64, u32)>,
    chunk: usize,
    limit: usize,
    scan_max: usize,
    backwards: bool,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    until: Option<BTreeMap<u64, u64>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((0i64..20, 0u64..3, 0u64..10, 0u32..2), 0..60),
        1usize..8,
        1usize..9,
        1usize..40,
        any::<bool>(),
        proptest::option::of(0i64..20),
        proptest::option::of(0i64..20),
        proptest::option::of(proptest::collection::btree_map(0u64..4, 0u64..10, 0..3)),
    )
        .prop_map(
            |(items, chunk, limit, scan_max, backwards, start_ms, end_ms, until)| Case {
                items,
                chunk,
                limit,
                scan_max,
                backwards,
                start_ms,
                end_ms,
                until,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Paging in either direction, with bounds, an untilAttach filter and a small scan
    /// budget, returns exactly what a model holds (later appends at a position replace
    /// earlier ones), each item once, in order; other channels and kinds never leak in.
    #[test]
    fn pages_match_a_model(case in case()) {
        let config = StoreConfig { scan_max: case.scan_max, ..StoreConfig::default() };
        for opened in both(config) {
            let store = &opened.store;
            let mut model = BTreeMap::new();
            let items: Vec<_> = case.items.iter().enumerate().map(|(n, &(timestamp_ms, origin, seq, index))| {
                let item = StoredItem { timestamp_ms, origin, seq, index, payload: Bytes::from(n.to_string()) };
                model.insert(item.position(), item.clone());
                (channel("c"), item)
            }).collect();
            for chunk in items.chunks(case.chunk) {
                store.append(chunk.to_vec(), Box::new(|r| r.unwrap())).unwrap();
                let noise = StoredItem { timestamp_ms: 5, origin: 1, seq: 1, index: 0, payload: Bytes::new() };
                let presence = ChannelRef::new("app", "c", EventKind::Presence);
                let other_app = ChannelRef::new("app2", "c", EventKind::Message);
                store.append(vec![(channel("c2"), noise.clone()), (presence, noise.clone()), (other_app, noise)], Box::new(|r| r.unwrap())).unwrap();
            }
            store.flush();

            let q = HistoryQuery {
                start_ms: case.start_ms,
                end_ms: case.end_ms,
                until: case.until.clone(),
                ..query("c", if case.backwards { Direction::Backwards } else { Direction::Forwards }, case.limit)
            };
            let mut expected: Vec<StoredItem> = model.values().filter(|i| {
                case.start_ms.is_none_or(|s| i.timestamp_ms >= s)
                    && case.end_ms.is_none_or(|e| i.timestamp_ms <= e)
                    && case.until.as_ref().is_none_or(|u| u.get(&i.origin).is_some_and(|s| i.seq <= *s))
            }).cloned().collect();
            if case.backwards {
                expected.reverse();
            }
            // Every page advances by at least one scanned row.
            let got = read_all(store, q, model.len() + 2);
            prop_assert_eq!(got, expected);
        }
    }
}

/// Time bounds are inclusive; the untilAttach filter keeps only items at or below each
/// origin's cursor and drops origins it does not name.
#[test]
fn bounds_and_until() {
    for opened in both(StoreConfig::default()) {
        let store = &opened.store;
        append_all(
            store,
            (1..=6)
                .map(|s| (channel("c"), item(s as i64 * 10, s)))
                .collect(),
        );
        let q = HistoryQuery {
            start_ms: Some(20),
            end_ms: Some(40),
            ..query("c", Direction::Forwards, 100)
        };
        assert_eq!(seqs(&read_all(store, q, 10)), vec![2, 3, 4]);
        let q = HistoryQuery {
            until: Some(BTreeMap::from([(7, 4)])),
            ..query("c", Direction::Backwards, 2)
        };
        assert_eq!(seqs(&read_all(store, q, 10)), vec![4, 3, 2, 1]);
        let q = HistoryQuery {
            until: Some(BTreeMap::from([(8, 4)])),
            ..query("c", Direction::Backwards, 2)
        };
        assert!(read_all(store, q, 10).is_empty());
        let q = HistoryQuery {
            after: Some(Position::MAX),
            ..query("c", Direction::Forwards, 2)
        };
        assert!(read_all(store, q, 1).is_empty());
    }
}

/// Done callbacks fire in append order, empty appends included (they are barriers),
/// and all succeed.
#[test]
fn callbacks_fire_in_order() {
    let config = StoreConfig {
        batch_max: 7,
        ..StoreConfig::default()
    };
    for opened in both(config) {
        let order = Arc::new(Mutex::new(Vec::new()));
        for n in 0..300u64 {
            let order = order.clone();
            let items = match n % 3 {
                0 => Vec::new(),
                1 => vec![(channel("c"), item(1, n))],
                _ => (0..5)
                    .map(|k| (channel("d"), item(k, n * 10 + k as u64)))
                    .collect(),
            };
            let done = Box::new(move |result: Result<(), StoreError>| {
                result.unwrap();
                order.lock().unwrap().push(n);
            });
            opened.store.append(items, done).unwrap();
        }
        opened.store.flush();
        assert_eq!(*order.lock().unwrap(), (0..300).collect::<Vec<_>>());
    }
}

/// Retention deletes the oldest items beyond the count and everything past the age,
/// per the longest matching prefix, messages and presence counted apart; channels no
/// rule matches are kept; a second trim finds nothing; counts stay right as more
/// items arrive. A tiny batch_max makes trim work in many commits and channel pages.
#[test]
fn retention_by_count_and_age() {
    let retention = vec![
        RetentionRule {
            prefix: "keep:".into(),
            max_count: 3,
            max_age_ms: 1_000_000,
        },
        RetentionRule {
            prefix: "keep:short:".into(),
            max_count: 100,
            max_age_ms: 50,
        },
    ];
    let config = StoreConfig {
        retention,
        batch_max: 2,
        ..StoreConfig::default()
    };
    for opened in both(config) {
        let store = &opened.store;
        let presence = ChannelRef::new("app", "keep:c", EventKind::Presence);
        for s in 1..=5 {
            append_all(
                store,
                vec![
                    (channel("keep:c"), item(s as i64, s)),
                    (presence.clone(), item(s as i64, s)),
                    (channel("keep:short:x"), item(s as i64 * 20, s)),
                    (channel("forever"), item(s as i64, s)),
                ],
            );
        }
        assert_eq!(store.trim(110).unwrap(), 2 + 2 + 2);
        assert_eq!(store.trim(110).unwrap(), 0);
        let forwards = |name: &str| seqs(&read_all(store, query(name, Direction::Forwards, 10), 5));
        assert_eq!(forwards("keep:c"), vec![3, 4, 5]);
        assert_eq!(forwards("keep:short:x"), vec![3, 4, 5]);
        assert_eq!(forwards("forever"), vec![1, 2, 3, 4, 5]);
        let q = HistoryQuery {
            channel: presence.clone(),
            ..query("", Direction::Forwards, 10)
        };
        assert_eq!(seqs(&read_all(store, q, 5)), vec![3, 4, 5]);

        append_all(
            store,
            (6..=9)
                .map(|s| (channel("keep:c"), item(s as i64, s)))
                .collect(),
        );
        assert_eq!(store.trim(110).unwrap(), 4);
        assert_eq!(forwards("keep:c"), vec![7, 8, 9]);
        // Past every age: the short channel empties entirely.
        assert_eq!(store.trim(10_000).unwrap(), 3);
        assert!(forwards("keep:short:x").is_empty());
    }
}

/// A full writer queue refuses at once with Overloaded instead of growing or
/// blocking, and the refused append's callback never fires.
#[test]
fn full_queue_is_refused() {
    for opened in both(StoreConfig {
        queue_max: 1,
        ..StoreConfig::default()
    }) {
        let store = &opened.store;
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        // The first callback holds the writer until released, so the queue fills.
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
        let second = Arc::new(AtomicBool::new(false));
        let second_done = second.clone();
        store
            .append(
                vec![(channel("c"), item(1, 1))],
                Box::new(move |r| second_done.store(r.is_ok(), Ordering::SeqCst)),
            )
            .unwrap();
        let refused = store.append(
            vec![(channel("c"), item(2, 2))],
            Box::new(|_| panic!("a refused append's callback fired")),
        );
        assert_eq!(refused.unwrap_err(), StoreError::Overloaded);
        release_tx.send(()).unwrap();
        store.flush();
        assert!(second.load(Ordering::SeqCst));
        assert_eq!(
            seqs(&read_all(store, query("c", Direction::Forwards, 10), 2)),
            vec![1]
        );
    }
}

/// Everything acknowledged by a done callback is in the file after the store is
/// dropped and reopened, and the per-channel counts survive too (count retention
/// after reopen deletes exactly the excess).
#[test]
fn committed_items_survive_reopen() {
    const ITEMS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        path: Some(dir.path().join("history.redb")),
        retention: vec![RetentionRule {
            prefix: String::new(),
            max_count: 100,
            max_age_ms: i64::MAX,
        }],
        ..StoreConfig::default()
    };
    {
        let store = open(&config).unwrap();
        let (tx, rx) = mpsc::channel();
        for s in 1..=ITEMS {
            let tx = tx.clone();
            let done = Box::new(move |r: Result<(), StoreError>| tx.send(r).unwrap());
            store
                .append(vec![(channel("d"), item(s as i64, s))], done)
                .unwrap();
        }
        for _ in 1..=ITEMS {
            rx.recv_timeout(WAIT).unwrap().unwrap();
        }
    }
    let store = open(&config).unwrap();
    let all = read_all(&store, query("d", Direction::Forwards, 1000), 2);
    assert_eq!(seqs(&all), (1..=ITEMS).collect::<Vec<_>>());
    assert!(all.iter().all(|i| i.payload == item(0, i.seq).payload));
    assert_eq!(store.trim(0).unwrap(), ITEMS - 100);
}

/// Dropping the last handle drains the queue: every callback has fired, with
/// success, by the time drop returns.
#[test]
fn drop_drains_the_queue() {
    for opened in both(StoreConfig::default()) {
        let fired = Arc::new(AtomicUsize::new(0));
        for s in 0..1000 {
            let fired = fired.clone();
            let done = Box::new(move |r: Result<(), StoreError>| {
                r.unwrap();
                fired.fetch_add(1, Ordering::SeqCst);
            });
            opened
                .store
                .append(vec![(channel("c"), item(s, s as u64))], done)
                .unwrap();
        }
        drop(opened);
        assert_eq!(fired.load(Ordering::SeqCst), 1000);
    }
}

/// A callback may drop the last handle to the store, or call flush, without
/// deadlocking the writer thread.
#[test]
fn callbacks_may_drop_or_flush_the_store() {
    for opened in both(StoreConfig::default()) {
        let store = opened.store.clone();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (finished_tx, finished_rx) = mpsc::channel::<()>();
        let flusher = store.clone();
        store
            .append(Vec::new(), Box::new(move |_| flusher.flush()))
            .unwrap();
        let holder = store.clone();
        store
            .append(
                Vec::new(),
                Box::new(move |_| {
                    go_rx.recv_timeout(WAIT).unwrap();
                    drop(holder);
                    finished_tx.send(()).unwrap();
                }),
            )
            .unwrap();
        drop(store);
        drop(opened.store);
        go_tx.send(()).unwrap();
        finished_rx.recv_timeout(WAIT).unwrap();
    }
}

/// A panicking callback does not stop persistence for later appends.
#[test]
fn panicking_callback_is_contained() {
    for opened in both(StoreConfig::default()) {
        opened
            .store
            .append(
                Vec::new(),
                Box::new(|_| panic!("callback panics on purpose")),
            )
            .unwrap();
        append_all(&opened.store, vec![(channel("c"), item(1, 1))]);
    }
}

/// A name too long for a key is refused up front (callback not called) and queried
/// as an error, never truncated into another channel.
#[test]
fn overlong_names_are_refused() {
    for opened in both(StoreConfig::default()) {
        let long = "x".repeat(tern_store::NAME_BYTES_MAX + 1);
        let refused = opened.store.append(
            vec![(channel(&long), item(1, 1))],
            Box::new(|_| panic!("a refused append's callback fired")),
        );
        assert!(matches!(refused, Err(StoreError::NameTooLong { .. })));
        let q = query(&long, Direction::Forwards, 10);
        assert!(matches!(
            opened.store.query(&q),
            Err(StoreError::NameTooLong { .. })
        ));
    }
}

/// Negative and extreme timestamps sort and page like any other.
#[test]
fn extreme_timestamps_are_ordered() {
    for opened in both(StoreConfig::default()) {
        let stamps = [i64::MIN, -5, 0, 5, i64::MAX];
        append_all(
            &opened.store,
            stamps
                .iter()
                .enumerate()
                .map(|(n, &t)| (channel("c"), item(t, n as u64)))
                .collect(),
        );
        let got = read_all(&opened.store, query("c", Direction::Backwards, 2), 5);
        assert_eq!(seqs(&got), vec![4, 3, 2, 1, 0]);
    }
}

/// A channel's cursor is the highest committed sequence per origin over messages and
/// presence together, and it outlives retention (both engines) and a reopen (redb): a
/// node continues its sequences from it after dropping an idle channel from memory.
#[test]
fn cursor_outlives_retention_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let retention = vec![RetentionRule {
        prefix: String::new(),
        max_count: 1,
        max_age_ms: 1_000,
    }];
    let config = StoreConfig {
        retention,
        ..StoreConfig::default()
    };
    let redb = StoreConfig {
        path: Some(dir.path().join("history.redb")),
        ..config.clone()
    };
    let from = |origin: u64, seq: u64| StoredItem {
        origin,
        ..item(seq as i64, seq)
    };
    for config in [config, redb.clone()] {
        let store = open(&config).unwrap();
        assert_eq!(store.cursor("app", "c").unwrap(), vec![]);
        let presence = ChannelRef::new("app", "c", EventKind::Presence);
        append_all(
            &store,
            vec![
                (channel("c"), from(1, 1)),
                (channel("c"), from(2, 1)),
                (presence.clone(), from(1, 2)),
                (channel("c"), from(2, 2)),
                (channel("other"), from(1, 9)),
            ],
        );
        // Out of order and older: the cursor keeps the highest.
        append_all(&store, vec![(channel("c"), from(1, 1))]);
        assert_eq!(store.cursor("app", "c").unwrap(), vec![(1, 2), (2, 2)]);
        assert_eq!(store.cursor("app", "other").unwrap(), vec![(1, 9)]);
        assert_eq!(store.cursor("other-app", "c").unwrap(), vec![]);
        // Every item past its age: history is empty, the cursor is not.
        assert!(store.trim(1_000_000).unwrap() > 0);
        assert!(read_all(&store, query("c", Direction::Forwards, 10), 2).is_empty());
        assert_eq!(store.cursor("app", "c").unwrap(), vec![(1, 2), (2, 2)]);
    }
    let reopened = open(&redb).unwrap();
    assert_eq!(reopened.cursor("app", "c").unwrap(), vec![(1, 2), (2, 2)]);
}

/// The channels with stored messages, a page at a time (both engines): every such
/// channel once, in key order across pages; a channel with only presence, or a
/// message's changes, is not one; an empty store has none.
#[test]
fn message_channels_page_through_the_channels_with_messages() {
    for opened in both(StoreConfig::default()) {
        let store = &opened.store;
        let first = store.message_channels(None, 2).unwrap();
        assert_eq!(first, tern_store::ChannelPage::default());
        let mut items = Vec::new();
        for name in ["c0", "c1", "c2", "c3", "c4"] {
            items.push((channel(name), item(1, 1)));
        }
        items.push((
            ChannelRef::new("app", "only-presence", EventKind::Presence),
            item(1, 2),
        ));
        items.push((
            ChannelRef::new("other", "c0", EventKind::Message),
            item(1, 3),
        ));
        items.push((
            ChannelRef::of_message("app", "c1", "serial", EventKind::Versions),
            item(1, 4),
        ));
        append_all(store, items);
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        for _ in 0..20 {
            let page = store.message_channels(after.as_deref(), 2).unwrap();
            seen.extend(page.channels);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut want: Vec<(String, String)> = ["c0", "c1", "c2", "c3", "c4"]
            .iter()
            .map(|c| ("app".to_string(), c.to_string()))
            .collect();
        want.push(("other".into(), "c0".into()));
        assert_eq!(seen, want);
    }
}
