//! Connection registry: which connections exist, and the state of those whose transport
//! dropped, kept for `connectionStateTtl` so the client can resume with the same
//! connectionId. Generic over the parked state `S` (the edge's per-connection state) and
//! the live handle `L` (how the edge tells a live session it has been superseded).
//!
//! A connection key is `<connectionId>!<secret>`; the secret rotates on every resume,
//! so a key is good for one resume.

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

enum Entry<S, L> {
    Live {
        secret: String,
        generation: u64,
        handle: L,
    },
    Parked {
        secret: String,
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

    /// Records a live connection. Returns its generation, which `park` and `remove`
    /// must present (a superseded session can then no longer touch the entry).
    pub fn register(&mut self, id: Arc<str>, secret: String, handle: L) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(Entry::Parked { deadline_ms, .. }) = self.entries.get(&id) {
            self.deadlines.remove(&(*deadline_ms, id.clone()));
        }
        self.entries.insert(
            id,
            Entry::Live {
                secret,
                generation,
                handle,
            },
        );
        generation
    }

    /// The transport of a live connection dropped: keep its state until `deadline_ms`.
    /// Returns `false` (and drops `state`) if the entry is no longer this generation's.
    pub fn park(&mut self, id: &Arc<str>, generation: u64, state: S, deadline_ms: i64) -> bool {
        let secret = match self.entries.get(id) {
            Some(Entry::Live {
                secret,
                generation: g,
                ..
            }) if *g == generation => secret.clone(),
            _ => return false,
        };
        self.entries.insert(
            id.clone(),
            Entry::Parked {
                secret,
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
        let own = match entry {
            Entry::Live { secret, .. } | Entry::Parked { secret, .. } => secret,
        };
        let matches = own.len() == secret.len()
            && own
                .bytes()
                .zip(secret.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        matches.then(|| id.clone())
    }

    pub fn resume(&mut self, key: &str, now_ms: i64) -> Result<(Arc<str>, S), ResumeError<L>> {
        let (id, secret) = split_key(key).ok_or(ResumeError::Unknown)?;
        let (id, entry) = self.entries.remove_entry(id).ok_or(ResumeError::Unknown)?;
        match entry {
            Entry::Live {
                secret: own,
                handle,
                generation,
            } => {
                let result = if own == secret {
                    ResumeError::Live(handle.clone())
                } else {
                    ResumeError::Unknown
                };
                self.entries.insert(
                    id,
                    Entry::Live {
                        secret: own,
                        generation,
                        handle,
                    },
                );
                Err(result)
            }
            Entry::Parked {
                secret: own,
                state,
                deadline_ms,
            } => {
                if own != secret {
                    self.entries.insert(
                        id,
                        Entry::Parked {
                            secret: own,
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
        let generation = reg.register(id.clone(), "s1".into(), 7);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Live(7)));
        assert!(reg.park(&id, generation, "state", 100));
        assert_eq!(reg.resume("c1!wrong", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s1", 50), Ok((id.clone(), "state")));
        assert_eq!(reg.resume("c1!s1", 50), Err(ResumeError::Unknown));
        let generation = reg.register(id.clone(), "s2".into(), 8);
        assert!(reg.park(&id, generation, "again", 100));
        assert_eq!(reg.resume("c1!s2", 100), Err(ResumeError::Expired));
    }

    /// A key names its connection (live or parked) only with the right secret, and
    /// looking it up takes nothing.
    #[test]
    fn connection_id_by_key() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let generation = reg.register(id.clone(), "s1".into(), 7);
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
        let old = reg.register(id.clone(), "s1".into(), 1);
        let new = reg.register(id.clone(), "s2".into(), 2);
        assert!(!reg.park(&id, old, "old", 100));
        assert!(reg.park(&id, new, "new", 100));
        assert_eq!(reg.resume("c1!s2", 0), Ok((id, "new")));
    }

    /// The parked bound evicts the connection closest to expiry; sweep drops expired.
    #[test]
    fn bounds_and_sweep() {
        let mut reg = Registry::new(2);
        for (i, deadline) in [30, 10, 20].into_iter().enumerate() {
            let id: Arc<str> = format!("c{i}").into();
            let g = reg.register(id.clone(), "s".into(), 0);
            reg.park(&id, g, "x", deadline);
        }
        assert_eq!(reg.parked_count(), 2);
        assert_eq!(reg.resume("c1!s", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.sweep(20), 1);
        assert_eq!(reg.parked_count(), 1);
    }
}
