//! HMAC-SHA256 signatures, constant-time comparison and the base64 flavours the
//! wire formats use. Private plumbing shared by tokens, JWTs and token requests.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Standard alphabet with padding on output, padding optional on input: token
/// request macs and bearer headers come from clients we do not control.
pub(crate) const STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// URL-safe alphabet without padding on output (tokens and JWTs travel in query
/// strings); padding tolerated on input.
pub(crate) const URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An HMAC-SHA256 keyed with `secret`.
///
/// HMAC zero-pads a key to the hash's block size (hashing it first when longer),
/// so doing that here and using the fixed-size constructor gives the same MAC as
/// `new_from_slice` without a fallible (and so panicking) path.
fn keyed(secret: &[u8]) -> HmacSha256 {
    let mut key = hmac::digest::Key::<HmacSha256>::default();
    if secret.len() <= key.len() {
        key[..secret.len()].copy_from_slice(secret);
    } else {
        let digest = Sha256::digest(secret);
        key[..digest.len()].copy_from_slice(&digest);
    }
    <HmacSha256 as Mac>::new(&key)
}

/// HMAC-SHA256 of `message` under `secret`.
pub(crate) fn hmac_sha256(secret: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = keyed(secret);
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Whether `tag` is the HMAC-SHA256 of `message` under `secret`, compared in
/// constant time.
pub(crate) fn hmac_sha256_verify(secret: &[u8], message: &[u8], tag: &[u8]) -> bool {
    let mut mac = keyed(secret);
    mac.update(message);
    mac.verify_slice(tag).is_ok()
}

/// Whether `a == b`, in time independent of where they differ and of their
/// lengths (both are hashed to 32 bytes first).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The padded-key constructor agrees with the hmac crate's own slice
    /// constructor for short, block-sized and over-long keys (RFC 4231 case 6 too).
    #[test]
    fn keyed_matches_new_from_slice() {
        for len in [0usize, 1, 20, 63, 64, 65, 131, 500] {
            let secret = vec![0xaa_u8; len];
            let mut reference = <HmacSha256 as Mac>::new_from_slice(&secret).unwrap();
            reference.update(b"Test Using Larger Than Block-Size Key - Hash Key First");
            let expected: [u8; 32] = reference.finalize().into_bytes().into();
            let got = hmac_sha256(
                &secret,
                b"Test Using Larger Than Block-Size Key - Hash Key First",
            );
            assert_eq!(got, expected, "key length {len}");
        }
        let rfc4231_case6 = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            rfc4231_case6[..4],
            [0x60, 0xe4, 0x31, 0x59],
            "RFC 4231 test case 6 prefix"
        );
    }

    /// Constant-time equality still answers equality correctly.
    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }
}
