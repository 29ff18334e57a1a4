//! MESSAGE, ANNOTATION and PRESENCE frames: rate windows, de-duplication by msgSerial, the checks
//! before the hub (capability, mode, budget, clientId), and ACK/NACK once durable.

use std::sync::Arc;

use tern_auth::Operation;
use tern_core::{ChannelKey, Publisher};
use tern_protocol::{
    action, code, flags, presence_action, ErrorInfo, ProtocolMessage, PublishResult,
};

use super::{Ending, Session};
use crate::channel_name;
use crate::credentials::{denied, presence_client_id};
use crate::now_ms;
use crate::outlet::error_frame;
use crate::publish::{core_error, Annotated, By, Checked, Counted, Source};
use crate::resume::{Reply, Seen};
use crate::stats::{Kind, Transport};

/// Counts frames of one kind per one-second window.
pub(super) struct RateWindow {
    started_ms: i64,
    count: u32,
}

impl RateWindow {
    pub(super) fn new(now_ms: i64) -> Self {
        RateWindow {
            started_ms: now_ms,
            count: 0,
        }
    }

    /// Counts one frame; true when the window already held `max` (the frame is over).
    pub(super) fn over(&mut self, now_ms: i64, max: u32) -> bool {
        if now_ms - self.started_ms >= 1_000 {
            *self = RateWindow::new(now_ms);
        }
        self.count = self.count.saturating_add(1);
        self.count > max
    }
}

impl Session {
    /// True (and the window advanced) when the connection is over its inbound rate.
    pub(super) fn over_rate(&mut self) -> bool {
        self.rate
            .over(now_ms(), self.state.config.inbound_frames_per_second)
    }

    /// Refuses a control frame over `control_frames_per_second`: an ATTACH or DETACH
    /// gets a channel ERROR 42910 (so the client knows which), anything else is dropped
    /// unanswered. `None` when the frame may go ahead.
    pub(super) fn control_over_rate(&mut self, frame: &ProtocolMessage) -> Option<Option<Ending>> {
        let max = self.state.config.control_frames_per_second;
        if !self.control_rate.over(now_ms(), max) {
            return None;
        }
        metrics::counter!("tern_control_frames_refused_total").increment(1);
        let error = ErrorInfo::new(
            code::RATE_LIMIT,
            format!("more than {max} control frames per second on this connection"),
        );
        Some(match (&frame.channel, frame.action) {
            (Some(channel), action::ATTACH | action::DETACH) => {
                self.channel_error(channel.clone(), error)
            }
            _ => None,
        })
    }

    /// MESSAGE and PRESENCE: de-duplicate by msgSerial, rate-limit, apply, reply.
    pub(super) fn publish_or_present(&mut self, frame: ProtocolMessage) {
        let msg_serial = frame.msg_serial;
        // Whose replicas the ACK waits for.
        let channel = frame
            .channel
            .as_deref()
            .and_then(|name| channel_name::parse(name).ok())
            .map(|parsed| ChannelKey {
                app: self.auth.app_id.as_str().into(),
                name: parsed.base.into(),
            });
        if let Some(serial) = msg_serial {
            match self.replies.check(serial) {
                Seen::New => {}
                Seen::Again(reply) => return self.send_reply(msg_serial, channel, reply),
                Seen::Forgotten => {
                    // Its store mark is forgotten too: 0 ACKs it only if no write of
                    // this store was ever lost.
                    let reply = Reply::Ack {
                        serials: Vec::new(),
                        store_mark: 0,
                    };
                    return self.send_reply(msg_serial, channel, reply);
                }
            }
        }
        if self.over_rate() {
            let reply = Reply::Nack(ErrorInfo::new(
                code::RATE_LIMIT,
                "inbound message rate exceeded",
            ));
            return self.reply_in_order(msg_serial, channel, reply);
        }
        if frame.action == action::MESSAGE {
            if let Some(caller) = self.before_publish_caller(&frame) {
                return self.hold_for_function(caller, frame, channel);
            }
        }
        if !self.pipeline.is_empty() {
            // Behind a publish that waits for its function: applied in its turn.
            self.pipeline
                .push(super::hooked::Held::Frame(Box::new(frame), channel), false);
            return;
        }
        self.apply_frame(frame, channel);
    }

