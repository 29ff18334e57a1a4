//! Routing by interest. Every channel has a *home* in each region: the node there with
//! the highest rendezvous score of (channel, node id), ties broken by node id. An origin
//! sends its events to the channel's home in every region and to its region's
//! interested nodes; a home relays another region's events to its region's interested
//! nodes. So one copy crosses to each remote region, and a node receives a channel only
//! while it has subscribers or is the home.

use std::collections::HashMap;
use std::time::Duration;

use tern_core::ChannelKey;

use crate::Now;

/// How often a node repeats its interest to its region's peers, and how long a peer's
/// interest lasts when not repeated.
pub const INTEREST_REFRESH: Duration = Duration::from_secs(2);
pub const INTEREST_TTL: Duration = Duration::from_secs(7);
/// Channel interests remembered over all peers, and channels per `Interest` frame.
pub const INTEREST_MAX: usize = 1 << 20;
pub const INTEREST_PER_FRAME: usize = 512;

/// A node as routing sees it: its id, region and origin id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub origin: u64,
}

/// The channel's home in each region with a node in `nodes` (the caller includes
/// itself): the highest `(home_score, node id)`.
pub fn homes<'a>(
    key: &ChannelKey,
    nodes: impl IntoIterator<Item = Node<'a>>,
) -> HashMap<&'a str, &'a str> {
    let mut best: HashMap<&str, (u64, &str)> = HashMap::new();
    for node in nodes {
        let score = key.home_score(node.id);
        let entry = best.entry(node.region).or_insert((score, node.id));
        if (score, node.id) > *entry {
            *entry = (score, node.id);
        }
    }
    best.into_iter().map(|(r, (_, n))| (r, n)).collect()
}

/// The channel's home in `region` among `nodes`.
pub fn home_in<'a>(
    key: &ChannelKey,
    nodes: impl IntoIterator<Item = Node<'a>>,
    region: &str,
) -> Option<&'a str> {
    homes(key, nodes.into_iter().filter(|n| n.region == region))
        .into_values()
        .next()
}

/// Who gets an event of `origin` on `key` from node `me`, whose live peers are `peers`
/// and whose interested same-region peers are `interested`: for its own event, the
/// channel's home in every region and the interested peers; for another region's live
/// origin's event, the interested peers when `me` is the home of its region (the
/// relay); nothing else.
pub fn recipients<'a>(
    me: Node<'a>,
    peers: &[Node<'a>],
    key: &ChannelKey,
    origin: u64,
    interested: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = Vec::new();
    let all = || peers.iter().copied().chain(std::iter::once(me));
    if origin == me.origin {
        let mut homes: Vec<&str> = homes(key, all()).into_values().collect();
        homes.sort_unstable();
        ids.extend(homes.into_iter().filter(|h| *h != me.id));
    } else {
        let Some(origin_node) = peers.iter().find(|p| p.origin == origin) else {
            return ids;
        };
        if origin_node.region == me.region || home_in(key, all(), me.region) != Some(me.id) {
            return ids;
        }
    }
    for peer in interested {
        if !ids.contains(&peer) {
            ids.push(peer);
        }
    }
    ids
}

/// Same-region peers' interest: channel → peer node id → when it last said so.
/// Bounded by [`INTEREST_MAX`] entries over all channels.
#[derive(Default)]
pub struct Interest {
    map: HashMap<ChannelKey, HashMap<String, Now>>,
    len: usize,
}

impl Interest {
    /// A peer's `Interest` frame. Returns how many `on` entries were refused (full).
    pub fn on_frame(
        &mut self,
        peer: &str,
        channels: impl IntoIterator<Item = ChannelKey>,
        on: bool,
        now: Now,
    ) -> usize {
        let mut refused = 0;
        for key in channels {
            if on {
                let peers = self.map.entry(key).or_default();
                if let Some(at) = peers.get_mut(peer) {
                    *at = now;
                } else if self.len >= INTEREST_MAX {
                    refused += 1;
                } else {
                    peers.insert(peer.to_string(), now);
                    self.len += 1;
                }
            } else if let Some(peers) = self.map.get_mut(&key) {
                if peers.remove(peer).is_some() {
                    self.len -= 1;
                }
                if peers.is_empty() {
                    self.map.remove(&key);
                }
            }
        }
        self.map.retain(|_, peers| !peers.is_empty());
        refused
    }

