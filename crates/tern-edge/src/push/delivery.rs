//! Delivering a notification. Only the `ablyChannel` transport (Ably's test
//! transport) is delivered: a message named `__ably_push__`, its data the JSON of the
//! notification, on the channel the recipient names. It is published with the
//! recipient's `ablyKey`, which must be a key of the same app allowed to publish on
//! that channel; `ablyUrl` is not followed (delivery never leaves this cluster, and a
//! push admin cannot make the server call arbitrary URLs). Other transports (FCM,
//! APNs, web push) are not delivered: their services are out of reach offline. Every
//! recipient not delivered is counted in `tern_push_undelivered_total{reason}`.

use base64::Engine;
use rand::Rng;
use serde_json::Value;
use tern_auth::Operation;
use tern_core::{ChannelKey, Publisher};
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
    let data = notification.to_string();
    let mut delivered = 0;
    for recipient in recipients {
        match deliver_one(state, app, recipient, &data) {
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
    let random: [u8; 9] = rand::rng().random();
    let publisher = Publisher {
        connection_id: None,
        frame_id: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random),
    };
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
/// devices subscribed to the channel (by id or by clientId).
pub(crate) async fn on_published(
    state: &EdgeState,
    app: &str,
    channel: &str,
    payloads: Vec<Value>,
) {
    if payloads.is_empty() {
        return;
    }
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
    for payload in &payloads {
        deliver(state, app, &recipients, payload);
    }
}
