//! What a frame from a peer makes a node do, and in what order: the one dispatch both
//! drivers run. Each function takes the frame's content, changes the node's hub and its
//! gap book ([`Gaps`]) as the rules say, and returns what is left to the driver as
//! [`Do`]s, in the order to carry them out: frames to send, store reads, a backfill, a
//! waiting subscriber to release. The driver only carries them out (QUIC frames and
//! store tasks in `tern-cluster`, items in flight and a map in `tern-sim`).
//!
//! The frames that only answer (a `Repair`, a `Sync`, a `Backfill` page) are answered by
//! [`crate::repair`], [`crate::warm`] and [`crate::backfill`]; link positions and their
//! acks by [`crate::links`].

use std::ops::DerefMut;
use std::time::Duration;

use tern_core::{ChannelKey, CoreError, Hub, OriginId, RemoteEvent, RemoteOutcome};
use tern_protocol::PresenceMessage;

use crate::heads::{self, PreviousHeads};
use crate::inbound::{self, Take};
use crate::repair::Asked;
use crate::stalls::Stalls;
use crate::Now;

/// A node's book of the gaps in its hub.
#[derive(Default)]
pub struct Gaps {
    /// Watched, so a crashed origin's gap nobody fills is given up (`stalls`).
    pub stalls: Stalls,
    /// Asked for, once per round trip (`repair::Asked`).
    pub asked: Asked,
}

/// The node a frame reached: its hub and its clocks (the rules' `now`, the hub's
/// milliseconds).
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub hub: &'a Hub,
    pub now: Now,
    pub now_ms: i64,
}

/// What is left to the driver, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Do {
    /// Ask the frame's sender for `origin`'s `from..=to` on `key` (a `Repair`).
    Ask {
        key: ChannelKey,
        origin: u64,
        from: u64,
        to: u64,
    },
    /// Apply what this node's own store holds of `origin`'s `from..=to` on `key`, as
    /// events off the link's order (`repair::own_store`): a copied history can hold
    /// events whose sender died before it sent them, and then no peer answers.
    FillFromStore {
        key: ChannelKey,
        origin: u64,
        from: u64,
        to: u64,
    },
    /// If this node is `key`'s home, copy the channel's stored history from another
    /// home (`backfill::source`); `listed` is the sender's cursor when its `Heads`
    /// named the channel.
    Backfill {
        key: ChannelKey,
        listed: Option<Vec<(u64, u64)>>,
    },
    /// The channel's state arrived: subscribers waiting for it attach.
    Warmed(ChannelKey),
    /// Events no peer can supply were skipped (`applied`: events that it released).
    Skipped {
        key: ChannelKey,
        origin: u64,
        upto: u64,
        applied: usize,
    },
    /// A crashed origin's gap that nobody filled was given up (`stalls`): skipped up
    /// to `upto`, releasing `applied` events held behind it.
    GaveUp {
        key: ChannelKey,
        origin: u64,
        upto: u64,
        applied: usize,
    },
    /// The gap could not be watched: the table is full.
    StallsFull,
    /// The frame was dropped, counted under this reason.
    Ignored(&'static str),
}

/// What [`event`] took.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// The hub's outcome (`None`: ignored).
    pub outcome: Option<RemoteOutcome>,
    /// The event counts for its link position: on the link, and applied or here
    /// already (not behind a gap).
    pub counted: bool,
}