    /// Applies a MESSAGE, ANNOTATION or PRESENCE frame now and replies.
    pub(super) fn apply_frame(&mut self, frame: ProtocolMessage, channel: Option<ChannelKey>) {
        let msg_serial = frame.msg_serial;
        let store_mark = self.state.store_mark();
        let result = match frame.action {
            action::MESSAGE => self.publish(frame),
            action::ANNOTATION => self.annotate(frame),
            _ => self.presence(frame).map(|()| Vec::new()),
        };
        // A refused append or failed commit since `store_mark` turns this into a
        // NACK when the reply goes out (`send_reply`), so it is never ACKed.
        let reply = match result {
            Ok(serials) => Reply::Ack {
                serials,
                store_mark,
            },
            Err(err) => Reply::Nack(err),
        };
        self.finish_reply(msg_serial, channel, reply);
    }

    /// Remembers the reply of `msg_serial` (for a re-sent copy) and sends it.
    pub(super) fn finish_reply(
        &mut self,
        msg_serial: Option<i64>,
        channel: Option<ChannelKey>,
        reply: Reply,
    ) {
        if let Some(serial) = msg_serial {
            self.replies
                .record(serial, reply.clone(), self.state.config.reply_window_max);
        }
        self.send_reply(msg_serial, channel, reply);
    }

    /// A reply decided now (a refusal) that must still go after the replies of the
    /// publishes held back before it.
    pub(super) fn reply_in_order(
        &mut self,
        msg_serial: Option<i64>,
        channel: Option<ChannelKey>,
        reply: Reply,
    ) {
        if self.pipeline.is_empty() {
            self.finish_reply(msg_serial, channel, reply);
        } else {
            self.pipeline.push(
                super::hooked::Held::Answered {
                    msg_serial,
                    channel,
                    reply,
                },
                false,
            );
        }
    }

    /// Queues an ACK/NACK once everything applied before it is durable, so replies stay
    /// in msgSerial order and an ACK means "stored".
    pub(super) fn send_reply(
        &self,
        msg_serial: Option<i64>,
        channel: Option<ChannelKey>,
        reply: Reply,
    ) {
        // A NACK is sent whatever the store did; only an ACK depends on it.
        let store_mark = match &reply {
            Reply::Ack { store_mark, .. } => *store_mark,
            Reply::Nack(_) => self.state.store_mark(),
        };
        let frame = match (msg_serial, reply) {
            (None, Reply::Ack { .. }) => return,
            (None, Reply::Nack(error)) => error_frame(error),
            (Some(serial), Reply::Ack { serials, .. }) => ProtocolMessage {
                action: action::ACK,
                msg_serial: Some(serial),
                count: Some(1),
                res: Some(vec![PublishResult { serials }]),
                ..Default::default()
            },
            (Some(serial), Reply::Nack(error)) => {
                metrics::counter!("tern_nacks_total").increment(1);
                ProtocolMessage {
                    action: action::NACK,
                    msg_serial: Some(serial),
                    count: Some(1),
                    error: Some(error),
                    ..Default::default()
                }
            }
        };
        let outlet = self.outlet.clone();
        // Taken here, on the node's thread, so the callback (on the store writer or a
        // replication task) records into this node's histogram.
        let ack_seconds = metrics::histogram!("tern_publish_ack_seconds");
        let applied = std::time::Instant::now();
        self.state.after_durable(
            channel,
            store_mark,
            Box::new(move |outcome| {
                let error = match outcome.error() {
                    Some(error) if frame.action == action::ACK => error,
                    _ => {
                        if frame.action == action::ACK {
                            ack_seconds.record(applied.elapsed().as_secs_f64());
                        }
                        outlet.send(frame);
                        return;
                    }
                };
                metrics::counter!("tern_nacks_total").increment(1);
                outlet.send(ProtocolMessage {
                    action: action::NACK,
                    msg_serial: frame.msg_serial,
                    count: Some(1),
                    error: Some(error),
                    ..Default::default()
                });
            }),
        );
    }

