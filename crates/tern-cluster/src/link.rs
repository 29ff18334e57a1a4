//! QUIC links between nodes: one connection per pair of nodes, whichever dialed, and on
//! it one long-lived unidirectional stream per direction of length-prefixed frames, so
//! frames from one node arrive at the other in the order they were sent (per-origin FIFO
//! rides on this). When both nodes dial at once, the connection the node with the lower
//! address opened is kept and the other is closed; streams on it reopen on the kept one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::tls::{NodeIdentity, NODE_NAME};
use crate::wire::{self, FrameV1, FRAME_BYTES_MAX};
use crate::ClusterError;

fn link_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Link(e.to_string())
}

/// Inbound streams waiting for `accept`.
const INBOUND_QUEUE: usize = 1024;

/// A node's QUIC endpoint: accepts links from peers and opens links to them.
pub struct LinkEndpoint {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<LinkReceiver>>,
    /// Set once the endpoint no longer accepts connections (closed).
    closed: tokio::sync::watch::Receiver<bool>,
}

struct Shared {
    /// This endpoint's address, as peers know it (it breaks ties between connections).
    local: SocketAddr,
    /// The one connection per peer address, and whether we dialed it. Bounded by the
    /// peers that hold a certificate of the cluster CA.
    connections: Mutex<HashMap<SocketAddr, (Connection, bool)>>,
    inbound: mpsc::Sender<LinkReceiver>,
}

impl Shared {
    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, (Connection, bool)>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `connection` the pair's connection unless a live one opened by the lower
    /// address exists; returns the one to use. Streams the peer opens on it become
    /// inbound links.
    fn adopt(self: &Arc<Self>, connection: Connection, dialed: bool) -> Connection {
        let peer = connection.remote_address();
        let opener = |dialed: bool| if dialed { self.local } else { peer };
        let mut connections = self.connections();
        if let Some((existing, existing_dialed)) = connections.get(&peer) {
            let live = existing.close_reason().is_none();
            if live && existing.stable_id() != connection.stable_id() {
                if opener(*existing_dialed) < opener(dialed) {
                    connection.close(0u32.into(), b"duplicate");
                    return existing.clone();
                }
                existing.close(0u32.into(), b"duplicate");
            } else if live {
                return existing.clone();
            }
        }
        connections.insert(peer, (connection.clone(), dialed));
        drop(connections);
        tokio::spawn(accept_streams(self.clone(), connection.clone()));
        connection
    }
}

/// Hands every stream the peer opens on `connection` to `accept`, until it closes.
async fn accept_streams(shared: Arc<Shared>, connection: Connection) {
    while let Ok(stream) = connection.accept_uni().await {
        let link = LinkReceiver {
            stream,
            connection: connection.clone(),
        };
        if shared.inbound.send(link).await.is_err() {
            return;
        }
    }
    let mut connections = shared.connections();
    let peer = connection.remote_address();
    if connections
        .get(&peer)
        .is_some_and(|(c, _)| c.stable_id() == connection.stable_id())
    {
        connections.remove(&peer);
    }
}

impl LinkEndpoint {
    /// Binds `addr` with mutual TLS from `identity` and starts accepting peers (call
    /// inside a tokio runtime).
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<LinkEndpoint, ClusterError> {
        let server = QuicServerConfig::try_from(identity.server_config()?).map_err(link_err)?;
        let client = QuicClientConfig::try_from(identity.client_config()?).map_err(link_err)?;
        let mut endpoint =
            Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(server)), addr)
                .map_err(link_err)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        let shared = Arc::new(Shared {
            local: endpoint.local_addr().map_err(link_err)?,
            connections: Mutex::new(HashMap::new()),
            inbound: tx,
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
                        Ok(connection) => {
                            shared.adopt(connection, false);
                        }
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
    /// duplicates are closed).
    pub fn connection_count(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Opens a link to a peer: one ordered outbound stream on the pair's connection,
    /// dialing it if there is none.
    pub async fn connect(&self, peer: SocketAddr) -> Result<LinkSender, ClusterError> {
        let existing = self
            .shared
            .connections()
            .get(&peer)
            .filter(|(c, _)| c.close_reason().is_none())
            .map(|(c, _)| c.clone());
        let connection = match existing {
            Some(connection) => connection,
            None => {
                let dialed = self
                    .endpoint
                    .connect(peer, NODE_NAME)
                    .map_err(link_err)?
                    .await
                    .map_err(link_err)?;
                self.shared.adopt(dialed, true)
            }
        };
        let stream = connection.open_uni().await.map_err(link_err)?;
        Ok(LinkSender {
            stream,
            _connection: connection,
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

/// The sending half of a link.
pub struct LinkSender {
    stream: SendStream,
    /// Held so the connection lives as long as its stream.
    _connection: quinn::Connection,
}

impl LinkSender {
    /// Writes one frame; returns the bytes it took on the stream.
    pub async fn send(&mut self, frame: &FrameV1) -> Result<usize, ClusterError> {
        let bytes = wire::encode(frame);
        // The peer refuses (and drops the link on) anything over the limit: never send it.
        if bytes.len() > FRAME_BYTES_MAX + 1 {
            return Err(ClusterError::FrameTooLarge(bytes.len()));
        }
        let len = u32::try_from(bytes.len()).map_err(link_err)?;
        self.stream
            .write_all(&len.to_be_bytes())
            .await
            .map_err(link_err)?;
        self.stream.write_all(&bytes).await.map_err(link_err)?;
        Ok(4 + bytes.len())
    }

    /// Finishes the stream and waits until the peer has received everything.
    pub async fn finish(mut self) -> Result<(), ClusterError> {
        self.stream.finish().map_err(link_err)?;
        self.stream.stopped().await.map_err(link_err)?;
        Ok(())
    }
}

/// The receiving half of a link.
pub struct LinkReceiver {
    stream: RecvStream,
    connection: quinn::Connection,
}

impl LinkReceiver {
    /// The peer's endpoint address (its link listener: quinn uses one socket for both).
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The next frame, or `None` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<FrameV1>, ClusterError> {
        let mut len = [0u8; 4];
        match self.stream.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(link_err(e)),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > FRAME_BYTES_MAX + 1 {
            return Err(ClusterError::Wire(format!(
                "frame of {len} bytes is over the limit"
            )));
        }
        let mut bytes = vec![0u8; len];
        self.stream.read_exact(&mut bytes).await.map_err(link_err)?;
        wire::decode(&bytes).map(Some)
    }
}
