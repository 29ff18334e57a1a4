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
//! A change during a pass restarts it from the first channel, comparing every
//! membership the pass has seen (the one before its first change, and the one before
//! each later change) with the latest: a channel goes to its latest home if any of them
//! had another home for it. So a home that got a channel back after a peer held it for
//! a while (a joiner that left again, or a home that died, the next took over, and the
//! first came back) is told of it: the events of that while went to the peer (the
//! scaled simulation with idle channels dropped, seed 2 at 8 s: a pass kept restarting
//! under churn against the membership from before a joiner came, so when the joiner
//! died the old home looked unmoved and never heard of what the joiner had stored). A
//! home that left and came back (restarted, or declared dead and alive again) is sent
//! its channels too: while it was gone their events went to another node, and a restart
//! may have emptied its store (seed 2 at 2 s: a crash and restart within one pass looked
//! like no change at all). A pass that has seen more than [`PASS_VIEWS_MAX`]
//! memberships sends every stored channel to each of its latest homes.
//!
//! A channel whose stored cursor lists the origin of a member that left is sent to
//! every one of its homes, moved or not: `Heads` name a dead origin's events only while
//! some hub lists them, and a hub forgets them when it drops the channel while idle. A
//! message its origin sent to one home alone before it died (the interest of a
//! subscriber in its own region not yet heard) then stayed in that home's store, and the
//! subscriber never got it (the seed sweep with idle channels dropped after 500 ms,
//! seed 42821). The cost is one entry per home for the channels the dead node touched.
//!
//! A pass starts [`HANDOFF_SETTLE`] after the change, so the new home has heard of the
//! membership too (it must know itself to be the home to take the entry); a later
//! change restarts it but does not put it off (under churn, a change every few hundred
//! ms, a pass put off by each would never run: the scaled simulation with idle channels
//! dropped).
//!
//! A `Heads` entry is sent once and can be lost (a link cut) or ignored (the new home
//! has not yet noticed the change that made it home), so every pass runs once more
//! [`HANDOFF_REPEAT`] after it started, with the same memberships. What the new home
//! already has costs it nothing: it copies history only when its store lacks some of the
//! cursor (`backfill::covers`).
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
/// How long after a pass started it runs once more (same memberships).
pub const HANDOFF_REPEAT: Duration = Duration::from_secs(5);
/// Start-up: the time since the driver's start within which finding peers from a
/// membership of this node alone is not a handoff.
pub const HANDOFF_STARTUP: Duration = Duration::from_secs(10);
/// Memberships one pass compares with the latest; past it, every channel counts as
/// moved.
pub const PASS_VIEWS_MAX: usize = 16;

/// A member as the rendezvous sees it. Owned: a pass outlives the membership it
/// compares against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub id: String,
    pub region: String,
    /// The incarnation's origin id: a restarted node is another member under the same
    /// id (it left, and came back).
    pub origin: u64,
}

