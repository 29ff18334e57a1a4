//! QUIC links between nodes: one connection per pair of nodes, whichever dialed, and on
//! it one long-lived unidirectional stream per direction of length-prefixed frames, so
//! frames from one node arrive at the other in the order they were sent (per-origin FIFO
//! rides on this). When both nodes dial at once, the connection the node with the lower
//! address opened is kept and the other is closed; streams on it reopen on the kept one.
//!
//! Identity: every connection is mutual TLS under the cluster CA, and the peer's node id
//! is read from its verified certificate (`tls::node_id_of`), once, when the handshake
//! completes. A connection whose certificate names no node is closed at once; a link
//! whose `Hello` names another node than the certificate closes its connection (so a
//! member cannot speak for another node: its acks, its origin); a dial to the address
//! gossip gives for a node that answers with another node's certificate opens no link.
//! Each is counted (`tern_cluster_hello_refused_total{reason}`) and logged as a warning
//! once per peer. Bytes that are not a frame drop the link they came on and are counted
//! (`tern_cluster_frames_refused_total{reason}`, see `wire::Refusal`).
//!
//! Wire version (issue 17): every node reads v1 and v2 records (`framing.rs`) on any
//! link, but a node of the previous release reads only v1. So on each connection a node
//! asks, on a bidirectional stream, whether the peer reads v2 ([`WIRE_PROBE`]); a node
//! of the previous release never accepts bidirectional streams and never answers, so
//! its peers go on sending it v1 while new nodes switch to v2 as soon as the answer
//! comes (the receiver tells records apart by their version byte, so a switch
//! mid-stream is safe). A node bound with [`LinkEndpoint::bind_v1_only`] behaves as the
//! previous release did on the wire (for rolling-upgrade tests).
//!
//! Bounds: one connection per node id (a newer one replaces it), at most
//! [`INBOUND_STREAMS_MAX`] streams open from a peer at once, and a frame's body is
//! buffered as it arrives, never allocated from its length prefix alone.

use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::framing::{self, RecordDecoder, RecordEncoder};
use crate::tls::{node_id_of, NodeIdError, NodeIdentity, NODE_NAME};
use crate::wire::{self, FrameV1, Refusal, FRAME_BYTES_MAX};
use crate::ClusterError;

mod receiver;
mod sender;

fn link_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Link(e.to_string())
}

/// Inbound streams waiting for `accept`.
const INBOUND_QUEUE: usize = 1024;
/// A frame's body is read in pieces of at most this, so what a peer announces in a
/// length prefix is not allocated before its bytes arrive.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Peers warned about once each (identity refusals); past this many, warnings start over.
const WARNED_PEERS_MAX: usize = 1_024;
/// Streams a peer may have open towards this node on its connection at once. A peer
/// uses one (a new one after a send fails); each may hold up to a frame's bytes while
/// it arrives, so this bounds what one connection can make this node buffer.
pub const INBOUND_STREAMS_MAX: u32 = 16;
/// What a node writes on a bidirectional stream to ask whether its peer reads wire v2,
/// and what a v2 node answers (then the highest version it reads).
pub const WIRE_PROBE: &[u8; 4] = b"TRNW";
/// How long a probe waits for an answer before taking the peer for a v1-only node.
const WIRE_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// `PeerConnection::wire` before the probe is answered (or after it timed out).
const WIRE_UNKNOWN: u8 = 0;
/// QUIC application close code of a connection refused for its identity.
const IDENTITY_REFUSED: u32 = 0x7e;

/// Why a link's peer identity was refused: the `reason` of
/// `tern_cluster_hello_refused_total`.
mod reason {
    /// The certificate names no node (issued before node ids, or unparsable).
    pub const NO_NODE_ID: &str = "no_node_id";
    /// A `Hello` names another node than the sender's certificate.
    pub const NODE_ID_MISMATCH: &str = "node_id_mismatch";
    /// The address dialed for one node answered with another node's certificate.
    pub const DIALED_OTHER_NODE: &str = "dialed_other_node";
}

