//! Connection registry: which connections exist, and the state of those whose transport
//! dropped, kept for `connectionStateTtl` so the client can resume with the same
//! connectionId. Generic over the parked state `S` (the edge's per-connection state) and
//! the live handle `L` (how the edge tells a live session it has been superseded).
//!
//! A connection key is `<connectionId>!<secret>`; the secret rotates on every resume.
//! Which keys a resume may present is a [`KeyChain`]: the CONNECTED that carries a new
//! key can be lost with its transport, so a key is spent only once the client has shown
//! (by presenting it) that it holds a newer one.

use std::collections::{BTreeMap, HashMap, VecDeque};
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

/// Keys issued since the last one a resume presented that stay good. Each is one resume
/// whose outcome the client may not know; past this many, the oldest is forgotten (the
/// presented key itself always stays good).
const ISSUED_KEPT_MAX: usize = 8;

/// The secrets of a connection's keys that a resume may present. The client holds the
/// last key it received, but a CONNECTED (which carries a new key) can be lost with its
/// transport, so the server cannot know which that is. Each resume shows one key the
/// client holds: keys issued before it are spent; it and every key issued after it stay
/// good. So a client whose resume's CONNECTED never arrived resumes again with the key
/// it still has, and a key cannot be used once the client has used a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChain {
    /// The secret the last resume presented (none before the first resume).
    presented: Option<String>,
    /// Secrets issued since, oldest first, at most `ISSUED_KEPT_MAX`.
    issued: VecDeque<String>,
}

impl KeyChain {
    /// A new connection's first key.
    pub fn new(secret: String) -> Self {
        KeyChain {
            presented: None,
            issued: VecDeque::from([secret]),
        }
    }

    /// Issues `secret` after a resume (which took this chain from the registry).
    pub fn issue(mut self, secret: String) -> Self {
        self.issued.push_back(secret);
        while self.issued.len() > ISSUED_KEPT_MAX {
            self.issued.pop_front();
        }
        self
    }

    fn accepts(&self, secret: &str) -> bool {
        self.presented.as_deref() == Some(secret) || self.issued.iter().any(|s| s == secret)
    }

    /// A resume presented `secret` (accepted): every key issued before it is spent.
    fn presented(&mut self, secret: &str) {
        if self.presented.as_deref() == Some(secret) {
            return;
        }
        if let Some(at) = self.issued.iter().position(|s| s == secret) {
            self.issued.drain(..=at);
            self.presented = Some(secret.to_string());
        }
    }
}

