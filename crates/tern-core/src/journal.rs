//! The hub's one outward hook: every applied event, in order, for the history store and
//! the cluster. Below both `hub` and `channel`, which call it.

use std::sync::Arc;

use crate::cursor::Cursor;
use crate::event::ChannelEvent;
use crate::key::ChannelKey;

/// Receives every event applied to any channel, in each channel's sequence order, under
/// the channel lock (so keep it short: queue, don't write). The history store hangs here.
pub trait Journal: Send + Sync {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>);

    /// The channel's cursor as recorded so far (the highest sequence per origin), read
    /// when the hub creates a channel it does not hold, such as one it dropped while
    /// idle. The channel continues from it: this node's own sequence must never restart,
    /// or every node still holding the channel would take the new events for
    /// duplicates. Called outside every hub lock; may block briefly (one store read).
    fn restore(&self, _key: &ChannelKey) -> Cursor {
        Cursor::new()
    }

    /// The channel got its first local attachment (`true`) or lost its last one
    /// (`false`): a cluster routes a channel's events to a node only while it has
    /// subscribers there. Called under the channel lock, so only queue.
    fn interest(&self, _key: &ChannelKey, _attached: bool) {}

    /// Whether an idle channel may leave memory now (`Hub::sweep`). Its log goes with
    /// it, and a cluster answers peers' repairs from the log: while events this node sent
    /// on a channel are still unacknowledged by a peer, a repair of them would be
    /// answered with a `Skip` that moves the peer past events the link is about to
    /// resend. Called under the channel lock, so only look.
    fn may_drop(&self, _key: &ChannelKey) -> bool {
        true
    }
}