/// An event from a peer. One on the link's order (`on_link`) is taken; one off it (a
/// repair or `Sync` answer, or the node's own store) only for a kept channel (`kept`
/// is asked only then). Applied in origin order: a gap is watched (`Stalls::on_gap`),
/// filled from the node's own store, and asked of the sender once per `ask_again`
/// (`Asked`). Returns what was taken ([`Taken`]).
#[allow(clippy::too_many_arguments)]
pub fn event<G: DerefMut<Target = Gaps>>(
    at: At,
    key: &ChannelKey,
    event: RemoteEvent,
    on_link: bool,
    kept: impl FnOnce() -> bool,
    gaps: impl FnOnce() -> G,
    ask_again: Duration,
    out: &mut Vec<Do>,
) -> Result<Taken, CoreError> {
    if let Take::Ignore(reason) = inbound::event(on_link, kept) {
        out.push(Do::Ignored(reason));
        return Ok(Taken {
            outcome: None,
            counted: false,
        });
    }
    let outcome = at.hub.apply_remote(key, event, at.now_ms)?;
    let RemoteOutcome::Gap {
        origin: OriginId(origin),
        missing: (from, to),
    } = outcome
    else {
        return Ok(Taken {
            outcome: Some(outcome),
            counted: on_link,
        });
    };
    let mut gaps = gaps();
    if !gaps.stalls.on_gap(key, origin, from, at.now) {
        out.push(Do::StallsFull);
    }
    let ask = gaps
        .asked
        .should_ask(key, origin, (from, to), at.now, ask_again);
    drop(gaps);
    out.push(Do::FillFromStore {
        key: key.clone(),
        origin,
        from,
        to,
    });
    if ask {
        out.push(Do::Ask {
            key: key.clone(),
            origin,
            from,
            to,
        });
    }
    Ok(Taken {
        outcome: Some(outcome),
        counted: false,
    })
}

/// Events of `origin` this node's own store holds of a gap in its hub
/// (`repair::own_store` of the read), taken as answers: off the link's order, so only
/// for a kept channel (`kept` is asked only when there are events).
pub fn from_own_store(
    at: At,
    key: &ChannelKey,
    events: Vec<RemoteEvent>,
    kept: impl FnOnce() -> bool,
    out: &mut Vec<Do>,
) -> Result<(), CoreError> {
    if events.is_empty() {
        return Ok(());
    }
    if let Take::Ignore(reason) = inbound::event(false, kept) {
        out.push(Do::Ignored(reason));
        return Ok(());
    }
    for event in events {
        at.hub.apply_remote(key, event, at.now_ms)?;
    }
    Ok(())
}

/// The node's second tick for its gaps: each crashed origin's gap that stood still long
/// enough (`Stalls::tick`) is skipped up to the first event held behind it, which is
/// then delivered ([`Do::GaveUp`]). The hub's channels are read under the caller's
/// hold on `gaps`, so no caller may take `gaps` under a channel's lock.
pub fn tick(at: At, gaps: &mut Gaps, out: &mut Vec<Do>) {
    let hub = at.hub;
    let skips = gaps
        .stalls
        .tick(at.now, |key, origin| hub.held_back(key, OriginId(origin)));
    for (key, origin, upto) in skips {
        let applied = hub.skip_remote(&key, OriginId(origin), upto, at.now_ms);
        out.push(Do::GaveUp {
            key,
            origin,
            upto,
            applied,
        });
    }
}

/// A peer's cursors (`Heads`), `listed` channel by channel. For each channel this node
/// keeps (`kept`; the others are ignored): one with nothing in the hub (new here, or
/// dropped while idle) may be this node's to copy as a home ([`Do::Backfill`]); then
/// what no link will bring is asked of the sender (`heads::wanted`).
pub fn heads<'h>(
    at: At,
    asker: &heads::Asker,
    previous: &mut PreviousHeads,
    listed: impl IntoIterator<Item = (&'h ChannelKey, &'h [(u64, u64)])>,
    mut kept: impl FnMut(&ChannelKey) -> bool,
    out: &mut Vec<Do>,
) {
    for (key, origins) in listed {
        if !kept(key) {
            continue;
        }
        let mine = at.hub.cursor(key);
        if mine.origins().next().is_none() {
            out.push(Do::Backfill {
                key: key.clone(),
                listed: Some(origins.to_vec()),
            });
        }
        for (origin, from, to) in heads::wanted(asker, previous, key, &mine, origins) {
            out.push(Do::Ask {
                key: key.clone(),
                origin,
                from,
                to,
            });
        }
    }
}

