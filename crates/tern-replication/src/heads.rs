//! `Heads` anti-entropy: nodes send each other their channel cursors; a node that keeps
//! a channel asks the sender for what it lacks that no link will bring any more: a dead
//! origin's events, and those of the sender's own that the sender already had a round
//! ago (published before it knew us). A live origin's events come on its own link.

use std::collections::HashMap;
use std::time::Duration;

use tern_core::{ChannelKey, Cursor, OriginId};

/// How often a node sends its channel cursors.
pub const HEADS_EVERY: Duration = Duration::from_secs(1);
/// Channels per anti-entropy round, and per `Heads` frame.
pub const HEADS_CHANNELS_MAX: usize = 20_000;
pub const HEADS_PER_FRAME: usize = 256;

/// Per sender link: the sender's own sequence per channel in its previous `Heads`.
/// Bounded by [`HEADS_CHANNELS_MAX`] (cleared past it: costs one round of waiting).
#[derive(Default)]
pub struct PreviousHeads {
    seen: HashMap<ChannelKey, u64>,
}

impl PreviousHeads {
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
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
        let upto = if origin == asker.sender {
            // Its own events come on this link, resent until acked; what it already had
            // a round ago and we still lack was never sent to us.
            let before = previous.seen.insert(key.clone(), seq);
            if previous.seen.len() > HEADS_CHANNELS_MAX {
                previous.seen.clear();
            }
            before.unwrap_or(0).min(seq)
        } else if origin == asker.own || (asker.live)(origin) {
            0
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
        // Ours and a live origin's: never; the dead one's: what we lack; the sender's:
        // not yet (it may be on its way).
        assert_eq!(
            wanted(&asker, &mut previous, &key, &mine, &heads),
            vec![(3, 3, 6)]
        );
        // A round later the sender's own up to what it had then.
        let heads = [(2, 7)];
        assert_eq!(
            wanted(&asker, &mut previous, &key, &mine, &heads),
            vec![(2, 1, 5)]
        );
        assert_eq!(previous.len(), 1);
    }
}
