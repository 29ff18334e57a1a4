//! Where the edge meets the node's functions (`tern_functions::hook`): a publish's
//! verdict turned into messages or an error, the `$connect` call, and the
//! `connection.disconnected` event written to the webhook outbox.

use std::net::SocketAddr;

use tern_auth::{AuthContext, Capability, ClientIdentity};
use tern_functions::hook::{ConnectVerdict, Connecting, PublishVerdict};
use tern_protocol::{code, ErrorInfo, Message};

use crate::config::EdgeConfig;
use crate::state::EdgeState;

/// The client's address, as the listener saw it (a request extension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// How a realtime connection arrived, for the `$connect` function and
/// `connection.disconnected`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arrival {
    /// Ably's transport name: `web_socket` or `comet`; `sse` and `mqtt` for those
    /// listeners.
    pub(crate) transport: &'static str,
    pub(crate) peer: Option<SocketAddr>,
}

/// The messages to publish after `verdict`: as they were, changed (and then counted
/// against the publish budget again, as a client's would be), or the refusal.
pub(crate) fn apply_verdict(
    verdict: PublishVerdict,
    mut messages: Vec<Message>,
    config: &EdgeConfig,
) -> Result<(Vec<Message>, Option<usize>), ErrorInfo> {
    match verdict {
        PublishVerdict::Accept => Ok((messages, None)),
        PublishVerdict::Reject(error) => {
            metrics::counter!("tern_function_rejections_total").increment(1);
            Err(error)
        }
        PublishVerdict::Modify(changes) => {
            for (message, change) in messages.iter_mut().zip(changes) {
                change.apply(message);
            }
            let size = crate::budget::check_messages(&messages, config)?;
            Ok((messages, Some(size)))
        }
    }
}

/// Runs the app's `$connect` function, if it has one, for a new connection: refused,
/// or the identity and capability it leaves the connection with. A clientId can be
/// attached only to a connection without one (or with the wildcard); one that
/// differs from the clientId the credentials give refuses the connection (40012).
pub(crate) async fn on_connect(
    state: &EdgeState,
    connection_id: &str,
    arrival: Arrival,
    auth: &mut AuthContext,
    identity: &mut ClientIdentity,
) -> Result<bool, ErrorInfo> {
    let Some(caller) = state
        .hooks
        .as_ref()
        .and_then(|hooks| hooks.on_connect(&auth.app_id))
    else {
        return Ok(false);
    };
    let connecting = Connecting {
        connection_id: connection_id.to_string(),
        client_id: identity.id().map(str::to_owned),
        key_name: auth.key_name.clone(),
        transport: arrival.transport,
        remote_address: arrival.peer.map(|peer| peer.to_string()),
    };
    let (client_id, capability) = match caller.on_connect(&connecting).await {
        ConnectVerdict::Reject(error) => {
            metrics::counter!("tern_function_rejections_total").increment(1);
            return Err(error);
        }
        ConnectVerdict::Accept {
            client_id,
            capability,
        } => (client_id, capability),
    };
    let mut changed = false;
    if let Some(client_id) = client_id {
        match &*identity {
            ClientIdentity::Id(own) if *own != client_id => {
                return Err(ErrorInfo::new(
                    code::INVALID_CLIENT_ID,
                    format!(
                        "connect function '{}' gave clientId '{client_id}' to a connection identified as '{own}'",
                        caller.hook.config.id
                    ),
                ))
            }
            ClientIdentity::Id(_) => {}
            _ => {
                *identity = ClientIdentity::Id(client_id);
                changed = true;
            }
        }
    }
    if let Some(capability) = capability {
        let narrowed = Capability::parse(&capability).map_err(|e| {
            ErrorInfo::new(
                code::INTERNAL,
                format!(
                    "connect function '{}' gave an invalid capability: {e}",
                    caller.hook.config.id
                ),
            )
        })?;
        auth.capability = auth.capability.intersect(&narrowed);
        changed = true;
    }
    Ok(changed)
}

/// Why a connection ended, as `connection.disconnected` names it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EndReason {
    /// The client closed it (CLOSE), or it failed with a fatal error.
    Closed,
    /// Its transport went and no resume came within `connectionStateTtl`.
    Expired,
    /// The node holding it departed the cluster (reported by a survivor).
    NodeLost,
    /// Its client resumed it on another node, which continues it under a new id
    /// (`connections::handover`; the new connection went through `$connect`).
    Moved,
}

/// The `&'static` transport name of a recorded one (records carry it as text).
pub(crate) fn transport_name(text: &str) -> &'static str {
    match text {
        "comet" => "comet",
        "sse" => "sse",
        "mqtt" => "mqtt",
        _ => "web_socket",
    }
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Expired => "expired",
            EndReason::NodeLost => "node_lost",
            EndReason::Moved => "moved",
        }
    }
}

/// The ended connection, as `connection.disconnected` carries it.
pub(crate) struct Ended<'a> {
    pub(crate) app_id: &'a str,
    pub(crate) connection_id: &'a str,
    pub(crate) client_id: Option<&'a str>,
    pub(crate) transport: &'static str,
    pub(crate) connected_at_ms: i64,
    pub(crate) reason: EndReason,
}

/// Queues `connection.disconnected` for the rules that want it (a no-op without).
pub(crate) fn record_disconnect(state: &EdgeState, ended: Ended<'_>, now_ms: i64) {
    let Some(outbox) = &state.outbox else {
        return;
    };
    let item = serde_json::json!({
        "connectionId": ended.connection_id,
        "clientId": ended.client_id,
        "appId": ended.app_id,
        "transport": ended.transport,
        "reason": ended.reason.as_str(),
        "connectedAt": ended.connected_at_ms,
        "disconnectedAt": now_ms,
    });
    outbox.record_disconnect(ended.app_id, ended.connection_id, now_ms, item);
}
