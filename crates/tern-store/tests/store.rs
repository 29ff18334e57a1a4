//! The store through its public API, in both backends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use tern_store::{
    open, ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, RetentionRule, StoreConfig,
    StoredItem,
};

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tern-store-{}-{}-{}",
        name,
        std::process::id(),
        rand_suffix()
    ));
    dir.join("history.redb")
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn channel(name: &str) -> ChannelRef {
    ChannelRef {
        app: "app".into(),
        channel: name.into(),
        kind: EventKind::Message,
    }
}

fn item(ts: i64, seq: u64) -> StoredItem {
    StoredItem {
        timestamp_ms: ts,
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
        .append(items, Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    rx.recv().unwrap().unwrap();
}

fn query(name: &str, direction: Direction, limit: usize) -> HistoryQuery {
    HistoryQuery {
        channel: channel(name),
        start_ms: None,
        end_ms: None,
        limit,
        direction,
        after: None,
        until: None,
    }
}

fn pages(store: &Arc<dyn HistoryStore>, mut q: HistoryQuery) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let page = store.query(&q).unwrap();
        seen.extend(page.items.iter().map(|i| i.seq));
        match page.next {
            Some(next) => q.after = Some(next),
            None => return seen,
        }
    }
}

fn stores(name: &str) -> Vec<Arc<dyn HistoryStore>> {
    vec![
        open(&StoreConfig::default()).unwrap(),
        open(&StoreConfig {
            path: Some(temp_path(name)),
            ..StoreConfig::default()
        })
        .unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Paging in either direction returns every item of the channel exactly once, in
    /// order, whatever the page size; other channels never leak in.
    #[test]
    fn pages_cover_every_item_once(count in 0u64..60, limit in 1usize..9, timestamps in proptest::collection::vec(0i64..20, 60)) {
        for store in stores("pages") {
            let items: Vec<_> = (0..count).map(|s| (channel("c"), item(timestamps[s as usize], s + 1))).collect();
            append_all(&store, items.clone());
            append_all(&store, vec![(channel("other"), item(5, 1000))]);
            let mut expected: Vec<(i64, u64)> = items.iter().map(|(_, i)| (i.timestamp_ms, i.seq)).collect();
            expected.sort();
            let forwards: Vec<u64> = expected.iter().map(|(_, s)| *s).collect();
            prop_assert_eq!(pages(&store, query("c", Direction::Forwards, limit)), forwards.clone());
            let backwards: Vec<u64> = forwards.into_iter().rev().collect();
            prop_assert_eq!(pages(&store, query("c", Direction::Backwards, limit)), backwards);
        }
    }
}

/// Time bounds are inclusive; the untilAttach filter keeps only items at or below the
/// cursor per origin.
#[test]
fn bounds_and_until() {
    for store in stores("bounds") {
        append_all(
            &store,
            (1..=6)
                .map(|s| (channel("c"), item(s as i64 * 10, s)))
                .collect(),
        );
        let mut q = query("c", Direction::Forwards, 100);
        q.start_ms = Some(20);
        q.end_ms = Some(40);
        assert_eq!(pages(&store, q), vec![2, 3, 4]);
        let mut q = query("c", Direction::Backwards, 2);
        q.until = Some(BTreeMap::from([(7, 4)]));
        assert_eq!(pages(&store, q), vec![4, 3, 2, 1]);
        let mut q = query("c", Direction::Backwards, 2);
        q.until = Some(BTreeMap::from([(8, 4)]));
        assert!(pages(&store, q).is_empty());
    }
}

/// Done callbacks fire in append order, empty appends included (they are barriers).
#[test]
fn callbacks_fire_in_order() {
    for store in stores("order") {
        let order = Arc::new(Mutex::new(Vec::new()));
        for n in 0..200u64 {
            let order = order.clone();
            let items = if n % 3 == 0 {
                Vec::new()
            } else {
                vec![(channel("c"), item(1, n))]
            };
            store
                .append(
                    items,
                    Box::new(move |r| {
                        r.unwrap();
                        order.lock().unwrap().push(n)
                    }),
                )
                .unwrap();
        }
        store.flush();
        assert_eq!(*order.lock().unwrap(), (0..200).collect::<Vec<_>>());
    }
}

/// Retention deletes beyond the count and past the age, per the longest prefix rule.
#[test]
fn retention_by_count_and_age() {
    let retention = vec![
        RetentionRule {
            prefix: String::new(),
            max_count: 3,
            max_age_ms: 1_000_000,
        },
        RetentionRule {
            prefix: "short:".into(),
            max_count: 100,
            max_age_ms: 50,
        },
    ];
    let store = open(&StoreConfig {
        retention,
        ..StoreConfig::default()
    })
    .unwrap();
    append_all(
        &store,
        (1..=5).map(|s| (channel("c"), item(s as i64, s))).collect(),
    );
    append_all(
        &store,
        (1..=5)
            .map(|s| (channel("short:x"), item(s as i64 * 20, s)))
            .collect(),
    );
    let deleted = store.trim(110).unwrap();
    assert_eq!(deleted, 2 + 2);
    assert_eq!(
        pages(&store, query("c", Direction::Forwards, 10)),
        vec![3, 4, 5]
    );
    assert_eq!(
        pages(&store, query("short:x", Direction::Forwards, 10)),
        vec![3, 4, 5]
    );
}

/// Everything acknowledged by a done callback is there after the store is dropped and
/// the file reopened.
#[test]
fn committed_items_survive_reopen() {
    let path = temp_path("reopen");
    {
        let store = open(&StoreConfig {
            path: Some(path.clone()),
            ..StoreConfig::default()
        })
        .unwrap();
        for s in 1..=300 {
            append_all(&store, vec![(channel("d"), item(s as i64, s))]);
        }
    }
    let store = open(&StoreConfig {
        path: Some(path),
        ..StoreConfig::default()
    })
    .unwrap();
    assert_eq!(
        pages(&store, query("d", Direction::Forwards, 1000)),
        (1..=300).collect::<Vec<_>>()
    );
}

/// A full writer queue refuses at once with Overloaded instead of growing.
#[test]
fn full_queue_is_refused() {
    let store = open(&StoreConfig {
        queue_max: 1,
        ..StoreConfig::default()
    })
    .unwrap();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    // The first callback blocks the writer until released, so the queue fills up.
    store
        .append(
            Vec::new(),
            Box::new(move |_| {
                let _ = release_rx.lock().unwrap().recv();
            }),
        )
        .unwrap();
    let mut refused = false;
    for _ in 0..10 {
        if let Err(tern_store::StoreError::Overloaded) = store.append(Vec::new(), Box::new(|_| {}))
        {
            refused = true;
            break;
        }
    }
    release_tx.send(()).unwrap();
    assert!(refused);
    store.flush();
}
