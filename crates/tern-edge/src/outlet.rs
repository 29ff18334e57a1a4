//! A connection's outlet: the bounded queue between its session, which pushes frames and
//! channel events, and its transport, which drains them (the WebSocket writer in
//! `connection.rs`, or comet's long-polls). Below both the session and the transports,
//! so neither imports the other for it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tern_core::{ChannelEvent, Subscriber};
use tern_protocol::{action, ErrorInfo, Format, ProtocolMessage};
use tokio::sync::{mpsc, Notify};

use crate::stats::{AppStats, Delivered};

/// Most queued frames written before one flush (one syscall batch), or carried by one
/// comet response.
pub(crate) const WRITE_BATCH_MAX: usize = 256;
/// Queue slots kept free before a client frame is handled (its replies go there).
const REPLY_HEADROOM: usize = 4;

/// The name an attachment was made under when it is qualified (`[?…]name`), behind a
/// thin pointer: an [`Outbound`] then stays two words.
pub(crate) type Alias = Arc<String>;

/// What a connection's writer sends, in queue order. Two words: the queue's first block
/// (32 slots) is allocated with the connection and held for its life, so each byte of
/// this type is 32 bytes of every idle connection.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A channel event shared with every subscriber (already encoded per format). With
    /// an alias (an attachment made under a qualified name) it is re-encoded with that
    /// name, since the client matches frames by name.
    Event(Arc<ChannelEvent>, Option<Alias>),
    /// A frame for this connection only (ACK, ATTACHED, SYNC …).
    Frame(Box<ProtocolMessage>),
}

// Guards the size the comment above relies on.
const _: () = assert!(std::mem::size_of::<Outbound>() == 16);

/// The writer's side of an [`Outlet`]: the queue it drains, and what it shares with the
/// session (the terminal frame among it).
pub(crate) struct OutletRx {
    pub(crate) queue: mpsc::Receiver<Outbound>,
    pub(crate) shared: Arc<Shared>,
}

/// What a connection's session and its transport share besides the queue, in one
/// allocation: it lives as long as the connection, so every idle connection pays for
/// its size (a `watch` channel for the end alone was ~400 bytes: eight `Notify`s).
pub(crate) struct Shared {
    /// Set once (see [`Outlet::finish`]): the frame to send before closing (or
    /// `None`: just close). Boxed: a `ProtocolMessage` inline would be held for the
    /// connection's life.
    end: OnceLock<Option<Box<ProtocolMessage>>>,
    /// Woken once `end` is set. One waiter at a time (the writer, or the one comet
    /// receive holding the queue), so `notify_one`'s stored permit cannot be lost.
    ended: Notify,
    /// Woken when the queue overflows or the writer stalls: the session then
    /// disconnects the client.
    overflow: Notify,
    /// The app's statistics, set once the session knows the app; the transport counts
    /// what it delivers there.
    stats: OnceLock<Arc<AppStats>>,
}

impl Shared {
    /// The terminal frame once the session ended the connection: `Some(None)` means
    /// close without one.
    pub(crate) fn end(&self) -> Option<&Option<Box<ProtocolMessage>>> {
        self.end.get()
    }

    /// Waits until the session ends the connection (at once if it has). Cancel-safe.
    pub(crate) async fn ended(&self) {
        let notified = self.ended.notified();
        if self.end.get().is_some() {
            return;
        }
        notified.await
    }

    /// Waits for an overflow (or a stalled writer). Cancel-safe.
    pub(crate) fn overflowed(&self) -> tokio::sync::futures::Notified<'_> {
        self.overflow.notified()
    }

    /// The transport gave up on a client that does not read: the session disconnects
    /// it as it does on an overflow.
    pub(crate) fn stalled(&self) {
        self.overflow.notify_one();
    }

    /// Where delivered messages are counted, once the session knows the app.
    pub(crate) fn stats(&self) -> Option<&Arc<AppStats>> {
        self.stats.get()
    }
}

/// The session's handle on its writer.
#[derive(Clone)]
pub(crate) struct Outlet {
    queue: mpsc::Sender<Outbound>,
    pub(crate) shared: Arc<Shared>,
}

