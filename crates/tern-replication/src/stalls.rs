//! A dead origin's gap that nobody can fill. An origin that dies can leave an event
//! that reached no node while later ones did (its link dropped the one and it crashed
//! before resending). A node that got the later ones holds them back behind the gap for
//! good: no live log has the missing event, a store answer cannot vouch that nobody has
//! it (a copied history may lack what another node holds: `repair::answer_stored`), so
//! no `Skip` ever comes, and messages that exist, acknowledged to their publisher, are
//! never delivered there (the seed sweep, seeds 111382 and 175916: a presence event
//! reached nobody, the messages after it reached one node and its store, and neither that
//! node nor the restarted home ever delivered them).
//!
//! An origin whose node is back under another incarnation crashed, and what it had not
//! sent went with it (a restart on the disk store takes its stored events back and
//! offers them: `recover`): its gap is given up after [`GAP_GIVE_UP`]. An origin that is
//! merely gone from the membership (or that this node never saw as a member) may be
//! behind a partition, its link still holding the event to resend once it heals, or its
//! node may never come back (a machine lost, a node scaled in): waiting for it for good
//! would keep the events behind the gap, acknowledged to their publishers and held by
//! live nodes, from every subscriber and every history for good (the seed sweep, seed
//! 197268: an origin crashed and stayed down after its second event reached nobody, and
//! every node held its later messages back to the end). So such a gap waits for
//! [`GAP_GIVE_UP_GONE`] instead, far longer than a failover, and is then given up too:
//! an event behind a partition that outlasts it arrives too late and is a duplicate here.
//!
//! Whoever else holds the missing event says so well within a while of the crash: a
//! hub that applied it lists the origin at or past it in each second's `Heads` (and
//! answers a repair with it or with a `Skip`), and every store that lists the origin
//! sends its stored cursor to each of the channel's homes in the handoff pass after the
//! death (`handoff`), which the home asks at once. So a gap of a crashed origin that has
//! been dead for [`GAP_GIVE_UP`] and has not moved for as long is one no reachable node
//! can fill: it is skipped, and the events held behind it are delivered, in order. The
//! risk left is a node that holds the event and stayed unreachable for all that while,
//! or a handoff pass too long to end within it: the event then comes too late and is a
//! duplicate here.
//!
//! The driver reports each membership change ([`Stalls::on_members`]) and each gap its
//! hub answers ([`Stalls::on_gap`]), and runs [`Stalls::tick`] each second with its
//! hub's view of the gap; the skips it returns go to the hub as a `Skip` would
//! (`Hub::skip_remote`). At most [`STALLS_MAX`] gaps are watched; past it a new one
//! waits for a slot (a gap reports again each time an event behind it or a repair
//! answer comes).

use std::collections::HashMap;
use std::time::Duration;

use tern_core::ChannelKey;

use crate::handoff::Member;
use crate::Now;

/// How long a gap must have stood still, and its origin been dead, before it is skipped
/// when the origin's node is back under another incarnation.
pub const GAP_GIVE_UP: Duration = Duration::from_secs(30);
/// How long an origin must have been dead before its gap is skipped when its node is
/// not back (gone from the membership, or never seen in it).
pub const GAP_GIVE_UP_GONE: Duration = Duration::from_secs(600);
/// Gaps watched at once.
pub const STALLS_MAX: usize = 4_096;
/// Departed incarnations remembered (origin → node id); past it they are forgotten all
/// at once (their gaps then wait, as a partitioned origin's).
pub const DEPARTED_MAX: usize = 4_096;

struct Stall {
    /// The first missing event, when last seen.
    first: u64,
    /// Since when it has been the first missing event.
    since: Now,
    /// Since when its origin has been seen dead (at a tick), if it is.
    dead_since: Option<Now>,
}

/// The gaps a node's hub holds events back behind, per channel and origin.
#[derive(Default)]
pub struct Stalls {
    watched: HashMap<(ChannelKey, u64), Stall>,
    /// The members now (node id → origin), this node included.
    members: HashMap<String, u64>,
    /// Origins of incarnations that left, with their node's id.
    departed: HashMap<u64, String>,
}

impl Stalls {
    /// Membership went from `before` to `after` (each including this node).
    pub fn on_members(&mut self, before: &[Member], after: &[Member]) {
        for left in before.iter().filter(|m| !after.contains(m)) {
            if self.departed.len() >= DEPARTED_MAX {
                self.departed.clear();
            }
            self.departed.insert(left.origin, left.id.clone());
        }
        self.members = after.iter().map(|m| (m.id.clone(), m.origin)).collect();
    }

    fn live(&self, origin: u64) -> bool {
        self.members.values().any(|o| *o == origin)
    }

    /// `origin`'s node is a member again under another origin (it restarted).
    fn succeeded(&self, origin: u64) -> bool {
        let id = self.departed.get(&origin);
        id.and_then(|id| self.members.get(id))
            .is_some_and(|now| *now != origin)
    }

