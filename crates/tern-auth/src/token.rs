//! Token requests (what SDKs sign and post to `/keys/{keyName}/requestToken`),
//! and Tern's own signed tokens.
//!
//! A Tern token is `tn1.<payload>.<signature>`: the payload is base64url (no
//! padding) of JSON claims `{"k": keyName, "iat": issued_ms, "exp": expires_ms,
//! "cap": canonical capability JSON, "cid"?: clientId}` and the signature is
//! base64url of HMAC-SHA256 under the key's secret over `tn1.<payload>`. It holds
//! no `:` (SDKs take a string with `:` for a key) and is URL-safe. Any node with
//! the key configured verifies it; nothing is stored.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::key::{ApiKey, AuthContext, ClientIdentity, KeyRing, TokenPolicy};
use crate::signature::{hmac_sha256, hmac_sha256_verify, STANDARD, URL_SAFE};
use crate::{AuthError, Capability, NonceCache};

/// What every Tern token starts with; names the format version.
pub(crate) const TOKEN_PREFIX: &str = "tn1.";
/// Longest token (Tern or JWT) we try to verify, in bytes.
pub(crate) const TOKEN_BYTES_MAX: usize = 256 * 1024;
/// Longest canonical capability a token request may be granted, in bytes, so
/// that every token we issue stays under [`TOKEN_BYTES_MAX`].
pub(crate) const TOKEN_CAPABILITY_BYTES_MAX: usize = 64 * 1024;
/// Fewest characters in a token request nonce.
pub(crate) const NONCE_CHARS_MIN: usize = 16;
/// Most bytes in a token request nonce (bounds the replay cache's memory).
pub(crate) const NONCE_BYTES_MAX: usize = 256;

/// A signed token request, as ably-js `createTokenRequest` and ably-python
/// `create_token_request` produce it.
///
/// `ttl` and `timestamp` are accepted as numbers or numeric strings; an empty or
/// null `ttl`, `capability` or `clientId` counts as absent.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    /// `"appId.keyId"` of the signing key.
    pub key_name: String,
    /// Requested token lifetime in milliseconds.
    #[serde(
        default,
        deserialize_with = "optional_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<i64>,
    /// Requested capability, as the canonical JSON text the client signed.
    #[serde(
        default,
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub capability: Option<String>,
    /// Requested clientId (`"*"` for any).
    #[serde(
        default,
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_id: Option<String>,
    /// When the client made the request, ms since the epoch.
    #[serde(deserialize_with = "millis")]
    pub timestamp: i64,
    /// Random string, unique per request with this key.
    pub nonce: String,
    /// `base64(HMAC-SHA256(secret, signing text))`, see [`sign_token_request`].
    pub mac: String,
}

impl TokenRequest {
    /// Parses a JSON request body; malformed → [`AuthError::InvalidRequest`].
    pub fn from_json(body: &[u8]) -> Result<TokenRequest, AuthError> {
        serde_json::from_slice(body)
            .map_err(|err| AuthError::InvalidRequest(format!("malformed token request: {err}")))
    }
}

/// An issued token, as `POST /keys/{keyName}/requestToken` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenDetails {
    /// The token itself.
    pub token: String,
    /// The key it was issued from.
    pub key_name: String,
    /// Issue time, ms since the epoch.
    pub issued: i64,
    /// Expiry time, ms since the epoch.
    pub expires: i64,
    /// The granted capability as canonical JSON text.
    pub capability: String,
    /// The clientId bound to the token, if any (`"*"` for any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// The mac ably-js and ably-python put in a token request:
/// `base64(HMAC-SHA256(secret, "keyName\nttl\ncapability\nclientId\ntimestamp\nnonce\n"))`.
///
/// Absent fields are empty strings, and so is a ttl of 0 (both SDKs write
/// `ttl || ''`); numbers are in decimal.
pub fn sign_token_request(secret: &str, req: &TokenRequest) -> String {
    STANDARD.encode(hmac_sha256(secret.as_bytes(), signing_text(req).as_bytes()))
}

fn signing_text(req: &TokenRequest) -> String {
    let ttl = match req.ttl {
        Some(ttl) if ttl != 0 => ttl.to_string(),
        _ => String::new(),
    };
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n",
        req.key_name,
        ttl,
        req.capability.as_deref().unwrap_or(""),
        req.client_id.as_deref().unwrap_or(""),
        req.timestamp,
        req.nonce,
    )
}

