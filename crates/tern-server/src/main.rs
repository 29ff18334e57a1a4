//! The `tern` binary: the composition root. It reads config, builds the core hub, the
//! edge router and the metrics recorder, runs housekeeping, and shuts down cleanly.
//!
//! # Layout
//! - `config`: TOML + CLI/env overrides + validation.
//! - `main.rs`: CLI (`serve`, `dev`), wiring, shutdown.

mod admin;
mod cluster;
mod config;
mod config_location;
mod describe;
mod handover;
mod hooks;
mod occupancy;
mod process;
mod recent;
mod recorder;
mod recover;
mod rules;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_core::{Hub, OriginId};
use tern_edge::EdgeState;
use tokio::sync::watch;

use crate::config::{Config, DEV_CONFIG};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Self-hosted realtime messaging that speaks the Ably protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run from a TOML config file (see config.example.toml).
    Serve {
        #[arg(long, env = "TERN_CONFIG")]
        config: std::path::PathBuf,
        /// Overrides server.port (0 picks a free port; the bound port is printed).
        #[arg(long, env = "TERN_PORT")]
        port: Option<u16>,
        /// Overrides server.host.
        #[arg(long, env = "TERN_HOST")]
        host: Option<String>,
        /// Overrides any setting: `--set cluster.seeds='["10.0.0.1:7946"]'` (a dotted key,
        /// a TOML value; repeatable). For running a production config elsewhere.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Run locally with a built-in development app and key: three regions in one
    /// process (client ports PORT, PORT+1, PORT+2; admin ports and status pages 100
    /// above), replicating over mutual-TLS QUIC.
    Dev {
        /// The first region's client port (0 picks free ports for all).
        #[arg(long, env = "TERN_PORT")]
        port: Option<u16>,
        /// How many regions to run (1 = a single node).
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// Start from empty history: delete ./tern-data/dev (history persists there
        /// across runs otherwise).
        #[arg(long)]
        fresh: bool,
        /// Serve https:// and wss:// with a throwaway CA (written to tern-data/dev/tls/;
        /// its path is printed, to trust it in clients).
        #[arg(long)]
        tls: bool,
        /// The regions and the WAN between them, from this topology file (the format of
        /// regions/topology.toml, which is built in and the default): e.g. your own
        /// regions' delays, or zero delay to see what replication itself adds.
        #[arg(long)]
        topology: Option<std::path::PathBuf>,
    },
    /// Write a new cluster CA, node certificates (PEM) and gossip key for `[cluster]`
    /// configs (`--nodes`), and/or a client-port certificate with its own throwaway CA
    /// for `[server.tls]` (`--edge-names`).
    Certs {
        /// Directory to write `ca.pem`, `NODE.pem`, `NODE.key` and `gossip.key` into
        /// (and `edge-ca.pem`, `edge.pem`, `edge.key`).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Node names, comma-separated.
        #[arg(long, value_delimiter = ',', required_unless_present = "edge_names")]
        nodes: Vec<String>,
        /// Names (DNS or IP) the client-port certificate is for, comma-separated.
        #[arg(long, value_delimiter = ',')]
        edge_names: Vec<String>,
    },
}

/// Logs go to stderr: `TERN_LOG` filters (default `info`), `TERN_LOG_FORMAT=json` writes
/// one JSON object a line; colour only for a person at a terminal (never into files) and
/// never with `NO_COLOR` set.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Warnings and errors are also kept for the status page (`recent.rs`).
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    if std::env::var("TERN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().finish().with(recent::RecentErrors).init();
    } else {
        let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        builder
            .with_ansi(colour)
            .finish()
            .with(recent::RecentErrors)
            .init();
    }
}

