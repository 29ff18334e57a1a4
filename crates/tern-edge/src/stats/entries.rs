//! Statistics entries in Ably's v2 shape (`app-stats` JSON schema): flat keys such as
//! `messages.inbound.realtime.messages.count`. Tern keeps only the base counters
//! ([`Key`]); the aggregates Ably also reports (`messages.inbound.all.messages.count`,
//! `messages.all.all.count`, `apiRequests.all.succeeded` …) are derived from them when
//! read ([`entries`]), so they always agree with their parts. Also here: turning the
//! nested fixtures of Ably's sandbox (`POST /stats`) into base counters.

use std::collections::BTreeMap;

use serde_json::Value;

/// One base counter, an index into [`NAMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key(u8);

/// The base counters, by [`Key`]. The first 20 are messages, laid out as
/// direction × transport × type × field (see [`Key::message`]), then persisted ×
/// type × field.
const NAMES: [&str; 36] = [
    "messages.inbound.realtime.messages.count",
    "messages.inbound.realtime.messages.data",
    "messages.inbound.realtime.presence.count",
    "messages.inbound.realtime.presence.data",
    "messages.inbound.rest.messages.count",
    "messages.inbound.rest.messages.data",
    "messages.inbound.rest.presence.count",
    "messages.inbound.rest.presence.data",
    "messages.outbound.realtime.messages.count",
    "messages.outbound.realtime.messages.data",
    "messages.outbound.realtime.presence.count",
    "messages.outbound.realtime.presence.data",
    "messages.outbound.rest.messages.count",
    "messages.outbound.rest.messages.data",
    "messages.outbound.rest.presence.count",
    "messages.outbound.rest.presence.data",
    "messages.persisted.messages.count",
    "messages.persisted.messages.data",
    "messages.persisted.presence.count",
    "messages.persisted.presence.data",
    "connections.all.opened",
    "connections.all.peak",
    "connections.all.min",
    "connections.all.mean",
    "connections.all.refused",
    "channels.opened",
    "channels.peak",
    "channels.min",
    "channels.mean",
    "channels.refused",
    "apiRequests.other.succeeded",
    "apiRequests.other.failed",
    "apiRequests.other.refused",
    "apiRequests.tokenRequests.succeeded",
    "apiRequests.tokenRequests.failed",
    "apiRequests.tokenRequests.refused",
];

/// How many base counters there are.
pub(crate) const KEY_COUNT: usize = NAMES.len();

/// Inbound (received from clients) or outbound (delivered to them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Inbound,
    Outbound,
}

/// How a message arrived or left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Realtime,
    Rest,
}

/// Messages or presence messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Messages,
    Presence,
}

/// A count, or the bytes (Ably's message size) of what was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Count,
    Data,
}

/// How a counter combines over time (minutes into an hour) and within one minute
/// (fixtures added to what was counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Merge {
    Sum,
    Max,
    Min,
    Mean,
}

/// Which kind of API request: the categories of `apiRequests.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Other,
    Token,
}

/// How an API request ended: 2xx/3xx, refused (4xx: the client's fault), failed (5xx).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
    Refused,
}

impl Key {
    pub(crate) const CONNECTIONS_OPENED: Key = Key(20);
    pub(crate) const CONNECTIONS_PEAK: Key = Key(21);
    pub(crate) const CONNECTIONS_MIN: Key = Key(22);
    pub(crate) const CONNECTIONS_MEAN: Key = Key(23);
    pub(crate) const CHANNELS_OPENED: Key = Key(25);
    pub(crate) const CHANNELS_PEAK: Key = Key(26);
    pub(crate) const CHANNELS_MIN: Key = Key(27);
    pub(crate) const CHANNELS_MEAN: Key = Key(28);

    /// Every key, in order.
    pub(crate) fn all() -> impl Iterator<Item = Key> {
        (0..KEY_COUNT as u8).map(Key)
    }

    pub(crate) fn message(
        direction: Direction,
        transport: Transport,
        kind: Kind,
        field: Field,
    ) -> Key {
        let index = (direction as u8) * 8 + (transport as u8) * 4 + (kind as u8) * 2 + field as u8;
        Key(index)
    }

    fn persisted(kind: Kind, field: Field) -> Key {
        Key(16 + (kind as u8) * 2 + field as u8)
    }

