//! Handoff on a membership change: a channel's home in a region can move (a node joins
//! and scores higher, or the home dies). The new home learns of a channel from `Heads`,
//! but `Heads` carry only channels held in memory, and a channel idle everywhere for
//! longer than the idle retention is held nowhere: its new home would never hear of it,
//! and history reads in that region (which go to the home) would miss everything stored
//! before (found by the scaled simulation with idle channels dropped, seeds 0, 1, 1000,
//! 1001).
//!
//! So after a membership change every node walks the channels in its own store, a page
//! at a time, and for each channel whose home in some region is now another node than
//! under the membership before the change, sends that new home a `Heads` entry with
//! the stored cursor. The new home takes it as any `Heads`: with nothing of the channel
//! stored it copies the history (`backfill`). The cost is one pass over the store per
//! membership change, and `Heads` entries only for channels whose home moved.
//!
//! A change during a pass restarts it from the first channel, comparing the membership
//! before the first change with the latest: a channel whose home moved and moved back
//! is not sent, and one already sent to a home that changed again is sent to the
//! latest. A pass starts [`HANDOFF_SETTLE`] after the change, so the new home has heard
//! of the membership too (it must know itself to be the home to take the entry).
//!
//! A node that has just started finds its peers one by one: seen from it every channel's
//! home "moves" from itself to the others, and a restarted node's store would be offered
//! in full to homes that have it. So within [`HANDOFF_STARTUP`] of the driver's start, a
//! change from a membership of this node alone is not a handoff. (A cluster of one node
//! joined within that time hands nothing over; its joiner copies history only as any
//! new home does, when `Heads` list the channel.)

use std::collections::BTreeSet;
use std::time::Duration;

use tern_core::ChannelKey;

use crate::routing::{self, Node};
use crate::Now;

/// Stored channels read per page.
pub const HANDOFF_PAGE: usize = 1_000;
/// How long after a membership change a pass starts.
pub const HANDOFF_SETTLE: Duration = Duration::from_secs(1);
/// Start-up: the time since the driver's start within which finding peers from a
/// membership of this node alone is not a handoff.
pub const HANDOFF_STARTUP: Duration = Duration::from_secs(10);

/// A member as the rendezvous sees it. Owned: a pass outlives the membership it
/// compares against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub id: String,
    pub region: String,
}

impl From<Node<'_>> for Member {
    fn from(node: Node<'_>) -> Member {
        Member {
            id: node.id.to_string(),
            region: node.region.to_string(),
        }
    }
}

/// One stored channel and its stored cursor (`(origin, seq)` pairs).
pub type StoredChannel = (ChannelKey, Vec<(u64, u64)>);

/// A page read: which pass asked, and where in the store to continue from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRead<T> {
    pub pass: u64,
    pub after: Option<T>,
}

struct Pass<T> {
    before: BTreeSet<Member>,
    after: BTreeSet<Member>,
    /// Where the next page starts (`None`: the first channel).
    next: Option<T>,
    /// Not before this.
    start_at: Now,
}

/// The handoff passes of one node. `T` is the store's page token (opaque here).
pub struct Handoff<T> {
    pass: Option<Pass<T>>,
    /// Numbers passes (a restart is a new one), so a page read for an older pass is
    /// recognised and thrown away.
    number: u64,
    /// A page is being read (at most one at a time).
    reading: bool,
}

impl<T> Default for Handoff<T> {
    fn default() -> Self {
        Handoff {
            pass: None,
            number: 0,
            reading: false,
        }
    }
}