/// A connection as [`ConnectionRegistry::lookup`] sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a, S, L> {
    /// A transport holds it now.
    Live(&'a L),
    /// Its transport dropped; a resume may take `state` until `deadline_ms`.
    Parked { state: &'a S, deadline_ms: i64 },
    /// Its client resumed it on another node, as connection `to` of app `app`.
    Moved {
        to: &'a Arc<str>,
        app: &'a Arc<str>,
        deadline_ms: i64,
    },
}

enum Entry<S, L> {
    Live {
        keys: KeyChain,
        generation: u64,
        handle: L,
    },
    Parked {
        keys: KeyChain,
        state: S,
        deadline_ms: i64,
    },
    /// Taken over by a resume on another node (see [`ConnectionRegistry::moved`]):
    /// remembered until `deadline_ms` so requests for the old id find the new one.
    Moved {
        to: Arc<str>,
        app: Arc<str>,
        deadline_ms: i64,
    },
}

/// Live and parked connections of this node.
pub struct ConnectionRegistry<S, L> {
    entries: HashMap<Arc<str>, Entry<S, L>>,
    deadlines: BTreeMap<(i64, Arc<str>), ()>,
    next_generation: u64,
    parked_max: usize,
    /// Parked connections pushed out by `parked_max` since the last sweep, handed out
    /// by the next [`ConnectionRegistry::sweep`] (at most `parked_max`).
    evicted: Vec<(Arc<str>, S)>,
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
            evicted: Vec::new(),
        }
    }

    /// Records a live connection whose keys are `keys` (a new connection's
    /// `KeyChain::new`, or after a resume the chain `resume` returned with the new secret
    /// issued). Returns its generation, which `park` and `remove` must present (a
    /// superseded session can then no longer touch the entry).
    pub fn register(&mut self, id: Arc<str>, keys: KeyChain, handle: L) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(Entry::Parked { deadline_ms, .. } | Entry::Moved { deadline_ms, .. }) =
            self.entries.get(&id)
        {
            self.deadlines.remove(&(*deadline_ms, id.clone()));
        }
        self.entries.insert(
            id,
            Entry::Live {
                keys,
                generation,
                handle,
            },
        );
        generation
    }

    /// The transport of a live connection dropped: keep its state until `deadline_ms`.
    /// Returns `false` (and drops `state`) if the entry is no longer this generation's.
    pub fn park(&mut self, id: &Arc<str>, generation: u64, state: S, deadline_ms: i64) -> bool {
        let keys = match self.entries.remove(id) {
            Some(Entry::Live {
                keys,
                generation: g,
                ..
            }) if g == generation => keys,
            Some(other) => {
                self.entries.insert(id.clone(), other);
                return false;
            }
            None => return false,
        };
        self.entries.insert(
            id.clone(),
            Entry::Parked {
                keys,
                state,
                deadline_ms,
            },
        );
        self.deadlines.insert((deadline_ms, id.clone()), ());
        while self.deadlines.len() > self.parked_max {
            if let Some(((_, oldest), ())) = self.deadlines.pop_first() {
                if let Some(Entry::Parked { state, .. }) = self.entries.remove(&oldest) {
                    if self.evicted.len() < self.parked_max {
                        self.evicted.push((oldest, state));
                    }
                }
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

    /// The id of the live or parked connection whose key `key` is (id and a good secret),
    /// without taking it: a REST publish "on behalf of" that connection (TM2h).
    pub fn connection_id(&self, key: &str) -> Option<Arc<str>> {
        let (id, secret) = split_key(key)?;
        let (id, entry) = self.entries.get_key_value(id)?;
        let keys = match entry {
            Entry::Live { keys, .. } | Entry::Parked { keys, .. } => keys,
            Entry::Moved { .. } => return None,
        };
        keys.accepts(secret).then(|| id.clone())
    }

    /// Takes a parked connection's state for a resume with `key`, and its key chain
    /// (keys issued before the presented one are now spent) for `register`.
    pub fn resume(
        &mut self,
        key: &str,
        now_ms: i64,
    ) -> Result<(Arc<str>, S, KeyChain), ResumeError<L>> {
        let (id, secret) = split_key(key).ok_or(ResumeError::Unknown)?;
        let (id, entry) = self.entries.remove_entry(id).ok_or(ResumeError::Unknown)?;
        match entry {
            Entry::Live {
                keys,
                handle,
                generation,
            } => {
                let result = if keys.accepts(secret) {
                    ResumeError::Live(handle.clone())
                } else {
                    ResumeError::Unknown
                };
                self.entries.insert(
                    id,
                    Entry::Live {
                        keys,
                        generation,
                        handle,
                    },
                );
                Err(result)
            }
            moved @ Entry::Moved { .. } => {
                self.entries.insert(id, moved);
                Err(ResumeError::Unknown)
            }
            Entry::Parked {
                mut keys,
                state,
                deadline_ms,
            } => {
                if !keys.accepts(secret) {
                    self.entries.insert(
                        id,
                        Entry::Parked {
                            keys,
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
                keys.presented(secret);
                Ok((id, state, keys))
            }
        }
    }

    /// What this node holds of connection `id` at `now_ms`, without taking it: its live
    /// handle, or its parked state until its deadline (a parked connection past it is
    /// gone even before the sweep drops it). For `GET`/`DELETE /connections/{id}` and
    /// the per-connection push, which only look.
    pub fn lookup(&self, id: &str, now_ms: i64) -> Option<Lookup<'_, S, L>> {
        match self.entries.get(id)? {
            Entry::Live { handle, .. } => Some(Lookup::Live(handle)),
            Entry::Parked {
                state, deadline_ms, ..
            } if *deadline_ms > now_ms => Some(Lookup::Parked {
                state,
                deadline_ms: *deadline_ms,
            }),
            Entry::Moved {
                to,
                app,
                deadline_ms,
            } if *deadline_ms > now_ms => Some(Lookup::Moved {
                to,
                app,
                deadline_ms: *deadline_ms,
            }),
            Entry::Parked { .. } | Entry::Moved { .. } => None,
        }
    }

    /// Connection `id` of app `app`, just taken by [`Self::resume`] for a resume on
    /// another node where it is now `to`: remembered until `deadline_ms` (counted
    /// against the parked bound) so requests for `id` can follow it.
    pub fn moved(&mut self, id: Arc<str>, to: Arc<str>, app: Arc<str>, deadline_ms: i64) {
        if self.entries.contains_key(&id) {
            return;
        }
        self.entries.insert(
            id.clone(),
            Entry::Moved {
                to,
                app,
                deadline_ms,
            },
        );
        self.deadlines.insert((deadline_ms, id), ());
        while self.deadlines.len() > self.parked_max {
            if let Some(((_, oldest), ())) = self.deadlines.pop_first() {
                if let Some(Entry::Parked { state, .. }) = self.entries.remove(&oldest) {
                    if self.evicted.len() < self.parked_max {
                        self.evicted.push((oldest, state));
                    }
                }
            }
        }
    }

    /// Points a moved connection at a newer successor `to` (the client resumed on
    /// another node again, its previous CONNECTED lost); its deadline stays. Returns
    /// whether `id` was a moved connection.
    pub fn repoint(&mut self, id: &str, to: Arc<str>) -> bool {
        match self.entries.get_mut(id) {
            Some(Entry::Moved { to: old, .. }) => {
                *old = to;
                true
            }
            _ => false,
        }
    }

    /// Ends a parked connection now (`DELETE /connections/{id}`): no resume can take it
    /// any more. Returns its state, for the caller to report it ended (the sweep will
    /// not). A live one is left alone (its session ends itself and removes it).
    pub fn discard_parked(&mut self, id: &str) -> Option<S> {
        let deadline_ms = match self.entries.get(id) {
            Some(Entry::Parked { deadline_ms, .. }) => *deadline_ms,
            _ => return None,
        };
        match self.entries.remove_entry(id) {
            Some((id, Entry::Parked { state, .. })) => {
                self.deadlines.remove(&(deadline_ms, id));
                Some(state)
            }
            _ => None,
        }
    }

    /// Drops parked connections past their deadline, and returns them with those
    /// pushed out by `parked_max` since the last sweep: the connections that ended.
    pub fn sweep(&mut self, now_ms: i64) -> Vec<(Arc<str>, S)> {
        let mut ended = std::mem::take(&mut self.evicted);
        while let Some(((deadline, _), ())) = self.deadlines.first_key_value() {
            if *deadline > now_ms {
                break;
            }
            let ((_, id), ()) = self.deadlines.pop_first().expect("checked non-empty");
            if let Some(Entry::Parked { state, .. }) = self.entries.remove(&id) {
                ended.push((id, state));
            }
        }
        ended
    }

    /// No connection live or parked, and none ended since the last sweep.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.evicted.is_empty()
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

    fn chain(secret: &str) -> KeyChain {
        KeyChain::new(secret.into())
    }

    /// A parked connection resumes with its key, within its deadline only.
    /// A key names its connection (live or parked) only with a good secret, and
    /// looking it up takes nothing.
    #[test]
    fn connection_id_by_key() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let generation = reg.register(id.clone(), KeyChain::new("s1".into()), 7);
        assert_eq!(reg.connection_id("c1!s1"), Some(id.clone()));
        assert_eq!(reg.connection_id("c1!s2"), None);
        assert_eq!(reg.connection_id("c2!s1"), None);
        assert_eq!(reg.connection_id("c1"), None);
        assert!(reg.park(&id, generation, "state", 100));
        assert_eq!(reg.connection_id("c1!s1"), Some(id.clone()));
        assert!(reg.resume("c1!s1", 50).is_ok());
    }

    #[test]
    fn park_and_resume() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let generation = reg.register(id.clone(), chain("s1"), 7);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Live(7)));
        assert!(reg.park(&id, generation, "state", 100));
        assert_eq!(reg.resume("c1!wrong", 0), Err(ResumeError::Unknown));
        let (resumed, state, keys) = reg.resume("c1!s1", 50).unwrap();
        assert_eq!((resumed, state), (id.clone(), "state"));
        assert_eq!(reg.resume("c1!s1", 50), Err(ResumeError::Unknown));
        let generation = reg.register(id.clone(), keys.issue("s2".into()), 8);
        assert!(reg.park(&id, generation, "again", 100));
        assert_eq!(reg.resume("c1!s2", 100), Err(ResumeError::Expired));
    }

    /// A key stays good until the client shows it holds a newer one: a client whose
    /// resume's CONNECTED (with the new key) was lost resumes again with the key it
    /// holds, whether that transport is parked or still live; once it presents a newer
    /// key, every older one is spent.
    #[test]
    fn key_is_good_until_a_newer_one_is_presented() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let resume = |reg: &mut Registry, key: &str, secret: &str, handle: u8| {
            let (_, _, keys) = reg.resume(key, 0).unwrap();
            reg.register(id.clone(), keys.issue(secret.into()), handle)
        };
        let g = reg.register(id.clone(), chain("s1"), 1);
        assert!(reg.park(&id, g, "a", 100));
        // s2 is issued, but its CONNECTED is lost: s1 still resumes, live or parked.
        let g = resume(&mut reg, "c1!s1", "s2", 2);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Live(2)));
        assert!(reg.park(&id, g, "b", 100));
        let g = resume(&mut reg, "c1!s1", "s3", 3);
        // s3 arrives and is used: s1 and s2 are spent; s4, issued for it, is good.
        assert!(reg.park(&id, g, "c", 100));
        let g = resume(&mut reg, "c1!s3", "s4", 4);
        assert!(reg.park(&id, g, "d", 100));
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s2", 0), Err(ResumeError::Unknown));
        let g = resume(&mut reg, "c1!s4", "s5", 5);
        assert!(reg.park(&id, g, "e", 100));
        assert_eq!(reg.resume("c1!s3", 0), Err(ResumeError::Unknown));
    }

    /// A stale resume with an older key that is still good (one the client gave up on,
    /// processed late) does not spend the newer key the client holds: the client's next
    /// resume with it still works.
    #[test]
    fn a_late_resume_with_an_older_key_does_not_spend_the_newer() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let g = reg.register(id.clone(), chain("s1"), 1);
        assert!(reg.park(&id, g, "a", 100));
        // The client resumes with s1 and receives s2.
        let (_, _, keys) = reg.resume("c1!s1", 0).unwrap();
        let g = reg.register(id.clone(), keys.issue("s2".into()), 2);
        assert!(reg.park(&id, g, "b", 100));
        // A late attempt with s1 gets s3, which the client never sees.
        let (_, _, keys) = reg.resume("c1!s1", 0).unwrap();
        let g = reg.register(id.clone(), keys.issue("s3".into()), 3);
        assert!(reg.park(&id, g, "c", 100));
        let (_, state, _) = reg.resume("c1!s2", 0).unwrap();
        assert_eq!(state, "c");
    }

    /// At most `ISSUED_KEPT_MAX` keys issued since the presented one stay good, and the
    /// presented one always does.
    #[test]
    fn issued_keys_are_bounded() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let g = reg.register(id.clone(), chain("s0"), 0);
        assert!(reg.park(&id, g, "x", 100));
        for n in 1..=ISSUED_KEPT_MAX + 2 {
            let (_, _, keys) = reg.resume("c1!s0", 0).unwrap();
            let g = reg.register(id.clone(), keys.issue(format!("s{n}")), 0);
            assert!(reg.park(&id, g, "x", 100));
        }
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.resume("c1!s2", 0), Err(ResumeError::Unknown));
        let (_, _, keys) = reg.resume("c1!s3", 0).unwrap();
        let g = reg.register(id.clone(), keys.issue("t".into()), 0);
        assert!(reg.park(&id, g, "x", 100));
        assert_eq!(reg.resume("c1!s0", 0), Err(ResumeError::Unknown));
    }

    /// A superseded session cannot park over the session that replaced it.
    #[test]
    fn stale_generation_cannot_park() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let old = reg.register(id.clone(), chain("s1"), 1);
        let new = reg.register(id.clone(), chain("s2"), 2);
        assert!(!reg.park(&id, old, "old", 100));
        assert!(reg.park(&id, new, "new", 100));
        let (resumed, state, _) = reg.resume("c1!s2", 0).unwrap();
        assert_eq!((resumed, state), (id, "new"));
    }

    /// Lookup sees a live connection's handle and a parked one's state until its
    /// deadline, and takes nothing; discarding forgets only a parked connection, after
    /// which no resume can take it.
    #[test]
    fn lookup_and_discard() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let g = reg.register(id.clone(), chain("s1"), 7);
        assert_eq!(reg.lookup("c1", 0), Some(Lookup::Live(&7)));
        assert_eq!(reg.lookup("c2", 0), None);
        assert_eq!(reg.discard_parked("c1"), None);
        assert_eq!(reg.lookup("c1", 0), Some(Lookup::Live(&7)));
        assert!(reg.park(&id, g, "state", 100));
        assert_eq!(
            reg.lookup("c1", 99),
            Some(Lookup::Parked {
                state: &"state",
                deadline_ms: 100
            })
        );
        assert_eq!(reg.lookup("c1", 100), None);
        assert_eq!(reg.discard_parked("c1"), Some("state"));
        assert_eq!(reg.parked_count(), 0);
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.discard_parked("c1"), None);
        // The caller reports it ended; the sweep does not again.
        assert!(reg.sweep(1_000).is_empty());
    }

    /// A connection taken over by another node is remembered as moved (to its new id)
    /// until its deadline; its keys resume nothing and name nothing any more.
    #[test]
    fn moved_connections_point_to_their_successor() {
        let mut reg = Registry::new(10);
        let id: Arc<str> = "c1".into();
        let g = reg.register(id.clone(), chain("s1"), 1);
        assert!(reg.park(&id, g, "state", 100));
        assert!(reg.resume("c1!s1", 0).is_ok());
        reg.moved(id.clone(), "d1".into(), "app".into(), 100);
        assert_eq!(
            reg.lookup("c1", 50),
            Some(Lookup::Moved {
                to: &"d1".into(),
                app: &"app".into(),
                deadline_ms: 100
            })
        );
        assert_eq!(reg.resume("c1!s1", 0), Err(ResumeError::Unknown));
        assert_eq!(reg.connection_id("c1!s1"), None);
        assert_eq!(reg.discard_parked("c1"), None);
        assert!(reg.repoint("c1", "d2".into()));
        assert!(matches!(reg.lookup("c1", 50), Some(Lookup::Moved { to, .. }) if &**to == "d2"));
        assert!(!reg.repoint("c2", "d2".into()));
        assert_eq!(reg.lookup("c1", 100), None);
        // A moved connection did not end here: the sweep forgets it without a word.
        assert!(reg.sweep(100).is_empty());
        assert_eq!(reg.parked_count(), 0);
    }

    /// The parked bound evicts the connection closest to expiry; sweep drops expired
    /// ones and hands out both (they ended), once.
    #[test]
    fn bounds_and_sweep() {
        let mut reg = Registry::new(2);
        for (i, deadline) in [30, 10, 20].into_iter().enumerate() {
            let id: Arc<str> = format!("c{i}").into();
            let g = reg.register(id.clone(), chain("s"), 0);
            reg.park(&id, g, "x", deadline);
        }
        assert_eq!(reg.parked_count(), 2);
        assert_eq!(reg.resume("c1!s", 0), Err(ResumeError::Unknown));
        // The sweep hands out what ended: c1 (pushed out by the bound) and c2 (expired).
        let ended: Vec<String> = reg
            .sweep(20)
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(ended, ["c1", "c2"]);
        assert_eq!(reg.parked_count(), 1);
        assert!(reg.sweep(20).is_empty(), "handed out once");
    }
}
