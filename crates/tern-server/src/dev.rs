//! `tern dev`: the regions it runs (`--topology`), their throwaway cluster CA and
//! gossip key, the banner it prints, and the throwaway client-port certificates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cluster;
use crate::config::Config;
use crate::node::NodePlan;

/// The regions `tern dev` runs and the WAN it emulates between them: the file's, or
/// the built-in regions/topology.toml.
pub(crate) fn dev_topology(
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

/// `tern dev` regions: a throwaway CA and gossip key, gossip seeded by the first region,
/// the WAN of `topology` emulated on the links, one replica ack per publish.
pub(crate) fn dev_cluster(
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

pub(crate) fn print_dev_banner(
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
pub(crate) fn write_edge_certs(dir: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, cert, key) = tern_edge::tls::throwaway(names)?;
    std::fs::write(dir.join("edge-ca.pem"), ca)?;
    std::fs::write(dir.join("edge.pem"), cert)?;
    cluster::write_private(&dir.join("edge.key"), &key)?;
    Ok(())
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
