//! Connection registry: which connections exist, and the state of those whose transport
//! dropped, kept for `connectionStateTtl` so the client can resume with the same
//! connectionId. Generic over the parked state `S` (the edge's per-connection state) and
//! the live handle `L` (how the edge tells a live session it has been superseded).
//!
//! A connection key is `<connectionId>!<secret>`; the secret rotates on every resume.
//! A key stays good until its successor has been used: the CONNECTED that carries a new
//! key can be lost with the transport that carried it, and the client must then be able
//! to resume again with the key it still holds (see [`Secrets`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Why a resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError<L> {
    /// No such connection, or the secret does not match (Ably 80008).
    #[error("connection not found")]
    Unknown,
    /// The connection's state outlived `connectionStateTtl` (Ably 80008 / 80006).
    #[error("connection state expired")]
    Expired,
    /// The connection is still live on another transport; supersede it and retry.
    #[error("connection still live")]
    Live(L),
}

/// The secrets a resume of one connection may present: the one issued last, and the one
/// the client presented to get it. Until the client presents the newer one it may never
/// have received it (the transport was cut before it read its CONNECTED), so the older
/// stays good; once the newer is presented, the older is spent.
#[derive(Debug, Clone)]
struct Secrets {
    issued: String,
    presented: Option<String>,
}

impl Secrets {
    fn accepts(&self, secret: &str) -> bool {
        self.issued == secret || self.presented.as_deref() == Some(secret)
    }
}

enum Entry<S, L> {
    Live {
        secrets: Secrets,
        generation: u64,
        handle: L,
    },
    Parked {
        secrets: Secrets,
        state: S,
        deadline_ms: i64,
    },
}

/// Live and parked connections of this node.
pub struct ConnectionRegistry<S, L> {
    entries: HashMap<Arc<str>, Entry<S, L>>,
    deadlines: BTreeMap<(i64, Arc<str>), ()>,
    next_generation: u64,
    parked_max: usize,
}

/// Splits `<connectionId>!<secret>`.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('!')
        .filter(|(id, secret)| !id.is_empty() && !secret.is_empty())
}

impl<S, L: Clone> ConnectionRegistry<S, L> {
    pub fn new(parked_max: usize) -> Self {
        ConnectionRegistry {
            entries: HashMap::new(),
            deadlines: BTreeMap::new(),
            next_generation: 1,
            parked_max,
        }
    }

