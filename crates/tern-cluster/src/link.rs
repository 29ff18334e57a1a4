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
    /// Whether we dialed it (the lower address's connection wins a tie).
    dialed: bool,
    /// The node its certificate names.
    node: NodeId,
    /// The highest wire version the peer reads, once its probe answer came.
    wire: Arc<AtomicU8>,
}

struct Shared {
    /// This endpoint's address, as peers know it (it breaks ties between connections).
    local: SocketAddr,
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
    /// opened by the lower address exists; returns the one to use and its node. Streams
    /// the peer opens on it become inbound links.
    fn adopt(
        self: &Arc<Self>,
        connection: Connection,
        dialed: bool,
        node: NodeId,
    ) -> (Connection, NodeId, Arc<AtomicU8>) {
        let peer = connection.remote_address();
        let opener = |dialed: bool| if dialed { self.local } else { peer };
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
        identity.node_id()?;
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
            local: endpoint.local_addr().map_err(link_err)?,
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
            _connection: connection,
            peer_wire: wire,
            v2: None,
            compress: None,
            out: Vec::new(),
            pending: Pending::default(),
            counters: None,
        })
    }

    /// Waits for the next link a peer opened (on a connection whose TLS handshake
    /// verified the peer's certificate).
    pub async fn accept(&self) -> Result<LinkReceiver, ClusterError> {
        let closed_err = || ClusterError::Link("endpoint closed".into());
        let mut closed = self.closed.clone();
        let mut inbound = self.inbound.lock().await;
        tokio::select! {
            link = inbound.recv() => link.ok_or_else(closed_err),
            _ = closed.wait_for(|c| *c) => Err(closed_err()),
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
    /// Held so the connection lives as long as its stream.
    _connection: quinn::Connection,
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
}

/// Bytes queued since the last flush, by kind (before compression), so the bytes a
/// flush writes can be counted as event or control bytes in proportion.
#[derive(Default)]
struct Pending {
    events: u64,
    control: u64,
}

impl LinkSender {
    /// Compresses v2 records with zstd at `level` (set before the first frame; links
    /// between regions).
    pub fn set_compression(&mut self, level: Option<i32>) {
        self.compress = level;
    }

    /// Counts the bytes each flush writes in `events` and `control`, split by what the
    /// frames were (in proportion to their uncompressed size).
    pub fn set_byte_counters(&mut self, events: metrics::Counter, control: metrics::Counter) {
        self.counters = Some((events, control));
    }

    /// Whether this link writes v2 records.
    pub fn is_v2(&self) -> bool {
        self.v2.is_some()
    }

    /// Writes one frame now (with whatever was queued before it); returns the bytes
    /// written.
    pub async fn send(&mut self, frame: &FrameV1) -> Result<usize, ClusterError> {
        self.queue(frame).await?;
        self.flush().await
    }

    /// Adds a frame to the next write. A batch that has grown large is written at once.
    /// Refused ([`ClusterError::FrameTooLarge`], nothing queued) when the peer would
    /// refuse the frame for its size.
    pub async fn queue(&mut self, frame: &FrameV1) -> Result<(), ClusterError> {
        let event = matches!(frame, FrameV1::Event(_));
        if self.v2.is_none()
            && self.out.is_empty()
            && self.peer_wire.load(Ordering::SeqCst) >= framing::VERSION_V2
        {
            self.v2 = Some(RecordEncoder::new(self.compress));
        }
        match &mut self.v2 {
            None => {
                let bytes = wire::encode(frame);
                // The peer refuses (and drops the link on) anything over the limit.
                if bytes.len() > FRAME_BYTES_MAX + 1 {
                    return Err(ClusterError::FrameTooLarge(bytes.len()));
                }
                let len = u32::try_from(bytes.len()).map_err(link_err)?;
                let before = self.out.len();
                self.out.extend(len.to_be_bytes());
                self.out.extend(bytes);
                let added = (self.out.len() - before) as u64;
                self.count_pending(event, added);
            }
            Some(encoder) => {
                let size = match frame {
                    FrameV1::Event(e) => e.frame.len(),
                    other => wire::encode(other).len(),
                };
                if size > FRAME_BYTES_MAX {
                    return Err(ClusterError::FrameTooLarge(size));
                }
                // A large frame goes in a record of its own, so no record is over the
                // limit the peer enforces.
                if !encoder.is_empty() && size > framing::BATCH_BYTES_MAX / 2 {
                    self.seal()?;
                }
                let encoder = self.v2.as_mut().expect("v2 checked above");
                let before = encoder.len();
                let after = encoder.push(frame);
                self.count_pending(event, (after - before) as u64);
                if after >= framing::BATCH_BYTES_MAX {
                    self.seal()?;
                }
            }
        }
        if self.out.len() >= framing::BATCH_BYTES_MAX {
            self.flush().await?;
        }
        Ok(())
    }

    fn count_pending(&mut self, event: bool, bytes: u64) {
        if event {
            self.pending.events += bytes;
        } else {
            self.pending.control += bytes;
        }
    }

    /// Ends the v2 batch as a record in `out`.
    fn seal(&mut self) -> Result<(), ClusterError> {
        let Some(encoder) = &mut self.v2 else {
            return Ok(());
        };
        let record = encoder.finish();
        if record.is_empty() {
            return Ok(());
        }
        // The encoder's tables already hold this record's items: a record the peer
        // would refuse cannot be skipped, so the link is dropped (a new one starts
        // with new tables) rather than sent out of step.
        if record.len() > FRAME_BYTES_MAX + 1 {
            return Err(ClusterError::Link(format!(
                "a record of {} bytes is over the limit",
                record.len()
            )));
        }
        let len = u32::try_from(record.len()).map_err(link_err)?;
        self.out.extend(len.to_be_bytes());
        self.out.extend(record);
        Ok(())
    }

    /// Writes everything queued; returns the bytes written.
    pub async fn flush(&mut self) -> Result<usize, ClusterError> {
        self.seal()?;
        if self.out.is_empty() {
            return Ok(0);
        }
        let out = std::mem::take(&mut self.out);
        let pending = std::mem::take(&mut self.pending);
        self.stream.write_all(&out).await.map_err(link_err)?;
        if let Some((events, control)) = &self.counters {
            let total = out.len() as u64;
            let queued = pending.events + pending.control;
            let event_share = (total * pending.events).checked_div(queued).unwrap_or(0);
            events.increment(event_share);
            control.increment(total - event_share);
        }
        Ok(out.len())
    }

    /// Finishes the stream and waits until the peer has received everything.
    pub async fn finish(mut self) -> Result<(), ClusterError> {
        self.flush().await?;
        self.stream.finish().map_err(link_err)?;
        self.stream.stopped().await.map_err(link_err)?;
        Ok(())
    }
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

impl LinkReceiver {
    /// The peer's endpoint address (its link listener: quinn uses one socket for both).
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The node the peer's verified certificate names.
    pub fn peer_node(&self) -> &str {
        &self.peer_node
    }

    /// The next frame, or `None` when the peer finished the stream. Bytes that are not
    /// a frame are an error (counted); so is a `Hello` naming another node than the
    /// peer's certificate, which also closes the connection.
    pub async fn recv(&mut self) -> Result<Option<FrameV1>, ClusterError> {
        let frame = match self.read_frame().await {
            Ok(frame) => frame,
            Err(ReadError::Link(err)) => return Err(err),
            Err(ReadError::Refused(refusal)) => {
                metrics::counter!("tern_cluster_frames_refused_total", "reason" => refusal.reason())
                    .increment(1);
                tracing::debug!(peer = %self.peer_node, error = %refusal, "frame refused; dropping the link");
                return Err(refusal.into());
            }
        };
        if let Some(FrameV1::Hello { node_id, .. }) = &frame {
            if **node_id != *self.peer_node {
                self.connection
                    .close(IDENTITY_REFUSED.into(), b"hello names another node");
                let detail = format!(
                    "its Hello says {node_id:?} but its certificate names {:?}",
                    self.peer_node
                );
                self.shared
                    .refuse(reason::NODE_ID_MISMATCH, &self.peer_node, &detail);
                return Err(ClusterError::Identity(detail));
            }
        }
        Ok(frame)
    }

    async fn read_frame(&mut self) -> Result<Option<FrameV1>, ReadError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(Some(frame));
            }
            let Some(record) = self.read_record().await? else {
                return Ok(None);
            };
            self.records
                .decode(&record, &mut self.frames)
                .map_err(ReadError::Refused)?;
        }
    }

    /// The next record's body (v1 or v2), or `None` at the end of the stream.
    async fn read_record(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let mut len = [0u8; 4];
        match self.stream.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return Err(ReadError::Refused(Refusal::Truncated))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(ReadError::Link(link_err(e))),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > FRAME_BYTES_MAX + 1 {
            return Err(ReadError::Refused(Refusal::TooLarge(len)));
        }
        // Grown as bytes arrive: a length prefix alone costs nothing.
        let mut bytes = Vec::with_capacity(len.min(READ_CHUNK_BYTES));
        while bytes.len() < len {
            let want = (len - bytes.len()).min(READ_CHUNK_BYTES);
            match self.stream.read_chunk(want, true).await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(ReadError::Refused(Refusal::Truncated)),
                Err(e) => return Err(ReadError::Link(link_err(e))),
            }
        }
        Ok(Some(bytes))
    }
}
