//! Authenticated gossip: a chitchat [`Transport`] over UDP in which every datagram
//! carries an HMAC-SHA256 tag under the cluster's gossip key ([`GossipKey`], 32 random
//! bytes every member shares). Without the key nobody can add a member, change what a
//! member publishes (its QUIC address, the tags of departed nodes whose presence
//! members every node removes) or keep a dead node looking alive. A datagram that fails
//! is dropped before chitchat parses it, counted (`tern_gossip_rejected_total{reason}`,
//! [`GossipStats`]) and logged at debug (a warning at most every
//! [`REJECTION_WARNING_INTERVAL`]).
//!
//! One datagram (version 1):
//!
//! | bytes | what |
//! |---|---|
//! | 1 | version, 1 |
//! | 8 | sent at: ms since the Unix epoch, big-endian |
//! | ≤ 65,443 | the chitchat envelope (`chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE`) |
//! | 32 | HMAC-SHA256 under the key of everything before it |
//!
//! Replay: a receiver refuses a datagram sent more than [`SKEW_MAX_MS`] before or after
//! its own clock, so members' clocks must agree within that. Inside the window a
//! captured datagram can be replayed; that changes no state (chitchat state is
//! versioned: an old value or heartbeat is ignored), it only makes the node answer, to
//! an address the replayer chooses. Gossip is not encrypted: it carries addresses,
//! region names and load, no secret.
//!
//! Size: the vendored chitchat (vendor/chitchat/TERN.md) keeps every message it builds
//! within 65,507 − `chitchat::TRANSPORT_RESERVED_LEN` bytes, so a message plus the 41
//! bytes added here fits the UDP limit (checked at compile time below). Only a SYN,
//! whose digest lists every node and is not cut to size by chitchat, could exceed it
//! (past roughly a thousand nodes); such a send fails and is counted
//! (`tern_gossip_oversize_total`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ClusterError;

mod reserved;

pub use reserved::reserve_udp_port;
use reserved::take_reserved;

type HmacSha256 = Hmac<Sha256>;

/// The largest UDP payload IPv4 carries (65,535 − 20 IP − 8 UDP header bytes).
pub const UDP_PAYLOAD_MAX: usize = 65_507;
/// Datagram layout version.
const VERSION: u8 = 1;
/// Version byte and send time.
const HEADER_LEN: usize = 1 + 8;
const TAG_LEN: usize = 32;
/// What this transport adds to each chitchat message.
pub const OVERHEAD_LEN: usize = HEADER_LEN + TAG_LEN;
/// A datagram sent longer ago than this, or this far ahead of the receiver's clock, is
/// refused.
pub const SKEW_MAX_MS: u64 = 60_000;
/// Rejections are logged at debug each, and as a warning at most this often.
pub const REJECTION_WARNING_INTERVAL: Duration = Duration::from_secs(10);

const _: () = assert!(OVERHEAD_LEN <= chitchat::TRANSPORT_RESERVED_LEN);
const _: () = assert!(chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE + OVERHEAD_LEN <= UDP_PAYLOAD_MAX);

/// The cluster's shared gossip key: 32 bytes, written as 64 hex digits in a key file
/// (`[cluster] gossip_key`). Its `Debug` does not show it, and it has no `==` (which
/// would not be constant-time).
#[derive(Clone)]
pub struct GossipKey([u8; GossipKey::LEN]);

impl GossipKey {
    pub const LEN: usize = 32;

    /// A new key from the operating system's randomness (through `rand`'s CSPRNG).
    pub fn random() -> GossipKey {
        GossipKey(rand::random())
    }

