//! The one error type this crate returns, with its Ably error code and HTTP status.

/// Why a credential, token request or capability was refused.
///
/// Every variant maps to one Ably error code ([`AuthError::code`]) and one HTTP
/// status ([`AuthError::status_code`]). The `String` payloads are human-readable
/// detail for the client; they never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A key string was malformed, named a key whose secret did not match, or a
    /// token request's `mac` did not verify. Ably code 40101, status 401.
    #[error("invalid credentials: {0}")]
    InvalidCredentials(String),
    /// The key name is not configured on this server. Ably code 40101, status 401, as
    /// for a wrong secret (ably-js's `invalid_cred_failure` expects it: the client
    /// must go FAILED, not retry).
    #[error("key not found: {0}")]
    KeyNotFound(String),
    /// A capability was not a JSON object of resource → array of known operations,
    /// or was over a size bound. Ably code 40000, status 400.
    #[error("invalid capability: {0}")]
    InvalidCapability(String),
    /// A token request field had a bad value (short nonce, ttl out of range,
    /// key name not matching the path). Ably code 40003, status 400.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A JWT's `kid` names an app that is not configured here. Ably code 40400,
    /// status 404, as Ably answers a JWT for an app it does not have: not a token
    /// error, so an SDK does not keep renewing a token that can never work.
    #[error("app not found: {0}")]
    AppNotFound(String),
    /// A token request's `timestamp` was further from the server clock than the
    /// policy's window allows. Ably code 40104, status 401.
    #[error("timestamp not current")]
    TimestampNotCurrent,
    /// A token request's nonce was already used with this key inside the replay
    /// window. Ably code 40105, status 401.
    #[error("nonce value replayed")]
    NonceReplayed,
    /// The replay cache is full of nonces still inside their replay window, so a new
    /// token request cannot be remembered. Forgetting an old nonce instead would let
    /// it be replayed, so the request is refused until entries expire. Ably code
    /// 42910 (rate limit), status 429: the client may retry later.
    #[error("too many token requests: the nonce cache is full, retry later")]
    TooManyTokenRequests,
    /// The requested capability asks for something the key does not grant.
    /// Ably code 40160, status 401.
    #[error("requested capability grants nothing the key allows")]
    CapabilityNotSubset,
    /// The token (Tern token or JWT) verified but its expiry has passed.
    /// Ably code 40142, status 401; SDKs renew the token on this code.
    #[error("token expired")]
    TokenExpired,
    /// The token is not one this server issued: garbage, bad signature, or its
    /// key is no longer configured. Ably code 40143, status 401.
    #[error("token unrecognised: {0}")]
    TokenUnrecognised(String),
    /// The token looked like a JWT but is not one we accept: wrong algorithm,
    /// unknown `kid`, bad signature or malformed claims. Ably code 40144, status 401.
    #[error("invalid JWT: {0}")]
    InvalidJwt(String),
}

impl AuthError {
    /// The Ably error code (`ErrorInfo.code`) for this error.
    pub fn code(&self) -> u32 {
        match self {
            AuthError::InvalidCredentials(_) => 40101,
            AuthError::KeyNotFound(_) => 40101,
            AuthError::InvalidCapability(_) => 40000,
            AuthError::InvalidRequest(_) => 40003,
            AuthError::AppNotFound(_) => 40400,
            AuthError::TimestampNotCurrent => 40104,
            AuthError::NonceReplayed => 40105,
            AuthError::TooManyTokenRequests => 42910,
            AuthError::CapabilityNotSubset => 40160,
            AuthError::TokenExpired => 40142,
            AuthError::TokenUnrecognised(_) => 40143,
            AuthError::InvalidJwt(_) => 40144,
        }
    }

    /// The HTTP status (`ErrorInfo.statusCode`) for this error.
    pub fn status_code(&self) -> u16 {
        match self {
            AuthError::TooManyTokenRequests => 429,
            AuthError::AppNotFound(_) => 404,
            AuthError::InvalidCapability(_) | AuthError::InvalidRequest(_) => 400,
            AuthError::InvalidCredentials(_)
            | AuthError::KeyNotFound(_)
            | AuthError::TimestampNotCurrent
            | AuthError::NonceReplayed
            | AuthError::CapabilityNotSubset
            | AuthError::TokenExpired
            | AuthError::TokenUnrecognised(_)
            | AuthError::InvalidJwt(_) => 401,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(err: AuthError, code: u32, status: u16) {
        assert_eq!((err.code(), err.status_code()), (code, status), "{err:?}");
    }

    /// Each variant carries the Ably code and HTTP status the protocol notes list.
    #[test]
    fn codes_and_statuses() {
        check(AuthError::InvalidCredentials(String::new()), 40101, 401);
        check(AuthError::KeyNotFound(String::new()), 40101, 401);
        check(AuthError::InvalidCapability(String::new()), 40000, 400);
        check(AuthError::InvalidRequest(String::new()), 40003, 400);
        check(AuthError::AppNotFound(String::new()), 40400, 404);
        check(AuthError::TimestampNotCurrent, 40104, 401);
        check(AuthError::NonceReplayed, 40105, 401);
        check(AuthError::TooManyTokenRequests, 42910, 429);
        check(AuthError::CapabilityNotSubset, 40160, 401);
        check(AuthError::TokenExpired, 40142, 401);
        check(AuthError::TokenUnrecognised(String::new()), 40143, 401);
        check(AuthError::InvalidJwt(String::new()), 40144, 401);
    }
}
