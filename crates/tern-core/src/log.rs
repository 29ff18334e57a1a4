//! A channel's recent log: the last events applied to it, bounded by count, bytes and
//! age, indexed by origin sequence. Resume, rewind and continuity checks are served from
//! here, in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use tern_protocol::{message_action, Message};

use crate::cursor::{Cursor, OriginId};
use crate::event::ChannelEvent;
use crate::mutation::{is_change, latest};

/// Bounds of one channel's log.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    pub events_max: usize,
    pub bytes_max: usize,
    /// Events older than this are dropped even when the log has room (nobody can resume
    /// from further back than `connectionStateTtl`).
    pub age_max_ms: i64,
}

/// What to replay on attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rewind {
    /// The last N messages.
    Count(usize),
    /// Messages published at or after this time (ms since epoch).
    Since(i64),
}

#[derive(Debug, Default)]
pub(crate) struct ChannelLog {
    events: VecDeque<Arc<ChannelEvent>>,
    bytes: usize,
    /// Highest sequence evicted per origin: a cursor below it cannot be continued.
    evicted_through: BTreeMap<OriginId, u64>,
}

impl ChannelLog {
    pub(crate) fn push(&mut self, event: Arc<ChannelEvent>, limits: &LogLimits, now_ms: i64) {
        self.bytes += event.size_bytes;
        self.events.push_back(event);
        while let Some(front) = self.events.front() {
            let too_many = self.events.len() > limits.events_max;
            let too_big = self.bytes > limits.bytes_max;
            let too_old = now_ms - front.timestamp_ms() > limits.age_max_ms;
            if !(too_many || too_big || too_old) {
                break;
            }
            let front = self.events.pop_front().expect("front exists");
            self.bytes -= front.size_bytes;
            let through = self.evicted_through.entry(front.origin).or_insert(0);
            *through = (*through).max(front.seq);
        }
    }

    /// Events after `from`, in log order, if the log still holds all of them and `from`
    /// is consistent with `current`; `None` when continuity cannot be proven. `from` may
    /// be ahead of `current` on other origins (a client that fails over from a node
    /// that was ahead of this one; those events arrive later), never on `own`: this node
    /// numbers its own events.
    pub(crate) fn since(
        &self,
        from: &Cursor,
        current: &Cursor,
        own: OriginId,
    ) -> Option<Vec<Arc<ChannelEvent>>> {
        if from.get(own) > current.get(own) {
            // The client claims events of ours this channel never had (a cursor from
            // a lost channel state, or a forged one).
            return None;
        }
        for (origin, seq) in current.origins() {
            let seen = from.get(origin);
            if seen < seq && seen < self.evicted_through.get(&origin).copied().unwrap_or(0) {
                return None;
            }
        }
        Some(
            self.events
                .iter()
                .filter(|e| e.seq > from.get(e.origin))
                .cloned()
                .collect(),
        )
    }

    /// MESSAGE events for a rewind, oldest first. A count rewind counts messages, so the
    /// oldest returned event may be cut down to its last messages. Once messages of the
    /// log have been changed (updated, deleted, appended to, summarized), a rewind
    /// replays messages, each in its latest version ([`ChannelLog::rewind_latest`]).
    pub(crate) fn rewind(&self, rewind: &Rewind, channel_serial: &str) -> Vec<Arc<ChannelEvent>> {
        if self.messages().any(|(_, m)| is_change(m.action)) {
            return self.rewind_latest(rewind, channel_serial);
        }
        let messages = self.events.iter().filter(|e| e.is_message());
        match *rewind {
            Rewind::Since(since_ms) => messages
                .filter(|e| e.timestamp_ms() >= since_ms)
                .cloned()
                .collect(),
            Rewind::Count(count) => {
                let mut picked = Vec::new();
                let mut remaining = count;
                for event in messages.rev() {
                    if remaining == 0 {
                        break;
                    }
                    let n = event.message_count();
                    if n <= remaining {
                        picked.push(event.clone());
                        remaining -= n;
                    } else {
                        picked.push(Arc::new(event.last_messages(remaining)));
                        remaining = 0;
                    }
                }
                picked.reverse();
                picked
            }
        }
    }

    /// Every message of the log with the event that carried it, in log order.
    pub(crate) fn messages(&self) -> impl Iterator<Item = (&Arc<ChannelEvent>, &Message)> {
        self.events
            .iter()
            .filter(|e| e.is_message())
            .flat_map(|e| e.frame.messages.iter().flatten().map(move |m| (e, m)))
    }

    /// The message with `serial` as first published, if the log still holds it, and
    /// the changes to it the log holds (in log order).
    pub(crate) fn message(&self, serial: &str) -> (Option<Message>, Vec<Message>) {
        let mut original = None;
        let mut changes = Vec::new();
        for (_, message) in self.messages() {
            if message.serial.as_deref() != Some(serial) {
                continue;
            }
            if is_change(message.action) {
                changes.push(message.clone());
            } else {
                original = Some(message.clone());
            }
        }
        (original, changes)
    }

    /// A rewind of messages in their latest versions: each message in the place it was
    /// first published, folded with the changes the log holds (a change whose message
    /// has left the log stands for it, except a bare summary). Each is its own event
    /// with the channel's current `channel_serial`, since it reflects everything up to now.
    fn rewind_latest(&self, rewind: &Rewind, channel_serial: &str) -> Vec<Arc<ChannelEvent>> {
        let mut entries: Vec<(&Arc<ChannelEvent>, Message, Vec<Message>)> = Vec::new();
        let mut by_serial: HashMap<&str, usize> = HashMap::new();
        for (event, message) in self.messages() {
            let serial = message.serial.as_deref().unwrap_or_default();
            match by_serial.get(serial) {
                Some(&at) if is_change(message.action) => entries[at].2.push(message.clone()),
                _ if message.action == Some(message_action::SUMMARY) => {}
                _ => {
                    by_serial.insert(serial, entries.len());
                    entries.push((event, message.clone(), Vec::new()));
                }
            }
        }
        let keep = match *rewind {
            Rewind::Count(count) => entries.len().saturating_sub(count),
            Rewind::Since(since_ms) => entries
                .iter()
                .position(|(event, _, _)| event.timestamp_ms() >= since_ms)
                .unwrap_or(entries.len()),
        };
        entries
            .into_iter()
            .skip(keep)
            .map(|(event, original, changes)| {
                let mut frame = event.frame.clone();
                frame.messages = Some(vec![latest(original, changes)]);
                frame.channel_serial = Some(channel_serial.to_string());
                Arc::new(ChannelEvent::new(
                    event.origin,
                    event.seq,
                    event.publisher.clone(),
                    frame,
                ))
            })
            .collect()
    }

    /// Events of `origin` with sequence in `from..=to`, in order.
    pub(crate) fn events_of(&self, origin: OriginId, from: u64, to: u64) -> Vec<Arc<ChannelEvent>> {
        self.events
            .iter()
            .filter(|e| e.origin == origin && (from..=to).contains(&e.seq))
            .cloned()
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }
}
