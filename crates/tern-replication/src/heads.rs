//! `Heads` anti-entropy: nodes send each other their channel cursors; a node that keeps
//! a channel asks the sender for what it lacks that no link will bring any more: a dead
//! origin's events at once, and a live origin's (the sender's own, or a third one's the
//! sender relays or holds) once the sender already had them a round ago: by then they
//! were either on their way to us or never will be (published before the sender knew
//! us, or before we were interested, or relayed by a home that did not know our
//! interest yet). Our own events we never ask for.
//!
//! A node sends a channel's cursor only to the peers that keep it as far as the sender
//! can tell ([`shares`]): the channel's home in the peer's region, or a same-region peer
//! whose interest it holds. Anyone else ignores the channel's heads anyway, so the
//! control bytes a node sends grow with the channels it shares with each peer, not with
//! every channel it holds times every peer.
//!
//! Two nodes that agree on a channel's cursor go quiet about it ([`Quiet`]): a node
//! sends a channel's cursor to a peer when it changed since it last sent it there, or
//! when the peer's last `Heads` listed another cursor for it, and else only every
//! [`HEADS_QUIET_MAX`]. While two nodes disagree, both send it every round, so whatever
//! one lacks it asks for again each round (a lost answer included); once they agree
//! there is nothing to ask in either direction. A `Heads` lost on the way (a link cut)
//! leaves the other side disagreeing, so it goes on sending, and the slow round catches
//! what slips through. An idle cluster then sends no `Heads` but that slow round
//! (issue 16, goal 5: each round was a frame per peer and its QUIC acks, every second,
//! for the channels every node keeps).

use std::collections::HashMap;
use std::time::Duration;

use tern_core::{ChannelKey, Cursor, OriginId};

use crate::routing::Node;
use crate::Now;

/// How often a node sends its channel cursors.
pub const HEADS_EVERY: Duration = Duration::from_secs(1);
/// Channels per anti-entropy round, and per `Heads` frame.
pub const HEADS_CHANNELS_MAX: usize = 20_000;
pub const HEADS_PER_FRAME: usize = 256;

/// How long a node stays quiet at most about a channel on whose cursor it and a peer
/// agree ([`Quiet`]).
pub const HEADS_QUIET_MAX: Duration = Duration::from_secs(30);
/// (peer, channel) pairs [`Quiet`] remembers; past it, it forgets them all (each is then
/// sent once more).
pub const QUIET_MAX: usize = HEADS_CHANNELS_MAX * 4;

/// What a node last sent each peer, and last heard from it, of each channel's cursor
/// (as digests), by the peer's origin: so it sends a cursor only while the two disagree
/// or it changed (see the module's text). Bounded by [`QUIET_MAX`].
#[derive(Default)]
pub struct Quiet {
    pairs: HashMap<(u64, ChannelKey), Agreed>,
}

#[derive(Default)]
struct Agreed {
    /// The digest last sent, and when.
    sent: Option<(u64, Now)>,
    /// The digest last heard.
    heard: Option<u64>,
}

impl Quiet {
    /// Whether to send this node's cursor for `key` (its [`digest`]) to the peer whose
    /// origin is `peer` at `now`; if so, it counts as sent.
    pub fn send(&mut self, peer: u64, key: &ChannelKey, digest: u64, now: Now) -> bool {
        let pair = self.pair(peer, key);
        let quiet = pair.heard == Some(digest)
            && pair.sent.is_some_and(|(sent, at)| {
                sent == digest && now.saturating_sub(at) < HEADS_QUIET_MAX
            });
        if !quiet {
            pair.sent = Some((digest, now));
        }
        !quiet
    }

    /// The peer whose origin is `peer` listed `origins` for `key` in its `Heads`.
    pub fn heard(&mut self, peer: u64, key: &ChannelKey, origins: &[(u64, u64)]) {
        self.pair(peer, key).heard = Some(digest(origins));
    }

