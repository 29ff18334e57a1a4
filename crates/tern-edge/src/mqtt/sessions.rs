//! Persistent MQTT sessions (`clean_session = 0`) of one node, and which connection is
//! live for each client identifier. No I/O, no clock: callers pass `now_ms`.
//!
//! When a persistent session's connection ends, its state is parked for
//! `connection_state_ttl_ms`: each subscription with its QoS and the channel cursor of
//! the last event the connection took, and the QoS 1 messages sent but not
//! acknowledged (plus any taken but not yet sent). A CONNECT with the same client
//! identifier (same app) and `clean_session = 0` takes it: subscriptions re-attach from
//! their cursors (the channel log gives exactly what was published meanwhile) and the
//! unacknowledged messages are sent again with DUP set and their packet ids. A CONNECT
//! with `clean_session = 1` discards it.
//!
//! A client identifier has at most one live connection: a new CONNECT supersedes the
//! live one (MQTT 3.1.1 §3.1.4), which parks its session before the new one takes it.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tern_core::Cursor;
use tokio::sync::Notify;

use super::session::Unacked;

/// A session: the app and the MQTT client identifier.
pub(crate) type SessionKey = (String, String);

/// One subscription of a parked session.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParkedSubscription {
    pub(crate) channel: Arc<str>,
    pub(crate) qos: QoS,
    /// After the last event the connection took from the channel.
    pub(crate) cursor: Cursor,
}

/// What of a persistent session outlives its connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Parked {
    pub(crate) subscriptions: Vec<ParkedSubscription>,
    /// QoS 1 messages sent and not acknowledged, by packet id, oldest first.
    pub(crate) unacked: Vec<(u16, Unacked)>,
    /// Messages taken from the channels but not yet sent (the QoS 1 window was full).
    pub(crate) unsent: Vec<(Arc<str>, QoS, Bytes)>,
}

struct Entry {
    parked: Parked,
    expires_ms: i64,
}

/// Parked sessions (at most `parked_max`, the soonest to expire goes first beyond it)
/// and the live connection of each client identifier.
pub(crate) struct Sessions {
    parked_max: usize,
    parked: HashMap<SessionKey, Entry>,
    /// Connection number and the handle that supersedes it.
    live: HashMap<SessionKey, (u64, Arc<Notify>)>,
}

impl Sessions {
    pub(crate) fn new(parked_max: usize) -> Sessions {
        Sessions {
            parked_max,
            parked: HashMap::new(),
            live: HashMap::new(),
        }
    }

    /// The live connection of `key` other than `number`, if any, to supersede.
    pub(crate) fn live_other(&self, key: &SessionKey, number: u64) -> Option<Arc<Notify>> {
        self.live
            .get(key)
            .filter(|(live, _)| *live != number)
            .map(|(_, notify)| notify.clone())
    }

    /// Makes connection `number` the live one of `key` and returns its parked session
    /// when it asks to resume (`clean = false`) and one has not expired; a clean
    /// connect discards it.
    pub(crate) fn connect(
        &mut self,
        key: &SessionKey,
        number: u64,
        supersede: Arc<Notify>,
        clean: bool,
        now_ms: i64,
    ) -> Option<Parked> {
        self.live.insert(key.clone(), (number, supersede));
        let entry = self.parked.remove(key)?;
        (!clean && entry.expires_ms > now_ms).then_some(entry.parked)
    }

    /// Connection `number` of `key` ended: it is no longer live, and its session is
    /// parked until `expires_ms` when it is persistent (`parked` is `Some`).
    pub(crate) fn disconnect(
        &mut self,
        key: &SessionKey,
        number: u64,
        parked: Option<Parked>,
        expires_ms: i64,
        now_ms: i64,
    ) {
        if self.live.get(key).is_some_and(|(live, _)| *live == number) {
            self.live.remove(key);
        }
        let Some(parked) = parked else {
            return;
        };
        self.parked.retain(|_, entry| entry.expires_ms > now_ms);
        while self.parked.len() >= self.parked_max.max(1) {
            let soonest = self
                .parked
                .iter()
                .min_by_key(|(_, entry)| entry.expires_ms)
                .map(|(key, _)| key.clone());
            match soonest {
                Some(soonest) => self.parked.remove(&soonest),
                None => break,
            };
        }
        self.parked
            .insert(key.clone(), Entry { parked, expires_ms });
    }

