//! API keys, the key ring that holds them (and authenticates a whole key), and what a
//! successful authentication yields ([`AuthContext`]). Below `token` and `jwt`, which
//! verify against the ring; the ring's token methods live in `credential.rs`, above them.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;

use crate::signature::{constant_time_eq, STANDARD};
use crate::{AuthError, Capability, Operation};

/// One configured API key: `appId.keyId:secret` plus what it may do.
#[derive(Clone)]
pub struct ApiKey {
    /// The application the key belongs to (before the `.` of the key name).
    pub app_id: String,
    /// The key's own id (after the `.` of the key name).
    pub key_id: String,
    /// The shared secret; signs token requests, Tern tokens and JWTs.
    pub secret: String,
    /// The most any credential derived from this key may do.
    pub capability: Capability,
}

impl ApiKey {
    /// Parses `"appId.keyId:secret"`, splitting at the first `:` and then at the
    /// first `.`, as the SDKs do. Every part must be non-empty, else
    /// [`AuthError::InvalidCredentials`].
    pub fn from_key_string(key: &str, capability: Capability) -> Result<ApiKey, AuthError> {
        let malformed = || AuthError::InvalidCredentials("malformed key".to_owned());
        let (name, secret) = key.split_once(':').ok_or_else(malformed)?;
        let (app_id, key_id) = name.split_once('.').ok_or_else(malformed)?;
        if app_id.is_empty() || key_id.is_empty() || secret.is_empty() {
            return Err(malformed());
        }
        Ok(ApiKey {
            app_id: app_id.to_owned(),
            key_id: key_id.to_owned(),
            secret: secret.to_owned(),
            capability,
        })
    }

    /// The key name, `"appId.keyId"`: the public half of the key.
    pub fn name(&self) -> String {
        format!("{}.{}", self.app_id, self.key_id)
    }

    /// The whole key, `"appId.keyId:secret"`, as clients are configured with it.
    pub fn to_key_string(&self) -> String {
        format!("{}:{}", self.name(), self.secret)
    }
}

impl fmt::Debug for ApiKey {
    /// Like a derived `Debug`, with the secret redacted so keys can be logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("app_id", &self.app_id)
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .field("capability", &self.capability)
            .finish()
    }
}

/// Which clientId a credential lets its holder act as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientIdentity {
    /// No clientId: the client may not claim one.
    Anonymous,
    /// `"*"`, or basic key auth: the client may use any clientId.
    Wildcard,
    /// Exactly this clientId.
    Id(String),
}

impl ClientIdentity {
    /// The identity a token's clientId claim carries: absent or empty is
    /// anonymous, `"*"` is the wildcard.
    pub fn from_claim(client_id: Option<&str>) -> ClientIdentity {
        match client_id {
            None | Some("") => ClientIdentity::Anonymous,
            Some("*") => ClientIdentity::Wildcard,
            Some(id) => ClientIdentity::Id(id.to_owned()),
        }
    }

    /// The fixed clientId, when there is one.
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientIdentity::Id(id) => Some(id),
            ClientIdentity::Anonymous | ClientIdentity::Wildcard => None,
        }
    }

    /// Whether a client holding this identity may act as `client_id`.
    pub fn permits(&self, client_id: &str) -> bool {
        match self {
            ClientIdentity::Anonymous => false,
            ClientIdentity::Wildcard => true,
            ClientIdentity::Id(id) => id == client_id,
        }
    }
}

/// Who a verified credential belongs to and what it may do.
#[derive(Clone, Debug)]
pub struct AuthContext {
    /// The application every resource access is scoped to.
    pub app_id: String,
    /// The key the credential is (or was derived from), `"appId.keyId"`.
    pub key_name: String,
    /// The clientId the credential allows.
    pub client_id: ClientIdentity,
    /// What the credential may do, already narrowed by the key's current capability.
    pub capability: Capability,
    /// When the credential stops being valid; `None` for basic key auth, which
    /// does not expire.
    pub expires_ms: Option<i64>,
    /// Whether this came from a token (Tern token or JWT) rather than the key itself.
    pub via_token: bool,
    /// When the token was issued (ms since the epoch), if it says; token revocation
    /// covers tokens issued before a time.
    pub issued_ms: Option<i64>,
    /// The token's revocation key (JWT claim `x-ably-revocation-key`), if any.
    pub revocation_key: Option<String>,
}

impl AuthContext {
    /// Whether `op` is allowed on `channel`.
    pub fn allows(&self, channel: &str, op: Operation) -> bool {
        self.capability.allows(channel, op)
    }