    pub(crate) fn request(request: Request, outcome: Outcome) -> Key {
        Key(30 + (request as u8) * 3 + outcome as u8)
    }

    pub(crate) fn index(self) -> usize {
        usize::from(self.0)
    }

    pub(crate) fn name(self) -> &'static str {
        NAMES[self.index()]
    }

    fn merge(self) -> Merge {
        let name = self.name();
        if name.ends_with(".peak") {
            Merge::Max
        } else if name.ends_with(".min") {
            Merge::Min
        } else if name.ends_with(".mean") {
            Merge::Mean
        } else {
            Merge::Sum
        }
    }
}

/// The non-zero base counters of one interval, sorted by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Row(Box<[(Key, f64)]>);

impl Row {
    /// The non-zero, finite values of `values`.
    pub(crate) fn from_values(values: impl IntoIterator<Item = (Key, f64)>) -> Row {
        let mut pairs: Vec<(Key, f64)> = values
            .into_iter()
            .filter(|(_, v)| v.is_finite() && *v != 0.0)
            .collect();
        pairs.sort_by_key(|(key, _)| *key);
        pairs.dedup_by_key(|(key, _)| *key);
        Row(pairs.into_boxed_slice())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn get(&self, key: Key) -> f64 {
        self.0
            .binary_search_by_key(&key, |(k, _)| *k)
            .map_or(0.0, |at| self.0[at].1)
    }

    /// This row combined with `other` ([`Aggregate`]): counts add, peaks take the
    /// larger, minimums the smaller, means the average.
    pub(crate) fn merged(&self, other: &Row) -> Row {
        let mut total = Aggregate::default();
        total.add(self);
        total.add(other);
        total.finish()
    }
}

/// Rows being combined into one (the minutes of an hour, say).
pub(crate) struct Aggregate {
    values: [f64; KEY_COUNT],
    /// Rows that had each key: minimums start from the first, means divide by it.
    present: [u32; KEY_COUNT],
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            values: [0.0; KEY_COUNT],
            present: [0; KEY_COUNT],
        }
    }
}

impl Aggregate {
    pub(crate) fn add(&mut self, row: &Row) {
        for &(key, value) in row.0.iter() {
            let i = key.index();
            let slot = &mut self.values[i];
            *slot = match (key.merge(), self.present[i]) {
                (_, 0) => value,
                (Merge::Sum | Merge::Mean, _) => *slot + value,
                (Merge::Max, _) => slot.max(value),
                (Merge::Min, _) => slot.min(value),
            };
            self.present[i] += 1;
        }
    }

    pub(crate) fn finish(&self) -> Row {
        Row::from_values(Key::all().map(|key| {
            let i = key.index();
            let value = match key.merge() {
                Merge::Mean if self.present[i] > 0 => self.values[i] / f64::from(self.present[i]),
                _ => self.values[i],
            };
            (key, value)
        }))
    }
}

/// The entries Ably reports for `row`: its base counters and every aggregate derived
/// from them, leaving out zeros (Ably's statistics are sparse).
pub(crate) fn entries(row: &Row) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, value: f64| {
        if value != 0.0 {
            out.insert(name, value);
        }
    };
    for key in Key::all() {
        put(key.name().to_string(), row.get(key));
    }
    let fields = [(Field::Count, "count"), (Field::Data, "data")];
    let kinds = [(Kind::Messages, "messages"), (Kind::Presence, "presence")];
    let transports = [(Transport::Realtime, "realtime"), (Transport::Rest, "rest")];
    for (field, field_name) in fields {
        let mut all_by_kind = [0.0; 2];
        for (direction, dir_name) in [
            (Direction::Inbound, "inbound"),
            (Direction::Outbound, "outbound"),
        ] {
            let mut by_kind = [0.0; 2];
            for (transport, transport_name) in transports {
                let mut by_transport = 0.0;
                for (i, (kind, _)) in kinds.iter().enumerate() {
                    let value = row.get(Key::message(direction, transport, *kind, field));
                    by_transport += value;
                    by_kind[i] += value;
                }
                put(
                    format!("messages.{dir_name}.{transport_name}.all.{field_name}"),
                    by_transport,
                );
            }
            for (i, (_, kind_name)) in kinds.iter().enumerate() {
                put(
                    format!("messages.{dir_name}.all.{kind_name}.{field_name}"),
                    by_kind[i],
                );
                all_by_kind[i] += by_kind[i];
            }
            put(
                format!("messages.{dir_name}.all.all.{field_name}"),
                by_kind[0] + by_kind[1],
            );
        }
        for (i, (_, kind_name)) in kinds.iter().enumerate() {
            put(
                format!("messages.all.{kind_name}.{field_name}"),
                all_by_kind[i],
            );
        }
        put(
            format!("messages.all.all.{field_name}"),
            all_by_kind[0] + all_by_kind[1],
        );
        let persisted: f64 = kinds
            .iter()
            .map(|(kind, _)| row.get(Key::persisted(*kind, field)))
            .sum();
        put(format!("messages.persisted.all.{field_name}"), persisted);
    }
    for (outcome, name) in [
        (Outcome::Succeeded, "succeeded"),
        (Outcome::Failed, "failed"),
        (Outcome::Refused, "refused"),
    ] {
        let all = row.get(Key::request(Request::Other, outcome))
            + row.get(Key::request(Request::Token, outcome));
        put(format!("apiRequests.all.{name}"), all);
    }
    out
}

