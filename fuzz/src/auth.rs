//! Credentials (`tern-auth`): token request bodies, Tern tokens, JWTs.
//!
//! Random bytes never carry a valid signature, so the token harnesses also sign what
//! they are given with the fuzz key: the fuzzer then reaches the claims, expiry and
//! capability checks behind the signature, which is where a decoder bug would let a
//! signed-but-hostile credential through.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tern_auth::{
    sign_token_request, ApiKey, AuthContext, Capability, KeyRing, NonceCache, TokenPolicy,
    TokenRequest,
};

use tern_protocol::{decode_value, Format};

use crate::NOW_MS;

/// The key every credential is checked against.
pub const KEY: &str = "fuzz.key:fuzzsecret";
/// Its capability: narrow, so that narrowing has something to do.
pub const KEY_CAPABILITY: &str =
    r#"{"chat:*":["*"],"news":["subscribe","history"],"[*]*":["subscribe"]}"#;

fn key() -> ApiKey {
    let capability = Capability::parse(KEY_CAPABILITY).expect("the fuzz capability parses");
    ApiKey::from_key_string(KEY, capability).expect("the fuzz key parses")
}

fn ring() -> KeyRing {
    KeyRing::new(vec![key()])
}

/// What every successful authentication must give: our key, a capability within the
/// key's, a token expiry after now.
fn check_context(context: &AuthContext) {
    let key = key();
    assert_eq!(context.key_name, key.name(), "authenticated as another key");
    assert_eq!(context.app_id, key.app_id);
    assert!(
        context.capability.is_subset_of(&key.capability),
        "capability {} is wider than the key's {}",
        context.capability,
        key.capability
    );
    if context.via_token {
        let expires_ms = context.expires_ms.expect("a token has an expiry");
        assert!(expires_ms > NOW_MS, "an expired token authenticated");
        assert!(!context.is_expired(NOW_MS));
    }
}

/// A `POST /keys/{keyName}/requestToken` body, JSON or msgpack as `rest.rs` decodes it:
/// what decodes round-trips; checked as sent and again with a valid mac, a granted
/// token authenticates within the key's capability.
pub fn token_request(data: &[u8]) {
    for format in [Format::Json, Format::Msgpack] {
        let Ok(request) = decode_value::<TokenRequest>(format, data) else {
            continue;
        };
        let json = serde_json::to_vec(&request).expect("a token request serializes");
        let again: TokenRequest =
            serde_json::from_slice(&json).expect("a re-encoded token request decodes");
        assert_eq!(request, again, "token request changed in a round trip");
        request_token(&request);
        let signed = TokenRequest {
            mac: sign_token_request(&key().secret, &request),
            ..request
        };
        request_token(&signed);
    }
}

fn request_token(request: &TokenRequest) {
    let ring = ring();
    let policy = TokenPolicy::default();
    let mut nonces = NonceCache::new(16, policy.nonce_retain_ms());
    let Ok(details) = ring.request_token(&key().name(), request, NOW_MS, &mut nonces, &policy)
    else {
        return;
    };
    let context = ring
        .authenticate_token(&details.token, NOW_MS)
        .unwrap_or_else(|err| panic!("an issued token does not authenticate: {err}"));
    check_context(&context);
    assert_eq!(context.expires_ms, Some(details.expires));
    let replay = ring.request_token(&key().name(), request, NOW_MS, &mut nonces, &policy);
    assert!(replay.is_err(), "a token request was granted twice");
}

/// A Tern token: the bytes as a token (query param or Bearer header), and as the claims
/// of a token signed with the fuzz key.
pub fn tern_token(data: &[u8]) {
    as_token_text(data);
    let payload = URL_SAFE_NO_PAD.encode(data);
    let signed = format!("tn1.{payload}");
    let token = format!("{signed}.{}", sign(&signed));
    if let Ok(context) = ring().authenticate_token(&token, NOW_MS) {
        check_context(&context);
    }
}

/// An HS256 JWT: the bytes as a token, and as `header\nclaims` (or just claims, under
/// a valid header) signed with the fuzz key.
pub fn jwt(data: &[u8]) {
    as_token_text(data);
    let default_header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, key().name());
    let (header, claims) = match data.iter().position(|&byte| byte == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (default_header.as_bytes(), data),
    };
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let token = format!("{signed}.{}", sign(&signed));
    if let Ok(context) = ring().authenticate_token(&token, NOW_MS) {
        check_context(&context);
    }
}

/// Every way a client hands over a token as text.
fn as_token_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ring = ring();
    let results = [
        ring.authenticate_token(text, NOW_MS),
        ring.authenticate_bearer(text, NOW_MS),
        ring.authenticate_basic(text),
        ring.authenticate_key(text),
    ];
    for context in results.into_iter().flatten() {
        check_context(&context);
    }
}

/// base64url HMAC-SHA256 of `text` under the fuzz key's secret.
fn sign(text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key().secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(text.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}
