//! The `tern` binary: the composition root. It reads config, builds the core hub, the
//! edge router and the metrics recorder, runs housekeeping, and shuts down cleanly.
//!
//! # Layout
//! - `config`: TOML + CLI/env overrides + validation.
//! - `main.rs`: CLI (`serve`, `dev`), wiring, shutdown.

mod config;

use axum::serve::ListenerExt;
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
    },
    /// Run locally with a built-in development app and key.
    /// Run locally with a built-in development app and key: three regions in one
    /// process (client ports PORT, PORT+1, PORT+2), replicating over mutual-TLS QUIC.
    Dev {
        /// The first region's client port (0 picks free ports for all).
        #[arg(long, env = "TERN_PORT")]
        port: Option<u16>,
        /// How many regions to run (1 = a single node).
        #[arg(long, default_value_t = 3)]
        regions: usize,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (config, dev) = match cli.command {
        Command::Serve { config, port, host } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading config {}", config.display()))?;
            let mut parsed =
                Config::parse(&text).with_context(|| format!("in {}", config.display()))?;
            if let Some(port) = port {
                parsed.server.port = port;
            }
            if let Some(host) = host {
                parsed.server.host = host;
            }
            (parsed, false)
        }
        Command::Dev { port, regions } => {
            let names = ["us-east", "eu-west", "ap-south"];
            anyhow::ensure!(
                (1..=names.len()).contains(&regions),
                "--regions must be 1 to {}",
                names.len()
            );
            let mut nodes = Vec::new();
            for (i, name) in names.iter().take(regions).enumerate() {
                let mut parsed = Config::parse(DEV_CONFIG)?;
                let base = port.unwrap_or(parsed.server.port);
                parsed.server.port = if base == 0 { 0 } else { base + i as u16 };
                parsed.server.server_id = Some(format!("tern-dev-{name}"));
                parsed.history.path = format!("tern-data/dev/{name}/history.redb").into();
                nodes.push((parsed, (regions > 1).then(|| name.to_string())));
            }
            return runtime()?.block_on(serve(nodes, true));
        }
    };
    config.validate()?;
    runtime()?.block_on(serve(vec![(config, None)], dev))
}

/// How a node joins replication (dev mode: the other in-process regions).
struct ClusterWiring {
    endpoint: Arc<tern_cluster::link::LinkEndpoint>,
    peers: Vec<SocketAddr>,
}

/// One running node: its server task and its store (flushed at shutdown).
struct RunningNode {
    addr: SocketAddr,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    store: Arc<dyn tern_store::HistoryStore>,
}

