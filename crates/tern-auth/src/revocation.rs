//! Token revocation (Ably RSA17, `POST /keys/{keyName}/revokeTokens`): which tokens a
//! revocation covers, and the bounded list of revocations an app holds.
//!
//! A revocation names a key, a target (`clientId:…` or `revocationKey:…`), a time
//! `issued_before` (tokens issued at or after it are not covered) and a time
//! `applies_at` (before it nothing is refused: `allowReauthMargin` gives clients 30 s
//! to renew). Pure logic: the caller passes `now_ms`, and how revocations travel
//! between nodes is the edge's business.
//!
//! An entry can be forgotten once no token it covers can still be alive: a token
//! verified here lives at most `ttl_max_ms` from its issue time (an issue time at most
//! `clock_skew_ms` ahead counts, see [`crate::TokenPolicy`]), so one issued before
//! `issued_before` expires by `issued_before + ttl_max_ms + clock_skew_ms`.

use serde::{Deserialize, Serialize};

use crate::{AuthContext, ClientIdentity};

/// Longest target value (a clientId or revocation key) accepted, in bytes.
pub const TARGET_VALUE_BYTES_MAX: usize = 1_024;

/// What a revocation covers: tokens with this clientId, or with this revocation key
/// (the JWT claim `x-ably-revocation-key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "camelCase")]
pub enum RevocationTarget {
    ClientId(String),
    RevocationKey(String),
}

/// Why a target specifier was refused (each is a 400 for that target alone).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not `type:value`.
    #[error("target '{0}' is not of the form type:value")]
    Malformed(String),
    /// A type other than `clientId` and `revocationKey` (`channel` included: Tern
    /// tokens are not revoked by channel).
    #[error("unsupported target type '{0}' (use clientId or revocationKey)")]
    UnsupportedType(String),
    /// An empty value, or one over [`TARGET_VALUE_BYTES_MAX`].
    #[error("target value must have 1 to {TARGET_VALUE_BYTES_MAX} bytes")]
    BadValue,
}

impl RevocationTarget {
    /// Parses a target specifier as ably-js sends it: `"clientId:alice"`. The value is
    /// everything after the first `:` (a clientId may itself hold `:`).
    pub fn parse(spec: &str) -> Result<RevocationTarget, TargetError> {
        let (kind, value) = spec
            .split_once(':')
            .ok_or_else(|| TargetError::Malformed(spec.to_owned()))?;
        if value.is_empty() || value.len() > TARGET_VALUE_BYTES_MAX {
            return Err(TargetError::BadValue);
        }
        match kind {
            "clientId" => Ok(RevocationTarget::ClientId(value.to_owned())),
            "revocationKey" => Ok(RevocationTarget::RevocationKey(value.to_owned())),
            _ => Err(TargetError::UnsupportedType(kind.to_owned())),
        }
    }

    /// The specifier text, as the response echoes it.
    pub fn spec(&self) -> String {
        match self {
            RevocationTarget::ClientId(id) => format!("clientId:{id}"),
            RevocationTarget::RevocationKey(key) => format!("revocationKey:{key}"),
        }
    }

    fn covers(&self, token: &AuthContext) -> bool {
        match self {
            RevocationTarget::ClientId(id) => {
                matches!(&token.client_id, ClientIdentity::Id(own) if own == id)
            }
            RevocationTarget::RevocationKey(key) => token.revocation_key.as_ref() == Some(key),
        }
    }
}

/// One revocation, as it is recorded and replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The key whose tokens are revoked, `"appId.keyId"`.
    pub key_name: String,
    pub target: RevocationTarget,
    /// Tokens issued before this (ms since the epoch) are covered.
    pub issued_before: i64,
    /// From this time (ms since the epoch) covered tokens are refused.
    pub applies_at: i64,
}

impl Revocation {
    /// Whether this revocation refuses `token` at `now_ms`. Only tokens count (basic
    /// key auth is never revoked); a token with no issue time (a JWT without `iat`)
    /// counts as issued before any revocation.
    pub fn refuses(&self, token: &AuthContext, now_ms: i64) -> bool {
        token.via_token
            && now_ms >= self.applies_at
            && token.key_name == self.key_name
            && token
                .issued_ms
                .is_none_or(|issued| issued < self.issued_before)
            && self.target.covers(token)
    }