    /// Parses 64 hex digits (either case), surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<GossipKey, ClusterError> {
        let text = text.trim();
        let all_hex = text.bytes().all(|b| b.is_ascii_hexdigit());
        if text.len() != 2 * Self::LEN || !all_hex {
            return Err(ClusterError::GossipKey(format!(
                "expected {} hex digits ({} bytes), found {} characters{}",
                2 * Self::LEN,
                Self::LEN,
                text.chars().count(),
                if all_hex { "" } else { ", not all hex digits" }
            )));
        }
        let mut key = [0u8; Self::LEN];
        for (byte, pair) in key.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = hex_value(pair[0]) << 4 | hex_value(pair[1]);
        }
        Ok(GossipKey(key))
    }

    /// 64 lowercase hex digits (the key file's content).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A secret for another purpose, derived from this key and `label` (HMAC-SHA256 of
    /// the label), so every member derives the same one and neither reveals the other:
    /// the edge signs connection keys with one (`tern_edge`'s per-connection push).
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 keyed with this key, ready to clone per datagram.
    fn mac(&self) -> HmacSha256 {
        // HMAC zero-pads a short key to the hash's block size; doing it here lets the
        // infallible constructor be used (no panicking path).
        let mut key = hmac::digest::Key::<HmacSha256>::default();
        key[..Self::LEN].copy_from_slice(&self.0);
        <HmacSha256 as Mac>::new(&key)
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

/// The value of an ASCII hex digit (the caller checked it is one).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// Why a received datagram was dropped (the `reason` label of
/// `tern_gossip_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// Shorter than the header and tag.
    Short,
    /// The tag is not the MAC of the datagram under our key (forged, corrupted, or
    /// another cluster's key).
    Tag,
    /// Authentic, but a layout version this build does not know.
    Version,
    /// Authentic, but sent more than [`SKEW_MAX_MS`] away from our clock (a replay, or
    /// clocks that disagree).
    Stale,
    /// Authentic and fresh, but not a chitchat message this build can decode.
    Decode,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::Short => "short",
            Rejection::Tag => "tag",
            Rejection::Version => "version",
            Rejection::Stale => "stale",
            Rejection::Decode => "decode",
        }
    }
}

/// Frames an encoded chitchat message: header, the message, the tag. `datagram` is
/// cleared first.
fn seal(
    mac: &HmacSha256,
    sent_at_ms: u64,
    datagram: &mut Vec<u8>,
    message: impl FnOnce(&mut Vec<u8>),
) {
    datagram.clear();
    datagram.push(VERSION);
    datagram.extend_from_slice(&sent_at_ms.to_be_bytes());
    message(datagram);
    let mut mac = mac.clone();
    mac.update(datagram);
    datagram.extend_from_slice(&mac.finalize().into_bytes());
}

/// The message bytes of an authentic datagram sent within [`SKEW_MAX_MS`] of `now_ms`.
/// Nothing but the length is looked at before the tag is verified (in constant time).
fn open<'a>(mac: &HmacSha256, now_ms: u64, datagram: &'a [u8]) -> Result<&'a [u8], Rejection> {
    if datagram.len() < OVERHEAD_LEN {
        return Err(Rejection::Short);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    let mut mac = mac.clone();
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| Rejection::Tag)?;
    let (header, message) = signed.split_at(HEADER_LEN);
    if header[0] != VERSION {
        return Err(Rejection::Version);
    }
    let mut sent_at = [0u8; 8];
    sent_at.copy_from_slice(&header[1..]);
    if u64::from_be_bytes(sent_at).abs_diff(now_ms) > SKEW_MAX_MS {
        return Err(Rejection::Stale);
    }
    Ok(message)
}

/// The chitchat message of a received datagram ([`open`], then chitchat's decoder), or
/// why it is dropped.
fn decode_datagram(
    mac: &HmacSha256,
    now_ms: u64,
    datagram: &[u8],
) -> Result<ChitchatEnvelope, Rejection> {
    open(mac, now_ms, datagram).and_then(|mut message| {
        ChitchatEnvelope::deserialize(&mut message).map_err(|_| Rejection::Decode)
    })
}

/// What a gossip socket does with a received datagram, for the fuzzer (`fuzz/`); the
/// error is the rejection's metric label. Not part of the crate's API.
#[doc(hidden)]
pub fn fuzz_decode_datagram(
    key: &GossipKey,
    now_ms: u64,
    datagram: &[u8],
) -> Result<ChitchatEnvelope, &'static str> {
    decode_datagram(&key.mac(), now_ms, datagram).map_err(Rejection::label)
}

