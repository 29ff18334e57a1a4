//! Tern replication rules, without I/O: who gets an event, who is a channel's home,
//! which peers are interested, when a publish's `ack_replicas` is met, what a repair or
//! a `Sync` answers, what `Heads` anti-entropy asks for, when history is copied. No
//! tokio, no clock (every input that needs time takes `now`, a [`Now`] since the
//! caller's own epoch), no threads, no sockets.
//!
//! Two drivers run these same rules: `tern-cluster`'s replicator (QUIC links, tokio
//! loops, the WAN emulation) and `tern-sim` (a seeded event queue over a faulty
//! network), so every simulated seed tests the rules that ship.
//!
//! # Layout (one module per sub-protocol, tests beside each)
//! - [`routing`]: homes by rendezvous score, recipients of an event, the `Interest`
//!   table with its TTL.
//! - [`links`]: per-link positions, the bounded resend buffer, `Stored` acks, the
//!   receiver's contiguous prefix.
//! - [`acks`]: `ack_replicas` waiters as data: which publishes to answer, and how.
//! - [`repair`]: the answer to a gap repair (events from the log, `Skip` for the rest).
//! - [`heads`]: anti-entropy: what a node asks for when a peer's cursors arrive.
//! - [`inbound`]: which frames a node takes for a channel, by whether it keeps it.
//! - [`receive`]: the dispatch of a peer's frame, in order: the hub applies it, the
//!   gap book ([`receive::Gaps`]) watches and throttles, and what is left to the driver
//!   comes back as [`receive::Do`]s. Both drivers call it for every frame that changes
//!   state.
//! - [`warm`]: a first subscriber waiting for a channel's state (`Sync`), and the answer.
//! - [`backfill`]: a channel's new home copying stored history, one page at a time.
//! - [`handoff`]: after a membership change, telling a channel's new home of the
//!   channels in this node's store (held in memory or not).
//! - [`recover`]: after a restart with the disk store, taking this node's earlier
//!   incarnations' recent stored events back into its hub, so peers can ask for them.
//! - [`stalls`]: a dead origin's gap that no reachable node can fill, skipped after a
//!   while so the events held behind it are delivered.

pub mod acks;
pub mod backfill;
pub mod handoff;
pub mod heads;
pub mod inbound;
pub mod links;
pub mod receive;
pub mod recover;
pub mod repair;
pub mod routing;
pub mod stalls;
pub mod warm;

/// Time as the driver measures it: since its own epoch (the replicator's start, the
/// simulation's zero). The rules only compare and subtract it.
pub type Now = std::time::Duration;

#[cfg(test)]
mod test_support {
    use tern_core::{ChannelKey, CoreLimits, Hub, OriginId, Publisher};
    use tern_protocol::Message;

    /// A hub of origin `origin` on which `count` one-message publishes were made to
    /// `app`/`room` (sequences 1..=count).
    pub(crate) fn hub_with(origin: u64, count: usize) -> (Hub, ChannelKey) {
        let hub = Hub::new(OriginId(origin), CoreLimits::default());
        let key = ChannelKey::new("app", "room");
        for i in 0..count {
            let publisher = Publisher {
                connection_id: None,
                frame_id: format!("f{i}"),
            };
            let message = Message {
                name: Some(format!("m{i}")),
                ..Default::default()
            };
            hub.publish(&key, &publisher, vec![message], 0).unwrap();
        }
        (hub, key)
    }
}