    /// When no token this covers can still be alive (see the module docs).
    fn expires_at(&self, token_life_max_ms: i64) -> i64 {
        self.issued_before.saturating_add(token_life_max_ms)
    }
}

/// Why [`RevocationList::admit`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// The app already holds `entries_max` live revocations (Ably 42910 here: entries
    /// expire, so the request can succeed later).
    #[error("too many token revocations in force for this app (at most {0})")]
    TooMany(usize),
}

/// One app's revocations in force. Bounded: [`RevocationList::admit`] refuses new ones
/// past `entries_max`; revocations recorded from other nodes are always taken (they
/// were admitted there, and dropping one would let a revoked token back in), so the
/// list holds at most `entries_max` per node that admits revocations.
#[derive(Clone, Debug)]
pub struct RevocationList {
    entries: Vec<Revocation>,
    entries_max: usize,
    /// `ttl_max_ms + clock_skew_ms`: how long after `issued_before` an entry matters.
    token_life_max_ms: i64,
}

impl RevocationList {
    /// An empty list admitting at most `entries_max` revocations, for tokens that live
    /// at most `token_life_max_ms` from their issue time (`ttl_max_ms` plus the clock
    /// skew allowed on issue times).
    pub fn new(entries_max: usize, token_life_max_ms: i64) -> Self {
        RevocationList {
            entries: Vec::new(),
            entries_max,
            token_life_max_ms,
        }
    }

    /// Checks that `count` more revocations fit at `now_ms` (after forgetting expired
    /// ones); the caller then records them (on every node, itself included).
    pub fn admit(&mut self, count: usize, now_ms: i64) -> Result<(), RevocationError> {
        self.expire(now_ms);
        if self.entries.len().saturating_add(count) > self.entries_max {
            return Err(RevocationError::TooMany(self.entries_max));
        }
        Ok(())
    }

    /// Records a revocation (admitted here or on another node). An identical one
    /// already held is not recorded twice, so a replayed record costs nothing.
    pub fn record(&mut self, revocation: Revocation, now_ms: i64) {
        self.expire(now_ms);
        if revocation.expires_at(self.token_life_max_ms) <= now_ms
            || self.entries.contains(&revocation)
        {
            return;
        }
        self.entries.push(revocation);
    }

    /// From when `token` is refused: the earliest `applies_at` of the revocations
    /// covering it (`None`: none does). A live connection holding it is cut then.
    pub fn refused_from(&self, token: &AuthContext) -> Option<i64> {
        self.entries
            .iter()
            .filter(|r| r.refuses(token, i64::MAX))
            .map(|r| r.applies_at)
            .min()
    }

