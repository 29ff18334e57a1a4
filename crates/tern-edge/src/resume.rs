//! What of a connection survives its transport: the replies it was given (so re-sent
//! publishes are answered, not applied twice) and where it is present. Parked in the
//! core's [`tern_core::ConnectionRegistry`] between a drop and a resume.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tern_auth::ClientIdentity;
use tern_protocol::ErrorInfo;

/// The answer a MESSAGE/PRESENCE frame got.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    /// Applied. `store_mark` is the history store's lost-write count before it was: a
    /// re-sent copy is ACKed only if no write was lost since (see
    /// `EdgeState::after_durable`), since the first reply may have become a NACK.
    Ack {
        serials: Vec<Option<String>>,
        store_mark: u64,
    },
    Nack(ErrorInfo),
}

/// The last replies of a connection by msgSerial, bounded. A frame re-sent after a resume
/// carries the same msgSerial and gets the same reply without being applied again.
#[derive(Debug, Default)]
pub(crate) struct ReplyWindow {
    replies: VecDeque<(i64, Reply)>,
}

/// What a re-sent msgSerial gets.
pub(crate) enum Seen {
    /// Never seen: apply the frame.
    New,
    /// Seen and remembered: send this reply again.
    Again(Reply),
    /// Older than the window: it was applied; ACK it without serials.
    Forgotten,
}

impl ReplyWindow {
    pub(crate) fn check(&self, msg_serial: i64) -> Seen {
        match self.replies.back() {
            Some((last, _)) if msg_serial <= *last => self
                .replies
                .iter()
                .find(|(serial, _)| *serial == msg_serial)
                .map_or(Seen::Forgotten, |(_, reply)| Seen::Again(reply.clone())),
            _ => Seen::New,
        }
    }

    pub(crate) fn record(&mut self, msg_serial: i64, reply: Reply, window_max: usize) {
        self.replies.push_back((msg_serial, reply));
        while self.replies.len() > window_max.max(1) {
            self.replies.pop_front();
        }
    }
}

/// A connection's state while its transport is gone.
pub(crate) struct ParkedSession {
    /// Its app and the clientId it acted as (a resume must present compatible
    /// credentials), the transport it last had and its first connect time
    /// (`GET /connections/{id}`, `connection.disconnected`).
    pub(crate) info: crate::connections::ConnectionInfo,
    pub(crate) replies: ReplyWindow,
    pub(crate) presence_channels: HashSet<Arc<str>>,
    /// The clientId and capability the `$connect` function gave it, which a resume
    /// keeps (the client presents its original credentials again).
    pub(crate) from_function: Option<(ClientIdentity, tern_auth::Capability)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New serials are new; re-sent ones get their reply; ones past the window are
    /// acknowledged as already applied.
    #[test]
    fn window_answers_resent_serials() {
        let mut window = ReplyWindow::default();
        assert!(matches!(window.check(0), Seen::New));
        for serial in 0..5 {
            let serials = vec![Some(format!("s{serial}"))];
            window.record(
                serial,
                Reply::Ack {
                    serials,
                    store_mark: 0,
                },
                3,
            );
        }
        assert!(
            matches!(window.check(4), Seen::Again(Reply::Ack { serials, .. }) if serials == vec![Some("s4".to_string())])
        );
        assert!(matches!(window.check(0), Seen::Forgotten));
        assert!(matches!(window.check(5), Seen::New));
    }
}
