//! The `tern` binary: the composition root. It reads config, builds the core hub, the
//! edge router and the metrics recorder, runs housekeeping, and shuts down cleanly.
//!
//! # Layout
//! - `config`: TOML + CLI/env overrides + validation.
//! - `main.rs`: CLI (`serve`, `dev`), wiring, shutdown.

mod config;

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
    Dev {
        #[arg(long, env = "TERN_PORT")]
        port: Option<u16>,
    },
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
        Command::Dev { port } => {
            let mut parsed = Config::parse(DEV_CONFIG)?;
            if let Some(port) = port {
                parsed.server.port = port;
            }
            (parsed, true)
        }
    };
    config.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config, dev))
}

async fn serve(config: Config, dev: bool) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics_handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;

    let origin = OriginId(rand::random());
    let store = tern_store::open(&config.store_config()).context("opening the history store")?;
    let journal = Arc::new(tern_edge::history::StoreJournal {
        store: store.clone(),
    });
    let hub = Arc::new(Hub::with_journal(
        origin,
        config.core_limits(),
        Some(journal),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(
        EdgeState::new(
            config.edge_config(),
            hub.clone(),
            config.key_ring(),
            Some(Box::new(move || metrics_handle.render())),
            shutdown_rx,
        )
        .with_store(store.clone()),
    );

    let listener = tokio::net::TcpListener::bind((config.server.host.as_str(), config.server.port))
        .await
        .with_context(|| format!("binding {}:{}", config.server.host, config.server.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    println!("tern listening on http://{addr}");
    if dev {
        print_dev_banner(&config, addr);
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

    let app = tern_edge::router(state.clone());
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: disconnecting clients");
        let _ = shutdown_tx.send(true);
    });
    // Clients get DISCONNECTED and close; don't wait on stragglers for long.
    let result = tokio::select! {
        result = server => result.map_err(anyhow::Error::from),
        _ = async {
            let mut signal = std::pin::pin!(shutdown_signal());
            signal.as_mut().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => Ok(()),
    };
    sweeper.abort();
    let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    result
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
