//! The `tern` binary: the composition root. It reads config, builds the core hub, the
//! edge router and the metrics recorder, runs housekeeping, and shuts down cleanly.
//!
//! # Layout
//! - `config`: TOML + CLI/env overrides + validation.
//! - `main.rs`: CLI (`serve`, `dev`), the nodes' runtimes, shutdown.
//! - `node`: one node built and started; `dev`: what `tern dev` adds (regions, CA, banner).

mod admin;
mod cluster;
mod config;
mod config_location;
mod describe;
mod dev;
mod handover;
mod hooks;
mod node;
mod occupancy;
mod process;
mod recent;
mod recorder;
mod recover;
mod rules;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, DEV_CONFIG};
use crate::dev::{dev_cluster, dev_topology, print_dev_banner, write_edge_certs};
use crate::node::{node_labels, start_node, NodePlan};

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
