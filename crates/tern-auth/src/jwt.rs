//! Ably JWTs, in three forms:
//!
//! - **Plain**: HS256, header `{"alg":"HS256","typ":"JWT","kid":"<keyName>"}`, claims
//!   `iat` and `exp` (seconds), `x-ably-capability` (capability JSON text) and
//!   optionally `x-ably-clientId`, signed with the named key's secret.
//! - **Embedded token**: a JWT from another issuer carrying an Ably-compatible token (a
//!   Tern token or a plain Ably JWT) as `x-ably-token`, in its JOSE header or, failing
//!   that, its claims. The outer signature is the issuer's, whose secret Tern (like
//!   Ably) does not hold, so it is not checked: all authority (app, capability,
//!   clientId) comes from the inner token, which is verified in full. The outer `exp`,
//!   if any, must not be past, and (unencrypted) not later than the inner token's
//!   expiry, as Ably requires; the credential expires at the earlier of the two.
//! - **Encrypted**: a compact JWE (`alg` `dir`, `enc` `A256GCM`, `kid` naming a key,
//!   `cty` `JWT` if given) whose content key is SHA-256 of the key's secret and whose
//!   plaintext is a JWT of either form above. The AEAD tag authenticates it.
//!
//! Nesting stops there: an inner token is never itself embedded or encrypted.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::key::{ApiKey, AuthContext, ClientIdentity, KeyRing, TokenPolicy};
use crate::signature::{hmac_sha256, hmac_sha256_verify, URL_SAFE};
use crate::{AuthError, Capability};

/// The claim holding the capability, as JSON text.
pub(crate) const CAPABILITY_CLAIM: &str = "x-ably-capability";
/// The claim holding the clientId.
pub(crate) const CLIENT_ID_CLAIM: &str = "x-ably-clientId";
/// The claim naming the token's revocation key (token revocation by `revocationKey:`).
pub(crate) const REVOCATION_KEY_CLAIM: &str = "x-ably-revocation-key";
/// The JOSE header field (or claim) holding an embedded Ably-compatible token.
pub(crate) const EMBEDDED_TOKEN_FIELD: &str = "x-ably-token";
/// Bytes in an AES-GCM authentication tag.
const GCM_TAG_LEN: usize = 16;

/// Signs `claims` as an HS256 JWT under `key`, with `kid` set to the key name.
/// For tests and tooling: the claims are taken as given.
pub fn sign_jwt(key: &ApiKey, claims: &Value) -> String {
    let mut header = Map::new();
    header.insert("alg".to_owned(), "HS256".into());
    header.insert("typ".to_owned(), "JWT".into());
    header.insert("kid".to_owned(), key.name().into());
    sign_with_header(key.secret.as_bytes(), header, claims)
}

/// An HS256 JWT of `header` and `claims` under `secret`.
fn sign_with_header(secret: &[u8], header: Map<String, Value>, claims: &Value) -> String {
    // `Display` for a JSON value is infallible, unlike `serde_json::to_string`.
    let signing_input = format!(
        "{}.{}",
        URL_SAFE.encode(Value::Object(header).to_string()),
        URL_SAFE.encode(claims.to_string())
    );
    let signature = hmac_sha256(secret, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE.encode(signature))
}

/// Whether the outer JWT was encrypted: its `exp` then need not precede the inner
/// token's expiry (Ably's rule, for what it does not cover, is for unencrypted JWTs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sealed {
    Encrypted,
    Clear,
}

/// Whether an `x-ably-token` may be followed: only at the outermost level.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nesting {
    Outer,
    Inner,
}

