//! The token-request replay cache: which `(keyName, nonce)` pairs were used lately.

use std::collections::{BTreeMap, HashMap};

use crate::AuthError;

/// A bounded memory of recently used token-request nonces.
///
/// An entry lives for `retain_ms` past the later of its request's timestamp and
/// the time it was seen; callers pass twice the timestamp window, so a request is
/// remembered for as long as its timestamp could still be accepted. A nonce is
/// unique per key name within that time (stricter than Ably's nonce + timestamp).
///
/// When the cache is full of live entries a new nonce is refused
/// ([`AuthError::TooManyTokenRequests`]) rather than making room: an evicted nonce
/// whose request is still inside the timestamp window could be replayed. Only
/// requests whose mac verified reach the cache, so only key holders can fill it.
///
/// Time is passed in; the cache reads no clock.
#[derive(Debug)]
pub struct NonceCache {
    /// `(keyName, nonce)` → its expiry and insertion sequence (the key into `by_expiry`).
    seen: HashMap<(String, String), (i64, u64)>,
    /// The same entries ordered by expiry, oldest first, for purging.
    by_expiry: BTreeMap<(i64, u64), (String, String)>,
    entries_max: usize,
    retain_ms: i64,
    next_seq: u64,
}

impl NonceCache {
    /// A cache holding at most `max_entries` (at least one) for `retain_ms` each.
    pub fn new(max_entries: usize, retain_ms: i64) -> Self {
        NonceCache {
            seen: HashMap::new(),
            by_expiry: BTreeMap::new(),
            entries_max: max_entries.max(1),
            retain_ms: retain_ms.max(0),
            next_seq: 0,
        }
    }

    /// Records the nonce. Errors: already remembered → [`AuthError::NonceReplayed`];
    /// full of unexpired entries → [`AuthError::TooManyTokenRequests`] (nothing is
    /// recorded, so the same request may be retried once entries expire).
    pub fn check_and_insert(
        &mut self,
        key_name: &str,
        nonce: &str,
        timestamp_ms: i64,
        now_ms: i64,
    ) -> Result<(), AuthError> {
        self.purge_expired(now_ms);
        let id = (key_name.to_owned(), nonce.to_owned());
        if self.seen.contains_key(&id) {
            return Err(AuthError::NonceReplayed);
        }
        if self.seen.len() >= self.entries_max {
            return Err(AuthError::TooManyTokenRequests);
        }
        let expiry_ms = timestamp_ms.max(now_ms).saturating_add(self.retain_ms);
        let slot = (expiry_ms, self.next_seq);
        self.next_seq += 1;
        self.by_expiry.insert(slot, id.clone());
        self.seen.insert(id, slot);
        debug_assert_eq!(self.seen.len(), self.by_expiry.len());
        debug_assert!(self.seen.len() <= self.entries_max);
        Ok(())
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn purge_expired(&mut self, now_ms: i64) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let id = entry.remove();
            self.seen.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nonce is refused the second time, per key, until it expires.
    #[test]
    fn replay_detected_until_expiry() {
        let mut cache = NonceCache::new(10, 1_000);
        assert_eq!(cache.check_and_insert("app.key", "n1", 0, 0), Ok(()));
        assert_eq!(
            cache.check_and_insert("app.key", "n1", 0, 500),
            Err(AuthError::NonceReplayed)
        );
        assert_eq!(cache.check_and_insert("app.other", "n1", 0, 500), Ok(()));
        assert_eq!(
            cache.check_and_insert("app.key", "n1", 0, 999),
            Err(AuthError::NonceReplayed)
        );
        assert_eq!(cache.check_and_insert("app.key", "n1", 0, 1_000), Ok(()));
    }

    /// A full cache refuses new nonces (42910) instead of forgetting old ones, so
    /// no nonce inside its window can be replayed; room returns as entries expire.
    #[test]
    fn full_cache_refuses_and_never_forgets_a_live_nonce() {
        let mut cache = NonceCache::new(3, 1_000);
        for i in 0..3 {
            assert_eq!(cache.check_and_insert("k", &format!("n{i}"), i, i), Ok(()));
        }
        for i in 3..100 {
            let refused = cache.check_and_insert("k", &format!("n{i}"), i, i);
            assert_eq!(refused, Err(AuthError::TooManyTokenRequests));
            assert_eq!(cache.len(), 3);
        }
        // The oldest nonce is still remembered: replaying it is refused.
        assert_eq!(
            cache.check_and_insert("k", "n0", 0, 100),
            Err(AuthError::NonceReplayed)
        );
        // Once n0 expires (at 0 + 1000) there is room again, and n0 is forgotten.
        assert_eq!(cache.check_and_insert("k", "n3", 3, 1_000), Ok(()));
        assert_eq!(cache.len(), 3);
        assert_eq!(
            cache.check_and_insert("k", "n4", 4, 1_000),
            Err(AuthError::TooManyTokenRequests)
        );
    }

    /// Expired entries are dropped on the next call, whatever order time arrives in.
    #[test]
    fn purges_expired() {
        let mut cache = NonceCache::new(100, 10);
        for i in 0..50 {
            let _ = cache.check_and_insert("k", &format!("n{i}"), 0, 50 - i);
        }
        assert_eq!(cache.check_and_insert("k", "late", 0, 1_000), Ok(()));
        assert_eq!(cache.len(), 1);
        assert!(!cache.is_empty());
    }
}
