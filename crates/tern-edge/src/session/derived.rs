//! Derived channels: attaching `[filter=<base64>]name` receives the messages of `name`
//! that the filter selects (`crate::filter`), and nothing else: no presence, and
//! publishing or entering presence on it is refused.
//!
//! A derived attachment is the connection's second attachment to the hub channel
//! `name` (beside a plain one, if any), under its own id in the hub: the connection id
//! followed by the filter qualifier, so the two come and go independently. Its
//! subscriber ([`FilterSink`]) applies the connection's `echo` itself, since the hub
//! knows the attachment by that other id.

use std::sync::Arc;

use tern_core::{AttachOptions, ChannelEvent, ChannelKey, Cursor, Subscriber};
use tern_protocol::{action, code, flags, ErrorInfo, Message, ProtocolMessage};

use super::{Ending, Session};
use crate::channel_name::{self, ChannelName};
use crate::credentials::{denied, granted_modes};
use crate::filter::{self, Filter};
use crate::now_ms;
use crate::outlet::{AttachmentSink, Outlet};
use crate::publish::core_error;

/// One derived attachment of a connection.
pub(super) struct Derived {
    /// The name as the client attached it; errors use it.
    pub(super) name: Arc<str>,
    pub(super) key: ChannelKey,
    /// The id the hub knows the attachment by.
    pub(super) member: Arc<str>,
}

/// The refusal of a publish or presence change on a derived channel.
pub(crate) fn read_only(name: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::BAD_REQUEST,
        format!(
            "'{name}' is a derived (filtered) channel, which is read-only: publish on its channel"
        ),
    )
}

impl Session {
    /// ATTACH of a derived channel (`parsed.filter` is set), resuming from
    /// `channel_serial` if given.
    pub(super) fn attach_derived(
        &mut self,
        channel_serial: Option<&str>,
        name: String,
        parsed: ChannelName<'_>,
    ) -> Option<Ending> {
        let encoded = parsed.filter.unwrap_or_default();
        let filter = match filter::decode(encoded) {
            Ok(filter) => filter,
            Err(reason) => return self.channel_error(name, channel_name::invalid(&reason)),
        };
        if granted_modes(&self.auth.capability, parsed.base) & flags::SUBSCRIBE == 0 {
            return self.channel_error(name, denied("subscribe", parsed.base));
        }
        let derived_key: Arc<str> = parsed.derived_key().unwrap_or_default().into();
        let attached = self.attachments.len() + self.derived.len();
        if !self.derived.contains_key(&derived_key)
            && attached >= self.state.config.channels_per_connection_max
        {
            return self.channel_error(
                name,
                ErrorInfo::new(
                    code::CHANNEL_OPERATION_FAILED,
                    "too many channels attached on this connection",
                ),
            );
        }
        let key = ChannelKey::new(&self.auth.app_id, parsed.base);
        let member: Arc<str> = format!(
            "{}{}",
            self.id,
            &derived_key[..derived_key.len() - parsed.base.len()]
        )
        .into();
        let sink = Arc::new(FilterSink {
            filter,
            inner: AttachmentSink {
                outlet: self.outlet.clone(),
                alias: Some(Arc::new(name.clone())),
            },
            connection_id: self.id.clone(),
            echo: self.echo,
        });
        let options = AttachOptions {
            modes: flags::SUBSCRIBE,
            echo: true,
            resume_from: channel_serial
                .filter(|_| !self.continuity_lost)
                .and_then(Cursor::decode),
            rewind: None,
            // No deltas: a filtered attachment skips messages, so the channel's previous
            // message is not the base its client holds.
            delta: false,
        };
        let (outlet, reply_sink, reply_name) = (self.outlet.clone(), sink.clone(), name.clone());
        let result = self.state.hub.attach(
            &key,
            member.clone(),
            options,
            sink,
            |snapshot| {
                reply(&outlet, &reply_name, snapshot, &reply_sink);
            },
            now_ms(),
        );
        match result {
            Ok(()) => {
                let name = name.into();
                self.derived
                    .insert(derived_key, Derived { name, key, member });
                None
            }
            Err(err) => self.channel_error(name, core_error(err)),
        }
    }