/// Builds one node (store, hub, edge, housekeeping), binds its client port, prints it,
/// and serves until `shutdown` flips.
async fn start_node(
    config: &Config,
    region: Option<&str>,
    cluster: Option<ClusterWiring>,
    metrics_render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<RunningNode> {
    let origin = OriginId(rand::random());
    let store = tern_store::open(&config.store_config()).context("opening the history store")?;
    let store_journal: Arc<dyn tern_core::Journal> = Arc::new(tern_edge::history::StoreJournal {
        store: store.clone(),
    });
    let (journal, replication) = match cluster {
        Some(wiring) => {
            let journal =
                tern_cluster::replicator::ReplicationJournal::new(origin, Some(store_journal));
            (
                journal.clone() as Arc<dyn tern_core::Journal>,
                Some((wiring, journal)),
            )
        }
        None => (store_journal, None),
    };
    let hub = Arc::new(Hub::with_journal(
        origin,
        config.core_limits(),
        Some(journal),
    ));
    if let Some((wiring, journal)) = replication {
        tern_cluster::replicator::spawn_replication(
            wiring.endpoint,
            hub.clone(),
            journal,
            wiring.peers,
        );
    }
    let mut wait_for_shutdown = shutdown.clone();
    let state = Arc::new(
        EdgeState::new(
            config.edge_config(),
            hub.clone(),
            config.key_ring(),
            Some(Box::new(move || metrics_render())),
            shutdown,
        )
        .with_store(store.clone()),
    );
    let listener = tokio::net::TcpListener::bind((config.server.host.as_str(), config.server.port))
        .await
        .with_context(|| format!("binding {}:{}", config.server.host, config.server.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    println!("tern listening on http://{addr}");
    if let Some(region) = region {
        println!("  region {region}: http://{addr}");
    }
    tracing::info!(%addr, origin = %origin, server_id = %config.server_id(), "tern started");

    // Housekeeping: presence expiry of dropped connections, idle channel removal,
    // expired parked connections; history retention once a minute.
    let sweeper_state = state.clone();
    let trim_store = store.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            sweeper_state.sweep(tern_edge::now_ms());
            ticks += 1;
            if ticks.is_multiple_of(60) {
                let store = trim_store.clone();
                let _ = tokio::task::spawn_blocking(move || store.trim(tern_edge::now_ms())).await;
            }
        }
    });
    let app = tern_edge::router(state);
    let server = tokio::spawn(async move {
        // Without TCP_NODELAY, Nagle holds small frames behind the peer's delayed ACK:
        // a 20-40 ms floor on delivery latency (docs/benchmarks.md).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = wait_for_shutdown.wait_for(|down| *down).await;
            })
            .await;
        sweeper.abort();
        result.map_err(anyhow::Error::from)
    });
    Ok(RunningNode {
        addr,
        server,
        store,
    })
}

/// Runs one node (`serve`, or `dev` with `regions` = 1) or several in-process regions
/// replicating over mutual-TLS QUIC (`dev`).
async fn serve(nodes: Vec<(Config, Option<String>)>, dev: bool) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics_handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    let metrics_render: Arc<dyn Fn() -> String + Send + Sync> =
        Arc::new(move || metrics_handle.render());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Several regions: a throwaway cluster CA, one QUIC endpoint per region, full mesh.
    let mut wirings: Vec<Option<ClusterWiring>> = nodes.iter().map(|_| None).collect();
    if nodes.len() > 1 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tern_cluster::tls::ClusterCa::generate()?;
        let mut endpoints = Vec::new();
        for (config, _) in &nodes {
            let identity = ca.issue()?;
            let bind: SocketAddr = format!("{}:0", config.server.host)
                .parse()
                .context("cluster bind address")?;
            endpoints.push(Arc::new(tern_cluster::link::LinkEndpoint::bind(
                bind, &identity,
            )?));
        }
        let addrs: Vec<SocketAddr> = endpoints
            .iter()
            .map(|e| e.local_addr())
            .collect::<Result<_, _>>()?;
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let peers = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect();
            wirings[i] = Some(ClusterWiring { endpoint, peers });
        }
    }
    let mut running = Vec::new();
    for ((config, region), wiring) in nodes.iter().zip(wirings) {
        let node = start_node(
            config,
            region.as_deref(),
            wiring,
            metrics_render.clone(),
            shutdown_rx.clone(),
        )
        .await?;
        running.push(node);
    }
    if dev {
        if let (Some((config, _)), Some(node)) = (nodes.first(), running.first()) {
            print_dev_banner(config, node.addr);
        }
    }

    shutdown_signal().await;
    tracing::info!("shutting down: disconnecting clients");
    let _ = shutdown_tx.send(true);
    // Clients get DISCONNECTED and close; don't wait on stragglers for long.
    for node in running {
        let _ = tokio::time::timeout(Duration::from_secs(5), node.server).await;
        let store = node.store;
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
    Ok(())
}

fn print_dev_banner(config: &Config, addr: SocketAddr) {
    let Some(key) = config.key_ring().keys().next().map(|k| k.to_key_string()) else {
        return;
    };
    println!("  app: dev   API key (full capability): {key}");
    println!(
        "  ably-js: new Ably.Realtime({{ key: '{key}', endpoint: '{}', port: {}, tls: false }})",
        addr.ip(),
        addr.port()
    );
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
