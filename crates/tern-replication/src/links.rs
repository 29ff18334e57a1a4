//! Reliable links. Each outbound link numbers the events it carries (`link_seq` 1, 2,
//! ...); the receiver answers `Stored{upto}` once every position up to `upto` is
//! applied and committed to its store; the sender keeps what is unacknowledged (bounded,
//! [`PEER_BUFFER_MAX`]) and resends it (go-back-N) after a reconnect or a stall. An
//! event dropped from a full buffer is left to channel gap repair, and that peer no
//! longer counts as a replica of it.

use std::collections::VecDeque;
use std::time::Duration;

use crate::Now;

/// Unacknowledged events kept per peer for resending.
pub const PEER_BUFFER_MAX: usize = 65_536;
/// Control frames (acks, repair requests and answers) queued per peer.
pub const CONTROL_QUEUE_MAX: usize = 65_536;
/// Resend unacknowledged events when no ack has advanced for this long (the driver adds
/// twice an emulated delay).
pub const RESEND_AFTER: Duration = Duration::from_millis(1_000);

/// The sender's side of one link to a peer: positions handed out and acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutLink {
    /// Which link this is (unique per peer arrival; sent in `Hello` so the receiver
    /// counts afresh).
    pub epoch: u64,
    /// The last position handed out.
    pub seq: u64,
    /// Events at or below this position are no longer held for this peer.
    pub counts_after: u64,
    /// The peer stored everything up to here.
    pub acked: u64,
}

/// What a `Stored` frame did.
#[derive(Debug, PartialEq, Eq)]
pub enum StoredOutcome {
    /// Another link's, or nothing new.
    Stale,
    /// Positions never handed out: ignored (believing it would count the peer as a
    /// replica of events it has not seen).
    Unsent,
    /// Acked up to here now.
    Advanced(u64),
}

impl OutLink {
    pub fn new(epoch: u64) -> OutLink {
        OutLink {
            epoch,
            ..OutLink::default()
        }
    }

    /// Hands out the next position.
    pub fn hand_out(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn on_stored(&mut self, epoch: u64, upto: u64) -> StoredOutcome {
        if epoch != self.epoch || upto <= self.acked {
            return StoredOutcome::Stale;
        }
        if upto > self.seq {
            return StoredOutcome::Unsent;
        }
        self.acked = upto;
        StoredOutcome::Advanced(upto)
    }
}

/// Whether events sent on links are settled: for each `(epoch, position)` in `sent`
/// (the latest event of a channel on each link that carried it), the link is gone (a
/// new epoch: its buffer went with it), its peer acknowledged the position, or the link
/// no longer holds it (its buffer overflowed). `link` finds the current link of an
/// epoch. A channel whose events are not settled keeps its log in memory: a repair of
/// them is answered from it (`Journal::may_drop`).
pub fn settled(sent: &[(u64, u64)], link: impl Fn(u64) -> Option<OutLink>) -> bool {
    sent.iter().all(|&(epoch, position)| {
        link(epoch).is_none_or(|l| l.acked >= position || l.counts_after >= position)
    })
}

/// Unacknowledged events of one link, consecutive positions, bounded.
pub struct SendBuffer<F> {
    events: VecDeque<(u64, F, Now)>,
    acked: u64,
}

impl<F> Default for SendBuffer<F> {
    fn default() -> Self {
        SendBuffer {
            events: VecDeque::new(),
            acked: 0,
        }
    }
}

impl<F> SendBuffer<F> {
    /// Keeps `frame` at position `seq`; returns the position dropped to stay within
    /// [`PEER_BUFFER_MAX`], if any.
    pub fn push(&mut self, seq: u64, frame: F, now: Now) -> Option<u64> {
        self.events.push_back((seq, frame, now));
        if self.events.len() > PEER_BUFFER_MAX {
            return self.events.pop_front().map(|(seq, _, _)| seq);
        }
        None
    }

