//! Gap repair. An event ahead of a missing one asks the node it came from for the
//! missing range; that node answers from its log, and what its cursor covers but its log
//! lacks (trimmed, or events that were no-ops there and never logged) with a `Skip`, so
//! the asker does not wait forever.

use std::sync::Arc;

use tern_core::{ChannelEvent, ChannelKey, Hub, OriginId, RemoteEvent};

/// One part of a repair answer, in the order it is sent.
#[derive(Clone, Debug)]
pub enum RepairPart {
    /// "Events of the origin up to here cannot be supplied": move past them.
    Skip(u64),
    Event(Arc<ChannelEvent>),
}

/// The answer of `hub` to a request for `origin`'s `from..=to` on `key`: nothing when it
/// has none of it; else the logged events in order, each hole its log has in the range
/// (before, between or after them) answered by a `Skip` over it where it falls. The
/// parts must reach the asker in this order (one ordered link): a `Skip` that overtook
/// an event before it would move the asker past that event.
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
    parts(hub.events_of(key, origin, from, to), from, to)
}

/// The part of a request for `origin`'s `from..=to` on `key` past what the hub's cursor
/// covers, which only the store may hold: a copied history (`backfill`) can reach past
/// the hub, and a `Heads` from the store (the handoff) names it (the seed sweep, seed
/// 114877: a restarted home was told of a dead origin's event by a peer whose store
/// alone had it, asked, and got the answer clipped to the peer's hub). `None` when the
/// hub covers all of it.
pub fn past_log(
    hub: &Hub,
    key: &ChannelKey,
    origin: OriginId,
    from: u64,
    to: u64,
) -> Option<(u64, u64)> {
    let covered = hub.cursor(key).get(origin).max(from.saturating_sub(1));
    (covered < to).then(|| (covered + 1, to))
}

/// Whether the hub has nothing to answer for `origin`'s events from `from` on `key`:
/// it does not hold the channel, or holds it only from before them (a channel dropped
/// while idle comes back with this node's own position only). Its store may have them
/// ([`answer_stored`]): a node told of a channel by a `Heads` its peer sent from its
/// store (the handoff) asks that peer, which may hold nothing of it in memory (the
/// scaled simulation with idle channels dropped: a restarted home never got the
/// message, and its store lacked it for good).
pub fn from_store(hub: &Hub, key: &ChannelKey, origin: OriginId, from: u64) -> bool {
    hub.cursor(key).get(origin) < from
}

/// The answer from the store when [`from_store`]: `stored`, the stored events of
/// `origin` within `from..=to` (any order), and `upto`, the store's cursor for the
/// origin: those events in order, and no `Skip`. A store's cursor says how far it
/// reaches, not that it lacks nothing before: a copied history (`backfill`) can miss an
/// event another node has, and a `Skip` for it would move the asker past it for good
/// (the seed sweep, seed 15020: a restarted node's copy had the presence event after a
/// message its source stored only later). The asker's gap asks again, and `Heads` from
/// the nodes that have it fill it.
pub fn answer_stored(stored: Vec<RemoteEvent>, upto: u64, from: u64, to: u64) -> Vec<RepairPart> {
    in_order(stored, from, to.min(upto))
        .into_iter()
        .map(|e| {
            RepairPart::Event(Arc::new(ChannelEvent::new(
                e.origin,
                e.seq,
                e.publisher,
                e.frame,
            )))
        })
        .collect()
}

/// A store read for a repair: the stored events of the origin within the span asked
/// (any order), the store's cursor for the origin, and from where the read is whole (the
/// store's reads are bounded).
pub struct Read {
    pub events: Vec<RemoteEvent>,
    pub upto: u64,
    pub whole_from: u64,
}

/// What the store answered for a span.
pub enum Reading {
    /// Read.
    Read(Read),
    /// Its cursor for the origin is short of the span: it has none of it.
    Short,
    /// Not read (no free read slot): nothing vouches for what the log lacks.
    Busy,
}

/// How a node answers a request for `origin`'s `from..=to` ([`plan`]).
pub enum Plan {
    /// Nothing of it in memory ([`from_store`]): the store's events ([`answer_stored`]).
    Store,
    /// The log's answer ([`answer`]), with the spans only the store may fill: its holes
    /// ([`holes`]) and what lies past the hub's cursor ([`past_log`]).
    Log {
        parts: Vec<RepairPart>,
        holes: Option<(u64, u64)>,
        past: Option<(u64, u64)>,
    },
}

impl Plan {
    /// Whether the answer needs the store read (else [`finish`] reads nothing).
    pub fn reads_store(&self) -> bool {
        match self {
            Plan::Store => true,
            Plan::Log { holes, past, .. } => holes.is_some() || past.is_some(),
        }
    }
}

/// The first half of answering a request for `origin`'s `from..=to` on `key`, from the
/// hub alone; [`finish`] completes it with the store.
pub fn plan(hub: &Hub, key: &ChannelKey, origin: OriginId, from: u64, to: u64) -> Plan {
    if from_store(hub, key, origin, from) {
        return Plan::Store;
    }
    let parts = answer(hub, key, origin, from, to);
    Plan::Log {
        holes: holes(&parts, from),
        past: past_log(hub, key, origin, from, to),
        parts,
    }
}

