//! Recovery after a restart with a store that survives it (the disk store). A node
//! stores each event it accepts before (or while) it sends it to its peers; one that
//! crashes in between restarts with events in its store that no peer has. It restarts
//! under a new origin, and its hub reopens a channel with only its own new position
//! (`Journal::restore`), so nobody would ever list, ask for or send those events: they
//! stayed in this node's history only, never reached a subscriber elsewhere, nor the
//! other regions' history (the simulation with stores that survive restarts: 115 of
//! 2,000 seeds; publishes its origin stored and crashed before sending).
//!
//! So a restarted node takes its earlier incarnations' recent events from its store
//! back into its hub, as that earlier origin's ([`adopt`]): the channel's cursor then
//! lists them, `Heads` carry them to the channel's homes and interested peers, which
//! ask for a dead origin's events at once, and repair answers them from the log. A peer
//! that had them takes them as duplicates.
//!
//! Bounds: only what the channel log can hold and answer from (its count, and events
//! younger than its age limit: older ones it would drop at once), so a node down for
//! longer than the log's age limit recovers nothing, and its store keeps the rest as
//! history only. The earlier origins a node remembers: [`ORIGINS_KEPT`].

use tern_core::{ChannelKey, CoreError, Hub, RemoteEvent, RemoteOutcome};

/// How many of its earlier origins a node remembers (one per start).
pub const ORIGINS_KEPT: usize = 16;

/// The oldest event time (ms) worth recovering at `now_ms`: the channel log keeps
/// events younger than its age limit only.
pub fn since_ms(hub: &Hub, now_ms: i64) -> i64 {
    now_ms.saturating_sub(hub.limits().log.age_max_ms)
}

/// Takes one earlier origin's stored events of `key` (any order; all of one origin)
/// into the hub as that origin's: the newest the log can hold, each hole before or
/// between them skipped (no log has them: the store missed them, or they were older).
/// Returns how many were applied. A channel the hub already holds past them (a peer
/// sent them first) takes them as duplicates.
pub fn adopt(
    hub: &Hub,
    key: &ChannelKey,
    mut events: Vec<RemoteEvent>,
    now_ms: i64,
) -> Result<usize, CoreError> {
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    let keep = hub.limits().log.events_max;
    if events.len() > keep {
        events.drain(..events.len() - keep);
    }
    let mut applied = 0;
    for event in events {
        let (origin, seq) = (event.origin, event.seq);
        if hub.cursor(key).get(origin) + 1 < seq {
            hub.skip_remote_kept(key, origin, seq - 1, now_ms)?;
        }
        if let RemoteOutcome::Applied(n) = hub.apply_remote(key, event, now_ms)? {
            applied += n;
        }
    }
    Ok(applied)
}

/// Which earlier origins of this node to look for in a channel's stored cursor: those
/// in `earlier` that the cursor lists (`(origin, seq)` pairs).
pub fn earlier_in(cursor: &[(u64, u64)], earlier: &[u64]) -> Vec<u64> {
    cursor
        .iter()
        .map(|&(origin, _)| origin)
        .filter(|origin| earlier.contains(origin))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::{CoreLimits, OriginId};

    /// The events an origin published on `key` (as its hub built them).
    fn published(origin: u64, count: usize) -> (ChannelKey, Vec<RemoteEvent>) {
        let (hub, key) = crate::test_support::hub_with(origin, count);
        let events = hub
            .events_of(&key, OriginId(origin), 1, count as u64)
            .iter()
            .map(|event| RemoteEvent::from_event(event))
            .collect();
        (key, events)
    }

    #[test]
    fn adopted_events_are_in_the_log_and_holes_skipped() {
        let (key, events) = published(7, 5);
        let restarted = Hub::new(OriginId(8), CoreLimits::default());
        // The store lacks seq 3 (say a commit failed); the rest come in any order.
        let stored: Vec<RemoteEvent> = [5, 1, 4, 2]
            .iter()
            .map(|&seq| events[seq - 1].clone())
            .collect();
        assert_eq!(adopt(&restarted, &key, stored, 0).unwrap(), 4);
        assert_eq!(restarted.cursor(&key).get(OriginId(7)), 5);
        let logged: Vec<u64> = restarted
            .events_of(&key, OriginId(7), 1, 5)
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            logged,
            vec![1, 2, 4, 5],
            "a peer asking is answered from the log"
        );
    }

    #[test]
    fn only_the_newest_the_log_holds_and_peers_events_are_duplicates() {
        let (key, events) = published(7, 6);
        let mut limits = CoreLimits::default();
        limits.log.events_max = 3;
        let restarted = Hub::new(OriginId(8), limits);
        restarted.apply_remote(&key, events[0].clone(), 0).unwrap();
        assert_eq!(adopt(&restarted, &key, events.clone(), 0).unwrap(), 3);
        let logged: Vec<u64> = restarted
            .events_of(&key, OriginId(7), 1, 6)
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(logged, vec![4, 5, 6]);
        assert_eq!(
            adopt(&restarted, &key, events, 0).unwrap(),
            0,
            "all duplicates"
        );
    }

    #[test]
    fn earlier_origins_are_found_in_a_stored_cursor() {
        assert_eq!(
            earlier_in(&[(1, 5), (2, 3), (9, 1)], &[9, 2, 4]),
            vec![2, 9]
        );
        assert!(earlier_in(&[(1, 5)], &[]).is_empty());
    }
}