    /// DETACH of a derived channel.
    pub(super) fn detach_derived(&mut self, parsed: &ChannelName<'_>) {
        let Some(derived_key) = parsed.derived_key() else {
            return;
        };
        if let Some(derived) = self.derived.remove(derived_key.as_str()) {
            self.state
                .hub
                .detach(&derived.key, &derived.member, now_ms());
        }
    }

    /// After in-band re-auth: a derived attachment whose channel lost subscribe fails
    /// with channel ERROR 40160 and is detached, as a plain one would be.
    pub(super) fn recheck_derived(&mut self) {
        let now = now_ms();
        let capability = &self.auth.capability;
        let lost: Vec<Arc<str>> = self
            .derived
            .iter()
            .filter(|(_, d)| granted_modes(capability, &d.key.name) & flags::SUBSCRIBE == 0)
            .map(|(derived_key, _)| derived_key.clone())
            .collect();
        for derived_key in lost {
            if let Some(derived) = self.derived.remove(&derived_key) {
                self.state.hub.detach(&derived.key, &derived.member, now);
                let error = super::reauth::capability_lost(&derived.key.name);
                self.channel_error(derived.name.to_string(), error);
            }
        }
    }

    /// Lets go of every derived attachment (the connection is ending).
    pub(super) fn detach_all_derived(&mut self) {
        let now = now_ms();
        for (_, derived) in self.derived.drain() {
            self.state.hub.detach(&derived.key, &derived.member, now);
        }
    }
}

/// ATTACHED, then the backlog (a resumed attach) through the filter.
fn reply(outlet: &Outlet, name: &str, snapshot: &tern_core::AttachSnapshot, sink: &FilterSink) {
    let mut reply_flags = flags::SUBSCRIBE;
    if snapshot.resumed {
        reply_flags |= flags::RESUMED;
    }
    let error = snapshot.continuity_lost.then(|| {
        ErrorInfo::new(
            code::MESSAGES_EXPIRED,
            "continuity lost: messages since the given channelSerial are no longer retained",
        )
    });
    outlet.send(ProtocolMessage {
        action: action::ATTACHED,
        channel: Some(name.to_owned()),
        flags: Some(reply_flags),
        channel_serial: Some(snapshot.channel_serial.clone()),
        error,
        ..Default::default()
    });
    for event in &snapshot.backlog {
        sink.deliver(event);
    }
}

/// The subscriber of a derived attachment: passes on what the filter selects.
struct FilterSink {
    filter: Filter,
    inner: AttachmentSink,
    connection_id: Arc<str>,
    echo: bool,
}

impl FilterSink {
    /// The event as this attachment receives it: only its selected messages (`None`:
    /// nothing selected). Their ids stay theirs: the core gives every message an
    /// explicit id, so none is derived from an index that dropping messages would shift.
    fn filtered(&self, event: &Arc<ChannelEvent>) -> Option<Arc<ChannelEvent>> {
        if !self.echo && event.publisher.as_deref() == Some(&*self.connection_id) {
            return None;
        }
        let messages = event.frame.messages.as_ref()?;
        let selected: Vec<usize> = (0..messages.len())
            .filter(|&index| self.filter.selects(&messages[index]))
            .collect();
        if selected.is_empty() {
            return None;
        }
        if selected.len() == messages.len() {
            return Some(event.clone());
        }
        let kept: Vec<Message> = selected
            .into_iter()
            .map(|index| messages[index].clone())
            .collect();
        let mut frame = event.frame.clone();
        frame.messages = Some(kept);
        Some(Arc::new(ChannelEvent::new(
            event.origin,
            event.seq,
            event.publisher.clone(),
            frame,
        )))
    }
}

impl Subscriber for FilterSink {
    fn deliver(&self, event: &Arc<ChannelEvent>) -> bool {
        match self.filtered(event) {
            Some(event) => self.inner.deliver(&event),
            None => true,
        }
    }
}
