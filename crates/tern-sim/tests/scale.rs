//! Control traffic at scale: the bytes of `Heads` and `Interest` one node sends per
//! second, for 3 regions of 3, 10 and 30 nodes and 1k, 10k and 100k channels, computed
//! with the shipped rules (`routing::homes`, `heads::shares`) and the real encoder
//! (`tern_cluster::wire::encode`), in a steady state: every channel has a home in each
//! region and one publishing node; 1,000 subscriptions sit on random nodes. A node
//! holds (and lists in `Heads`) the channels it is home of, publishes on, or has
//! subscribers on, at most `HEADS_CHANNELS_MAX`.
//!
//! `scale_table` prints the table of docs/benchmarks.md (release:
//! `cargo test --release -p tern-sim --test scale -- --ignored --nocapture`);
//! `control_traffic_follows_the_nodes_share` checks the property on a small cluster.

use std::collections::{HashMap, HashSet};

use tern_cluster::wire::{self, FrameV1, HeadV1};
use tern_core::ChannelKey;
use tern_replication::heads::{self, HEADS_CHANNELS_MAX, HEADS_PER_FRAME};
use tern_replication::routing::{self, Node, INTEREST_PER_FRAME, INTEREST_REFRESH};
use tern_sim::Rng;

const REGIONS: usize = 3;
const SUBSCRIPTIONS: usize = 1_000;

/// Mean bytes per node per second: (Heads before, i.e. every held channel to every
/// peer; Heads now, shared channels only; Interest).
fn control_bytes(per_region: usize, channels: usize) -> (f64, f64, f64) {
    let mut rng = Rng::new(7);
    let ids: Vec<String> = (0..REGIONS * per_region).map(|i| format!("n{i}")).collect();
    let regions: Vec<String> = (0..REGIONS).map(|r| format!("r{r}")).collect();
    let nodes: Vec<Node> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Node {
            id,
            region: &regions[i / per_region],
            origin: i as u64 + 1,
        })
        .collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let keys: Vec<ChannelKey> = (0..channels)
        .map(|c| ChannelKey::new("app", &format!("channel-{c}")))
        .collect();
    let publisher: Vec<usize> = (0..channels)
        .map(|_| rng.below(nodes.len() as u64) as usize)
        .collect();
    let mut subscribed: Vec<HashSet<usize>> = vec![HashSet::new(); nodes.len()];
    for _ in 0..SUBSCRIPTIONS {
        let node = rng.below(nodes.len() as u64) as usize;
        subscribed[node].insert(rng.below(channels as u64) as usize);
    }
    let homes: Vec<HashMap<&str, &str>> = keys
        .iter()
        .map(|k| routing::homes(k, nodes.iter().copied()))
        .collect();
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for c in 0..channels {
        let mut holders: HashSet<usize> = homes[c].values().map(|id| index[id]).collect();
        holders.insert(publisher[c]);
        for h in holders {
            held[h].push(c);
        }
    }
    for (n, subs) in subscribed.iter().enumerate() {
        for &c in subs {
            if !held[n].contains(&c) {
                held[n].push(c);
            }
        }
    }
    let head = |c: usize| HeadV1 {
        app: "app".into(),
        channel: keys[c].name.to_string(),
        origins: vec![(nodes[publisher[c]].origin, 100)],
    };
    let frames_bytes = |list: &[usize]| -> usize {
        list.chunks(HEADS_PER_FRAME)
            .map(|chunk| {
                let channels = chunk.iter().map(|&c| head(c)).collect();
                wire::encode(&FrameV1::Heads { channels }).len()
            })
            .sum()
    };
    let (mut before, mut now, mut interest) = (0usize, 0usize, 0usize);
    for (n, me) in nodes.iter().enumerate() {
        let listed = &held[n][..held[n].len().min(HEADS_CHANNELS_MAX)];
        let all = frames_bytes(listed);
        let peers: Vec<usize> = (0..nodes.len()).filter(|&p| p != n).collect();
        before += all * peers.len();
        for &p in &peers {
            let same_region = nodes[p].region == me.region;
            let shared: Vec<usize> = listed
                .iter()
                .copied()
                .filter(|&c| {
                    heads::shares(
                        &homes[c],
                        nodes[p],
                        same_region && subscribed[p].contains(&c),
                    )
                })
                .collect();
            now += frames_bytes(&shared);
        }
        let mine: Vec<(String, String)> = subscribed[n]
            .iter()
            .map(|&c| ("app".to_string(), keys[c].name.to_string()))
            .collect();
        let per_peer: usize = mine
            .chunks(INTEREST_PER_FRAME)
            .map(|chunk| {
                wire::encode(&FrameV1::Interest {
                    channels: chunk.to_vec(),
                    on: true,
                })
                .len()
            })
            .sum();
        interest += per_peer * (per_region - 1);
    }
    let count = nodes.len() as f64;
    let refresh = INTEREST_REFRESH.as_secs_f64();
    (
        before as f64 / count,
        now as f64 / count,
        interest as f64 / count / refresh,
    )
}

#[test]
fn control_traffic_follows_the_nodes_share() {
    // More nodes per region: each holds a smaller share, so it sends fewer Heads bytes
    // now; before, every held channel went to every peer.
    let (before_3, now_3, _) = control_bytes(3, 2_000);
    let (before_10, now_10, _) = control_bytes(10, 2_000);
    assert!(now_10 < now_3, "{now_10} vs {now_3}");
    assert!(now_3 < before_3 && now_10 < before_10);
    // More channels at the same size: bytes grow with the node's share of them.
    let (_, now_more, _) = control_bytes(3, 4_000);
    assert!(now_more < now_3 * 2.5, "{now_more} vs {now_3}");
}

#[test]
#[ignore = "prints the table of docs/benchmarks.md; run in release"]
fn scale_table() {
    println!(
        "| nodes per region | channels | Heads before (B/s) | Heads now (B/s) | Interest (B/s) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for per_region in [3, 10, 30] {
        for channels in [1_000, 10_000, 100_000] {
            let (before, now, interest) = control_bytes(per_region, channels);
            println!("| {per_region} | {channels} | {before:.0} | {now:.0} | {interest:.0} |");
        }
    }
}
