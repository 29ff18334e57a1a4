//! Joining a node to its cluster: `[cluster]` config (or `tern dev`'s in-process regions)
//! into a [`tern_cluster::cluster::ClusterConfig`], and the edge's view of the cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tern_cluster::cluster::{ClusterConfig, ClusterNode};
use tern_cluster::gossip_auth::GossipKey;
use tern_cluster::replicator::Replicator;
use tern_cluster::tls::{ClusterCa, NodeIdentity};
use tern_cluster::topology::Topology;

use crate::config::ClusterSection;

/// The topology `tern dev` emulates (the repository's `regions/topology.toml`).
pub const DEV_TOPOLOGY: &str = include_str!("../../../regions/topology.toml");

/// A `[cluster]` section, with its PEM files, gossip key and topology loaded.
pub fn from_section(
    section: &ClusterSection,
    node_id: String,
    client_url: String,
) -> anyhow::Result<ClusterConfig> {
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let identity = NodeIdentity::from_pem(
        &read(&section.cert)?,
        &read(&section.key)?,
        &read(&section.ca_cert)?,
    )
    .context("loading the cluster certificate")?;
    let node_id = section.node_id.clone().unwrap_or(node_id);
    // Peers read this node's id from its certificate and refuse a link whose Hello
    // says otherwise: a mismatch would leave the node cut off, so refuse to start.
    let certified = identity.node_id().with_context(|| {
        format!(
            "cluster.cert {} names no node: certificates now carry their node's id; \
             issue them again with `tern certs --nodes ...`",
            section.cert.display()
        )
    })?;
    anyhow::ensure!(
        certified == node_id,
        "cluster.cert {} is for node {certified:?} but this node is {node_id:?} \
         (cluster.node_id, or server.server_id by default)",
        section.cert.display()
    );
    let gossip_key = match &section.gossip_key {
        Some(path) => load_gossip_key(path)?,
        None => anyhow::bail!("cluster.gossip_key is required"),
    };
    let topology = match &section.emulate_topology {
        Some(path) => {
            let text = String::from_utf8(read(path)?).context("topology is not UTF-8")?;
            Some(Topology::parse(&text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    Ok(ClusterConfig {
        node_id,
        region: section.region.clone(),
        client_url,
        quic_listen: section.quic_listen,
        gossip_listen: section.gossip_listen,
        seeds: section.seeds.clone(),
        gossip_key,
        ack_replicas: section.ack_replicas,
        topology,
        identity: Arc::new(identity),
        gossip_interval: Duration::from_millis(section.gossip_interval_ms.max(10)),
        failure_detection: Duration::from_millis(section.failure_detection_ms.max(100)),
    })
}

/// The gossip key in the file `[cluster] gossip_key` names (64 hex digits).
pub fn load_gossip_key(path: &Path) -> anyhow::Result<GossipKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cluster.gossip_key: reading {}", path.display()))?;
    GossipKey::from_hex(&text)
        .with_context(|| format!("cluster.gossip_key: {} is not a gossip key", path.display()))
}

/// `tern certs`: a new cluster CA and one certificate per node, as PEM files in `dir`
/// (`ca.pem`, `NODE.pem`, `NODE.key`), and a new gossip key (`gossip.key`). The CA key
/// is not kept. Each certificate names its node (URI SAN `tern-node:NODE`): that node
/// must run with that node id (`cluster.node_id`, default `server.server_id`).
pub fn write_certs(dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ClusterCa::generate()?;
    let (ca_pem, _) = ca.to_pem();
    std::fs::write(dir.join("ca.pem"), ca_pem)?;
    write_private(
        &dir.join("gossip.key"),
        &format!("{}\n", GossipKey::random().to_hex()),
    )?;
    for node in nodes {
        anyhow::ensure!(
            !node.is_empty()
                && node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "node name {node:?} must be [A-Za-z0-9_-]+"
        );
        let (cert, key) = ca.issue(node)?.to_pem();
        std::fs::write(dir.join(format!("{node}.pem")), cert)?;
        write_private(&dir.join(format!("{node}.key")), &key)?;
    }
    Ok(())
}

pub(crate) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(text.as_bytes())?;
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, text)?;
        Ok(())
    }
}