/// The process's own runtime: it only starts the nodes (each on a runtime of its own,
/// `recorder.rs`) and waits for signals, so one thread is enough.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    let (config, dev) = match cli.command {
        Command::Serve {
            config,
            port,
            host,
            set,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading config {}", config.display()))?;
            let mut parsed = Config::parse_with(&text, &set)
                .with_context(|| format!("in {}", config.display()))?;
            if let Some(port) = port {
                parsed.server.port = port;
            }
            if let Some(host) = host {
                parsed.server.host = host;
            }
            (parsed, false)
        }
        Command::Certs {
            out,
            nodes,
            edge_names,
        } => {
            if !nodes.is_empty() {
                cluster::write_certs(&out, &nodes)?;
                println!(
                    "wrote {} (ca.pem, gossip.key and a .pem/.key per node)",
                    out.display()
                );
            }
            if !edge_names.is_empty() {
                write_edge_certs(&out, &edge_names)?;
                println!(
                    "wrote {} (edge-ca.pem, edge.pem, edge.key: [server.tls] cert and key; clients trust edge-ca.pem)",
                    out.display()
                );
            }
            return Ok(());
        }
        Command::Dev {
            port,
            regions,
            fresh,
            tls,
            topology,
        } => {
            // The regions of the topology (regions/topology.toml, built in, unless
            // --topology names another), in file order.
            let topology = dev_topology(topology.as_deref())?;
            let names = topology.regions.clone();
            anyhow::ensure!(
                (1..=names.len()).contains(&regions),
                "--regions must be 1 to {} (the regions of the topology)",
                names.len()
            );
            let data = std::path::Path::new("tern-data/dev");
            if fresh && data.exists() {
                std::fs::remove_dir_all(data)
                    .with_context(|| format!("removing {} (--fresh)", data.display()))?;
            }
            let kept = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
            println!(
                "tern dev: history in {} ({}; --fresh starts empty)",
                kept.display(),
                if data.exists() {
                    "kept from earlier runs"
                } else {
                    "new"
                }
            );
            let tls_dir = std::path::PathBuf::from("tern-data/dev/tls");
            if tls {
                write_edge_certs(&tls_dir, &["localhost".into(), "127.0.0.1".into()])?;
            }
            let mut configs = Vec::new();
            for (i, name) in names.iter().take(regions).enumerate() {
                let mut parsed = Config::parse(DEV_CONFIG)?;
                let base = port.unwrap_or(parsed.server.port);
                parsed.server.port = if base == 0 { 0 } else { base + i as u16 };
                parsed.server.server_id = Some(format!("tern-dev-{name}"));
                parsed.history.path = format!("tern-data/dev/{name}/history.redb").into();
                parsed
                    .admin
                    .listen
                    .set_port(admin::dev_port(parsed.server.port));
                if tls {
                    parsed.server.tls = Some(config::TlsSection {
                        cert: tls_dir.join("edge.pem"),
                        key: tls_dir.join("edge.key"),
                    });
                }
                configs.push((parsed, name.to_string()));
            }
            let nodes = if regions > 1 {
                dev_cluster(configs, topology)?
            } else {
                configs
                    .into_iter()
                    .map(|(config, _)| NodePlan {
                        config,
                        cluster: None,
                    })
                    .collect()
            };
            return runtime()?.block_on(serve(nodes, true));
        }
    };
    config.validate()?;
    let cluster = match &config.cluster {
        Some(section) => Some(cluster::from_section(
            section,
            config.server_id(),
            config.client_url(),
        )?),
        None => None,
    };
    runtime()?.block_on(serve(vec![NodePlan { config, cluster }], dev))
}

/// The regions `tern dev` runs and the WAN it emulates between them: the file's, or
/// the built-in regions/topology.toml.
fn dev_topology(
    path: Option<&std::path::Path>,
) -> anyhow::Result<tern_cluster::topology::Topology> {
    let Some(path) = path else {
        return tern_cluster::topology::Topology::parse(cluster::DEV_TOPOLOGY)
            .map_err(anyhow::Error::msg);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    tern_cluster::topology::Topology::parse(&text)
        .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))
}

/// One node to start, and how it joins a cluster (if it does).
struct NodePlan {
    config: Config,
    cluster: Option<tern_cluster::cluster::ClusterConfig>,
}

