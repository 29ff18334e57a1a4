//! Full-mesh replication between a fixed set of peers: every local-origin event goes to
//! every peer over its link; inbound events are applied in origin order by the core; a
//! gap is repaired by asking the peer that reported it for the missing range. Interest
//! routing, membership and ack_replicas are later steps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_core::{ChannelEvent, ChannelKey, Hub, Journal, OriginId, RemoteEvent, RemoteOutcome};
use tokio::sync::mpsc;

use crate::link::{LinkEndpoint, LinkReceiver};
use crate::wire::{EventV1, FrameV1};

/// Frames queued per peer before new ones are dropped (a drop becomes a gap, which the
/// next event from that origin reveals and a repair fills).
pub const PEER_QUEUE_MAX: usize = 65_536;
const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// The hub's journal on a replicating node: forwards local-origin events to peers, then
/// to the next journal (the history store).
pub struct ReplicationJournal {
    origin: OriginId,
    peers: Mutex<HashMap<SocketAddr, mpsc::Sender<FrameV1>>>,
    next: Option<Arc<dyn Journal>>,
}

impl ReplicationJournal {
    pub fn new(origin: OriginId, next: Option<Arc<dyn Journal>>) -> Arc<ReplicationJournal> {
        Arc::new(ReplicationJournal {
            origin,
            peers: Mutex::new(HashMap::new()),
            next,
        })
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, mpsc::Sender<FrameV1>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_to(&self, peer: SocketAddr, frame: FrameV1) {
        if let Some(queue) = self.peers().get(&peer) {
            let _ = queue.try_send(frame);
        }
    }
}

impl Journal for ReplicationJournal {
    fn record(&self, key: &ChannelKey, event: &Arc<ChannelEvent>) {
        if let Some(next) = &self.next {
            next.record(key, event);
        }
        if event.origin != self.origin {
            return;
        }
        let frame = FrameV1::Event(EventV1::from_remote(
            &key.app,
            &key.name,
            &RemoteEvent::from_event(event),
        ));
        for queue in self.peers().values() {
            if queue.try_send(frame.clone()).is_err() {
                tracing::warn!(channel = %key.name, "peer queue full: event left for repair");
            }
        }
    }
}

/// Starts replication: a sender task per peer and the accept loop. `peers` are the
/// peers' link addresses (their endpoints' bound addresses).
pub fn spawn_replication(
    endpoint: Arc<LinkEndpoint>,
    hub: Arc<Hub>,
    journal: Arc<ReplicationJournal>,
    peers: Vec<SocketAddr>,
) {
    for peer in peers {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        journal.peers().insert(peer, tx);
        tokio::spawn(send_loop(endpoint.clone(), peer, rx));
    }
    tokio::spawn(accept_loop(endpoint, hub, journal));
}

/// Keeps one link to `peer` open and writes its queue into it, reconnecting on failure.
async fn send_loop(
    endpoint: Arc<LinkEndpoint>,
    peer: SocketAddr,
    mut queue: mpsc::Receiver<FrameV1>,
) {
    let mut pending: Option<FrameV1> = None;
    loop {
        let mut link = match endpoint.connect(peer).await {
            Ok(link) => link,
            Err(err) => {
                tracing::debug!(%peer, error = %err, "link connect failed; retrying");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        loop {
            let frame = match pending.take() {
                Some(frame) => frame,
                None => match queue.recv().await {
                    Some(frame) => frame,
                    None => return,
                },
            };
            if let Err(err) = link.send(&frame).await {
                tracing::debug!(%peer, error = %err, "link send failed; reconnecting");
                pending = Some(frame);
                break;
            }
        }
    }
}

async fn accept_loop(endpoint: Arc<LinkEndpoint>, hub: Arc<Hub>, journal: Arc<ReplicationJournal>) {
    loop {
        match endpoint.accept().await {
            Ok(link) => {
                tokio::spawn(receive_loop(link, hub.clone(), journal.clone()));
            }
            Err(err) => tracing::debug!(error = %err, "inbound link failed"),
        }
    }
}

/// Applies a peer's frames: events in origin order, repair requests from our log.
async fn receive_loop(mut link: LinkReceiver, hub: Arc<Hub>, journal: Arc<ReplicationJournal>) {
    let peer = link.remote_address();
    while let Ok(Some(frame)) = link.recv().await {
        match frame {
            FrameV1::Event(event) => {
                let Ok(remote) = event.to_remote() else {
                    continue;
                };
                let key = ChannelKey::new(&event.app, &event.channel);
                if let Ok(RemoteOutcome::Gap {
                    origin,
                    missing: (from, to),
                }) = hub.apply_remote(&key, remote, crate::now_ms())
                {
                    journal.send_to(
                        peer,
                        FrameV1::Repair {
                            app: event.app,
                            channel: event.channel,
                            origin: origin.0,
                            from,
                            to,
                        },
                    );
                }
            }
            FrameV1::Repair {
                app,
                channel,
                origin,
                from,
                to,
            } => {
                let key = ChannelKey::new(&app, &channel);
                for event in hub.events_of(&key, OriginId(origin), from, to) {
                    let frame =
                        EventV1::from_remote(&app, &channel, &RemoteEvent::from_event(&event));
                    journal.send_to(peer, FrameV1::Event(frame));
                }
            }
        }
    }
}