    /// Peers whose interest in `key` was heard within [`INTEREST_TTL`], sorted.
    pub fn interested(&self, key: &ChannelKey, now: Now) -> Vec<&str> {
        let mut peers: Vec<&str> = self
            .map
            .get(key)
            .into_iter()
            .flatten()
            .filter(|(_, at)| now.saturating_sub(**at) < INTEREST_TTL)
            .map(|(peer, _)| peer.as_str())
            .collect();
        peers.sort_unstable();
        peers
    }

    /// Forgets interest not repeated within [`INTEREST_TTL`].
    pub fn expire(&mut self, now: Now) {
        let len = &mut self.len;
        self.map.retain(|_, peers| {
            let before = peers.len();
            peers.retain(|_, at| now.saturating_sub(*at) < INTEREST_TTL);
            *len -= before - peers.len();
            !peers.is_empty()
        });
    }

    /// Entries held (for the bound).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(id: &'a str, region: &'a str, origin: u64) -> Node<'a> {
        Node { id, region, origin }
    }

    #[test]
    fn home_is_the_highest_score_per_region_whoever_asks() {
        let key = ChannelKey::new("app", "room");
        let nodes = [
            node("a1", "a", 1),
            node("a2", "a", 2),
            node("a3", "a", 3),
            node("b1", "b", 4),
        ];
        let homes = homes(&key, nodes);
        let best = ["a1", "a2", "a3"]
            .into_iter()
            .max_by_key(|n| (key.home_score(n), *n))
            .unwrap();
        assert_eq!(homes["a"], best);
        assert_eq!(homes["b"], "b1");
        // Order of the input does not matter.
        let mut reversed = nodes;
        reversed.reverse();
        assert_eq!(super::homes(&key, reversed), homes);
        assert_eq!(home_in(&key, nodes, "a"), Some(best));
        assert_eq!(home_in(&key, nodes, "z"), None);
    }

    #[test]
    fn own_events_go_to_every_home_and_the_interested_relays_only_as_home() {
        let key = ChannelKey::new("app", "room");
        let all = [node("a1", "a", 1), node("a2", "a", 2), node("b1", "b", 3)];
        let home_a = home_in(&key, all, "a").unwrap();
        let other_a = if home_a == "a1" { "a2" } else { "a1" };
        let me = *all.iter().find(|n| n.id == other_a).unwrap();
        let peers: Vec<Node> = all.iter().copied().filter(|n| n.id != me.id).collect();
        // Own event: the home here and b's home, plus nobody else.
        let mut to = recipients(me, &peers, &key, me.origin, []);
        to.sort_unstable();
        let mut want = vec![home_a, "b1"];
        want.sort_unstable();
        assert_eq!(to, want);
        // A remote origin's event at a non-home: not relayed, even if someone is interested.
        assert!(recipients(me, &peers, &key, 3, [home_a]).is_empty());
        // At the home: relayed to the interested.
        let home = *all.iter().find(|n| n.id == home_a).unwrap();
        let peers: Vec<Node> = all.iter().copied().filter(|n| n.id != home.id).collect();
        assert_eq!(recipients(home, &peers, &key, 3, [other_a]), vec![other_a]);
        // Same-region origin's event: nothing (the origin sent it to everyone).
        assert!(recipients(home, &peers, &key, me.origin, [other_a]).is_empty());
        // Unknown origin (departed): nothing.
        assert!(recipients(home, &peers, &key, 99, [other_a]).is_empty());
    }

    #[test]
    fn interest_expires_is_bounded_and_turns_off() {
        let key = ChannelKey::new("app", "room");
        let mut interest = Interest::default();
        let t0 = Duration::from_secs(100);
        interest.on_frame("p", [key.clone()], true, t0);
        interest.on_frame("q", [key.clone()], true, t0);
        assert_eq!(interest.interested(&key, t0), vec!["p", "q"]);
        interest.on_frame("q", [key.clone()], false, t0);
        assert_eq!(interest.interested(&key, t0), vec!["p"]);
        assert_eq!(interest.len(), 1);
        // Heard again: lives on from then.
        interest.on_frame("p", [key.clone()], true, t0 + Duration::from_secs(5));
        assert_eq!(interest.len(), 1);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(interest.interested(&key, later), vec!["p"]);
        interest.expire(t0 + Duration::from_secs(12) + INTEREST_TTL);
        assert!(interest.is_empty());
    }
}