/// `tern dev` regions: a throwaway CA and gossip key, gossip seeded by the first region,
/// the WAN of `topology` emulated on the links, one replica ack per publish.
fn dev_cluster(
    configs: Vec<(Config, String)>,
    topology: tern_cluster::topology::Topology,
) -> anyhow::Result<Vec<NodePlan>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = tern_cluster::tls::ClusterCa::generate()?;
    let gossip_key = tern_cluster::gossip_auth::GossipKey::random();
    let mut plans = Vec::new();
    let mut seed: Option<String> = None;
    for (config, region) in configs {
        let node_id = config.server_id();
        let gossip = cluster::free_udp_port(&config.server.host)?;
        let quic: SocketAddr = format!("{}:0", config.server.host)
            .parse()
            .context("cluster bind address")?;
        let seeds = seed.iter().cloned().collect();
        seed.get_or_insert_with(|| gossip.to_string());
        plans.push(NodePlan {
            cluster: Some(tern_cluster::cluster::ClusterConfig {
                node_id: node_id.clone(),
                region,
                client_url: String::new(),
                quic_listen: quic,
                gossip_listen: gossip,
                seeds,
                gossip_key: gossip_key.clone(),
                ack_replicas: 1,
                topology: Some(topology.clone()),
                // Named for its node: peers check a link's Hello against it.
                identity: Arc::new(ca.issue(&node_id)?),
                gossip_interval: Duration::from_millis(200),
                failure_detection: Duration::from_millis(1_000),
            }),
            config,
        });
    }
    Ok(plans)
}

/// One running node: its server task, its store (flushed at shutdown) and its cluster
/// membership (left at shutdown).
struct RunningNode {
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    /// The client port's TLS, reloaded on SIGHUP.
    tls: Option<Arc<tern_edge::tls::ClientTls>>,
    /// The MQTT listener's address, when `[mqtt]` is enabled.
    mqtt: Option<SocketAddr>,
    /// The admin listener's address, unless `[admin]` is disabled.
    admin: Option<SocketAddr>,
    region: Option<String>,
    server: tokio::task::JoinHandle<()>,
    store: Arc<dyn tern_store::HistoryStore>,
    cluster: Option<Arc<cluster::EdgeCluster>>,
}

