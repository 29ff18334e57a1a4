//! From what a client presents (query params, headers) to an [`AuthContext`], and the
//! clientId and capability rules applied to each operation.

use axum::http::HeaderMap;
use base64::Engine;
use tern_auth::{AuthContext, AuthError, Capability, ClientIdentity, Operation};
use tern_protocol::{code, flags, ErrorInfo};

use crate::revoke::Credentials;

/// Ably error for an authentication failure.
pub(crate) fn auth_error(err: AuthError) -> ErrorInfo {
    ErrorInfo::with_status(err.code(), err.status_code(), err.to_string())
}

/// Authenticates a key (`appId.keyId:secret`) or a token; a key wins if both are given.
/// A revoked token is refused (40141).
pub(crate) fn authenticate(
    keys: &Credentials,
    key: Option<&str>,
    token: Option<&str>,
    now_ms: i64,
) -> Result<AuthContext, ErrorInfo> {
    let result = match (key, token) {
        (Some(key), _) => keys.authenticate_key(key).map_err(auth_error),
        (None, Some(token)) => keys.authenticate_token(token, now_ms).map_err(auth_error),
        (None, None) => Err(ErrorInfo::new(
            code::INVALID_CREDENTIALS,
            "no credentials: supply key or access_token",
        )),
    };
    admit(keys, result, now_ms)
}

/// Every credential check ends here: a revoked token is refused (40141), and every
/// refusal is logged (rate-limited).
fn admit(
    keys: &Credentials,
    verified: Result<AuthContext, ErrorInfo>,
    now_ms: i64,
) -> Result<AuthContext, ErrorInfo> {
    let result = verified.and_then(|ctx| keys.revocations.check(&ctx, now_ms).map(|()| ctx));
    if let Err(err) = &result {
        crate::response::log_refusal("credential", err);
    }
    result
}

/// The identity a connection (or REST request) acts as, given what its credential allows
/// and the clientId it asked for. `*` and an empty request mean "none asked for".
pub(crate) fn resolve_identity(
    ctx: &AuthContext,
    requested: Option<&str>,
) -> Result<ClientIdentity, ErrorInfo> {
    let requested = requested.filter(|c| !c.is_empty() && *c != "*");
    match (&ctx.client_id, requested) {
        (identity, None) => Ok(identity.clone()),
        (ClientIdentity::Wildcard, Some(id)) => Ok(ClientIdentity::Id(id.to_string())),
        (ClientIdentity::Id(own), Some(id)) if own == id => Ok(ClientIdentity::Id(own.clone())),
        (_, Some(id)) => Err(ErrorInfo::new(
            code::INCOMPATIBLE_CREDENTIALS,
            format!("clientId '{id}' is incompatible with the credentials"),
        )),
    }
}

/// The clientId a published message carries, or an error if the identity forbids it.
pub(crate) fn message_client_id(
    identity: &ClientIdentity,
    given: Option<&str>,
) -> Result<Option<String>, ErrorInfo> {
    match (identity, given) {
        (ClientIdentity::Id(own), None) => Ok(Some(own.clone())),
        (ClientIdentity::Id(own), Some(id)) if own == id => Ok(Some(own.clone())),
        (ClientIdentity::Wildcard, Some(id)) => Ok(Some(id.to_string())),
        (_, None) => Ok(None),
        (_, Some(id)) => Err(ErrorInfo::new(
            code::INVALID_CLIENT_ID,
            format!("mismatched clientId '{id}' for this connection"),
        )),
    }
}

/// The clientId a presence change is for: presence always needs one (91000).
pub(crate) fn presence_client_id(
    identity: &ClientIdentity,
    given: Option<&str>,
) -> Result<String, ErrorInfo> {
    message_client_id(identity, given)?
        .ok_or_else(|| ErrorInfo::new(code::PRESENCE_NO_CLIENT_ID, "presence requires a clientId"))
}

/// The clientId sent in `connectionDetails`: a key without a clientId has none; a token
/// issued for any clientId reports the wildcard.
pub(crate) fn details_client_id(ctx: &AuthContext, identity: &ClientIdentity) -> Option<String> {
    match identity {
        ClientIdentity::Id(id) => Some(id.clone()),
        ClientIdentity::Wildcard if ctx.via_token => Some("*".into()),
        _ => None,
    }
}

/// Ably channel modes the capability grants on `channel` (ably.md §8).
pub(crate) fn granted_modes(capability: &Capability, channel: &str) -> u64 {
    let ops = capability.ops_for(channel);
    let mut modes = 0;
    if ops.contains(Operation::Publish) {
        modes |= flags::PUBLISH;
    }
    if ops.contains(Operation::Subscribe) {
        modes |= flags::SUBSCRIBE | flags::PRESENCE_SUBSCRIBE;
    }
    if ops.contains(Operation::Presence) {
        modes |= flags::PRESENCE;
    }
    // Granted as Ably grants it by default (ably-js lists it among a channel's modes).
    if ops.contains(Operation::AnnotationPublish) {
        modes |= flags::ANNOTATION_PUBLISH;
    }
    // Only when asked for (see `attach`): Ably delivers annotations to no one else.
    if ops.contains(Operation::AnnotationSubscribe) {
        modes |= flags::ANNOTATION_SUBSCRIBE;
    }
    modes
}

