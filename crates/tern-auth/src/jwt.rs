//! Ably JWTs, HS256 only: header `{"alg":"HS256","typ":"JWT","kid":"<keyName>"}`,
//! claims `iat` and `exp` (seconds), `x-ably-capability` (capability JSON text)
//! and optionally `x-ably-clientId`, signed with the named key's secret.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::key::{ApiKey, AuthContext, ClientIdentity, KeyRing, TokenPolicy};
use crate::signature::{hmac_sha256, hmac_sha256_verify, URL_SAFE};
use crate::{AuthError, Capability};

/// The claim holding the capability, as JSON text.
pub(crate) const CAPABILITY_CLAIM: &str = "x-ably-capability";
/// The claim holding the clientId.
pub(crate) const CLIENT_ID_CLAIM: &str = "x-ably-clientId";
/// The claim naming the token's revocation key (token revocation by `revocationKey:`).
pub(crate) const REVOCATION_KEY_CLAIM: &str = "x-ably-revocation-key";

/// Signs `claims` as an HS256 JWT under `key`, with `kid` set to the key name.
/// For tests and tooling: the claims are taken as given.
pub fn sign_jwt(key: &ApiKey, claims: &Value) -> String {
    let mut header = Map::new();
    header.insert("alg".to_owned(), "HS256".into());
    header.insert("typ".to_owned(), "JWT".into());
    header.insert("kid".to_owned(), key.name().into());
    // `Display` for a JSON value is infallible, unlike `serde_json::to_string`.
    let signing_input = format!(
        "{}.{}",
        URL_SAFE.encode(Value::Object(header).to_string()),
        URL_SAFE.encode(claims.to_string())
    );
    let signature = hmac_sha256(key.secret.as_bytes(), signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE.encode(signature))
}

