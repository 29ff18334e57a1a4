//! `ErrorInfo`, and the one table of Ably error codes used by all of Tern.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::integer;

/// An Ably error as it travels on the wire (spec TI1):
/// `{"code":int,"statusCode":int,"message":string,"href"?:string}`.
///
/// ably-js throws while decoding an ErrorInfo whose `message` is not a string or whose codes
/// are not numbers, and then drops the whole frame; these field types make that impossible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorInfo {
    /// Ably error code, one of [`code`].
    #[serde(deserialize_with = "integer::required")]
    pub code: u32,
    /// The HTTP status that goes with `code`; see [`status_code_for`].
    #[serde(default, deserialize_with = "integer::required")]
    pub status_code: u16,
    /// Human-readable description.
    #[serde(default)]
    pub message: String,
    /// Link to the help page for `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
}

impl ErrorInfo {
    /// An error with the status code from [`status_code_for`] and the standard help link.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self::with_status(code, status_code_for(code), message)
    }

    /// An error with an explicit status code, for the few places that must differ from the
    /// table (for example relaying a status another component chose).
    pub fn with_status(code: u32, status_code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            status_code,
            message: message.into(),
            href: Some(format!("https://help.ably.io/error/{code}")),
        }
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {}, status {})",
            self.message, self.code, self.status_code
        )
    }
}

impl std::error::Error for ErrorInfo {}

/// Ably error codes Tern sends (names follow ably-common `protocol/errors.json`).
pub mod code {
    /// Bad request.
    pub const BAD_REQUEST: u32 = 40000;
    /// The request body could not be parsed.
    pub const INVALID_REQUEST_BODY: u32 = 40001;
    /// A parameter had an invalid value.
    pub const INVALID_PARAMETER_VALUE: u32 = 40003;
    /// A REST message's `connectionKey` names no connection (publish on behalf, TM2h).
    pub const INVALID_PUBLISH_CONNECTION_KEY: u32 = 40006;
    /// A message exceeded `maxMessageSize`.
    pub const MESSAGE_TOO_LARGE: u32 = 40009;
    /// Invalid channel name.
    pub const INVALID_CHANNEL_NAME: u32 = 40010;
    /// A batch request succeeded only in part (its body lists each outcome).
    pub const BATCH_PARTIAL_SUCCESS: u32 = 40020;
    /// Invalid or mismatched clientId.
    pub const INVALID_CLIENT_ID: u32 = 40012;
    /// Invalid message data or encoding.
    pub const INVALID_MESSAGE_DATA: u32 = 40013;
    /// Invalid credentials.
    pub const INVALID_CREDENTIALS: u32 = 40101;
    /// Credentials and clientId are incompatible.
    pub const INCOMPATIBLE_CREDENTIALS: u32 = 40102;
    /// Basic auth over a non-TLS transport.
    pub const INSECURE_BASIC_AUTH: u32 = 40103;
    /// Token request timestamp outside the permitted window.
    pub const TIMESTAMP_NOT_CURRENT: u32 = 40104;
    /// Token request nonce already used.
    pub const NONCE_REPLAYED: u32 = 40105;
    /// No means of authentication was provided.
    pub const NO_AUTH_METHOD: u32 = 40106;
    /// The key name is not recognised.
    pub const KEY_NOT_RECOGNISED: u32 = 40130;
    /// The key has been revoked.
    pub const KEY_REVOKED: u32 = 40131;
    /// Token error; 40140..=40149 all tell the SDK to renew its token.
    pub const TOKEN_ERROR: u32 = 40140;
    /// The token has been revoked.
    pub const TOKEN_REVOKED: u32 = 40141;
    /// The token has expired.
    pub const TOKEN_EXPIRED: u32 = 40142;
    /// The token is not recognised.
    pub const TOKEN_UNRECOGNISED: u32 = 40143;
    /// The JWT is invalid.
    pub const INVALID_JWT: u32 = 40144;
    /// The operation is not permitted by the capability.
    pub const CAPABILITY_DENIED: u32 = 40160;
    /// The operation needs an identified client.
    pub const CLIENT_ID_REQUIRED: u32 = 40161;
    /// Token revocation needs basic auth with the key itself, not a token.
    pub const REVOCATION_NEEDS_BASIC_AUTH: u32 = 40162;
    /// The operation needs a channel mode the attachment did not ask for (for example
    /// publishing on a channel attached with `modes: ['subscribe']`).
    pub const CHANNEL_MODE_DENIED: u32 = 40165;
    /// The auth callback or authUrl failed (client side; listed for completeness).
    pub const AUTH_CALLBACK_FAILED: u32 = 40170;
    /// The token cannot be renewed (client side; listed for completeness).
    pub const TOKEN_NOT_RENEWABLE: u32 = 40171;
    /// Forbidden.
    pub const FORBIDDEN: u32 = 40300;
    /// Not found.
    pub const NOT_FOUND: u32 = 40400;
    /// Method not allowed.
    pub const METHOD_NOT_ALLOWED: u32 = 40500;
    /// Rate limit exceeded; the request was rejected.
    pub const RATE_LIMIT: u32 = 42910;
    /// Hard rate limit exceeded.
    pub const RATE_LIMIT_HARD: u32 = 42911;
    /// Internal error.
    pub const INTERNAL: u32 = 50000;
    /// Internal channel error.
    pub const CHANNEL_INTERNAL: u32 = 50001;
    /// Internal connection error.
    pub const CONNECTION_INTERNAL: u32 = 50002;
    /// Timeout inside the server.
    pub const TIMEOUT: u32 = 50003;
    /// Connection failed.
    pub const CONNECTION_FAILED: u32 = 80000;
    /// Connection suspended.
    pub const CONNECTION_SUSPENDED: u32 = 80002;
    /// Connection disconnected.
    pub const DISCONNECTED: u32 = 80003;
    /// Messages expired; continuity lost.
    pub const MESSAGES_EXPIRED: u32 = 80006;
    /// Unable to recover or resume the connection.
    pub const UNABLE_TO_RECOVER: u32 = 80008;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u32 = 80013;
    /// Connection timed out.
    pub const CONNECTION_TIMED_OUT: u32 = 80014;
    /// Connection superseded by another with the same key.
    pub const CONNECTION_SUPERSEDED: u32 = 80016;
    /// Connection closed.
    pub const CONNECTION_CLOSED: u32 = 80017;
    /// Invalid connection key.
    pub const INVALID_CONNECTION_KEY: u32 = 80018;
    /// Token request failed.
    pub const TOKEN_REQUEST_FAILED: u32 = 80019;
    /// The subscriber could not keep up and was dropped.
    pub const SUBSCRIBER_TOO_SLOW: u32 = 80020;
    /// No such connection (`/connections/{id}`: closed, expired, or its node is gone).
    /// Sent with 404: it is a REST resource that does not exist.
    pub const CONNECTION_NOT_FOUND: u32 = 80022;
    /// Channel operation failed.
    pub const CHANNEL_OPERATION_FAILED: u32 = 90000;
    /// Channel is in an invalid state (for example detached).
    pub const CHANNEL_INVALID_STATE: u32 = 90001;
    /// Channel continuity is not guaranteed.
    pub const CHANNEL_CONTINUITY_LOST: u32 = 90003;
    /// Requested backlog is too large.
    pub const BACKLOG_TOO_LARGE: u32 = 90004;
    /// Presence operation without a clientId.
    pub const PRESENCE_NO_CLIENT_ID: u32 = 91000;
    /// Presence operation in the wrong channel state.
    pub const PRESENCE_WRONG_STATE: u32 = 91001;
    /// Too many presence members on the channel.
    pub const TOO_MANY_PRESENCE_MEMBERS: u32 = 91003;
}

