//! Lock order between the hub and the replicator: a publish holds its channel's lock
//! while the replicator journals it (taking the replicator's lock), so nothing may read
//! a channel while holding the replicator's lock. `Heads` did (every second, under the
//! lock, it read each channel's cursor); under 20,000 msg/s the two met, both of a
//! node's runtime threads blocked for good, its gossip fell silent and the cluster
//! declared the region dead. Here the two race flat out on plain threads; a deadlock
//! is a test that does not finish in time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::Node;
use tern_cluster::tls::ClusterCa;
use tern_core::ChannelKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_and_publishes_on_the_same_channels_do_not_deadlock() {
    let ca = ClusterCa::generate().unwrap();
    let a = Arc::new(Node::start(&ca, "a", "r1", 0));
    let b = Node::start(&ca, "b", "r2", 0);
    let specs = [a.spec(), b.spec()];
    a.replicator.set_peers(&specs);
    b.replicator.set_peers(&specs);
    let keys: Vec<ChannelKey> = (0..8)
        .map(|i| ChannelKey::new("app", &format!("room-{i}")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = mpsc::channel();
    let publisher = {
        let (a, keys, stop, done_tx) = (a.clone(), keys.clone(), stop.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.publish(&keys[(n % 8) as usize], &format!("m{n}"));
                n += 1;
            }
            done_tx.send(("publisher", n)).unwrap();
        })
    };
    let heads = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.replicator.send_heads_now();
                rounds += 1;
            }
            done_tx.send(("heads", rounds)).unwrap();
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut finished = Vec::new();
    for _ in 0..2 {
        match done.recv_timeout(Duration::from_secs(10)) {
            Ok(one) => finished.push(one),
            Err(_) => {
                // Exit, not panic: unwinding would drop the runtime, which waits for
                // its deadlocked threads forever.
                eprintln!(
                    "deadlock: after 3 s of racing, only {finished:?} stopped within 10 s \
                     (a thread waits on a lock the other holds)"
                );
                std::process::exit(101);
            }
        }
    }
    publisher.join().unwrap();
    heads.join().unwrap();
    for (who, count) in finished {
        assert!(count > 0, "{who} made progress");
    }
}