    /// Forgets revocations no live token can match any more.
    pub fn expire(&mut self, now_ms: i64) {
        let life = self.token_life_max_ms;
        self.entries.retain(|r| r.expires_at(life) > now_ms);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Capability;

    const NOW: i64 = 1_700_000_000_000;
    const LIFE: i64 = 86_400_000;

    fn token(
        client: Option<&str>,
        revocation_key: Option<&str>,
        issued: Option<i64>,
    ) -> AuthContext {
        AuthContext {
            app_id: "app".into(),
            key_name: "app.k".into(),
            client_id: ClientIdentity::from_claim(client),
            capability: Capability::all(),
            expires_ms: Some(NOW + 60_000),
            via_token: true,
            issued_ms: issued,
            revocation_key: revocation_key.map(str::to_owned),
        }
    }

    fn revoke(target: &str, issued_before: i64, applies_at: i64) -> Revocation {
        Revocation {
            key_name: "app.k".into(),
            target: RevocationTarget::parse(target).unwrap(),
            issued_before,
            applies_at,
        }
    }

    /// Specifiers parse as ably-js writes them; anything else is refused with a reason.
    #[test]
    fn parses_targets() {
        assert_eq!(
            RevocationTarget::parse("clientId:a:b"),
            Ok(RevocationTarget::ClientId("a:b".into()))
        );
        assert_eq!(
            RevocationTarget::parse("revocationKey:group-1"),
            Ok(RevocationTarget::RevocationKey("group-1".into()))
        );
        assert_eq!(
            RevocationTarget::parse("invalidType:abc"),
            Err(TargetError::UnsupportedType("invalidType".into()))
        );
        assert_eq!(
            RevocationTarget::parse("channel:x"),
            Err(TargetError::UnsupportedType("channel".into()))
        );
        assert_eq!(
            RevocationTarget::parse("clientId"),
            Err(TargetError::Malformed("clientId".into()))
        );
        assert_eq!(
            RevocationTarget::parse("clientId:"),
            Err(TargetError::BadValue)
        );
        let long = format!("clientId:{}", "x".repeat(TARGET_VALUE_BYTES_MAX + 1));
        assert_eq!(RevocationTarget::parse(&long), Err(TargetError::BadValue));
        assert_eq!(
            RevocationTarget::parse("clientId:a:b").unwrap().spec(),
            "clientId:a:b"
        );
    }

    /// A revocation refuses exactly the tokens of its key and target issued before
    /// `issued_before`, and only from `applies_at`; key auth is never refused.
    #[test]
    fn matches_key_target_and_times() {
        let r = revoke("clientId:alice", NOW, NOW + 30_000);
        let alice = token(Some("alice"), None, Some(NOW - 1));
        assert!(!r.refuses(&alice, NOW), "before appliesAt");
        assert!(r.refuses(&alice, NOW + 30_000));
        assert!(
            !r.refuses(&token(Some("alice"), None, Some(NOW)), NOW + 30_000),
            "issued at issuedBefore"
        );
        assert!(!r.refuses(&token(Some("bob"), None, Some(NOW - 1)), NOW + 30_000));
        assert!(
            !r.refuses(&token(Some("*"), None, Some(NOW - 1)), NOW + 30_000),
            "wildcard is not alice"
        );
        assert!(
            r.refuses(&token(Some("alice"), None, None), NOW + 30_000),
            "no iat counts as old"
        );
        let mut other_key = alice.clone();
        other_key.key_name = "app.other".into();
        assert!(!r.refuses(&other_key, NOW + 30_000));
        let mut basic = alice.clone();
        basic.via_token = false;
        assert!(!r.refuses(&basic, NOW + 30_000));

        let by_key = revoke("revocationKey:group", NOW, NOW);
        assert!(by_key.refuses(&token(None, Some("group"), Some(NOW - 5)), NOW));
        assert!(!by_key.refuses(&token(None, Some("groupie"), Some(NOW - 5)), NOW));
        assert!(!by_key.refuses(&token(Some("group"), None, Some(NOW - 5)), NOW));
    }

    /// The list admits up to its bound, forgets entries once no covered token can be
    /// alive (freeing room), and records a replayed entry once.
    #[test]
    fn bounded_and_expiring() {
        let mut list = RevocationList::new(2, LIFE);
        list.admit(2, NOW).unwrap();
        list.record(revoke("clientId:a", NOW, NOW), NOW);
        list.record(revoke("clientId:a", NOW, NOW), NOW);
        assert_eq!(list.len(), 1, "a replay is recorded once");
        list.record(revoke("clientId:b", NOW - 1_000, NOW), NOW);
        assert_eq!(list.admit(1, NOW), Err(RevocationError::TooMany(2)));
        assert_eq!(
            list.refused_from(&token(Some("a"), None, Some(NOW - 1))),
            Some(NOW)
        );
        assert_eq!(
            list.refused_from(&token(Some("z"), None, Some(NOW - 1))),
            None
        );
        // b's tokens are all dead 1 s before a's.
        list.admit(1, NOW - 1_000 + LIFE).unwrap();
        assert_eq!(list.len(), 1);
        list.expire(NOW + LIFE);
        assert!(list.is_empty());
        // An entry already past its life is not recorded at all.
        list.record(revoke("clientId:c", NOW, NOW), NOW + LIFE);
        assert!(list.is_empty());
    }
}