/// A peer's node id, as its certificate names it.
type NodeId = Arc<str>;

/// A node's QUIC endpoint: accepts links from peers and opens links to them.
pub struct LinkEndpoint {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<LinkReceiver>>,
    /// Set once the endpoint no longer accepts connections (closed).
    closed: tokio::sync::watch::Receiver<bool>,
}

/// The pair's connection to one peer address.
struct PeerConnection {
    connection: Connection,
    /// Whether we dialed it (the connection the lower node id dialed wins a tie).
    dialed: bool,
    /// The node its certificate names.
    node: NodeId,
    /// The highest wire version the peer reads, once its probe answer came.
    wire: Arc<AtomicU8>,
}

struct Shared {
    /// This node's id (its certificate's): of two connections a pair dialed at once,
    /// the one the lower node id dialed stays. Both ends know both ids, so they keep
    /// the same one; addresses would not do (a node bound to 0.0.0.0 knows itself by
    /// another address than its peers see, and then each end keeps its own).
    me: NodeId,
    /// The one connection per peer address. Bounded by the peers that hold a
    /// certificate of the cluster CA.
    connections: Mutex<HashMap<SocketAddr, PeerConnection>>,
    inbound: mpsc::Sender<LinkReceiver>,
    /// Peers already warned about (identity refusals are logged at debug after the first).
    warned: Mutex<HashSet<String>>,
    /// Whether this node speaks wire v2 (asks and answers probes, sends v2 records).
    v2: bool,
}

/// The node id the peer's verified certificate names.
fn peer_node(connection: &Connection) -> Result<NodeId, NodeIdError> {
    let certificates = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(NodeIdError::Unparsable)?;
    let leaf = certificates.first().ok_or(NodeIdError::Unparsable)?;
    node_id_of(leaf).map(NodeId::from)
}

impl Shared {
    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, PeerConnection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an identity refusal and warns about it, once per `peer`.
    fn refuse(&self, reason: &'static str, peer: &str, detail: &str) {
        metrics::counter!("tern_cluster_hello_refused_total", "reason" => reason).increment(1);
        let first = {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            if warned.len() >= WARNED_PEERS_MAX {
                warned.clear();
            }
            warned.insert(peer.to_string())
        };
        if first {
            tracing::warn!(%peer, reason, "cluster link refused: {detail}");
        } else {
            tracing::debug!(%peer, reason, "cluster link refused: {detail}");
        }
    }

    /// Closes a connection whose certificate names no node.
    fn refuse_certificate(&self, connection: &Connection, error: NodeIdError) {
        connection.close(IDENTITY_REFUSED.into(), b"certificate names no node");
        let peer = connection.remote_address().to_string();
        self.refuse(reason::NO_NODE_ID, &peer, &error.to_string());
    }

    /// Makes `connection` (to the node `node`) the pair's connection unless a live one
    /// opened by the lower node id exists; returns the one to use and its node. Streams
    /// the peer opens on it become inbound links.
    fn adopt(
        self: &Arc<Self>,
        connection: Connection,
        dialed: bool,
        node: NodeId,
    ) -> (Connection, NodeId, Arc<AtomicU8>) {
        let peer = connection.remote_address();
        let opener = |dialed: bool| {
            if dialed {
                self.me.clone()
            } else {
                node.clone()
            }
        };
        let mut connections = self.connections();
        if let Some(existing) = connections.get(&peer) {
            let live = existing.connection.close_reason().is_none();
            if live && existing.connection.stable_id() != connection.stable_id() {
                if opener(existing.dialed) < opener(dialed) {
                    connection.close(0u32.into(), b"duplicate");
                    return existing.handles();
                }
                existing.connection.close(0u32.into(), b"duplicate");
            } else if live {
                return existing.handles();
            }
        }
        // One connection per node: a node back from another address (a restart) replaces
        // its old one, and a member cannot multiply what it makes this node buffer by
        // dialing from many ports.
        let replaced: Vec<SocketAddr> = connections
            .iter()
            .filter(|(addr, c)| **addr != peer && c.node == node)
            .map(|(addr, _)| *addr)
            .collect();
        for addr in replaced {
            if let Some(old) = connections.remove(&addr) {
                old.connection.close(0u32.into(), b"replaced");
            }
        }
        let wire = Arc::new(AtomicU8::new(WIRE_UNKNOWN));
        connections.insert(
            peer,
            PeerConnection {
                connection: connection.clone(),
                dialed,
                node: node.clone(),
                wire: wire.clone(),
            },
        );
        drop(connections);
        tokio::spawn(accept_streams(
            self.clone(),
            connection.clone(),
            node.clone(),
        ));
        if self.v2 {
            tokio::spawn(answer_probes(connection.clone()));
            tokio::spawn(probe(connection.clone(), wire.clone()));
        }
        (connection, node, wire)
    }
}

