//! Publishes that wait for a before-publish function. The call runs as a task of the
//! session (`Session::calls`); the publish waits in the session's
//! [`Pipeline`](tern_functions::hook::order::Pipeline), and so does every MESSAGE,
//! PRESENCE and ANNOTATION sent after it, so the connection's publishes are applied and
//! answered in msgSerial order. Other frames (HEARTBEAT, ATTACH, DETACH, AUTH) are not
//! held: a slow function delays only the publishes behind it. When the pipeline is
//! full the session stops reading the transport until the oldest is decided (the
//! writer goes on, so the client still gets its events and heartbeats).
//!
//! If the transport goes before a held publish is decided, the publish is dropped
//! unanswered and not applied (its call is aborted): the client re-sends it after a
//! resume, and the function is asked again.

use std::sync::Arc;

use tern_core::ChannelKey;
use tern_functions::hook::{Caller, PublishVerdict};
use tern_protocol::{code, ErrorInfo, ProtocolMessage};

use super::Session;
use crate::channel_name;
use crate::publish::Checked;
use crate::resume::Reply;

/// One publish held in the pipeline.
pub(crate) enum Held {
    /// A frame that needs no function, behind one that does: applied in its turn.
    Frame(Box<ProtocolMessage>, Option<ChannelKey>),
    /// Checked messages whose function was called: published (as the verdict says)
    /// or refused in their turn.
    Checked {
        msg_serial: Option<i64>,
        checked: Checked,
    },
    /// Refused already (rate limit, a failed check): the reply goes in its turn.
    Answered {
        msg_serial: Option<i64>,
        channel: Option<ChannelKey>,
        reply: Reply,
    },
}

impl Session {
    /// The before-publish function of the channel a MESSAGE frame names, if any.
    pub(super) fn before_publish_caller(&self, frame: &ProtocolMessage) -> Option<Arc<Caller>> {
        let hooks = self.state.hooks.as_ref()?;
        let parsed = channel_name::parse(frame.channel.as_deref()?).ok()?;
        hooks
            .before_publish(&self.auth.app_id, parsed.base)
            .cloned()
    }

    /// Checks a MESSAGE frame, calls its function and holds it until the verdict.
    pub(super) fn hold_for_function(
        &mut self,
        caller: Arc<Caller>,
        frame: ProtocolMessage,
        channel: Option<ChannelKey>,
    ) {
        let msg_serial = frame.msg_serial;
        match self.check_publish(frame) {
            Err(error) => self.reply_in_order(msg_serial, channel, Reply::Nack(error)),
            Ok(checked) => {
                let call =
                    caller.before_publish(&checked.key.name, Some(&self.id), &checked.messages);
                let held = Held::Checked {
                    msg_serial,
                    checked,
                };
                let ticket = self.pipeline.push(held, true);
                let task = self.calls.spawn(call);
                self.call_tickets.insert(task.id(), ticket);
            }
        }
    }

    /// A call ended: its verdict goes to its publish, then everything now at the front
    /// is applied.
    pub(super) fn verdict_arrived(
        &mut self,
        joined: Result<(tokio::task::Id, PublishVerdict), tokio::task::JoinError>,
    ) {
        let (task, verdict) = match joined {
            Ok(ended) => ended,
            // Only a panic in the call could get here; the publish is refused, not lost
            // in the pipeline.
            Err(error) => (
                error.id(),
                PublishVerdict::Reject(ErrorInfo::new(
                    code::INTERNAL,
                    "before-publish function call failed",
                )),
            ),
        };
        if let Some(ticket) = self.call_tickets.remove(&task) {
            self.pipeline.resolve(ticket, verdict);
        }
        self.apply_ready();
    }

    /// Applies (or refuses) every held publish now at the front, in order.
    fn apply_ready(&mut self) {
        while let Some((held, verdict)) = self.pipeline.pop() {
            match held {
                Held::Frame(frame, channel) => self.apply_frame(*frame, channel),
                Held::Answered {
                    msg_serial,
                    channel,
                    reply,
                } => self.finish_reply(msg_serial, channel, reply),
                Held::Checked {
                    msg_serial,
                    checked,
                } => {
                    let verdict = verdict.unwrap_or(PublishVerdict::Accept);
                    let store_mark = self.state.store_mark();
                    let key = checked.key.clone();
                    let result = checked
                        .verdict(verdict, &self.state)
                        .and_then(|checked| self.publish_checked(checked, msg_serial));
                    let reply = match result {
                        Ok(serials) => Reply::Ack {
                            serials,
                            store_mark,
                        },
                        Err(error) => Reply::Nack(error),
                    };
                    self.finish_reply(msg_serial, Some(key), reply);
                }
            }
        }
    }

    /// Waits until every held publish is decided and applied (each call is bounded by
    /// its function's timeout): before a CLOSE is answered.
    pub(super) async fn settle_held(&mut self) {
        while !self.pipeline.is_empty() {
            match self.calls.join_next_with_id().await {
                Some(joined) => self.verdict_arrived(joined),
                // Nothing in flight yet something held: cannot happen (the front waits
                // only on a call); never wait forever on it.
                None => break,
            }
        }
    }
}
