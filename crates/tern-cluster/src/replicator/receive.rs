//! A peer's inbound link, frame by frame: events applied in origin order (a gap asks
//! the sender), requests answered, acks of what we sent passed to the link, and our
//! `Stored` acks of the sender's events once they are in our store. What each frame
//! does, and in what order, is `tern_replication::receive` (and `links::InLink` for
//! link positions); this file carries out the `receive::Do`s it returns.

use tern_replication::heads::{self, PreviousHeads};
use tern_replication::receive::{self, Do};
use tern_replication::repair;
use tokio::sync::watch;

use super::send::ignored;
use super::*;
use crate::link::LinkReceiver;
use crate::wire::HeadV1;

/// What one inbound link knows of its sender.
#[derive(Default)]
struct Inbound {
    /// The sender (node id, incarnation), once its `Hello` arrived.
    sender: Option<(String, u64)>,
    origin: u64,
    /// The sender's own sequence per channel in its previous `Heads`.
    previous_heads: PreviousHeads,
    /// The acker of this link: the contiguous position, and its task.
    acker: Option<(watch::Sender<u64>, tokio::task::AbortHandle)>,
    /// Our side of the link to the sender (for the partition test hook).
    sender_link: Option<Arc<PeerShared>>,
}

impl Replicator {
    pub(super) async fn accept_loop(self: Arc<Self>, endpoint: Arc<LinkEndpoint>) {
        loop {
            match endpoint.accept().await {
                Ok(link) => {
                    tokio::spawn(self.clone().receive_loop(link));
                }
                Err(err) => {
                    tracing::debug!(error = %err, "inbound link failed");
                    if matches!(err, crate::ClusterError::Closed) {
                        return;
                    }
                }
            }
        }
    }

