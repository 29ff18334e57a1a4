//! Gossip ports held from choosing to binding (`tern dev`): a node must advertise its
//! gossip address before it starts, so the port is bound here first and the socket
//! handed to the gossip transport when it opens that address.

use std::io;
use std::net::SocketAddr;

/// UDP sockets bound ahead of their node ([`reserve_udp_port`]), kept open until the
/// node's gossip opens its address.
static RESERVED: std::sync::Mutex<Vec<std::net::UdpSocket>> = std::sync::Mutex::new(Vec::new());

/// Binds a UDP socket on `host`, port chosen by the kernel, and keeps it open until a
/// gossip transport opens that address (`tern dev`, whose nodes must advertise a
/// concrete port before they start). Holding the socket closes the race in which the
/// port, once found free and released, went to another socket (another node's QUIC
/// endpoint, bound to port 0) before the gossip bound it.
pub fn reserve_udp_port(host: &str) -> io::Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind((host, 0))?;
    let addr = socket.local_addr()?;
    RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(socket);
    Ok(addr)
}

/// The reserved socket bound to `addr`, if any, handed over once.
pub(super) fn take_reserved(addr: SocketAddr) -> Option<std::net::UdpSocket> {
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let at = reserved
        .iter()
        .position(|socket| socket.local_addr().is_ok_and(|local| local == addr))?;
    Some(reserved.swap_remove(at))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chitchat::transport::Transport;

    use super::*;
    use crate::gossip_auth::{AuthenticatedUdp, GossipKey};

    /// A reserved port stays bound until the gossip opens it: no other socket can take
    /// it meanwhile, and the gossip gets that very socket.
    #[tokio::test]
    async fn a_reserved_port_is_held_until_the_gossip_opens_it() {
        let addr = reserve_udp_port("127.0.0.1").unwrap();
        assert!(
            std::net::UdpSocket::bind(addr).is_err(),
            "held while reserved"
        );
        let socket = AuthenticatedUdp::new(GossipKey([1; GossipKey::LEN]), Arc::default())
            .open(addr)
            .await
            .unwrap();
        assert_eq!(socket.local_addr().unwrap(), addr);
        assert!(take_reserved(addr).is_none(), "handed over once");
    }
}