    /// Whether the credential has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_ms
            .is_some_and(|expires_ms| expires_ms <= now_ms)
    }
}

/// Limits on tokens: those issued from token requests, and those (JWTs, Tern tokens)
/// presented to be verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Token lifetime when the request names none (Ably: 60 minutes).
    pub ttl_default_ms: i64,
    /// Longest lifetime a request may ask for (Ably: 24 hours), and the longest a
    /// presented token may have, from its issue time (or now, if later or absent)
    /// to its expiry: a signer cannot mint a credential that never expires.
    pub ttl_max_ms: i64,
    /// How far a request's timestamp may be from the server clock, either way.
    pub request_window_ms: i64,
    /// How far in the future a JWT's `iat` and `nbf` may be, for the signer's clock
    /// running ahead of ours.
    pub clock_skew_ms: i64,
}

impl TokenPolicy {
    /// How long a [`NonceCache`](crate::NonceCache) must remember a nonce: twice the
    /// window, so a request stays remembered while its timestamp could still be accepted.
    pub fn nonce_retain_ms(&self) -> i64 {
        self.request_window_ms.saturating_mul(2)
    }

    /// Whether a token issued at `issued_ms` (absent: unknown, taken as now) and
    /// expiring at `expires_ms` lives no longer than `ttl_max_ms`. Measured from the
    /// issue time, so a long-lived token is refused late in its life too; an issue
    /// time ahead of `now_ms` counts up to `clock_skew_ms` (a signer, or another node,
    /// whose clock runs a little ahead), never more, so it cannot stretch the
    /// allowance. Saturating, so any `i64` (a saturated `exp: 1e300` among them) is
    /// safe.
    pub(crate) fn lifetime_allowed(
        &self,
        issued_ms: Option<i64>,
        expires_ms: i64,
        now_ms: i64,
    ) -> bool {
        let latest_ms = now_ms.saturating_add(self.clock_skew_ms);
        let from_ms = issued_ms.map_or(now_ms, |issued_ms| issued_ms.min(latest_ms));
        expires_ms.saturating_sub(from_ms) <= self.ttl_max_ms
    }
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            ttl_default_ms: 3_600_000,
            ttl_max_ms: 86_400_000,
            request_window_ms: 600_000,
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
        }
    }
}

/// Default [`TokenPolicy::clock_skew_ms`]: 30 s, well above NTP-synchronised drift.
const DEFAULT_CLOCK_SKEW_MS: i64 = 30_000;

/// The configured keys, by key name; verifies every kind of credential.
///
/// Holds no mutable state: any node with the same keys and policy verifies the
/// same credentials. The replay cache for token requests is passed in separately.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, ApiKey>,
    /// Lifetime and clock-skew limits applied to presented tokens.
    policy: TokenPolicy,
}