/// A `Skip` (events of `origin` up to `upto` no peer's log has): a kept channel
/// records it, open here or not (`inbound::skip`); a home's store may still hold them,
/// so the channel is then backfilled if this node is a home.
pub fn skip(
    at: At,
    key: &ChannelKey,
    origin: u64,
    upto: u64,
    kept: bool,
    out: &mut Vec<Do>,
) -> Result<(), CoreError> {
    if let Take::Ignore(reason) = inbound::skip(kept) {
        out.push(Do::Ignored(reason));
        return Ok(());
    }
    let applied = at
        .hub
        .skip_remote_kept(key, OriginId(origin), upto, at.now_ms)?;
    out.push(Do::Skipped {
        key: key.clone(),
        origin,
        upto,
        applied,
    });
    out.push(Do::Backfill {
        key: key.clone(),
        listed: None,
    });
    Ok(())
}

/// A home's presence members in answer to `Sync` (`SyncMembers`): seeded into a kept
/// channel (`inbound::sync_answer`). A home answers `Sync` by node id, so a node that
/// restarted while its request was in flight gets its predecessor's answer: taken, it
/// would hold a channel nobody routes to it any more (the scaled simulation's seed
/// 1000). Seeding opens the channel, so only for members there are.
pub fn sync_members(
    at: At,
    key: &ChannelKey,
    members: Vec<PresenceMessage>,
    kept: bool,
    out: &mut Vec<Do>,
) {
    if let Take::Ignore(reason) = inbound::sync_answer(kept) {
        out.push(Do::Ignored(reason));
        return;
    }
    if !members.is_empty() {
        at.hub.seed_members(key, members, at.now_ms);
    }
}