/// The answer to a request for `from..=to` planned as `plan`, with `read(span)` the
/// store's answer for a span (a node without a store answers [`Reading::Short`]): from
/// the store, only events, from where its read is whole; a log answer's holes filled
/// where the store has them ([`fill_holes`]; not read, the holes' `Skip`s go, as
/// nothing vouches for them), and what lies past the hub's cursor from the store.
pub fn finish(
    plan: Plan,
    from: u64,
    to: u64,
    mut read: impl FnMut((u64, u64)) -> Reading,
) -> Vec<RepairPart> {
    let (mut parts, holes, past) = match plan {
        Plan::Store => {
            return match read((from, to)) {
                Reading::Read(r) => answer_stored(r.events, r.upto, r.whole_from, to),
                Reading::Short | Reading::Busy => Vec::new(),
            };
        }
        Plan::Log { parts, holes, past } => (parts, holes, past),
    };
    if let Some(span) = holes {
        match read(span) {
            Reading::Read(r) => parts = fill_holes(parts, from, r.events, span, r.whole_from),
            Reading::Short => {}
            Reading::Busy => {
                return fill_holes(parts, from, Vec::new(), span, u64::MAX);
            }
        }
    }
    if let Some((first, last)) = past {
        if let Reading::Read(r) = read((first, last)) {
            parts.extend(answer_stored(r.events, r.upto, r.whole_from, last));
        }
    }
    parts
}

/// What this node's own store holds of a gap in its hub (`origin`'s `from..=to`), to
/// apply at once rather than wait for a peer: `stored` as the store returned it (any
/// order), in order and once each. A copied history (`backfill`) can hold events the hub
/// never got live, and when the node that sent the event past the gap died before it
/// sent the missing ones, no peer holds them in memory or lists them in `Heads`: the
/// soak's seed 58280, where a home copied a message from its origin's store, the origin
/// crashed before sending it, and a subscriber in the home's region never got it.
pub fn own_store(stored: Vec<RemoteEvent>, from: u64, to: u64) -> Vec<RemoteEvent> {
    in_order(stored, from, to)
}

/// The events of this node's answer to a repair (`parts`, for `origin` on `key`) that
/// its own hub lacks right past its cursor, in order: those the store supplied past the
/// hub ([`Plan::Store`], [`past_log`]), up to the first it lacks. The driver applies them
/// to its hub as it does its own store's events for a gap ([`own_store`]), so its
/// `Heads` list them from then on. Else only the handoff's two `Heads` from the store
/// name them, and an asker whose two answers were both lost never hears of them again:
/// a restarted node's hub had dropped the channel while idle with its earlier
/// incarnation's events adopted (`recover`), and a subscriber of the new home never got
/// them (the seed sweep, seed 151163).
pub fn past_hub(
    hub: &Hub,
    key: &ChannelKey,
    origin: OriginId,
    parts: &[RepairPart],
) -> Vec<RemoteEvent> {
    let mut next = hub.cursor(key).get(origin) + 1;
    let mut out = Vec::new();
    // Past the hub's cursor an answer holds the store's events only, no `Skip`.
    for part in parts {
        let RepairPart::Event(event) = part else {
            continue;
        };
        if event.seq > next {
            break;
        }
        if event.seq == next {
            out.push(RemoteEvent::from_event(event));
            next += 1;
        }
    }
    out
}

/// Events a store read that fills a log answer's holes covers at most ([`holes`]):
/// few enough that the bounded store read (`HistoryAccess::events`, two rows per event)
/// reaches the window's start, so what it lacks there may be skipped.
pub const HOLE_READ_MAX: u64 = (crate::backfill::BACKFILL_PAGE * 8) as u64;

/// Where the store may fill a log answer's holes: `parts` (from [`answer`], asked from
/// `from`) has a hole (a `Skip`) from the first hole's start to the last one's end, cut
/// to [`HOLE_READ_MAX`] events; `None` without a hole. A hole in a held channel's log is
/// not always gone: the channel was dropped while idle and came back, and its store
/// holds the events (the soak's seed 42605: a peer skipped a restarted home past two
/// messages its store held, and the home's store never got them).
pub fn holes(parts: &[RepairPart], from: u64) -> Option<(u64, u64)> {
    let mut next = from;
    let mut span: Option<(u64, u64)> = None;
    for part in parts {
        match part {
            RepairPart::Event(event) => next = event.seq + 1,
            RepairPart::Skip(upto) => {
                let first = span.map_or(next, |(first, _)| first);
                span = Some((first, (*upto).min(first + HOLE_READ_MAX - 1)));
                next = upto + 1;
            }
        }
    }
    span
}

