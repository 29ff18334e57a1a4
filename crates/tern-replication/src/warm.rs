//! A node's first subscriber on a channel it does not receive waits for the channel's
//! state from its region's home (`Sync`): the log per origin (as repair answers), the
//! presence members, then `Synced` with the home's cursor. The request is asked again
//! each [`ASK_AGAIN_AFTER`] (an answer to a node the home did not know yet is dropped);
//! the attach goes ahead without it after [`WARM_TIMEOUT`].

use std::collections::HashMap;
use std::time::Duration;

use tern_core::{ChannelKey, Hub, OriginId};
use tern_protocol::PresenceMessage;

use crate::repair::{self, RepairPart};
use crate::Now;

/// How long a first attach waits for a channel's state from its home.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(3);
/// A request to another node not answered this long is sent again.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// Channels waiting for their state at once; past it an attach goes ahead at once.
pub const WARMING_MAX: usize = 10_000;
/// Presence members per `SyncMembers` frame, and their encoded bytes beyond which a
/// frame is cut early (a frame always carries at least one member).
pub const MEMBERS_PER_FRAME: usize = 256;
pub const MEMBERS_BYTES_PER_FRAME: usize = 4 << 20;

struct Warming<W> {
    since: Now,
    home: String,
    asked: Now,
    waiters: Vec<W>,
}

/// What [`Warm::start`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// A new wait: tell the region of the interest, then ask the home.
    Asked,
    /// Joined a wait already under way.
    Joined,
    /// Too many channels waiting: attach at once.
    Full,
}

/// Channels waiting for their state, each with the attaches (`W`) waiting on it.
pub struct Warm<W> {
    warming: HashMap<ChannelKey, Warming<W>>,
}

impl<W> Default for Warm<W> {
    fn default() -> Self {
        Warm {
            warming: HashMap::new(),
        }
    }
}

/// What a tick of [`Warm`] asks of the driver.
pub struct WarmTick<W> {
    /// Give up waiting: attach with what the node has (the waiters dropped).
    pub expired: Vec<(ChannelKey, Vec<W>)>,
    /// Ask the home (first) for the channel's state again (second).
    pub ask_again: Vec<(String, ChannelKey)>,
}

impl<W> Warm<W> {
    pub fn start(&mut self, key: &ChannelKey, home: &str, now: Now, waiter: W) -> Started {
        if let Some(w) = self.warming.get_mut(key) {
            w.waiters.push(waiter);
            return Started::Joined;
        }
        if self.warming.len() >= WARMING_MAX {
            return Started::Full;
        }
        self.warming.insert(
            key.clone(),
            Warming {
                since: now,
                home: home.to_string(),
                asked: now,
                waiters: vec![waiter],
            },
        );
        Started::Asked
    }

    pub fn contains(&self, key: &ChannelKey) -> bool {
        self.warming.contains_key(key)
    }

    /// The state arrived (`Synced`): the attaches to let go.
    pub fn done(&mut self, key: &ChannelKey) -> Vec<W> {
        self.warming
            .remove(key)
            .map(|w| w.waiters)
            .unwrap_or_default()
    }

    pub fn tick(&mut self, now: Now) -> WarmTick<W> {
        let mut expired = Vec::new();
        let mut ask_again = Vec::new();
        let keys: Vec<ChannelKey> = self.warming.keys().cloned().collect();
        for key in keys {
            let w = self.warming.get_mut(&key).expect("listed above");
            if now.saturating_sub(w.since) >= WARM_TIMEOUT {
                let w = self.warming.remove(&key).expect("listed above");
                expired.push((key, w.waiters));
            } else if now.saturating_sub(w.asked) >= ASK_AGAIN_AFTER {
                w.asked = now;
                ask_again.push((w.home.clone(), key));
            }
        }
        WarmTick { expired, ask_again }
    }

    pub fn len(&self) -> usize {
        self.warming.len()
    }

    pub fn is_empty(&self) -> bool {
        self.warming.is_empty()
    }
}

/// A home's answer to `Sync`, in send order: per origin its repair answer from 1, the
/// presence members, then the cursor (`Synced`).
pub struct SyncAnswer {
    pub repairs: Vec<(OriginId, Vec<RepairPart>)>,
    pub members: Vec<PresenceMessage>,
    pub cursor: Vec<(OriginId, u64)>,
}

pub fn answer_sync(hub: &Hub, key: &ChannelKey) -> SyncAnswer {
    let cursor: Vec<(OriginId, u64)> = hub.cursor(key).origins().collect();
    let repairs = cursor
        .iter()
        .map(|&(origin, have)| (origin, repair::answer(hub, key, origin, 1, have)))
        .collect();
    SyncAnswer {
        repairs,
        members: hub.members(key),
        cursor,
    }
}

/// Presence members cut into `SyncMembers` pages: at most [`MEMBERS_PER_FRAME`] members
/// and, past the first member of a page, [`MEMBERS_BYTES_PER_FRAME`] bytes each.
pub fn member_pages(members: Vec<PresenceMessage>) -> Vec<Vec<PresenceMessage>> {
    let mut pages: Vec<Vec<PresenceMessage>> = Vec::new();
    let mut bytes = 0;
    for member in members {
        // Measured: the member as the page will carry it.
        let size = tern_protocol::encode_value(tern_protocol::Format::Msgpack, &member).len();
        let full = pages.last().is_none_or(|page| {
            page.len() >= MEMBERS_PER_FRAME || bytes + size > MEMBERS_BYTES_PER_FRAME
        });
        if full {
            pages.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        pages.last_mut().expect("pushed above").push(member);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_asks_again_and_gives_up() {
        let key = ChannelKey::new("app", "room");
        let mut warm = Warm::default();
        let t0 = Now::from_secs(5);
        assert_eq!(warm.start(&key, "home", t0, 1), Started::Asked);
        assert_eq!(warm.start(&key, "home", t0, 2), Started::Joined);
        let tick = warm.tick(t0 + ASK_AGAIN_AFTER);
        assert_eq!(tick.ask_again, vec![("home".to_string(), key.clone())]);
        assert!(tick.expired.is_empty());
        let tick = warm.tick(t0 + WARM_TIMEOUT);
        assert_eq!(tick.expired.len(), 1);
        assert_eq!(tick.expired[0].1, vec![1, 2]);
        assert!(warm.is_empty());
        assert_eq!(warm.start(&key, "home", t0, 3), Started::Asked);
        assert_eq!(warm.done(&key), vec![3]);
        assert!(warm.done(&key).is_empty());
    }

    /// 256 members with 64 KB of data each go in several pages, none over the byte
    /// budget past its first member, and no member is lost or repeated.
    #[test]
    fn member_pages_cut_by_count_and_bytes() {
        let members: Vec<PresenceMessage> = (0..256)
            .map(|i| PresenceMessage {
                action: tern_protocol::presence_action::PRESENT,
                client_id: Some(format!("c{i}")),
                connection_id: Some(format!("conn-{i}")),
                data: Some(tern_protocol::Data::String("d".repeat(64_000))),
                ..Default::default()
            })
            .collect();
        let pages = member_pages(members.clone());
        assert!(pages.len() > 1);
        assert_eq!(pages.concat(), members);
        let small = vec![PresenceMessage::default(); 600];
        let sizes: Vec<usize> = member_pages(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
