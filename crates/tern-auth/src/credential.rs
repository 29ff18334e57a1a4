//! The key ring's token methods: a presented token or bearer value told apart by shape
//! and handed to `token` or `jwt`, token requests checked and tokens issued. An `impl`
//! of [`KeyRing`] apart from `key.rs`, so that `key.rs` sits below `token.rs` and
//! `jwt.rs` (which verify against the ring) and the imports run one way.

use base64::Engine as _;

use crate::key::{ApiKey, AuthContext, KeyRing, TokenPolicy};
use crate::signature::STANDARD;
use crate::token::{self, TokenDetails, TokenRequest};
use crate::{jwt, AuthError, Capability, NonceCache};

impl KeyRing {
    /// Authenticates a Tern token (`tn1.…`) or an Ably JWT (plain, embedding a
    /// token, or encrypted: see `jwt.rs`), told apart by shape.
    ///
    /// Errors: expired → [`AuthError::TokenExpired`]; a Tern token that is
    /// garbage, badly signed, whose key is gone or whose lifetime is over the
    /// policy's `ttl_max_ms`, or anything of neither shape →
    /// [`AuthError::TokenUnrecognised`]; a JWT whose `kid` names an app not
    /// configured here → [`AuthError::AppNotFound`]; a JWT that fails any other
    /// check (its lifetime and clock skew included) → [`AuthError::InvalidJwt`]. The capability is
    /// narrowed by the key's current capability, so shrinking a key shrinks its
    /// live tokens.
    pub fn authenticate_token(&self, token: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
        if token.len() > token::TOKEN_BYTES_MAX {
            return Err(AuthError::TokenUnrecognised("token too long".to_owned()));
        }
        if token.starts_with(token::TOKEN_PREFIX) {
            token::verify(self, token, now_ms)
        } else if matches!(token.split('.').count(), 3 | 5) {
            // A JWT: signed (three parts) or encrypted (five).
            jwt::verify(self, token, now_ms)
        } else {
            Err(AuthError::TokenUnrecognised(
                "neither a Tern token nor a JWT".to_owned(),
            ))
        }
    }

    /// Authenticates the value of an `Authorization: Bearer` header (without the
    /// scheme). The SDKs send base64 of the token; a value that does not decode
    /// to text is taken as the raw token. This is unambiguous because every
    /// token form contains `.`, which base64 never does.
    pub fn authenticate_bearer(
        &self,
        encoded: &str,
        now_ms: i64,
    ) -> Result<AuthContext, AuthError> {
        let encoded = encoded.trim();
        match STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
        {
            Some(token) => self.authenticate_token(&token, now_ms),
            None => self.authenticate_token(encoded, now_ms),
        }
    }

    /// Serves `POST /keys/{keyName}/requestToken`: checks a signed token request
    /// and issues a Tern token.
    ///
    /// Checks, in order: the path's key exists ([`AuthError::KeyNotFound`]) and
    /// the body's `keyName` names it ([`AuthError::InvalidRequest`]); the mac
    /// ([`AuthError::InvalidCredentials`]); the timestamp is within
    /// `policy.request_window_ms` of `now_ms` ([`AuthError::TimestampNotCurrent`]);
    /// the nonce has 16 to 256 characters and the ttl is positive and at most
    /// `policy.ttl_max_ms` ([`AuthError::InvalidRequest`]); the capability parses
    /// ([`AuthError::InvalidCapability`]) and is a subset of the key's
    /// ([`AuthError::CapabilityNotSubset`]); and last the nonce is not a replay
    /// ([`AuthError::NonceReplayed`]) and the replay cache has room for it
    /// ([`AuthError::TooManyTokenRequests`]), so a refused request never uses up
    /// its nonce.
    /// An absent capability means the key's own; an absent or zero ttl the
    /// policy's default.
    pub fn request_token(
        &self,
        key_name_in_path: &str,
        req: &TokenRequest,
        now_ms: i64,
        nonces: &mut NonceCache,
        policy: &TokenPolicy,
    ) -> Result<TokenDetails, AuthError> {
        let key = self
            .get(key_name_in_path)
            .ok_or_else(|| AuthError::KeyNotFound(key_name_in_path.to_owned()))?;
        token::check_request(key, req, now_ms, nonces, policy)
    }

    /// Signs a Tern token with `key` directly, without a token request (for
    /// tests and `tern dev`). The token's capability is `capability` narrowed by
    /// the key's; an empty `client_id` counts as none.
    pub fn issue_token(
        &self,
        key: &ApiKey,
        client_id: Option<&str>,
        capability: &Capability,
        ttl_ms: i64,
        now_ms: i64,
    ) -> TokenDetails {
        token::issue(key, client_id, capability, ttl_ms, now_ms)
    }
}