    /// Forgets everything up to `upto` (acknowledged); returns when the newest of them
    /// was queued (the replication lag of this ack), if any was held.
    pub fn ack(&mut self, upto: u64) -> Option<Now> {
        let mut newest = None;
        while self.events.front().is_some_and(|(seq, _, _)| *seq <= upto) {
            newest = self.events.pop_front().map(|(_, _, queued)| queued);
        }
        self.acked = self.acked.max(upto);
        newest
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The lowest position still held (what a `Hello` resends from).
    pub fn first(&self) -> u64 {
        self.events
            .front()
            .map_or(self.acked + 1, |(seq, _, _)| *seq)
    }

    /// Where a sender that has written up to `sent_upto` stands: past what was acked and
    /// past what was dropped before it was sent.
    pub fn sent_floor(&self, sent_upto: u64) -> u64 {
        sent_upto.max(self.acked).max(self.first() - 1)
    }

    /// The event after `sent_upto` (position, frame, when queued), if held.
    pub fn after(&self, sent_upto: u64) -> Option<&(u64, F, Now)> {
        let first = self.events.front()?.0;
        self.events
            .get((sent_upto + 1).checked_sub(first)? as usize)
    }
}

/// The receiver's side of one sender's link: what is applied in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InLink {
    pub incarnation: u64,
    pub epoch: u64,
    /// Every position up to here is applied.
    pub contiguous: u64,
    /// The store's lost-write count when this link began: once a write is lost after
    /// it, nothing more of this link is acknowledged.
    pub store_mark: u64,
}

impl InLink {
    /// A `Hello`: the same link carries on; a new one starts afresh. Positions below
    /// `first` are gone from the sender's buffer (left to gap repair).
    pub fn hello(
        state: Option<InLink>,
        incarnation: u64,
        epoch: u64,
        first: u64,
        store_mark: u64,
    ) -> InLink {
        let mut state = match state {
            Some(s) if s.incarnation == incarnation && s.epoch == epoch => s,
            _ => InLink {
                incarnation,
                epoch,
                contiguous: 0,
                store_mark,
            },
        };
        state.contiguous = state.contiguous.max(first.saturating_sub(1));
        state
    }

    /// Position `link_seq` is applied: returns the new contiguous prefix if it grew.
    pub fn applied(&mut self, incarnation: u64, link_seq: u64) -> Option<u64> {
        if self.incarnation == incarnation && link_seq == self.contiguous + 1 {
            self.contiguous = link_seq;
            return Some(link_seq);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_events_are_settled_once_acked_released_or_their_link_is_gone() {
        let link = |acked, counts_after| OutLink {
            epoch: 7,
            seq: 10,
            counts_after,
            acked,
        };
        let on = |l: OutLink| move |epoch: u64| (epoch == 7).then_some(l);
        assert!(settled(&[], on(link(0, 0))));
        assert!(!settled(&[(7, 5)], on(link(4, 0))), "unacknowledged");
        assert!(settled(&[(7, 5)], on(link(5, 0))), "acknowledged");
        assert!(settled(&[(7, 5)], on(link(0, 5))), "no longer held");
        assert!(settled(&[(6, 5)], on(link(0, 0))), "that link is gone");
        assert!(!settled(&[(6, 5), (7, 9)], on(link(8, 0))), "every link");
    }

    #[test]
    fn stored_acks_only_what_was_sent_on_this_link() {
        let mut link = OutLink::new(7);
        assert_eq!(link.hand_out(), 1);
        assert_eq!(link.hand_out(), 2);
        assert_eq!(link.on_stored(6, 2), StoredOutcome::Stale);
        assert_eq!(link.on_stored(7, 3), StoredOutcome::Unsent);
        assert_eq!(link.on_stored(7, 1), StoredOutcome::Advanced(1));
        assert_eq!(link.on_stored(7, 1), StoredOutcome::Stale);
        assert_eq!(link.acked, 1);
    }

    #[test]
    fn buffer_is_bounded_resends_from_first_and_skips_dropped() {
        let mut buf = SendBuffer::default();
        for seq in 1..=PEER_BUFFER_MAX as u64 {
            assert_eq!(buf.push(seq, seq, Now::ZERO), None);
        }
        assert_eq!(buf.push(PEER_BUFFER_MAX as u64 + 1, 0, Now::ZERO), Some(1));
        assert_eq!(buf.len(), PEER_BUFFER_MAX);
        assert_eq!(buf.first(), 2);
        // A sender that wrote nothing yet starts after what was dropped.
        assert_eq!(buf.sent_floor(0), 1);
        assert_eq!(buf.after(1).map(|e| e.0), Some(2));
        assert_eq!(buf.ack(10), Some(Now::ZERO));
        assert_eq!(buf.ack(10), None);
        assert_eq!(buf.first(), 11);
        assert_eq!(buf.after(5).map(|e| e.0), None);
        assert_eq!(buf.after(10).map(|e| e.0), Some(11));
        buf.ack(PEER_BUFFER_MAX as u64 + 1);
        assert!(buf.is_empty());
        assert_eq!(buf.first(), PEER_BUFFER_MAX as u64 + 2);
    }

    #[test]
    fn receiver_counts_in_a_row_and_restarts_on_a_new_link() {
        let mut link = InLink::hello(None, 1, 1, 1, 0);
        assert_eq!(link.applied(1, 2), None);
        assert_eq!(link.applied(1, 1), Some(1));
        assert_eq!(link.applied(1, 2), Some(2));
        // The same link again (reconnect): carries on, and skips what the sender dropped.
        let link = InLink::hello(Some(link), 1, 1, 5, 9);
        assert_eq!((link.contiguous, link.store_mark), (4, 0));
        // A new epoch starts afresh with the store mark of now.
        let link = InLink::hello(Some(link), 1, 2, 1, 9);
        assert_eq!((link.contiguous, link.store_mark), (0, 9));
    }
}
