//! Keeping one connection's publishes in order while some wait for a function.
//!
//! A realtime connection's publishes must be applied, and answered (ACK/NACK), in the
//! order they were sent: ably-js matches replies to msgSerials in order, and a later
//! message must not overtake an earlier one on the channel. A publish that waits for
//! its before-publish function therefore holds back every publish sent after it, even
//! one that needs no function; the calls themselves run concurrently. [`Pipeline`] is
//! that queue, with no I/O: the session pushes each publish (saying whether it waits
//! for a verdict), hands verdicts in as they arrive, in any order, and pops what may be
//! applied now, always from the front.

use std::collections::VecDeque;

/// Names one pushed entry, to hand its verdict in with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

#[derive(Debug)]
enum Slot<V> {
    /// Waiting for its verdict.
    Waiting,
    /// Ready: `None` when it needed no verdict.
    Ready(Option<V>),
}

/// A bounded FIFO of publishes, each ready or waiting for a verdict.
#[derive(Debug)]
pub struct Pipeline<T, V> {
    entries: VecDeque<(T, Slot<V>)>,
    /// Ticket of the entry at the front.
    front: u64,
    capacity: usize,
}

impl<T, V> Pipeline<T, V> {
    /// A pipeline holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Pipeline {
            entries: VecDeque::new(),
            front: 0,
            capacity: capacity.max(1),
        }
    }

    /// Whether nothing waits: a publish may then be applied at once, without a push.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds `capacity` entries: read no more publishes until one pops.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Queues `item` behind everything queued before. `waits`: it needs a verdict
    /// ([`Self::resolve`]) before it can pop. Over capacity it is still queued (the
    /// caller checks [`Self::is_full`] before reading more), so nothing is lost.
    pub fn push(&mut self, item: T, waits: bool) -> Ticket {
        let ticket = Ticket(self.front + self.entries.len() as u64);
        let slot = if waits {
            Slot::Waiting
        } else {
            Slot::Ready(None)
        };
        self.entries.push_back((item, slot));
        ticket
    }

    /// Hands in the verdict of `ticket`. False (and the verdict dropped) when the ticket
    /// is not waiting: already resolved, popped, or never issued.
    pub fn resolve(&mut self, ticket: Ticket, verdict: V) -> bool {
        let Some(index) = ticket.0.checked_sub(self.front) else {
            return false;
        };
        match self.entries.get_mut(index as usize) {
            Some((_, slot @ Slot::Waiting)) => {
                *slot = Slot::Ready(Some(verdict));
                true
            }
            _ => false,
        }
    }

    /// The front entry and its verdict, if it is ready; call again until `None`.
    pub fn pop(&mut self) -> Option<(T, Option<V>)> {
        if !matches!(self.entries.front(), Some((_, Slot::Ready(_)))) {
            return None;
        }
        let (item, slot) = self.entries.pop_front()?;
        self.front += 1;
        match slot {
            Slot::Ready(verdict) => Some((item, verdict)),
            Slot::Waiting => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries pop in push order whatever order verdicts arrive in; an entry that needs
    /// no verdict still waits behind one that does.
    #[test]
    fn pops_in_push_order() {
        let mut p: Pipeline<&str, u8> = Pipeline::new(8);
        assert!(p.is_empty());
        let a = p.push("a", true);
        let _b = p.push("b", false);
        let c = p.push("c", true);
        let _d = p.push("d", false);
        assert_eq!(p.pop(), None, "a waits, and so does everything behind it");
        assert!(p.resolve(c, 3));
        assert_eq!(p.pop(), None, "c is ready but a is not");
        assert!(p.resolve(a, 1));
        assert_eq!(p.pop(), Some(("a", Some(1))));
        assert_eq!(p.pop(), Some(("b", None)));
        assert_eq!(p.pop(), Some(("c", Some(3))));
        assert_eq!(p.pop(), Some(("d", None)));
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }

    /// A verdict for a popped, resolved or unknown ticket is refused, never applied to
    /// another entry.
    #[test]
    fn stale_tickets_are_refused() {
        let mut p: Pipeline<u32, u8> = Pipeline::new(8);
        let a = p.push(1, true);
        assert!(p.resolve(a, 1));
        assert!(!p.resolve(a, 2), "resolved twice");
        assert_eq!(p.pop(), Some((1, Some(1))));
        assert!(!p.resolve(a, 3), "popped");
        let b = p.push(2, true);
        assert_ne!(a, b);
        assert!(!p.resolve(Ticket(99), 4), "never issued");
        assert!(p.resolve(b, 5));
        assert_eq!(p.pop(), Some((2, Some(5))));
    }

    /// The capacity is what `is_full` reports; a push over it is kept, not lost.
    #[test]
    fn bounded() {
        let mut p: Pipeline<u32, ()> = Pipeline::new(2);
        let first = p.push(1, true);
        assert!(!p.is_full());
        p.push(2, false);
        assert!(p.is_full());
        p.push(3, false);
        assert_eq!(p.len(), 3);
        p.resolve(first, ());
        assert_eq!(p.pop(), Some((1, Some(()))));
        assert_eq!(p.pop(), Some((2, None)));
        assert!(!p.is_full());
        assert_eq!(p.pop(), Some((3, None)));
    }

    /// A seeded sweep: any interleaving of pushes, verdicts and pops yields the pushed
    /// order, each entry once.
    #[test]
    fn random_interleavings_keep_order() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut p: Pipeline<u32, u32> = Pipeline::new(16);
            let mut waiting: Vec<(Ticket, u32)> = Vec::new();
            let mut popped = Vec::new();
            let mut pushed = 0;
            while pushed < 50 || !p.is_empty() {
                match next() % 3 {
                    0 if pushed < 50 && !p.is_full() => {
                        let waits = next() % 2 == 0;
                        let ticket = p.push(pushed, waits);
                        if waits {
                            waiting.push((ticket, pushed));
                        }
                        pushed += 1;
                    }
                    1 if !waiting.is_empty() => {
                        let at = (next() as usize) % waiting.len();
                        let (ticket, value) = waiting.swap_remove(at);
                        assert!(p.resolve(ticket, value));
                    }
                    _ => {
                        while let Some((item, verdict)) = p.pop() {
                            if let Some(v) = verdict {
                                assert_eq!(v, item);
                            }
                            popped.push(item);
                        }
                    }
                }
            }
            assert_eq!(popped, (0..50).collect::<Vec<_>>());
        }
    }
}