    /// Records a live connection with the newly issued `secret`; `resumed_with` is the
    /// secret of the key a resume presented (it stays good until `secret` is used).
    /// Returns its generation, which `park` and `remove` must present (a superseded
    /// session can then no longer touch the entry).
    pub fn register(
        &mut self,
        id: Arc<str>,
        secret: String,
        resumed_with: Option<String>,
        handle: L,
    ) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(Entry::Parked { deadline_ms, .. }) = self.entries.get(&id) {
            self.deadlines.remove(&(*deadline_ms, id.clone()));
        }
        self.entries.insert(
            id,
            Entry::Live {
                secrets: Secrets {
                    issued: secret,
                    presented: resumed_with,
                },
                generation,
                handle,
            },
        );
        generation
    }

    /// The transport of a live connection dropped: keep its state until `deadline_ms`.
    /// Returns `false` (and drops `state`) if the entry is no longer this generation's.
    pub fn park(&mut self, id: &Arc<str>, generation: u64, state: S, deadline_ms: i64) -> bool {
        let secrets = match self.entries.get(id) {
            Some(Entry::Live {
                secrets,
                generation: g,
                ..
            }) if *g == generation => secrets.clone(),
            _ => return false,
        };
        self.entries.insert(
            id.clone(),
            Entry::Parked {
                secrets,
                state,
                deadline_ms,
            },
        );
        self.deadlines.insert((deadline_ms, id.clone()), ());
        while self.deadlines.len() > self.parked_max {
            if let Some(((_, oldest), ())) = self.deadlines.pop_first() {
                self.entries.remove(&oldest);
            }
        }
        true
    }

    /// The connection closed for good (CLOSE, fatal error).
    pub fn remove(&mut self, id: &Arc<str>, generation: u64) {
        if matches!(self.entries.get(id), Some(Entry::Live { generation: g, .. }) if *g == generation)
        {
            self.entries.remove(id);
        }
    }

    /// Takes a parked connection's state for a resume with `key`.
    /// The id of the live or parked connection whose key `key` is (id and secret both
    /// match), without taking it: a REST publish "on behalf of" that connection (TM2h).
    pub fn connection_id(&self, key: &str) -> Option<Arc<str>> {
        let (id, secret) = split_key(key)?;
        let (id, entry) = self.entries.get_key_value(id)?;
        let secrets = match entry {
            Entry::Live { secrets, .. } | Entry::Parked { secrets, .. } => secrets,
        };
        let matches = secrets.accepts(secret);
        matches.then(|| id.clone())
    }

    pub fn resume(&mut self, key: &str, now_ms: i64) -> Result<(Arc<str>, S), ResumeError<L>> {
        let (id, secret) = split_key(key).ok_or(ResumeError::Unknown)?;
        let (id, entry) = self.entries.remove_entry(id).ok_or(ResumeError::Unknown)?;
        match entry {
            Entry::Live {
                secrets,
                handle,
                generation,
            } => {
                let result = if secrets.accepts(secret) {
                    ResumeError::Live(handle.clone())
                } else {
                    ResumeError::Unknown
                };
                self.entries.insert(
                    id,
                    Entry::Live {
                        secrets,
                        generation,
                        handle,
                    },
                );
                Err(result)
            }
            Entry::Parked {
                secrets,
                state,
                deadline_ms,
            } => {
                if !secrets.accepts(secret) {
                    self.entries.insert(
                        id,
                        Entry::Parked {
                            secrets,
                            state,
                            deadline_ms,
                        },
                    );
                    return Err(ResumeError::Unknown);
                }
                self.deadlines.remove(&(deadline_ms, id.clone()));
                if deadline_ms <= now_ms {
                    return Err(ResumeError::Expired);
                }
                Ok((id, state))
            }
        }
    }

    /// Drops parked connections past their deadline. Returns how many.
    pub fn sweep(&mut self, now_ms: i64) -> usize {
        let mut dropped = 0;
        while let Some(((deadline, _), ())) = self.deadlines.first_key_value() {
            if *deadline > now_ms {
                break;
            }
            let ((_, id), ()) = self.deadlines.pop_first().expect("checked non-empty");
            self.entries.remove(&id);
            dropped += 1;
        }
        dropped
    }

    pub fn parked_count(&self) -> usize {
        self.deadlines.len()
    }

    pub fn live_count(&self) -> usize {
        self.entries.len() - self.deadlines.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Registry = ConnectionRegistry<&'static str, u8>;

    /// A parked connection resumes once with its key, within its deadline only.
    #[test]
    fn park_and_resume() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let generation = reg.register(id.clone(), "s1".into(), None, 7);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Live(7)));
        assert!(reg.park(&id, generation, "state", 100));
        assert_eq!(reg.resume("c1!wrong", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s1", 50), Ok((id.clone(), "state")));
        assert_eq!(reg.resume("c1!s1", 50), Err(ResumeError::Unknown));
        let generation = reg.register(id.clone(), "s2".into(), Some("s1".into()), 8);
        assert!(reg.park(&id, generation, "again", 100));
        assert_eq!(reg.resume("c1!s2", 100), Err(ResumeError::Expired));
    }

    /// A key names its connection (live or parked) only with the right secret, and
    /// looking it up takes nothing.
    #[test]
    fn connection_id_by_key() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let generation = reg.register(id.clone(), "s1".into(), None, 7);
        assert_eq!(reg.connection_id("c1!s1"), Some(id.clone()));
        assert_eq!(reg.connection_id("c1!s2"), None);
        assert_eq!(reg.connection_id("c1!s"), None);
        assert_eq!(reg.connection_id("c2!s1"), None);
        assert_eq!(reg.connection_id("c1"), None);
        assert!(reg.park(&id, generation, "state", 100));
        assert_eq!(reg.connection_id("c1!s1"), Some(id.clone()));
        assert_eq!(reg.resume("c1!s1", 50), Ok((id, "state")));
    }

    /// A superseded session cannot park over the session that replaced it.
    #[test]
    fn stale_generation_cannot_park() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let old = reg.register(id.clone(), "s1".into(), None, 1);
        let new = reg.register(id.clone(), "s2".into(), None, 2);
        assert!(!reg.park(&id, old, "old", 100));
        assert!(reg.park(&id, new, "new", 100));
        assert_eq!(reg.resume("c1!s2", 0), Ok((id, "new")));
    }

    /// A key stays good until its successor is used: a client whose CONNECTED (with the
    /// new key) was lost resumes again with the key it holds, live or parked; once it
    /// presents the newer key, the older is spent.
    #[test]
    fn key_is_good_until_its_successor_is_used() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let g = reg.register(id.clone(), "s1".into(), None, 1);
        assert!(reg.park(&id, g, "a", 100));
        assert_eq!(reg.resume("c1!s1", 0), Ok((id.clone(), "a")));
        // s2 is issued, but its CONNECTED is lost: s1 still resumes, parked or live.
        let g = reg.register(id.clone(), "s2".into(), Some("s1".into()), 2);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Live(2)));
        assert!(reg.park(&id, g, "b", 100));
        assert_eq!(reg.resume("c1!s1", 0), Ok((id.clone(), "b")));
        // s3 is issued and this time used: s1 (and s2, never seen) are spent.
        let g = reg.register(id.clone(), "s3".into(), Some("s1".into()), 3);
        assert!(reg.park(&id, g, "c", 100));
        assert_eq!(reg.resume("c1!s2", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s3", 0), Ok((id.clone(), "c")));
        let g = reg.register(id.clone(), "s4".into(), Some("s3".into()), 4);
        assert!(reg.park(&id, g, "d", 100));
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s3", 0), Ok((id, "d")));
    }

    /// The parked bound evicts the connection closest to expiry; sweep drops expired.
    #[test]
    fn bounds_and_sweep() {
        let mut reg = Registry::new(2);
        for (i, deadline) in [30, 10, 20].into_iter().enumerate() {
            let id: Arc<str> = format!("c{i}").into();
            let g = reg.register(id.clone(), "s".into(), None, 0);
            reg.park(&id, g, "x", deadline);
        }
        assert_eq!(reg.parked_count(), 2);
        assert_eq!(reg.resume("c1!s", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.sweep(20), 1);
        assert_eq!(reg.parked_count(), 1);
    }
}