/// Verifies a JWT; see [`KeyRing::authenticate_token`].
///
/// Checks, in order: three parts; a header with `alg` `HS256` and a `kid` naming
/// a configured key; the signature, in constant time; then claims: `exp`
/// (seconds) after `now_ms`, else [`AuthError::TokenExpired`]; `iat` and `nbf`,
/// if present, numbers no later than `now_ms` plus the policy's `clock_skew_ms`;
/// and a lifetime (see [`TokenPolicy::lifetime_allowed`]) within the policy's
/// `ttl_max_ms`. A missing capability claim means the key's capability. Every
/// other failure is [`AuthError::InvalidJwt`] (40144: in the token-error range,
/// so an SDK gets one fresh token from its auth callback before giving up).
pub(crate) fn verify(ring: &KeyRing, token: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
    let invalid = |why: &str| AuthError::InvalidJwt(why.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("a JWT has three parts"));
    };
    let header = decode_object(header).ok_or_else(|| invalid("malformed header"))?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(invalid("only HS256 is supported"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("header has no kid"))?;
    let key = ring
        .get(kid)
        .ok_or_else(|| invalid("kid names no known key"))?;

    let signing_input = &token[..header_and_claims_len(token)];
    let signature_ok = URL_SAFE
        .decode(signature)
        .is_ok_and(|tag| hmac_sha256_verify(key.secret.as_bytes(), signing_input.as_bytes(), &tag));
    if !signature_ok {
        return Err(invalid("signature does not verify"));
    }

    let claims = decode_object(claims).ok_or_else(|| invalid("malformed claims"))?;
    let expires_ms = time_claim(&claims, "exp")?.ok_or_else(|| invalid("missing exp claim"))?;
    if expires_ms <= now_ms {
        return Err(AuthError::TokenExpired);
    }
    let issued_ms = time_claim(&claims, "iat")?;
    check_times(
        ring.policy(),
        issued_ms,
        time_claim(&claims, "nbf")?,
        expires_ms,
        now_ms,
    )?;
    let capability = capability_claim(key, claims.get(CAPABILITY_CLAIM))?;
    let client_id = match claims.get(CLIENT_ID_CLAIM) {
        None | Some(Value::Null) => ClientIdentity::Anonymous,
        Some(Value::String(id)) => ClientIdentity::from_claim(Some(id)),
        Some(_) => return Err(invalid("clientId claim is not a string")),
    };
    Ok(AuthContext {
        app_id: key.app_id.clone(),
        key_name: key.name(),
        client_id,
        capability: key.capability.intersect(&capability),
        expires_ms: Some(expires_ms),
        via_token: true,
        issued_ms,
        revocation_key: claims
            .get(REVOCATION_KEY_CLAIM)
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// The time claims of an unexpired JWT against `policy`: `iat` and `nbf` no
/// later than the allowed clock skew ahead of `now_ms`, and a lifetime within
/// `ttl_max_ms`.
fn check_times(
    policy: &TokenPolicy,
    issued_ms: Option<i64>,
    not_before_ms: Option<i64>,
    expires_ms: i64,
    now_ms: i64,
) -> Result<(), AuthError> {
    let invalid = |why: String| Err(AuthError::InvalidJwt(why));
    let latest_ms = now_ms.saturating_add(policy.clock_skew_ms);
    if issued_ms.is_some_and(|issued_ms| issued_ms > latest_ms) {
        return invalid("issued in the future (iat)".to_owned());
    }
    if not_before_ms.is_some_and(|not_before_ms| not_before_ms > latest_ms) {
        return invalid("not yet valid (nbf)".to_owned());
    }
    if !policy.lifetime_allowed(issued_ms, expires_ms, now_ms) {
        return invalid(format!(
            "lifetime (exp - iat) over the maximum of {} ms",
            policy.ttl_max_ms
        ));
    }
    Ok(())
}

/// A NumericDate claim (seconds, possibly fractional) in ms: `None` when absent
/// or null; anything but a number is [`AuthError::InvalidJwt`].
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .map(|seconds| Some(seconds_to_ms(seconds)))
            .ok_or_else(|| AuthError::InvalidJwt(format!("{name} claim is not a number"))),
    }
}

/// Length of `header.claims`, the signed part of a three-part token.
fn header_and_claims_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

/// The capability a JWT grants: the claim's JSON text (or, leniently, a JSON
/// object), or the key's own capability when the claim is absent.
fn capability_claim(key: &ApiKey, claim: Option<&Value>) -> Result<Capability, AuthError> {
    let invalid = |why: String| AuthError::InvalidJwt(format!("capability claim: {why}"));
    match claim {
        None | Some(Value::Null) => Ok(key.capability.clone()),
        Some(Value::String(text)) => {
            Capability::parse(text).map_err(|err| invalid(err.to_string()))
        }
        Some(object @ Value::Object(_)) => {
            Capability::parse(&object.to_string()).map_err(|err| invalid(err.to_string()))
        }
        Some(_) => Err(invalid("not a string".to_owned())),
    }
}

fn decode_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds (possibly fractional) to milliseconds, saturating; NaN becomes 0.
fn seconds_to_ms(seconds: f64) -> i64 {
    // `as` from float saturates at the integer bounds and maps NaN to 0.
    (seconds * 1000.0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operation;
    use serde_json::json;

    const NOW_MS: i64 = 1_700_000_000_000;
    const NOW_S: i64 = NOW_MS / 1000;

    fn key() -> ApiKey {
        ApiKey::from_key_string(
            "app.jwt:jwtsecret",
            Capability::parse(r#"{"chat:*":["*"],"news":["subscribe"]}"#).unwrap(),
        )
        .unwrap()
    }

    fn ring() -> KeyRing {
        KeyRing::new(vec![key()])
    }

    /// A well-formed HS256 JWT authenticates with its clientId and capability.
    #[test]
    fn happy() {
        let token = sign_jwt(
            &key(),
            &json!({
                "iat": NOW_S,
                "exp": NOW_S + 3600,
                "x-ably-capability": r#"{"chat:*":["publish"]}"#,
                "x-ably-clientId": "carol",
            }),
        );
        let ctx = ring().authenticate_token(&token, NOW_MS).unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("carol".to_owned()));
        assert_eq!(ctx.key_name, "app.jwt");
        assert_eq!(ctx.expires_ms, Some((NOW_S + 3600) * 1000));
        assert!(ctx.via_token);
        assert!(ctx.allows("chat:a", Operation::Publish));
        assert!(!ctx.allows("chat:a", Operation::Subscribe));
    }

    /// Without a capability claim the key's capability applies; the claim is
    /// always narrowed by the key.
    #[test]
    fn capability_defaults_and_narrows() {
        let token = sign_jwt(&key(), &json!({"exp": NOW_S + 60}));
        let ctx = ring().authenticate_token(&token, NOW_MS).unwrap();
        assert_eq!(ctx.capability, key().capability);
        assert_eq!(ctx.client_id, ClientIdentity::Anonymous);

        let token = sign_jwt(
            &key(),
            &json!({"exp": NOW_S + 60, "x-ably-capability": r#"{"*":["*"]}"#}),
        );
        let ctx = ring().authenticate_token(&token, NOW_MS).unwrap();
        assert_eq!(ctx.capability, key().capability);
    }

    /// `exp` at or before now gives 40142.
    #[test]
    fn expired() {
        let token = sign_jwt(&key(), &json!({"iat": NOW_S - 120, "exp": NOW_S}));
        let err = ring().authenticate_token(&token, NOW_MS).unwrap_err();
        assert_eq!(err.code(), 40142);
    }

    /// A signature under another secret gives 40144.
    #[test]
    fn bad_signature() {
        let mut impostor = key();
        impostor.secret = "guess".to_owned();
        let token = sign_jwt(&impostor, &json!({"exp": NOW_S + 60}));
        let err = ring().authenticate_token(&token, NOW_MS).unwrap_err();
        assert_eq!(err.code(), 40144);
    }

    /// A `kid` naming no configured key gives 40144.
    #[test]
    fn unknown_kid() {
        let stranger = ApiKey::from_key_string("app.other:jwtsecret", Capability::all()).unwrap();
        let token = sign_jwt(&stranger, &json!({"exp": NOW_S + 60}));
        let err = ring().authenticate_token(&token, NOW_MS).unwrap_err();
        assert_eq!(err.code(), 40144);
    }

    /// Other algorithms, malformed parts and bad claims are all 40144.
    #[test]
    fn malformed() {
        let good = sign_jwt(&key(), &json!({"exp": NOW_S + 60}));
        let (_, rest) = good.split_once('.').unwrap();
        let none_alg = format!(
            "{}.{rest}",
            URL_SAFE.encode(r#"{"alg":"none","kid":"app.jwt"}"#)
        );
        let no_exp = sign_jwt(&key(), &json!({"iat": NOW_S}));
        let future = sign_jwt(&key(), &json!({"exp": NOW_S + 60, "nbf": NOW_S + 31}));
        let bad_cap = sign_jwt(
            &key(),
            &json!({"exp": NOW_S + 60, "x-ably-capability": "{nope"}),
        );
        let bad_client = sign_jwt(&key(), &json!({"exp": NOW_S + 60, "x-ably-clientId": 7}));
        for bad in [
            none_alg,
            no_exp,
            future,
            bad_cap,
            bad_client,
            "a.b.c".to_owned(),
        ] {
            let err = ring().authenticate_token(&bad, NOW_MS).unwrap_err();
            assert_eq!(err.code(), 40144, "{bad}: {err}");
        }
    }

    fn code_at(claims: Value, ring: &KeyRing) -> Result<(), u32> {
        ring.authenticate_token(&sign_jwt(&key(), &claims), NOW_MS)
            .map(|_| ())
            .map_err(|err| err.code())
    }

    /// A JWT may live at most `ttl_max_ms` (from `iat`, or from now without one):
    /// longer, or an absurd `exp` such as 1e300, is 40144 and never overflows.
    #[test]
    fn lifetime_is_bounded() {
        let ring = ring();
        let max_s = TokenPolicy::default().ttl_max_ms / 1000;
        assert_eq!(
            code_at(json!({"iat": NOW_S, "exp": NOW_S + max_s}), &ring),
            Ok(())
        );
        assert_eq!(code_at(json!({"exp": NOW_S + max_s}), &ring), Ok(()));
        // Signed by a clock 20 s ahead of ours with the whole allowance: accepted.
        assert_eq!(
            code_at(json!({"iat": NOW_S + 20, "exp": NOW_S + 20 + max_s}), &ring),
            Ok(())
        );
        for too_long in [
            json!({"iat": NOW_S, "exp": NOW_S + max_s + 1}),
            json!({"exp": NOW_S + max_s + 1}),
            json!({"exp": 1e300}),
            json!({"iat": NOW_S, "exp": 1e300}),
            json!({"iat": -1e300, "exp": NOW_S + 60}),
            // Issued two days ago: refused even though it expires in a minute.
            json!({"iat": NOW_S - 2 * max_s, "exp": NOW_S + 60}),
            // An iat ahead of our clock (within the skew) cannot stretch the allowance.
            json!({"iat": NOW_S + 20, "exp": NOW_S + 20 + max_s + 1}),
        ] {
            assert_eq!(code_at(too_long.clone(), &ring), Err(40144), "{too_long}");
        }
        let strict = ring.clone().with_policy(TokenPolicy {
            ttl_max_ms: 60_000,
            ..TokenPolicy::default()
        });
        assert_eq!(code_at(json!({"exp": NOW_S + 60}), &strict), Ok(()));
        assert_eq!(code_at(json!({"exp": NOW_S + 61}), &strict), Err(40144));
    }

    /// `nbf` and `iat` may be ahead of our clock by the policy's skew, no more.
    #[test]
    fn clock_skew_allowance() {
        let ring = ring();
        let skew_s = TokenPolicy::default().clock_skew_ms / 1000;
        for ok in [
            json!({"exp": NOW_S + 60, "nbf": NOW_S + skew_s}),
            json!({"exp": NOW_S + 60, "nbf": NOW_S + 5, "iat": NOW_S + 5}),
            json!({"exp": NOW_S + 60, "iat": NOW_S + skew_s}),
        ] {
            assert_eq!(code_at(ok.clone(), &ring), Ok(()), "{ok}");
        }
        for bad in [
            json!({"exp": NOW_S + 60, "nbf": NOW_S + skew_s + 1}),
            json!({"exp": NOW_S + 60, "iat": NOW_S + skew_s + 1}),
            json!({"exp": NOW_S + 60, "iat": "yesterday"}),
            json!({"exp": NOW_S + 60, "nbf": [1]}),
            json!({"exp": "tomorrow"}),
        ] {
            assert_eq!(code_at(bad.clone(), &ring), Err(40144), "{bad}");
        }
        let exact = ring.with_policy(TokenPolicy {
            clock_skew_ms: 0,
            ..TokenPolicy::default()
        });
        assert_eq!(
            code_at(json!({"exp": NOW_S + 60, "nbf": NOW_S + 1}), &exact),
            Err(40144)
        );
    }
}
