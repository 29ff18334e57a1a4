//! The faulty network and the event queue: what is in flight, sending with drop,
//! duplicate, jitter (reorder) and partitions, and each node taking in what reaches it.

use std::sync::Arc;

use tern_core::{OriginId, RemoteEvent};
use tern_protocol::PresenceMessage;
use tern_replication::inbound::{self, Take};
use tern_replication::receive;
use tern_replication::repair::RepairPart;

use crate::node::member;
use crate::{Sim, ASK_AGAIN_MS, GOSSIP_SPREAD_MS, WARM_TIMEOUT_MS};

/// Something in flight to node `to` (incarnation `to_incarnation`).
#[derive(Clone)]
pub(crate) enum Item {
    /// A replicated event, sent by node `from`.
    Event {
        from: usize,
        ch: usize,
        event: Arc<RemoteEvent>,
        /// Its position on the sender's link (epoch, position); `None` for a repair.
        link: Option<(u64, u64)>,
    },
    /// A link (re)starts from position `first` (see `acked.rs`).
    Hello { from: usize, epoch: u64, first: u64 },
    /// The receiver applied every position of link `epoch` up to `upto`.
    Stored { from: usize, epoch: u64, upto: u64 },
    /// A repair answer: events of `origin` up to `upto` are not in the peer's log.
    Skip {
        ch: usize,
        origin: OriginId,
        upto: u64,
    },
    /// A repair answer: its parts (`Event`s and `Skip`s) in order, as the driver's
    /// control queue writes them on one ordered link (a `Skip` that overtook an event
    /// before it would move the asker past that event).
    Answer { ch: usize, items: Vec<Item> },
    /// Node `from` asks for `ch`'s stored history (messages, or presence).
    Backfill {
        from: usize,
        ch: usize,
        presence: bool,
    },
    /// The answer: the sender's stored message ids (none for presence) and, per origin,
    /// its highest stored sequence of that kind.
    BackfillItems {
        from: usize,
        ch: usize,
        presence: bool,
        ids: Vec<String>,
        cursor: Vec<(OriginId, u64)>,
        /// The stored events of that kind (the rows a real page carries).
        events: Vec<RemoteEvent>,
    },
    /// Membership reports that incarnation `tag`/`origin` departed.
    Departed { tag: String, origin: OriginId },
    /// Another member's published list of departed tags (gossip) names `tag`: what a
    /// node that did not see the incarnation live (a restarted one) learns it from.
    Reported { tag: String, origin: OriginId },
    /// A same-region peer (incarnation `incarnation`) has subscribers on the channel
    /// (`Interest`, on).
    Interest {
        from: usize,
        incarnation: u64,
        chans: Vec<usize>,
    },
    /// A node asks the region's home for the channel's state (after its interest, on the
    /// same ordered link, so the home counts the interest first).
    Sync {
        from: usize,
        incarnation: u64,
        ch: usize,
    },
    /// The home's answer to `Sync`, on one ordered link: per origin a `Skip` for what its
    /// log lacks and the events it has, then its presence members and its cursor.
    SyncState {
        from: usize,
        ch: usize,
        /// The incarnation whose `Sync` this answers.
        for_incarnation: u64,
        items: Vec<Item>,
        members: Vec<PresenceMessage>,
        cursor: Vec<(OriginId, u64)>,
    },
    /// The node's own timer while it waits for the channel's state: ask again, or give
    /// up and attach with what it has.
    WarmTick { ch: usize },
}

impl Item {
    /// The channel an item is about, if one.
    pub(crate) fn channel(&self) -> Option<usize> {
        match self {
            Item::Event { ch, .. }
            | Item::Skip { ch, .. }
            | Item::Answer { ch, .. }
            | Item::Backfill { ch, .. }
            | Item::BackfillItems { ch, .. }
            | Item::Sync { ch, .. }
            | Item::SyncState { ch, .. }
            | Item::WarmTick { ch } => Some(*ch),
            _ => None,
        }
    }
}

pub(crate) struct InFlight {
    pub(crate) to: usize,
    pub(crate) to_incarnation: u64,
    pub(crate) item: Item,
}

impl Sim {
    pub(crate) fn enqueue(&mut self, at: i64, to: usize, item: Item) {
        self.queue_counter += 1;
        let to_incarnation = self.nodes[to].incarnation;
        self.queue.insert(
            (at, self.queue_counter),
            InFlight {
                to,
                to_incarnation,
                item,
            },
        );
    }