/// Why a fixture was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FixtureError {
    /// Not a JSON object with a string `intervalId`.
    #[error("each statistics fixture must be an object with an intervalId")]
    NotAnInterval,
    /// The `intervalId` is not a minute (`yyyy-mm-dd:hh:mm`).
    #[error("intervalId '{0}' is not a minute (yyyy-mm-dd:hh:mm)")]
    NotAMinute(String),
    /// A counter that is not a finite number ≥ 0.
    #[error("'{0}' must be a number >= 0")]
    BadValue(String),
}

/// One fixture of Ably's sandbox, in the nested form the SDK suites post
/// (`{intervalId, inbound: {realtime: {messages: {count, data}}}, connections: {tls:
/// {peak, opened}}, apiRequests: {succeeded, …}, …}`), as the minute it names and its
/// base counters. Aggregates it carries (`all`) are derived again when read, and fields
/// outside the base counters are ignored.
pub(crate) fn fixture_row(fixture: &Value) -> Result<(i64, Row), FixtureError> {
    let id = fixture
        .get("intervalId")
        .and_then(Value::as_str)
        .ok_or(FixtureError::NotAnInterval)?;
    let start = match super::interval::parse_interval_id(id) {
        Some((start, super::interval::Unit::Minute)) => start,
        _ => return Err(FixtureError::NotAMinute(id.to_string())),
    };
    let mut values: Vec<(Key, f64)> = Vec::new();
    let fields = [(Field::Count, "count"), (Field::Data, "data")];
    let kinds = [(Kind::Messages, "messages"), (Kind::Presence, "presence")];
    for (direction, dir_name) in [
        (Direction::Inbound, "inbound"),
        (Direction::Outbound, "outbound"),
    ] {
        for (transport, transport_name) in
            [(Transport::Realtime, "realtime"), (Transport::Rest, "rest")]
        {
            for (kind, kind_name) in kinds {
                for (field, field_name) in fields {
                    let key = Key::message(direction, transport, kind, field);
                    let path = [dir_name, transport_name, kind_name, field_name];
                    values.extend(number_at(fixture, &path)?.map(|v| (key, v)));
                }
            }
        }
    }
    for (kind, kind_name) in kinds {
        for (field, field_name) in fields {
            let path = ["persisted", kind_name, field_name];
            values.extend(number_at(fixture, &path)?.map(|v| (Key::persisted(kind, field), v)));
        }
    }
    for (i, name) in ["opened", "peak", "min", "mean", "refused"]
        .iter()
        .enumerate()
    {
        let channels = Key(Key::CHANNELS_OPENED.0 + i as u8);
        values.extend(number_at(fixture, &["channels", name])?.map(|v| (channels, v)));
        // `all` if given, else TLS and plain connections together.
        let connections = Key(Key::CONNECTIONS_OPENED.0 + i as u8);
        let all = number_at(fixture, &["connections", "all", name])?;
        let tls = number_at(fixture, &["connections", "tls", name])?;
        let plain = number_at(fixture, &["connections", "plain", name])?;
        let value = all.or_else(|| Some(tls? + plain.unwrap_or(0.0))).or(plain);
        values.extend(value.map(|v| (connections, v)));
    }
    for (request, section) in [
        (Request::Other, "apiRequests"),
        (Request::Token, "tokenRequests"),
    ] {
        for (outcome, name) in [
            (Outcome::Succeeded, "succeeded"),
            (Outcome::Failed, "failed"),
            (Outcome::Refused, "refused"),
        ] {
            let key = Key::request(request, outcome);
            values.extend(number_at(fixture, &[section, name])?.map(|v| (key, v)));
        }
    }
    Ok((start, Row::from_values(values)))
}

