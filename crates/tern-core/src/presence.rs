//! Presence: the members of one channel and how changes to them merge.
//!
//! A member is keyed by `(clientId, connectionId)`. Entries are stored as PRESENT. Which
//! of two changes to a member is newer follows the Ably rule (RTP2b) that the SDKs apply
//! too, so server and clients agree: ids of the form `connectionId:msgSerial:index` from
//! the member's own connection compare by `(msgSerial, index)`; anything else compares by
//! timestamp.

use std::collections::{HashMap, VecDeque};

use tern_protocol::{presence_action, PresenceMessage};

/// Why a presence change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// The channel already holds its maximum number of members (Ably 91003).
    #[error("too many presence members (max {0})")]
    TooManyMembers(usize),
    /// The message lacks a clientId or connectionId (Ably 91000).
    #[error("presence message has no clientId")]
    NoClientId,
}

type MemberKey = (String, String);

/// LEAVEs remembered per channel (see [`PresenceSet`]); past it the oldest is forgotten.
const LEFT_MAX: usize = 1_024;

/// Members of one channel.
#[derive(Debug, Default)]
pub struct PresenceSet {
    members: HashMap<MemberKey, PresenceMessage>,
    /// The last LEAVE per member key (id, connectionId and timestamp only), so that a
    /// change older than it that arrives after it does not bring the member back. That
    /// happens across origins: a node catching up can get a survivor's LEAVE for a dead
    /// node's member before the member's ENTER, repaired from another peer's log.
    left: HashMap<MemberKey, PresenceMessage>,
    /// Keys of `left`, oldest first (bounded by `LEFT_MAX`).
    left_order: VecDeque<MemberKey>,
}

impl PresenceSet {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Applies one fully populated change (id, clientId, connectionId, timestamp set).
    /// Returns what to broadcast, or `None` when nothing changed (a stale change, a
    /// re-entry with the same id, a leave for a member that is not present).
    pub fn apply(
        &mut self,
        msg: PresenceMessage,
        members_max: usize,
    ) -> Result<Option<PresenceMessage>, PresenceError> {
        let (Some(client_id), Some(connection_id)) = (&msg.client_id, &msg.connection_id) else {
            return Err(PresenceError::NoClientId);
        };
        let key = (client_id.clone(), connection_id.clone());
        let existing = self.members.get(&key);
        if let Some(existing) = existing {
            if existing.id == msg.id && msg.action != presence_action::LEAVE {
                return Ok(None);
            }
        }
        if let Some(previous) = existing.or_else(|| self.left.get(&key)) {
            if !is_newer(&msg, previous) {
                return Ok(None);
            }
        }
        let existing = existing.is_some();
        match msg.action {
            presence_action::LEAVE => {
                self.remember_leave(key.clone(), &msg);
                Ok(self.members.remove(&key).map(|_| msg))
            }
            presence_action::ENTER | presence_action::UPDATE | presence_action::PRESENT => {
                if !existing && self.members.len() >= members_max {
                    return Err(PresenceError::TooManyMembers(members_max));
                }
                let mut broadcast = msg;
                if existing && broadcast.action == presence_action::ENTER {
                    broadcast.action = presence_action::UPDATE;
                }
                if !existing && broadcast.action != presence_action::ENTER {
                    broadcast.action = presence_action::ENTER;
                }
                let mut stored = broadcast.clone();
                stored.action = presence_action::PRESENT;
                self.members.insert(key, stored);
                Ok(Some(broadcast))
            }
            _ => Ok(None),
        }
    }

    /// Removes every member of `connection_id`, returning the LEAVEs to broadcast. Their
    /// ids are synthesized (not prefixed by the connection id) and their timestamps are
    /// later than the member's last change, so every client applies them.
    pub fn remove_connection(&mut self, connection_id: &str, now_ms: i64) -> Vec<PresenceMessage> {
        self.remove_where(|conn| conn == connection_id, now_ms)
    }

    /// Removes every member whose connection id matches, returning their LEAVEs.
    pub fn remove_where(
        &mut self,
        matches: impl Fn(&str) -> bool,
        now_ms: i64,
    ) -> Vec<PresenceMessage> {
        let mut keys: Vec<MemberKey> = self
            .members
            .keys()
            .filter(|(_, conn)| matches(conn))
            .cloned()
            .collect();
        keys.sort();
        let mut leaves = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(member) = self.members.remove(&key) else {
                continue;
            };
            let timestamp = now_ms.max(member.timestamp.unwrap_or(0) + 1);
            let connection_id = member.connection_id.clone().unwrap_or_default();
            let leave = PresenceMessage {
                id: Some(format!(
                    "leave-{connection_id}:{timestamp}:{}",
                    leaves.len()
                )),
                action: presence_action::LEAVE,
                timestamp: Some(timestamp),
                ..member
            };
            self.remember_leave(key, &leave);
            leaves.push(leave);
        }
        leaves
    }

    /// Keeps what ordering needs of a LEAVE, the oldest remembered one going past the bound.
    fn remember_leave(&mut self, key: MemberKey, leave: &PresenceMessage) {
        let kept = PresenceMessage {
            id: leave.id.clone(),
            action: presence_action::LEAVE,
            connection_id: leave.connection_id.clone(),
            timestamp: leave.timestamp,
            ..Default::default()
        };
        if self.left.insert(key.clone(), kept).is_none() {
            self.left_order.push_back(key);
            if self.left_order.len() > LEFT_MAX {
                if let Some(oldest) = self.left_order.pop_front() {
                    self.left.remove(&oldest);
                }
            }
        }
    }

    /// Current members (action PRESENT), in no particular order.
    pub fn members(&self) -> Vec<PresenceMessage> {
        self.members.values().cloned().collect()
    }

    /// Number of distinct connections with at least one member.
    pub fn connection_count(&self) -> usize {
        let mut conns: Vec<&str> = self.members.keys().map(|(_, c)| c.as_str()).collect();
        conns.sort_unstable();
        conns.dedup();
        conns.len()
    }
}

