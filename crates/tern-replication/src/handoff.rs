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
//! A node restarted with its store that took its predecessors' events back
//! (`recover::adopt`) holds events perhaps nobody else has, under origins that left, and
//! its hub forgets them when it drops the channel while idle: it runs such a pass of its
//! own for those origins ([`Handoff::on_adopted`]) once it has found its peers.
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
        let settled = now + HANDOFF_SETTLE;
        if before.len() <= 1 && now < HANDOFF_STARTUP {
            match &mut self.pass {
                None => return,
                // The pass for this node's adopted origins alone (`on_adopted`): finding
                // peers moves no channel, but its entries go to the homes found.
                Some(pass) if pass.views.is_empty() => {
                    pass.after = after;
                    pass.next = None;
                    pass.repeat = false;
                    pass.start_at = settled;
                    self.number += 1;
                    return;
                }
                Some(_) => {}
            }
        }
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

    /// This node, restarted with its store, took its earlier incarnations' stored
    /// events back into its hub under `origins` (`recover::adopt`); `members` is the
    /// membership now. Those events may be in no other node's store or hub, and this
    /// hub forgets them when it drops the channel while idle, which it may do before any
    /// of its `Heads` reached a home: a pass of its own sends every stored channel that
    /// lists one of `origins` to each of its homes, as for an incarnation that left
    /// (the seed sweep with durable stores and idle channels dropped, seed 131187). It
    /// runs once this node knows a peer, [`HANDOFF_SETTLE`] after it found the last
    /// while alone, and is exempt from the start-up rule for that.
    pub fn on_adopted(&mut self, origins: &[u64], members: &[Member], now: Now) {
        if origins.is_empty() {
            return;
        }
        self.number += 1;
        let settled = now + HANDOFF_SETTLE;
        match &mut self.pass {
            Some(pass) => {
                if !pass.overflow {
                    pass.gone_origins.extend(origins);
                }
                pass.next = None;
                pass.repeat = false;
                pass.start_at = pass.start_at.min(settled);
            }
            None => {
                self.pass = Some(Pass {
                    views: Vec::new(),
                    overflow: false,
                    after: members.iter().cloned().collect(),
                    next: None,
                    start_at: settled,
                    repeat: false,
                    gone: BTreeSet::new(),
                    gone_origins: origins.iter().copied().collect(),
                })
            }
        }
    }

    /// Whether a pass is under way.
    pub fn running(&self) -> bool {
        self.pass.is_some()
    }

    /// The page to read now, if any: a pass is under way, settled, and no page is
    /// being read. The caller reads it and hands it to [`Self::on_page`].
    pub fn next_read(&mut self, now: Now) -> Option<PageRead<T>> {
        let pass = self.pass.as_ref()?;
        // The adopted origins' pass waits for a peer: alone, every home is this node.
        let alone = pass.views.is_empty() && pass.after.len() <= 1;
        if self.reading || now < pass.start_at || alone {
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
mod tests;
