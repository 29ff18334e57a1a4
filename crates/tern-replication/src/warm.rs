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

/// A home's answer to `Sync`, in send order: per origin its repair answer from 1 (its
/// first logged event ahead of the `Skip` over what its log lacks, see [`answer_sync`]),
/// the presence members, then the cursor (`Synced`).
pub struct SyncAnswer {
    pub repairs: Vec<(OriginId, Vec<RepairPart>)>,
    pub members: Vec<PresenceMessage>,
    pub cursor: Vec<(OriginId, u64)>,
}

/// The home's answer to `Sync` on `key`. Per origin whose log starts past its first
/// event, the first logged event goes *before* the `Skip` over the missing part: the
/// asker holds nothing of the channel yet, and `Hub::skip_remote` ignores a channel it
/// does not hold (a peer must not create channels with a bare `Skip`), so a leading
/// `Skip` was lost; the events after it then waited behind the hole until `Synced`,
/// which comes after the members are seeded, so a waiting ENTER of a seeded member
/// changed nothing, was not logged, and a node repairing from the asker later got a
/// `Skip` for it and never had the member (scaled simulation, seed 255 at 3 × 3 nodes,
/// 200 channels). The event first creates the channel (it waits, a gap: the asker asks
/// for the hole, harmlessly), the `Skip` then lands and applies it, logged.
pub fn answer_sync(hub: &Hub, key: &ChannelKey) -> SyncAnswer {
    let cursor: Vec<(OriginId, u64)> = hub.cursor(key).origins().collect();
    let repairs = cursor
        .iter()
        .map(|&(origin, have)| {
            let mut parts = repair::answer(hub, key, origin, 1, have);
            if matches!(parts.first(), Some(RepairPart::Skip(_))) && parts.len() > 1 {
                parts.swap(0, 1);
            }
            (origin, parts)
        })
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

    /// A home whose log of an origin starts past its first event (here: trimmed) answers
    /// with that origin's first logged event, then the `Skip`; a node that holds nothing
    /// of the channel takes the parts in that order and ends with every event applied,
    /// logged (so it can repair another node with them) and none waiting.
    #[test]
    fn sync_answer_puts_the_first_event_before_the_skip() {
        use tern_core::{CoreLimits, Publisher, RemoteEvent};
        let limits = CoreLimits::default();
        let home = Hub::new(OriginId(7), limits.clone());
        let key = ChannelKey::new("app", "room");
        let count = limits.log.events_max + 5;
        for i in 0..count {
            let publisher = Publisher {
                connection_id: None,
                frame_id: format!("f{i}"),
            };
            let message = tern_protocol::Message {
                name: Some(format!("m{i}")),
                ..Default::default()
            };
            home.publish(&key, &publisher, vec![message], 0).unwrap();
        }
        let answer = answer_sync(&home, &key);
        let (origin, parts) = &answer.repairs[0];
        assert_eq!(*origin, OriginId(7));
        assert!(matches!(parts[0], RepairPart::Event(_)), "{:?}", parts[0]);
        assert!(matches!(parts[1], RepairPart::Skip(5)), "{:?}", parts[1]);
        let asker = Hub::new(OriginId(8), limits);
        for part in parts {
            match part {
                RepairPart::Event(e) => {
                    asker
                        .apply_remote(&key, RemoteEvent::from_event(e), 0)
                        .unwrap();
                }
                RepairPart::Skip(upto) => {
                    asker.skip_remote(&key, *origin, *upto, 0);
                }
            }
        }
        assert_eq!(asker.pending_len(&key), 0);
        assert_eq!(asker.cursor(&key).get(OriginId(7)), count as u64);
        assert_eq!(asker.events_of(&key, OriginId(7), 6, 6).len(), 1);
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
