//! The workload and the churn: clients publish and change presence, nodes crash and
//! restart (a restarted node comes back with a new incarnation, new subscriptions and an
//! empty hub, and catches up from its peers' heads).

use std::collections::BTreeSet;

use tern_core::{CoreLimits, Hub, OriginId, Publisher};
use tern_protocol::{presence_action, Data, Message, PresenceMessage};
use tern_replication::recover;
use tern_replication::routing::INTEREST_TTL;

use crate::acked::AckState;
use crate::cluster::Held;
use crate::network::Item;
use crate::node::lock;
use crate::{Rng, Sim, CLIENTS, GOSSIP_SPREAD_MS, SUBSCRIBED_PERCENT};

impl Sim {
    /// A client publishes one message at node `at` (if it is up); the origin routes it.
    pub fn publish(&mut self, at: usize) {
        self.publish_on(at, 0);
    }

    /// A client publishes one message on channel `ch` at node `at` (if it is up).
    pub fn publish_on(&mut self, at: usize, ch: usize) {
        if !self.nodes[at].up {
            return;
        }
        let name = format!("msg-{}", self.published.len());
        let node = &self.nodes[at];
        let publisher = Publisher {
            connection_id: Some(format!("{}-pub", node.tag).into()),
            frame_id: name.clone(),
        };
        let message = Message {
            name: Some(name),
            data: Some(Data::String("x".into())),
            ..Default::default()
        };
        node.hub
            .publish(&self.keys[ch], &publisher, vec![message], self.hub_now(at))
            .expect("publish");
        self.flush(at);
    }

    /// A random client of node `at` (if it is up) enters, updates its data, or leaves.
    pub fn presence(&mut self, at: usize) {
        self.presence_on(at, 0);
    }

    /// A random client of node `at` (if it is up) enters, updates its data, or leaves
    /// channel `ch`.
    pub fn presence_on(&mut self, at: usize, ch: usize) {
        if !self.nodes[at].up {
            return;
        }
        let k = self.rng.below(CLIENTS as u64) as usize;
        let leave = self.rng.chance(40);
        let data = format!("d{}", self.stats.presence_changes);
        let now_ms = self.hub_now(at);
        let node = &mut self.nodes[at];
        let client = &mut node.clients[k];
        let (action, data) = match client.present.remove(&ch) {
            None => (presence_action::ENTER, data),
            Some(old) if leave => (presence_action::LEAVE, old),
            Some(_) => (presence_action::UPDATE, data),
        };
        if action != presence_action::LEAVE {
            client.present.insert(ch, data.clone());
        }
        let frame_id = format!("{}:{}", client.connection_id, client.serial);
        client.serial += 1;
        let publisher = Publisher {
            connection_id: Some(client.connection_id.as_str().into()),
            frame_id: frame_id.clone(),
        };
        let change = PresenceMessage {
            id: Some(format!("{frame_id}:0")),
            action,
            client_id: Some(client.client_id.clone()),
            connection_id: Some(client.connection_id.clone()),
            data: Some(Data::String(data)),
            timestamp: Some(now_ms),
            ..Default::default()
        };
        node.hub
            .presence(&self.keys[ch], &publisher, vec![change], now_ms)
            .expect("presence");
        self.stats.presence_changes += 1;
        self.flush(at);
    }

