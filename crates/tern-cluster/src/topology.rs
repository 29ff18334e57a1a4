//! `regions/topology.toml`: the regions and the one-way delay and loss between each pair.
//! The simulator reads it, and local multi-region runs (`tern dev`, `scripts/run-regions`)
//! apply it to their QUIC links in user space ([`WanLink`]), since this machine's kernel
//! has no netem. Production passes no topology and pays nothing for it.

use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub regions: Vec<String>,
    #[serde(default)]
    pub links: Vec<TopologyLink>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyLink {
    pub a: String,
    pub b: String,
    pub delay_ms: u64,
    #[serde(default)]
    pub loss_percent: f64,
}

/// Emulated WAN conditions on one directed link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WanLink {
    /// Added to every frame, in order (one-way delay).
    pub delay: Duration,
    /// Share of event frames dropped on the way (0.0..=1.0); the link's own
    /// retransmission and gap repair must make up for them.
    pub loss: f64,
}

impl Topology {
    pub fn parse(text: &str) -> Result<Topology, String> {
        let topology: Topology = toml::from_str(text).map_err(|e| e.to_string())?;
        for link in &topology.links {
            for end in [&link.a, &link.b] {
                if !topology.regions.contains(end) {
                    return Err(format!("link names unknown region {end:?}"));
                }
            }
            if !(0.0..=100.0).contains(&link.loss_percent) {
                return Err(format!("loss_percent {} is not 0..=100", link.loss_percent));
            }
        }
        Ok(topology)
    }

    /// The emulated link between two regions (either direction), if the file has one.
    /// Nodes of the same region talk without emulation.
    pub fn link(&self, from: &str, to: &str) -> Option<WanLink> {
        self.links
            .iter()
            .find(|l| (l.a == from && l.b == to) || (l.a == to && l.b == from))
            .map(|l| WanLink {
                delay: Duration::from_millis(l.delay_ms),
                loss: l.loss_percent / 100.0,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_topology_parses_and_is_symmetric() {
        let topology = Topology::parse(include_str!("../../../regions/topology.toml")).unwrap();
        let link = topology.link("us-east", "eu-west").unwrap();
        assert_eq!(link, topology.link("eu-west", "us-east").unwrap());
        assert_eq!(link.delay, Duration::from_millis(40));
        assert!(topology.link("us-east", "us-east").is_none());
        assert!(Topology::parse(
            "regions = [\"a\"]\n[[links]]\na = \"a\"\nb = \"z\"\ndelay_ms = 1"
        )
        .is_err());
    }
}
