//! `ack_replicas` as data. A publish's reply waits until the events journaled before it
//! are stored on enough of the links they went out on; the rules here say which waiting
//! replies are answered, in call order, and how (`true`: replicated; `false`: timed
//! out, a NACK). The driver holds the replies (callbacks, channels) under a token.

use std::collections::VecDeque;
use std::time::Duration;

use crate::links::OutLink;
use crate::Now;

/// A publish waiting for `ack_replicas` longer than this is refused (NACK), not ACKed.
pub const REPLICA_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Replies waiting at once at most. Past it the oldest is answered as timed out (a
/// NACK, in order) before its time: the queue is bounded by count, not only by
/// [`REPLICA_ACK_TIMEOUT`] × the publish rate (256k replies is 10 s at 25k publishes/s
/// with no replica answering).
pub const WAITERS_MAX: usize = 1 << 18;

/// A link as a waiter sees it: its positions, and whether it leads to another region.
#[derive(Clone, Copy, Debug)]
pub struct LinkView {
    pub link: OutLink,
    pub remote: bool,
}

/// Whether enough of `targets` (per link epoch: the position covering the publish) are
/// stored: `ack_replicas` of the links still up and not past a buffer drop, or all of
/// them if fewer; and when one of them leads to another region, at least one that
/// stored does, so an acknowledged message survives losing a whole region.
pub fn satisfied(
    ack_replicas: usize,
    targets: &[(u64, u64)],
    link: impl Fn(u64) -> Option<LinkView>,
) -> bool {
    if ack_replicas == 0 {
        return true;
    }
    let (mut candidates, mut stored) = (0, 0);
    let (mut remote_candidate, mut remote_stored) = (false, false);
    for &(epoch, target) in targets {
        // A peer that left (or came back as a new link) no longer counts.
        let Some(view) = link(epoch) else { continue };
        if view.link.counts_after >= target {
            continue;
        }
        candidates += 1;
        remote_candidate |= view.remote;
        if view.link.acked >= target {
            stored += 1;
            remote_stored |= view.remote;
        }
    }
    stored >= ack_replicas.min(candidates) && (remote_stored || !remote_candidate)
}

struct Waiter<T> {
    targets: Vec<(u64, u64)>,
    since: Now,
    token: T,
}

/// Replies waiting for their replicas, in call order (a later reply never overtakes).
pub struct Waiters<T> {
    queue: VecDeque<Waiter<T>>,
    /// [`WAITERS_MAX`] but in tests.
    max: usize,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters::with_max(WAITERS_MAX)
    }
}

impl<T> Waiters<T> {
    /// Waiters of which at most `max` wait at once (see [`WAITERS_MAX`]).
    pub fn with_max(max: usize) -> Waiters<T> {
        Waiters {
            queue: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// Queues a reply waiting for `targets` (empty: it only keeps the order).
    pub fn push(&mut self, targets: Vec<(u64, u64)>, now: Now, token: T) {
        self.queue.push_back(Waiter {
            targets,
            since: now,
            token,
        });
    }

    /// The replies to answer now, in order, with `true` (replicated) or `false` (timed
    /// out, or the oldest of more than `max` waiting), given how each link stands.
    pub fn drain(
        &mut self,
        ack_replicas: usize,
        now: Now,
        link: impl Fn(u64) -> Option<LinkView>,
    ) -> Vec<(T, bool)> {
        let mut done = Vec::new();
        while let Some(front) = self.queue.front() {
            let ok = satisfied(ack_replicas, &front.targets, &link);
            let expired = now.saturating_sub(front.since) >= REPLICA_ACK_TIMEOUT
                || self.queue.len() > self.max;
            if !ok && !expired {
                break;
            }
            let waiter = self.queue.pop_front().expect("checked non-empty");
            done.push((waiter.token, ok));
        }
        done
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// When the oldest reply still waiting was queued.
    pub fn oldest(&self) -> Option<Now> {
        self.queue.front().map(|w| w.since)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(epoch: u64, seq: u64, acked: u64, remote: bool) -> LinkView {
        LinkView {
            link: OutLink {
                epoch,
                seq,
                counts_after: 0,
                acked,
            },
            remote,
        }
    }

    #[test]
    fn needs_a_remote_replica_when_one_was_a_recipient() {
        let links = |acked_local: u64, acked_remote: u64| {
            move |epoch: u64| match epoch {
                1 => Some(view(1, 5, acked_local, false)),
                2 => Some(view(2, 5, acked_remote, true)),
                _ => None,
            }
        };
        let targets = [(1, 5), (2, 5)];
        assert!(!satisfied(1, &targets, links(5, 0)));
        assert!(satisfied(1, &targets, links(0, 5)));
        assert!(!satisfied(2, &targets, links(0, 5)));
        assert!(satisfied(2, &targets, links(5, 5)));
        // Gone links do not count: all of the remaining are enough.
        assert!(satisfied(2, &[(1, 5), (9, 5)], links(5, 0)));
        assert!(satisfied(0, &targets, links(0, 0)));
    }

    #[test]
    fn answers_in_order_and_times_out() {
        let mut waiters = Waiters::default();
        let t0 = Now::from_secs(1);
        waiters.push(vec![(1, 2)], t0, "first");
        waiters.push(vec![(1, 1)], t0, "second");
        waiters.push(vec![], t0, "third");
        let acked = |upto: u64| move |_e: u64| Some(view(1, 2, upto, false));
        // The second is covered but waits behind the first.
        assert!(waiters.drain(1, t0, acked(1)).is_empty());
        assert_eq!(
            waiters.drain(1, t0, acked(2)),
            vec![("first", true), ("second", true), ("third", true)]
        );
        waiters.push(vec![(1, 3)], t0, "late");
        assert!(waiters.drain(1, t0, acked(2)).is_empty());
        let later = t0 + REPLICA_ACK_TIMEOUT;
        assert_eq!(waiters.drain(1, later, acked(2)), vec![("late", false)]);
        assert!(waiters.is_empty());
    }

    /// Past `max` waiting, the oldest is NACKed at once, in order; the rest wait on.
    #[test]
    fn the_oldest_is_refused_past_the_bound() {
        let mut waiters = Waiters::with_max(2);
        let t0 = Now::from_secs(1);
        let none = |_e: u64| Some(view(1, 9, 0, false));
        waiters.push(vec![(1, 1)], t0, "a");
        waiters.push(vec![(1, 2)], t0, "b");
        assert!(waiters.drain(1, t0, none).is_empty());
        waiters.push(vec![(1, 3)], t0, "c");
        assert_eq!(waiters.drain(1, t0, none), vec![("a", false)]);
        assert_eq!(waiters.len(), 2);
        // Once b is stored, it and nothing after it goes.
        let b_stored = |_e: u64| Some(view(1, 9, 2, false));
        assert_eq!(waiters.drain(1, t0, b_stored), vec![("b", true)]);
    }
}