/// Verifies a JWT of any of the forms in the module doc; see
/// [`KeyRing::authenticate_token`].
///
/// A plain JWT is checked, in order: three parts; a header with `alg` `HS256` and
/// a `kid` naming a configured key (an app not configured here is
/// [`AuthError::AppNotFound`], 40400, as Ably answers); the signature, in constant
/// time; then claims: `exp` (seconds) after `now_ms`, else
/// [`AuthError::TokenExpired`]; `iat` and `nbf`, if present, numbers no later than
/// `now_ms` plus the policy's `clock_skew_ms`; and a lifetime (see
/// [`TokenPolicy::lifetime_allowed`]) within the policy's `ttl_max_ms`. A missing
/// capability claim means the key's capability. Every other failure is
/// [`AuthError::InvalidJwt`] (40144: in the token-error range, so an SDK gets one
/// fresh token from its auth callback before giving up).
pub(crate) fn verify(ring: &KeyRing, token: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
    match token.split('.').count() {
        5 => verify_encrypted(ring, token, now_ms),
        3 => verify_signed(ring, token, now_ms, Sealed::Clear, Nesting::Outer),
        _ => Err(AuthError::InvalidJwt(
            "a JWT has three parts (five when encrypted)".to_owned(),
        )),
    }
}

/// A three-part JWT: an embedded-token JWT if it carries `x-ably-token` (and
/// `nesting` allows it), else a plain Ably JWT.
fn verify_signed(
    ring: &KeyRing,
    token: &str,
    now_ms: i64,
    sealed: Sealed,
    nesting: Nesting,
) -> Result<AuthContext, AuthError> {
    let invalid = |why: &str| AuthError::InvalidJwt(why.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("a JWT has three parts"));
    };
    let header = decode_object(header).ok_or_else(|| invalid("malformed header"))?;
    let claims_text = claims;
    let embedded = match header.get(EMBEDDED_TOKEN_FIELD) {
        Some(value) => Some(value.clone()),
        None => {
            decode_object(claims_text).and_then(|claims| claims.get(EMBEDDED_TOKEN_FIELD).cloned())
        }
    };
    match (embedded, nesting) {
        (Some(Value::String(inner)), Nesting::Outer) => {
            let claims = decode_object(claims_text).ok_or_else(|| invalid("malformed claims"))?;
            verify_embedded(ring, &claims, &inner, now_ms, sealed)
        }
        (Some(_), Nesting::Outer) => Err(invalid("x-ably-token is not a string")),
        (Some(_), Nesting::Inner) => Err(invalid("an embedded token may not embed another")),
        (None, _) => verify_plain(ring, token, &header, claims_text, signature, now_ms),
    }
}

/// A plain Ably JWT (header already decoded): `kid`, signature, then claims.
fn verify_plain(
    ring: &KeyRing,
    token: &str,
    header: &Map<String, Value>,
    claims: &str,
    signature: &str,
    now_ms: i64,
) -> Result<AuthContext, AuthError> {
    let invalid = |why: &str| AuthError::InvalidJwt(why.to_owned());
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(invalid("only HS256 is supported"));
    }
    let key = key_for_kid(ring, header)?;
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

/// The configured key a JOSE header's `kid` names. A kid whose app is not configured
/// here is [`AuthError::AppNotFound`]; a missing kid, or an unknown key of a known
/// app, is [`AuthError::InvalidJwt`].
fn key_for_kid<'r>(
    ring: &'r KeyRing,
    header: &Map<String, Value>,
) -> Result<&'r ApiKey, AuthError> {
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::InvalidJwt("header has no kid".to_owned()))?;
    if let Some(key) = ring.get(kid) {
        return Ok(key);
    }
    let app_id = kid.split_once('.').map_or(kid, |(app_id, _)| app_id);
    if ring.keys().any(|key| key.app_id == app_id) {
        Err(AuthError::InvalidJwt("kid names no known key".to_owned()))
    } else {
        Err(AuthError::AppNotFound(format!("no app '{app_id}' here")))
    }
}

/// An embedded-token JWT whose claims are `claims`: the inner token verified in full,
/// the outer `exp` checked against now and (unless `sealed`) the inner expiry.
fn verify_embedded(
    ring: &KeyRing,
    claims: &Map<String, Value>,
    inner: &str,
    now_ms: i64,
    sealed: Sealed,
) -> Result<AuthContext, AuthError> {
    let mut ctx = verify_inner(ring, inner, now_ms)?;
    let Some(outer_expires_ms) = time_claim(claims, "exp")? else {
        return Ok(ctx);
    };
    if outer_expires_ms <= now_ms {
        return Err(AuthError::TokenExpired);
    }
    let inner_expires_ms = ctx.expires_ms.unwrap_or(i64::MAX);
    if sealed == Sealed::Clear && outer_expires_ms > inner_expires_ms {
        return Err(AuthError::InvalidJwt(
            "the JWT expires after the token it embeds".to_owned(),
        ));
    }
    ctx.expires_ms = Some(outer_expires_ms.min(inner_expires_ms));
    Ok(ctx)
}

