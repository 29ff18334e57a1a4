//! The node's history store as the replication driver uses it: copying history, the
//! handoff's pages, store reads for repairs, and commits before `Stored` acks.

use std::sync::Arc;

use tern_core::RemoteEvent;

use super::StoredChannel;
use crate::wire::{ItemPosV1, ItemV1};

/// This node's history store, as far as copying a channel's stored history to its new
/// home needs it. Implemented where the node is wired.
pub trait HistoryAccess: Send + Sync {
    /// The channel's stored cursor: per origin, the highest sequence stored (messages
    /// and presence together; empty when nothing is stored).
    fn cursor(&self, app: &str, channel: &str) -> Vec<(u64, u64)>;
    /// Up to `max` stored items of the channel strictly after `after`, oldest first, and
    /// whether more may follow. Blocking (a store read).
    fn page(
        &self,
        app: &str,
        channel: &str,
        presence: bool,
        after: Option<ItemPosV1>,
        max: usize,
    ) -> (Vec<ItemV1>, bool);
    /// Stores copied items; an item at a position already stored replaces it.
    fn put(&self, app: &str, channel: &str, presence: bool, items: Vec<ItemV1>);
    /// The stored events of `origin` on the channel within `from..=to` (any order),
    /// rebuilt from the history rows: what a repair for a channel not held in memory is
    /// answered with. A bounded read, newest first: also the sequence from which the
    /// events read are all there are (`from` when the read reached it). Blocking.
    fn events(
        &self,
        _app: &str,
        _channel: &str,
        _origin: u64,
        from: u64,
        _to: u64,
    ) -> (Vec<RemoteEvent>, u64) {
        (Vec::new(), from)
    }
    /// A page of the channels with stored messages, each with its stored cursor, after
    /// the page token `after` (`None`: the first page), and the next page's token
    /// (`None` after the last). Blocking (store reads).
    fn channels(&self, after: Option<Vec<u8>>, max: usize)
        -> (Vec<StoredChannel>, Option<Vec<u8>>);
}

/// A publish's reply, run with `true` once replicated (or `false` on timeout).
pub type ReplicaCallback = Box<dyn FnOnce(bool) + Send>;

/// The local history store as link acks need it (this crate does not depend on the
/// store's).
pub trait LocalStore: Send + Sync {
    /// Writes the store lost so far (appends refused, commits failed); only grows.
    fn lost_writes(&self) -> u64;
    /// Runs `then(true)` once everything journaled so far is committed and no write was
    /// lost since [`Self::lost_writes`] returned `since`; `then(false)` otherwise.
    fn after_committed(&self, since: u64, then: Box<dyn FnOnce(bool) + Send>);
}

/// Waits for the local history store.
pub type Barrier = Arc<dyn LocalStore>;