/// A UDP port on `host` for a `tern dev` node's gossip, which must advertise a concrete
/// port: bound now and held until the node's gossip starts on it, so no other socket
/// can take it in between.
pub fn free_udp_port(host: &str) -> anyhow::Result<SocketAddr> {
    tern_cluster::gossip_auth::reserve_udp_port(host).context("reserving a UDP port for gossip")
}

/// What the edge sees of the cluster: replica acks and the live member list.
pub struct EdgeCluster {
    pub replicator: Arc<Replicator>,
    pub node: OnceLock<ClusterNode>,
}

impl tern_edge::ClusterView for EdgeCluster {
    fn after_replicated(
        &self,
        channel: Option<&tern_core::ChannelKey>,
        then: Box<dyn FnOnce(bool) + Send>,
    ) {
        self.replicator.after_replicated(channel, then);
    }

    fn warm(&self, channel: &tern_core::ChannelKey) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.replicator.warm(channel)
    }

    fn home_url(&self, channel: &tern_core::ChannelKey) -> Option<String> {
        let home = self.replicator.home_of(channel)?;
        let node = self.node.get()?;
        node.members()
            .into_iter()
            .find(|m| m.node_id == home)
            .map(|m| m.client_url)
    }

    fn node_by_tag(&self, tag: &str) -> Option<tern_edge::NodeRef> {
        let node = self.node.get()?;
        node.members()
            .into_iter()
            .find(|m| m.tag == tag)
            .map(|m| tern_edge::NodeRef {
                node_id: m.node_id,
                region: m.region,
                client_url: m.client_url,
            })
    }

    fn peer_urls(&self) -> Vec<String> {
        let Some(node) = self.node.get() else {
            return Vec::new();
        };
        let me = &node.me().node_id;
        node.members()
            .into_iter()
            .filter(|m| &m.node_id != me)
            .map(|m| m.client_url)
            .collect()
    }

    fn regions(&self) -> serde_json::Value {
        let Some(node) = self.node.get() else {
            return serde_json::json!({ "regions": [] });
        };
        let members = node.members();
        let mut regions: Vec<&str> = members.iter().map(|m| m.region.as_str()).collect();
        regions.sort();
        regions.dedup();
        let regions: Vec<serde_json::Value> = regions
            .into_iter()
            .map(|region| {
                let nodes: Vec<serde_json::Value> = members
                    .iter()
                    .filter(|m| m.region == region)
                    .map(|m| {
                        serde_json::json!({
                            "nodeId": m.node_id,
                            "endpoint": m.client_url,
                            "load": m.load,
                            "incarnation": m.incarnation,
                        })
                    })
                    .collect();
                serde_json::json!({ "region": region, "nodes": nodes })
            })
            .collect();
        serde_json::json!({ "self": node.me().region, "regions": regions })
    }
}

/// The history store as the replicator copies it to a channel's new home.
pub struct StoreHistory {
    pub store: Arc<dyn tern_store::HistoryStore>,
}

impl StoreHistory {
    fn channel(app: &str, channel: &str, presence: bool) -> tern_store::ChannelRef {
        let kind = if presence {
            tern_store::EventKind::Presence
        } else {
            tern_store::EventKind::Message
        };
        tern_store::ChannelRef::new(app, channel, kind)
    }
}

/// Link acks wait for the store's commits and must see its lost writes.
impl tern_cluster::replicator::LocalStore for StoreHistory {
    fn lost_writes(&self) -> u64 {
        self.store.lost_writes()
    }

    fn after_committed(&self, since: u64, then: Box<dyn FnOnce(bool) + Send>) {
        self.store
            .after_committed(since, Box::new(move |stored| then(stored.is_ok())));
    }
}

/// Whether `app` holds channels, as the handoff and history copying see them: webhook
/// outboxes (and their shadows) are this node's own rows under an app id no client has.
/// Listed, read or written for a peer, a new home would copy another node's outbox and
/// deliver it again (it did: tests/js/test/webhooks-regions), or a peer's rows would land
/// in this node's outbox.
pub(crate) fn copied_between_nodes(app: &str) -> bool {
    app != tern_functions::outbox::OUTBOX_APP
}