/// The token an embedded-token JWT carries: a Tern token or a plain Ably JWT.
fn verify_inner(ring: &KeyRing, inner: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
    if inner.starts_with(crate::token::TOKEN_PREFIX) {
        crate::token::verify(ring, inner, now_ms)
    } else {
        verify_signed(ring, inner, now_ms, Sealed::Clear, Nesting::Inner)
    }
}

/// A compact JWE (five parts): decrypted with the `kid` key's content key, then its
/// plaintext verified as a three-part JWT that may embed a token.
fn verify_encrypted(ring: &KeyRing, token: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
    let invalid = |why: &str| AuthError::InvalidJwt(why.to_owned());
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, encrypted_key, iv, ciphertext, tag] = parts[..] else {
        return Err(invalid("an encrypted JWT has five parts"));
    };
    let header = decode_object(header_b64).ok_or_else(|| invalid("malformed JWE header"))?;
    let field = |name: &str| header.get(name).and_then(Value::as_str);
    if field("alg") != Some("dir") || field("enc") != Some("A256GCM") {
        return Err(invalid(
            "an encrypted JWT must use alg dir with enc A256GCM",
        ));
    }
    if header.get("cty").is_some_and(|cty| {
        !cty.as_str()
            .is_some_and(|cty| cty.eq_ignore_ascii_case("JWT"))
    }) {
        return Err(invalid("an encrypted JWT must contain a JWT (cty)"));
    }
    if !encrypted_key.is_empty() {
        return Err(invalid("alg dir carries no encrypted key"));
    }
    let key = key_for_kid(ring, &header)?;
    let iv = URL_SAFE
        .decode(iv)
        .map_err(|_| invalid("malformed JWE iv"))?;
    let nonce =
        Nonce::try_assume_unique_for_key(&iv).map_err(|_| invalid("JWE iv is not 96 bits"))?;
    let mut sealed = URL_SAFE
        .decode(ciphertext)
        .map_err(|_| invalid("malformed JWE ciphertext"))?;
    let tag = URL_SAFE
        .decode(tag)
        .map_err(|_| invalid("malformed JWE tag"))?;
    if tag.len() != GCM_TAG_LEN {
        return Err(invalid("JWE tag is not 128 bits"));
    }
    sealed.extend_from_slice(&tag);
    let plaintext = content_key(&key.secret)
        .ok_or_else(|| invalid("no content key"))?
        .open_in_place(nonce, Aad::from(header_b64.as_bytes()), &mut sealed)
        .map_err(|_| invalid("JWE does not decrypt under the kid key"))?;
    let inner = std::str::from_utf8(plaintext).map_err(|_| invalid("JWE content is not text"))?;
    if inner.split('.').count() != 3 {
        return Err(invalid("JWE content is not a signed JWT"));
    }
    verify_signed(ring, inner, now_ms, Sealed::Encrypted, Nesting::Outer)
}

