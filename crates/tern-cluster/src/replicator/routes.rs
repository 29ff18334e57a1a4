//! The rules' glue: which node is home, who gets an event, whose interest counts, how a
//! first subscriber waits for a channel's state, and which publishes' replies run now.
//! Every decision is `tern_replication`'s; this file gathers its inputs from the
//! replicator's state and carries out the result.

use tern_replication::acks::LinkView;
use tern_replication::links::StoredOutcome;
use tern_replication::routing::INTEREST_PER_FRAME;
use tern_replication::warm::Started;

use super::send::ignored;
use super::*;

impl Replicator {
    /// This node and its live peers, as routing sees them.
    pub(super) fn nodes<'a>(&'a self, out: &'a Out) -> impl Iterator<Item = Node<'a>> + 'a {
        out.peers.values().map(PeerOut::node).chain([self.me()])
    }

    fn me(&self) -> Node<'_> {
        Node {
            id: &self.config.node_id,
            region: &self.config.region,
            origin: self.origin.0,
        }
    }

    /// The channel's home in this node's region (this node included).
    pub(super) fn home_here<'a>(&'a self, out: &'a Out, key: &ChannelKey) -> Option<&'a str> {
        routing::home_in(key, self.nodes(out), &self.config.region)
    }

    /// Same-region live peers whose interest in the channel is current.
    pub(super) fn interested<'a>(&self, out: &'a Out, key: &ChannelKey) -> Vec<&'a str> {
        let mut peers = out.interest.interested(key, self.now());
        peers.retain(|peer| out.peers.contains_key(*peer));
        peers
    }

    /// Who gets an event of `origin` on `key` (`routing::recipients`).
    pub(super) fn recipients(&self, out: &Out, key: &ChannelKey, origin: u64) -> Vec<String> {
        let peers: Vec<Node> = out.peers.values().map(PeerOut::node).collect();
        let interested = self.interested(out, key);
        routing::recipients(self.me(), &peers, key, origin, interested)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Whether this node keeps `key` (and so repairs its gaps from `Heads`): it has
    /// subscribers on it, is waiting for its state, or is its home here.
    pub(super) fn holds(&self, key: &ChannelKey) -> bool {
        tern_replication::inbound::keeps(
            || lock(&self.mine).contains(key),
            || lock(&self.warming).contains(key),
            || self.home_here(&lock(&self.out), key) == Some(self.config.node_id.as_str()),
        )
    }

    /// The publishes whose replies run now (`acks::Waiters::drain`).
    pub(super) fn drain_waiters(&self, out: &mut Out) -> Vec<(ReplicaCallback, bool)> {
        let now = self.now();
        let Out { peers, waiters, .. } = out;
        let done = waiters.drain(self.config.ack_replicas, now, |epoch| {
            let peer = peers.values().find(|p| p.link.epoch == epoch)?;
            Some(LinkView {
                link: peer.link,
                remote: peer.spec.region != self.config.region,
            })
        });
        let timed_out = done.iter().filter(|(_, ok)| !ok).count();
        if timed_out > 0 {
            metrics::counter!("tern_replica_ack_timeouts_total").increment(timed_out as u64);
            // How each link stands, so a log says which peer did not store in time.
            let links: Vec<String> = peers
                .iter()
                .map(|(id, p)| {
                    format!(
                        "{id}@{}: epoch {} sent {} stored {}",
                        p.spec.region, p.link.epoch, p.link.seq, p.link.acked
                    )
                })
                .collect();
            tracing::warn!(
                timed_out,
                ack_replicas = self.config.ack_replicas,
                links = %links.join("; "),
                "publishes not stored on replicas in time: refused"
            );
        }
        done
    }

    pub(super) fn expire_waiters(&self) {
        let mut out = lock(&self.out);
        let done = self.drain_waiters(&mut out);
        drop(out);
        run_all(done);
    }

    /// A `Stored` ack from `peer`: the link advances, its buffer forgets what is stored,
    /// and waiting replies may run.
    pub(super) fn on_stored(&self, peer: &str, epoch: u64, upto: u64) {
        let mut out = lock(&self.out);
        let Some(p) = out.peers.get_mut(peer) else {
            return;
        };
        match p.link.on_stored(epoch, upto) {
            StoredOutcome::Stale => return,
            StoredOutcome::Unsent => {
                ignored("stored_unsent");
                return;
            }
            StoredOutcome::Advanced(upto) => {
                let mut q = lock(&p.shared.queue);
                if let Some(queued) = q.events.ack(upto) {
                    let lag = self.now().saturating_sub(queued);
                    p.shared.lag.record(lag.as_secs_f64());
                }
                p.shared.unacked.set(q.events.len() as f64);
            }
        }
        p.shared.notify.notify_one();
        let done = self.drain_waiters(&mut out);
        drop(out);
        run_all(done);
    }

    /// Queues a control frame to `peer` (acks, repairs); dropped if the peer is unknown
    /// or its queue is full (both are retried by the protocol).
    pub(super) fn send_control(&self, peer: &str, frame: FrameV1) -> bool {
        let out = lock(&self.out);
        let Some(p) = out.peers.get(peer) else {
            return false;
        };
        let mut q = lock(&p.shared.queue);
        let queued = q.control.len() < CONTROL_QUEUE_MAX;
        if queued {
            q.control.push_back((frame, self.now()));
        }
        drop(q);
        p.shared.notify.notify_one();
        queued
    }

    /// Tells this node's region it has (`on`) or no longer has subscribers on `key`.
    pub(super) fn tell_region(&self, key: &ChannelKey, on: bool) {
        let frame = FrameV1::Interest {
            channels: vec![(key.app.to_string(), key.name.to_string())],
            on,
        };
        for peer in self.region_peers() {
            self.send_control(&peer, frame.clone());
        }
    }

    /// The channels this node has subscribers on, as `Interest` names them.
    pub(super) fn interest_list(&self) -> Vec<(String, String)> {
        lock(&self.mine)
            .iter()
            .map(|k| (k.app.to_string(), k.name.to_string()))
            .collect()
    }

    /// Peers in this node's region.
    fn region_peers(&self) -> Vec<String> {
        lock(&self.out)
            .peers
            .values()
            .filter(|p| p.spec.region == self.config.region)
            .map(|p| p.spec.node_id.clone())
            .collect()
    }

    /// Repeats this node's interest to its region's peers (they forget it otherwise) and
    /// forgets peers' interest that was not repeated.
    pub(super) fn refresh_interest(&self) {
        let channels = self.interest_list();
        let peers = self.region_peers();
        for chunk in channels.chunks(INTEREST_PER_FRAME) {
            for peer in &peers {
                self.send_control(
                    peer,
                    FrameV1::Interest {
                        channels: chunk.to_vec(),
                        on: true,
                    },
                );
            }
        }
        let now = self.now();
        lock(&self.out).interest.expire(now);
    }

    /// A same-region peer's interest frame.
    pub(super) fn on_interest(&self, peer: &str, channels: Vec<(String, String)>, on: bool) {
        let now = self.now();
        let mut out = lock(&self.out);
        if out
            .peers
            .get(peer)
            .is_none_or(|p| p.spec.region != self.config.region)
        {
            return;
        }
        let keys = channels
            .iter()
            .map(|(app, channel)| ChannelKey::new(app, channel));
        let refused = out.interest.on_frame(peer, keys, on, now);
        if refused > 0 {
            metrics::counter!("tern_replication_interest_refused_total").increment(refused as u64);
        }
    }

    /// Before this node's first subscriber attaches to `key`: `None` when the node
    /// already receives the channel (it has subscribers on it, is its home, or is
    /// alone); otherwise it registers interest, asks the region's home for the
    /// channel's state, and the receiver completes once that arrived (or is dropped
    /// after [`WARM_TIMEOUT`]; attach anyway then).
    pub fn warm(&self, key: &ChannelKey) -> Option<oneshot::Receiver<()>> {
        if self.running.get().is_none() || lock(&self.mine).contains(key) {
            return None;
        }
        let home = {
            let out = lock(&self.out);
            let home = self.home_here(&out, key)?;
            if home == self.config.node_id {
                return None;
            }
            home.to_string()
        };
        let (tx, rx) = oneshot::channel();
        match lock(&self.warming).start(key, &home, self.now(), tx) {
            Started::Joined => return Some(rx),
            Started::Full => {
                metrics::counter!("tern_replication_warm_refused_total").increment(1);
                return None;
            }
            Started::Asked => self.tick_wake.notify_one(),
        }
        // Interest first: from now on the region sends us the channel's events, and
        // the state asked for next covers everything before.
        self.tell_region(key, true);
        self.send_control(&home, sync_frame(key));
        Some(rx)
    }

    /// Gives up on channel states that did not come in time, and asks again for those
    /// that are late; likewise for history pages being copied.
    pub(super) fn expire_warming(&self) {
        let now = self.now();
        let tick = lock(&self.warming).tick(now);
        for (key, _waiters) in &tick.expired {
            tracing::warn!(channel = %key.name, "channel state did not arrive in time; attaching with what this node has");
        }
        for (home, key) in &tick.ask_again {
            self.send_control(home, sync_frame(key));
        }
        let again = lock(&self.backfills).tick(now);
        for (source, key, presence, after) in again {
            let frame = FrameV1::Backfill {
                app: key.app.to_string(),
                channel: key.name.to_string(),
                presence,
                after,
            };
            self.send_control(&source, frame);
        }
    }

    /// The channel's state arrived: the attaches waiting on it go ahead.
    pub(super) fn warmed(&self, key: &ChannelKey) {
        for waiter in lock(&self.warming).done(key) {
            let _ = waiter.send(());
        }
    }
}

fn sync_frame(key: &ChannelKey) -> FrameV1 {
    FrameV1::Sync {
        app: key.app.to_string(),
        channel: key.name.to_string(),
    }
}