/// Builds one node (store, hub, edge, cluster, housekeeping), binds its client port,
/// prints it, and serves until `shutdown` flips.
async fn start_node(
    plan: NodePlan,
    recorder: recorder::NodeRecorder,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<RunningNode> {
    let (node_name, region) = node_labels(&plan);
    let NodePlan { config, cluster } = plan;
    let origin = OriginId(rand::random());
    // A restarted node is a new incarnation to its peers (and a new origin in cursors).
    let incarnation = tern_edge::now_ms() as u64;
    let store = tern_store::open_with(&config.store_config(), Some(recorder.thread_start()))
        .context("opening the history store")?;
    recorder.spawn_upkeep();
    let store_journal: Arc<dyn tern_core::Journal> = Arc::new(tern_edge::history::StoreJournal {
        store: store.clone(),
    });
    // Webhook outboxes hang behind the history journal (and so behind the replicator).
    let site = cluster.as_ref().map_or("tern", |c| c.region.as_str());
    let (store_journal, outbox) =
        rules::journal(&config, site, store.clone(), origin, store_journal)?;
    let replicator = cluster.as_ref().map(|c| {
        tern_cluster::cluster::ClusterNode::replicator(
            c,
            incarnation,
            origin,
            Some(store_journal.clone()),
        )
    });
    let journal = match &replicator {
        Some(r) => r.clone() as Arc<dyn tern_core::Journal>,
        None => store_journal,
    };
    let hub = Arc::new(Hub::with_journal(
        origin,
        config.core_limits(),
        Some(journal),
    ));
    if let Some(outbox) = &outbox {
        tern_functions::spawn(outbox);
        occupancy::start(hub.clone(), outbox.clone());
    }
    // In a cluster with the disk store: what this node stored under its earlier
    // origins but may not have sent before it stopped goes back into its hub, where
    // its peers find it (`recover`).
    if let (Some(_), Some(path)) = (&cluster, config.store_config().path) {
        let earlier = recover::earlier_origins(&path, origin);
        let (store, hub) = (store.clone(), hub.clone());
        tokio::task::spawn_blocking(move || {
            let (channels, events) = recover::run(&*store, &hub, &earlier, tern_edge::now_ms());
            if events > 0 {
                tracing::info!(
                    channels,
                    events,
                    "took this node's earlier stored events back for its peers"
                );
            }
        });
    }
    let mut state = EdgeState::new(
        config.edge_config(),
        hub.clone(),
        config.key_ring(),
        shutdown.clone(),
    )
    .with_store(store.clone())
    .with_functions(
        Some(Arc::new(tern_functions::Hooks::new(hooks::hooks(
            &config, site,
        )?))),
        outbox.clone(),
    );
    if let Some(cluster) = &cluster {
        // Every member signs connection keys alike, so any of them can vouch for a key
        // another issued (per-connection push after a cross-node resume).
        state =
            state.with_connection_key_secret(cluster.gossip_key.derive(b"tern connection keys v1"));
    }
    let tls = match &config.server.tls {
        Some(files) => Some(
            tern_edge::tls::ClientTls::load(&files.cert, &files.key)
                .context("loading [server.tls]")?,
        ),
        None => None,
    };
    if let Some(tls) = &tls {
        state = state.with_tls(tls.clone());
    }
    let edge_cluster = replicator.map(|replicator| {
        Arc::new(cluster::EdgeCluster {
            replicator,
            node: std::sync::OnceLock::new(),
        })
    });
    if let Some(view) = &edge_cluster {
        state = state.with_cluster(view.clone());
    }
    let state = Arc::new(state);
    let listener = bind_listener(&config.server.host, config.server.port)
        .await
        .with_context(|| format!("binding {}:{}", config.server.host, config.server.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    let admin_addr = admin::start(
        &config.admin,
        admin::Admin {
            edge: state.clone(),
            cluster: edge_cluster.clone(),
            render: recorder.render(),
            token: config.admin.token.clone(),
            node_id: node_name,
            region,
            client_url: format!("{}://{addr}", config.scheme()),
        },
        shutdown,
    )
    .await?;
    let mqtt = match config.mqtt() {
        Some((host, port, mqtt_config)) => {
            let listener = bind_listener(&host, port)
                .await
                .with_context(|| format!("binding the MQTT listener {host}:{port}"))?;
            let mqtt_addr = listener.local_addr()?;
            tokio::spawn(tern_edge::mqtt::serve(listener, state.clone(), mqtt_config));
            Some(mqtt_addr)
        }
        None => None,
    };

    let mut region_name = None;
    if let (Some(mut cluster_config), Some(view)) = (cluster, &edge_cluster) {
        if cluster_config.client_url.is_empty() {
            cluster_config.client_url = format!("{}://{addr}", config.scheme());
        }
        let region = cluster_config.region.clone();
        let barrier: tern_cluster::replicator::Barrier = Arc::new(cluster::StoreHistory {
            store: store.clone(),
        });
        view.replicator.set_history(Arc::new(cluster::StoreHistory {
            store: store.clone(),
        }));
        // Set before the cluster starts, so no event applied from a peer misses its
        // shadow row.
        let shadow_homes = outbox.as_ref().map(|outbox| {
            let homes = handover::ShadowHomes::new(
                view.replicator.clone(),
                cluster_config.node_id.clone(),
                region.clone(),
            );
            outbox.set_placement(homes.clone());
            homes
        });
        let departed_hub = hub.clone();
        let departed_state = state.clone();
        let departed_view = view.clone();
        let node = tern_cluster::cluster::ClusterNode::start(
            cluster_config,
            incarnation,
            view.replicator.clone(),
            &hub,
            barrier,
            state.node_tag().to_string(),
            Arc::new(move |node: &str, tag: &str| {
                let left = departed_hub.node_departed(&format!("{tag}-"), tern_edge::now_ms());
                tracing::info!(%node, presence_left = left, "removed a departed node's presence members");
                // The live member with the oldest incarnation reports the departed
                // node's connections as disconnected (edge `departures`).
                let emitter = departed_view.node.get().is_some_and(|node| {
                    let me = departed_state.node_tag();
                    node.members()
                        .iter()
                        .min_by(|a, b| (a.incarnation, &a.node_id).cmp(&(b.incarnation, &b.node_id)))
                        .is_some_and(|oldest| oldest.tag == me)
                });
                departed_state.node_departed(tag, emitter);
            }),
        )
        .await
        .context("joining the cluster")?;
        let _ = view.node.set(node);
        if let (Some(outbox), Some(homes)) = (&outbox, shadow_homes) {
            handover::start(outbox.clone(), view.clone(), homes);
        }
        region_name = Some(region);
    }
    tracing::info!(%addr, origin = %origin, server_id = %config.server_id(), "tern started");

    // Housekeeping: presence expiry of dropped connections, idle channel removal,
    // expired parked connections, app statistics; load published to the cluster every
    // 5 s; history retention once a minute. A steady node (see `EdgeState::sweep`)
    // sleeps until a client or a channel arrives, the next minute (statistics close it)
    // or the next retention pass.
    let sweeper_state = state.clone();
    let trim_store = store.clone();
    let load_cluster = edge_cluster.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start = tokio::time::Instant::now();
        let mut next_load = start + LOAD_EVERY;
        let mut next_trim = start + TRIM_EVERY;
        let mut load_sent = None;
        let mut steady_until = None;
        loop {
            match steady_until {
                Some(until) => tokio::select! {
                    () = sweeper_state.activity() => {}
                    () = tokio::time::sleep_until(next_trim.min(until)) => {}
                },
                None => {
                    tick.tick().await;
                }
            }
            let now_ms = tern_edge::now_ms();
            let steady = sweeper_state.sweep(now_ms);
            let now = tokio::time::Instant::now();
            if now >= next_load || steady {
                if let Some(node) = load_cluster.as_ref().and_then(|c| c.node.get()) {
                    let load = sweeper_state.connection_count() as u64;
                    if load_sent != Some(load) {
                        node.set_load(load).await;
                        load_sent = Some(load);
                    }
                }
                next_load = now + LOAD_EVERY;
            }
            if now >= next_trim {
                next_trim = now + TRIM_EVERY;
                let store = trim_store.clone();
                let _ = tokio::task::spawn_blocking(move || store.trim(tern_edge::now_ms())).await;
            }
            steady_until = steady.then(|| now + until_next_minute(now_ms));
        }
    });
    let server = tokio::spawn(async move {
        // Serves until the shutdown watch flips, then waits for HTTP requests in flight.
        tern_edge::serve(listener, state).await;
        sweeper.abort();
    });
    Ok(RunningNode {
        addr,
        scheme: config.scheme(),
        tls,
        mqtt,
        admin: admin_addr,
        region: region_name,
        server,
        store,
        cluster: edge_cluster,
    })
}

/// How often housekeeping sweeps while the node is not quiet.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often the node's load (its connection count) is gossiped when it changed.
const LOAD_EVERY: Duration = Duration::from_secs(5);
/// How often history retention runs.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// From `now_ms` to just past the next whole minute (UTC), when app statistics close
/// the minute.
fn until_next_minute(now_ms: i64) -> Duration {
    let into = now_ms.rem_euclid(60_000);
    Duration::from_millis((60_000 - into) as u64 + 1)
}

/// Runs one node (`serve`, or `dev --regions 1`) or several in-process regions (`dev`).
async fn serve(nodes: Vec<NodePlan>, dev: bool) -> anyhow::Result<()> {
    // Each node records into its own recorder, from its own runtime (`recorder.rs`).
    let recorders: Vec<recorder::NodeRecorder> = nodes
        .iter()
        .map(|n| {
            let (node, region) = node_labels(n);
            let recorder = recorder::NodeRecorder::new(&node, &region);
            recorder.with(describe::describe_metrics);
            recorder
        })
        .collect();
    recorder::NodeRecorder::install_global(match recorders.as_slice() {
        [only] => Some(*only),
        _ => None,
    })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if nodes.iter().any(|n| n.cluster.is_some()) {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let banner = nodes.first().map(|n| n.config.key_ring());
    let mut running = Vec::new();
    // Members each node should see before it is announced: all of `tern dev`'s
    // regions, or this node and one seed.
    let expected: Vec<usize> = nodes
        .iter()
        .map(|n| match &n.cluster {
            Some(_) if nodes.len() > 1 => nodes.len(),
            Some(c) if !c.seeds.is_empty() => 2,
            _ => 1,
        })
        .collect();
    let mut runtimes = Vec::new();
    for (plan, recorder) in nodes.into_iter().zip(recorders) {
        let (name, _) = node_labels(&plan);
        let runtime = recorder.runtime(&name)?;
        let started = runtime.spawn(start_node(plan, recorder, shutdown_rx.clone()));
        let started = started
            .await
            .context("starting a node")
            .and_then(|node| node);
        // A runtime cannot be dropped inside this one: one that failed to start its node
        // is shut down without waiting, one that runs is kept for the life of the process.
        let node = match started {
            Ok(node) => node,
            Err(err) => {
                runtime.shutdown_background();
                return Err(err);
            }
        };
        running.push(node);
        runtimes.push(runtime.handle().clone());
        std::mem::forget(runtime);
    }
    // Announce once the cluster has formed (bounded), so that what clients publish
    // right away reaches every region's subscribers without waiting for repair.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (node, expected) in running.iter().zip(expected) {
        let Some(cluster) = node.cluster.as_ref().and_then(|c| c.node.get()) else {
            continue;
        };
        while cluster.members().len() < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if cluster.members().len() < expected {
            tracing::warn!(
                expected,
                live = cluster.members().len(),
                "cluster not fully formed yet; serving anyway"
            );
        }
    }
    for node in &running {
        // Before the HTTP line, which scripts wait for.
        if let Some(mqtt) = node.mqtt {
            println!("tern mqtt listening on {mqtt}");
        }
        if let Some(admin) = node.admin {
            println!("tern admin on http://{admin}/ (status page, /metrics, /regions)");
        }
        println!("tern listening on {}://{}", node.scheme, node.addr);
        if let Some(region) = &node.region {
            println!("  region {region}: {}://{}", node.scheme, node.addr);
        }
    }
    reload_tls_on_sighup(running.iter().filter_map(|n| n.tls.clone()).collect());
    if dev {
        if let (Some(keys), Some(node)) = (banner, running.first()) {
            print_dev_banner(&keys, node.addr, node.scheme == "https", node.mqtt);
        }
    }

    shutdown_signal().await;
    tracing::info!("shutting down: disconnecting clients");
    let _ = shutdown_tx.send(true);
    // Clients get DISCONNECTED and close; don't wait on stragglers for long.
    for (node, runtime) in running.into_iter().zip(runtimes) {
        // On the node's runtime, so what the shutdown records is the node's.
        let stopped = runtime.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), node.server).await;
            let store = node.store;
            let _ = tokio::task::spawn_blocking(move || store.flush()).await;
            if let Some(node) = node.cluster.as_ref().and_then(|c| c.node.get()) {
                node.shutdown().await;
            }
        });
        let _ = stopped.await;
    }
    Ok(())
}