/// The checks of [`KeyRing::request_token`] once the path's key is found.
pub(crate) fn check_request(
    key: &ApiKey,
    req: &TokenRequest,
    now_ms: i64,
    nonces: &mut NonceCache,
    policy: &TokenPolicy,
) -> Result<TokenDetails, AuthError> {
    if req.key_name != key.name() {
        return Err(AuthError::InvalidRequest(
            "keyName does not match the key in the path".to_owned(),
        ));
    }
    let mac_ok = STANDARD.decode(req.mac.trim()).is_ok_and(|tag| {
        hmac_sha256_verify(key.secret.as_bytes(), signing_text(req).as_bytes(), &tag)
    });
    if !mac_ok {
        return Err(AuthError::InvalidCredentials("invalid mac".to_owned()));
    }
    let window_ms = u64::try_from(policy.request_window_ms).unwrap_or(0);
    if now_ms.abs_diff(req.timestamp) > window_ms {
        return Err(AuthError::TimestampNotCurrent);
    }
    if req.nonce.chars().count() < NONCE_CHARS_MIN || req.nonce.len() > NONCE_BYTES_MAX {
        return Err(AuthError::InvalidRequest(format!(
            "nonce must have {NONCE_CHARS_MIN} to {NONCE_BYTES_MAX} characters"
        )));
    }
    let ttl_ms = match req.ttl {
        None | Some(0) => policy.ttl_default_ms,
        Some(ttl) => ttl,
    };
    if ttl_ms <= 0 || ttl_ms > policy.ttl_max_ms {
        return Err(AuthError::InvalidRequest(format!(
            "ttl must be between 1 and {} ms",
            policy.ttl_max_ms
        )));
    }
    let requested = match req.capability.as_deref() {
        None => key.capability.clone(),
        Some(text) => Capability::parse(text)?,
    };
    // Ably grants the intersection of what is asked and what the key holds; only an
    // empty intersection is refused.
    if key.capability.intersect(&requested).is_empty() {
        return Err(AuthError::CapabilityNotSubset);
    }
    if requested.to_canonical_json().len() > TOKEN_CAPABILITY_BYTES_MAX {
        return Err(AuthError::InvalidRequest(format!(
            "capability over {TOKEN_CAPABILITY_BYTES_MAX} bytes"
        )));
    }
    nonces.check_and_insert(&req.key_name, &req.nonce, req.timestamp, now_ms)?;
    Ok(issue(
        key,
        req.client_id.as_deref(),
        &requested,
        ttl_ms,
        now_ms,
    ))
}

/// The claims inside a Tern token.
#[derive(Deserialize)]
struct Claims {
    /// Key name.
    k: String,
    /// Issue time, ms since the epoch.
    #[serde(default)]
    iat: Option<i64>,
    /// Expiry, ms since the epoch.
    exp: i64,
    /// Canonical capability JSON, narrowed by the key's at issue time.
    cap: String,
    /// clientId; absent for an anonymous token.
    #[serde(default)]
    cid: Option<String>,
}

/// Signs a Tern token; see [`KeyRing::issue_token`].
pub(crate) fn issue(
    key: &ApiKey,
    client_id: Option<&str>,
    capability: &Capability,
    ttl_ms: i64,
    now_ms: i64,
) -> TokenDetails {
    let client_id = client_id.filter(|id| !id.is_empty());
    let granted = key.capability.intersect(capability);
    // Shown as it was written when nothing was narrowed (the key's own, or exactly
    // what was asked), so a holder comparing it with its request finds it equal.
    let capability = if granted == *capability {
        capability.to_wire_json()
    } else if granted == key.capability {
        key.capability.to_wire_json()
    } else {
        granted.to_canonical_json()
    };
    let expires = now_ms.saturating_add(ttl_ms);
    let key_name = key.name();
    let mut claims = serde_json::Map::new();
    claims.insert("k".to_owned(), key_name.clone().into());
    claims.insert("iat".to_owned(), now_ms.into());
    claims.insert("exp".to_owned(), expires.into());
    claims.insert("cap".to_owned(), capability.clone().into());
    if let Some(id) = client_id {
        claims.insert("cid".to_owned(), id.into());
    }
    // `Display` for a JSON value is infallible, unlike `serde_json::to_string`.
    let payload = URL_SAFE.encode(serde_json::Value::Object(claims).to_string());
    let signed = format!("{TOKEN_PREFIX}{payload}");
    let signature = URL_SAFE.encode(hmac_sha256(key.secret.as_bytes(), signed.as_bytes()));
    TokenDetails {
        token: format!("{signed}.{signature}"),
        key_name,
        issued: now_ms,
        expires,
        capability,
        client_id: client_id.map(str::to_owned),
    }
}

