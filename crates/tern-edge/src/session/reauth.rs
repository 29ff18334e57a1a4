//! In-band AUTH: a new token on the same connection, and holding what the connection
//! already has to the new capability.

use std::sync::Arc;

use tern_auth::Operation;
use tern_core::ChannelKey;
use tern_protocol::{code, flags, ErrorInfo, ProtocolMessage};

use super::{Ending, Session};
use crate::credentials::{authenticate, resolve_identity};
use crate::now_ms;

impl Session {
    /// In-band AUTH: a new token replaces the old one on the same connection.
    pub(super) fn reauthorize(&mut self, frame: ProtocolMessage) -> Option<Ending> {
        let Some(token) = frame.auth.and_then(|a| a.access_token) else {
            return self.fail(ErrorInfo::new(
                code::BAD_REQUEST,
                "AUTH without accessToken",
            ));
        };
        let auth = match authenticate(&self.state.keys, None, Some(&token), now_ms()) {
            Ok(auth) => auth,
            Err(err) => return self.fail(err),
        };
        let requested = self.identity_id();
        let identity = match resolve_identity(&auth, requested.as_deref()) {
            Ok(identity) if auth.app_id == self.auth.app_id && identity == self.identity => {
                identity
            }
            _ => {
                return self.fail(ErrorInfo::new(
                    code::INCOMPATIBLE_CREDENTIALS,
                    "new token is for a different app or clientId",
                ))
            }
        };
        self.auth = auth;
        self.identity = identity;
        self.renew_requested = false;
        self.outlet.send(self.connected_frame(None));
        self.recheck_capability();
        None
    }

    /// Holds what the connection already has to its (new) capability, as Ably does
    /// after in-band re-auth (RTC8a1): an attachment that loses subscribe, or every
    /// mode, fails with channel ERROR 40160, is detached and its presence members
    /// leave; any other keeps only the granted modes; and members leave every channel
    /// where presence is no longer granted. Publish is checked per frame anyway.
    pub(super) fn recheck_capability(&mut self) {
        let now = now_ms();
        let hub = &self.state.hub;
        let mut lost = Vec::new();
        for (base, attached) in &mut self.attachments {
            let key = ChannelKey::new(&self.auth.app_id, base);
            let granted = crate::connections::granted_modes(
                &self.auth.capability,
                &self.id,
                &self.live.info.predecessors,
                base,
            );
            attached.modes = if attached.requested != 0 {
                attached.requested & granted
            } else {
                granted
            };
            // `None`: the hub already let go of the attachment (a slow subscriber being
            // dropped); nothing is delivered to narrow, and the connection is ending.
            let before = hub.restrict_modes(&key, &self.id, granted);
            if before.is_some_and(|before| !attachment_survives(before, granted)) {
                lost.push((base.clone(), attached.name.clone()));
            }
        }
        for (base, name) in lost {
            let key = ChannelKey::new(&self.auth.app_id, &base);
            self.attachments.remove(&base);
            hub.detach(&key, &self.id, now);
            if self.presence_channels.remove(&base) {
                hub.leave(&key, &self.id, now);
            }
            self.channel_error(name.to_string(), capability_lost(&base));
        }
        let unpresent: Vec<Arc<str>> = self
            .presence_channels
            .iter()
            .filter(|base| !self.auth.allows(base, Operation::Presence))
            .cloned()
            .collect();
        for base in unpresent {
            self.presence_channels.remove(&base);
            hub.leave(&ChannelKey::new(&self.auth.app_id, &base), &self.id, now);
        }
        self.recheck_derived();
    }
}

/// Whether an attachment holding `before` modes goes on under a capability that
/// grants `granted`: it keeps some mode, and keeps SUBSCRIBE if it had it (a
/// subscriber that silently stopped receiving would still look attached).
fn attachment_survives(before: u64, granted: u64) -> bool {
    let kept = before & granted;
    kept != 0 && (before & flags::SUBSCRIBE == 0 || kept & flags::SUBSCRIBE != 0)
}

/// The channel ERROR for an attachment the connection's new capability no longer
/// allows: ably-js puts the channel in FAILED with this error.
pub(super) fn capability_lost(channel: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::CAPABILITY_DENIED,
        format!("channel '{channel}' is no longer permitted by the connection's capability"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After re-auth an attachment survives only if it keeps a mode, and keeps
    /// SUBSCRIBE when it had it; a publish-only attachment renewed with the same
    /// grant survives.
    #[test]
    fn attachment_survives_table() {
        use flags::{PRESENCE, PRESENCE_SUBSCRIBE, PUBLISH, SUBSCRIBE};
        let subscriber = SUBSCRIBE | PRESENCE_SUBSCRIBE;
        let all = PUBLISH | PRESENCE | subscriber;
        assert!(attachment_survives(all, all));
        assert!(attachment_survives(all, subscriber));
        assert!(attachment_survives(all, subscriber | PRESENCE));
        assert!(!attachment_survives(all, PUBLISH | PRESENCE));
        assert!(!attachment_survives(all, 0));
        assert!(!attachment_survives(subscriber, PUBLISH));
        assert!(attachment_survives(PUBLISH, PUBLISH));
        assert!(attachment_survives(PUBLISH, PUBLISH | subscriber));
        assert!(!attachment_survives(PUBLISH, subscriber));
    }
}