    /// Sends over the (faulty) network from `from` to `to`.
    pub(crate) fn send(&mut self, from: usize, to: usize, item: Item) {
        if !self.nodes[to].up {
            self.stats.lost_to_crash += 1;
            return;
        }
        if self.partitioned.contains(&(from.min(to), from.max(to)))
            || self.rng.chance(self.faults.drop)
        {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate) {
            2
        } else {
            1
        };
        self.stats.duplicated += copies - 1;
        let on_link = matches!(item, Item::Event { link: Some(_), .. } | Item::Hello { .. });
        for _ in 0..copies {
            let mut at = self.now_ms
                + self.latency_ms[from][to]
                + self.rng.below(self.faults.jitter_ms + 1) as i64;
            if on_link && self.faults.ordered_links {
                // One ordered stream: nothing on it overtakes what was written before.
                let last = self.link_clock.entry((from, to)).or_insert(0);
                at = at.max(*last);
                *last = at;
            }
            self.enqueue(at, to, item.clone());
        }
    }

    /// Delivers the next in-flight item (advancing virtual time). False if none.
    pub fn deliver_next(&mut self) -> bool {
        let Some((&(at, n), _)) = self.queue.first_key_value() else {
            return false;
        };
        let flight = self.queue.remove(&(at, n)).expect("present");
        self.now_ms = self.now_ms.max(at);
        self.stats.max_now_ms = self.now_ms;
        let to = flight.to;
        if matches!(flight.item, Item::Departed { .. }) {
            self.departures_pending -= 1;
        }
        if !self.nodes[to].up || self.nodes[to].incarnation != flight.to_incarnation {
            if !matches!(flight.item, Item::WarmTick { .. }) {
                self.stats.lost_to_crash += 1;
            }
            return true;
        }
        if let Some(ch) = flight.item.channel() {
            self.touched.insert((to, ch));
        }
        self.take(to, flight.item);
        self.flush(to);
        true
    }

    /// Delivers everything due by `ms` (checking the step invariants after each), then
    /// moves the clock to `ms`.
    pub fn advance_to(&mut self, ms: i64) -> Result<(), String> {
        while self.queue.first_key_value().is_some_and(|(k, _)| k.0 <= ms) {
            self.deliver_next();
            self.check_step()?;
        }
        self.now_ms = self.now_ms.max(ms);
        Ok(())
    }