/// Verifies a Tern token; see [`KeyRing::authenticate_token`].
pub(crate) fn verify(ring: &KeyRing, token: &str, now_ms: i64) -> Result<AuthContext, AuthError> {
    let unrecognised = |why: &str| AuthError::TokenUnrecognised(why.to_owned());
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| unrecognised("not a Tern token"))?;
    let (payload, signature) = rest
        .split_once('.')
        .ok_or_else(|| unrecognised("malformed token"))?;
    let signed = &token[..TOKEN_PREFIX.len() + payload.len()];
    let claims: Claims = URL_SAFE
        .decode(payload)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(|| unrecognised("malformed token claims"))?;
    let key = ring
        .get(&claims.k)
        .ok_or_else(|| unrecognised("token key not recognised"))?;
    let signature_ok = URL_SAFE
        .decode(signature)
        .is_ok_and(|tag| hmac_sha256_verify(key.secret.as_bytes(), signed.as_bytes(), &tag));
    if !signature_ok {
        return Err(unrecognised("token signature does not verify"));
    }
    if claims.exp <= now_ms {
        return Err(AuthError::TokenExpired);
    }
    // Tokens from token requests always fit; this bounds ones minted with the key
    // secret directly, and older tokens after `ttl_max_ms` was lowered.
    if !ring
        .policy()
        .lifetime_allowed(claims.iat, claims.exp, now_ms)
    {
        return Err(unrecognised("token lifetime over the maximum"));
    }
    let capability =
        Capability::parse(&claims.cap).map_err(|_| unrecognised("malformed token capability"))?;
    Ok(AuthContext {
        app_id: key.app_id.clone(),
        key_name: claims.k,
        client_id: ClientIdentity::from_claim(claims.cid.as_deref()),
        capability: key.capability.intersect(&capability),
        expires_ms: Some(claims.exp),
        via_token: true,
        issued_ms: claims.iat,
        revocation_key: None,
    })
}

/// Deserializes a required millisecond count from a number or numeric string.
fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    optional_millis(deserializer)?.ok_or_else(|| de::Error::custom("expected milliseconds"))
}

/// Deserializes an optional millisecond count: number, numeric string, or
/// null / empty string for absent.
fn optional_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    deserializer.deserialize_any(MillisVisitor)
}

/// Deserializes an optional string, taking null and `""` as absent.
fn optional_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.filter(|text| !text.is_empty()))
}

struct MillisVisitor;

