//! One outbound link: connect, announce (`Hello`), write the control queue and the
//! resend buffer (`links::SendBuffer`) in queued order, resend from the first
//! unacknowledged position when acks stall (`links::RESEND_AFTER`), and reconnect (also
//! as soon as an idle link's connection closes, e.g. the pair's duplicate, so nothing is
//! queued into a dead stream). An event counts as sent (`events_sent_to`,
//! `tern_replication_events_sent_total`) when the link wrote it, not when it was queued.
//! The emulated WAN (delay, loss) is applied here, in user space.

use tern_replication::links::RESEND_AFTER;

use super::wan::wait_until;
use super::*;
use crate::link::LinkSender;
use crate::ClusterError;

/// Who sends on a link, and which link it is (first frame of every link).
#[derive(Clone)]
pub(super) struct Hello {
    pub(super) node_id: String,
    /// This node's region (wire v2 glue: links to other regions are compressed).
    pub(super) region: String,
    pub(super) incarnation: u64,
    pub(super) origin: u64,
    pub(super) epoch: u64,
}

enum Work {
    Control(FrameV1, Now),
    Event(u64, FrameV1, Now),
    Resend,
    /// Nothing to write; `outstanding` when something sent still waits for its ack.
    Idle {
        outstanding: bool,
    },
}