    /// The hub answered an event with a gap: `origin`'s events from `first` on `key` are
    /// missing. Returns false when the gap could not be watched (the table is full).
    pub fn on_gap(&mut self, key: &ChannelKey, origin: u64, first: u64, now: Now) -> bool {
        if let Some(stall) = self.watched.get_mut(&(key.clone(), origin)) {
            if stall.first != first {
                stall.first = first;
                stall.since = now;
            }
            return true;
        }
        if self.watched.len() >= STALLS_MAX {
            return false;
        }
        self.watched.insert(
            (key.clone(), origin),
            Stall {
                first,
                since: now,
                dead_since: None,
            },
        );
        true
    }

    /// Each second: `held_back` gives the hub's cursor for an origin on a channel and
    /// the first event it holds back (`None`: nothing held back, or the channel is not
    /// held). Returns the skips to make, `(key, origin, upto)`: the gap up to the first
    /// event held behind it, for origins dead for [`GAP_GIVE_UP`] and succeeded by
    /// another incarnation of their node, or dead for [`GAP_GIVE_UP_GONE`]. Gaps filled
    /// meanwhile are forgotten.
    ///
    /// `held_back` runs under the caller's lock on this table: it may take a channel's
    /// lock, so no code may call into this table while it holds one.
    pub fn tick(
        &mut self,
        now: Now,
        mut held_back: impl FnMut(&ChannelKey, u64) -> Option<(u64, u64)>,
    ) -> Vec<(ChannelKey, u64, u64)> {
        let mut skips = Vec::new();
        let mut watched = std::mem::take(&mut self.watched);
        watched.retain(|(key, origin), stall| {
            if self.live(*origin) {
                stall.dead_since = None;
            } else if stall.dead_since.is_none() {
                stall.dead_since = Some(now);
            }
            let waited = |since: Now, wait: Duration| now.saturating_sub(since) >= wait;
            if !waited(stall.since, GAP_GIVE_UP) {
                return true;
            }
            // Stood still long enough: look at the hub again.
            let Some((cursor, held)) = held_back(key, *origin) else {
                return false;
            };
            if cursor + 1 != stall.first {
                // It moved without a gap reported (a `Skip`, a repair answer).
                stall.first = cursor + 1;
                stall.since = now;
                return true;
            }
            let wait = if self.succeeded(*origin) {
                GAP_GIVE_UP
            } else {
                GAP_GIVE_UP_GONE
            };
            if !stall.dead_since.is_some_and(|since| waited(since, wait)) {
                return true;
            }
            if held > stall.first {
                skips.push((key.clone(), *origin, held - 1));
            }
            false
        });
        self.watched = watched;
        skips.sort_by(|a, b| (&a.0.app, &a.0.name, a.1).cmp(&(&b.0.app, &b.0.name, b.1)));
        skips
    }

    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Now {
        Duration::from_secs(s)
    }

    fn member(id: &str, origin: u64) -> Member {
        Member {
            id: id.into(),
            region: "r1".into(),
            origin,
        }
    }

    /// Node "b" ran as origin 7; `restarted`: it is back as origin 17, else it is gone.
    fn seen_leave(stalls: &mut Stalls, restarted: bool) {
        let before = [member("a", 1), member("b", 7)];
        let mut after = vec![member("a", 1)];
        if restarted {
            after.push(member("b", 17));
        }
        stalls.on_members(&before, &after);
    }

    /// A crashed origin's gap that stands still is skipped up to the first event held
    /// behind it, once the origin has been dead (and its node back as another
    /// incarnation) and the gap still for `GAP_GIVE_UP`.
    #[test]
    fn a_crashed_origins_gap_that_stands_still_is_skipped() {
        let key = ChannelKey::new("a", "c");
        let mut stalls = Stalls::default();
        stalls.on_members(&[], &[member("a", 1), member("b", 7)]);
        assert!(stalls.on_gap(&key, 7, 1, secs(0)));
        // Origin 7 is live for 10 s, then gone, and back under another origin.
        for t in 0..10 {
            assert!(stalls.tick(secs(t), |_, _| Some((0, 2))).is_empty());
        }
        seen_leave(&mut stalls, true);
        assert!(stalls.tick(secs(10), |_, _| Some((0, 2))).is_empty());
        assert!(
            stalls.tick(secs(39), |_, _| Some((0, 2))).is_empty(),
            "dead for 29 s only"
        );
        assert_eq!(
            stalls.tick(secs(40), |_, _| Some((0, 2))),
            [(key.clone(), 7, 1)]
        );
        assert!(stalls.is_empty());
    }