impl<T: Clone> Handoff<T> {
    /// Membership went from `before` to `after` (each including this node); `now` is
    /// the time since the driver started.
    pub fn on_members(&mut self, before: &[Member], after: &[Member], now: Now) {
        let after: BTreeSet<Member> = after.iter().cloned().collect();
        // The driver calls this on every membership update (a peer's load changes it
        // too): one that changes no member leaves a running pass alone, or frequent
        // updates would keep it from ever starting.
        if before.iter().cloned().collect::<BTreeSet<_>>() == after {
            return;
        }
        if self.pass.is_none() && before.len() <= 1 && now < HANDOFF_STARTUP {
            return;
        }
        let before = match self.pass.take() {
            Some(pass) => pass.before,
            None => before.iter().cloned().collect(),
        };
        if before == after {
            // Back where the running pass started, if any: nothing moved.
            self.number += 1;
            return;
        }
        self.number += 1;
        self.pass = Some(Pass {
            before,
            after,
            next: None,
            start_at: now + HANDOFF_SETTLE,
        });
    }

    /// Whether a pass is under way.
    pub fn running(&self) -> bool {
        self.pass.is_some()
    }

    /// The page to read now, if any: a pass is under way, settled, and no page is
    /// being read. The caller reads it and hands it to [`Self::on_page`].
    pub fn next_read(&mut self, now: Now) -> Option<PageRead<T>> {
        let pass = self.pass.as_ref()?;
        if self.reading || now < pass.start_at {
            return None;
        }
        self.reading = true;
        Some(PageRead {
            pass: self.number,
            after: pass.next.clone(),
        })
    }

    /// A page was read for `pass`: its channels, and where the next starts (`None`: it
    /// was the last). Returns the entries to send: `(new home, channel, cursor)`.
    pub fn on_page(
        &mut self,
        pass: u64,
        channels: Vec<StoredChannel>,
        next: Option<T>,
        me: &str,
    ) -> Vec<(String, StoredChannel)> {
        self.reading = false;
        let Some(current) = self.pass.as_mut().filter(|_| pass == self.number) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, cursor) in channels {
            if cursor.is_empty() {
                continue;
            }
            let was = routing::homes(&key, nodes(&current.before));
            let now = routing::homes(&key, nodes(&current.after));
            let mut moved: Vec<&str> = now
                .iter()
                .filter(|(region, home)| **home != me && was.get(*region) != Some(*home))
                .map(|(_, home)| *home)
                .collect();
            moved.sort_unstable();
            for home in moved {
                out.push((home.to_string(), (key.clone(), cursor.clone())));
            }
        }
        match next {
            Some(next) => current.next = Some(next),
            None => self.pass = None,
        }
        out
    }
}