    /// Node `to` takes in one item.
    pub(crate) fn take(&mut self, to: usize, item: Item) {
        if self.trace {
            let what = match &item {
                Item::Hello { from, epoch, first } => {
                    format!("hello n{from} link {epoch} from {first}")
                }
                Item::Stored { from, epoch, upto } => {
                    format!("stored by n{from} link {epoch} upto {upto}")
                }
                Item::Event {
                    from, ch, event, ..
                } => {
                    format!(
                        "from n{from} c{ch} {}",
                        describe(event.origin, event.seq, &event.frame)
                    )
                }
                Item::Skip { ch, origin, upto } => format!("skip c{ch} {origin} upto {upto}"),
                Item::Answer { ch, items } => format!("repair answer c{ch}, {} parts", items.len()),
                Item::Backfill { from, ch, presence } => {
                    format!("backfill c{ch} (presence {presence}) asked by n{from}")
                }
                Item::BackfillItems {
                    ch, ids, cursor, ..
                } => {
                    format!("backfill of c{ch}: {} ids, cursor {cursor:?}", ids.len())
                }
                Item::Departed { tag, .. } => format!("departed {tag}"),
                Item::Reported { tag, .. } => format!("reported departed {tag}"),
                Item::Interest {
                    from,
                    incarnation,
                    chans,
                } => {
                    format!("interest of n{from}i{incarnation} in {chans:?}")
                }
                Item::Sync { from, ch, .. } => format!("sync c{ch} asked by n{from}"),
                Item::SyncState {
                    from, ch, cursor, ..
                } => {
                    format!("channel c{ch} state from n{from}, cursor {cursor:?}")
                }
                Item::WarmTick { ch } => format!("warm timer c{ch}"),
            };
            self.log(|| format!("n{to} <- {what}"));
        }
        match item {
            Item::Event {
                from,
                ch,
                event,
                link,
            } => self.take_event(to, from, ch, Arc::unwrap_or_clone(event), link),
            Item::Hello { from, epoch, first } => self.take_hello(to, from, epoch, first),
            Item::Stored { from, epoch, upto } => self.take_stored(to, from, epoch, upto),
            Item::Skip { ch, origin, upto } => {
                // The answer's sender is not needed: a `Skip` asks nobody.
                let mut out = Vec::new();
                let kept = self.holds(to, ch);
                receive::skip(self.at(to), &self.keys[ch], origin.0, upto, kept, &mut out)
                    .expect("the sim's limits hold every channel");
                self.carry_out(to, to, out);
            }
            Item::Answer { items, .. } => {
                for item in items {
                    self.take(to, item);
                }
            }
            Item::Backfill { from, ch, presence } => self.answer_backfill(to, from, ch, presence),
            Item::BackfillItems {
                from,
                ch,
                presence,
                ids,
                cursor,
                events,
            } => self.take_backfill(to, from, ch, presence, ids, (cursor, events)),
            Item::Departed { tag, origin } => {
                let now_ms = self.hub_now(to);
                let left = self.nodes[to].hub.node_departed(&format!("{tag}-"), now_ms);
                self.stats.departed_leaves += left as u64;
                self.nodes[to].believed_live.remove(&origin);
                self.forget_departed(to, origin);
                // It now publishes the tag; gossip carries it to every member.
                if !self.reported.iter().any(|(t, _)| *t == tag) {
                    self.reported.push((tag.clone(), origin));
                }
                for peer in 0..self.nodes.len() {
                    if peer != to && self.nodes[peer].up {
                        let at = self.now_ms + 1 + self.rng.below(GOSSIP_SPREAD_MS) as i64;
                        let item = Item::Reported {
                            tag: tag.clone(),
                            origin,
                        };
                        self.enqueue(at, peer, item);
                    }
                }
            }
            Item::Reported { tag, origin } => {
                if tag != self.nodes[to].tag {
                    let now_ms = self.hub_now(to);
                    let left = self.nodes[to].hub.node_departed(&format!("{tag}-"), now_ms);
                    self.stats.departed_leaves += left as u64;
                    self.nodes[to].believed_live.remove(&origin);
                }
            }
            Item::Interest {
                from,
                incarnation,
                chans,
            } => self.take_interest(to, from, incarnation, &chans),
            Item::Sync {
                from,
                incarnation,
                ch,
            } => {
                // The interest that precedes `Sync` on the same link.
                self.take_interest(to, from, incarnation, &[ch]);
                self.sync_from(to, from, ch, incarnation);
            }
            Item::SyncState {
                from,
                ch,
                for_incarnation,
                items,
                members,
                cursor,
            } => {
                if let Take::Ignore(_) = inbound::sync_answer(self.holds(to, ch)) {
                    // An answer for a channel the node does not keep (its previous
                    // incarnation asked): the driver drops `SyncMembers`, `Synced` and
                    // link-less events for such channels (`holds`).
                    if for_incarnation != self.nodes[to].incarnation {
                        self.stats.stale_answers += 1;
                    }
                    return;
                }
                for item in items {
                    self.take(to, item);
                }
                // `SyncMembers`, then `Synced` with the cursor, as the driver's frames.
                let key = self.keys[ch].clone();
                let pending = self.nodes[to].hub.pending_len(&key);
                let mut out = Vec::new();
                let kept = self.holds(to, ch);
                receive::sync_members(self.at(to), &key, members, kept, &mut out);
                let cursor: Vec<(u64, u64)> = cursor.iter().map(|(o, s)| (o.0, *s)).collect();
                let kept = self.holds(to, ch);
                receive::synced(self.at(to), &key, &cursor, kept, &mut out);
                let after = self.nodes[to].hub.pending_len(&key);
                self.log(|| format!("   synced: pending {pending} -> {after}"));
                self.carry_out(to, from, out);
            }
            Item::WarmTick { ch } => {
                let warming = self.nodes[to].subs.get(&ch).and_then(|s| s.warming);
                let Some((since, home)) = warming else {
                    return;
                };
                if self.now_ms - since >= WARM_TIMEOUT_MS {
                    self.stats.warm_timeouts += 1;
                    self.attach(to, ch);
                } else {
                    let incarnation = self.nodes[to].incarnation;
                    self.send(
                        to,
                        home,
                        Item::Sync {
                            from: to,
                            incarnation,
                            ch,
                        },
                    );
                    self.enqueue(self.now_ms + ASK_AGAIN_MS, to, Item::WarmTick { ch });
                }
            }
        }
    }

    /// From now on the network neither drops nor duplicates (it still reorders).
    pub fn calm(&mut self) {
        self.faults.drop = 0;
        self.faults.duplicate = 0;
    }

    pub fn partition(&mut self, a: usize, b: usize) {
        self.partitioned.insert((a.min(b), a.max(b)));
    }

    pub fn heal(&mut self) {
        self.partitioned.clear();
    }
}

/// A repair answer from node `from` as items in flight.
pub(crate) fn repair_items(
    from: usize,
    ch: usize,
    origin: OriginId,
    parts: Vec<RepairPart>,
) -> Vec<Item> {
    parts
        .into_iter()
        .map(|part| match part {
            RepairPart::Skip(upto) => Item::Skip { ch, origin, upto },
            RepairPart::Event(event) => Item::Event {
                from,
                ch,
                event: Arc::new(RemoteEvent::from_event(&event)),
                link: None,
            },
        })
        .collect()
}

/// One line about an event, for the trace.
pub(crate) fn describe(
    origin: OriginId,
    seq: u64,
    frame: &tern_protocol::ProtocolMessage,
) -> String {
    let mut out = format!("{origin}/{seq}");
    for m in frame.messages.iter().flatten() {
        out.push_str(&format!(" msg {}", m.id.as_deref().unwrap_or("?")));
    }
    for p in frame.presence.iter().flatten() {
        let (client, conn, data) = member(p);
        out.push_str(&format!(" p{} {client} {conn} {data}", p.action));
    }
    out
}