/// A node's `node` and `region` metric labels: its node id and cluster region (`local`
/// outside a cluster).
fn node_labels(plan: &NodePlan) -> (String, String) {
    match &plan.cluster {
        Some(cluster) => (cluster.node_id.clone(), cluster.region.clone()),
        None => (plan.config.server_id(), "local".to_string()),
    }
}

/// SIGHUP reads every node's certificate and key again (new connections get them;
/// open ones keep theirs). A failed reload is logged and keeps the old certificate.
fn reload_tls_on_sighup(tls: Vec<Arc<tern_edge::tls::ClientTls>>) {
    #[cfg(unix)]
    if !tls.is_empty() {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: TLS certificates will not reload");
            return;
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                for node in &tls {
                    match node.reload() {
                        Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate"),
                        Err(err) => {
                            tracing::error!(%err, "SIGHUP: TLS reload failed; keeping the old certificate")
                        }
                    }
                }
            }
        });
    }
}

fn print_dev_banner(
    keys: &tern_auth::KeyRing,
    addr: SocketAddr,
    tls: bool,
    mqtt: Option<SocketAddr>,
) {
    let Some(key) = keys.keys().next().map(|k| k.to_key_string()) else {
        return;
    };
    println!("  app: dev   API key (full capability): {key}");
    if tls {
        let ca = std::path::Path::new("tern-data/dev/tls/edge-ca.pem");
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.to_path_buf());
        println!(
            "  TLS: a throwaway CA signed the certificate; trust {}",
            ca.display()
        );
        println!(
            "    Node: NODE_EXTRA_CA_CERTS={}   Python: SSL_CERT_FILE={}",
            ca.display(),
            ca.display()
        );
        println!(
            "  ably-js: new Ably.Realtime({{ key: '{key}', endpoint: 'localhost', port: {}, tls: true }})",
            addr.port()
        );
    } else {
        println!(
            "  ably-js: new Ably.Realtime({{ key: '{key}', endpoint: '{}', port: {}, tls: false }})",
            addr.ip(),
            addr.port()
        );
    }
    if let (Some(mqtt), Some((name, secret))) = (mqtt, key.split_once(':')) {
        println!(
            "  mqtt: mosquitto_sub -h {} -p {} -u {name} -P {secret} -t 'my/topic'",
            mqtt.ip(),
            mqtt.port()
        );
    }
}