impl From<Node<'_>> for Member {
    fn from(node: Node<'_>) -> Member {
        Member {
            id: node.id.to_string(),
            region: node.region.to_string(),
            origin: node.origin,
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
    /// The memberships seen before each change of this pass (at most
    /// [`PASS_VIEWS_MAX`]; `overflow` past it).
    views: Vec<BTreeSet<Member>>,
    overflow: bool,
    after: BTreeSet<Member>,
    /// Where the next page starts (`None`: the first channel).
    next: Option<T>,
    /// Not before this.
    start_at: Now,
    /// This is the pass's second run.
    repeat: bool,
    /// Members (by id) that left at some change of this pass.
    gone: BTreeSet<String>,
    /// The origins of the incarnations that left at some change of this pass (empty
    /// once `overflow`: at most the members of [`PASS_VIEWS_MAX`] memberships).
    gone_origins: BTreeSet<u64>,
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
        let settled = now + HANDOFF_SETTLE;
        // Left, or restarted (another incarnation under its id).
        let left: Vec<&Member> = before.iter().filter(|m| !after.contains(*m)).collect();
        let left_origins = left.iter().map(|m| m.origin);
        let left_ids = left.iter().map(|m| m.id.clone());
        let (mut views, mut overflow, start_at, gone, mut gone_origins) = match self.pass.take() {
            // Restarted from the first channel, but not later than it was due.
            Some(mut pass) => {
                pass.gone.extend(left_ids);
                pass.gone_origins.extend(left_origins);
                (
                    pass.views,
                    pass.overflow,
                    pass.start_at.min(settled),
                    pass.gone,
                    pass.gone_origins,
                )
            }
            None => (
                Vec::new(),
                false,
                settled,
                left_ids.collect(),
                left_origins.collect(),
            ),
        };
        let before: BTreeSet<Member> = before.iter().cloned().collect();
        if !views.contains(&before) {
            if views.len() < PASS_VIEWS_MAX {
                views.push(before);
            } else {
                overflow = true;
            }
        }
        if overflow {
            // Every stored channel goes to all its homes anyway: the set stays bounded
            // under churn (a pass that never ends).
            gone_origins.clear();
        }
        if !overflow
            && views.iter().all(|view| *view == after)
            && !after.iter().any(|m| gone.contains(&m.id))
        {
            // Back where the running pass started, with no other membership on the way
            // and nobody in it gone meanwhile: nothing moved.
            self.number += 1;
            return;
        }
        self.number += 1;
        self.pass = Some(Pass {
            views,
            overflow,
            after,
            next: None,
            start_at,
            repeat: false,
            gone,
            gone_origins,
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
            let were: Vec<_> = current
                .views
                .iter()
                .map(|view| routing::homes(&key, nodes(view)))
                .collect();
            let now = routing::homes(&key, nodes(&current.after));
            // Events of an incarnation that left are named by no live link any more:
            // every home hears how far this store has them (see the module's text).
            let lists_gone = cursor
                .iter()
                .any(|(origin, seq)| *seq > 0 && current.gone_origins.contains(origin));
            let mut moved: Vec<&str> = now
                .iter()
                .filter(|(region, home)| {
                    **home != me
                        && (lists_gone
                            || current.overflow
                            || were.iter().any(|was| was.get(*region) != Some(*home))
                            || current.gone.contains(**home))
                })
                .map(|(_, home)| *home)
                .collect();
            moved.sort_unstable();
            for home in moved {
                out.push((home.to_string(), (key.clone(), cursor.clone())));
            }
        }
        match next {
            Some(next) => current.next = Some(next),
            None if !current.repeat => {
                // Once more, for entries lost or ignored (see the module's text).
                current.repeat = true;
                current.next = None;
                current.start_at += HANDOFF_REPEAT;
            }
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
            origin: 0,
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
        // The same pass runs once more, `HANDOFF_REPEAT` after it started, and then
        // ends.
        assert!(handoff.running());
        assert!(handoff.next_read(at(12)).is_none());
        let read = handoff
            .next_read(at(11) + HANDOFF_REPEAT)
            .expect("the repeat");
        assert_eq!(read.after, None);
        let again = handoff.on_page(read.pass, stored(&moved), None, "a");
        assert_eq!(again.len(), 3);
        assert!(!handoff.running());
        assert!(handoff.next_read(at(60)).is_none());
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

    /// A member died that was no channel's home: a channel whose stored cursor lists
    /// its origin goes to every home (the node that stores it excepted), one whose
    /// cursor does not goes nowhere (seed 42821: the dead node's message lay in one
    /// home's store only).
    #[test]
    fn a_channel_naming_a_dead_origin_goes_to_every_home() {
        let with_origin = |id: &str, region: &str, origin| Member {
            origin,
            ..member(id, region)
        };
        let before = vec![
            with_origin("a", "r1", 1),
            with_origin("b", "r1", 2),
            with_origin("x", "r2", 3),
        ];
        let after = vec![with_origin("a", "r1", 1), with_origin("x", "r2", 3)];
        // Channels b was not the home of, so no home moved.
        let kept = homed_at("a", &before, 2);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&before, &after, at(0));
        let read = handoff.next_read(at(5)).unwrap();
        let page = vec![
            (kept[0].clone(), vec![(1, 4), (2, 1)]),
            (kept[1].clone(), vec![(1, 4), (2, 0)]),
        ];
        let sent = handoff.on_page(read.pass, page, None, "x");
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!((sent[0].0.as_str(), &sent[0].1 .0), ("a", &kept[0]));
        // b restarted (a new incarnation): its old origin's events are named the same way.
        let back = vec![
            with_origin("a", "r1", 1),
            with_origin("b", "r1", 5),
            with_origin("x", "r2", 3),
        ];
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&before, &back, at(0));
        let read = handoff.next_read(at(5)).unwrap();
        let page = vec![(kept[0].clone(), vec![(2, 1)])];
        let homes: Vec<String> = handoff
            .on_page(read.pass, page, None, "x")
            .into_iter()
            .map(|(home, _)| home)
            .collect();
        assert!(homes.contains(&"a".to_string()), "{homes:?}");
    }

    /// A change during a pass restarts it against the memberships seen; a page read for
    /// the old pass is thrown away; a flap back still tells the home of what it missed.
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
        // Restarted, not put off: it was due, so it reads again at once.
        let read = handoff.next_read(at(1)).unwrap();
        assert_eq!(read.after, None, "from the first channel again");
        let sent = handoff.on_page(read.pass, stored(&to_c), None, "a");
        assert_eq!(sent.iter().filter(|(h, _)| h == "c").count(), 2);

        // b joins and leaves again: while it was there, the events of the channels it
        // was home of went to it, so a, their home again, is told of them.
        let to_b = homed_at("b", &two, 2);
        let mut flap: Handoff<u32> = Handoff::default();
        flap.on_members(&one, &two, at(0));
        flap.on_members(&two, &one, at(0));
        assert!(flap.running());
        let read = flap.next_read(at(5)).unwrap();
        let sent = flap.on_page(read.pass, stored(&to_b), None, "x");
        let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(homes, ["a", "a"]);
    }

    /// Under churn a pass keeps restarting; a home that took a channel over and died
    /// within it leaves the channel to the home it had before, which missed the events
    /// of that while and is told of them (the scaled simulation, seed 2 at 8 s).
    #[test]
    fn a_home_that_gets_a_channel_back_within_a_pass_is_told_of_it() {
        let one = vec![member("a", "r1"), member("x", "r2")];
        let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let three = vec![
            member("a", "r1"),
            member("b", "r1"),
            member("y", "r2"),
            member("x", "r2"),
        ];
        let four = vec![member("a", "r1"), member("y", "r2"), member("x", "r2")];
        let of_b = homed_at("b", &two, 2);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&one, &two, at(0));
        handoff.on_members(&two, &three, at(1));
        handoff.on_members(&three, &four, at(2));
        let read = handoff.next_read(at(2)).unwrap();
        let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
        assert!(
            sent.iter().filter(|(h, _)| h == "a").count() == 2,
            "{sent:?}"
        );
    }

    /// A home that leaves and comes back within one pass (a restart) is sent its
    /// channels: their events went elsewhere meanwhile, and its store may be empty.
    #[test]
    fn a_home_that_left_and_came_back_is_sent_its_channels() {
        let all = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let without_b = vec![member("a", "r1"), member("x", "r2")];
        let of_b = homed_at("b", &all, 2);
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&all, &without_b, at(0));
        handoff.on_members(&without_b, &all, at(0) + Duration::from_millis(500));
        assert!(handoff.running(), "b left on the way");
        let read = handoff.next_read(at(1)).unwrap();
        let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
        let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(homes, ["b", "b"]);

        // A restart noticed only as a new incarnation under the same id is the same.
        let restarted: Vec<Member> = all
            .iter()
            .map(|m| Member {
                origin: if m.id == "b" { 2 } else { 0 },
                ..m.clone()
            })
            .collect();
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&all, &restarted, at(0));
        let read = handoff.next_read(at(1)).unwrap();
        let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
        assert_eq!(sent.len(), 2);
    }

    /// Under churn (a change every half second), each change restarts the pass but does
    /// not put it off: it runs one settle time after the first change.
    #[test]
    fn churn_does_not_put_a_pass_off() {
        let one = vec![member("a", "r1"), member("x", "r2")];
        let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
        let three = vec![member("a", "r1"), member("c", "r1"), member("x", "r2")];
        let mut handoff: Handoff<u32> = Handoff::default();
        handoff.on_members(&one, &two, at(0));
        let half = Duration::from_millis(500);
        handoff.on_members(&two, &three, at(0) + half);
        assert!(handoff.next_read(at(0) + half).is_none(), "settling");
        handoff.on_members(&three, &two, at(1));
        let read = handoff
            .next_read(at(1))
            .expect("due one settle time after the first");
        let to_b = homed_at("b", &two, 2);
        let sent = handoff.on_page(read.pass, stored(&to_b), None, "a");
        assert_eq!(sent.iter().filter(|(h, _)| h == "b").count(), 2);
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