/// `(msgSerial, index)` of an id `connectionId:msgSerial:index` issued by `connection_id`.
fn serial_parts(id: &str, connection_id: &str) -> Option<(u64, u64)> {
    let rest = id.strip_prefix(connection_id)?.strip_prefix(':')?;
    let (serial, index) = rest.split_once(':')?;
    Some((serial.parse().ok()?, index.parse().ok()?))
}

/// RTP2b: is `candidate` newer than `existing`?
fn is_newer(candidate: &PresenceMessage, existing: &PresenceMessage) -> bool {
    let conn = candidate.connection_id.as_deref().unwrap_or_default();
    let parts = |m: &PresenceMessage| m.id.as_deref().and_then(|id| serial_parts(id, conn));
    match (parts(candidate), parts(existing)) {
        (Some(a), Some(b)) => a > b,
        _ => candidate.timestamp.unwrap_or(0) >= existing.timestamp.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(action: u8, client: &str, conn: &str, id: &str, ts: i64) -> PresenceMessage {
        PresenceMessage {
            id: Some(id.into()),
            action,
            client_id: Some(client.into()),
            connection_id: Some(conn.into()),
            timestamp: Some(ts),
            ..Default::default()
        }
    }

    /// Enter, update and leave produce ENTER, UPDATE and LEAVE broadcasts in turn.
    #[test]
    fn enter_update_leave() {
        let mut set = PresenceSet::default();
        let b = set
            .apply(change(2, "a", "c1", "c1:0:0", 1), 10)
            .unwrap()
            .unwrap();
        assert_eq!(b.action, presence_action::ENTER);
        let b = set
            .apply(change(4, "a", "c1", "c1:1:0", 2), 10)
            .unwrap()
            .unwrap();
        assert_eq!(b.action, presence_action::UPDATE);
        assert_eq!(set.members()[0].action, presence_action::PRESENT);
        let b = set
            .apply(change(3, "a", "c1", "c1:2:0", 3), 10)
            .unwrap()
            .unwrap();
        assert_eq!(b.action, presence_action::LEAVE);
        assert!(set.is_empty());
    }

    /// A re-entry carrying the original id (what ably-js sends after a non-resumed
    /// attach) changes nothing and broadcasts nothing; a stale change is ignored.
    #[test]
    fn reentry_and_stale_changes_are_ignored() {
        let mut set = PresenceSet::default();
        set.apply(change(2, "a", "c1", "c1:5:0", 1), 10).unwrap();
        assert_eq!(
            set.apply(change(2, "a", "c1", "c1:5:0", 9), 10).unwrap(),
            None
        );
        assert_eq!(
            set.apply(change(4, "a", "c1", "c1:4:0", 9), 10).unwrap(),
            None
        );
        assert_eq!(set.len(), 1);
    }

    /// The member bound holds, and leaving for a connection synthesizes later LEAVEs.
    #[test]
    fn bound_and_connection_removal() {
        let mut set = PresenceSet::default();
        set.apply(change(2, "a", "c1", "c1:0:0", 10), 2).unwrap();
        set.apply(change(2, "b", "c1", "c1:0:1", 10), 2).unwrap();
        assert_eq!(
            set.apply(change(2, "c", "c2", "c2:0:0", 10), 2),
            Err(PresenceError::TooManyMembers(2))
        );
        let leaves = set.remove_connection("c1", 5);
        assert_eq!(leaves.len(), 2);
        assert!(leaves.iter().all(|l| l.action == presence_action::LEAVE
            && l.timestamp == Some(11)
            && !l.id.as_deref().unwrap().starts_with("c1")));
        assert!(set.is_empty());
    }

    /// A LEAVE that arrives before the change it supersedes wins: a restarted node
    /// catching up gets a survivor's LEAVE for a dead node's member (live, from the
    /// survivor) before that member's older ENTER (repaired from a peer's log).
    #[test]
    fn a_leave_before_the_older_enter_wins() {
        let mut set = PresenceSet::default();
        let mut leave = change(3, "a", "dead-c1", "leave-dead-c1:10:0", 10);
        leave.data = None;
        assert_eq!(set.apply(leave, 10).unwrap(), None);
        assert_eq!(
            set.apply(change(2, "a", "dead-c1", "dead-c1:0:0", 5), 10)
                .unwrap(),
            None
        );
        assert!(set.is_empty());
        // A newer change from the connection itself still enters.
        set.apply(change(2, "a", "dead-c1", "dead-c1:1:0", 11), 10)
            .unwrap()
            .unwrap();
        assert_eq!(set.len(), 1);
    }
}