    /// An origin gone from the membership with its node not back (a partition, or a
    /// node that stays down) is waited for far longer: its link may still resend the
    /// event. Its node back as another incarnation: the short wait, counted from its
    /// death.
    #[test]
    fn a_gone_origins_gap_waits_longer() {
        let key = ChannelKey::new("a", "c");
        let mut stalls = Stalls::default();
        stalls.on_members(&[], &[member("a", 1), member("b", 7)]);
        stalls.on_gap(&key, 7, 1, secs(0));
        seen_leave(&mut stalls, false);
        for t in 0..300 {
            assert!(stalls.tick(secs(t), |_, _| Some((0, 2))).is_empty());
        }
        assert_eq!(stalls.len(), 1);
        stalls.on_members(&[member("a", 1)], &[member("a", 1), member("b", 17)]);
        assert_eq!(
            stalls.tick(secs(300), |_, _| Some((0, 2))),
            [(key.clone(), 7, 1)]
        );
    }

    /// A node that stays down for good (or an origin this node never saw as a member)
    /// does not hold the events behind its gap back for good: they are delivered once
    /// it has been dead for `GAP_GIVE_UP_GONE` (the seed sweep, seed 197268).
    #[test]
    fn a_gone_origins_gap_is_skipped_after_the_long_wait() {
        let key = ChannelKey::new("a", "c");
        let gone = GAP_GIVE_UP_GONE.as_secs();
        let mut stalls = Stalls::default();
        stalls.on_members(&[], &[member("a", 1), member("b", 7)]);
        stalls.on_gap(&key, 7, 1, secs(0));
        seen_leave(&mut stalls, false);
        // Dead from the tick at 10 s on.
        for t in 10..10 + gone {
            assert!(stalls.tick(secs(t), |_, _| Some((0, 2))).is_empty());
        }
        assert_eq!(
            stalls.tick(secs(10 + gone), |_, _| Some((0, 2))),
            [(key.clone(), 7, 1)]
        );
        // Never a member: dead from the first tick that watches it.
        stalls.on_gap(&key, 99, 4, secs(1_000));
        assert!(stalls.tick(secs(1_000), |_, _| Some((3, 9))).is_empty());
        assert!(stalls
            .tick(secs(999 + gone), |_, _| Some((3, 9)))
            .is_empty());
        assert_eq!(
            stalls.tick(secs(1_000 + gone), |_, _| Some((3, 9))),
            [(key.clone(), 99, 8)]
        );
    }

    /// A live origin's gap is never skipped (its link resends); a gap that moved starts
    /// its wait again; one filled is forgotten.
    #[test]
    fn live_moving_or_filled_gaps_are_not_skipped() {
        let key = ChannelKey::new("a", "c");
        let mut stalls = Stalls::default();
        stalls.on_members(&[], &[member("a", 1), member("b", 7)]);
        stalls.on_gap(&key, 7, 1, secs(0));
        assert!(stalls.tick(secs(100), |_, _| Some((0, 5))).is_empty());
        // Dead from 100 s; the gap moved on to 3 (a repair brought 1 and 2) at 110 s.
        seen_leave(&mut stalls, true);
        stalls.tick(secs(100), |_, _| Some((0, 5)));
        stalls.on_gap(&key, 7, 3, secs(110));
        assert!(stalls.tick(secs(130), |_, _| Some((2, 5))).is_empty());
        assert_eq!(
            stalls.tick(secs(140), |_, _| Some((2, 5))),
            [(key.clone(), 7, 4)]
        );
        // Moved without a report: the wait starts again.
        stalls.on_gap(&key, 7, 1, secs(140));
        assert!(stalls.tick(secs(170), |_, _| Some((3, 9))).is_empty());
        assert!(stalls.tick(secs(199), |_, _| Some((3, 9))).is_empty());
        assert_eq!(
            stalls.tick(secs(200), |_, _| Some((3, 9))),
            [(key.clone(), 7, 8)]
        );
        // Filled: forgotten.
        stalls.on_gap(&key, 7, 1, secs(200));
        assert!(stalls.tick(secs(240), |_, _| None).is_empty());
        assert!(stalls.is_empty());
    }

    #[test]
    fn the_tables_are_bounded() {
        let mut stalls = Stalls::default();
        for i in 0..STALLS_MAX {
            assert!(stalls.on_gap(&ChannelKey::new("a", &format!("c{i}")), 1, 1, secs(0)));
        }
        assert!(!stalls.on_gap(&ChannelKey::new("a", "one more"), 1, 1, secs(0)));
        assert!(stalls.on_gap(&ChannelKey::new("a", "c0"), 1, 2, secs(0)));
        assert_eq!(stalls.len(), STALLS_MAX);
        for i in 0..=DEPARTED_MAX as u64 {
            stalls.on_members(&[member("a", 1), member("b", 100 + i)], &[member("a", 1)]);
        }
        assert!(stalls.departed.len() <= DEPARTED_MAX);
    }
}