/// The AES-256-GCM key of an encrypted JWT under a key with `secret`.
/// (`None` only if ring refused a 32-byte key, which AES-256 always takes.)
fn content_key(secret: &str) -> Option<LessSafeKey> {
    let digest = Sha256::digest(secret.as_bytes());
    let unbound = UnboundKey::new(&AES_256_GCM, &digest).ok()?;
    Some(LessSafeKey::new(unbound))
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

    /// A `kid` whose app is not configured here is 40400 (status 404), as Ably
    /// answers: not a token error, so an SDK does not renew in a loop.
    #[test]
    fn unknown_app() {
        let stranger =
            ApiKey::from_key_string("invalid.invalid:invalidinvalid", Capability::all()).unwrap();
        let token = sign_jwt(&stranger, &json!({"exp": NOW_S + 60}));
        let err = ring().authenticate_token(&token, NOW_MS).unwrap_err();
        assert_eq!((err.code(), err.status_code()), (40400, 404), "{err}");
    }

    /// A Tern token from `key()` for `client_id`, capability `chat:*` publish, one hour.
    fn inner_token(client_id: Option<&str>) -> (String, i64) {
        let cap = Capability::parse(r#"{"chat:*":["publish"]}"#).unwrap();
        let details = ring().issue_token(&key(), client_id, &cap, 3_600_000, NOW_MS);
        (details.token, details.expires)
    }

    /// An outer JWT from another issuer (its own secret, no kid) carrying `inner` in
    /// its JOSE header.
    fn embedding(inner: &str, claims: Value) -> String {
        let mut header = Map::new();
        header.insert("alg".to_owned(), "HS256".into());
        header.insert("typ".to_owned(), "JWT".into());
        header.insert(EMBEDDED_TOKEN_FIELD.to_owned(), inner.into());
        sign_with_header(b"the issuer's own secret", header, &claims)
    }

    /// A JWT embedding a Tern token in its header authenticates as the inner token
    /// (its app, clientId and capability, not the outer claims'), expiring at the
    /// outer `exp` when that is earlier; the outer signature is the issuer's.
    #[test]
    fn embedded_token_in_header() {
        let (inner, inner_expires_ms) = inner_token(Some("dave"));
        let outer = embedding(
            &inner,
            json!({"iat": NOW_S, "exp": NOW_S + 600, "x-ably-clientId": "mallory",
                   "x-ably-capability": r#"{"*":["*"]}"#}),
        );
        let ctx = ring().authenticate_token(&outer, NOW_MS).unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("dave".to_owned()));
        assert_eq!(ctx.key_name, "app.jwt");
        assert!(ctx.allows("chat:a", Operation::Publish));
        assert!(!ctx.allows("chat:a", Operation::Subscribe));
        assert!(!ctx.allows("news", Operation::Subscribe));
        assert_eq!(ctx.expires_ms, Some((NOW_S + 600) * 1000));
        assert!(ctx.expires_ms < Some(inner_expires_ms));

        // No outer exp: the inner token's expiry.
        let ctx = ring()
            .authenticate_token(&embedding(&inner, json!({})), NOW_MS)
            .unwrap();
        assert_eq!(ctx.expires_ms, Some(inner_expires_ms));
    }

    /// `x-ably-token` may instead be a claim, and the inner token may be an Ably JWT.
    #[test]
    fn embedded_token_in_claims_and_inner_jwt() {
        let inner = sign_jwt(
            &key(),
            &json!({"iat": NOW_S, "exp": NOW_S + 900, "x-ably-clientId": "erin"}),
        );
        let outer = sign_with_header(
            b"elsewhere",
            Map::from_iter([("alg".to_owned(), Value::from("HS256"))]),
            &json!({"exp": NOW_S + 900, "x-ably-token": inner}),
        );
        let ctx = ring().authenticate_token(&outer, NOW_MS).unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("erin".to_owned()));
        assert_eq!(ctx.expires_ms, Some((NOW_S + 900) * 1000));
    }

    /// The outer JWT may not outlive its inner token (40144) nor be expired (40142);
    /// a bad or expired inner token fails as that token does; an inner token may not
    /// embed another; and the field must be a string.
    #[test]
    fn embedded_token_refusals() {
        let (inner, inner_expires_ms) = inner_token(None);
        let inner_expires_s = inner_expires_ms / 1000;
        let code =
            |token: &str, now_ms: i64| ring().authenticate_token(token, now_ms).unwrap_err().code();
        assert_eq!(
            code(
                &embedding(&inner, json!({"exp": inner_expires_s + 1})),
                NOW_MS
            ),
            40144
        );
        assert_eq!(
            code(&embedding(&inner, json!({"exp": NOW_S})), NOW_MS),
            40142
        );
        // The inner token expired: 40142, whatever the outer says.
        let late_ms = inner_expires_ms + 1000;
        assert_eq!(code(&embedding(&inner, json!({})), late_ms), 40142);
        // A forged inner token: the Tern token's own refusal.
        let forged = format!("{}x", &inner[..inner.len() - 1]);
        assert_eq!(code(&embedding(&forged, json!({})), NOW_MS), 40143);
        // Two levels of embedding.
        let middle = embedding(&inner, json!({}));
        assert_eq!(code(&embedding(&middle, json!({})), NOW_MS), 40144);
        let mut header = Map::new();
        header.insert("alg".to_owned(), "HS256".into());
        header.insert(
            EMBEDDED_TOKEN_FIELD.to_owned(),
            json!(["not", "a", "token"]),
        );
        let not_string = sign_with_header(b"x", header, &json!({}));
        assert_eq!(code(&not_string, NOW_MS), 40144);
    }

    /// Encrypts `jws` as a compact JWE under `key` (dir, A256GCM), as echo.ably.io's
    /// stand-in does (tests/ably-js-suite/echo-server.mjs).
    fn encrypt(key: &ApiKey, jws: &str, iv: [u8; 12]) -> String {
        let header = URL_SAFE.encode(
            json!({"alg": "dir", "enc": "A256GCM", "kid": key.name(), "cty": "JWT"}).to_string(),
        );
        let mut sealed = jws.as_bytes().to_vec();
        let tag = content_key(&key.secret)
            .unwrap()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(header.as_bytes()),
                &mut sealed,
            )
            .unwrap();
        format!(
            "{header}..{}.{}.{}",
            URL_SAFE.encode(iv),
            URL_SAFE.encode(&sealed),
            URL_SAFE.encode(tag.as_ref())
        )
    }

    /// An encrypted JWT embedding a token authenticates as that token, and (being
    /// encrypted by the key holder) may carry an outer `exp` past the inner expiry,
    /// which still bounds the credential; an encrypted plain JWT works too.
    #[test]
    fn encrypted() {
        let (inner, inner_expires_ms) = inner_token(Some("frank"));
        let outer = embedding(&inner, json!({"exp": inner_expires_ms / 1000 + 60}));
        let ctx = ring()
            .authenticate_token(&encrypt(&key(), &outer, [7; 12]), NOW_MS)
            .unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("frank".to_owned()));
        assert_eq!(ctx.expires_ms, Some(inner_expires_ms));

        let plain = sign_jwt(
            &key(),
            &json!({"exp": NOW_S + 60, "x-ably-clientId": "gina"}),
        );
        let ctx = ring()
            .authenticate_token(&encrypt(&key(), &plain, [8; 12]), NOW_MS)
            .unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("gina".to_owned()));
    }

    /// An encrypted JWT under another secret, tampered with, of another algorithm,
    /// with a bad iv or tag, or wrapping another JWE, is 40144; one for an unknown
    /// app is 40400.
    #[test]
    fn encrypted_refusals() {
        let (inner, _) = inner_token(None);
        let outer = embedding(&inner, json!({}));
        let good = encrypt(&key(), &outer, [1; 12]);
        assert!(ring().authenticate_token(&good, NOW_MS).is_ok());
        let code = |token: &str| ring().authenticate_token(token, NOW_MS).unwrap_err().code();

        let mut impostor = key();
        impostor.secret = "guess".to_owned();
        assert_eq!(code(&encrypt(&impostor, &outer, [1; 12])), 40144);
        let parts: Vec<&str> = good.split('.').collect();
        let with = |i: usize, value: &str| {
            let mut parts = parts.clone();
            parts[i] = value;
            parts.join(".")
        };
        let flipped = {
            let mut bytes = URL_SAFE.decode(parts[3]).unwrap();
            bytes[0] ^= 1;
            URL_SAFE.encode(bytes)
        };
        let other_alg = URL_SAFE
            .encode(json!({"alg": "A256KW", "enc": "A256GCM", "kid": "app.jwt"}).to_string());
        for bad in [
            with(3, &flipped),
            with(0, &other_alg),
            with(1, "a2V5"),
            with(2, "c2hvcnQ"),
            with(4, "c2hvcnQ"),
            with(3, "!!"),
        ] {
            assert_eq!(code(&bad), 40144, "{bad}");
        }
        assert_eq!(code(&encrypt(&key(), &good, [2; 12])), 40144);
        let stranger = ApiKey::from_key_string("nowhere.k:s", Capability::all()).unwrap();
        assert_eq!(code(&encrypt(&stranger, &outer, [3; 12])), 40400);
    }
}