impl PeerConnection {
    fn handles(&self) -> (Connection, NodeId, Arc<AtomicU8>) {
        (
            self.connection.clone(),
            self.node.clone(),
            self.wire.clone(),
        )
    }
}

/// Answers wire probes on `connection` (see the module doc), until it closes. A peer
/// opens one per connection; each answer is a few bytes and the stream is finished.
async fn answer_probes(connection: Connection) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            let mut ask = [0u8; 5];
            let asked = tokio::time::timeout(WIRE_PROBE_TIMEOUT, recv.read_exact(&mut ask)).await;
            if matches!(asked, Ok(Ok(()))) && ask[..4] == WIRE_PROBE[..] {
                let mut answer = WIRE_PROBE.to_vec();
                answer.push(framing::VERSION_V2);
                let _ = send.write_all(&answer).await;
                let _ = send.finish();
            }
        });
    }
}

/// Asks the peer which wire versions it reads; records the answer in `wire` (v1 when
/// none comes: a node of the previous release).
async fn probe(connection: Connection, wire: Arc<AtomicU8>) {
    let ask = async {
        let (mut send, mut recv) = connection.open_bi().await.ok()?;
        let mut question = WIRE_PROBE.to_vec();
        question.push(framing::VERSION_V2);
        send.write_all(&question).await.ok()?;
        let mut answer = [0u8; 5];
        recv.read_exact(&mut answer).await.ok()?;
        (answer[..4] == WIRE_PROBE[..]).then_some(answer[4])
    };
    let version = tokio::time::timeout(WIRE_PROBE_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(wire::VERSION_V1);
    wire.store(version.min(framing::VERSION_V2), Ordering::SeqCst);
}

/// Hands every stream the peer opens on `connection` to `accept`, until it closes.
async fn accept_streams(shared: Arc<Shared>, connection: Connection, node: NodeId) {
    while let Ok(stream) = connection.accept_uni().await {
        let link = LinkReceiver {
            stream,
            connection: connection.clone(),
            peer_node: node.clone(),
            shared: shared.clone(),
            records: RecordDecoder::new(),
            frames: VecDeque::new(),
        };
        if shared.inbound.send(link).await.is_err() {
            return;
        }
    }
    let mut connections = shared.connections();
    let peer = connection.remote_address();
    if connections
        .get(&peer)
        .is_some_and(|c| c.connection.stable_id() == connection.stable_id())
    {
        connections.remove(&peer);
    }
}

impl LinkEndpoint {
    /// Binds `addr` with mutual TLS from `identity` and starts accepting peers (call
    /// inside a tokio runtime).
    /// Refuses an identity whose certificate names no node (peers would refuse it).
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<LinkEndpoint, ClusterError> {
        LinkEndpoint::bind_with(addr, identity, true)
    }

    /// [`LinkEndpoint::bind`] for a node that speaks wire v1 only, as the release
    /// before wire v2 did: it sends v1 frames and answers no probe. For tests of a
    /// cluster in the middle of a rolling upgrade.
    pub fn bind_v1_only(
        addr: SocketAddr,
        identity: &NodeIdentity,
    ) -> Result<LinkEndpoint, ClusterError> {
        LinkEndpoint::bind_with(addr, identity, false)
    }

    fn bind_with(
        addr: SocketAddr,
        identity: &NodeIdentity,
        v2: bool,
    ) -> Result<LinkEndpoint, ClusterError> {
        let me: NodeId = identity.node_id()?.into();
        let server = QuicServerConfig::try_from(identity.server_config()?).map_err(link_err)?;
        let client = QuicClientConfig::try_from(identity.client_config()?).map_err(link_err)?;
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(INBOUND_STREAMS_MAX));
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport);
        let mut endpoint = Endpoint::server(server, addr).map_err(link_err)?;
        endpoint.set_default_client_config(client);
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        let shared = Arc::new(Shared {
            me,
            connections: Mutex::new(HashMap::new()),
            inbound: tx,
            warned: Mutex::new(HashSet::new()),
            v2,
        });
        let accepting = endpoint.clone();
        let accepted = shared.clone();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _closed = scopeguard(closed_tx);
            while let Some(incoming) = accepting.accept().await {
                let shared = accepted.clone();
                // The TLS handshake (certificate verified) runs off the accept loop.
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(connection) => match peer_node(&connection) {
                            Ok(node) => {
                                shared.adopt(connection, false, node);
                            }
                            Err(err) => shared.refuse_certificate(&connection, err),
                        },
                        Err(err) => tracing::debug!(error = %err, "inbound connection failed"),
                    }
                });
            }
        });
        Ok(LinkEndpoint {
            endpoint,
            shared,
            inbound: tokio::sync::Mutex::new(rx),
            closed,
        })
    }

    /// Closes every link of this endpoint at once.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ClusterError> {
        self.endpoint.local_addr().map_err(link_err)
    }

    /// QUIC connections this endpoint has open, dialed or accepted (one per peer once
    /// duplicates are closed). Quinn counts a connection from its first packet until it
    /// has drained, so this includes handshakes still running and connections closing;
    /// [`LinkEndpoint::peer_nodes`] is what this endpoint has taken.
    pub fn connection_count(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// The live connections this endpoint has taken (handshake done on this side, node
    /// id read from the certificate), as the node each one's certificate names and the
    /// peer's address, sorted: at most one per node id.
    pub fn peer_nodes(&self) -> Vec<(String, SocketAddr)> {
        let mut peers: Vec<(String, SocketAddr)> = self
            .shared
            .connections()
            .iter()
            .filter(|(_, c)| c.connection.close_reason().is_none())
            .map(|(addr, c)| (c.node.to_string(), *addr))
            .collect();
        peers.sort();
        peers
    }

    /// The wire version each live connection's peer reads, by node id, as far as this
    /// endpoint knows: 2 (wire v2), 1 (a node of the previous release, or a probe not
    /// answered), 0 (not known yet). Sorted.
    pub fn peer_wire_versions(&self) -> Vec<(String, u8)> {
        let mut peers: Vec<(String, u8)> = self
            .shared
            .connections()
            .values()
            .filter(|c| c.connection.close_reason().is_none())
            .map(|c| (c.node.to_string(), c.wire.load(Ordering::SeqCst)))
            .collect();
        peers.sort();
        peers
    }

    /// QUIC's smoothed round-trip time to each connected peer node (the network's; the
    /// emulated WAN delay of `emulate_topology` is added above QUIC and not in it).
    pub fn peer_rtts(&self) -> Vec<(String, std::time::Duration)> {
        let mut rtts: Vec<(String, std::time::Duration)> = self
            .shared
            .connections()
            .values()
            .filter(|c| c.connection.close_reason().is_none())
            .map(|c| (c.node.to_string(), c.connection.rtt()))
            .collect();
        rtts.sort();
        rtts
    }

    /// Opens a link to the node `node_id` at `peer` (its address as gossip gives it):
    /// one ordered outbound stream on the pair's connection, dialing it if there is none.
    /// Refused ([`ClusterError::Identity`]) when the certificate at that address names
    /// another node or none.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        node_id: &str,
    ) -> Result<LinkSender, ClusterError> {
        let existing = self
            .shared
            .connections()
            .get(&peer)
            .filter(|c| c.connection.close_reason().is_none())
            .map(PeerConnection::handles);
        let (connection, node, wire) = match existing {
            Some(existing) => existing,
            None => {
                let dialed = self
                    .endpoint
                    .connect(peer, NODE_NAME)
                    .map_err(link_err)?
                    .await
                    .map_err(link_err)?;
                match peer_node(&dialed) {
                    Ok(node) => self.shared.adopt(dialed, true, node),
                    Err(err) => {
                        self.shared.refuse_certificate(&dialed, err);
                        return Err(ClusterError::Identity(format!("{peer}: {err}")));
                    }
                }
            }
        };
        if *node != *node_id {
            // Gossip is stale (another node took the address) or lies: this node's
            // frames are not for that one. The connection stays: it is that node's.
            let detail =
                format!("{peer} was dialed for {node_id} but its certificate names {node}");
            self.shared
                .refuse(reason::DIALED_OTHER_NODE, &node, &detail);
            return Err(ClusterError::Identity(detail));
        }
        let stream = connection.open_uni().await.map_err(link_err)?;
        Ok(LinkSender {
            stream,
            connection,
            peer_wire: wire,
            v2: None,
            compress: None,
            out: Vec::new(),
            pending: Pending::default(),
            counters: None,
            events_written: 0,
        })
    }

    /// Waits for the next link a peer opened (on a connection whose TLS handshake
    /// verified the peer's certificate). [`ClusterError::Closed`] once the endpoint is
    /// closed: no link will come again.
    pub async fn accept(&self) -> Result<LinkReceiver, ClusterError> {
        let mut closed = self.closed.clone();
        let mut inbound = self.inbound.lock().await;
        tokio::select! {
            link = inbound.recv() => link.ok_or(ClusterError::Closed),
            _ = closed.wait_for(|c| *c) => Err(ClusterError::Closed),
        }
    }
}

