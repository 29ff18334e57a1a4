//! ATTACH, DETACH and client SYNC: what a connection is attached to, with which modes
//! and params, and the presence sync that follows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tern_core::{AttachOptions, ChannelKey, Cursor};
use tern_protocol::{action, code, flags, ErrorInfo, PresenceMessage, ProtocolMessage};

use super::{Ending, Session};
use crate::channel_name;
use crate::credentials::{denied, parse_modes};
use crate::now_ms;
use crate::outlet::{Alias, AttachmentSink, Outbound, Outlet};
use crate::publish::core_error;

/// One attached channel, as the connection attached it.
pub(super) struct Attached {
    /// The name as the client sent it (with any qualifier); replies use it.
    pub(super) name: Arc<str>,
    /// The modes granted: what was asked (or everything, when nothing was) within the
    /// capability, recomputed on re-auth. Publishing or entering presence needs PUBLISH
    /// or PRESENCE among them (40165 otherwise).
    pub(super) modes: u64,
    /// The modes the ATTACH asked for (0: none named, so the attachment follows the
    /// capability, widening when a re-auth grants more).
    pub(super) requested: u64,
}

/// Longest an ATTACH waits for the channel's state from another node (the cluster gives
/// up a little sooner and the attach goes ahead with what this node has).
pub(super) const WARM_WAIT: Duration = Duration::from_secs(4);

impl Session {
    /// ATTACH; on a channel this node does not receive yet, first waits (in `run`) for
    /// its state from the cluster.
    pub(super) fn attach(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        self.attach_with(frame, true)
    }

    /// ATTACH once the channel's state is here (or waiting for it gave up).
    pub(super) fn attach_now(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        self.attach_with(frame, false)
    }

    pub(super) fn attach_with(&mut self, frame: ProtocolMessage, may_wait: bool) -> Option<Ending> {
        // Kept only when the attach may have to wait for the cluster.
        let original = (may_wait && self.state.cluster.is_some()).then(|| frame.clone());
        let Some(name) = frame.channel else {
            return self.fail(ErrorInfo::new(code::BAD_REQUEST, "ATTACH without channel"));
        };
        let parsed = match channel_name::parse_attachable(&name) {
            Ok(parsed) => parsed,
            Err(reason) => return self.channel_error(name.clone(), channel_name::invalid(reason)),
        };
        if parsed.filter.is_some() {
            return self.attach_derived(frame.channel_serial.as_deref(), name.clone(), parsed);
        }
        let base: Arc<str> = parsed.base.into();
        let mut params = parsed.params;
        params.extend(frame.params.clone().unwrap_or_default());
        let requested = match params.get("modes").map(|names| parse_modes(names)) {
            Some(Some(modes)) => modes,
            Some(None) => {
                return self.channel_error(
                    name,
                    ErrorInfo::new(code::INVALID_PARAMETER_VALUE, "unknown channel mode"),
                )
            }
            None => frame.flags.unwrap_or(0) & flags::MODES_MASK,
        };
        let granted = crate::connections::granted_modes(
            &self.auth.capability,
            &self.id,
            &self.live.info.predecessors,
            &base,
        );
        let modes = if requested != 0 {
            granted & requested
        } else {
            // Annotations go only to attachments that asked for them.
            granted & !flags::ANNOTATION_SUBSCRIBE
        };
        if modes == 0 {
            return self.channel_error(name, denied("attach", &base));
        }
        let was_attached = self.attachments.contains_key(&base);
        if !was_attached && self.attachments.len() >= self.state.config.channels_per_connection_max
        {
            return self.channel_error(
                name,
                ErrorInfo::new(
                    code::CHANNEL_OPERATION_FAILED,
                    "too many channels attached on this connection",
                ),
            );
        }
        // A channelSerial means "continue from here"; it wins over rewind. After a failed
        // connection resume it is not honoured: continuity is already lost.
        let resume_from = frame
            .channel_serial
            .as_deref()
            .filter(|_| !self.continuity_lost)
            .map(Cursor::decode);
        // ATTACH_RESUME: the client was attached before (on this connection or the one it
        // resumed) and has seen the rewound messages already (RTL4j).
        let reattach = frame.flags.unwrap_or(0) & flags::ATTACH_RESUME != 0;
        let rewind = match params.get("rewind") {
            Some(value) if resume_from.is_none() && !reattach => {
                match channel_name::parse_rewind(value, now_ms()) {
                    Ok(rewind) => Some(rewind),
                    Err(reason) => {
                        return self.channel_error(
                            name,
                            ErrorInfo::new(code::INVALID_PARAMETER_VALUE, reason),
                        )
                    }
                }
            }
            _ => None,
        };
        // `delta=vcdiff`: messages after the first go out as deltas against the one before
        // (tern_core::delta). The params this server understands are echoed (ably-js
        // exposes them as `channel.params`); others are dropped, as Ably does.
        let delta = params.get("delta").is_some_and(|format| format == "vcdiff");
        let echoed: BTreeMap<String, String> = params
            .into_iter()
            .filter(|(k, _)| matches!(k.as_str(), "rewind" | "delta" | "modes"))
            .collect();
        let unreadable_serial = matches!(resume_from, Some(None));
        let options = AttachOptions {
            modes,
            echo: self.echo,
            resume_from: resume_from.flatten(),
            rewind,
            delta,
        };
        let alias: Option<Alias> = (name != *base).then(|| Arc::new(name.clone()));
        let sink = Arc::new(AttachmentSink {
            outlet: self.outlet.clone(),
            alias: alias.clone(),
        });
        let key = ChannelKey {
            app: self.auth.app_id.as_str().into(),
            name: base.clone(),
        };
        if let (Some(original), Some(cluster)) = (original, &self.state.cluster) {
            if let Some(ready) = cluster.warm(&key) {
                self.warming = Some(Box::new((ready, original)));
                return None;
            }
        }
        self.sync_counter += 1;
        let sync_id = format!("{}-{}", self.id, self.sync_counter);
        let page_size = self.state.config.sync_page_size.max(1);
        let outlet = self.outlet.clone();
        let reply_name = name.clone();
        let result = self.state.hub.attach(&key, self.id.clone(), options, sink, |snapshot| {
            let mut reply_flags = modes;
            if !snapshot.members.is_empty() {
                reply_flags |= flags::HAS_PRESENCE;
            }
            if snapshot.resumed {
                reply_flags |= flags::RESUMED;
            }
            if !snapshot.backlog.is_empty() {
                reply_flags |= flags::HAS_BACKLOG;
            }
            let error = (snapshot.continuity_lost || unreadable_serial).then(|| {
                ErrorInfo::new(code::MESSAGES_EXPIRED, "continuity lost: messages since the given channelSerial are no longer retained")
            });
            outlet.send(ProtocolMessage {
                action: action::ATTACHED,
                channel: Some(reply_name.clone()),
                flags: Some(reply_flags),
                channel_serial: Some(snapshot.channel_serial.clone()),
                params: (!echoed.is_empty()).then_some(echoed),
                error,
                ..Default::default()
            });
            // Without members ATTACHED says so (no HAS_PRESENCE): no sync follows.
            if !snapshot.members.is_empty() {
                send_sync(&outlet, &reply_name, &sync_id, &snapshot.members, page_size);
            }
            for event in &snapshot.backlog {
                outlet.push(Outbound::Event(event.clone(), alias.clone()));
            }
        }, now_ms());
        match result {
            Ok(()) => {
                let name = name.into();
                let attached = Attached {
                    name,
                    modes,
                    requested,
                };
                self.attachments.insert(base, attached);
                None
            }
            Err(err) => self.channel_error(name, core_error(err)),
        }
    }

