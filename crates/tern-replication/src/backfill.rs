//! History backfill: a channel's new home (a joining node, or the next one after a home
//! died) copies the stored history its store lacks from the channel's home in another
//! region, a page at a time, asking again for a page not answered within
//! [`ASK_AGAIN_AFTER`]; at most once per [`BACKFILL_AGAIN_AFTER`] per channel.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tern_core::ChannelKey;

use crate::warm::ASK_AGAIN_AFTER;
use crate::Now;

/// Stored items per page, and their payload bytes beyond which a page is cut early (a
/// page always carries at least one item).
pub const BACKFILL_PAGE: usize = 64;
pub const BACKFILL_BYTES_MAX: usize = 8 << 20;
/// Channels being backfilled at once, and how soon one may be backfilled again.
pub const BACKFILLS_MAX: usize = 10_000;
pub const BACKFILL_AGAIN_AFTER: Duration = Duration::from_secs(60);
/// Sources waiting their turn per channel (each has part of the history: an origin's
/// store holds that origin's messages, and a home's what reached it while it was home).
pub const SOURCES_QUEUED_MAX: usize = 4;

/// A page position, opaque here (the driver's stored-item position).
struct Backfilling<P> {
    started: Now,
    source: String,
    /// Per kind (messages, presence): the page asked for and not answered yet.
    waiting: [Option<Option<P>>; 2],
    asked: Now,
    /// When the source last answered (or the copy started).
    heard: Now,
    /// Other nodes that listed more of the channel than the store holds while this copy
    /// was under way: copied from next, in turn (at most [`SOURCES_QUEUED_MAX`]).
    queued: VecDeque<String>,
}

/// What to do with a page that arrived ([`Backfills::took`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Took {
    /// Nothing of the channel is being copied: drop it.
    Unasked,
    /// From a source the copy moved on from: store it, ask for nothing.
    Store,
    /// From the current source: store it, and ask for the next page if there is more.
    Next,
}

/// Channels whose history this node is copying.
pub struct Backfills<P> {
    channels: HashMap<ChannelKey, Backfilling<P>>,
}

impl<P> Default for Backfills<P> {
    fn default() -> Self {
        Backfills {
            channels: HashMap::new(),
        }
    }
}

/// Where to copy from: this node must be the channel's home in its region (`homes` maps
/// region → home). `told_by`, the node whose `Heads` listed more of the channel than this
/// node's store holds, has at least that in its store: it is the source. Otherwise (after
/// a `Skip`) another region's home, which routing gave every event (the lowest id, for
/// determinism). A fresh home in another region may itself have nothing yet (the scaled
/// simulation, seed 5: two new homes copied from each other and got nothing).
pub fn source<'a>(
    homes: &HashMap<&'a str, &'a str>,
    my_region: &str,
    me: &str,
    told_by: Option<&'a str>,
) -> Option<&'a str> {
    if homes.get(my_region) != Some(&me) {
        return None;
    }
    told_by.filter(|node| *node != me).or_else(|| {
        homes
            .iter()
            .filter(|(region, _)| **region != my_region)
            .map(|(_, node)| *node)
            .min()
    })
}

/// Whether a store whose cursor on a channel is `stored` holds everything a peer's
/// cursor `listed` names: per origin, at least as far. A new home told of a channel by a
/// `Heads` (a handoff, after its store missed events while it was down) copies the
/// channel's history unless its store covers the sender's cursor: the repair that
/// `Heads` asks for reaches only logs, and every log may have dropped the channel.
pub fn covers(stored: &[(u64, u64)], listed: &[(u64, u64)]) -> bool {
    listed.iter().all(|&(origin, seq)| {
        stored
            .iter()
            .any(|&(have_origin, have)| have_origin == origin && have >= seq)
    })
}