    /// Resolves the channel of a MESSAGE/PRESENCE frame and checks `op` on it.
    pub(super) fn channel_for(
        &self,
        frame: &ProtocolMessage,
        op: Operation,
        op_name: &str,
    ) -> Result<Arc<str>, ErrorInfo> {
        let name = frame
            .channel
            .as_deref()
            .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, "frame without channel"))?;
        let parsed = channel_name::parse(name).map_err(channel_name::invalid)?;
        if parsed.filter.is_some() {
            return Err(super::derived::read_only(name));
        }
        if !self.auth.capability.allows(parsed.base, op) {
            return Err(denied(op_name, parsed.base));
        }
        // Attached without the mode this needs (ably-js `modes` / `params.modes`).
        let mode = match op {
            Operation::Publish => flags::PUBLISH,
            Operation::AnnotationPublish => flags::ANNOTATION_PUBLISH,
            _ => flags::PRESENCE,
        };
        if let Some(attached) = self.attachments.get(parsed.base) {
            if attached.modes & mode == 0 {
                return Err(ErrorInfo::new(
                    code::CHANNEL_MODE_DENIED,
                    format!(
                        "action '{op_name}' needs a channel mode not requested when attaching '{}'",
                        parsed.base
                    ),
                ));
            }
        }
        Ok(parsed.base.into())
    }

    /// This connection as the publisher of the frame `msg_serial`: the frame id makes a
    /// re-sent frame the same publish.
    fn publisher(&self, msg_serial: Option<i64>) -> Publisher {
        Publisher {
            connection_id: Some(self.id.clone()),
            frame_id: format!("{}:{}", self.id, msg_serial.unwrap_or(0)),
        }
    }

    /// This connection's credentials, for the publish path.
    fn by(&self) -> By<'_> {
        By::new(&self.state, &self.auth, &self.identity)
    }

    pub(super) fn publish(
        &mut self,
        frame: ProtocolMessage,
    ) -> Result<Vec<Option<String>>, ErrorInfo> {
        let msg_serial = frame.msg_serial;
        let checked = self.check_publish(frame)?;
        self.publish_checked(checked, msg_serial)
    }

    /// The checks of a MESSAGE frame before anything else sees it (a before-publish
    /// function included): capability and mode, then the publish path's checks (the
    /// size budget, clientIds).
    pub(super) fn check_publish(&self, frame: ProtocolMessage) -> Result<Checked, ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Publish, "publish")?;
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base,
        };
        let messages = frame.messages.unwrap_or_default();
        Checked::new(&self.state, key, messages)?.stamp(&self.identity, Source::Connection)
    }

    /// Publishes checked messages through the publish path, and sends their push
    /// notifications.
    pub(super) fn publish_checked(
        &mut self,
        checked: Checked,
        msg_serial: Option<i64>,
    ) -> Result<Vec<Option<String>>, ErrorInfo> {
        let counted = Counted::In(self.stats.as_deref());
        let publisher = self.publisher(msg_serial);
        let applied = checked.apply(&self.by(), publisher, Transport::Realtime, counted)?;
        if !applied.pushes.is_empty() {
            let state = self.state.clone();
            let app = self.auth.app_id.clone();
            let (key, pushes) = (applied.key, applied.pushes);
            tokio::spawn(async move {
                crate::push::delivery::on_published(&state, &app, &key.name, pushes).await;
            });
        }
        Ok(applied.serials)
    }

    /// ANNOTATION: checks the annotations, applies them, and has the summaries of their
    /// messages follow once they are durable.
    pub(super) fn annotate(
        &mut self,
        frame: ProtocolMessage,
    ) -> Result<Vec<Option<String>>, ErrorInfo> {
        let base = self.channel_for(&frame, Operation::AnnotationPublish, "annotation-publish")?;
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base,
        };
        let publisher = self.publisher(frame.msg_serial);
        let annotations = frame.annotations.unwrap_or_default();
        let Annotated {
            serials, targets, ..
        } = crate::publish::annotate(&self.by(), &key, annotations, &publisher)?;
        crate::messages::summarize_later(self.state.clone(), key, targets);
        Ok(serials.into_iter().map(Some).collect())
    }

    pub(super) fn presence(&mut self, frame: ProtocolMessage) -> Result<(), ErrorInfo> {
        let base = self.channel_for(&frame, Operation::Presence, "presence")?;
        let now = now_ms();
        let msg_serial = frame.msg_serial.unwrap_or(0);
        let supplied = frame.presence.unwrap_or_default();
        let size = crate::budget::check_presence(&supplied, &self.state.config)?;
        let mut changes = Vec::with_capacity(supplied.len());
        for (index, mut change) in supplied.into_iter().enumerate() {
            if !matches!(
                change.action,
                presence_action::ENTER | presence_action::UPDATE | presence_action::LEAVE
            ) {
                return Err(ErrorInfo::new(
                    code::BAD_REQUEST,
                    format!("invalid presence action {}", change.action),
                ));
            }
            change.client_id = Some(presence_client_id(
                &self.identity,
                change.client_id.as_deref(),
            )?);
            change.id = Some(
                change
                    .id
                    .unwrap_or_else(|| format!("{}:{msg_serial}:{index}", self.id)),
            );
            change.connection_id = Some(self.id.to_string());
            change.timestamp = Some(now);
            changes.push(change);
        }
        let publisher = self.publisher(Some(msg_serial));
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base.clone(),
        };
        let count = changes.len();
        self.state
            .hub
            .presence(&key, &publisher, changes, now)
            .map_err(core_error)?;
        if let Some(stats) = &self.stats {
            stats.received(Transport::Realtime, Kind::Presence, count, size);
        }
        self.presence_channels.insert(base);
        Ok(())
    }
}