/// The end of a home's answer to `Sync` (`Synced`), with its cursor: what the home has
/// but could not send (trimmed from its log) is nobody's to send any more, so a kept
/// channel skips to it, and its waiting subscribers attach.
pub fn synced(at: At, key: &ChannelKey, origins: &[(u64, u64)], kept: bool, out: &mut Vec<Do>) {
    if let Take::Ignore(reason) = inbound::sync_answer(kept) {
        out.push(Do::Ignored(reason));
        return;
    }
    for &(origin, upto) in origins {
        at.hub.skip_remote(key, OriginId(origin), upto, at.now_ms);
    }
    out.push(Do::Warmed(key.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hub_with;
    use tern_core::CoreLimits;

    fn at(hub: &Hub, secs: u64) -> At<'_> {
        At {
            hub,
            now: Duration::from_secs(secs),
            now_ms: (secs * 1000) as i64,
        }
    }

    /// The events of origin 7 on `key`, as a peer relays them.
    fn relayed(key: &ChannelKey) -> Vec<RemoteEvent> {
        let (source, _) = hub_with(7, 4);
        let parts = crate::repair::answer(&source, key, OriginId(7), 1, 4);
        parts
            .into_iter()
            .map(|p| match p {
                crate::repair::RepairPart::Event(e) => RemoteEvent::from_event(&e),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_gap_is_watched_filled_from_the_store_and_asked_once_per_round_trip() {
        let hub = Hub::new(OriginId(1), CoreLimits::default());
        let key = ChannelKey::new("app", "room");
        let events = relayed(&key);
        let mut gaps = Gaps::default();
        let again = Duration::from_secs(1);
        let mut out = Vec::new();
        let outcome = event(
            at(&hub, 10),
            &key,
            events[2].clone(),
            true,
            || unreachable!("on the link, kept is not asked"),
            || &mut gaps,
            again,
            &mut out,
        )
        .unwrap();
        assert!(matches!(outcome.outcome, Some(RemoteOutcome::Gap { .. })));
        assert!(!outcome.counted, "behind a gap: not yet its link position");
        let fill = Do::FillFromStore {
            key: key.clone(),
            origin: 7,
            from: 1,
            to: 2,
        };
        let ask = Do::Ask {
            key: key.clone(),
            origin: 7,
            from: 1,
            to: 2,
        };
        assert_eq!(out, vec![fill.clone(), ask]);
        assert_eq!(gaps.stalls.len(), 1);
        // The next event behind the same gap, within the round trip: no second ask.
        out.clear();
        let at10 = at(&hub, 10);
        let take = |e: &RemoteEvent, on_link, gaps: &mut Gaps, out: &mut Vec<Do>| {
            event(at10, &key, e.clone(), on_link, || true, || gaps, again, out).unwrap()
        };
        take(&events[3], true, &mut gaps, &mut out);
        assert_eq!(
            out,
            vec![Do::FillFromStore {
                key: key.clone(),
                origin: 7,
                from: 1,
                to: 2,
            }]
        );
        // The missing ones arrive as answers off the link: applied, not counted.
        out.clear();
        for e in &events[..2] {
            assert!(!take(e, false, &mut gaps, &mut out).counted);
        }
        assert!(out.is_empty());
        assert_eq!(hub.cursor(&key).get(OriginId(7)), 4);
        // A duplicate on the link counts for its position.
        let duplicate = take(&events[0], true, &mut gaps, &mut out);
        assert_eq!(duplicate.outcome, Some(RemoteOutcome::Duplicate));
        assert!(duplicate.counted);
        assert!(out.is_empty());
    }

    #[test]
    fn an_answer_for_a_channel_not_kept_is_ignored() {
        let hub = Hub::new(OriginId(1), CoreLimits::default());
        let key = ChannelKey::new("app", "room");
        let events = relayed(&key);
        let mut gaps = Gaps::default();
        let mut out = Vec::new();
        let outcome = event(
            at(&hub, 0),
            &key,
            events[0].clone(),
            false,
            || false,
            || &mut gaps,
            Duration::ZERO,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            outcome,
            Taken {
                outcome: None,
                counted: false
            }
        );
        assert_eq!(out, vec![Do::Ignored("answer_unheld")]);
        skip(at(&hub, 0), &key, 7, 3, false, &mut out).unwrap();
        sync_members(at(&hub, 0), &key, Vec::new(), false, &mut out);
        synced(at(&hub, 0), &key, &[(7, 3)], false, &mut out);
        assert_eq!(
            out[1..],
            [
                Do::Ignored("skip_unheld"),
                Do::Ignored("sync_answer_unheld"),
                Do::Ignored("sync_answer_unheld"),
            ]
        );
        assert_eq!(hub.cursor(&key).get(OriginId(7)), 0);
    }

    #[test]
    fn a_kept_skip_is_recorded_then_a_home_backfills_and_synced_warms() {
        let hub = Hub::new(OriginId(1), CoreLimits::default());
        let key = ChannelKey::new("app", "room");
        let mut out = Vec::new();
        skip(at(&hub, 0), &key, 7, 3, true, &mut out).unwrap();
        assert_eq!(hub.cursor(&key).get(OriginId(7)), 3);
        synced(at(&hub, 0), &key, &[(7, 5)], true, &mut out);
        assert_eq!(hub.cursor(&key).get(OriginId(7)), 5);
        assert_eq!(
            out,
            vec![
                Do::Skipped {
                    key: key.clone(),
                    origin: 7,
                    upto: 3,
                    applied: 0,
                },
                Do::Backfill {
                    key: key.clone(),
                    listed: None,
                },
                Do::Warmed(key.clone()),
            ]
        );
    }

    #[test]
    fn heads_backfill_an_empty_kept_channel_then_ask_for_what_no_link_brings() {
        let hub = Hub::new(OriginId(1), CoreLimits::default());
        let kept_key = ChannelKey::new("app", "kept");
        let other = ChannelKey::new("app", "other");
        let live = |_: u64| false;
        let asker = heads::Asker {
            own: 1,
            sender: 2,
            live: &live,
        };
        let mut previous = PreviousHeads::default();
        let origins = vec![(9u64, 4u64)];
        let listed = [
            (&kept_key, origins.as_slice()),
            (&other, origins.as_slice()),
        ];
        let mut out = Vec::new();
        heads(
            at(&hub, 0),
            &asker,
            &mut previous,
            listed,
            |k| *k == kept_key,
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Do::Backfill {
                    key: kept_key.clone(),
                    listed: Some(origins.clone()),
                },
                Do::Ask {
                    key: kept_key.clone(),
                    origin: 9,
                    from: 1,
                    to: 4,
                },
            ]
        );
    }
}
