//! What a node takes from a peer's link by whether it keeps the channel. A node keeps a
//! channel ([`keeps`]) while it has subscribers on it, waits for its state, or is its
//! home in its region; it repairs such a channel from `Heads`, and routing sends it the
//! channel's events. What the frame would do to a channel the node does not keep is the
//! rule here: an answer meant for a predecessor (a node that restarted while its
//! request was in flight gets the answer by node id) or for interest since dropped must
//! not make a channel nobody routes to this node, and one the node does keep must be
//! taken even when the channel is not open here (dropped while idle).

/// Whether a node keeps a channel: a subscriber here, waiting for the channel's state
/// (`Sync`), or its home in this node's region. Asked in that order, each only if the
/// one before says no (the driver takes a lock for each, and the home is a rendezvous
/// over every node).
pub fn keeps(
    subscribed: impl FnOnce() -> bool,
    warming: impl FnOnce() -> bool,
    home_here: impl FnOnce() -> bool,
) -> bool {
    subscribed() || warming() || home_here()
}

/// What to do with a frame that changes a channel's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Apply it, opening the channel if it is not open.
    Open,
    /// Ignore it, counted under this reason.
    Ignore(&'static str),
}

/// An event. One on the link's order (`on_link`) was routed here by its sender and is
/// taken; one off it (a repair or `Sync` answer) only for a kept channel (`kept` is
/// asked only then: it takes the driver's locks).
pub fn event(on_link: bool, kept: impl FnOnce() -> bool) -> Take {
    if on_link || kept() {
        Take::Open
    } else {
        Take::Ignore("answer_unheld")
    }
}

/// A home's answer to `Sync` (`SyncMembers`, `Synced`): only for a kept channel.
pub fn sync_answer(kept: bool) -> Take {
    if kept {
        Take::Open
    } else {
        Take::Ignore("sync_answer_unheld")
    }
}

/// A `Skip` (events no peer can supply): a kept channel records it even if it is not
/// open here. Opened again after being dropped while idle, such a channel continues
/// only this node's own sequence; anti-entropy asks peers for the other origins'
/// events, and a `Skip` recorded nowhere would be asked for again every round. Any
/// other channel ignores it, as it ignores the answer's events ([`event`]): a `Skip`
/// is part of a repair answer, valid only with the events around it. Taken alone, it
/// moved the cursor of a node whose interest had just lapsed past events it never
/// applied; its `Heads` then claimed them, and its answer to the next asker was a
/// `Skip` over messages other nodes had (the soak's seed 59906: a restarted node's
/// subscriber lost four messages).
pub fn skip(kept: bool) -> Take {
    if kept {
        Take::Open
    } else {
        Take::Ignore("skip_unheld")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_channel_takes_what_opens_it_and_another_only_its_own_link() {
        assert!(keeps(|| true, || unreachable!(), || unreachable!()));
        assert!(keeps(|| false, || true, || unreachable!()));
        assert!(keeps(|| false, || false, || true));
        assert!(!keeps(|| false, || false, || false));
        assert_eq!(event(true, || unreachable!()), Take::Open);
        assert_eq!(event(false, || true), Take::Open);
        assert_eq!(event(false, || false), Take::Ignore("answer_unheld"));
        assert_eq!(sync_answer(true), Take::Open);
        assert_eq!(sync_answer(false), Take::Ignore("sync_answer_unheld"));
        assert_eq!(skip(true), Take::Open);
        assert_eq!(skip(false), Take::Ignore("skip_unheld"));
    }
}
