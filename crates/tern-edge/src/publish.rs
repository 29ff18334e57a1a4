//! The one publish path every transport takes: WebSocket and comet (`session/publish.rs`,
//! `session/hooked.rs`), REST and batch (`rest.rs`, `batch.rs`), MQTT (through
//! `rest::apply_publish`), a connection's own channel (`connections.rs`, through
//! `rest::apply_publish_to`) and message changes (`messages.rs`, PATCH). Each resolves the
//! channel and checks its own permission (a realtime frame also checks the attach mode,
//! a change its own capability); everything after that is here, in this order:
//!
//! 1. [`Checked::new`]: the publish budget (count, ids, bytes).
//! 2. [`Checked::stamp`]: clientIds, and the connection a message is published from
//!    (a new publish; a change keeps what it names).
//! 3. [`Checked::call_function`] / [`Checked::verdict`]: the channel's before-publish
//!    function, its verdict applied (a changed message is counted against the budget
//!    again).
//! 4. [`Checked::apply`]: message changes prepared, the hub publish, the counters. It
//!    returns an [`Applied`] holding the store mark the answer must wait on.
//! 5. [`Applied::durable`] (or [`EdgeState::after_durable`] with its store mark): the
//!    answer goes only once the publish is stored (and on replicas in a cluster); a
//!    refused append or failed commit since the mark turns it into an error.
//!
//! Refusals from the core become Ably errors in one place, [`core_error`]. Also here:
//! the annotation path ([`annotate`]) and the records the server itself publishes on
//! internal channels ([`records`]).

use serde::Serialize;
use tern_auth::{AuthContext, ClientIdentity};
use tern_core::{ChannelKey, CoreError, Publisher};
use tern_functions::hook::PublishVerdict;
use tern_protocol::{code, Annotation, Data, ErrorInfo, Message};

use crate::credentials::message_client_id;
use crate::now_ms;
use crate::state::EdgeState;
use crate::stats::{AppStats, Kind, Transport};

/// Messages of one publish that passed the checks so far, on their channel.
pub(crate) struct Checked {
    pub(crate) key: ChannelKey,
    pub(crate) messages: Vec<Message>,
    /// Bytes the budget counted (recounted after a function changed the messages), for
    /// app statistics.
    pub(crate) size: usize,
}

/// Where the messages of a publish come from, for their connection ids.
pub(crate) enum Source<'a> {
    /// A realtime connection: the hub stamps its id; what the client put there goes.
    Connection,
    /// A request without a connection (REST, MQTT): a message carrying a realtime
    /// connection's key is published on behalf of that connection (TM2h).
    Request(&'a EdgeState),
}

impl Checked {
    /// Holds `messages` to the publish budget.
    pub(crate) fn new(
        state: &EdgeState,
        key: ChannelKey,
        messages: Vec<Message>,
    ) -> Result<Checked, ErrorInfo> {
        let size = crate::budget::check_messages(&messages, &state.config)?;
        Ok(Checked {
            key,
            messages,
            size,
        })
    }

    /// Gives each message the clientId `identity` allows (40012 when it names another)
    /// and the connection id of `source`.
    pub(crate) fn stamp(
        mut self,
        identity: &ClientIdentity,
        source: Source<'_>,
    ) -> Result<Checked, ErrorInfo> {
        for message in &mut self.messages {
            message.client_id = message_client_id(identity, message.client_id.as_deref())?;
            let connection_key = message.connection_key.take();
            message.connection_id = match source {
                Source::Connection => None,
                Source::Request(state) => on_behalf_of(state, connection_key)?,
            };
        }
        Ok(self)
    }

    /// Calls the channel's before-publish function, if it has one, and applies its
    /// verdict. The caller waits (bounded by the function's timeout): its answer depends
    /// on it. A realtime connection does not wait here; it holds the frame in its
    /// pipeline and applies the verdict with [`Checked::verdict`].
    pub(crate) async fn call_function(
        self,
        state: &EdgeState,
        auth: &AuthContext,
    ) -> Result<Checked, ErrorInfo> {
        let caller = state
            .hooks
            .as_ref()
            .and_then(|hooks| hooks.before_publish(&auth.app_id, &self.key.name));
        let Some(caller) = caller else {
            return Ok(self);
        };
        let verdict = caller
            .before_publish(&self.key.name, None, &self.messages)
            .await;
        self.verdict(verdict, state)
    }

    /// Applies a before-publish function's verdict: the messages as they were, changed
    /// (and counted again), or the refusal.
    pub(crate) fn verdict(
        self,
        verdict: PublishVerdict,
        state: &EdgeState,
    ) -> Result<Checked, ErrorInfo> {
        let (messages, resized) =
            crate::hooks::apply_verdict(verdict, self.messages, &state.config)?;
        Ok(Checked {
            key: self.key,
            messages,
            size: resized.unwrap_or(self.size),
        })
    }

