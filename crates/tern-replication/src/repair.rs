//! Gap repair. An event ahead of a missing one asks the node it came from for the
//! missing range; that node answers from its log, and what its cursor covers but its log
//! lacks (trimmed, or events that were no-ops there and never logged) with a `Skip`, so
//! the asker does not wait forever.

use std::sync::Arc;

use tern_core::{ChannelEvent, ChannelKey, Hub, OriginId};

/// One part of a repair answer, in the order it is sent.
#[derive(Clone, Debug)]
pub enum RepairPart {
    /// "Events of the origin up to here cannot be supplied": move past them.
    Skip(u64),
    Event(Arc<ChannelEvent>),
}

/// The answer of `hub` to a request for `origin`'s `from..=to` on `key`: nothing when it
/// has none of it; else a `Skip` over the part its log lacks, then the logged events.
pub fn answer(
    hub: &Hub,
    key: &ChannelKey,
    origin: OriginId,
    from: u64,
    to: u64,
) -> Vec<RepairPart> {
    let to = to.min(hub.cursor(key).get(origin));
    if to < from {
        return Vec::new();
    }
    let events = hub.events_of(key, origin, from, to);
    let first = events.first().map_or(to + 1, |e| e.seq);
    let mut parts = Vec::with_capacity(events.len() + 1);
    if first > from {
        parts.push(RepairPart::Skip(first - 1));
    }
    parts.extend(events.into_iter().map(RepairPart::Event));
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::{CoreLimits, Publisher};
    use tern_protocol::Message;

    fn hub_with(count: usize) -> (Hub, ChannelKey) {
        let hub = Hub::new(OriginId(7), CoreLimits::default());
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

    #[test]
    fn answers_from_the_log_within_the_cursor() {
        let (hub, key) = hub_with(3);
        let parts = answer(&hub, &key, OriginId(7), 2, 10);
        let seqs: Vec<u64> = parts
            .iter()
            .map(|p| match p {
                RepairPart::Event(e) => e.seq,
                RepairPart::Skip(_) => panic!("nothing to skip"),
            })
            .collect();
        assert_eq!(seqs, vec![2, 3]);
        assert!(answer(&hub, &key, OriginId(7), 4, 10).is_empty());
        assert!(answer(&hub, &key, OriginId(8), 1, 10).is_empty());
    }

    #[test]
    fn skips_what_the_log_no_longer_has() {
        let limits = CoreLimits::default();
        let (hub, key) = hub_with(limits.log.events_max + 5);
        let parts = answer(&hub, &key, OriginId(7), 1, 3);
        assert!(matches!(parts[..], [RepairPart::Skip(3)]), "{parts:?}");
    }
}