    /// Node `at` crashes (if it is up, another node is, and membership has settled: no
    /// departure notice in flight and `settle_ms` since the last crash or restart): its
    /// hub and everything in flight to it are lost. Each survivor learns of it after a
    /// detection delay. Returns whether it crashed.
    pub fn crash(&mut self, at: usize) -> bool {
        let settled = self.departures_pending == 0
            && self
                .last_churn_ms
                .is_none_or(|when| self.now_ms - when >= self.faults.settle_ms);
        if !self.nodes[at].up || self.live_count() < 2 || !settled {
            return false;
        }
        self.last_churn_ms = Some(self.now_ms);
        let dead = self.nodes[at].origin;
        let tag = self.nodes[at].tag.clone();
        for survivor in 0..self.nodes.len() {
            if survivor == at || !self.nodes[survivor].up {
                continue;
            }
            for ch in self.used.clone() {
                let upto = self.nodes[survivor].hub.cursor(&self.keys[ch]).get(dead);
                if upto > 0 {
                    self.held.push(Held {
                        ch,
                        node: survivor,
                        incarnation: self.nodes[survivor].incarnation,
                        origin: dead,
                        upto,
                    });
                }
            }
            self.nodes[survivor].believed_live.insert(dead);
            let at_ms = self.now_ms + 1 + self.rng.below(self.faults.detect_ms) as i64;
            let item = Item::Departed {
                tag: tag.clone(),
                origin: dead,
            };
            self.enqueue(at_ms, survivor, item);
            self.departures_pending += 1;
        }
        self.log(|| format!("n{at} crash ({tag}, origin {dead})"));
        let node = &mut self.nodes[at];
        node.up = false;
        node.hub = Hub::new(OriginId(0), CoreLimits::default());
        self.acks[at] = AckState::default();
        self.dead_tags.push(tag);
        for entry in self.sub_history[at].iter_mut() {
            entry.0 = entry.0.min(self.now_ms);
        }
        // Its links are gone: heads state starts over on new ones.
        self.previous_heads
            .retain(|(node, peer), _| *node != at && *peer != at);
        self.stats.crashes += 1;
        self.note_homes_all();
        true
    }

    /// Node `at` (if down) restarts as a new incarnation: new origin, new connection ids,
    /// empty hub, maybe a subscriber (attached at once if it is the home, else through
    /// `Sync`); it pulls the channel from its peers' heads if it keeps it.
    pub fn restart(&mut self, at: usize) -> bool {
        if self.nodes[at].up {
            return false;
        }
        let incarnation = self.nodes[at].incarnation + 1;
        let subs = roll_subscriptions(&mut self.rng, self.subs_per_node, self.keys.len());
        self.used.extend(subs.iter().copied());
        let ttl = INTEREST_TTL.as_millis() as i64;
        let now_ms = self.now_ms;
        let history = &mut self.sub_history[at];
        history.retain(|(ended, _)| now_ms - *ended < ttl);
        history.extend(subs.iter().map(|&ch| (i64::MAX, ch)));
        let before = std::mem::replace(
            &mut self.nodes[at],
            Sim::boot(&self.limits, at, incarnation, subs),
        );
        self.nodes[at].booted_ms = self.hub_now(at);
        if self.durable_store {
            // Its store is on disk: the new incarnation has what the old one stored, and
            // takes its earlier incarnations' recent events back (`recover`).
            let stored = std::mem::take(&mut *lock(&before.outbox.stored));
            *lock(&self.nodes[at].outbox.stored) = stored;
            let mut earlier = before.earlier_origins;
            earlier.push(before.origin);
            if earlier.len() > recover::ORIGINS_KEPT {
                earlier.remove(0);
            }
            self.nodes[at].earlier_origins = earlier;
            self.recover(at);
        }
        self.stats.restarts += 1;
        self.note_homes_all();
        self.last_churn_ms = Some(self.now_ms);
        self.log(|| {
            format!(
                "n{at} restart as {} origin {}",
                self.nodes[at].tag, self.nodes[at].origin
            )
        });
        // The departed tags live members publish reach it with its first gossip rounds
        // (its own previous incarnation's included).
        for (tag, origin) in self.reported.clone() {
            let when = self.now_ms + 1 + self.rng.below(GOSSIP_SPREAD_MS) as i64;
            self.enqueue(when, at, Item::Reported { tag, origin });
        }
        self.start_subscribers(at);
        self.catch_up_from_heads(at);
        true
    }
}

/// The channels a node incarnation subscribes to: with one channel, that one with
/// `SUBSCRIBED_PERCENT`; else `count` distinct random channels of `channels`.
pub(crate) fn roll_subscriptions(rng: &mut Rng, count: usize, channels: usize) -> Vec<usize> {
    if channels <= 1 {
        return if rng.chance(SUBSCRIBED_PERCENT) {
            vec![0]
        } else {
            Vec::new()
        };
    }
    let mut subs = BTreeSet::new();
    while subs.len() < count.min(channels) {
        subs.insert(rng.below(channels as u64) as usize);
    }
    subs.into_iter().collect()
}
