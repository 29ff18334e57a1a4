//! The push registry of one app: device registrations and channel subscriptions, as the
//! fold of a log of [`Mutation`]s. No I/O and no clock: the caller journals each
//! mutation (so it is stored and replicated like a message) and folds the log in its
//! stored order, which is the same on every node, so every node that folds the same
//! log holds the same registry.
//!
//! Every mutation is checked before it changes anything: one that is refused (a bad
//! shape, a limit) has no effect, whether it comes from a request or from the log. So a
//! log that holds a mutation refused later (two regions racing for the last free slot)
//! still folds the same everywhere.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_protocol::{code, ErrorInfo};

/// Bounds on one app's push state. Limits on counts are checked when a mutation is
/// applied; byte limits when a request is turned into a mutation ([`Device::check`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushLimits {
    /// Device registrations per app (a new one beyond it is refused with 40000).
    pub devices_max: usize,
    /// Channel subscriptions per app (a new one beyond it is refused with 40000).
    pub subscriptions_max: usize,
    /// Longest device id, clientId or channel name, in bytes.
    pub name_bytes_max: usize,
    /// Largest `push.recipient` object, JSON-encoded, in bytes.
    pub recipient_bytes_max: usize,
    /// Largest `metadata` object, JSON-encoded, in bytes.
    pub metadata_bytes_max: usize,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            devices_max: PushLimits::DEFAULT_DEVICES_MAX,
            subscriptions_max: PushLimits::DEFAULT_SUBSCRIPTIONS_MAX,
            name_bytes_max: PushLimits::DEFAULT_NAME_BYTES_MAX,
            recipient_bytes_max: PushLimits::DEFAULT_RECIPIENT_BYTES_MAX,
            metadata_bytes_max: PushLimits::DEFAULT_METADATA_BYTES_MAX,
        }
    }
}

impl PushLimits {
    pub const DEFAULT_DEVICES_MAX: usize = 10_000;
    pub const DEFAULT_SUBSCRIPTIONS_MAX: usize = 50_000;
    pub const DEFAULT_NAME_BYTES_MAX: usize = 2_048;
    pub const DEFAULT_RECIPIENT_BYTES_MAX: usize = 4_096;
    pub const DEFAULT_METADATA_BYTES_MAX: usize = 4_096;
}

/// Platforms Ably accepts for a device.
const PLATFORMS: [&str; 3] = ["android", "ios", "browser"];
/// Form factors Ably accepts for a device.
const FORM_FACTORS: [&str; 8] = [
    "phone", "tablet", "desktop", "tv", "watch", "car", "embedded", "other",
];
/// Push transports a recipient may name. Only `ablyChannel` is delivered (offline,
/// Tern cannot reach FCM, APNs or web push services); the others are stored.
pub const TRANSPORT_TYPES: [&str; 5] = ["ablyChannel", "gcm", "fcm", "apns", "web"];

/// One registered device, as stored. `identity_token` is the secret of the
/// `deviceIdentityToken` Tern issued for it; it is never listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub platform: String,
    pub form_factor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_secret: Option<String>,
    /// `push.recipient`: where notifications go (`transportType` and its fields).
    pub recipient: Value,
    pub identity_token: String,
}

/// Whom a channel subscription is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    Device(String),
    Client(String),
}

/// One channel subscription.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subscription {
    pub channel: String,
    pub target: Target,
}

/// A filter of removals and lists: each given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// One change to an app's push state: what the log holds, versioned by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Mutation {
    /// Creates or replaces a device registration.
    PutDeviceV1 { device: Device },
    /// Removes the devices matching (`deviceId` and/or `clientId`; never `channel`) and
    /// their device subscriptions.
    RemoveDevicesV1 { filter: Filter },
    /// Adds a channel subscription (a no-op if it exists).
    SubscribeV1 { subscription: Subscription },
    /// Removes the subscriptions matching every given field.
    UnsubscribeV1 { filter: Filter },
}

/// An app's devices and subscriptions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registry {
    devices: BTreeMap<String, Device>,
    subscriptions: BTreeSet<Subscription>,
}

fn bad_request(message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code::BAD_REQUEST, message)
}