    /// Takes `key`'s parked session, if one has not expired, for another node.
    pub(crate) fn take(&mut self, key: &SessionKey, now_ms: i64) -> Option<Parked> {
        let entry = self.parked.remove(key)?;
        (entry.expires_ms > now_ms).then_some(entry.parked)
    }

    /// Whether connection `number` is still the live one of `key`.
    #[cfg(test)]
    fn is_live(&self, key: &SessionKey, number: u64) -> bool {
        self.live.get(key).is_some_and(|(live, _)| *live == number)
    }

    #[cfg(test)]
    fn parked_len(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        ("app".into(), id.into())
    }

    fn parked(channel: &str) -> Parked {
        Parked {
            subscriptions: vec![ParkedSubscription {
                channel: channel.into(),
                qos: QoS::AtLeastOnce,
                cursor: Cursor::new(),
            }],
            ..Default::default()
        }
    }

    /// A persistent session is taken back once by a resuming CONNECT before it expires;
    /// a clean CONNECT or expiry discards it.
    #[test]
    fn park_and_resume() {
        let mut sessions = Sessions::new(10);
        let notify = Arc::new(Notify::new());
        assert_eq!(
            sessions.connect(&key("a"), 1, notify.clone(), false, 0),
            None
        );
        sessions.disconnect(&key("a"), 1, Some(parked("x")), 100, 10);
        assert_eq!(
            sessions.connect(&key("a"), 2, notify.clone(), false, 50),
            Some(parked("x"))
        );
        sessions.disconnect(&key("a"), 2, Some(parked("y")), 100, 60);
        assert_eq!(
            sessions.connect(&("other".into(), "a".into()), 3, notify.clone(), false, 60),
            None,
            "another app's client with the same id"
        );
        assert_eq!(
            sessions.connect(&key("a"), 4, notify.clone(), true, 60),
            None
        );
        assert_eq!(
            sessions.connect(&key("a"), 5, notify.clone(), false, 60),
            None
        );
        sessions.disconnect(&key("a"), 5, Some(parked("z")), 100, 60);
        assert_eq!(
            sessions.connect(&key("a"), 6, notify, false, 100),
            None,
            "expired"
        );
    }

    /// A newer connection is the live one: the older one is offered for superseding,
    /// and its end does not unregister the newer.
    #[test]
    fn one_live_connection_per_client_id() {
        let mut sessions = Sessions::new(10);
        let notify = Arc::new(Notify::new());
        sessions.connect(&key("a"), 1, notify.clone(), true, 0);
        assert!(sessions.live_other(&key("a"), 1).is_none());
        assert!(sessions.live_other(&key("a"), 2).is_some());
        sessions.connect(&key("a"), 2, notify.clone(), true, 0);
        sessions.disconnect(&key("a"), 1, None, 0, 0);
        assert!(sessions.is_live(&key("a"), 2));
        sessions.disconnect(&key("a"), 2, None, 0, 0);
        assert!(!sessions.is_live(&key("a"), 2));
    }

    /// At most `parked_max` sessions are parked: the one expiring soonest goes first,
    /// and expired ones are dropped before anything live is.
    #[test]
    fn parked_sessions_are_bounded() {
        let mut sessions = Sessions::new(2);
        sessions.disconnect(&key("a"), 1, Some(parked("a")), 300, 0);
        sessions.disconnect(&key("b"), 2, Some(parked("b")), 200, 0);
        sessions.disconnect(&key("c"), 3, Some(parked("c")), 400, 0);
        assert_eq!(sessions.parked_len(), 2);
        let notify = Arc::new(Notify::new());
        assert_eq!(
            sessions.connect(&key("b"), 4, notify.clone(), false, 1),
            None
        );
        assert!(sessions.connect(&key("a"), 5, notify, false, 1).is_some());
    }
}