/// Keeps one link to `peer` open and writes its queue into it, reconnecting and
/// resending whatever is unacknowledged.
pub(super) async fn send_loop(
    endpoint: Arc<LinkEndpoint>,
    me: Hello,
    peer: PeerSpec,
    shared: Arc<PeerShared>,
) {
    let delay = shared.wan.map_or(Duration::ZERO, |w| w.delay);
    let loss = shared.wan.map_or(0.0, |w| w.loss);
    let resend_after = RESEND_AFTER + delay * 2;
    // WAN cost per peer: event frames (one per replicated event) and control frames.
    let event_bytes =
        metrics::counter!("tern_replication_event_bytes_total", "peer" => peer.node_id.clone());
    let events_sent =
        metrics::counter!("tern_replication_events_sent_total", "peer" => peer.node_id.clone());
    let control_bytes =
        metrics::counter!("tern_replication_control_bytes_total", "peer" => peer.node_id.clone());
    loop {
        if shared.partitioned.load(Ordering::SeqCst) {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        let mut link = match endpoint.connect(peer.quic, &peer.node_id).await {
            Ok(link) => link,
            Err(err) => {
                tracing::debug!(peer = %peer.node_id, error = %err, "link connect failed; retrying");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        // ---- wire v2 glue (issue 17): the link counts the bytes it writes, by kind,
        // and compresses when the peer is in another region.
        link.set_byte_counters(event_bytes.clone(), control_bytes.clone());
        link.set_compression((peer.region != me.region).then_some(crate::framing::ZSTD_LEVEL));
        // ---- end wire v2 glue
        let mut sent_upto = 0;
        if hello(&mut link, &me, &shared, &mut sent_upto)
            .await
            .is_err()
        {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        // Events this link has written and `events_sent` has counted: an event counts
        // when a flush wrote it, not when it was queued (a link that fails at its flush
        // sent nothing, and its events go out again on the next link).
        let mut counted = 0;
        let mut last_acked = lock(&shared.queue).events.acked();
        let mut progress_at = Instant::now();
        loop {
            if shared.partitioned.load(Ordering::SeqCst) {
                break;
            }
            let work = {
                let mut q = lock(&shared.queue);
                let acked = q.events.acked();
                if acked != last_acked {
                    last_acked = acked;
                    progress_at = Instant::now();
                }
                // Past what was acked, and past what was dropped from the buffer before
                // it was sent (see `hello`).
                sent_upto = q.events.sent_floor(sent_upto);
                let next_event = q.events.after(sent_upto).map(|(seq, _, at)| (*seq, *at));
                let control_at = q.control.front().map(|(_, at)| *at);
                // Whichever was queued first goes first: both wait the same emulated
                // delay, so a control frame must not hold back events queued before it.
                let control_first = match (control_at, next_event) {
                    (Some(c), Some((_, e))) => c <= e,
                    (Some(_), None) => true,
                    _ => false,
                };
                if control_first {
                    let (frame, at) = q.control.pop_front().expect("checked non-empty");
                    Work::Control(frame, at)
                } else if let Some((seq, at)) = next_event {
                    if sent_upto <= acked {
                        // Nothing was outstanding: the ack clock starts now, not when
                        // the link last made progress (an idle link would otherwise
                        // resend its first event at once).
                        progress_at = Instant::now();
                    }
                    let frame = q.events.after(seq - 1).expect("just found").1.clone();
                    Work::Event(seq, frame, at)
                } else if sent_upto > acked && progress_at.elapsed() >= resend_after {
                    Work::Resend
                } else {
                    Work::Idle {
                        outstanding: sent_upto > acked,
                    }
                }
            };
            let result = match work {
                // wire v2 glue: frames are queued on the link and written together
                // (`flush_then_wait`, and `Idle`); the link counts their bytes.
                Work::Control(frame, at) => {
                    match flush_then_wait(&mut link, shared.base + at + delay).await {
                        Ok(()) => link.queue(&frame).await,
                        Err(err) => Err(err),
                    }
                }
                Work::Event(seq, frame, at) => {
                    match flush_then_wait(&mut link, shared.base + at + delay).await {
                        Err(err) => Err(err),
                        Ok(()) => {
                            sent_upto = seq;
                            if loss > 0.0 && rand::random::<f64>() < loss {
                                Ok(())
                            } else {
                                link.queue(&frame).await
                            }
                        }
                    }
                }
                Work::Resend => {
                    progress_at = Instant::now();
                    sent_upto = 0;
                    metrics::counter!("tern_replication_resends_total", "peer" => peer.node_id.clone())
                        .increment(1);
                    hello(&mut link, &me, &shared, &mut sent_upto).await
                }
                Work::Idle { outstanding } => {
                    if let Err(err) = link.flush().await {
                        tracing::debug!(peer = %peer.node_id, error = %err, "link send failed; reconnecting");
                        break;
                    }
                    let closed = tokio::select! {
                        _ = shared.notify.notified() => false,
                        // Looks again for a resend only while something sent is not yet
                        // acked: an idle link sleeps until it is given a frame (or cut),
                        // instead of waking twice a resend interval for nothing.
                        _ = tokio::time::sleep(resend_after / 2), if outstanding => false,
                        // The connection under the link was closed (the duplicate when
                        // both nodes dialed at once, or replaced): reconnect now, not at
                        // the next write, so what is queued next goes to a live link.
                        _ = link.closed() => true,
                    };
                    if closed {
                        Err(ClusterError::Closed)
                    } else {
                        Ok(())
                    }
                }
            };
            let written = link.events_written();
            if written > counted {
                events_sent.increment(written - counted);
                shared
                    .events_sent
                    .fetch_add(written - counted, Ordering::Relaxed);
                counted = written;
            }
            match result {
                Ok(()) => {}
                // Nothing was written: the link is fine. Events are checked before they
                // get a link position (`record`), so this is a control frame; it is lost
                // as a dropped datagram would be, and asked for again if it mattered.
                Err(err @ ClusterError::FrameTooLarge(_)) => {
                    metrics::counter!("tern_replication_frames_refused_total").increment(1);
                    tracing::error!(peer = %peer.node_id, error = %err, "frame not sent");
                }
                Err(err) => {
                    tracing::debug!(peer = %peer.node_id, error = %err, "link send failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// wire v2 glue: writes what the link has queued before waiting for a frame's due time
/// (frames due together go out in one write; none waits behind a delay).
async fn flush_then_wait(link: &mut LinkSender, at: Instant) -> Result<(), ClusterError> {
    if at > Instant::now() {
        link.flush().await?;
    }
    wait_until(at).await;
    Ok(())
}

/// Announces the sender and rewinds to the first unacknowledged event.
async fn hello(
    link: &mut LinkSender,
    me: &Hello,
    shared: &PeerShared,
    sent_upto: &mut u64,
) -> Result<(), ClusterError> {
    let first = {
        let q = lock(&shared.queue);
        let first = q.events.first();
        *sent_upto = q.events.acked().max(first - 1);
        first
    };
    link.send(&FrameV1::Hello {
        node_id: me.node_id.clone(),
        incarnation: me.incarnation,
        origin: me.origin,
        epoch: me.epoch,
        first,
    })
    .await
    .map(|_| ())
}

/// Counts a well-formed frame from a peer that this node does not act on.
pub(super) fn ignored(reason: &'static str) {
    metrics::counter!("tern_replication_frames_ignored_total", "reason" => reason).increment(1);
}

/// Reports an event that cannot be replicated because it does not fit a frame.
pub(super) fn oversized(key: &ChannelKey, seq: u64, bytes: usize) {
    metrics::counter!("tern_replication_frames_refused_total").increment(1);
    tracing::error!(app = %key.app, channel = %key.name, seq, bytes,
        "event does not fit a cluster frame: not replicated");
}
