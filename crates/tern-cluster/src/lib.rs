//! Tern cluster: what carries channel traffic between nodes: membership by gossip, the
//! inter-node wire format, QUIC (quinn) links with mutual TLS from a cluster CA, and
//! replication over them with `ack_replicas`, one copy per remote region through a relay,
//! routed by interest (a node receives a channel while it has subscribers or is its home).
//! The replication rules live in `tern-replication` (no I/O); this crate drives them.
//!
//! # Layout
//! - [`cluster`]: one node's cluster side assembled (endpoint + replicator + membership).
//! - [`membership`]: chitchat gossip over UDP: who is live, where to reach them.
//! - [`gossip_auth`]: the gossip transport: every datagram authenticated (HMAC-SHA256
//!   under the cluster's gossip key, with a send time against replays); a gossip port
//!   held from choosing it to binding it (`gossip_auth::reserved`, for `tern dev`).
//! - [`topology`]: `regions/topology.toml`, the emulated WAN between local regions.
//! - [`wire`]: versioned frames (`FrameV1`), bincode behind a version byte, with a size
//!   limit on decode; `wire::compact`: wire v2's compact event. With [`framing`], the
//!   one place that encodes and decodes peer bytes.
//! - [`framing`]: wire v2 records: several frames per record, zstd between regions.
//! - [`tls`]: the cluster CA and node identities (rcgen), rustls configs that require
//!   and verify a peer certificate signed by the CA, on both sides.
//! - [`link`]: QUIC endpoints and one ordered stream of frames per link direction; the
//!   per-connection wire-version probe; frames queued and written together.
//! - [`replicator`]: the driver of `tern_replication`'s rules over links: local-origin
//!   events out on reliable links (acked, resent), remote events applied in origin
//!   order, gaps repaired, replica acks; the emulated WAN's timer.

pub mod cluster;
pub mod framing;
pub mod gossip_auth;
pub mod link;
pub mod membership;
pub mod replicator;
pub mod tls;
pub mod topology;
pub mod wire;

/// Peers one node keeps links (and resend buffers) to. Gossip is what fills the member
/// list, so `cluster` bounds it here; the replicator bounds what it remembers per sender
/// by it too. Here, below both, so the replicator does not import `cluster`.
pub const PEERS_MAX: usize = 256;

/// Milliseconds since the Unix epoch (the cluster's one clock read).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Certificate generation or TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A QUIC endpoint, connection or stream failed.
    #[error("link: {0}")]
    Link(String),
    /// The endpoint stopped accepting links (it was closed or its accept task ended), or
    /// the connection under a link was closed (replaced by another link, or shut down):
    /// nothing more will come from it, so the caller stops or reconnects.
    #[error("endpoint or connection closed")]
    Closed,
    /// The gossip agent could not start.
    #[error("gossip: {0}")]
    Gossip(String),
    /// A gossip key is not 32 bytes written as 64 hex digits.
    #[error("gossip key: {0}")]
    GossipKey(String),
    /// Peer bytes were not a valid frame (wrong version, too large, undecodable).
    #[error("wire: {0}")]
    Wire(String),
    /// A peer's certificate does not name the node it claims to be, or names none (see
    /// `tls.rs`): the link is refused.
    #[error("identity: {0}")]
    Identity(String),
    /// A frame we were about to send is over the limit the peer enforces: it was not
    /// sent (nothing was written), and the link stays up.
    #[error("frame of {0} bytes is over the limit; not sent")]
    FrameTooLarge(usize),
}
