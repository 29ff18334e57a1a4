//! Connection keys any node of the cluster can vouch for. A key is
//! `<connectionId>!<secret>`, and the secret is 8 random characters followed by 24 hex
//! digits of HMAC-SHA256(cluster secret, `<connectionId>!<random>`) (96 bits). Every
//! member derives the same cluster secret (from the gossip key; a single node uses a
//! random one), so a node that never saw a connection can still tell that a key was
//! issued for it, by some member, to its client: only the client is ever given its keys.
//!
//! What it is for: after a resume on another node whose old node is dead (or does not
//! answer the handover), the new connection may still own the old id's channel, so the
//! pushes the old node acknowledged before it died reach the client (`handover`). It
//! does not resume the connection anywhere: whether a key is spent is the issuing
//! node's registry's business (`KeyChain`).

use hmac::{Hmac, Mac};
use rand::distr::{Alphanumeric, SampleString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Random characters at the start of a secret.
const RANDOM_LEN: usize = 8;
/// Bytes of the MAC kept (hex-encoded: twice as many digits).
const TAG_BYTES: usize = 12;
/// Length of a secret this module issues.
pub(crate) const SECRET_LEN: usize = RANDOM_LEN + 2 * TAG_BYTES;

/// Issues and checks connection key secrets under the cluster's secret.
pub(crate) struct KeySigner {
    secret: [u8; 32],
}

impl KeySigner {
    /// Under `secret`, shared by every member of the cluster.
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        KeySigner { secret }
    }

    /// A node alone: nobody else needs to check its keys.
    pub(crate) fn random() -> Self {
        KeySigner::new(rand::random())
    }

    fn mac(&self, id: &str, random: &str) -> HmacSha256 {
        let mut key = hmac::digest::Key::<HmacSha256>::default();
        key[..self.secret.len()].copy_from_slice(&self.secret);
        let mut mac = <HmacSha256 as Mac>::new(&key);
        mac.update(id.as_bytes());
        mac.update(b"!");
        mac.update(random.as_bytes());
        mac
    }

    /// A new secret for connection `id`.
    pub(crate) fn secret_for(&self, id: &str) -> String {
        let random = Alphanumeric.sample_string(&mut rand::rng(), RANDOM_LEN);
        let tag = self.mac(id, &random).finalize().into_bytes();
        let hex: String = tag[..TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{random}{hex}")
    }

    /// Whether `secret` was issued for connection `id` under this cluster's secret
    /// (compared in constant time).
    pub(crate) fn vouches(&self, id: &str, secret: &str) -> bool {
        if secret.len() != SECRET_LEN || !secret.is_ascii() {
            return false;
        }
        let (random, hex) = secret.split_at(RANDOM_LEN);
        let mut tag = [0u8; TAG_BYTES];
        for (byte, pair) in tag.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => *byte = high << 4 | low,
                _ => return false,
            }
        }
        self.mac(id, random).verify_truncated_left(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret is vouched for by every signer under the same cluster secret, for its
    /// own connection only; another cluster's, a changed one and garbage are not.
    #[test]
    fn secrets_are_vouched_for_across_the_cluster_only() {
        let a = KeySigner::new([7; 32]);
        let b = KeySigner::new([7; 32]);
        let other = KeySigner::new([8; 32]);
        let secret = a.secret_for("abc123-ABCDEFGHIJ12");
        assert_eq!(secret.len(), SECRET_LEN);
        assert!(secret.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(b.vouches("abc123-ABCDEFGHIJ12", &secret));
        assert!(!b.vouches("abc123-ABCDEFGHIJ13", &secret));
        assert!(!other.vouches("abc123-ABCDEFGHIJ12", &secret));
        let mut flipped = secret.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert!(!b.vouches(
            "abc123-ABCDEFGHIJ12",
            std::str::from_utf8(&flipped).unwrap()
        ));
        for garbage in [
            "",
            "short",
            &"z".repeat(SECRET_LEN),
            "é".repeat(16).as_str(),
        ] {
            assert!(!b.vouches("abc123-ABCDEFGHIJ12", garbage), "{garbage:?}");
        }
    }
}