    /// A SYNC from the client (ably-js `channel.sync()`): a full presence sync of an
    /// attached channel, as on ATTACH. A channel not attached here is ignored.
    pub(super) fn resync(&mut self, frame: ProtocolMessage) {
        let Some(name) = frame.channel else {
            return;
        };
        let Ok(parsed) = channel_name::parse_attachable(&name) else {
            return;
        };
        if parsed.filter.is_some() {
            return;
        }
        let Some(attached) = self.attachments.get(parsed.base) else {
            return;
        };
        if attached.modes & flags::PRESENCE_SUBSCRIBE == 0 {
            return;
        }
        let key = ChannelKey::new(&self.auth.app_id, parsed.base);
        let members = self.state.hub.members(&key);
        self.sync_counter += 1;
        let sync_id = format!("{}-{}", self.id, self.sync_counter);
        let page_size = self.state.config.sync_page_size.max(1);
        send_sync(&self.outlet, &name, &sync_id, &members, page_size);
    }

    pub(super) fn detach(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        let Some(name) = frame.channel else {
            return self.fail(ErrorInfo::new(code::BAD_REQUEST, "DETACH without channel"));
        };
        if let Ok(parsed) = channel_name::parse_attachable(&name) {
            if parsed.filter.is_some() {
                self.detach_derived(&parsed);
            } else if self.attachments.remove(parsed.base).is_some() {
                let key = ChannelKey::new(&self.auth.app_id, parsed.base);
                self.state.hub.detach(&key, &self.id, now_ms());
            }
        }
        self.outlet.send(ProtocolMessage {
            action: action::DETACHED,
            channel: Some(name),
            ..Default::default()
        });
        None
    }
}

/// Queues a presence sync of `members` as SYNC frames of at most `page_size` members,
/// the cursor after `sync_id:` empty on the last page (which ends the client's sync).
/// No members: one empty page, so the client's sync still completes.
fn send_sync(
    outlet: &Outlet,
    channel: &str,
    sync_id: &str,
    members: &[PresenceMessage],
    page_size: usize,
) {
    let pages: Vec<&[PresenceMessage]> = if members.is_empty() {
        vec![&[]]
    } else {
        members.chunks(page_size).collect()
    };
    for (index, page) in pages.iter().enumerate() {
        let cursor = if index + 1 == pages.len() {
            String::new()
        } else {
            (index + 1).to_string()
        };
        outlet.send(ProtocolMessage {
            action: action::SYNC,
            channel: Some(channel.to_string()),
            channel_serial: Some(format!("{sync_id}:{cursor}")),
            presence: Some(page.to_vec()),
            ..Default::default()
        });
    }
}