    /// Prepares the message changes, applies the publish to the hub and counts it (in
    /// app statistics as from `transport`). Not yet durable: see [`Applied`].
    pub(crate) fn apply(
        self,
        by: &By<'_>,
        publisher: Publisher,
        transport: Transport,
        counted: Counted<'_>,
    ) -> Result<Applied, ErrorInfo> {
        let Checked {
            key,
            messages,
            size,
        } = self;
        // What the client sent asks for notifications; an update that inherits the
        // original's `extras` does not notify again.
        let pushes = crate::push::delivery::payloads(&messages);
        let messages =
            crate::messages::prepare_messages(by.state, by.auth, by.identity, &key, messages)?;
        let message_id = messages
            .first()
            .and_then(|m| m.id.as_deref())
            .map(|id| id.rsplit_once(':').map_or(id, |(base, _)| base).to_string());
        let count = messages.len();
        let store_mark = by.state.store_mark();
        let now = now_ms();
        let outcome = by
            .state
            .hub
            .publish(&key, &publisher, messages, now)
            .map_err(core_error)?;
        metrics::counter!("tern_messages_published_total").increment(count as u64);
        let looked_up;
        let stats = match counted {
            Counted::In(stats) => stats,
            Counted::InApp => {
                looked_up = by.state.stats.app(&by.auth.app_id, now);
                looked_up.as_deref()
            }
        };
        if let Some(stats) = stats {
            stats.received(transport, Kind::Messages, count, size);
        }
        Ok(Applied {
            key,
            serials: outcome.serials,
            message_id: message_id.unwrap_or(publisher.frame_id),
            store_mark,
            pushes,
        })
    }
}

/// Which app statistics count a publish.
pub(crate) enum Counted<'a> {
    /// These (a connection's, taken when it opened; `None` past `stats.apps_max`).
    In(Option<&'a AppStats>),
    /// The caller's app's, looked up once the publish is applied (a refused publish
    /// makes no entry).
    InApp,
}

/// Who publishes: the caller's credentials, as every step checks them.
pub(crate) struct By<'a> {
    pub(crate) state: &'a EdgeState,
    pub(crate) auth: &'a AuthContext,
    pub(crate) identity: &'a ClientIdentity,
}

impl<'a> By<'a> {
    pub(crate) fn new(
        state: &'a EdgeState,
        auth: &'a AuthContext,
        identity: &'a ClientIdentity,
    ) -> By<'a> {
        By {
            state,
            auth,
            identity,
        }
    }
}

/// A publish applied to the hub, not yet known to be durable.
pub(crate) struct Applied {
    pub(crate) key: ChannelKey,
    /// Each message's serial (for a change, its version serial).
    pub(crate) serials: Vec<Option<String>>,
    /// The first message's id without its index, or the publish's frame id: what a
    /// REST publish answers as `messageId`.
    pub(crate) message_id: String,
    /// [`EdgeState::store_mark`] taken before the publish was applied: hand it to
    /// [`EdgeState::after_durable`] / [`EdgeState::durable`] before answering.
    pub(crate) store_mark: u64,
    /// Push notifications its messages carry (`extras.push`), to deliver once durable.
    pub(crate) pushes: Vec<serde_json::Value>,
}