/// Sets the flag to `true` when dropped (the accept task ended, however it ended).
fn scopeguard(flag: tokio::sync::watch::Sender<bool>) -> impl Drop {
    struct Guard(tokio::sync::watch::Sender<bool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.send(true);
        }
    }
    Guard(flag)
}

/// The sending half of a link. Frames are queued ([`LinkSender::queue`]) and written
/// together ([`LinkSender::flush`]): one write, and on wire v2 one record, for all the
/// frames that were ready at once.
pub struct LinkSender {
    stream: SendStream,
    /// Held so the connection lives as long as its stream (and to see it close).
    connection: quinn::Connection,
    /// The highest wire version the peer reads (set by the connection's probe).
    peer_wire: Arc<AtomicU8>,
    /// The v2 encoder, once the peer is known to read v2.
    v2: Option<RecordEncoder>,
    /// zstd level for v2 records on this link (links between regions).
    compress: Option<i32>,
    /// Whole records (length prefix included) waiting for the next write.
    out: Vec<u8>,
    pending: Pending,
    counters: Option<(metrics::Counter, metrics::Counter)>,
    /// Event frames written so far (a flush that succeeded), not merely queued.
    events_written: u64,
}

/// Bytes queued since the last flush, by kind (before compression), so the bytes a
/// flush writes can be counted as event or control bytes in proportion.
#[derive(Default)]
struct Pending {
    events: u64,
    control: u64,
    /// Event frames queued since the last flush.
    event_frames: u64,
}

/// The receiving half of a link.
pub struct LinkReceiver {
    stream: RecvStream,
    connection: quinn::Connection,
    /// The node the peer's certificate names.
    peer_node: NodeId,
    shared: Arc<Shared>,
    records: RecordDecoder,
    /// Frames of the last record not yet returned.
    frames: VecDeque<FrameV1>,
}

/// Why reading a frame failed.
enum ReadError {
    /// The bytes are not a frame (counted, the link is dropped).
    Refused(Refusal),
    /// The stream or connection failed.
    Link(ClusterError),
}