impl<P: Copy> Backfills<P> {
    /// Starts copying `key` from `source` unless it was started within
    /// [`BACKFILL_AGAIN_AFTER`], too many are under way, or (`!missed`) the store
    /// already has what the peer listed (`stored`, see [`covers`]). Returns whether to
    /// ask for the first page of both kinds.
    pub fn start(
        &mut self,
        key: &ChannelKey,
        source: &str,
        now: Now,
        missed: bool,
        stored: impl FnOnce() -> bool,
    ) -> bool {
        let fresh = |b: &Backfilling<P>| now.saturating_sub(b.started) < BACKFILL_AGAIN_AFTER;
        // Once per `BACKFILL_AGAIN_AFTER` from one source; another source may start once
        // the last copy is done (it may have had nothing) or its source went silent (it
        // may have died: asking it again would hold the channel for the whole window).
        let busy = |b: &Backfilling<P>| {
            b.waiting.iter().any(Option::is_some)
                && now.saturating_sub(b.heard) < ASK_AGAIN_AFTER * 2
        };
        if let Some(b) = self.channels.get_mut(key).filter(|b| fresh(b)) {
            if b.source == source {
                return false;
            }
            if busy(b) {
                let behind = missed || !stored();
                let known = b.queued.iter().any(|q| q == source);
                if behind && !known && b.queued.len() < SOURCES_QUEUED_MAX {
                    b.queued.push_back(source.to_string());
                }
                return false;
            }
        }
        self.channels.retain(|_, b| fresh(b));
        if self.channels.len() >= BACKFILLS_MAX || (!missed && stored()) {
            return false;
        }
        self.channels.insert(
            key.clone(),
            Backfilling {
                started: now,
                source: source.to_string(),
                waiting: [Some(None), Some(None)],
                asked: now,
                heard: now,
                queued: VecDeque::new(),
            },
        );
        true
    }

    /// A page of `key` arrived from `from`: whether to store it, and whether to ask
    /// `from` for the next page (from `last`, when `more`).
    pub fn took(
        &mut self,
        key: &ChannelKey,
        from: &str,
        presence: bool,
        last: Option<P>,
        more: bool,
        now: Now,
    ) -> Took {
        let Some(b) = self.channels.get_mut(key) else {
            return Took::Unasked;
        };
        if b.source != from {
            // A late page of a source this copy gave up on (it went silent): still the
            // channel's history, but the current source's wait is not its to end.
            return Took::Store;
        }
        b.waiting[usize::from(presence)] = if more { last.map(Some) } else { None };
        b.asked = now;
        b.heard = now;
        Took::Next
    }