fn json_bytes(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

fn check_name(what: &str, name: &str, limits: &PushLimits) -> Result<(), ErrorInfo> {
    if name.is_empty() {
        return Err(bad_request(format!("{what} must not be empty")));
    }
    if name.len() > limits.name_bytes_max {
        return Err(bad_request(format!(
            "{what} is longer than {} bytes",
            limits.name_bytes_max
        )));
    }
    Ok(())
}

impl Device {
    /// Checks the shape Ably requires and the byte limits: 40000 with the reason.
    pub fn check(&self, limits: &PushLimits) -> Result<(), ErrorInfo> {
        check_name("device id", &self.id, limits)?;
        if let Some(client_id) = &self.client_id {
            check_name("clientId", client_id, limits)?;
        }
        if let Some(secret) = &self.device_secret {
            check_name("deviceSecret", secret, limits)?;
        }
        if !PLATFORMS.contains(&self.platform.as_str()) {
            return Err(bad_request(format!(
                "unknown platform '{}' (one of {PLATFORMS:?})",
                self.platform
            )));
        }
        if !FORM_FACTORS.contains(&self.form_factor.as_str()) {
            return Err(bad_request(format!(
                "unknown formFactor '{}' (one of {FORM_FACTORS:?})",
                self.form_factor
            )));
        }
        check_recipient(&self.recipient, limits)?;
        if let Some(metadata) = &self.metadata {
            if !metadata.is_object() {
                return Err(bad_request("metadata must be an object"));
            }
            if json_bytes(metadata) > limits.metadata_bytes_max {
                return Err(bad_request(format!(
                    "metadata is larger than {} bytes",
                    limits.metadata_bytes_max
                )));
            }
        }
        Ok(())
    }

    /// The recipient's transport type (checked to be one of [`TRANSPORT_TYPES`]).
    pub fn transport_type(&self) -> &str {
        self.recipient
            .get("transportType")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// A `push.recipient` (or a direct publish recipient): an object naming a known
/// transport, within the byte limit.
pub fn check_recipient(recipient: &Value, limits: &PushLimits) -> Result<(), ErrorInfo> {
    let transport = recipient
        .as_object()
        .ok_or_else(|| bad_request("push.recipient must be an object"))?
        .get("transportType")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("push.recipient.transportType is required"))?;
    if !TRANSPORT_TYPES.contains(&transport) {
        return Err(bad_request(format!(
            "unknown push.recipient.transportType '{transport}' (one of {TRANSPORT_TYPES:?})"
        )));
    }
    if json_bytes(recipient) > limits.recipient_bytes_max {
        return Err(bad_request(format!(
            "push.recipient is larger than {} bytes",
            limits.recipient_bytes_max
        )));
    }
    Ok(())
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.channel.is_none() && self.device_id.is_none() && self.client_id.is_none()
    }

    fn matches_device(&self, device: &Device) -> bool {
        self.device_id.as_ref().is_none_or(|id| *id == device.id)
            && self
                .client_id
                .as_ref()
                .is_none_or(|id| Some(id) == device.client_id.as_ref())
    }

    fn matches_subscription(&self, subscription: &Subscription) -> bool {
        let (device_id, client_id) = match &subscription.target {
            Target::Device(id) => (Some(id), None),
            Target::Client(id) => (None, Some(id)),
        };
        self.channel
            .as_ref()
            .is_none_or(|c| *c == subscription.channel)
            && self
                .device_id
                .as_ref()
                .is_none_or(|id| Some(id) == device_id)
            && self
                .client_id
                .as_ref()
                .is_none_or(|id| Some(id) == client_id)
    }

    /// With `concatFilters` (what ably-js sends for a channel's subscriptions): a
    /// subscription matches if it is on the channel and is for the device *or* the client
    /// given (either, when only one is given).
    fn matches_subscription_any(&self, subscription: &Subscription) -> bool {
        let on_channel = self
            .channel
            .as_ref()
            .is_none_or(|c| *c == subscription.channel);
        if self.device_id.is_none() && self.client_id.is_none() {
            return on_channel;
        }
        let for_target = match &subscription.target {
            Target::Device(id) => self.device_id.as_ref() == Some(id),
            Target::Client(id) => self.client_id.as_ref() == Some(id),
        };
        on_channel && for_target
    }
}

impl Registry {
    /// Applies `mutation` if it is allowed under `limits`; a refused one changes nothing.
    pub fn apply(&mut self, mutation: &Mutation, limits: &PushLimits) -> Result<(), ErrorInfo> {
        match mutation {
            Mutation::PutDeviceV1 { device } => self.put_device(device, limits),
            Mutation::RemoveDevicesV1 { filter } => {
                self.remove_devices(filter);
                Ok(())
            }
            Mutation::SubscribeV1 { subscription } => self.subscribe(subscription, limits),
            Mutation::UnsubscribeV1 { filter } => {
                self.subscriptions
                    .retain(|s| !filter.matches_subscription(s));
                Ok(())
            }
        }
    }

    fn put_device(&mut self, device: &Device, limits: &PushLimits) -> Result<(), ErrorInfo> {
        device.check(limits)?;
        if !self.devices.contains_key(&device.id) && self.devices.len() >= limits.devices_max {
            return Err(bad_request(format!(
                "this app has the most device registrations allowed ({})",
                limits.devices_max
            )));
        }
        self.devices.insert(device.id.clone(), device.clone());
        Ok(())
    }

    fn remove_devices(&mut self, filter: &Filter) {
        // A filter naming nothing (or only a channel) removes nothing: "remove where"
        // without a condition is never "remove all".
        if filter.device_id.is_none() && filter.client_id.is_none() {
            return;
        }
        let gone: Vec<String> = self
            .devices
            .values()
            .filter(|d| filter.matches_device(d))
            .map(|d| d.id.clone())
            .collect();
        for id in gone {
            self.devices.remove(&id);
            self.subscriptions
                .retain(|s| s.target != Target::Device(id.clone()));
        }
    }

    fn subscribe(
        &mut self,
        subscription: &Subscription,
        limits: &PushLimits,
    ) -> Result<(), ErrorInfo> {
        check_name("channel", &subscription.channel, limits)?;
        match &subscription.target {
            Target::Device(id) => {
                if !self.devices.contains_key(id) {
                    return Err(ErrorInfo::new(
                        code::NOT_FOUND,
                        format!("no device registration with id '{id}'"),
                    ));
                }
            }
            Target::Client(id) => check_name("clientId", id, limits)?,
        }
        if self.subscriptions.contains(subscription) {
            return Ok(());
        }
        if self.subscriptions.len() >= limits.subscriptions_max {
            return Err(bad_request(format!(
                "this app has the most channel subscriptions allowed ({})",
                limits.subscriptions_max
            )));
        }
        self.subscriptions.insert(subscription.clone());
        Ok(())
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.get(id)
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Devices matching `filter`, by id, after `after` (exclusive), at most `limit`.
    pub fn devices(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Vec<&Device> {
        let range = match after {
            Some(after) => self
                .devices
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.devices.range::<str, _>(..),
        };
        range
            .map(|(_, d)| d)
            .filter(|d| filter.matches_device(d))
            .take(limit)
            .collect()
    }

    /// Subscriptions matching `filter` (every field, or with `any` see
    /// `Filter::matches_subscription_any`), in order, after `after`, at most `limit`.
    pub fn subscriptions(
        &self,
        filter: &Filter,
        any: bool,
        after: Option<&Subscription>,
        limit: usize,
    ) -> Vec<&Subscription> {
        let range = match after {
            Some(after) => self
                .subscriptions
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.subscriptions.range(..),
        };
        range
            .filter(|s| {
                if any {
                    filter.matches_subscription_any(s)
                } else {
                    filter.matches_subscription(s)
                }
            })
            .take(limit)
            .collect()
    }

    /// Channels with at least one subscription, in order, after `after`, at most `limit`.
    pub fn channels(&self, after: Option<&str>, limit: usize) -> Vec<&str> {
        let mut channels: Vec<&str> = Vec::new();
        for subscription in &self.subscriptions {
            let name = subscription.channel.as_str();
            if after.is_some_and(|a| name <= a) || channels.last() == Some(&name) {
                continue;
            }
            if channels.len() == limit {
                break;
            }
            channels.push(name);
        }
        channels
    }

    /// The devices a notification published on `channel` goes to: those subscribed by
    /// id and those whose clientId is subscribed, each once.
    pub fn channel_recipients(&self, channel: &str) -> Vec<&Device> {
        let mut ids = BTreeSet::new();
        let mut clients = BTreeSet::new();
        for subscription in self.subscriptions.iter().filter(|s| s.channel == channel) {
            match &subscription.target {
                Target::Device(id) => {
                    ids.insert(id.as_str());
                }
                Target::Client(id) => {
                    clients.insert(id.as_str());
                }
            }
        }
        self.devices
            .values()
            .filter(|d| {
                ids.contains(d.id.as_str())
                    || d.client_id.as_deref().is_some_and(|c| clients.contains(c))
            })
            .collect()
    }

    /// The devices of `client_id`.
    pub fn client_devices(&self, client_id: &str) -> Vec<&Device> {
        self.devices
            .values()
            .filter(|d| d.client_id.as_deref() == Some(client_id))
            .collect()
    }
}

impl Filter {
    /// Whether this filter names nothing at all.
    pub fn names_nothing(&self) -> bool {
        self.is_empty()
    }
}
