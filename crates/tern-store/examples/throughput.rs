//! Publish → history write throughput: 100,000 items of 200 bytes appended one per call
//! (as publishes arrive), many in flight, for redb and for memory mode.
//! Run: `cargo run --release -p tern-store --example throughput`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tern_store::{open, ChannelRef, EventKind, StoreConfig, StoredItem};

const ITEMS: u64 = 100_000;
const PAYLOAD: usize = 200;

fn run(label: &str, config: StoreConfig) {
    let store = open(&config).expect("open store");
    let channel = ChannelRef {
        app: "bench".into(),
        channel: "throughput".into(),
        kind: EventKind::Message,
    };
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    for seq in 1..=ITEMS {
        let item = StoredItem {
            timestamp_ms: seq as i64,
            origin: 1,
            seq,
            index: 0,
            payload: payload.clone(),
        };
        loop {
            let counter = done.clone();
            let on_commit = Box::new(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            });
            if store
                .append(vec![(channel.clone(), item.clone())], on_commit)
                .is_ok()
            {
                break;
            }
            std::thread::yield_now();
        }
    }
    store.flush();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(done.load(Ordering::Relaxed), ITEMS);
    println!(
        "{label:>6}: {ITEMS} items x {PAYLOAD} B in {secs:.2} s = {:.0} items/s, {:.1} MB/s",
        ITEMS as f64 / secs,
        (ITEMS as usize * PAYLOAD) as f64 / secs / 1e6
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("tern-store-throughput-{}", std::process::id()));
    run(
        "redb",
        StoreConfig {
            path: Some(dir.join("history.redb")),
            ..StoreConfig::default()
        },
    );
    run("memory", StoreConfig::default());
    let _ = std::fs::remove_dir_all(dir);
}