impl KeyRing {
    /// A ring of `keys` under the default [`TokenPolicy`]; a repeated key name
    /// keeps the last.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        let keys = keys.into_iter().map(|key| (key.name(), key)).collect();
        KeyRing {
            keys,
            policy: TokenPolicy::default(),
        }
    }

    /// The same keys, verifying presented tokens under `policy`.
    pub fn with_policy(mut self, policy: TokenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The policy presented tokens are verified under.
    pub fn policy(&self) -> &TokenPolicy {
        &self.policy
    }

    /// The key named `"appId.keyId"`.
    pub fn get(&self, key_name: &str) -> Option<&ApiKey> {
        self.keys.get(key_name)
    }

    /// Every key, in key-name order.
    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.keys.values()
    }

    /// Authenticates a whole key, `"appId.keyId:secret"`, as carried by the
    /// `key=` query parameter and (decoded) by Basic auth.
    ///
    /// The secret is compared in constant time. Basic key auth may act as any
    /// clientId, so the identity is [`ClientIdentity::Wildcard`]. Errors:
    /// malformed or wrong secret → [`AuthError::InvalidCredentials`]; unknown key
    /// name → [`AuthError::KeyNotFound`].
    pub fn authenticate_key(&self, key: &str) -> Result<AuthContext, AuthError> {
        let malformed = || AuthError::InvalidCredentials("malformed key".to_owned());
        let (name, secret) = key.split_once(':').ok_or_else(malformed)?;
        if name.is_empty() || secret.is_empty() {
            return Err(malformed());
        }
        let api_key = self
            .get(name)
            .ok_or_else(|| AuthError::KeyNotFound(name.to_owned()))?;
        if !constant_time_eq(secret.as_bytes(), api_key.secret.as_bytes()) {
            return Err(AuthError::InvalidCredentials(
                "invalid key secret".to_owned(),
            ));
        }
        Ok(AuthContext {
            app_id: api_key.app_id.clone(),
            key_name: name.to_owned(),
            client_id: ClientIdentity::Wildcard,
            capability: api_key.capability.clone(),
            expires_ms: None,
            via_token: false,
            issued_ms: None,
            revocation_key: None,
        })
    }

    /// Authenticates the value of an `Authorization: Basic` header (without the
    /// scheme): base64 of `"appId.keyId:secret"`. Undecodable →
    /// [`AuthError::InvalidCredentials`]; otherwise as [`KeyRing::authenticate_key`].
    pub fn authenticate_basic(&self, encoded: &str) -> Result<AuthContext, AuthError> {
        let key = STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| AuthError::InvalidCredentials("malformed basic auth".to_owned()))?;
        self.authenticate_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(vec![
            ApiKey::from_key_string("app.root:s3cret", Capability::all()).unwrap(),
            ApiKey::from_key_string(
                "app.sub:other",
                Capability::parse(r#"{"chat:*":["subscribe"]}"#).unwrap(),
            )
            .unwrap(),
        ])
    }

    /// A whole key authenticates with wildcard clientId and the key's capability.
    #[test]
    fn key_auth_happy() {
        let ctx = ring().authenticate_key("app.sub:other").unwrap();
        assert_eq!(ctx.app_id, "app");
        assert_eq!(ctx.key_name, "app.sub");
        assert_eq!(ctx.client_id, ClientIdentity::Wildcard);
        assert!(ctx.allows("chat:x", Operation::Subscribe));
        assert!(!ctx.allows("chat:x", Operation::Publish));
        assert_eq!(ctx.expires_ms, None);
        assert!(!ctx.via_token && !ctx.is_expired(i64::MAX));
    }

    /// Wrong secret, unknown key and malformed keys map to their codes.
    #[test]
    fn key_auth_failures() {
        let ring = ring();
        let code = |key: &str| ring.authenticate_key(key).unwrap_err().code();
        assert_eq!(code("app.root:wrong"), 40101);
        assert_eq!(code("app.root:s3cret2"), 40101);
        assert_eq!(code("app.nope:s3cret"), 40101);
        assert_eq!(code("app.root"), 40101);
        assert_eq!(code(":s3cret"), 40101);
        assert_eq!(code("app.root:"), 40101);
        assert_eq!(
            ring.authenticate_key("app.nope:x")
                .unwrap_err()
                .status_code(),
            401
        );
    }

    /// Basic auth decodes base64 and then checks the key.
    #[test]
    fn basic_auth() {
        let ring = ring();
        let encoded = STANDARD.encode("app.root:s3cret");
        assert!(ring.authenticate_basic(&encoded).is_ok());
        assert_eq!(ring.authenticate_basic("!!!").unwrap_err().code(), 40101);
    }

    /// Key strings parse at the first ':' and '.', and print back the same.
    #[test]
    fn key_string_round_trip() {
        let key = ApiKey::from_key_string("app.key:se:cr.et", Capability::all()).unwrap();
        assert_eq!(key.name(), "app.key");
        assert_eq!(key.secret, "se:cr.et");
        assert_eq!(key.to_key_string(), "app.key:se:cr.et");
        assert!(!format!("{key:?}").contains("se:cr.et"));
        for bad in ["app.key", "appkey:secret", ".key:s", "app.:s", "app.key:"] {
            assert!(
                ApiKey::from_key_string(bad, Capability::all()).is_err(),
                "{bad}"
            );
        }
    }

    /// Client identities read claims and permit clientIds as documented.
    #[test]
    fn client_identity() {
        assert_eq!(ClientIdentity::from_claim(None), ClientIdentity::Anonymous);
        assert_eq!(
            ClientIdentity::from_claim(Some("")),
            ClientIdentity::Anonymous
        );
        assert_eq!(
            ClientIdentity::from_claim(Some("*")),
            ClientIdentity::Wildcard
        );
        let bob = ClientIdentity::from_claim(Some("bob"));
        assert_eq!(bob.id(), Some("bob"));
        assert!(bob.permits("bob") && !bob.permits("eve"));
        assert!(ClientIdentity::Wildcard.permits("eve"));
        assert!(!ClientIdentity::Anonymous.permits("eve"));
    }
}