/// `parts` (a log answer asked from `from`) with the holes within `lo..=hi` filled by
/// the store's `stored` events there, a read whole from `whole_from` on (any order). What
/// the store lacks of a hole is still skipped where the read was whole. Past a hole
/// nothing vouches for (before `whole_from`, or beyond `hi`) the answer carries events
/// only: a `Skip` after such a hole would move the asker past it too. The asker holds
/// those events back and asks again for the hole, a smaller range each time, as it does
/// after [`answer_stored`].
pub fn fill_holes(
    parts: Vec<RepairPart>,
    from: u64,
    stored: Vec<RemoteEvent>,
    (lo, hi): (u64, u64),
    whole_from: u64,
) -> Vec<RepairPart> {
    let mut stored = in_order(stored, lo, hi).into_iter().peekable();
    let mut out = Vec::with_capacity(parts.len() + stored.len());
    let mut next = from;
    // Every hole so far was filled or skipped.
    let mut vouched = true;
    // A `Skip` over `first..=last`, where the store's read says it lacks them.
    let skip = |out: &mut Vec<RepairPart>, first: u64, last: u64, vouched: &mut bool| {
        if *vouched && first >= lo.max(whole_from) && last <= hi {
            out.push(RepairPart::Skip(last));
        } else {
            *vouched = false;
        }
    };
    for part in parts {
        let upto = match part {
            RepairPart::Event(event) => {
                next = event.seq + 1;
                out.push(RepairPart::Event(event));
                continue;
            }
            RepairPart::Skip(upto) => upto,
        };
        // The hole `next..=upto`: what the store has of it, in order.
        while let Some(event) = stored.next_if(|e| e.seq <= upto) {
            if event.seq < next {
                continue;
            }
            if event.seq > next {
                skip(&mut out, next, event.seq - 1, &mut vouched);
            }
            next = event.seq + 1;
            out.push(RepairPart::Event(Arc::new(ChannelEvent::new(
                event.origin,
                event.seq,
                event.publisher,
                event.frame,
            ))));
        }
        // The hole's rest, which the store lacks where it was read.
        if next <= upto {
            let end = upto.min(hi);
            if next <= end {
                skip(&mut out, next, end, &mut vouched);
            }
            if end < upto {
                vouched = false;
            }
        }
        next = upto + 1;
    }
    out
}

/// `stored` cut to `from..=to`, in order and once each.
fn in_order(mut stored: Vec<RemoteEvent>, from: u64, to: u64) -> Vec<RemoteEvent> {
    stored.retain(|event| (from..=to).contains(&event.seq));
    stored.sort_by_key(|event| event.seq);
    stored.dedup_by_key(|event| event.seq);
    stored
}

/// `events` (in order, within `from..=to`) with a `Skip` for each hole where it falls.
fn parts(events: Vec<Arc<ChannelEvent>>, from: u64, to: u64) -> Vec<RepairPart> {
    let mut parts = Vec::with_capacity(events.len() + 1);
    // The next sequence the asker needs.
    let mut next = from;
    for event in events {
        if event.seq > next {
            parts.push(RepairPart::Skip(event.seq - 1));
        }
        next = event.seq + 1;
        parts.push(RepairPart::Event(event));
    }
    // A hole after the last event (or no event at all): without this `Skip` the asker
    // would wait for events nobody sends until its next `Heads` asks again.
    if next <= to {
        parts.push(RepairPart::Skip(to));
    }
    parts
}

/// How long the QUIC driver waits before it asks again for a range it asked for (the
/// sim uses its links' round trip): a `Heads` round, which asks again anyway. QUIC's own
/// round-trip estimate does not see the emulated WAN's delay.
pub const ASK_AGAIN: std::time::Duration = crate::heads::HEADS_EVERY;

/// How many `(channel, origin)` gaps [`Asked`] remembers; past it, it forgets them all
/// (costs one repair asked again each).
pub const ASKED_MAX: usize = 65_536;

/// The repairs a node asked for, per channel and origin: each event that arrives behind
/// a gap reports it, and a burst behind one gap would otherwise ask for the same range
/// once per event (each answer carrying the whole range). A gap asks when nothing was
/// asked for it, when it reaches past what was asked, or when the last ask is older than
/// the driver's `again_after` (about a round trip: the answer was lost). `Heads` ask
/// for what is still missing each round regardless.
#[derive(Default)]
pub struct Asked {
    asked: std::collections::HashMap<(ChannelKey, u64), (u64, crate::Now)>,
}

impl Asked {
    /// Whether to ask for `origin`'s `missing` range on `key` now; if so, it counts as
    /// asked.
    pub fn should_ask(
        &mut self,
        key: &ChannelKey,
        origin: u64,
        missing: (u64, u64),
        now: crate::Now,
        again_after: std::time::Duration,
    ) -> bool {
        let entry = (key.clone(), origin);
        if let Some(&(upto, when)) = self.asked.get(&entry) {
            if upto >= missing.1 && now.saturating_sub(when) <= again_after {
                return false;
            }
        } else if self.asked.len() >= ASKED_MAX {
            self.asked.clear();
        }
        self.asked.insert(entry, (missing.1, now));
        true
    }

    pub fn len(&self) -> usize {
        self.asked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.asked.is_empty()
    }
}

#[cfg(test)]
mod tests;