fn now_ms() -> u64 {
    crate::now_ms().max(0) as u64
}

/// What the transport refused, shared by every socket it opened.
#[derive(Debug, Default)]
pub struct GossipStats {
    rejected: AtomicU64,
}

impl GossipStats {
    /// Datagrams dropped on receipt (any [`Rejection`]) since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// chitchat's transport for Tern: UDP, every datagram sealed with the gossip key.
pub struct AuthenticatedUdp {
    key: GossipKey,
    stats: Arc<GossipStats>,
}

impl AuthenticatedUdp {
    pub fn new(key: GossipKey, stats: Arc<GossipStats>) -> AuthenticatedUdp {
        AuthenticatedUdp { key, stats }
    }
}

// chitchat's traits are `async_trait` and return `anyhow` errors; both stay inside this
// file.
#[async_trait::async_trait]
impl Transport for AuthenticatedUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = match take_reserved(listen_addr) {
            Some(reserved) => {
                reserved.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(reserved)?
            }
            None => tokio::net::UdpSocket::bind(listen_addr)
                .await
                .with_context(|| format!("binding {listen_addr}/UDP for gossip"))?,
        };
        Ok(Box::new(AuthenticatedSocket {
            socket,
            mac: self.key.mac(),
            outgoing: Vec::with_capacity(UDP_PAYLOAD_MAX),
            incoming: vec![0; UDP_PAYLOAD_MAX].into_boxed_slice(),
            stats: self.stats.clone(),
            warned_at: None,
            rejected_unwarned: 0,
        }))
    }
}

struct AuthenticatedSocket {
    socket: tokio::net::UdpSocket,
    mac: HmacSha256,
    outgoing: Vec<u8>,
    /// One datagram; anything longer than the IPv4 limit arrives truncated and fails
    /// the tag.
    incoming: Box<[u8]>,
    stats: Arc<GossipStats>,
    /// When the last rejection warning was logged.
    warned_at: Option<Instant>,
    /// Rejections since then.
    rejected_unwarned: u64,
}

#[async_trait::async_trait]
impl Socket for AuthenticatedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("reading the gossip socket's address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        seal(&self.mac, now_ms(), &mut self.outgoing, |buf| {
            envelope.serialize(buf)
        });
        if self.outgoing.len() > UDP_PAYLOAD_MAX {
            metrics::counter!("tern_gossip_oversize_total").increment(1);
            anyhow::bail!(
                "gossip message of {} bytes is over the UDP limit ({UDP_PAYLOAD_MAX})",
                self.outgoing.len()
            );
        }
        let num_bytes_sent = self
            .socket
            .send_to(&self.outgoing, to)
            .await
            .with_context(|| format!("sending gossip to {to}"))?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel safe (chitchat drops it in a `select!`): the only await is the receive of
    /// one datagram; the rest is synchronous.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.incoming).await {
                Ok(received) => received,
                Err(err) if is_transient(&err) => {
                    tracing::debug!(error = %err, "transient gossip receive error");
                    continue;
                }
                Err(err) => return Err(err).context("gossip socket receive failed"),
            };
            match decode_datagram(&self.mac, now_ms(), &self.incoming[..len]) {
                Ok(envelope) => {
                    return Ok(RecvOutcome {
                        from_addr,
                        envelope,
                        num_bytes_received: len,
                    })
                }
                Err(reason) => self.rejected(from_addr, len, reason),
            }
        }
    }
}

impl AuthenticatedSocket {
    fn rejected(&mut self, from: SocketAddr, len: usize, reason: Rejection) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tern_gossip_rejected_total", "reason" => reason.label()).increment(1);
        tracing::debug!(%from, len, reason = reason.label(), "dropped a gossip datagram");
        self.rejected_unwarned += 1;
        let now = Instant::now();
        if self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= REJECTION_WARNING_INTERVAL)
        {
            tracing::warn!(
                %from,
                reason = reason.label(),
                dropped = self.rejected_unwarned,
                "dropped gossip datagrams that are not authentic under cluster.gossip_key \
                 (another cluster's key, a forgery, or clocks more than 60 s apart)"
            );
            self.warned_at = Some(now);
            self.rejected_unwarned = 0;
        }
    }
}