impl tern_cluster::replicator::HistoryAccess for StoreHistory {
    fn cursor(&self, app: &str, channel: &str) -> Vec<(u64, u64)> {
        if !copied_between_nodes(app) {
            return Vec::new();
        }
        self.store.cursor(app, channel).unwrap_or_default()
    }

    fn page(
        &self,
        app: &str,
        channel: &str,
        presence: bool,
        after: Option<tern_cluster::wire::ItemPosV1>,
        max: usize,
    ) -> (Vec<tern_cluster::wire::ItemV1>, bool) {
        if !copied_between_nodes(app) {
            return (Vec::new(), false);
        }
        let mut query = tern_store::HistoryQuery::new(Self::channel(app, channel, presence));
        query.direction = tern_store::Direction::Forwards;
        query.limit = max;
        query.after = after.map(|(timestamp_ms, origin, seq, index)| tern_store::Position {
            timestamp_ms,
            origin,
            seq,
            index,
        });
        match self.store.query(&query) {
            Ok(page) => {
                let items = page
                    .items
                    .into_iter()
                    .map(|item| tern_cluster::wire::ItemV1 {
                        position: (item.timestamp_ms, item.origin, item.seq, item.index),
                        payload: item.payload.to_vec(),
                    })
                    .collect();
                (items, page.next.is_some())
            }
            Err(err) => {
                tracing::warn!(%channel, error = %err, "reading history to copy it failed");
                (Vec::new(), false)
            }
        }
    }

    fn events(
        &self,
        app: &str,
        channel: &str,
        origin: u64,
        from: u64,
        to: u64,
    ) -> (Vec<tern_core::RemoteEvent>, u64) {
        if !copied_between_nodes(app) || to < from {
            return (Vec::new(), from);
        }
        // Newest first: a few rows per event at most, and no more than one page of
        // history copies at a time.
        let wanted = usize::try_from(to - from + 1)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .min(tern_replication::backfill::BACKFILL_PAGE * 16);
        let (mut events, mut complete_from) = (Vec::new(), from);
        for presence in [false, true] {
            let until = [(origin, to)].into_iter().collect();
            let (rows, complete) = crate::recover::stored_rows(
                &*self.store,
                (app, channel),
                presence,
                until,
                (None, from),
                wanted,
            );
            if !complete {
                // Older rows were not read: only from the oldest one read is the answer
                // whole (the asker asks again for the rest).
                let oldest = rows.iter().map(|row| row.seq).min().unwrap_or(to + 1);
                complete_from = complete_from.max(oldest);
            }
            let rows = rows.into_iter().filter(|row| row.seq >= from).collect();
            events.extend(tern_edge::history::stored_events(channel, presence, rows));
        }
        (events, complete_from)
    }

    fn put(
        &self,
        app: &str,
        channel: &str,
        presence: bool,
        items: Vec<tern_cluster::wire::ItemV1>,
    ) {
        if !copied_between_nodes(app) {
            tracing::warn!("copied history for a node's own outbox was refused");
            return;
        }
        let target = Self::channel(app, channel, presence);
        let items = items
            .into_iter()
            .map(|item| {
                let (timestamp_ms, origin, seq, index) = item.position;
                (
                    target.clone(),
                    tern_store::StoredItem {
                        timestamp_ms,
                        origin,
                        seq,
                        index,
                        payload: item.payload.into(),
                    },
                )
            })
            .collect::<Vec<_>>();
        // Changes of messages are filed under their message too, as when journaled.
        let versions: Vec<_> = match presence {
            true => Vec::new(),
            false => items
                .iter()
                .filter_map(|(_, item)| tern_edge::history::version_row(app, channel, item))
                .collect(),
        };
        let items = items.into_iter().chain(versions).collect();
        if let Err(err) = self.store.append(items, Box::new(|_| {})) {
            tracing::warn!(%channel, error = %err, "storing copied history failed");
        }
    }