    /// Pages to ask for again, and the first pages of a queued source whose turn came:
    /// (source, channel, presence, after).
    pub fn tick(&mut self, now: Now) -> Vec<(String, ChannelKey, bool, Option<P>)> {
        let mut again = Vec::new();
        for (key, b) in self.channels.iter_mut() {
            if now.saturating_sub(b.started) >= BACKFILL_AGAIN_AFTER {
                continue;
            }
            // The copy is done, or its source went silent: the next source's turn.
            let done = b.waiting.iter().all(Option::is_none);
            let silent = now.saturating_sub(b.heard) >= ASK_AGAIN_AFTER * 2;
            if done || silent {
                if let Some(next) = b.queued.pop_front() {
                    b.source = next;
                    b.waiting = [Some(None), Some(None)];
                    (b.asked, b.heard) = (now, now);
                    for presence in [false, true] {
                        again.push((b.source.clone(), key.clone(), presence, None));
                    }
                }
                if done {
                    continue;
                }
            }
            if now.saturating_sub(b.asked) < ASK_AGAIN_AFTER {
                continue;
            }
            b.asked = now;
            for (kind, waiting) in b.waiting.iter().enumerate() {
                if let Some(after) = waiting {
                    again.push((b.source.clone(), key.clone(), kind == 1, *after));
                }
            }
        }
        again
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

/// How many of a page's items (by payload size) to send: at most
/// [`BACKFILL_BYTES_MAX`] bytes, but at least one. Returns the count and whether the
/// page was cut (the reader then asks for the rest).
pub fn cut_page(sizes: impl IntoIterator<Item = usize>) -> Option<usize> {
    let mut bytes = 0;
    sizes
        .into_iter()
        .position(|size| {
            bytes += size;
            bytes > BACKFILL_BYTES_MAX
        })
        .map(|cut| cut.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_home_copies_from_who_listed_it_or_another_regions_home() {
        let homes: HashMap<&str, &str> = [("a", "a1"), ("b", "b2"), ("c", "c1")].into();
        assert_eq!(source(&homes, "a", "a1", None), Some("b2"));
        assert_eq!(
            source(&homes, "a", "a1", Some("a2")),
            Some("a2"),
            "who listed it"
        );
        assert_eq!(source(&homes, "a", "a1", Some("a1")), Some("b2"));
        assert_eq!(source(&homes, "a", "a2", Some("a1")), None);
        // One region: only the node that told of the channel, never this one.
        let alone: HashMap<&str, &str> = [("a", "a1")].into();
        assert_eq!(source(&alone, "a", "a1", None), None);
        assert_eq!(source(&alone, "a", "a1", Some("a2")), Some("a2"));
        assert_eq!(source(&alone, "a", "a1", Some("a1")), None);
    }

    #[test]
    fn pages_are_asked_again_and_not_restarted_too_soon() {
        let key = ChannelKey::new("app", "room");
        let mut b: Backfills<u32> = Backfills::default();
        let t0 = Now::from_secs(1);
        assert!(!b.start(&key, "src", t0, false, || true), "already stored");
        assert!(b.start(&key, "src", t0, false, || false));
        assert!(!b.start(&key, "src", t0, true, || false), "under way");
        assert!(b.tick(t0).is_empty());
        let again = b.tick(t0 + ASK_AGAIN_AFTER);
        assert_eq!(again.len(), 2);
        assert_eq!(
            b.took(&key, "src", false, Some(9), true, t0 + ASK_AGAIN_AFTER),
            Took::Next
        );
        assert_eq!(
            b.took(&key, "src", true, None, false, t0 + ASK_AGAIN_AFTER),
            Took::Next
        );
        let again = b.tick(t0 + ASK_AGAIN_AFTER * 2);
        assert_eq!(
            again,
            vec![("src".to_string(), key.clone(), false, Some(9))]
        );
        assert!(b.start(&key, "src", t0 + BACKFILL_AGAIN_AFTER, true, || true));
        // Another source may start once the copy is done, the same one may not.
        let t1 = t0 + BACKFILL_AGAIN_AFTER;
        assert!(!b.start(&key, "other", t1, true, || false), "under way");
        assert_eq!(b.took(&key, "src", false, None, false, t1), Took::Next);
        assert_eq!(b.took(&key, "src", true, None, false, t1), Took::Next);
        assert!(!b.start(&key, "src", t1, true, || false));
        assert!(b.start(&key, "other", t1, true, || false));
        // Sources listing more while a copy is under way are copied from in turn.
        assert!(!b.start(&key, "fourth", t1, true, || false), "queued");
        assert_eq!(b.took(&key, "other", false, None, false, t1), Took::Next);
        assert_eq!(b.took(&key, "other", true, None, false, t1), Took::Next);
        let next = b.tick(t1);
        assert_eq!(
            next,
            vec![
                ("fourth".to_string(), key.clone(), false, None),
                ("fourth".to_string(), key.clone(), true, None)
            ]
        );
        // A late page of the source the copy moved on from is stored, but does not end
        // the current source's wait.
        assert_eq!(b.took(&key, "other", false, None, false, t1), Took::Store);
        let again = b.tick(t1 + ASK_AGAIN_AFTER);
        assert_eq!(
            again.len(),
            2,
            "both kinds still asked of the current source"
        );
        assert!(again.iter().all(|(source, ..)| source == "fourth"));
        assert_eq!(
            b.took(
                &ChannelKey::new("app", "other"),
                "fourth",
                false,
                None,
                false,
                t1
            ),
            Took::Unasked
        );
        // A source that stays silent (dead) gives way to another after two asks.
        assert!(!b.start(&key, "third", t1 + ASK_AGAIN_AFTER, true, || false));
        assert!(b.start(&key, "fifth", t1 + ASK_AGAIN_AFTER * 2, true, || false));
    }

    /// A store that has some of a channel but not all a peer lists is behind: a home
    /// that was down while a live origin published on a channel idle everywhere (the
    /// scaled simulation with idle channels dropped and stores that survive restarts).
    #[test]
    fn a_store_covers_a_cursor_only_when_it_has_every_origin_as_far() {
        assert!(covers(&[(1, 5), (2, 3)], &[(1, 5), (2, 1)]));
        assert!(covers(&[(1, 5)], &[]));
        assert!(!covers(&[(1, 5)], &[(1, 5), (2, 1)]), "an origin it lacks");
        assert!(
            !covers(&[(1, 4), (2, 3)], &[(1, 5)]),
            "an origin not as far"
        );
        assert!(!covers(&[], &[(1, 1)]));
    }

    #[test]
    fn a_page_is_cut_by_bytes_but_keeps_one_item() {
        assert_eq!(cut_page([10, 10]), None);
        assert_eq!(cut_page([BACKFILL_BYTES_MAX + 1]), Some(1));
        assert_eq!(cut_page([BACKFILL_BYTES_MAX, 1, 1]), Some(1));
    }
}
