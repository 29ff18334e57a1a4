//! History backfill between simulated nodes, decided by the shipped rule
//! (`tern_replication::backfill`): a channel's home that learns of the channel with
//! nothing of it here (a peer's `Heads`), or that is told events no log has any more (a
//! `Skip`), copies the history another region's home has stored (with one region: the
//! node whose `Heads` told of it), asking again for a page not answered in time.
//!
//! The sim's store is [`crate::node::Stored`]: a page carries all of it at once (the
//! driver pages by `BACKFILL_PAGE`; paging does not change what ends up stored), the
//! messages page the message ids and, per origin, the highest sequence that was a
//! message, the presence page the highest that was a presence event, as the store's
//! cursor moves when the real copied rows are put.

use tern_core::{OriginId, RemoteEvent};
use tern_replication::backfill::{self, Took};
use tern_replication::handoff::Member;
use tern_replication::recover;

use crate::cluster::node_index;
use crate::network::Item;
use crate::node::lock;
use crate::Sim;

impl Sim {
    /// Restarted node `at`, its store kept, takes its earlier incarnations' recent
    /// stored events back into its hub (`recover::adopt`), and its handoff names them to
    /// every home (`Handoff::on_adopted`), as the server does at start.
    pub(crate) fn recover(&mut self, at: usize) {
        let now_ms = self.hub_now(at);
        let node = &self.nodes[at];
        let since = recover::since_ms(&node.hub, now_ms);
        let earlier: Vec<u64> = node.earlier_origins.iter().map(|o| o.0).collect();
        let mut found = Vec::new();
        for (key, channel) in lock(&node.outbox.stored).iter() {
            let cursor: Vec<(u64, u64)> = channel.cursor.iter().map(|(o, s)| (o.0, *s)).collect();
            for origin in recover::earlier_in(&cursor, &earlier) {
                let events: Vec<_> = channel
                    .events
                    .range((OriginId(origin), 0)..=(OriginId(origin), u64::MAX))
                    .map(|(_, event)| event.clone())
                    .filter(|event| event.frame.timestamp.unwrap_or(0) >= since)
                    .collect();
                if !events.is_empty() {
                    found.push((key.clone(), events));
                }
            }
        }
        found.sort_by(|a, b| (&a.0.app, &a.0.name).cmp(&(&b.0.app, &b.0.name)));
        let mut adopted = Vec::new();
        for (key, events) in found {
            let origin = events[0].origin.0;
            let applied = recover::adopt(&self.nodes[at].hub, &key, events, now_ms)
                .expect("the sim's limits hold every channel");
            if applied > 0 && !adopted.contains(&origin) {
                adopted.push(origin);
            }
            self.stats.recovered += applied as u64;
            self.log(|| format!("n{at} recovered {applied} events of {}", key.name));
        }
        // It knows only itself yet, as the driver at start.
        let alone = [Member::from(self.member(at))];
        self.nodes[at]
            .handoff
            .on_adopted(&adopted, &alone, std::time::Duration::ZERO);
    }

    /// Node `at` copies `ch`'s stored history if it is the channel's home in its region
    /// (in its view) and the rule says so (`backfill::source`, `Backfills::start`):
    /// always after a `Skip` (`listed` is `None`), otherwise (`listed`: the node whose
    /// `Heads` told of the channel, and its cursor) when its store does not cover that
    /// cursor (`backfill::covers`).
    pub(crate) fn maybe_backfill(
        &mut self,
        at: usize,
        ch: usize,
        listed: Option<(usize, &[(u64, u64)])>,
    ) {
        let homes = self.home_ids_among(self.view_mask(at), ch);
        let me = self.member(at);
        let told_by = listed.map(|(n, _)| self.ids[n].as_str());
        let Some(source) = backfill::source(&homes, me.region, me.id, told_by) else {
            return;
        };
        let source = node_index(source);
        let key = self.keys[ch].clone();
        let now = self.now_at(at);
        let outbox = self.nodes[at].outbox.clone();
        let stored = || {
            let mine: Vec<(u64, u64)> = lock(&outbox.stored)
                .get(&key)
                .map(|s| s.cursor.iter().map(|(o, seq)| (o.0, *seq)).collect())
                .unwrap_or_default();
            backfill::covers(&mine, listed.map_or(&[][..], |(_, cursor)| cursor))
        };
        let source_id = self.ids[source].clone();
        let missed = listed.is_none();
        if !self.nodes[at]
            .backfills
            .start(&key, &source_id, now, missed, stored)
        {
            return;
        }
        self.stats.backfills += 1;
        self.log(|| format!("n{at} backfills c{ch} from n{source}"));
        for presence in [false, true] {
            self.send(
                at,
                source,
                Item::Backfill {
                    from: at,
                    ch,
                    presence,
                },
            );
        }
    }

