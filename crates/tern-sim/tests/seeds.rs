//! Seed sweep over the simulated cluster. A failure prints the command that replays it.

use tern_cluster::topology::Topology;
use tern_sim::{latencies, Faults, Rng, Shape, Sim, Stats, DURABLE_IDLE_RETAIN_MS, IDLE_RETAIN_MS};

/// One-way delays between the regions of `regions/topology.toml`.
fn topology() -> Vec<Vec<i64>> {
    let topology = Topology::parse(include_str!("../../../regions/topology.toml"))
        .expect("regions/topology.toml parses");
    let regions = &topology.regions;
    regions
        .iter()
        .map(|a| {
            regions
                .iter()
                .map(|b| {
                    topology
                        .link(a, b)
                        .map_or(0, |link| link.delay.as_millis() as i64)
                })
                .collect()
        })
        .collect()
}

/// The seed's cluster: 2 or 3 of the topology's regions, 1 to 3 nodes each (2 to 6 nodes
/// in all), at least one region with 2 or more. Returns each node's region and the node
/// latency matrix.
fn layout(seed: u64, regions: &[Vec<i64>]) -> (Vec<usize>, Vec<Vec<i64>>) {
    let mut rng = Rng::new(seed ^ 0x7e57_1a7e_5eed_0001);
    let count = if regions.len() >= 3 && rng.chance(40) {
        3
    } else {
        2.min(regions.len())
    };
    let most = if count == 3 { 2 } else { 3 };
    let mut sizes: Vec<usize> = (0..count).map(|_| 1 + rng.below(most) as usize).collect();
    if sizes.iter().all(|&n| n < 2) {
        sizes[rng.below(count as u64) as usize] = 2;
    }
    let node_regions: Vec<usize> = sizes
        .iter()
        .enumerate()
        .flat_map(|(region, &n)| std::iter::repeat_n(region, n))
        .collect();
    let latency = latencies(&node_regions, |a, b| regions[a][b]);
    (node_regions, latency)
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One run: random publishes, presence changes, deliveries, partitions, heals, crashes
/// and restarts with faults on every link; invariants after every step; then heal,
/// restart some of the crashed nodes, drain, anti-entropy, and convergence; then, on a
/// network that no longer loses messages, one message from every live node and
/// convergence again without anti-entropy.
fn run(seed: u64) -> Result<Stats, String> {
    let faults = Faults {
        drop: 10,
        duplicate: 10,
        jitter_ms: 60,
        detect_ms: 2_000,
        settle_ms: env("TERN_SIM_SETTLE_MS").unwrap_or(3_000),
        skew_ms: 2_000,
        ordered_links: false,
    };
    let (regions, latency) = layout(seed, &topology());
    let trace = std::env::var("TERN_SIM_TRACE").is_ok_and(|v| v == "1");
    if trace {
        eprintln!("seed {seed}: node regions {regions:?}");
    }
    // Three kinds of seed: even ones keep channels in memory and lose a node's store
    // with it; seeds 1 mod 4 drop idle channels (`tern_sim::IDLE_RETAIN_MS`); seeds 3
    // mod 4 run as the server's defaults do, stores that survive a restart (the disk
    // store) and idle channels dropped, after `DURABLE_IDLE_RETAIN_MS`.
    // `TERN_SIM_IDLE_RETAIN_MS` sets the retention for every seed (0: keep them),
    // `TERN_SIM_DURABLE_STORE` (1 or 0) the store's kind.
    let durable_store = match env::<u8>("TERN_SIM_DURABLE_STORE") {
        Some(v) => v == 1,
        None => seed % 4 == 3,
    };
    let idle_retain_ms = match env::<i64>("TERN_SIM_IDLE_RETAIN_MS") {
        Some(0) => None,
        Some(ms) => Some(ms),
        None if seed % 4 == 3 => Some(DURABLE_IDLE_RETAIN_MS),
        None => (seed % 2 == 1).then_some(IDLE_RETAIN_MS),
    };
    let shape = Shape {
        idle_retain_ms,
        durable_store,
        ..Shape::default()
    };
    let mut sim = Sim::with_shape(seed, regions, latency, faults, shape);
    sim.trace = trace;
    let fail = |sim: &Sim, err: String| {
        let settle: String = [
            "TERN_SIM_SETTLE_MS",
            "TERN_SIM_IDLE_RETAIN_MS",
            "TERN_SIM_DURABLE_STORE",
        ]
        .iter()
        .filter_map(|name| Some(format!("{name}={} ", std::env::var(name).ok()?)))
        .collect();
        Err(format!(
            "seed {seed}: {err}\n  replay: {settle}{} (TERN_SIM_TRACE=1 prints every step)",
            sim.replay_command()
        ))
    };
    let nodes = sim.node_count() as u64;
    for _ in 0..400 {
        let roll = sim.rng().below(100);
        let at = sim.rng().below(nodes) as usize;
        match roll {
            0..=21 => sim.publish(at),
            22..=33 => sim.presence(at),
            34..=87 => {
                sim.deliver_next();
            }
            88..=90 => {
                let other = (at + 1 + sim.rng().below(nodes - 1) as usize) % nodes as usize;
                sim.partition(at, other);
            }
            91..=92 => sim.heal(),
            93 => {
                sim.crash(at);
            }
            94..=95 => {
                sim.restart(at);
            }
            _ => sim.anti_entropy(),
        }
        if let Err(err) = sim.check_step() {
            return fail(&sim, err);
        }
    }
    sim.heal();
    for at in 0..sim.node_count() {
        if sim.rng().chance(50) {
            sim.restart(at);
        }
    }
    // Anti-entropy rounds until quiet, a second apart as the driver's: each round's
    // repairs can themselves be dropped, and a dead origin's gap nobody can fill is
    // skipped only once it has stood still for `GAP_GIVE_UP` (`GAP_GIVE_UP_GONE` when
    // its node stays down).
    let mut converged = Err(String::new());
    for _ in 0..tern_sim::final_rounds() {
        if let Err(err) = drain(&mut sim) {
            return fail(&sim, err);
        }
        converged = sim.check_converged();
        if converged.is_ok() {
            break;
        }
        if let Err(err) = sim.advance_to(sim.now_ms() + 1_000) {
            return fail(&sim, err);
        }
        sim.anti_entropy();
    }
    if let Err(err) = converged {
        return fail(&sim, err);
    }
    // Routing alone, with no anti-entropy: on a network that loses nothing, one more
    // message from every live node reaches every subscriber and home (so a home that
    // did not relay, or an origin that skipped a home, fails here).
    sim.calm();
    sim.refresh_interest();
    if let Err(err) = drain(&mut sim) {
        return fail(&sim, err);
    }
    for at in 0..sim.node_count() {
        sim.publish(at);
    }
    if let Err(err) = drain(&mut sim) {
        return fail(&sim, err);
    }
    match sim.check_converged() {
        Ok(()) => Ok(sim.stats),
        Err(err) => fail(&sim, format!("after the last messages, routed only: {err}")),
    }
}

/// Delivers everything in flight, checking the step invariants after each delivery.
fn drain(sim: &mut Sim) -> Result<(), String> {
    while sim.deliver_next() {
        sim.check_step()?;
    }
    Ok(())
}

/// Many seeds: the invariants of `tern-sim` after every step and once the network heals.
/// The sweep also proves the faults happened: drops, duplicates, gaps, duplicate
/// deliveries, crashes, restarts, items lost to a crash, presence changes, presence
/// members removed for departed nodes, skips; and that the interest routing was exercised:
/// nodes without subscribers, channel states taken in through `Sync`, events relayed by a
/// home.
///
/// Environment: `TERN_SIM_SEED` runs one seed, `TERN_SIM_SEEDS` sets how many (500),
/// `TERN_SIM_FROM` the first (0; `scripts/sim` splits a soak over processes with it),
/// `TERN_SIM_TRACE=1` prints every step, `TERN_SIM_SETTLE_MS` overrides the minimum time
/// between crashes (3000; 0 shows the crash-cascade limit described in `tern-sim`),
/// `TERN_SIM_IDLE_RETAIN_MS` the idle retention of every seed (seeds 1 mod 4 drop idle
/// channels after `IDLE_RETAIN_MS`, 3 mod 4 after `DURABLE_IDLE_RETAIN_MS`, even ones
/// keep them; 0 keeps them in every seed), `TERN_SIM_DURABLE_STORE` (1 or 0) whether a
/// node's store survives its restart (by default in seeds 3 mod 4).
#[test]
fn seed_sweep() {
    let seeds: Vec<u64> = match env("TERN_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let from: u64 = env("TERN_SIM_FROM").unwrap_or(0);
            (from..from + env("TERN_SIM_SEEDS").unwrap_or(500)).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in seeds.iter().copied() {
        match run(seed) {
            Ok(stats) => total.add(&stats),
            Err(err) => failures.push(err),
        }
    }
    eprintln!(
        "{} seeds in {:?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    if seeds.len() > 1 {
        assert!(
            total.dropped > 0
                && total.duplicated > 0
                && total.gaps > 0
                && total.duplicates_seen > 0
                && total.crashes > 0
                && total.restarts > 0
                && total.lost_to_crash > 0
                && total.presence_changes > 0
                && total.departed_leaves > 0
                && total.skips > 0
                && total.absent_subscribers > 0
                && total.syncs > 0
                && total.relayed > 0
                && total.acks > 0
                && total.resent > 0
                && total.recovered > 0,
            "{total:?}"
        );
    }
}
