//! Presence: the members of one channel and how changes to them merge.
//!
//! A member is keyed by `(clientId, connectionId)`. Entries are stored as PRESENT. Which
//! of two changes to a member is newer follows the Ably rule (RTP2b) that the SDKs apply
//! too, so server and clients agree: ids of the form `connectionId:msgSerial:index` from
//! the member's own connection compare by `(msgSerial, index)`; anything else compares by
//! timestamp.

use std::collections::HashMap;

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

/// Members of one channel.
#[derive(Debug, Default)]
pub struct PresenceSet {
    members: HashMap<MemberKey, PresenceMessage>,
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
            if !is_newer(&msg, existing) {
                return Ok(None);
            }
        }
        match msg.action {
            presence_action::LEAVE => Ok(self.members.remove(&key).map(|_| msg)),
            presence_action::ENTER | presence_action::UPDATE | presence_action::PRESENT => {
                if existing.is_none() && self.members.len() >= members_max {
                    return Err(PresenceError::TooManyMembers(members_max));
                }
                let mut broadcast = msg;
                if existing.is_some() && broadcast.action == presence_action::ENTER {
                    broadcast.action = presence_action::UPDATE;
                }
                if existing.is_none() && broadcast.action != presence_action::ENTER {
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
        keys.into_iter()
            .filter_map(|key| self.members.remove(&key))
            .enumerate()
            .map(|(index, member)| {
                let timestamp = now_ms.max(member.timestamp.unwrap_or(0) + 1);
                let connection_id = member.connection_id.clone().unwrap_or_default();
                PresenceMessage {
                    id: Some(format!("leave-{connection_id}:{timestamp}:{index}")),
                    action: presence_action::LEAVE,
                    timestamp: Some(timestamp),
                    ..member
                }
            })
            .collect()
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
}