    /// Node `at` answers `from`'s `Backfill` page of `ch` from its store.
    pub(crate) fn answer_backfill(&mut self, at: usize, from: usize, ch: usize, presence: bool) {
        let key = &self.keys[ch];
        let (ids, cursor, events) = match lock(&self.nodes[at].outbox.stored).get(key) {
            None => (Vec::new(), Vec::new(), Vec::new()),
            Some(stored) => {
                let mut ids: Vec<String> = if presence {
                    Vec::new()
                } else {
                    stored.ids.iter().cloned().collect()
                };
                ids.sort();
                // Per origin, the highest stored sequence of this kind.
                let cursor = stored
                    .cursor
                    .iter()
                    .filter_map(|(&origin, &upto)| {
                        let kinds = self.events.get(&(ch, origin))?;
                        let seq = (1..=upto.min(kinds.len() as u64))
                            .rev()
                            .find(|&seq| kinds[seq as usize - 1].is_some() != presence)?;
                        Some((origin, seq))
                    })
                    .collect();
                // The rows themselves: what the copy's store answers repairs from.
                let events = stored
                    .events
                    .values()
                    .filter(|e| e.frame.presence.is_some() == presence)
                    .cloned()
                    .collect();
                (ids, cursor, events)
            }
        };
        let item = Item::BackfillItems {
            from: at,
            ch,
            presence,
            ids,
            cursor,
            events,
        };
        self.send(at, from, item);
    }

    /// Node `at` stores a copied page of `ch`, if it asked for it (`Backfills::took`).
    pub(crate) fn take_backfill(
        &mut self,
        at: usize,
        from: usize,
        ch: usize,
        presence: bool,
        ids: Vec<String>,
        (cursor, events): (Vec<(OriginId, u64)>, Vec<RemoteEvent>),
    ) {
        let key = &self.keys[ch];
        let now = self.now_at(at);
        let took = self.nodes[at]
            .backfills
            .took(key, &self.ids[from], presence, None, false, now);
        if took == Took::Unasked {
            return;
        }
        self.log(|| format!("   stored {} copied messages", ids.len()));
        let mut stored = lock(&self.nodes[at].outbox.stored);
        let channel = stored.entry(key.clone()).or_default();
        channel.ids.extend(ids);
        for event in events {
            channel.events.insert((event.origin, event.seq), event);
        }
        for (origin, seq) in cursor {
            let upto = channel.cursor.entry(origin).or_insert(0);
            *upto = (*upto).max(seq);
        }
    }

    /// Every live node asks again for the pages not answered in time
    /// (`Backfills::tick`, on the driver's tick).
    pub(crate) fn backfill_round(&mut self) {
        for at in 0..self.nodes.len() {
            if !self.nodes[at].up {
                continue;
            }
            let now = self.now_at(at);
            let mut again = self.nodes[at].backfills.tick(now);
            // In a fixed order, not the map's (a seed must replay exactly).
            again.sort_by(|a, b| {
                (&a.0, &a.1.app, &a.1.name, a.2).cmp(&(&b.0, &b.1.app, &b.1.name, b.2))
            });
            for (source, key, presence, _) in again {
                let ch = self.index[&key];
                self.send(
                    at,
                    node_index(&source),
                    Item::Backfill {
                        from: at,
                        ch,
                        presence,
                    },
                );
            }
        }
    }
}