    /// Applies one peer's link until it ends (or a partition is emulated).
    async fn receive_loop(self: Arc<Self>, mut link: LinkReceiver) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut inbound = Inbound::default();
        while let Ok(Some(frame)) = link.recv().await {
            let Some(hub) = running.hub.upgrade() else {
                return;
            };
            // Every link starts with `Hello` (whose node id `link.rs` checked against the
            // peer's certificate): nothing before it speaks for any node.
            let Some((peer, _)) = &inbound.sender else {
                if let FrameV1::Hello { .. } = frame {
                    self.on_hello(running, &mut inbound, frame);
                } else {
                    ignored("before_hello");
                }
                continue;
            };
            if inbound.sender_link.is_none() {
                inbound.sender_link = self.peer_shared(peer);
            }
            if inbound
                .sender_link
                .as_ref()
                .is_some_and(|l| l.partitioned.load(Ordering::SeqCst))
            {
                break;
            }
            self.on_frame(running, &hub, &mut inbound, frame);
        }
        if let Some((_, task)) = inbound.acker {
            task.abort();
        }
    }

    /// One frame from an announced sender.
    fn on_frame(
        self: &Arc<Self>,
        running: &Running,
        hub: &Hub,
        inbound: &mut Inbound,
        frame: FrameV1,
    ) {
        let Some((peer, incarnation)) = inbound.sender.clone() else {
            return;
        };
        let key = |app: &str, channel: &str| ChannelKey::new(app, channel);
        match frame {
            FrameV1::Hello { .. } => self.on_hello(running, inbound, frame),
            FrameV1::Event(event) => self.on_event(hub, inbound, &peer, incarnation, event),
            FrameV1::Repair {
                app,
                channel,
                origin,
                from,
                to,
            } => self.answer_repair(hub, &peer, &key(&app, &channel), origin, (from, to)),
            FrameV1::Heads { channels } => self.on_heads(hub, inbound, &peer, channels),
            FrameV1::Interest { channels, on } => self.on_interest(&peer, channels, on),
            FrameV1::Sync { app, channel } => self.answer_sync(hub, &peer, &key(&app, &channel)),
            FrameV1::SyncMembers {
                app,
                channel,
                frame,
            } => {
                let Ok(frame) = tern_protocol::decode(tern_protocol::Format::Msgpack, &frame)
                else {
                    ignored("sync_members_frame");
                    return;
                };
                let key = key(&app, &channel);
                let members = frame.presence.unwrap_or_default();
                let mut out = Vec::new();
                receive::sync_members(self.at(hub), &key, members, self.holds(&key), &mut out);
                self.carry_out(&peer, out);
            }
            FrameV1::Synced {
                app,
                channel,
                origins,
            } => {
                let key = key(&app, &channel);
                let mut out = Vec::new();
                receive::synced(self.at(hub), &key, &origins, self.holds(&key), &mut out);
                self.carry_out(&peer, out);
            }
            FrameV1::Backfill {
                app,
                channel,
                presence,
                after,
            } => self.answer_backfill(peer, key(&app, &channel), presence, after),
            FrameV1::BackfillItems {
                app,
                channel,
                presence,
                items,
                more,
            } => self.take_backfill(&peer, key(&app, &channel), presence, items, more),
            FrameV1::Skip {
                app,
                channel,
                origin,
                upto,
            } => {
                let key = key(&app, &channel);
                let mut out = Vec::new();
                let kept = self.holds(&key);
                match receive::skip(self.at(hub), &key, origin, upto, kept, &mut out) {
                    Ok(()) => self.carry_out(&peer, out),
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "a skip for a kept channel was refused");
                    }
                }
            }
            FrameV1::Stored {
                incarnation,
                epoch,
                upto,
            } => {
                if incarnation == self.config.incarnation {
                    self.on_stored(&peer, epoch, upto);
                }
            }
        }
    }

    /// A `Hello`: the sender's link (re)starts; its acker starts afresh.
    fn on_hello(self: &Arc<Self>, running: &Running, inbound: &mut Inbound, hello: FrameV1) {
        let FrameV1::Hello {
            node_id,
            incarnation,
            origin,
            epoch,
            first,
        } = hello
        else {
            return;
        };
        inbound.origin = origin;
        let store_mark = running.barrier.lost_writes();
        let state = {
            let mut recv = lock(&self.recv);
            // One entry per sender node ever seen: bounded like the peer set.
            if recv.len() >= crate::PEERS_MAX * 4 && !recv.contains_key(&node_id) {
                recv.clear();
            }
            let before = recv.get(&node_id).copied();
            let state = InLink::hello(before, incarnation, epoch, first, store_mark);
            recv.insert(node_id.clone(), state);
            state
        };
        if let Some((_, task)) = inbound.acker.take() {
            task.abort();
        }
        let (tx, rx) = watch::channel(state.contiguous);
        let task = tokio::spawn(self.clone().ack_loop(
            node_id.clone(),
            (incarnation, epoch),
            state.store_mark,
            rx,
        ))
        .abort_handle();
        inbound.acker = Some((tx, task));
        inbound.sender = Some((node_id, incarnation));
    }

    /// An event: applied in origin order (`receive::event`: a gap is watched, filled
    /// from this node's store and asked of the sender); a link position applied in a
    /// row goes to the acker.
    fn on_event(
        self: &Arc<Self>,
        hub: &Hub,
        inbound: &Inbound,
        peer: &str,
        incarnation: u64,
        event: EventV1,
    ) {
        let Ok(remote) = event.to_remote() else {
            ignored("event_frame");
            return;
        };
        let key = ChannelKey::new(&event.app, &event.channel);
        let on_link = event.link_seq > 0;
        let mut out = Vec::new();
        let taken = receive::event(
            self.at(hub),
            &key,
            remote,
            on_link,
            || self.holds(&key),
            || lock(&self.gaps),
            repair::ASK_AGAIN,
            &mut out,
        );
        let taken = match taken {
            Ok(taken) => taken,
            Err(err) => {
                tracing::warn!(channel = %event.channel, error = %err, "remote event refused");
                return;
            }
        };
        if taken.counted {
            let advanced = lock(&self.recv)
                .get_mut(peer)
                .and_then(|state| state.applied(incarnation, event.link_seq));
            if let (Some(upto), Some((tx, _))) = (advanced, &inbound.acker) {
                let _ = tx.send(upto);
            }
        }
        self.carry_out(peer, out);
    }

    /// A peer's cursors (`receive::heads`): for each channel this node keeps, ask for
    /// what no link will bring; a home with nothing of a channel copies its history.
    fn on_heads(
        self: &Arc<Self>,
        hub: &Hub,
        inbound: &mut Inbound,
        peer: &str,
        channels: Vec<HeadV1>,
    ) {
        let live_origins: Vec<u64> = lock(&self.out)
            .peers
            .values()
            .map(|p| p.spec.origin)
            .collect();
        let live = |origin: u64| live_origins.contains(&origin);
        let asker = heads::Asker {
            own: self.origin.0,
            sender: inbound.origin,
            live: &live,
        };
        let keys: Vec<ChannelKey> = channels
            .iter()
            .map(|h| ChannelKey::new(&h.app, &h.channel))
            .collect();
        {
            let mut quiet = lock(&self.quiet);
            for (key, head) in keys.iter().zip(&channels) {
                quiet.heard(inbound.origin, key, &head.origins);
            }
        }
        let listed = keys
            .iter()
            .zip(channels.iter().map(|h| h.origins.as_slice()));
        let mut out = Vec::new();
        receive::heads(
            self.at(hub),
            &asker,
            &mut inbound.previous_heads,
            listed,
            |key| self.holds(key),
            &mut out,
        );
        self.carry_out(peer, out);
    }

    /// Carries out what a frame from `peer` left to the driver (`receive::Do`), in order.
    fn carry_out(self: &Arc<Self>, peer: &str, out: Vec<Do>) {
        for action in out {
            match action {
                Do::Ask {
                    key,
                    origin,
                    from,
                    to,
                } => {
                    let frame = FrameV1::Repair {
                        app: key.app.to_string(),
                        channel: key.name.to_string(),
                        origin,
                        from,
                        to,
                    };
                    self.send_control(peer, frame);
                }
                Do::FillFromStore {
                    key,
                    origin,
                    from,
                    to,
                } => self.fill_from_own_store(&key, origin, (from, to)),
                Do::Backfill { key, listed } => {
                    self.maybe_backfill(&key, listed.as_deref().map(|l| (peer, l)));
                }
                Do::Warmed(key) => self.warmed(&key),
                Do::Skipped {
                    key,
                    origin,
                    upto,
                    applied,
                } => {
                    tracing::warn!(channel = %key.name, origin = format!("{origin:016x}"), upto, applied, "events no peer can supply were skipped");
                }
                Do::GaveUp {
                    key,
                    origin,
                    upto,
                    applied,
                } => super::stalls::gave_up(&key, origin, upto, applied),
                Do::StallsFull => {
                    metrics::counter!("tern_replication_stalls_full_total").increment(1);
                }
                Do::Ignored(reason) => ignored(reason),
            }
        }
    }

    /// Acknowledges a sender's link positions once they are in our store. Stops for good
    /// (the sender then stops counting us as a replica of them) once the store lost a
    /// write after `store_mark`, the link's start.
    async fn ack_loop(
        self: Arc<Self>,
        peer: String,
        (incarnation, epoch): (u64, u64),
        store_mark: u64,
        mut rx: watch::Receiver<u64>,
    ) {
        let Some(running) = self.running.get() else {
            return;
        };
        let mut sent = 0;
        loop {
            let upto = *rx.borrow_and_update();
            if upto > sent {
                let (tx, done) = tokio::sync::oneshot::channel();
                running.barrier.after_committed(
                    store_mark,
                    Box::new(move |stored| {
                        let _ = tx.send(stored);
                    }),
                );
                if !done.await.unwrap_or(false) {
                    tracing::error!(%peer, "this node's history store lost writes while this link was up: its events are no longer acknowledged as stored until the link starts afresh (a new incarnation or epoch)");
                    return;
                }
                let queued = self.send_control(
                    &peer,
                    FrameV1::Stored {
                        incarnation,
                        epoch,
                        upto,
                    },
                );
                if queued {
                    sent = upto;
                } else {
                    // The sender's link reached us before membership told us of it (or
                    // its queue is full): acks are cumulative, try again shortly rather
                    // than leave it resending everything.
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
                continue;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