impl<'de> Visitor<'de> for MillisVisitor {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer number of milliseconds, as a number or a string")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Option<i64>, E> {
        Ok(Some(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Option<i64>, E> {
        i64::try_from(value)
            .map(Some)
            .map_err(|_| E::custom("milliseconds out of range"))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Option<i64>, E> {
        // Integral floats only (a JS number, or Python's int sent via float).
        const LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53: exactly representable
        if value.is_finite() && value.fract() == 0.0 && value.abs() <= LIMIT {
            // In range and integral, so the cast is exact.
            Ok(Some(value as i64))
        } else {
            Err(E::custom("milliseconds must be an integer"))
        }
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Option<i64>, E> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(None);
        }
        value
            .parse::<i64>()
            .map(Some)
            .map_err(|_| E::custom("milliseconds must be an integer"))
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operation;
    use sha2::Sha256;

    const NOW: i64 = 1_700_000_000_000;

    fn root() -> ApiKey {
        ApiKey::from_key_string("app.key:secret", Capability::all()).unwrap()
    }

    fn limited() -> ApiKey {
        ApiKey::from_key_string(
            "app.lim:limsecret",
            Capability::parse(r#"{"chat:*":["publish","subscribe"]}"#).unwrap(),
        )
        .unwrap()
    }

    fn ring() -> KeyRing {
        KeyRing::new(vec![root(), limited()])
    }

    fn request(key: &ApiKey, capability: Option<&str>, client_id: Option<&str>) -> TokenRequest {
        let mut req = TokenRequest {
            key_name: key.name(),
            ttl: Some(3_600_000),
            capability: capability.map(str::to_owned),
            client_id: client_id.map(str::to_owned),
            timestamp: NOW,
            nonce: "0123456789abcdef".to_owned(),
            mac: String::new(),
        };
        req.mac = sign_token_request(&key.secret, &req);
        req
    }

    fn fresh_nonces() -> NonceCache {
        NonceCache::new(1000, TokenPolicy::default().nonce_retain_ms())
    }

    /// An issued token verifies with its clientId, capability and expiry.
    #[test]
    fn issue_then_verify() {
        let ring = ring();
        let cap = Capability::parse(r#"{"chat:*":["subscribe"]}"#).unwrap();
        let details = ring.issue_token(&root(), Some("bob"), &cap, 60_000, NOW);
        assert!(details.token.starts_with(TOKEN_PREFIX));
        assert!(!details.token.contains(':'));
        assert!(details
            .token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert_eq!(details.expires, NOW + 60_000);
        assert_eq!(details.capability, r#"{"chat:*":["subscribe"]}"#);

        let ctx = ring.authenticate_token(&details.token, NOW + 1).unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Id("bob".to_owned()));
        assert_eq!(ctx.key_name, "app.key");
        assert_eq!(ctx.app_id, "app");
        assert_eq!(ctx.expires_ms, Some(NOW + 60_000));
        assert!(ctx.via_token);
        assert!(ctx.allows("chat:x", Operation::Subscribe));
        assert!(!ctx.allows("chat:x", Operation::Publish));
    }

    /// A token is narrowed to its key's capability at issue time.
    #[test]
    fn issue_narrows_to_key() {
        let details = ring().issue_token(&limited(), None, &Capability::all(), 60_000, NOW);
        assert_eq!(details.capability, r#"{"chat:*":["publish","subscribe"]}"#);
        assert_eq!(details.client_id, None);
        let ctx = ring().authenticate_token(&details.token, NOW).unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Anonymous);
    }

    /// Verification narrows again by the key's current capability.
    #[test]
    fn verify_narrows_to_current_key() {
        let details = ring().issue_token(&root(), Some("*"), &Capability::all(), 60_000, NOW);
        let mut shrunk = root();
        shrunk.capability = Capability::parse(r#"{"news":["subscribe"]}"#).unwrap();
        let ctx = KeyRing::new(vec![shrunk])
            .authenticate_token(&details.token, NOW)
            .unwrap();
        assert_eq!(ctx.client_id, ClientIdentity::Wildcard);
        assert_eq!(
            ctx.capability.to_canonical_json(),
            r#"{"news":["subscribe"]}"#
        );
    }

    /// Expiry is judged against the time passed in: 40142 at and after `expires`.
    #[test]
    fn expired_token() {
        let ring = ring();
        let details = ring.issue_token(&root(), None, &Capability::all(), 1_000, NOW);
        assert!(ring.authenticate_token(&details.token, NOW + 999).is_ok());
        let err = ring
            .authenticate_token(&details.token, NOW + 1_000)
            .unwrap_err();
        assert_eq!(err, AuthError::TokenExpired);
        assert_eq!(err.code(), 40142);
    }

    /// Any change to a token, or a removed key, makes it unrecognised (40143).
    #[test]
    fn tampered_token() {
        let ring = ring();
        let token = ring
            .issue_token(&root(), Some("bob"), &Capability::all(), 60_000, NOW)
            .token;
        let (signed, _) = token.rsplit_once('.').unwrap();
        let forged_claims = URL_SAFE.encode(format!(
            r#"{{"k":"app.key","iat":{NOW},"exp":{},"cap":"{{\"*\":[\"*\"]}}","cid":"eve"}}"#,
            NOW + 60_000
        ));
        let forged = format!(
            "{TOKEN_PREFIX}{forged_claims}.{}",
            token.rsplit_once('.').unwrap().1
        );
        for bad in [
            format!("{signed}.AAAA"),
            format!("{signed}."),
            signed.to_owned(),
            forged,
            token.replacen("tn1.", "tn1.x", 1),
            format!("{token}x"),
        ] {
            let err = ring.authenticate_token(&bad, NOW).unwrap_err();
            assert_eq!(err.code(), 40143, "{bad}: {err}");
        }
        let err = KeyRing::new(vec![limited()])
            .authenticate_token(&token, NOW)
            .unwrap_err();
        assert_eq!(err.code(), 40143);
        let mut rotated = root();
        rotated.secret = "new-secret".to_owned();
        let err = KeyRing::new(vec![rotated])
            .authenticate_token(&token, NOW)
            .unwrap_err();
        assert_eq!(err.code(), 40143);
    }

    /// Bearer values are base64 of the token; raw tokens are accepted too.
    #[test]
    fn bearer() {
        let ring = ring();
        let token = ring
            .issue_token(&root(), None, &Capability::all(), 60_000, NOW)
            .token;
        assert!(ring
            .authenticate_bearer(&STANDARD.encode(&token), NOW)
            .is_ok());
        assert!(ring.authenticate_bearer(&token, NOW).is_ok());
        assert_eq!(
            ring.authenticate_bearer("Zm9v", NOW).unwrap_err().code(),
            40143
        );
    }

    /// An ably-js style request signed by `sign_token_request` yields a token.
    #[test]
    fn request_token_happy() {
        let ring = ring();
        let req = request(&root(), Some(r#"{"chat:*":["subscribe"]}"#), Some("bob"));
        let details = ring
            .request_token(
                "app.key",
                &req,
                NOW + 5,
                &mut fresh_nonces(),
                &TokenPolicy::default(),
            )
            .unwrap();
        assert_eq!(details.key_name, "app.key");
        assert_eq!(details.issued, NOW + 5);
        assert_eq!(details.expires, NOW + 5 + 3_600_000);
        assert_eq!(details.client_id.as_deref(), Some("bob"));
        assert_eq!(details.capability, r#"{"chat:*":["subscribe"]}"#);
        let ctx = ring.authenticate_token(&details.token, NOW + 10).unwrap();
        assert!(ctx.allows("chat:a", Operation::Subscribe));
    }

    /// Absent capability and ttl take the key's capability and the default ttl.
    #[test]
    fn request_token_defaults() {
        let mut req = request(&limited(), None, None);
        req.ttl = None;
        req.mac = sign_token_request("limsecret", &req);
        let details = ring()
            .request_token(
                "app.lim",
                &req,
                NOW,
                &mut fresh_nonces(),
                &TokenPolicy::default(),
            )
            .unwrap();
        assert_eq!(details.expires - details.issued, 3_600_000);
        assert_eq!(details.capability, r#"{"chat:*":["publish","subscribe"]}"#);
        assert_eq!(details.client_id, None);
    }

    /// The mac matches one computed independently from the documented signing
    /// text, for the request ably-js `createTokenRequest` would produce.
    #[test]
    fn ably_js_fixture() {
        let body = br#"{"keyName":"app.key","ttl":3600000,"capability":"{\"*\":[\"*\"]}","clientId":"bob","timestamp":1700000000000,"nonce":"0123456789abcdef","mac":""}"#;
        let mut req = TokenRequest::from_json(body).unwrap();
        let text = "app.key\n3600000\n{\"*\":[\"*\"]}\nbob\n1700000000000\n0123456789abcdef\n";
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(b"secret").unwrap();
        hmac::Mac::update(&mut mac, text.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(hmac::Mac::finalize(mac).into_bytes());
        assert_eq!(sign_token_request("secret", &req), expected);

        req.mac = expected;
        let details = ring()
            .request_token(
                "app.key",
                &req,
                NOW,
                &mut fresh_nonces(),
                &TokenPolicy::default(),
            )
            .unwrap();
        assert_eq!(details.capability, r#"{"*":["*"]}"#);
        assert_eq!(details.client_id.as_deref(), Some("bob"));
    }

    /// Python-style requests (numeric strings, null and empty fields) parse and
    /// sign like their ably-js equivalents.
    #[test]
    fn lenient_fields() {
        let body = br#"{"keyName":"app.key","ttl":"3600000","capability":"","clientId":null,"timestamp":"1700000000000","nonce":"0123456789abcdef","mac":"x"}"#;
        let req = TokenRequest::from_json(body).unwrap();
        assert_eq!(req.ttl, Some(3_600_000));
        assert_eq!(req.timestamp, NOW);
        assert_eq!(req.capability, None);
        assert_eq!(req.client_id, None);
        assert_eq!(
            signing_text(&req),
            "app.key\n3600000\n\n\n1700000000000\n0123456789abcdef\n"
        );

        let floaty = br#"{"keyName":"k","ttl":3600000.0,"timestamp":1.7e12,"nonce":"n","mac":"m"}"#;
        let req = TokenRequest::from_json(floaty).unwrap();
        assert_eq!((req.ttl, req.timestamp), (Some(3_600_000), NOW));

        let zero_ttl = br#"{"keyName":"k","ttl":0,"timestamp":1,"nonce":"n","mac":"m"}"#;
        let req = TokenRequest::from_json(zero_ttl).unwrap();
        assert_eq!(signing_text(&req), "k\n\n\n\n1\nn\n");

        for bad in [
            &br#"{"keyName":"k","timestamp":1.5,"nonce":"n","mac":"m"}"#[..],
            br#"{"keyName":"k","timestamp":"soon","nonce":"n","mac":"m"}"#,
            br#"{"keyName":"k","timestamp":null,"nonce":"n","mac":"m"}"#,
            br#"{"keyName":"k","nonce":"n","mac":"m"}"#,
            br#"not json"#,
        ] {
            assert_eq!(TokenRequest::from_json(bad).unwrap_err().code(), 40003);
        }
    }

    fn refused(ring: &KeyRing, path: &str, req: &TokenRequest) -> AuthError {
        ring.request_token(path, req, NOW, &mut fresh_nonces(), &TokenPolicy::default())
            .unwrap_err()
    }

    /// Each refusal carries its Ably code.
    #[test]
    fn request_token_refusals() {
        let ring = ring();
        let good = request(&root(), None, None);

        assert_eq!(refused(&ring, "app.nope", &good).code(), 40101);
        assert_eq!(refused(&ring, "app.lim", &good).code(), 40003);

        let mut bad_mac = good.clone();
        bad_mac.mac = sign_token_request("wrong", &good);
        assert_eq!(refused(&ring, "app.key", &bad_mac).code(), 40101);
        let mut tampered = good.clone();
        tampered.client_id = Some("eve".to_owned());
        assert_eq!(refused(&ring, "app.key", &tampered).code(), 40101);
        let mut garbage_mac = good.clone();
        garbage_mac.mac = "%%%".to_owned();
        assert_eq!(refused(&ring, "app.key", &garbage_mac).code(), 40101);

        for skew in [-600_001, 600_001] {
            let mut old = good.clone();
            old.timestamp = NOW + skew;
            old.mac = sign_token_request("secret", &old);
            assert_eq!(refused(&ring, "app.key", &old).code(), 40104);
        }

        let mut short = good.clone();
        short.nonce = "0123456789abcde".to_owned();
        short.mac = sign_token_request("secret", &short);
        assert_eq!(refused(&ring, "app.key", &short).code(), 40003);

        for ttl in [86_400_001, -1] {
            let mut long = good.clone();
            long.ttl = Some(ttl);
            long.mac = sign_token_request("secret", &long);
            assert_eq!(refused(&ring, "app.key", &long).code(), 40003);
        }

        let disjoint = request(&limited(), Some(r#"{"other:*":["subscribe"]}"#), None);
        assert_eq!(refused(&ring, "app.lim", &disjoint).code(), 40160);
        let more_ops = request(&limited(), Some(r#"{"chat:x":["presence"]}"#), None);
        assert_eq!(refused(&ring, "app.lim", &more_ops).code(), 40160);
        let unparsable = request(&limited(), Some(r#"{"chat:x":"publish"}"#), None);
        assert_eq!(refused(&ring, "app.lim", &unparsable).code(), 40000);
    }

    /// A request asking for more than the key holds gets the intersection (Ably), shown
    /// canonically; one asking for nothing, or for exactly the key's capability, gets
    /// the key's capability as it was written.
    #[test]
    fn requests_get_the_intersection() {
        let ring = ring();
        let grant = |asked: Option<&str>| {
            let req = request(&limited(), asked, None);
            ring.request_token(
                "app.lim",
                &req,
                NOW,
                &mut fresh_nonces(),
                &TokenPolicy::default(),
            )
            .unwrap()
            .capability
        };
        assert_eq!(
            grant(Some(r#"{"*":["subscribe"]}"#)),
            r#"{"chat:*":["subscribe"]}"#
        );
        assert_eq!(
            grant(Some(r#"{"*":["*"]}"#)),
            ring.get("app.lim").unwrap().capability.to_wire_json()
        );
        assert_eq!(
            grant(None),
            ring.get("app.lim").unwrap().capability.to_wire_json()
        );
    }

    /// A nonce is accepted once; the replay is refused with 40105, and a refused
    /// request does not use up its nonce.
    #[test]
    fn replayed_nonce() {
        let ring = ring();
        let policy = TokenPolicy::default();
        let mut nonces = fresh_nonces();
        let disjoint = request(&limited(), Some(r#"{"other:*":["*"]}"#), None);
        let err = ring
            .request_token("app.lim", &disjoint, NOW, &mut nonces, &policy)
            .unwrap_err();
        assert_eq!(err.code(), 40160);
        assert!(nonces.is_empty());

        let req = request(&root(), None, None);
        assert!(ring
            .request_token("app.key", &req, NOW, &mut nonces, &policy)
            .is_ok());
        let err = ring
            .request_token("app.key", &req, NOW + 1, &mut nonces, &policy)
            .unwrap_err();
        assert_eq!(err, AuthError::NonceReplayed);
        assert_eq!(err.code(), 40105);
    }

    /// TokenDetails serialize with Ably's field names and omit an absent clientId.
    #[test]
    fn token_details_wire_form() {
        let details = ring().issue_token(&root(), None, &Capability::all(), 1, 2);
        let json = serde_json::to_value(&details).unwrap();
        let fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            ["capability", "expires", "issued", "keyName", "token"]
        );
    }

    /// A full replay cache refuses a valid request with 42910 and does not take its
    /// nonce, so the same request succeeds once room returns.
    #[test]
    fn full_nonce_cache_refuses() {
        let ring = ring();
        let policy = TokenPolicy::default();
        let mut nonces = NonceCache::new(1, policy.nonce_retain_ms());
        let first = request(&root(), None, None);
        assert!(ring
            .request_token("app.key", &first, NOW, &mut nonces, &policy)
            .is_ok());
        let mut second = first.clone();
        second.nonce = "fedcba9876543210".to_owned();
        second.mac = sign_token_request("secret", &second);
        let err = ring
            .request_token("app.key", &second, NOW, &mut nonces, &policy)
            .unwrap_err();
        assert_eq!(err, AuthError::TooManyTokenRequests);
        assert_eq!((err.code(), err.status_code()), (42910, 429));
        // The first nonce is still remembered.
        let err = ring
            .request_token("app.key", &first, NOW + 1, &mut nonces, &policy)
            .unwrap_err();
        assert_eq!(err, AuthError::NonceReplayed);
        // After the first nonce's retention the second request goes through.
        let later = NOW + policy.nonce_retain_ms();
        let mut fresh = second.clone();
        fresh.timestamp = later;
        fresh.mac = sign_token_request("secret", &fresh);
        assert!(ring
            .request_token("app.key", &fresh, later, &mut nonces, &policy)
            .is_ok());
    }

    /// A Tern token minted with a lifetime over the policy's maximum (only
    /// possible with the key secret, or after the maximum was lowered) is 40143.
    #[test]
    fn token_lifetime_bounded() {
        let ring = ring();
        let max_ms = TokenPolicy::default().ttl_max_ms;
        let fits = ring.issue_token(&root(), None, &Capability::all(), max_ms, NOW);
        assert!(ring.authenticate_token(&fits.token, NOW).is_ok());
        // Issued by a node whose clock is 10 s ahead: still verifies here.
        let ahead = ring.issue_token(&root(), None, &Capability::all(), max_ms, NOW + 10_000);
        assert!(ring.authenticate_token(&ahead.token, NOW).is_ok());
        let long = ring.issue_token(&root(), None, &Capability::all(), max_ms + 1, NOW);
        assert_eq!(
            ring.authenticate_token(&long.token, NOW)
                .unwrap_err()
                .code(),
            40143
        );
        let huge = ring.issue_token(&root(), None, &Capability::all(), i64::MAX, NOW);
        assert_eq!(
            ring.authenticate_token(&huge.token, NOW)
                .unwrap_err()
                .code(),
            40143
        );
        let lowered = ring.with_policy(TokenPolicy {
            ttl_max_ms: 60_000,
            ..TokenPolicy::default()
        });
        assert_eq!(
            lowered
                .authenticate_token(&fits.token, NOW)
                .unwrap_err()
                .code(),
            40143
        );
    }
}