/// The HTTP status that goes with an Ably error code.
///
/// This is the one place that decides it. Ably codes from 40000 to 59999 are the HTTP status
/// times 100 plus a detail (40160 → 401, 42910 → 429), so the status is `code / 100`, with
/// one exception: 50003 (timeout) is 504. Connection, channel and presence codes (8xxxx,
/// 9xxxx) have no HTTP equivalent and Ably sends them with 400, which also keeps SDKs from
/// treating them as "server unavailable, try a fallback host" (which they do for 500..=504).
/// The exception there is 80019 (token request failed), which ably-js reports as 401.
/// Anything else is an unknown failure: 500.
pub fn status_code_for(code: u32) -> u16 {
    match code {
        code::TIMEOUT => 504,
        code::TOKEN_REQUEST_FAILED => 401,
        code::CONNECTION_NOT_FOUND => 404,
        // At most 599, so the cast is lossless.
        40_000..=59_999 => (code / 100) as u16,
        80_000..=99_999 => 400,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ErrorInfo serializes with exactly the four fields ably-js expects, numbers as numbers.
    #[test]
    fn error_info_wire_shape() {
        let error = ErrorInfo::new(code::CAPABILITY_DENIED, "denied");
        let json = serde_json::to_string(&error).unwrap();
        assert_eq!(
            json,
            r#"{"code":40160,"statusCode":401,"message":"denied","href":"https://help.ably.io/error/40160"}"#
        );
    }

    /// An ErrorInfo without href omits the key instead of sending null.
    #[test]
    fn error_info_without_href() {
        let error = ErrorInfo {
            href: None,
            ..ErrorInfo::new(code::UNABLE_TO_RECOVER, "x")
        };
        let json = serde_json::to_string(&error).unwrap();
        assert_eq!(json, r#"{"code":80008,"statusCode":400,"message":"x"}"#);
    }

    /// A partial ErrorInfo from a peer decodes, extra fields are ignored.
    #[test]
    fn error_info_lenient_decode() {
        let error: ErrorInfo =
            serde_json::from_str(r#"{"code":40142,"message":"expired","detail":{"a":"b"}}"#)
                .unwrap();
        assert_eq!(error.code, 40142);
        assert_eq!(error.status_code, 0);
        assert_eq!(error.message, "expired");
    }

    fn check(code: u32, expected: u16) {
        assert_eq!(status_code_for(code), expected, "code {code}");
    }

    /// The status table maps each family of codes to the status Ably uses.
    #[test]
    fn status_codes() {
        check(code::BAD_REQUEST, 400);
        check(code::INVALID_PARAMETER_VALUE, 400);
        check(code::INVALID_CREDENTIALS, 401);
        check(code::TOKEN_EXPIRED, 401);
        check(code::CAPABILITY_DENIED, 401);
        check(code::FORBIDDEN, 403);
        check(code::NOT_FOUND, 404);
        check(code::METHOD_NOT_ALLOWED, 405);
        check(code::RATE_LIMIT, 429);
        check(code::RATE_LIMIT_HARD, 429);
        check(code::INTERNAL, 500);
        check(code::CHANNEL_INTERNAL, 500);
        check(code::TIMEOUT, 504);
        check(code::CONNECTION_FAILED, 400);
        check(code::MESSAGES_EXPIRED, 400);
        check(code::UNABLE_TO_RECOVER, 400);
        check(code::INVALID_CONNECTION_KEY, 400);
        check(code::TOKEN_REQUEST_FAILED, 401);
        check(code::CHANNEL_INVALID_STATE, 400);
        check(code::PRESENCE_NO_CLIENT_ID, 400);
        check(10_000, 500);
        check(u32::MAX, 500);
    }
}