impl Applied {
    /// Waits until the publish is durable (stored, and on replicas in a cluster): the
    /// error the caller answers instead of success when it is not.
    pub(crate) async fn durable(&self, state: &EdgeState) -> Result<(), ErrorInfo> {
        match state
            .durable(self.key.clone(), self.store_mark)
            .await
            .error()
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Annotations applied to the hub, not yet known to be durable.
pub(crate) struct Annotated {
    /// Each annotation's serial.
    pub(crate) serials: Vec<String>,
    /// The serials of the messages they annotate, whose summaries follow.
    pub(crate) targets: Vec<String>,
    /// [`EdgeState::store_mark`] taken before they were applied.
    pub(crate) store_mark: u64,
}

/// The annotation path of every transport, after its channel and permission checks:
/// the publish budget, the annotations prepared (`messages::prepare_annotations`), the
/// hub. The caller has their messages' summaries follow
/// (`messages::summarize_later`).
pub(crate) fn annotate(
    by: &By<'_>,
    key: &ChannelKey,
    annotations: Vec<Annotation>,
    publisher: &Publisher,
) -> Result<Annotated, ErrorInfo> {
    crate::budget::check_annotations(&annotations, &by.state.config)?;
    let annotations =
        crate::messages::prepare_annotations(by.state, by.auth, by.identity, key, annotations)?;
    let targets = annotations
        .iter()
        .filter_map(|a| a.message_serial.clone())
        .collect();
    let store_mark = by.state.store_mark();
    let (serials, _) = by
        .state
        .hub
        .annotate(key, publisher, annotations, now_ms())
        .map_err(core_error)?;
    Ok(Annotated {
        serials,
        targets,
        store_mark,
    })
}

/// The publisher of a request without a connection: a fresh frame id, which is also
/// the `messageId` of messages published without ids.
pub(crate) fn request_publisher() -> Publisher {
    Publisher {
        connection_id: None,
        frame_id: crate::messages::random_id(),
    }
}

/// Server-written records (connection records, revocations) as one publish on an
/// internal channel: each record a message named `name` whose data is the record as
/// JSON, and a publisher whose frame id is `tag`, the time and a random part (unique
/// across nodes without coordination).
pub(crate) fn records<T: Serialize>(
    tag: &str,
    name: &str,
    records: &[T],
    now_ms: i64,
) -> (Publisher, Vec<Message>) {
    let messages = records
        .iter()
        .map(|record| Message {
            name: Some(name.into()),
            data: Some(Data::String(
                serde_json::to_string(record).unwrap_or_default(),
            )),
            ..Default::default()
        })
        .collect();
    let publisher = Publisher {
        connection_id: None,
        frame_id: format!("{tag}-{now_ms}-{}", rand::random::<u64>()),
    };
    (publisher, messages)
}

/// A REST message carrying a realtime connection's key is published on behalf of that
/// connection (TM2h): it carries the connection's id. A key that names no connection
/// of this node is refused (40006).
fn on_behalf_of(state: &EdgeState, key: Option<String>) -> Result<Option<String>, ErrorInfo> {
    let Some(key) = key else {
        return Ok(None);
    };
    match state.registry().connection_id(&key) {
        Some(id) => Ok(Some(id.to_string())),
        None => Err(ErrorInfo::new(
            code::INVALID_PUBLISH_CONNECTION_KEY,
            "connectionKey names no connection of this node",
        )),
    }
}

/// The Ably error for a refusal from the core, whichever transport asked: a channel
/// limit is 90000, a full presence set 91003, a presence change without a clientId
/// 91000. The message is the core's own.
pub(crate) fn core_error(err: CoreError) -> ErrorInfo {
    use tern_core::presence::PresenceError;
    let code = match &err {
        CoreError::TooManyChannels(_) | CoreError::TooManyAppChannels(_) => {
            code::CHANNEL_OPERATION_FAILED
        }
        CoreError::Presence(PresenceError::TooManyMembers(_)) => code::TOO_MANY_PRESENCE_MEMBERS,
        CoreError::Presence(PresenceError::NoClientId) => code::PRESENCE_NO_CLIENT_ID,
    };
    ErrorInfo::new(code, err.to_string())
}

#[cfg(test)]
mod tests {
    use tern_core::presence::PresenceError;

    use super::*;

    fn check(err: CoreError, code: u32, status_code: u16, message: &str) {
        let info = core_error(err);
        assert_eq!(
            (info.code, info.status_code, info.message.as_str()),
            (code, status_code, message)
        );
        assert_eq!(
            info.href.as_deref(),
            Some(format!("https://help.ably.io/error/{code}").as_str())
        );
    }

    /// Server-written records become one message each, named, with the record as JSON
    /// data, under a publisher whose frame id names the tag and differs each time.
    #[test]
    fn records_are_named_json_messages() {
        let (first, messages) = records("revoke", "r", &[1, 2], 5);
        let data: Vec<_> = messages
            .iter()
            .map(|m| (m.name.as_deref(), m.data.clone()))
            .collect();
        assert_eq!(
            data,
            [
                (Some("r"), Some(Data::String("1".into()))),
                (Some("r"), Some(Data::String("2".into())))
            ]
        );
        assert!(first.frame_id.starts_with("revoke-5-"));
        assert_eq!(first.connection_id, None);
        let (second, _) = records("revoke", "r", &[1], 5);
        assert_ne!(first.frame_id, second.frame_id);
    }

    /// Every refusal of the core maps to its Ably code, status and the core's message
    /// (the variants are matched exhaustively, so a new one fails to compile until it is
    /// mapped here).
    #[test]
    fn every_core_error_has_its_ably_code() {
        check(
            CoreError::TooManyChannels(7),
            code::CHANNEL_OPERATION_FAILED,
            400,
            "channel limit reached (7 channels)",
        );
        check(
            CoreError::TooManyAppChannels(3),
            code::CHANNEL_OPERATION_FAILED,
            400,
            "channel limit of this app reached (3 channels)",
        );
        check(
            CoreError::Presence(PresenceError::TooManyMembers(2)),
            code::TOO_MANY_PRESENCE_MEMBERS,
            400,
            "too many presence members (max 2)",
        );
        check(
            CoreError::Presence(PresenceError::NoClientId),
            code::PRESENCE_NO_CLIENT_ID,
            400,
            "presence message has no clientId",
        );
    }
}