/// Receive errors after which the socket still works (as chitchat's own transport).
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::OutOfMemory
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> GossipKey {
        GossipKey([byte; GossipKey::LEN])
    }

    fn sealed(key: &GossipKey, sent_at_ms: u64, message: &[u8]) -> Vec<u8> {
        let mut datagram = Vec::new();
        seal(&key.mac(), sent_at_ms, &mut datagram, |buf| {
            buf.extend_from_slice(message)
        });
        datagram
    }

    /// A sealed message opens under the same key within the clock window, and the
    /// datagram is exactly the message plus the overhead.
    #[test]
    fn sealed_messages_open_under_the_same_key() {
        let datagram = sealed(&key(1), 1_000_000, b"hello");
        assert_eq!(datagram.len(), 5 + OVERHEAD_LEN);
        for now in [1_000_000, 1_000_000 + SKEW_MAX_MS, 1_000_000 - SKEW_MAX_MS] {
            assert_eq!(open(&key(1).mac(), now, &datagram), Ok(&b"hello"[..]));
        }
        let empty = sealed(&key(1), 5, b"");
        assert_eq!(open(&key(1).mac(), 5, &empty), Ok(&b""[..]));
    }

    /// Another key, any flipped bit, a truncation or an extension fails the tag; short
    /// datagrams are refused before any MAC is computed.
    #[test]
    fn forged_or_damaged_datagrams_are_refused() {
        let datagram = sealed(&key(1), 1_000, b"some gossip");
        assert_eq!(open(&key(2).mac(), 1_000, &datagram), Err(Rejection::Tag));
        for i in 0..datagram.len() {
            for bit in 0..8 {
                let mut damaged = datagram.clone();
                damaged[i] ^= 1 << bit;
                assert_eq!(open(&key(1).mac(), 1_000, &damaged), Err(Rejection::Tag));
            }
        }
        let mut longer = datagram.clone();
        longer.push(0);
        assert_eq!(open(&key(1).mac(), 1_000, &longer), Err(Rejection::Tag));
        assert_eq!(
            open(&key(1).mac(), 1_000, &datagram[1..]),
            Err(Rejection::Tag)
        );
        for len in 0..OVERHEAD_LEN {
            assert_eq!(
                open(&key(1).mac(), 1_000, &datagram[..len]),
                Err(Rejection::Short)
            );
        }
    }

    /// An authentic datagram sent more than the window before or after the receiver's
    /// clock is refused (replay guard); an unknown layout version is refused.
    #[test]
    fn stale_future_and_unknown_version_are_refused() {
        let sent = 10_000_000;
        let datagram = sealed(&key(1), sent, b"x");
        let mac = key(1).mac();
        assert_eq!(
            open(&mac, sent + SKEW_MAX_MS + 1, &datagram),
            Err(Rejection::Stale)
        );
        assert_eq!(
            open(&mac, sent - SKEW_MAX_MS - 1, &datagram),
            Err(Rejection::Stale)
        );
        assert_eq!(
            open(&mac, 0, &sealed(&key(1), u64::MAX, b"x")),
            Err(Rejection::Stale)
        );
        let mut other_version = Vec::new();
        seal(&mac, sent, &mut other_version, |buf| buf.push(b'x'));
        other_version[0] = 2;
        let tag_start = other_version.len() - TAG_LEN;
        let mut retag = mac.clone();
        retag.update(&other_version[..tag_start]);
        other_version.truncate(tag_start);
        other_version.extend_from_slice(&retag.finalize().into_bytes());
        assert_eq!(open(&mac, sent, &other_version), Err(Rejection::Version));
    }

    /// A derived secret is the same for every holder of the key and differs by label
    /// and by key (so it gives nothing of the gossip key away to its other users).
    #[test]
    fn derived_secrets_follow_key_and_label() {
        assert_eq!(key(1).derive(b"a"), key(1).derive(b"a"));
        assert_ne!(key(1).derive(b"a"), key(1).derive(b"b"));
        assert_ne!(key(1).derive(b"a"), key(2).derive(b"a"));
    }

    /// Keys round-trip through hex; malformed key text is refused with a reason.
    #[test]
    fn keys_parse_from_64_hex_digits() {
        let key = GossipKey::random();
        assert_eq!(GossipKey::from_hex(&key.to_hex()).unwrap().0, key.0);
        assert_eq!(
            GossipKey::from_hex(&format!("  {}\n", key.to_hex().to_uppercase()))
                .unwrap()
                .0,
            key.0
        );
        assert_ne!(GossipKey::random().0, key.0);
        let abc = GossipKey::from_hex(&"0aBf".repeat(16)).unwrap();
        assert_eq!(abc.0[..2], [0x0a, 0xbf]);
        for bad in [
            "",
            "00",
            &"0".repeat(63),
            &"0".repeat(65),
            &"g".repeat(64),
            &"+f".repeat(32),
        ] {
            let err = GossipKey::from_hex(bad).unwrap_err().to_string();
            assert!(err.contains("64 hex digits"), "{bad:?}: {err}");
        }
        assert_eq!(format!("{key:?}"), "GossipKey(..)");
    }

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: chitchat::ProtocolVersion::V0,
            message: chitchat::ChitchatMessage::BadCluster,
        }
    }

    /// Over real loopback sockets: a message from a socket with the same key arrives;
    /// garbage from a plain UDP socket, a datagram shorter than the tag and a message
    /// sealed with another key are dropped and counted, and receiving goes on.
    #[tokio::test]
    async fn the_transport_delivers_authentic_messages_only() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let stats = Arc::new(GossipStats::default());
        let mut receiver = AuthenticatedUdp::new(key(1), stats.clone())
            .open(loopback)
            .await
            .unwrap();
        let to = receiver.local_addr().unwrap();
        let mut friend = AuthenticatedUdp::new(key(1), Arc::default())
            .open(loopback)
            .await
            .unwrap();
        let mut stranger = AuthenticatedUdp::new(key(2), Arc::default())
            .open(loopback)
            .await
            .unwrap();
        let plain = tokio::net::UdpSocket::bind(loopback).await.unwrap();
        plain
            .send_to(b"junk that is long enough to hold a tag....", to)
            .await
            .unwrap();
        plain.send_to(&[1; OVERHEAD_LEN - 1], to).await.unwrap();
        plain.send_to(&[], to).await.unwrap();
        stranger.send(to, bad_cluster()).await.unwrap();
        let sent = friend.send(to, bad_cluster()).await.unwrap();
        let got = receiver.recv().await.unwrap();
        assert_eq!(got.envelope, bad_cluster());
        assert_eq!(got.from_addr, friend.local_addr().unwrap());
        assert_eq!(got.num_bytes_received, sent.num_bytes_sent);
        assert_eq!(stats.rejected(), 4);
    }

    /// The largest message chitchat builds, sealed, is a datagram UDP carries: it
    /// crosses loopback whole and opens.
    #[tokio::test]
    async fn a_maximal_message_fits_one_datagram() {
        let message = vec![7u8; chitchat::MAX_UDP_DATAGRAM_PAYLOAD_SIZE];
        let datagram = sealed(&key(3), now_ms(), &message);
        assert!(datagram.len() <= UDP_PAYLOAD_MAX);
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender
            .send_to(&datagram, receiver.local_addr().unwrap())
            .await
            .unwrap();
        let mut buf = vec![0; UDP_PAYLOAD_MAX];
        let (len, _) = receiver.recv_from(&mut buf).await.unwrap();
        assert_eq!(len, datagram.len());
        assert_eq!(open(&key(3).mac(), now_ms(), &buf[..len]), Ok(&message[..]));
    }
}
