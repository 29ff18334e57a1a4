//! QUIC links between nodes. A link direction is one long-lived unidirectional stream
//! of length-prefixed frames, so frames from one node arrive at the other in the order
//! they were sent (per-origin FIFO rides on this).

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, RecvStream, SendStream};

use crate::tls::{NodeIdentity, NODE_NAME};
use crate::wire::{self, FrameV1, FRAME_BYTES_MAX};
use crate::ClusterError;

fn link_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Link(e.to_string())
}

/// A node's QUIC endpoint: accepts links from peers and opens links to them.
pub struct LinkEndpoint {
    endpoint: Endpoint,
}

impl LinkEndpoint {
    /// Binds `addr` with mutual TLS from `identity`.
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<LinkEndpoint, ClusterError> {
        let server = QuicServerConfig::try_from(identity.server_config()?).map_err(link_err)?;
        let client = QuicClientConfig::try_from(identity.client_config()?).map_err(link_err)?;
        let mut endpoint =
            Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(server)), addr)
                .map_err(link_err)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
        Ok(LinkEndpoint { endpoint })
    }

    /// Closes every link of this endpoint at once.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ClusterError> {
        self.endpoint.local_addr().map_err(link_err)
    }

    /// Opens a link to a peer: one ordered outbound stream.
    pub async fn connect(&self, peer: SocketAddr) -> Result<LinkSender, ClusterError> {
        let connection = self
            .endpoint
            .connect(peer, NODE_NAME)
            .map_err(link_err)?
            .await
            .map_err(link_err)?;
        let stream = connection.open_uni().await.map_err(link_err)?;
        Ok(LinkSender {
            stream,
            _connection: connection,
        })
    }

    /// Waits for the next peer link (after its TLS handshake, certificate verified).
    pub async fn accept(&self) -> Result<LinkReceiver, ClusterError> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or_else(|| ClusterError::Link("endpoint closed".into()))?;
        let connection = incoming.await.map_err(link_err)?;
        let stream = connection.accept_uni().await.map_err(link_err)?;
        Ok(LinkReceiver { stream, connection })
    }
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
