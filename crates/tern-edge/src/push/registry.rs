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
    /// Notifications one publish may deliver (its push payloads × the devices they go
    /// to); the rest are not delivered, and counted.
    pub deliveries_per_publish_max: usize,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            devices_max: PushLimits::DEFAULT_DEVICES_MAX,
            subscriptions_max: PushLimits::DEFAULT_SUBSCRIPTIONS_MAX,
            name_bytes_max: PushLimits::DEFAULT_NAME_BYTES_MAX,
            recipient_bytes_max: PushLimits::DEFAULT_RECIPIENT_BYTES_MAX,
            metadata_bytes_max: PushLimits::DEFAULT_METADATA_BYTES_MAX,
            deliveries_per_publish_max: PushLimits::DEFAULT_DELIVERIES_PER_PUBLISH_MAX,
        }
    }
}

impl PushLimits {
    pub const DEFAULT_DEVICES_MAX: usize = 10_000;
    pub const DEFAULT_SUBSCRIPTIONS_MAX: usize = 50_000;
    pub const DEFAULT_NAME_BYTES_MAX: usize = 2_048;
    pub const DEFAULT_RECIPIENT_BYTES_MAX: usize = 4_096;
    pub const DEFAULT_METADATA_BYTES_MAX: usize = 4_096;
    pub const DEFAULT_DELIVERIES_PER_PUBLISH_MAX: usize = 10_000;
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
    /// Whether this filter names nothing at all.
    pub fn names_nothing(&self) -> bool {
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
    /// Whether `mutation` is allowed on this registry under `limits`: what
    /// [`Self::apply`] would refuse, without changing anything.
    pub fn check(&self, mutation: &Mutation, limits: &PushLimits) -> Result<(), ErrorInfo> {
        match mutation {
            Mutation::PutDeviceV1 { device } => {
                device.check(limits)?;
                if !self.devices.contains_key(&device.id)
                    && self.devices.len() >= limits.devices_max
                {
                    return Err(bad_request(format!(
                        "this app has the most device registrations allowed ({})",
                        limits.devices_max
                    )));
                }
                Ok(())
            }
            Mutation::SubscribeV1 { subscription } => self.check_subscribe(subscription, limits),
            Mutation::RemoveDevicesV1 { .. } | Mutation::UnsubscribeV1 { .. } => Ok(()),
        }
    }

    /// Whether applying `mutation` would change anything: a device registered again
    /// exactly as it is, or a subscription that exists, would not (and so is not
    /// written to the push log again: a client repeating them cannot grow it).
    pub fn changes(&self, mutation: &Mutation) -> bool {
        match mutation {
            Mutation::PutDeviceV1 { device } => self.devices.get(&device.id) != Some(device),
            Mutation::SubscribeV1 { subscription } => !self.subscriptions.contains(subscription),
            Mutation::RemoveDevicesV1 { filter } => {
                (filter.device_id.is_some() || filter.client_id.is_some())
                    && self.devices.values().any(|d| filter.matches_device(d))
            }
            Mutation::UnsubscribeV1 { filter } => self
                .subscriptions
                .iter()
                .any(|s| filter.matches_subscription(s)),
        }
    }

    /// Applies `mutation` if [`Self::check`] allows it; a refused one changes nothing.
    pub fn apply(&mut self, mutation: &Mutation, limits: &PushLimits) -> Result<(), ErrorInfo> {
        self.check(mutation, limits)?;
        match mutation {
            Mutation::PutDeviceV1 { device } => {
                self.devices.insert(device.id.clone(), device.clone());
            }
            Mutation::RemoveDevicesV1 { filter } => self.remove_devices(filter),
            Mutation::SubscribeV1 { subscription } => {
                self.subscriptions.insert(subscription.clone());
            }
            Mutation::UnsubscribeV1 { filter } => {
                self.subscriptions
                    .retain(|s| !filter.matches_subscription(s));
            }
        }
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

    fn check_subscribe(
        &self,
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
        if !self.subscriptions.contains(subscription)
            && self.subscriptions.len() >= limits.subscriptions_max
        {
            return Err(bad_request(format!(
                "this app has the most channel subscriptions allowed ({})",
                limits.subscriptions_max
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device(id: &str, client_id: Option<&str>) -> Device {
        Device {
            id: id.into(),
            client_id: client_id.map(Into::into),
            platform: "android".into(),
            form_factor: "phone".into(),
            metadata: None,
            device_secret: Some(format!("secret-{id}")),
            recipient: json!({ "transportType": "ablyChannel", "channel": "c", "ablyKey": "a.b:c" }),
            identity_token: format!("token-{id}"),
        }
    }

    fn put(id: &str, client_id: Option<&str>) -> Mutation {
        Mutation::PutDeviceV1 {
            device: device(id, client_id),
        }
    }

    fn sub(channel: &str, target: Target) -> Mutation {
        Mutation::SubscribeV1 {
            subscription: Subscription {
                channel: channel.into(),
                target,
            },
        }
    }

    fn fold(log: &[Mutation], limits: &PushLimits) -> Registry {
        let mut registry = Registry::default();
        for mutation in log {
            let _ = registry.apply(mutation, limits);
        }
        registry
    }

    /// A device put again unchanged, or an existing subscription, changes nothing; a
    /// different device or a new subscription does.
    #[test]
    fn repeated_mutations_change_nothing() {
        let limits = PushLimits::default();
        let registry = fold(
            &[put("d1", Some("a")), sub("ch", Target::Device("d1".into()))],
            &limits,
        );
        assert!(!registry.changes(&put("d1", Some("a"))));
        assert!(registry.changes(&put("d1", Some("b"))));
        assert!(registry.changes(&put("d2", None)));
        assert!(!registry.changes(&sub("ch", Target::Device("d1".into()))));
        assert!(registry.changes(&sub("other", Target::Device("d1".into()))));
    }

    /// Devices are created, replaced in place and listed by id, filtered by clientId,
    /// in pages that continue after the last id.
    #[test]
    fn devices_put_replace_list_and_page() {
        let limits = PushLimits::default();
        let mut registry = fold(
            &[
                put("d2", Some("a")),
                put("d1", Some("b")),
                put("d3", Some("a")),
            ],
            &limits,
        );
        registry.apply(&put("d1", Some("a")), &limits).unwrap();
        assert_eq!(registry.device_count(), 3);
        let ids = |devices: Vec<&Device>| devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(registry.devices(&Filter::default(), None, 10)),
            ["d1", "d2", "d3"]
        );
        let by_a = Filter {
            client_id: Some("a".into()),
            ..Filter::default()
        };
        assert_eq!(ids(registry.devices(&by_a, None, 10)), ["d1", "d2", "d3"]);
        assert_eq!(
            ids(registry.devices(&Filter::default(), Some("d1"), 1)),
            ["d2"]
        );
        assert_eq!(ids(registry.client_devices("b")), Vec::<String>::new());
    }

    /// Removing a device removes its device subscriptions but not its clientId's; a
    /// removal naming no device or clientId removes nothing.
    #[test]
    fn removing_a_device_removes_its_subscriptions() {
        let limits = PushLimits::default();
        let mut registry = fold(
            &[
                put("d1", Some("a")),
                put("d2", Some("b")),
                sub("ch", Target::Device("d1".into())),
                sub("ch", Target::Device("d2".into())),
                sub("ch", Target::Client("a".into())),
            ],
            &limits,
        );
        let nothing = Mutation::RemoveDevicesV1 {
            filter: Filter {
                channel: Some("ch".into()),
                ..Filter::default()
            },
        };
        registry.apply(&nothing, &limits).unwrap();
        assert_eq!(
            (registry.device_count(), registry.subscription_count()),
            (2, 3)
        );
        let remove = Mutation::RemoveDevicesV1 {
            filter: Filter {
                device_id: Some("d1".into()),
                ..Filter::default()
            },
        };
        registry.apply(&remove, &limits).unwrap();
        assert!(registry.device("d1").is_none());
        let left: Vec<_> = registry
            .subscriptions(&Filter::default(), false, None, 10)
            .into_iter()
            .map(|s| s.target.clone())
            .collect();
        assert_eq!(
            left,
            [Target::Device("d2".into()), Target::Client("a".into())]
        );
    }

    /// A device subscription needs the device; subscribing twice keeps one; removal
    /// matches every given field; channels are listed once each, in pages.
    #[test]
    fn subscriptions_and_channels() {
        let limits = PushLimits::default();
        let mut registry = fold(&[put("d1", Some("a"))], &limits);
        let missing = registry.apply(&sub("x", Target::Device("nope".into())), &limits);
        assert_eq!(missing.unwrap_err().code, code::NOT_FOUND);
        for mutation in [
            sub("x", Target::Device("d1".into())),
            sub("x", Target::Device("d1".into())),
            sub("x", Target::Client("a".into())),
            sub("y", Target::Client("a".into())),
            sub("z", Target::Client("b".into())),
        ] {
            registry.apply(&mutation, &limits).unwrap();
        }
        assert_eq!(registry.subscription_count(), 4);
        assert_eq!(registry.channels(None, 10), ["x", "y", "z"]);
        assert_eq!(registry.channels(Some("x"), 1), ["y"]);
        let unsubscribe = Mutation::UnsubscribeV1 {
            filter: Filter {
                client_id: Some("a".into()),
                ..Filter::default()
            },
        };
        registry.apply(&unsubscribe, &limits).unwrap();
        assert_eq!(registry.channels(None, 10), ["x", "z"]);
        let on_x = Filter {
            channel: Some("x".into()),
            ..Filter::default()
        };
        assert_eq!(registry.subscriptions(&on_x, false, None, 10).len(), 1);
    }

    /// A channel's recipients are the devices subscribed by id plus the devices of the
    /// clientIds subscribed, each once.
    #[test]
    fn channel_recipients_are_unique_devices() {
        let limits = PushLimits::default();
        let registry = fold(
            &[
                put("d1", Some("a")),
                put("d2", Some("a")),
                put("d3", None),
                put("d4", Some("b")),
                sub("ch", Target::Device("d1".into())),
                sub("ch", Target::Device("d3".into())),
                sub("ch", Target::Client("a".into())),
                sub("other", Target::Client("b".into())),
            ],
            &limits,
        );
        let ids: Vec<&str> = registry
            .channel_recipients("ch")
            .iter()
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(ids, ["d1", "d2", "d3"]);
    }

    /// Count limits refuse a new device or subscription past the bound (replacing one
    /// is fine) and a refused mutation changes nothing; so a log holding a mutation
    /// over the limit folds the same however often it is folded.
    #[test]
    fn limits_refuse_and_change_nothing() {
        let limits = PushLimits {
            devices_max: 2,
            subscriptions_max: 1,
            ..PushLimits::default()
        };
        let log = [
            put("d1", Some("a")),
            put("d2", Some("a")),
            put("d3", Some("a")),
            put("d2", Some("b")),
            sub("x", Target::Client("a".into())),
            sub("y", Target::Client("a".into())),
        ];
        let registry = fold(&log, &limits);
        assert_eq!(registry.device_count(), 2);
        assert!(registry.device("d3").is_none());
        assert_eq!(
            registry.device("d2").unwrap().client_id.as_deref(),
            Some("b")
        );
        assert_eq!(registry.subscription_count(), 1);
        let mut again = registry.clone();
        let refused = again.apply(&put("d3", None), &limits).unwrap_err();
        assert_eq!(refused.code, code::BAD_REQUEST);
        assert_eq!(again, registry);
        assert_eq!(fold(&log, &limits), registry);
    }

    /// Device shape and byte limits: unknown platform, form factor or transport, an
    /// empty or long id, and oversized recipient or metadata are each 40000.
    #[test]
    fn device_checks() {
        let limits = PushLimits {
            name_bytes_max: 10,
            recipient_bytes_max: 100,
            metadata_bytes_max: 20,
            ..PushLimits::default()
        };
        assert!(device("d1", None).check(&limits).is_ok());
        type Change = Box<dyn Fn(&mut Device)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "platform",
                Box::new(|d| d.platform = "not_a_real_platform".into()),
            ),
            ("formFactor", Box::new(|d| d.form_factor = "toaster".into())),
            ("empty id", Box::new(|d| d.id.clear())),
            ("long id", Box::new(|d| d.id = "x".repeat(11))),
            (
                "transport",
                Box::new(|d| d.recipient = json!({ "transportType": "pigeon" })),
            ),
            ("no transport", Box::new(|d| d.recipient = json!({}))),
            (
                "recipient not object",
                Box::new(|d| d.recipient = json!("x")),
            ),
            (
                "big recipient",
                Box::new(|d| d.recipient = json!({ "transportType": "gcm", "t": "x".repeat(100) })),
            ),
            (
                "metadata not object",
                Box::new(|d| d.metadata = Some(json!([1]))),
            ),
            (
                "big metadata",
                Box::new(|d| d.metadata = Some(json!({ "k": "x".repeat(20) }))),
            ),
        ];
        for (name, change) in cases {
            let mut bad = device("d1", None);
            change(&mut bad);
            assert_eq!(
                bad.check(&limits).unwrap_err().code,
                code::BAD_REQUEST,
                "{name}"
            );
        }
    }

    /// Mutations round-trip through their JSON form (the log's encoding), and the
    /// `concatFilters` match takes a subscription for either the device or the client.
    #[test]
    fn mutation_json_round_trip_and_any_filter() {
        let mutations = [
            put("d1", Some("a")),
            sub("x", Target::Client("a".into())),
            Mutation::UnsubscribeV1 {
                filter: Filter {
                    channel: Some("x".into()),
                    device_id: None,
                    client_id: Some("a".into()),
                },
            },
        ];
        for mutation in &mutations {
            let json = serde_json::to_string(mutation).unwrap();
            assert_eq!(&serde_json::from_str::<Mutation>(&json).unwrap(), mutation);
        }
        let limits = PushLimits::default();
        let registry = fold(
            &[
                put("d1", Some("a")),
                sub("x", Target::Device("d1".into())),
                sub("x", Target::Client("a".into())),
                sub("x", Target::Client("b".into())),
            ],
            &limits,
        );
        let filter = Filter {
            channel: Some("x".into()),
            device_id: Some("d1".into()),
            client_id: Some("a".into()),
        };
        assert_eq!(registry.subscriptions(&filter, true, None, 10).len(), 2);
        assert_eq!(registry.subscriptions(&filter, false, None, 10).len(), 0);
    }
}
