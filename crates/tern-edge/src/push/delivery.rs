//! Delivering a notification. Only the `ablyChannel` transport (Ably's test
//! transport) is delivered: a message named `__ably_push__`, its data the JSON of the
//! notification, on the channel the recipient names. It is published with the
//! recipient's `ablyKey`, which must be a key of the same app allowed to publish on
//! that channel; `ablyUrl` is not followed (delivery never leaves this cluster, and a
//! push admin cannot make the server call arbitrary URLs). Other transports (FCM,
//! APNs, web push) are not delivered: their services are out of reach offline. Every
//! recipient not delivered is counted in `tern_push_undelivered_total{reason}`.

use base64::Engine;
use serde_json::Value;
use tern_auth::Operation;
use tern_core::ChannelKey;
use tern_protocol::{Data, Message};

use crate::state::EdgeState;

/// Name of the message a notification arrives as on an `ablyChannel` recipient.
pub(crate) const PUSH_MESSAGE_NAME: &str = "__ably_push__";

/// Delivers `notification` to each recipient (transport addresses); returns how many
/// were delivered.
pub(crate) fn deliver(
    state: &EdgeState,
    app: &str,
    recipients: &[Value],
    notification: &Value,
) -> usize {
    deliver_all(state, app, recipients, std::slice::from_ref(notification))
}

/// Delivers each of `notifications` to each recipient, at most
/// `push.deliveries_per_publish_max` in all (one publish could otherwise make
/// notifications × devices messages); returns how many were delivered.
fn deliver_all(
    state: &EdgeState,
    app: &str,
    recipients: &[Value],
    notifications: &[Value],
) -> usize {
    let budget = state.config.push.deliveries_per_publish_max;
    let wanted = notifications.len().saturating_mul(recipients.len());
    if wanted > budget {
        tracing::warn!(%app, wanted, budget, "push publish over its delivery bound");
        metrics::counter!("tern_push_undelivered_total", "reason" => "over_limit")
            .increment((wanted - budget) as u64);
    }
    let pairs = notifications
        .iter()
        .flat_map(|n| recipients.iter().map(move |r| (n, r)))
        .take(budget);
    let mut delivered = 0;
    let mut data: Option<(&Value, String)> = None;
    for (notification, recipient) in pairs {
        if data
            .as_ref()
            .is_none_or(|(n, _)| !std::ptr::eq(*n, notification))
        {
            data = Some((notification, notification.to_string()));
        }
        let text = data.as_ref().map_or("", |(_, text)| text.as_str());
        match deliver_one(state, app, recipient, text) {
            Ok(()) => delivered += 1,
            Err(reason) => {
                tracing::debug!(%app, reason, "push notification not delivered");
                metrics::counter!("tern_push_undelivered_total", "reason" => reason).increment(1);
            }
        }
    }
    metrics::counter!("tern_push_delivered_total").increment(delivered as u64);
    delivered
}

fn deliver_one(
    state: &EdgeState,
    app: &str,
    recipient: &Value,
    data: &str,
) -> Result<(), &'static str> {
    let field = |name: &str| recipient.get(name).and_then(Value::as_str);
    if field("transportType") != Some("ablyChannel") {
        return Err("transport_unsupported");
    }
    let channel = field("channel").ok_or("no_channel")?;
    let base = crate::channel_name::parse(channel)
        .map_err(|_| "invalid_channel")?
        .base;
    let key = field("ablyKey").ok_or("no_key")?;
    let auth = state.keys.authenticate_key(key).map_err(|_| "bad_key")?;
    if auth.app_id != app || !auth.capability.allows(base, Operation::Publish) {
        return Err("key_not_permitted");
    }
    let publisher = crate::publish::request_publisher();
    let message = Message {
        name: Some(PUSH_MESSAGE_NAME.into()),
        data: Some(Data::String(data.to_string())),
        ..Message::default()
    };
    state
        .hub
        .publish(
            &ChannelKey::new(app, base),
            &publisher,
            vec![message],
            crate::now_ms(),
        )
        .map_err(|_| "publish_failed")?;
    Ok(())
}

/// The push payloads (`extras.push`) of messages about to be published.
pub(crate) fn payloads(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .filter_map(|m| m.extras.as_ref()?.get("push").cloned())
        .filter(Value::is_object)
        .collect()
}

/// After a publish on `channel` whose messages carried `payloads`: delivers each to the
/// devices subscribed to the channel (by id or by clientId). In a cluster the push home
/// of the app in this region holds the subscriptions: a node that is not it hands the
/// payloads over (`hand_to_home`) and returns without waiting.
pub(crate) async fn on_published(
    state: &EdgeState,
    app: &str,
    channel: &str,
    payloads: Vec<Value>,
) {
    if payloads.is_empty() {
        return;
    }
    let home = state
        .cluster
        .as_ref()
        .and_then(|c| c.home_url(&super::channel_key(app)));
    if let Some(home) = home {
        hand_to_home(state, home, app, channel, payloads);
        return;
    }
    deliver_to_subscribers(state, app, channel, &payloads).await;
}

/// Delivers `payloads` to the devices subscribed to `channel`, from this node's registry.
pub(crate) async fn deliver_to_subscribers(
    state: &EdgeState,
    app: &str,
    channel: &str,
    payloads: &[Value],
) {
    let recipients: Vec<Value> = match super::load(state, app).await {
        Ok(push) => push
            .registry
            .channel_recipients(channel)
            .into_iter()
            .map(|d| d.recipient.clone())
            .collect(),
        Err(err) => {
            tracing::warn!(%app, %channel, error = %err.message, "reading push subscriptions failed");
            return;
        }
    };
    deliver_all(state, app, &recipients, payloads);
}

/// Where a node hands the push payloads of a publish to the push home.
pub(crate) const PUBLISHED_PATH: &str = "/push/tern/published";

/// Sends `payloads` to the push home's [`PUBLISHED_PATH`], authenticated as a key of
/// the app that may publish on `channel` (the publisher's credential came from such a
/// key: a token never grants more than its key). The publish is already ACKed: a
/// failure is logged and counted, as a notification an external service dropped.
fn hand_to_home(state: &EdgeState, home: String, app: &str, channel: &str, payloads: Vec<Value>) {
    let key = state
        .keys
        .keys()
        .find(|k| k.app_id == app && k.capability.allows(channel, Operation::Publish));
    let Some(key) = key else {
        metrics::counter!("tern_push_undelivered_total", "reason" => "no_key").increment(1);
        return;
    };
    let mut headers = axum::http::HeaderMap::new();
    let basic = base64::engine::general_purpose::STANDARD.encode(key.to_key_string());
    let values = [
        (axum::http::header::AUTHORIZATION, format!("Basic {basic}")),
        (
            axum::http::header::CONTENT_TYPE,
            "application/json".to_string(),
        ),
    ];
    for (name, value) in values {
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers.insert(
        crate::forward::FORWARDED,
        axum::http::HeaderValue::from_static("1"),
    );
    let body = serde_json::json!({ "channel": channel, "payloads": payloads }).to_string();
    tokio::spawn(async move {
        let outcome = crate::forward::post_to(&home, PUBLISHED_PATH, headers, body.into()).await;
        let failed = match outcome {
            Ok(status) if status.is_success() => return,
            Ok(status) => status.to_string(),
            Err(reason) => reason,
        };
        tracing::warn!(%home, reason = %failed, "handing push payloads to the push home failed");
        metrics::counter!("tern_push_undelivered_total", "reason" => "home_unreachable")
            .increment(1);
    });
}
