//! One node: what it is made of (`NodePlan`), and building and starting it
//! (`start_node`: store, hub, edge, cluster, housekeeping, client port).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_core::{Hub, OriginId};
use tern_edge::EdgeState;
use tokio::sync::watch;

use crate::config::Config;
use crate::{admin, cluster, handover, hooks, occupancy, recorder, recover, rules};

/// One node to start, and how it joins a cluster (if it does).
pub(crate) struct NodePlan {
    pub(crate) config: Config,
    pub(crate) cluster: Option<tern_cluster::cluster::ClusterConfig>,
}

/// One running node: its server task, its store (flushed at shutdown) and its cluster
/// membership (left at shutdown).
pub(crate) struct RunningNode {
    pub(crate) addr: SocketAddr,
    /// `http` or `https`.
    pub(crate) scheme: &'static str,
    /// The client port's TLS, reloaded on SIGHUP.
    pub(crate) tls: Option<Arc<tern_edge::tls::ClientTls>>,
    /// The MQTT listener's address, when `[mqtt]` is enabled.
    pub(crate) mqtt: Option<SocketAddr>,
    /// The admin listener's address, unless `[admin]` is disabled.
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) region: Option<String>,
    pub(crate) server: tokio::task::JoinHandle<()>,
    pub(crate) store: Arc<dyn tern_store::HistoryStore>,
    pub(crate) cluster: Option<Arc<cluster::EdgeCluster>>,
}

/// Builds one node (store, hub, edge, cluster, housekeeping), binds its client port,
/// prints it, and serves until `shutdown` flips.
pub(crate) async fn start_node(
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
        let replicator = replicator.clone();
        tokio::task::spawn_blocking(move || {
            let took = recover::run(&*store, &hub, &earlier, tern_edge::now_ms());
            if took.events > 0 {
                tracing::info!(
                    channels = took.channels,
                    events = took.events,
                    "took this node's earlier stored events back for its peers"
                );
            }
            // Its hub may drop them while idle before any `Heads` named them: a handoff
            // pass names them to every home (`Handoff::on_adopted`).
            if let Some(replicator) = replicator {
                let origins: Vec<u64> = took.origins.into_iter().collect();
                replicator.on_adopted(&origins);
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

/// A node's `node` and `region` metric labels: its node id and cluster region (`local`
/// outside a cluster).
pub(crate) fn node_labels(plan: &NodePlan) -> (String, String) {
    match &plan.cluster {
        Some(cluster) => (cluster.node_id.clone(), cluster.region.clone()),
        None => (plan.config.server_id(), "local".to_string()),
    }
}
