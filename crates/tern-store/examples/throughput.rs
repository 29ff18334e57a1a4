//! Publish → history write throughput: 100,000 items of 200 bytes appended one per call,
//! as publishes arrive, spread over 100 channels, with many appends in flight; the clock
//! stops when the last done callback fires (for redb: when it is fsynced). Then 1,000
//! history reads of the newest 100 items. Runs redb (in a temp dir) and memory mode.
//!
//! Run: `cargo run --release -p tern-store --example throughput`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_store::{
    open, ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore, StoreConfig, StoreError,
    StoredItem,
};

const ITEMS: u64 = 100_000;
const PAYLOAD_BYTES: usize = 200;
const CHANNELS: u64 = 100;
const QUERIES: u64 = 1_000;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redb = StoreConfig {
        path: Some(dir.path().join("history.redb")),
        ..StoreConfig::default()
    };
    run("redb", &redb);
    run("memory", &StoreConfig::default());
}

fn run(label: &str, config: &StoreConfig) {
    let store = open(config).expect("open store");
    let channels: Vec<ChannelRef> = (0..CHANNELS)
        .map(|n| ChannelRef::new("bench", &format!("room-{n}"), EventKind::Message))
        .collect();
    let (write_secs, refusals) = write(&store, &channels);
    println!(
        "{label:>6} write: {ITEMS} items x {PAYLOAD_BYTES} B, 1 per append, in {write_secs:.2} s \
         = {:.0} items/s, {:.1} MB/s ({refusals} Overloaded retries)",
        ITEMS as f64 / write_secs,
        (ITEMS as f64 * PAYLOAD_BYTES as f64) / write_secs / 1e6,
    );
    let read_secs = read(&store, &channels);
    println!(
        "{label:>6} read:  {QUERIES} queries x 100 newest items in {read_secs:.2} s = {:.0} queries/s",
        QUERIES as f64 / read_secs,
    );
}

/// Returns seconds from the first append to the last callback, and how many appends
/// were refused (and retried) because the queue was full.
fn write(store: &Arc<dyn HistoryStore>, channels: &[ChannelRef]) -> (f64, u64) {
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let committed = Arc::new(AtomicU64::new(0));
    let (all_done_tx, all_done_rx) = mpsc::sync_channel::<()>(1);
    let mut refusals = 0;
    let start = Instant::now();
    for seq in 1..=ITEMS {
        let channel = &channels[(seq % CHANNELS) as usize];
        let item = StoredItem {
            timestamp_ms: 1_700_000_000_000 + seq as i64,
            origin: 1,
            seq,
            index: 0,
            payload: payload.clone(),
        };
        loop {
            let committed = committed.clone();
            let all_done_tx = all_done_tx.clone();
            let done = Box::new(move |result: Result<(), StoreError>| {
                result.expect("commit");
                if committed.fetch_add(1, Ordering::Relaxed) + 1 == ITEMS {
                    let _ = all_done_tx.try_send(());
                }
            });
            match store.append(vec![(channel.clone(), item.clone())], done) {
                Ok(()) => break,
                Err(StoreError::Overloaded) => {
                    // A publisher would NACK; the benchmark waits a moment and retries.
                    refusals += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(err) => panic!("append: {err}"),
            }
        }
    }
    all_done_rx.recv().expect("every append completes");
    (start.elapsed().as_secs_f64(), refusals)
}

fn read(store: &Arc<dyn HistoryStore>, channels: &[ChannelRef]) -> f64 {
    let start = Instant::now();
    for n in 0..QUERIES {
        let query = HistoryQuery {
            limit: 100,
            direction: Direction::Backwards,
            ..HistoryQuery::new(channels[(n % CHANNELS) as usize].clone())
        };
        let page = store.query(&query).expect("query");
        assert_eq!(page.items.len(), 100);
    }
    start.elapsed().as_secs_f64()
}