/// A throwaway CA and a client-port certificate for `names`, as PEM files in `dir`:
/// `edge-ca.pem` (what clients trust), `edge.pem`, `edge.key` (`[server.tls]`).
fn write_edge_certs(dir: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, cert, key) = tern_edge::tls::throwaway(names)?;
    std::fs::write(dir.join("edge-ca.pem"), ca)?;
    std::fs::write(dir.join("edge.pem"), cert)?;
    cluster::write_private(&dir.join("edge.key"), &key)?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Pending connections the kernel queues before `accept`: tokio's default of 1,024
/// overflows in a connection storm while the node is busy, and every dropped SYN costs
/// its client a 1 s retransmit (scripts/bench: 5-6k -> ~18k new connections/s). The
/// kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind_listener(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .context("the host resolves to no address")?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

#[cfg(test)]
mod tests {
    use super::dev_topology;

    #[test]
    fn tern_dev_runs_the_regions_and_links_of_the_topology_it_is_given() {
        let built_in = dev_topology(None).unwrap();
        assert_eq!(built_in.regions, ["us-east", "eu-west", "ap-south"]);
        assert!(built_in.link("us-east", "eu-west").is_some());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.toml");
        std::fs::write(&path, "regions = [\"north\", \"south\"]\n").unwrap();
        let given = dev_topology(Some(&path)).unwrap();
        assert_eq!(given.regions, ["north", "south"]);
        assert!(given.link("north", "south").is_none(), "no link: no delay");

        std::fs::write(
            &path,
            "regions = [\"north\"]\n[[links]]\na = \"north\"\nb = \"west\"\ndelay_ms = 5\n",
        )
        .unwrap();
        let err = dev_topology(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("two.toml") && err.contains("west"), "{err}");
        let missing = dev_topology(Some(&dir.path().join("none.toml"))).unwrap_err();
        assert!(format!("{missing:#}").contains("none.toml"), "{missing:#}");
    }
}