impl Outlet {
    /// A connection's outlet, its queue bounded at `queue_max` frames, and the side a
    /// writer (WebSocket) or the long-polls (comet) drain.
    pub(crate) fn new(queue_max: usize) -> (Outlet, OutletRx) {
        let (queue, rx) = mpsc::channel(queue_max);
        let shared = Arc::new(Shared {
            end: OnceLock::new(),
            ended: Notify::new(),
            overflow: Notify::new(),
            stats: OnceLock::new(),
        });
        let outlet = Outlet {
            queue,
            shared: shared.clone(),
        };
        (outlet, OutletRx { queue: rx, shared })
    }

    /// Queues without waiting. A full queue means the client reads too slowly: the
    /// connection is told to disconnect, and the item is refused.
    pub(crate) fn push(&self, item: Outbound) -> bool {
        match self.queue.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("tern_outbound_overflows_total").increment(1);
                self.shared.overflow.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the queue has room for a few replies right now (then
    /// [`Outlet::headroom`] would not wait).
    pub(crate) fn has_headroom(&self) -> bool {
        !self.queue.is_closed() && self.queue.capacity() >= REPLY_HEADROOM
    }

    /// Waits until the queue has room for a few replies, so a client that sends faster
    /// than it reads is slowed down (its frames stay unread) instead of overflowing its
    /// own queue with ACKs. `false` if room did not appear within `wait`.
    pub(crate) async fn headroom(&self, wait: Duration) -> bool {
        matches!(
            tokio::time::timeout(wait, self.queue.reserve_many(REPLY_HEADROOM)).await,
            Ok(Ok(_))
        )
    }

    pub(crate) fn send(&self, frame: ProtocolMessage) -> bool {
        self.push(Outbound::Frame(Box::new(frame)))
    }

    /// Ends the connection: queued frames are dropped, `last` (if any) is written, and
    /// the socket is closed.
    pub(crate) fn finish(&self, last: Option<ProtocolMessage>) {
        if self.shared.end.set(last.map(Box::new)).is_ok() {
            self.shared.ended.notify_one();
        }
    }

    /// Sets the app's statistics (once) for the transport to count deliveries in.
    pub(crate) fn set_stats(&self, stats: Arc<AppStats>) {
        let _ = self.shared.stats.set(stats);
    }
}

/// Subscriber for one attachment: pushes channel events into the connection's queue.
pub(crate) struct AttachmentSink {
    pub(crate) outlet: Outlet,
    pub(crate) alias: Option<Alias>,
}

impl Subscriber for AttachmentSink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        self.outlet
            .push(Outbound::Event(event.clone(), self.alias.clone()))
    }
}

/// The frame refusing a connection: an ERROR (the client goes FAILED with the
/// error), except for a server-side failure (status 500 and up: a `$connect`
/// function that failed closed), which is DISCONNECTED so the client tries again.
pub(crate) fn refusal_frame(error: ErrorInfo) -> ProtocolMessage {
    if error.status_code >= 500 {
        ProtocolMessage {
            action: action::DISCONNECTED,
            error: Some(error),
            ..Default::default()
        }
    } else {
        error_frame(error)
    }
}

/// A connection-level ERROR frame (the client goes FAILED).
pub(crate) fn error_frame(error: ErrorInfo) -> ProtocolMessage {
    ProtocolMessage {
        action: action::ERROR,
        error: Some(error),
        ..Default::default()
    }
}

/// One queued item as it goes on the wire: a channel event's shared encoding, or the
/// frame encoded now.
pub(crate) fn encode_item(format: Format, item: Outbound) -> Bytes {
    match item {
        Outbound::Event(event, None) => event.encoded(format),
        Outbound::Event(event, Some(alias)) => {
            let mut frame = event.frame.clone();
            frame.channel = Some(String::clone(&alias));
            tern_protocol::encode(format, &frame)
        }
        Outbound::Frame(frame) => tern_protocol::encode(format, &frame),
    }
}

/// Adds the messages of a channel event about to be written to `delivered`.
pub(crate) fn tally(delivered: &mut Delivered, item: &Outbound) {
    let event = match item {
        Outbound::Event(event, _) => event,
        Outbound::Frame(_) => return,
    };
    if event.is_message() {
        delivered.messages += event.message_count() as u64;
        delivered.message_bytes += event.data_bytes() as u64;
    } else {
        delivered.presence += event.presence_count() as u64;
        delivered.presence_bytes += event.data_bytes() as u64;
    }
}