    fn channels(
        &self,
        after: Option<Vec<u8>>,
        max: usize,
    ) -> (
        Vec<tern_cluster::replicator::StoredChannel>,
        Option<Vec<u8>>,
    ) {
        let page = match self.store.message_channels(after.as_deref(), max) {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(error = %err, "listing the stored channels failed");
                return (Vec::new(), None);
            }
        };
        let channels = page
            .channels
            .into_iter()
            .filter(|(app, _)| copied_between_nodes(app))
            .filter_map(|(app, channel)| {
                let cursor = self.store.cursor(&app, &channel).ok()?;
                Some((tern_core::ChannelKey::new(&app, &channel), cursor))
            })
            .collect();
        (channels, page.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node forwarding a write allows for the holder's replica wait: the edge's
    /// figure is the cluster's, so a forwarded push is not answered 504 while the
    /// holder may still ACK it.
    #[test]
    fn the_edge_waits_as_long_as_the_cluster_does() {
        assert_eq!(
            tern_edge::DURABLE_WITHIN,
            tern_cluster::replicator::REPLICA_ACK_TIMEOUT
        );
    }

    /// The handoff lists the channels in the store, never a webhook outbox (a node's
    /// own rows): handed over, its events would be delivered again by the new home.
    #[test]
    fn the_handoff_lists_channels_not_outboxes() {
        use tern_cluster::replicator::HistoryAccess;
        let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
        let item = |seq| tern_store::StoredItem {
            timestamp_ms: 1,
            origin: 7,
            seq,
            index: 0,
            payload: Vec::from(&b"p"[..]).into(),
        };
        let row = |app: &str, channel: &str, seq| {
            let kind = tern_store::EventKind::Message;
            (tern_store::ChannelRef::new(app, channel, kind), item(seq))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let rows = vec![
            row("app", "room", 1),
            row(
                tern_functions::outbox::OUTBOX_APP,
                "\u{1}outbox:app/rule",
                2,
            ),
        ];
        store
            .append(rows, Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        rx.recv().unwrap().unwrap();
        let history = StoreHistory { store };
        let (channels, next) = history.channels(None, 100);
        assert_eq!(next, None);
        assert_eq!(
            channels,
            vec![(tern_core::ChannelKey::new("app", "room"), vec![(7, 1)])]
        );

        // Nor is an outbox read or written for a peer's `Backfill`: a peer asking for one
        // gets nothing, and rows a peer sends for one are not stored.
        let outbox = (tern_functions::outbox::OUTBOX_APP, "\u{1}outbox:app/rule");
        assert_eq!(history.cursor("app", "room"), vec![(7, 1)]);
        assert_eq!(history.cursor(outbox.0, outbox.1), vec![]);
        assert_eq!(history.page("app", "room", false, None, 10).0.len(), 1);
        assert_eq!(
            history.page(outbox.0, outbox.1, false, None, 10),
            (vec![], false)
        );
        let planted = tern_cluster::wire::ItemV1 {
            position: (2, 9, 1, 0),
            payload: b"planted".to_vec(),
        };
        history.put(outbox.0, "\u{1}outbox:app/other", false, vec![planted]);
        let (tx, rx) = std::sync::mpsc::channel();
        history
            .store
            .after_committed(0, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.recv().unwrap());
        assert_eq!(
            history
                .store
                .cursor(outbox.0, "\u{1}outbox:app/other")
                .unwrap(),
            vec![]
        );
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tern-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `tern certs` writes a gossip key that loads (owner-only on unix), a new one each
    /// run.
    #[test]
    fn certs_write_a_loadable_gossip_key() {
        let dir = temp_dir("certs");
        write_certs(&dir, &["a".into(), "b".into()]).unwrap();
        let key = load_gossip_key(&dir.join("gossip.key")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("gossip.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "gossip.key is private");
        }
        write_certs(&dir, &["a".into()]).unwrap();
        let again = load_gossip_key(&dir.join("gossip.key")).unwrap();
        assert_ne!(again.to_hex(), key.to_hex());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `tern certs` names each node in its certificate, and a node starts only with the
    /// certificate naming it: one issued for another node is refused, by name.
    #[test]
    fn a_node_starts_only_with_its_own_certificate() {
        let dir = temp_dir("certs-named");
        write_certs(&dir, &["us-east-1".into(), "eu-west-1".into()]).unwrap();
        let section = |cert: &str| -> ClusterSection {
            toml::from_str(&format!(
                r#"
region = "us-east"
quic_listen = "127.0.0.1:0"
gossip_listen = "127.0.0.1:0"
ca_cert = "{dir}/ca.pem"
cert = "{dir}/{cert}.pem"
key = "{dir}/{cert}.key"
gossip_key = "{dir}/gossip.key"
"#,
                dir = dir.display()
            ))
            .unwrap()
        };
        let url = || "http://127.0.0.1:8080".to_string();
        let own = match from_section(&section("us-east-1"), "us-east-1".into(), url()) {
            Ok(config) => config,
            Err(err) => panic!("{err:#}"),
        };
        assert_eq!(own.node_id, "us-east-1");
        assert_eq!(own.identity.node_id().unwrap(), "us-east-1");
        let err = match from_section(&section("eu-west-1"), "us-east-1".into(), url()) {
            Ok(_) => panic!("a certificate for another node was accepted"),
            Err(err) => format!("{err:#}"),
        };
        assert!(
            err.contains(r#"is for node "eu-west-1" but this node is "us-east-1""#),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A missing or malformed key file is an error naming `cluster.gossip_key` and the
    /// file.
    #[test]
    fn bad_gossip_key_files_are_refused_by_name() {
        let dir = temp_dir("gossip-key");
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("absent.key");
        let err = format!("{:#}", load_gossip_key(&missing).unwrap_err());
        assert!(
            err.contains("cluster.gossip_key") && err.contains("absent.key"),
            "{err}"
        );
        let short = dir.join("short.key");
        std::fs::write(&short, "abcd\n").unwrap();
        let err = format!("{:#}", load_gossip_key(&short).unwrap_err());
        assert!(
            err.contains("cluster.gossip_key") && err.contains("64 hex digits"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A repair for a channel not in memory is answered from the store: the events of
    /// the range rebuilt from their rows, and, when a bounded read did not reach the
    /// range's start, from where it is whole (so no `Skip` covers what was not read).
    #[test]
    fn a_stored_range_is_read_back_as_events() {
        use tern_cluster::replicator::HistoryAccess;
        use tern_core::Journal;
        let store = tern_store::open(&tern_store::StoreConfig::default()).unwrap();
        let journal = tern_edge::history::StoreJournal {
            store: store.clone(),
        };
        let hub = tern_core::Hub::new(tern_core::OriginId(7), tern_core::CoreLimits::default());
        let key = tern_core::ChannelKey::new("app", "room");
        let mut published = Vec::new();
        for i in 0..2_500 {
            let publisher = tern_core::Publisher {
                connection_id: Some("c1".into()),
                frame_id: format!("c1:{i}"),
            };
            let message = tern_protocol::Message {
                name: Some(format!("m{i}")),
                ..Default::default()
            };
            let event = hub
                .publish(&key, &publisher, vec![message], 1_000 + i)
                .unwrap()
                .event
                .unwrap();
            journal.record(&key, &event);
            published.push(event);
        }
        store.flush();
        let history = StoreHistory { store };
        let (events, whole_from) = history.events("app", "room", 7, 3, 5);
        let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        seqs.sort();
        assert_eq!((seqs, whole_from), (vec![3, 4, 5], 3));
        let four = events.iter().find(|e| e.seq == 4).unwrap();
        assert_eq!(four.frame.messages, published[3].frame.messages);
        assert!(
            history.events("app", "room", 8, 1, 5).0.is_empty(),
            "another origin"
        );
        // A long range: the newest rows, whole from the oldest read.
        let (events, whole_from) = history.events("app", "room", 7, 1, 2_500);
        assert!(
            whole_from > 1 && whole_from <= 2_500 - 1_000,
            "{whole_from}"
        );
        let lowest = events.iter().map(|e| e.seq).min().unwrap();
        assert_eq!(lowest, whole_from);
        assert_eq!(events.len() as u64, 2_500 - whole_from + 1);
    }
}
