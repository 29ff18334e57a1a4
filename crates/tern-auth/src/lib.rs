//! Tern's authentication and authorisation: API keys, Ably token requests, Tern's
//! own signed tokens, HS256 JWTs, and capability matching.
//!
//! Pure logic: no I/O, no clock (every time is an argument, `now_ms`, ms since the
//! epoch), no randomness and no shared state. Any node holding the same keys
//! verifies the same credentials; the token-request replay cache ([`NonceCache`])
//! is the only memory, and its owner passes it in.
//!
//! # Layout
//!
//! - `capability.rs`: [`Operation`], [`OpSet`], [`Capability`]: parsing, wildcard
//!   matching, subset, intersection and ably-js canonical JSON; [`strip_qualifier`].
//! - `key.rs`: [`ApiKey`], [`KeyRing`] (holds the keys; authenticates whole keys and
//!   Basic values), [`AuthContext`], [`ClientIdentity`], [`TokenPolicy`].
//! - `credential.rs`: the [`KeyRing`] methods for tokens (a Tern token or a JWT, told
//!   apart by shape; bearer values; token requests), above `token.rs` and `jwt.rs`.
//! - `token.rs`: [`TokenRequest`], [`TokenDetails`], [`sign_token_request`] and the
//!   `tn1.` token format: issue, verify, and the token-request checks.
//! - `jwt.rs`: HS256 JWT verification and [`sign_jwt`].
//! - `nonce.rs`: [`NonceCache`], the bounded replay cache for token requests.
//! - `revocation.rs`: token revocation: [`RevocationTarget`], [`Revocation`] (which
//!   tokens it refuses, from when) and the bounded, expiring [`RevocationList`].
//! - `error.rs`: [`AuthError`], each variant with its Ably code and HTTP status.
//! - `signature.rs`: HMAC-SHA256, constant-time comparison, base64 flavours.

mod capability;
mod credential;
mod error;
mod jwt;
mod key;
mod nonce;
mod revocation;
mod signature;
mod token;

pub use capability::{strip_qualifier, Capability, OpSet, Operation};
pub use error::AuthError;
pub use jwt::sign_jwt;
pub use key::{ApiKey, AuthContext, ClientIdentity, KeyRing, TokenPolicy};
pub use nonce::NonceCache;
pub use revocation::{
    Revocation, RevocationError, RevocationList, RevocationTarget, TargetError,
    TARGET_VALUE_BYTES_MAX,
};
pub use token::{sign_token_request, TokenDetails, TokenRequest};