    fn pair(&mut self, peer: u64, key: &ChannelKey) -> &mut Agreed {
        let id = (peer, key.clone());
        if !self.pairs.contains_key(&id) && self.pairs.len() >= QUIET_MAX {
            self.pairs.clear();
        }
        self.pairs.entry(id).or_default()
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A cursor's digest: its origins with a sequence past 0, in order (two hubs list the
/// same events in any order, and an origin at 0 as none).
pub fn digest(origins: &[(u64, u64)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut listed: Vec<(u64, u64)> = origins.iter().copied().filter(|&(_, s)| s > 0).collect();
    listed.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    listed.hash(&mut hasher);
    hasher.finish()
}

/// Per sender link: the sequence per (channel, live origin) in its previous `Heads`.
/// Bounded by four times [`HEADS_CHANNELS_MAX`] (cleared past it: costs one round of
/// waiting).
#[derive(Default)]
pub struct PreviousHeads {
    seen: HashMap<(ChannelKey, u64), u64>,
}

impl PreviousHeads {
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Whether `peer` keeps a channel as far as the sender can tell, so the sender's heads
/// for it go to `peer`: `peer` is the channel's home in its region (`homes`, from
/// `routing::homes` over the sender's view), or the sender holds `peer`'s interest in it.
pub fn shares(homes: &HashMap<&str, &str>, peer: Node, interested: bool) -> bool {
    interested || homes.get(peer.region) == Some(&peer.id)
}

/// Who is asking, as the rule needs it.
pub struct Asker<'a> {
    /// The asker's own origin.
    pub own: u64,
    /// The origin of the node whose heads these are.
    pub sender: u64,
    /// Whether the asker waits for `origin` on that origin's own link (it counts it live).
    pub live: &'a dyn Fn(u64) -> bool,
}

/// The ranges `(origin, from, to)` to ask the sender for, given the asker's cursor
/// `mine` on `key` and the sender's `origins`. Call only for channels the asker keeps.
pub fn wanted(
    asker: &Asker,
    previous: &mut PreviousHeads,
    key: &ChannelKey,
    mine: &Cursor,
    origins: &[(u64, u64)],
) -> Vec<(u64, u64, u64)> {
    let mut asks = Vec::new();
    for &(origin, seq) in origins {
        let have = mine.get(OriginId(origin));
        let upto = if origin == asker.own {
            0
        } else if origin == asker.sender || (asker.live)(origin) {
            // A live origin's events come on a link, resent until acked; what the sender
            // already had a round ago and we still lack was never sent to us.
            let before = previous.seen.insert((key.clone(), origin), seq);
            if previous.seen.len() > HEADS_CHANNELS_MAX * 4 {
                previous.seen.clear();
            }
            before.unwrap_or(0).min(seq)
        } else {
            // An origin that died before every node had its events.
            seq
        };
        if upto > have {
            asks.push((origin, have + 1, upto));
        }
    }
    asks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_go_to_the_peers_home_or_interested_only() {
        let key = ChannelKey::new("app", "room");
        let nodes = [
            Node {
                id: "a1",
                region: "a",
                origin: 1,
            },
            Node {
                id: "a2",
                region: "a",
                origin: 2,
            },
            Node {
                id: "b1",
                region: "b",
                origin: 3,
            },
        ];
        let homes = crate::routing::homes(&key, nodes);
        let home_a = homes["a"];
        let other = nodes
            .iter()
            .copied()
            .find(|n| n.region == "a" && n.id != home_a)
            .unwrap();
        let home = nodes.iter().copied().find(|n| n.id == home_a).unwrap();
        assert!(shares(&homes, home, false));
        assert!(
            shares(&homes, nodes[2], false),
            "alone in its region: the home"
        );
        assert!(!shares(&homes, other, false));
        assert!(shares(&homes, other, true));
    }

    /// A cursor goes to a peer while the two disagree, at once when it changes, and
    /// once they agree only every `HEADS_QUIET_MAX`; a restarted peer (another origin)
    /// hears it at once.
    #[test]
    fn agreeing_nodes_go_quiet() {
        let key = ChannelKey::new("app", "room");
        let secs = Duration::from_secs;
        let mut quiet = Quiet::default();
        let mine = [(1, 5), (2, 3)];
        assert!(quiet.send(9, &key, digest(&mine), secs(0)), "never sent");
        assert!(
            quiet.send(9, &key, digest(&mine), secs(1)),
            "not heard: they may lack it"
        );
        quiet.heard(9, &key, &[(2, 2), (1, 5)]);
        assert!(
            quiet.send(9, &key, digest(&mine), secs(2)),
            "they are behind"
        );
        // Agreed (order and origins at 0 aside): quiet until the slow round.
        quiet.heard(9, &key, &[(2, 3), (3, 0), (1, 5)]);
        assert!(!quiet.send(9, &key, digest(&mine), secs(3)));
        assert!(!quiet.send(9, &key, digest(&mine), secs(2) + HEADS_QUIET_MAX - secs(1)));
        assert!(quiet.send(9, &key, digest(&mine), secs(2) + HEADS_QUIET_MAX));
        assert!(!quiet.send(9, &key, digest(&mine), secs(3) + HEADS_QUIET_MAX));
        // Changed here: sent at once, and every round until they list it too.
        let moved = [(1, 6), (2, 3)];
        let later = secs(4) + HEADS_QUIET_MAX;
        assert!(quiet.send(9, &key, digest(&moved), later));
        assert!(quiet.send(9, &key, digest(&moved), later + secs(1)));
        quiet.heard(9, &key, &moved);
        assert!(!quiet.send(9, &key, digest(&moved), later + secs(2)));
        // Changed there: sent every round until they agree again.
        quiet.heard(9, &key, &[(1, 7), (2, 3)]);
        assert!(quiet.send(9, &key, digest(&moved), later + secs(3)));
        // Another peer, or the same node restarted under another origin.
        assert!(quiet.send(10, &key, digest(&moved), later + secs(3)));
        assert_eq!(quiet.len(), 2);
    }

    #[test]
    fn quiet_is_bounded() {
        let mut quiet = Quiet::default();
        for i in 0..=QUIET_MAX as u64 {
            quiet.heard(i, &ChannelKey::new("app", "room"), &[(1, 1)]);
        }
        assert!(quiet.len() <= QUIET_MAX);
    }

    #[test]
    fn asks_dead_origins_at_once_and_the_senders_own_a_round_later() {
        let key = ChannelKey::new("app", "room");
        let mut mine = Cursor::new();
        mine.advance(OriginId(3), 2);
        let live = |o: u64| o == 4;
        let asker = Asker {
            own: 1,
            sender: 2,
            live: &live,
        };
        let mut previous = PreviousHeads::default();
        let heads = [(1, 9), (2, 5), (3, 6), (4, 8)];
        // Ours: never; the dead one's: what we lack at once; the sender's and a live
        // third origin's: not yet (they may be on their way).
        assert_eq!(
            wanted(&asker, &mut previous, &key, &mine, &heads),
            vec![(3, 3, 6)]
        );
        // A round later, live origins up to what the sender had then.
        let heads = [(2, 7), (4, 9)];
        assert_eq!(
            wanted(&asker, &mut previous, &key, &mine, &heads),
            vec![(2, 1, 5), (4, 1, 8)]
        );
        assert_eq!(previous.len(), 2);
    }
}
