//! Wires the webhook handover (`tern_functions::handover`) and the lifecycle aggregate
//! (`tern_functions::lifecycle`) to the cluster: which node keeps shadow rows of another
//! origin's events (the channel's home in the region after the origin's, in region-name
//! order), which node aggregates an app's occupancy (the home of its occupancy channel in
//! the first region by name), this node's delivered marks published in gossip, and what
//! happens when a member dies: its occupancy stops counting at once, and its webhooks are
//! taken over if it does not come back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tern_cluster::membership::Member;
use tern_cluster::replicator::Replicator;
use tern_core::{ChannelKey, OriginId};
use tern_functions::{Outbox, Placement};

use crate::cluster::EdgeCluster;

/// How long after a member leaves the live set its webhooks are taken over, unless a
/// member with its node id is live again by then (a restart on its data directory
/// resumes its own outbox from its mark).
const TAKEOVER_GRACE: Duration = Duration::from_secs(5);
/// How often this node's delivered marks are published (when they changed).
const MARKS_EVERY: Duration = Duration::from_secs(1);
/// Origins whose region is remembered (departed ones too: repair brings their events
/// after they are gone); past it the oldest is forgotten.
const ORIGINS_MAX: usize = 4096;

/// What the shadow rule needs of the cluster, refreshed from gossip.
#[derive(Default)]
struct View {
    /// Region of every origin seen, dead ones included.
    origins: HashMap<u64, String>,
    /// `origins`' keys, oldest first (the bound).
    order: VecDeque<u64>,
    /// Regions with a live member, sorted.
    regions: Vec<String>,
}

/// The shadow rule: this node keeps shadow rows of `origin`'s events on a channel when
/// it is the channel's home in the region that follows the origin's (cyclically, by
/// name) — a node every event of the channel reaches anyway, outside the origin's region
/// so one failure does not take both. A cluster of one region has no shadows.
pub struct ShadowHomes {
    replicator: Arc<Replicator>,
    node_id: String,
    region: String,
    view: RwLock<View>,
}

impl ShadowHomes {
    pub fn new(replicator: Arc<Replicator>, node_id: String, region: String) -> Arc<ShadowHomes> {
        Arc::new(ShadowHomes {
            replicator,
            node_id,
            region,
            view: RwLock::new(View::default()),
        })
    }

    fn update(&self, live: &[Member]) {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        for member in live {
            let Ok(origin) = u64::from_str_radix(&member.origin, 16) else {
                continue;
            };
            if view.origins.insert(origin, member.region.clone()).is_none() {
                view.order.push_back(origin);
                if view.order.len() > ORIGINS_MAX {
                    if let Some(oldest) = view.order.pop_front() {
                        view.origins.remove(&oldest);
                    }
                }
            }
        }
        let mut regions: Vec<String> = live.iter().map(|m| m.region.clone()).collect();
        regions.sort();
        regions.dedup();
        view.regions = regions;
    }
}

/// The region after `from` in `regions` (sorted), wrapping; `None` if there is no other.
fn next_region<'a>(regions: &'a [String], from: &str) -> Option<&'a str> {
    regions
        .iter()
        .find(|r| r.as_str() > from)
        .or_else(|| regions.first())
        .map(String::as_str)
        .filter(|r| *r != from)
}

impl Placement for ShadowHomes {
    fn aggregates(&self, app: &str) -> bool {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        if view.regions.first() != Some(&self.region) {
            return false;
        }
        drop(view);
        let key = ChannelKey::new(app, tern_functions::lifecycle::OCCUPANCY_CHANNEL);
        self.replicator.home_in(&key, &self.region).as_deref() == Some(self.node_id.as_str())
    }

    fn shadows(&self, key: &ChannelKey, origin: OriginId) -> bool {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let Some(origin_region) = view.origins.get(&origin.0) else {
            return false;
        };
        if next_region(&view.regions, origin_region) != Some(self.region.as_str()) {
            return false;
        }
        drop(view);
        self.replicator.home_in(key, &self.region).as_deref() == Some(self.node_id.as_str())
    }
}

/// Starts the handover's tasks: following the live set (the shadow rule's view, and
/// takeovers of members that left), and publishing this node's marks.
pub fn start(outbox: Arc<Outbox>, cluster: Arc<EdgeCluster>, homes: Arc<ShadowHomes>) {
    let Some(node) = cluster.node.get() else {
        return;
    };
    let live = node.watch_members();
    let me = node.me().node_id.clone();
    tokio::spawn(follow(live, me, outbox.clone(), homes));
    tokio::spawn(async move {
        let mut published = String::new();
        let mut tick = tokio::time::interval(MARKS_EVERY);
        loop {
            tick.tick().await;
            let marks = outbox.marks();
            if marks == published {
                continue;
            }
            let Some(node) = cluster.node.get() else {
                return;
            };
            if node.set_webhook_marks(&marks).await {
                published = marks;
            }
        }
    });
}

async fn follow(
    mut live: tokio::sync::watch::Receiver<Vec<Member>>,
    me: String,
    outbox: Arc<Outbox>,
    homes: Arc<ShadowHomes>,
) {
    let mut previous: Vec<Member> = Vec::new();
    loop {
        let current = live.borrow_and_update().clone();
        homes.update(&current);
        for gone in previous.iter().filter(|old| {
            old.node_id != me
                && !current
                    .iter()
                    .any(|m| m.node_id == old.node_id && m.incarnation == old.incarnation)
        }) {
            let Ok(origin) = u64::from_str_radix(&gone.origin, 16) else {
                continue;
            };
            // Its attachments are gone with it (a restart reports under a new origin).
            outbox.forget_origin(OriginId(origin), tern_edge::now_ms());
            tokio::spawn(take_over_later(
                live.clone(),
                gone.clone(),
                OriginId(origin),
                outbox.clone(),
            ));
        }
        previous = current;
        if live.changed().await.is_err() {
            return;
        }
    }
}

/// After [`TAKEOVER_GRACE`], takes over `gone`'s webhooks unless it is back.
async fn take_over_later(
    live: tokio::sync::watch::Receiver<Vec<Member>>,
    gone: Member,
    origin: OriginId,
    outbox: Arc<Outbox>,
) {
    tokio::time::sleep(TAKEOVER_GRACE).await;
    if live.borrow().iter().any(|m| m.node_id == gone.node_id) {
        tracing::info!(node = %gone.node_id, "member is back; it resumes its own webhooks");
        return;
    }
    let rules = outbox.take_over(origin, &gone.webhook_marks);
    tracing::info!(node = %gone.node_id, rules, marks = %gone.webhook_marks, "member left; its webhooks are taken over where shadowed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shadow region is the next one by name, wrapping, never the origin's own.
    #[test]
    fn next_region_wraps_and_skips_the_origin() {
        let regions: Vec<String> = ["ap-south", "eu-west", "us-east"]
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(next_region(&regions, "ap-south"), Some("eu-west"));
        assert_eq!(next_region(&regions, "eu-west"), Some("us-east"));
        assert_eq!(next_region(&regions, "us-east"), Some("ap-south"));
        // The origin's region has no live node left: still the next one after it.
        assert_eq!(next_region(&regions[1..], "ap-south"), Some("eu-west"));
        let one = vec!["us-east".to_string()];
        assert_eq!(next_region(&one, "us-east"), None);
        assert_eq!(next_region(&[], "us-east"), None);
    }
}