fn nodes(members: &BTreeSet<Member>) -> impl Iterator<Item = Node<'_>> {
    members.iter().map(|m| Node {
        id: &m.id,
        region: &m.region,
        origin: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, region: &str) -> Member {
        Member {
            id: id.into(),
            region: region.into(),
        }
    }

    /// `secs` after the start-up window.
    fn at(secs: u64) -> Now {
        HANDOFF_STARTUP + Duration::from_secs(secs)
    }

    /// Channels of app "a" whose home in r1 is `home` among `nodes`.
    fn homed_at(home: &str, nodes: &[Member], count: usize) -> Vec<ChannelKey> {
        (0..)
            .map(|i| ChannelKey::new("a", &format!("c{i}")))
            .filter(|key| {
                routing::home_in(key, super::nodes(&nodes.iter().cloned().collect()), "r1")
                    == Some(home)
            })
            .take(count)
            .collect()
    }

    fn stored(keys: &[ChannelKey]) -> Vec<StoredChannel> {
        keys.iter().map(|k| (k.clone(), vec![(7, 3)])).collect()
    }

    /// A joiner that outscores the old home is sent exactly the channels it is now home
    /// of, by every node that stores them, after the settle time and one page at a time.
    #[test]
    fn a_joiner_is_sent_the_channels_it_now_homes() {
        let before = vec![member("a", "r1"), member("x", "r2")];
        let after = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let moved = homed_at("b", &after, 3);
        let stays = homed_at("a", &after, 3);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&before, &after, at(10));
        assert!(
            handoff.next_read(at(10)).is_none(),
            "not before the settle time"
        );
        let read = handoff.next_read(at(11)).expect("a page to read");
        assert_eq!(read.after, None);
        assert!(handoff.next_read(at(11)).is_none(), "one page at a time");
        let first = handoff.on_page(read.pass, stored(&moved[..2]), Some(1), "a");
        // An update that changes no member (a peer's load) neither restarts the pass
        // nor delays it.
        handoff.on_members(&after, &after, at(11));
        let read = handoff.next_read(at(11)).expect("the next page");
        assert_eq!(read.after, Some(1));
        let mut page = stored(&moved[2..]);
        page.extend(stored(&stays));
        let second = handoff.on_page(read.pass, page, None, "a");
        let sent: Vec<_> = first.into_iter().chain(second).collect();
        assert_eq!(sent.len(), 3, "{sent:?}");
        for ((home, (key, cursor)), want) in sent.iter().zip(&moved) {
            assert_eq!(
                (home.as_str(), key, &cursor[..]),
                ("b", want, &[(7, 3)][..])
            );
        }
        assert!(!handoff.running());
        assert!(handoff.next_read(at(12)).is_none());
        // r2's home did not move; the joiner itself sends nothing to itself.
        let mut joiner: Handoff<u32> = Handoff::default();
        joiner.on_members(&before, &after, at(10));
        let read = joiner.next_read(at(11)).unwrap();
        assert!(joiner
            .on_page(read.pass, stored(&moved), None, "b")
            .is_empty());
    }

    /// The home died: its channels go to the next node of its region.
    #[test]
    fn a_dead_homes_channels_go_to_the_next() {
        let before = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let after = vec![member("a", "r1"), member("x", "r2")];
        let lost = homed_at("b", &before, 2);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&before, &after, at(0));
        let read = handoff.next_read(at(5)).unwrap();
        // x (r2) stores them too: it tells a, the new home in r1.
        let sent = handoff.on_page(read.pass, stored(&lost), None, "x");
        let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(homes, ["a", "a"]);
    }

    /// A change during a pass restarts it against the membership before the first
    /// change; a page read for the old pass is thrown away; a flap back ends it.
    #[test]
    fn a_change_during_a_pass_restarts_it() {
        let one = vec![member("a", "r1"), member("x", "r2")];
        let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let three = vec![
            member("a", "r1"),
            member("b", "r1"),
            member("c", "r1"),
            member("x", "r2"),
        ];
        let to_c = homed_at("c", &three, 2);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&one, &two, at(0));
        let stale = handoff.next_read(at(1)).unwrap();
        handoff.on_members(&two, &three, at(1));
        // The stale page answers nothing and frees the reader.
        assert!(handoff
            .on_page(stale.pass, stored(&to_c), Some(9), "a")
            .is_empty());
        assert!(handoff.next_read(at(1)).is_none(), "settling again");
        let read = handoff.next_read(at(2)).unwrap();
        assert_eq!(read.after, None, "from the first channel again");
        let sent = handoff.on_page(read.pass, stored(&to_c), None, "a");
        assert_eq!(sent.iter().filter(|(h, _)| h == "c").count(), 2);

        // b joins and leaves again before the pass reads anything: nothing moved.
        let mut flap: Handoff<u32> = Handoff::default();
        flap.on_members(&one, &two, at(0));
        flap.on_members(&two, &one, at(0));
        assert!(!flap.running());
        assert!(flap.next_read(at(5)).is_none());
    }

    /// A node that just started finds its peers: no pass; alone for longer (a cluster
    /// of one), a joiner is a handoff.
    #[test]
    fn finding_peers_at_start_up_is_not_a_handoff() {
        let alone = vec![member("a", "r1")];
        let found = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&alone, &found, Duration::from_secs(2));
        assert!(!handoff.running());
        handoff.on_members(&alone, &found, HANDOFF_STARTUP);
        assert!(handoff.running());
    }
}