/// The number at `path` in `value`: `None` when absent, an error when it is there but
/// not a finite number ≥ 0.
fn number_at(value: &Value, path: &[&str]) -> Result<Option<f64>, FixtureError> {
    let mut at = value;
    for step in path {
        match at.get(step) {
            Some(next) => at = next,
            None => return Ok(None),
        }
    }
    match at.as_f64() {
        Some(number) if number.is_finite() && number >= 0.0 => Ok(Some(number)),
        _ => Err(FixtureError::BadValue(path.join("."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name is unique, the message keys sit where `Key::message` computes them,
    /// and request keys where `Key::request` does.
    #[test]
    fn key_layout() {
        let mut names: Vec<&str> = NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEY_COUNT);
        let key = Key::message(
            Direction::Outbound,
            Transport::Rest,
            Kind::Presence,
            Field::Data,
        );
        assert_eq!(key.name(), "messages.outbound.rest.presence.data");
        let key = Key::message(
            Direction::Inbound,
            Transport::Realtime,
            Kind::Messages,
            Field::Count,
        );
        assert_eq!(key.name(), "messages.inbound.realtime.messages.count");
        assert_eq!(
            Key::persisted(Kind::Presence, Field::Count).name(),
            "messages.persisted.presence.count"
        );
        assert_eq!(
            Key::request(Request::Token, Outcome::Refused).name(),
            "apiRequests.tokenRequests.refused"
        );
        assert_eq!(
            Key::request(Request::Other, Outcome::Succeeded).name(),
            "apiRequests.other.succeeded"
        );
        assert_eq!(Key::CONNECTIONS_MEAN.name(), "connections.all.mean");
        assert_eq!(Key::CHANNELS_MEAN.name(), "channels.mean");
    }

    fn row(pairs: &[(&str, f64)]) -> Row {
        Row::from_values(pairs.iter().map(|(name, value)| {
            let key = Key::all().find(|k| k.name() == *name).unwrap();
            (key, *value)
        }))
    }

    /// Aggregating over time: counts add, peaks take the largest, minimums the smallest
    /// and means the average of the rows that have them.
    #[test]
    fn aggregate_rules() {
        let mut total = Aggregate::default();
        total.add(&row(&[
            ("messages.inbound.realtime.messages.count", 2.0),
            ("connections.all.peak", 5.0),
            ("connections.all.min", 3.0),
            ("connections.all.mean", 4.0),
        ]));
        total.add(&row(&[
            ("messages.inbound.realtime.messages.count", 3.0),
            ("connections.all.peak", 7.0),
            ("connections.all.min", 1.0),
            ("connections.all.mean", 2.0),
        ]));
        total.add(&row(&[("channels.opened", 1.0)]));
        let sum = total.finish();
        assert_eq!(
            sum,
            row(&[
                ("messages.inbound.realtime.messages.count", 5.0),
                ("connections.all.peak", 7.0),
                ("connections.all.min", 1.0),
                ("connections.all.mean", 3.0),
                ("channels.opened", 1.0)
            ])
        );
    }

    /// The derived aggregates are the sums Ably reports: per transport, per direction,
    /// over both directions, persisted, and API requests of every kind; zeros are left
    /// out.
    #[test]
    fn derived_entries() {
        let entries = entries(&row(&[
            ("messages.inbound.realtime.messages.count", 3.0),
            ("messages.inbound.realtime.messages.data", 30.0),
            ("messages.inbound.rest.messages.count", 1.0),
            ("messages.inbound.realtime.presence.count", 2.0),
            ("messages.outbound.realtime.messages.count", 8.0),
            ("messages.persisted.presence.count", 4.0),
            ("apiRequests.other.succeeded", 5.0),
            ("apiRequests.tokenRequests.succeeded", 2.0),
            ("apiRequests.tokenRequests.refused", 1.0),
        ]));
        let get = |name: &str| entries.get(name).copied();
        assert_eq!(get("messages.inbound.realtime.all.count"), Some(5.0));
        assert_eq!(get("messages.inbound.all.messages.count"), Some(4.0));
        assert_eq!(get("messages.inbound.all.messages.data"), Some(30.0));
        assert_eq!(get("messages.inbound.all.presence.count"), Some(2.0));
        assert_eq!(get("messages.inbound.all.all.count"), Some(6.0));
        assert_eq!(get("messages.outbound.all.messages.count"), Some(8.0));
        assert_eq!(get("messages.all.messages.count"), Some(12.0));
        assert_eq!(get("messages.all.all.count"), Some(14.0));
        assert_eq!(get("messages.persisted.all.count"), Some(4.0));
        assert_eq!(get("apiRequests.all.succeeded"), Some(7.0));
        assert_eq!(get("apiRequests.all.refused"), Some(1.0));
        assert_eq!(get("apiRequests.all.failed"), None, "zeros are left out");
        assert_eq!(get("messages.outbound.rest.all.count"), None);
    }

    /// The ably-js suite's fixture becomes its minute and base counters; `connections`
    /// of TLS and plain add up; token requests are their own category.
    #[test]
    fn suite_fixture() {
        let fixture: Value = serde_json::from_str(
            r#"{"intervalId":"2024-02-03:15:05",
                "inbound":{"realtime":{"messages":{"count":70,"data":7000}}},
                "outbound":{"realtime":{"messages":{"count":40,"data":4000}}},
                "persisted":{"presence":{"count":20,"data":2000}},
                "connections":{"tls":{"peak":20,"opened":10},"plain":{"opened":1}},
                "channels":{"peak":50,"opened":30},
                "apiRequests":{"succeeded":50,"failed":10},
                "tokenRequests":{"succeeded":60,"failed":20}}"#,
        )
        .unwrap();
        let (start, got) = fixture_row(&fixture).unwrap();
        assert_eq!(
            start,
            super::super::interval::parse_interval_id("2024-02-03:15:05")
                .unwrap()
                .0
        );
        assert_eq!(
            got,
            row(&[
                ("messages.inbound.realtime.messages.count", 70.0),
                ("messages.inbound.realtime.messages.data", 7000.0),
                ("messages.outbound.realtime.messages.count", 40.0),
                ("messages.outbound.realtime.messages.data", 4000.0),
                ("messages.persisted.presence.count", 20.0),
                ("messages.persisted.presence.data", 2000.0),
                ("connections.all.opened", 11.0),
                ("connections.all.peak", 20.0),
                ("channels.opened", 30.0),
                ("channels.peak", 50.0),
                ("apiRequests.other.succeeded", 50.0),
                ("apiRequests.other.failed", 10.0),
                ("apiRequests.tokenRequests.succeeded", 60.0),
                ("apiRequests.tokenRequests.failed", 20.0),
            ])
        );
    }

    /// Fixtures without a minute id, or with a counter that is not a number ≥ 0, are
    /// refused with the reason.
    #[test]
    fn bad_fixtures() {
        let parse = |text: &str| fixture_row(&serde_json::from_str(text).unwrap()).map(|_| ());
        assert_eq!(parse("[]"), Err(FixtureError::NotAnInterval));
        assert_eq!(
            parse(r#"{"intervalId":5}"#),
            Err(FixtureError::NotAnInterval)
        );
        assert_eq!(
            parse(r#"{"intervalId":"2024-02-03:15"}"#),
            Err(FixtureError::NotAMinute("2024-02-03:15".into()))
        );
        assert_eq!(
            parse(
                r#"{"intervalId":"2024-02-03:15:05","inbound":{"realtime":{"messages":{"count":-1}}}}"#
            ),
            Err(FixtureError::BadValue(
                "inbound.realtime.messages.count".into()
            ))
        );
        assert_eq!(
            parse(r#"{"intervalId":"2024-02-03:15:05","channels":{"peak":"many"}}"#),
            Err(FixtureError::BadValue("channels.peak".into()))
        );
        assert_eq!(
            parse(r#"{"intervalId":"2024-02-03:15:05","unknown":{"x":1}}"#),
            Ok(())
        );
    }
}