/// The modes named in a `modes` channel param (`"subscribe,presence_subscribe"`), as
/// ably-js sends them when modes are given as a param; `None` if a name is unknown.
pub(crate) fn parse_modes(names: &str) -> Option<u64> {
    names
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .try_fold(0, |modes, name| {
            let mode = match name {
                "presence" => flags::PRESENCE,
                "publish" => flags::PUBLISH,
                "subscribe" => flags::SUBSCRIBE,
                "presence_subscribe" => flags::PRESENCE_SUBSCRIBE,
                "annotation_publish" => flags::ANNOTATION_PUBLISH,
                "annotation_subscribe" => flags::ANNOTATION_SUBSCRIBE,
                "object_subscribe" => flags::OBJECT_SUBSCRIBE,
                "object_publish" => flags::OBJECT_PUBLISH,
                _ => return None,
            };
            Some(modes | mode)
        })
}

/// Refusal for an operation the capability does not allow.
pub(crate) fn denied(op: &str, channel: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::CAPABILITY_DENIED,
        format!("action '{op}' is not permitted on channel '{channel}'"),
    )
}

/// REST credentials: `Authorization: Basic base64(key)` or `Bearer base64(token)` (the
/// SDKs base64 the token; a raw token is accepted too), or `key` / `access_token` query
/// params. The `X-Ably-ClientId` header (base64) selects a clientId.
pub(crate) fn rest_auth(
    keys: &Credentials,
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
    now_ms: i64,
) -> Result<(AuthContext, ClientIdentity), ErrorInfo> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |s: &str| {
        b64.decode(s.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    };
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let ctx = match header.and_then(|h| h.split_once(' ')) {
        Some((scheme, value)) if scheme.eq_ignore_ascii_case("basic") => {
            let key = decode(value).ok_or_else(|| {
                ErrorInfo::new(code::INVALID_CREDENTIALS, "malformed Basic authorization")
            })?;
            authenticate(keys, Some(&key), None, now_ms)?
        }
        Some((scheme, value)) if scheme.eq_ignore_ascii_case("bearer") => {
            // The token's own refusal, not a guess at another reading of the header:
            // a JWT for an unknown app must answer 40400, not the 40143 of its base64.
            let verified = keys.authenticate_bearer(value, now_ms).map_err(auth_error);
            admit(keys, verified, now_ms)?
        }
        _ => {
            let token = query
                .get("access_token")
                .or_else(|| query.get("accessToken"));
            authenticate(
                keys,
                query.get("key").map(String::as_str),
                token.map(String::as_str),
                now_ms,
            )?
        }
    };
    // From here on the request is the app's, and counts in its statistics.
    crate::stats::note_request(&ctx.app_id, crate::stats::Request::Other);
    let requested = headers
        .get("x-ably-clientid")
        .and_then(|v| v.to_str().ok())
        .and_then(decode);
    let identity = resolve_identity(&ctx, requested.as_deref())?;
    Ok((ctx, identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;
    use tern_auth::{sign_jwt, ApiKey};

    const NOW_MS: i64 = 1_700_000_000_000;

    fn keys() -> Credentials {
        let ring = tern_auth::KeyRing::new(vec![ApiKey::from_key_string(
            "app.k:secret",
            Capability::all(),
        )
        .unwrap()]);
        let config = crate::config::EdgeConfig::default();
        let revocations = crate::revoke::Revocations::new(&config.revocation, &config.token_policy);
        Credentials {
            ring,
            revocations: std::sync::Arc::new(revocations),
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!(
            "Bearer {}",
            base64::engine::general_purpose::STANDARD.encode(token)
        );
        headers.insert("authorization", HeaderValue::from_str(&value).unwrap());
        headers
    }

    /// A Bearer JWT whose kid names an unknown app is refused with its own error
    /// (404/40400, which ably-js does not retry), not as an unreadable token.
    #[test]
    fn bearer_jwt_for_unknown_app_is_40400() {
        let stranger = ApiKey::from_key_string("invalid.invalid:x", Capability::all()).unwrap();
        let token = sign_jwt(&stranger, &json!({"exp": NOW_MS / 1000 + 60}));
        let err = rest_auth(&keys(), &bearer(&token), &Default::default(), NOW_MS).unwrap_err();
        assert_eq!((err.code, err.status_code), (40400, 404), "{}", err.message);
    }

    /// A Bearer JWT of a configured key authenticates, base64 as the SDKs send it.
    #[test]
    fn bearer_jwt_authenticates() {
        let key = keys().keys().next().unwrap().clone();
        let token = sign_jwt(
            &key,
            &json!({"exp": NOW_MS / 1000 + 60, "x-ably-clientId": "ann"}),
        );
        let (ctx, identity) =
            rest_auth(&keys(), &bearer(&token), &Default::default(), NOW_MS).unwrap();
        assert_eq!(ctx.app_id, "app");
        assert_eq!(identity, ClientIdentity::Id("ann".to_owned()));
    }
}
