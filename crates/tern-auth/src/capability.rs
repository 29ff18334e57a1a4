//! Ably capabilities: a JSON object mapping a resource pattern to the operations
//! it grants, e.g. `{"chat:*":["subscribe","presence"],"news":["subscribe"]}`.
//!
//! Matching rules (ably.md §8). A pattern is an optional `[qualifier]` followed by
//! `:`-separated segments. A segment that is exactly `*` is a wildcard; anything
//! else, `foo*` included, is literal.
//! - a `*` as the *last* segment matches one or more trailing segments, so `*`
//!   matches every unqualified channel and `ns:*` matches `ns:x` and `ns:x:y`;
//! - a `*` elsewhere matches exactly one segment (`a:*:c` matches `a:b:c` only);
//! - a pattern without a qualifier never matches a qualified name (`[meta]x`,
//!   `[queue]x`); `[meta]*` matches every `[meta]` channel and `[*]` stands for any
//!   qualifier or none;
//! - a channel-params qualifier (`[?rewind=1]foo`) is not part of the channel's
//!   identity and is removed before matching (see [`strip_qualifier`]).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};

use crate::AuthError;

/// Most resources one capability may name.
pub(crate) const RESOURCES_MAX: usize = 1000;
/// Longest resource pattern, in bytes.
pub(crate) const PATTERN_BYTES_MAX: usize = 1024;

/// One operation a capability can grant on a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `publish`: publish messages.
    Publish,
    /// `subscribe`: receive messages (and presence events).
    Subscribe,
    /// `presence`: enter, update and leave the presence set.
    Presence,
    /// `history`: read message and presence history.
    History,
    /// `stats`: read app statistics.
    Stats,
    /// `channel-metadata`: read channel status and occupancy.
    ChannelMetadata,
    /// `push-subscribe`: subscribe devices to push.
    PushSubscribe,
    /// `push-admin`: administer push registrations.
    PushAdmin,
    /// `object-subscribe`: read LiveObjects state.
    ObjectSubscribe,
    /// `object-publish`: mutate LiveObjects state.
    ObjectPublish,
    /// `annotation-publish`: publish message annotations.
    AnnotationPublish,
    /// `annotation-subscribe`: receive message annotations.
    AnnotationSubscribe,
    /// `message-update-own`: edit one's own messages.
    MessageUpdateOwn,
    /// `message-update-any`: edit anyone's messages.
    MessageUpdateAny,
    /// `message-delete-own`: delete one's own messages.
    MessageDeleteOwn,
    /// `message-delete-any`: delete anyone's messages.
    MessageDeleteAny,
    /// `privileged-headers`: set privileged message extras.
    PrivilegedHeaders,
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: [Operation; 17] = [
        Operation::Publish,
        Operation::Subscribe,
        Operation::Presence,
        Operation::History,
        Operation::Stats,
        Operation::ChannelMetadata,
        Operation::PushSubscribe,
        Operation::PushAdmin,
        Operation::ObjectSubscribe,
        Operation::ObjectPublish,
        Operation::AnnotationPublish,
        Operation::AnnotationSubscribe,
        Operation::MessageUpdateOwn,
        Operation::MessageUpdateAny,
        Operation::MessageDeleteOwn,
        Operation::MessageDeleteAny,
        Operation::PrivilegedHeaders,
    ];

    /// The wire name, as written in a capability (`"channel-metadata"`).
    pub const fn name(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Presence => "presence",
            Operation::History => "history",
            Operation::Stats => "stats",
            Operation::ChannelMetadata => "channel-metadata",
            Operation::PushSubscribe => "push-subscribe",
            Operation::PushAdmin => "push-admin",
            Operation::ObjectSubscribe => "object-subscribe",
            Operation::ObjectPublish => "object-publish",
            Operation::AnnotationPublish => "annotation-publish",
            Operation::AnnotationSubscribe => "annotation-subscribe",
            Operation::MessageUpdateOwn => "message-update-own",
            Operation::MessageUpdateAny => "message-update-any",
            Operation::MessageDeleteOwn => "message-delete-own",
            Operation::MessageDeleteAny => "message-delete-any",
            Operation::PrivilegedHeaders => "privileged-headers",
        }
    }

    /// The operation with this wire name; `None` for unknown names and for `"*"`
    /// (which is a set, see [`OpSet::ALL`]).
    pub fn from_name(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.name() == name)
    }

    const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Operation`]s, as a bitset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OpSet(u32);

impl OpSet {
    /// No operations.
    pub const EMPTY: OpSet = OpSet(0);
    /// Every operation; written `"*"` in a capability.
    pub const ALL: OpSet = OpSet((1 << Operation::ALL.len()) - 1);

    /// The set holding just `op`.
    pub const fn of(op: Operation) -> OpSet {
        OpSet(op.bit())
    }

    /// Whether `op` is in the set.
    pub const fn contains(self, op: Operation) -> bool {
        self.0 & op.bit() != 0
    }

    /// Whether the set holds no operation.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Operations in either set.
    pub const fn union(self, other: OpSet) -> OpSet {
        OpSet(self.0 | other.0)
    }

    /// Operations in both sets.
    pub const fn intersection(self, other: OpSet) -> OpSet {
        OpSet(self.0 & other.0)
    }

    /// Whether every operation in `self` is in `other`.
    pub const fn is_subset_of(self, other: OpSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// The set with `op` added.
    pub const fn with(self, op: Operation) -> OpSet {
        OpSet(self.0 | op.bit())
    }

    /// The operations in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Operation> {
        Operation::ALL
            .into_iter()
            .filter(move |op| self.contains(*op))
    }

    /// Wire names in capability form: `["*"]` for [`OpSet::ALL`], otherwise the
    /// names sorted as JavaScript's `Array.prototype.sort` would (all ASCII).
    fn wire_names(self) -> Vec<&'static str> {
        if self == OpSet::ALL {
            return vec!["*"];
        }
        let mut names: Vec<&'static str> = self.iter().map(Operation::name).collect();
        names.sort_unstable();
        names
    }
}

impl FromIterator<Operation> for OpSet {
    fn from_iter<I: IntoIterator<Item = Operation>>(ops: I) -> OpSet {
        ops.into_iter().fold(OpSet::EMPTY, OpSet::with)
    }
}

/// What a key or token may do: resource pattern → granted operations.
///
/// Equality is structural (same patterns, same operation sets), not semantic.
#[derive(Clone, Debug, Default)]
pub struct Capability {
    /// Shared: every connection holds its key's capability (cloned per connection),
    /// and a clone is then a reference count rather than a copy of the tree.
    resources: std::sync::Arc<BTreeMap<String, OpSet>>,
    /// The JSON it was parsed from (see [`Capability::to_wire_json`]); not part of
    /// equality.
    text: Option<std::sync::Arc<str>>,
}

impl PartialEq for Capability {
    fn eq(&self, other: &Capability) -> bool {
        self.resources == other.resources
    }
}

impl Eq for Capability {}

impl Capability {
    /// `{"*":["*"]}`: every operation on every unqualified channel.
    pub fn all() -> Capability {
        Capability {
            text: None,
            resources: BTreeMap::from([("*".to_owned(), OpSet::ALL)]).into(),
        }
    }

    /// `{}`: grants nothing.
    pub fn empty() -> Capability {
        Capability::default()
    }

    /// Parses capability JSON.
    ///
    /// Errors with [`AuthError::InvalidCapability`] for invalid JSON, a non-object,
    /// a non-array value, a non-string or unknown operation, an empty pattern, more
    /// than 1000 resources or a pattern over 1024 bytes. `"*"` as an operation means every operation. A repeated resource keeps
    /// its last value, as `JSON.parse` does.
    pub fn parse(json: &str) -> Result<Capability, AuthError> {
        let mut capability: Capability = serde_json::from_str(json)
            .map_err(|err| AuthError::InvalidCapability(err.to_string()))?;
        capability.text = Some(json.trim().into());
        Ok(capability)
    }

    /// The JSON a token's holder is shown: the text this capability was parsed from,
    /// when it was (Ably hands a key's capability back as written, operations in the
    /// key's order), otherwise [`Capability::to_canonical_json`].
    pub fn to_wire_json(&self) -> String {
        match &self.text {
            Some(text) => text.to_string(),
            None => self.to_canonical_json(),
        }
    }

    /// Builds a capability from `(pattern, operations)` pairs, with the same bounds
    /// as [`Capability::parse`]. A repeated pattern keeps the union of its sets.
    pub fn from_resources<P: Into<String>>(
        resources: impl IntoIterator<Item = (P, OpSet)>,
    ) -> Result<Capability, AuthError> {
        let mut built: BTreeMap<String, OpSet> = BTreeMap::new();
        for (pattern, ops) in resources {
            let pattern = pattern.into();
            validate_pattern(&pattern, built.len()).map_err(AuthError::InvalidCapability)?;
            let entry = built.entry(pattern).or_default();
            *entry = entry.union(ops);
        }
        Ok(Capability {
            resources: built.into(),
            text: None,
        })
    }

    /// The `(pattern, operations)` pairs, in byte order of pattern.
    pub fn resources(&self) -> impl Iterator<Item = (&str, OpSet)> {
        self.resources.iter().map(|(p, ops)| (p.as_str(), *ops))
    }

    /// Whether this capability grants no operation on anything.
    pub fn is_empty(&self) -> bool {
        self.resources.values().all(|ops| ops.is_empty())
    }

    /// Every operation granted on `channel`: the union over all matching patterns.
    pub fn ops_for(&self, channel: &str) -> OpSet {
        let channel = strip_qualifier(channel);
        self.resources
            .iter()
            .filter(|(pattern, _)| pattern_matches(pattern, channel))
            .fold(OpSet::EMPTY, |acc, (_, ops)| acc.union(*ops))
    }

    /// Whether `op` is granted on `channel`.
    pub fn allows(&self, channel: &str, op: Operation) -> bool {
        self.ops_for(channel).contains(op)
    }

    /// Whether everything this capability grants is granted by `other`.
    ///
    /// Each pattern here must have its operations covered by the union of the
    /// operations of `other`'s patterns that cover it (match every name it
    /// matches). This is conservative: a pattern covered only jointly by several
    /// narrower patterns of `other` counts as not covered.
    pub fn is_subset_of(&self, other: &Capability) -> bool {
        self.resources.iter().all(|(pattern, ops)| {
            let covering = other
                .resources
                .iter()
                .filter(|(outer, _)| pattern_covers(outer, pattern))
                .fold(OpSet::EMPTY, |acc, (_, outer_ops)| acc.union(*outer_ops));
            ops.is_subset_of(covering)
        })
    }

    /// What a token asking for `requested` gets from a key holding `self`:
    /// the operations both grant, on the names both match.
    ///
    /// When `requested` is a subset of `self` the answer is `requested` itself.
    /// Otherwise each pair of patterns contributes their exact overlap (`*` with
    /// `chat:*` gives `chat:*`), entries made redundant by a wider entry are
    /// dropped, and at most 1000 resources are kept, so a
    /// pathological pair can only ever lose grants, never gain them.
    pub fn intersect(&self, requested: &Capability) -> Capability {
        if requested.is_subset_of(self) {
            return requested.clone();
        }
        let mut out: BTreeMap<String, OpSet> = BTreeMap::new();
        'pairs: for (asked, asked_ops) in requested.resources.iter() {
            for (held, held_ops) in self.resources.iter() {
                let ops = asked_ops.intersection(*held_ops);
                if ops.is_empty() {
                    continue;
                }
                let Some(overlap) = pattern_meet(asked, held) else {
                    continue;
                };
                if out.len() >= RESOURCES_MAX && !out.contains_key(&overlap) {
                    break 'pairs;
                }
                let entry = out.entry(overlap).or_default();
                *entry = entry.union(ops);
            }
        }
        Capability {
            resources: without_redundant(out).into(),
            text: None,
        }
    }

    /// The canonical JSON text ably-js's `c14n` produces: resources sorted, each
    /// operation array sorted, no whitespace, `JSON.stringify` escaping.
    ///
    /// Key order follows JavaScript objects: array-index keys (`"0"`, `"42"`)
    /// first in numeric order, then the rest in UTF-16 code-unit order. An
    /// operation set holding every operation is written `["*"]`.
    pub fn to_canonical_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (pattern, ops)) in self.js_ordered().into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, pattern);
            out.push_str(":[");
            for (j, name) in ops.wire_names().into_iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                push_json_string(&mut out, name);
            }
            out.push(']');
        }
        out.push('}');
        out
    }

    fn js_ordered(&self) -> Vec<(&str, OpSet)> {
        let mut entries: Vec<(&str, OpSet)> = self.resources().collect();
        entries.sort_by(|a, b| js_key_order(a.0, b.0));
        entries
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_canonical_json())
    }
}

/// Strips a channel-params qualifier: `[?rewind=1]foo` → `foo`.
///
/// Other qualifiers (`[meta]`, `[queue]`) are part of the channel's identity and
/// are kept, as is a name that merely starts with `[` without a closing `]`.
pub fn strip_qualifier(name: &str) -> &str {
    if name.starts_with("[?") {
        if let Some(end) = name.find(']') {
            return &name[end + 1..];
        }
    }
    name
}

/// Checks one more resource may be added to a capability holding `count`.
fn validate_pattern(pattern: &str, count: usize) -> Result<(), String> {
    if count >= RESOURCES_MAX {
        return Err(format!("more than {RESOURCES_MAX} resources"));
    }
    if pattern.is_empty() {
        return Err("empty resource name".to_owned());
    }
    if pattern.len() > PATTERN_BYTES_MAX {
        return Err(format!("resource name over {PATTERN_BYTES_MAX} bytes"));
    }
    Ok(())
}

/// Splits a leading `[...]` qualifier from a pattern or channel name. A name
/// starting with `[` but never closing it is all qualifier, so that no
/// unqualified pattern matches it.
fn split_qualifier(name: &str) -> (Option<&str>, &str) {
    if !name.starts_with('[') {
        return (None, name);
    }
    match name.find(']') {
        Some(end) => (Some(&name[..=end]), &name[end + 1..]),
        None => (Some(name), ""),
    }
}

const ANY_QUALIFIER: &str = "[*]";

fn qualifier_covers(outer: Option<&str>, inner: Option<&str>) -> bool {
    outer == Some(ANY_QUALIFIER) || outer == inner
}

/// Whether `pattern` matches the (params-stripped) channel name.
fn pattern_matches(pattern: &str, channel: &str) -> bool {
    let (pattern_qualifier, pattern) = split_qualifier(pattern);
    let (channel_qualifier, channel) = split_qualifier(channel);
    if !qualifier_covers(pattern_qualifier, channel_qualifier) {
        return false;
    }
    let mut segments = pattern.split(':').peekable();
    let mut names = channel.split(':');
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "*" && last {
            return names.next().is_some();
        }
        match names.next() {
            Some(name) if segment == "*" || segment == name => {}
            _ => return false,
        }
    }
    names.next().is_none()
}

/// Whether `outer` matches every channel name `inner` matches.
fn pattern_covers(outer: &str, inner: &str) -> bool {
    let (outer_qualifier, outer) = split_qualifier(outer);
    let (inner_qualifier, inner) = split_qualifier(inner);
    if !qualifier_covers(outer_qualifier, inner_qualifier) {
        return false;
    }
    let outer: Vec<&str> = outer.split(':').collect();
    let inner: Vec<&str> = inner.split(':').collect();
    segments_cover(&outer, &inner)
}

fn is_trailing_wildcard(segments: &[&str]) -> bool {
    segments == ["*"]
}

fn segments_cover(mut outer: &[&str], mut inner: &[&str]) -> bool {
    loop {
        if is_trailing_wildcard(outer) {
            // Every inner segment, wildcard or not, stands for at least one name segment.
            return !inner.is_empty();
        }
        let (Some((o, outer_rest)), Some((i, inner_rest))) =
            (outer.split_first(), inner.split_first())
        else {
            return outer.is_empty() && inner.is_empty();
        };
        // An inner trailing `*` matches arbitrarily many segments; only an outer
        // trailing `*` (handled above) covers that.
        if is_trailing_wildcard(inner) {
            return false;
        }
        let covered = *o == "*" || (*i != "*" && o == i);
        if !covered {
            return false;
        }
        outer = outer_rest;
        inner = inner_rest;
    }
}

/// The pattern matching exactly the names both `a` and `b` match, if any.
fn pattern_meet(a: &str, b: &str) -> Option<String> {
    let (a_qualifier, a_rest) = split_qualifier(a);
    let (b_qualifier, b_rest) = split_qualifier(b);
    let qualifier = if a_qualifier == Some(ANY_QUALIFIER) {
        b_qualifier
    } else if b_qualifier == Some(ANY_QUALIFIER) || a_qualifier == b_qualifier {
        a_qualifier
    } else {
        return None;
    };
    let a_segments: Vec<&str> = a_rest.split(':').collect();
    let b_segments: Vec<&str> = b_rest.split(':').collect();
    let mut segments = Vec::with_capacity(a_segments.len().max(b_segments.len()));
    if !segments_meet(&a_segments, &b_segments, &mut segments) {
        return None;
    }
    Some(format!("{}{}", qualifier.unwrap_or(""), segments.join(":")))
}

fn segments_meet<'a>(mut a: &[&'a str], mut b: &[&'a str], out: &mut Vec<&'a str>) -> bool {
    loop {
        // A trailing `*` matches any one-or-more segments, so the overlap is
        // whatever the other side still requires.
        if is_trailing_wildcard(a) && !b.is_empty() {
            out.extend_from_slice(b);
            return true;
        }
        if is_trailing_wildcard(b) && !a.is_empty() {
            out.extend_from_slice(a);
            return true;
        }
        let (Some((x, a_rest)), Some((y, b_rest))) = (a.split_first(), b.split_first()) else {
            return a.is_empty() && b.is_empty();
        };
        let segment = match (*x, *y) {
            ("*", other) | (other, "*") => other,
            (x, y) if x == y => x,
            _ => return false,
        };
        out.push(segment);
        a = a_rest;
        b = b_rest;
    }
}

/// Drops entries whose operations are already granted by strictly wider entries.
///
/// Sound to do all at once: strict coverage is a well-founded order, and an
/// entry's operations stay reachable through the widest entries above it.
fn without_redundant(resources: BTreeMap<String, OpSet>) -> BTreeMap<String, OpSet> {
    let redundant: Vec<String> = resources
        .iter()
        .filter(|(pattern, ops)| {
            let wider = resources
                .iter()
                .filter(|(other, _)| {
                    other != pattern
                        && pattern_covers(other, pattern)
                        && !pattern_covers(pattern, other)
                })
                .fold(OpSet::EMPTY, |acc, (_, other_ops)| acc.union(*other_ops));
            ops.is_subset_of(wider)
        })
        .map(|(pattern, _)| pattern.clone())
        .collect();
    let mut resources = resources;
    for pattern in &redundant {
        resources.remove(pattern);
    }
    resources
}

/// JavaScript's own-property order for the keys of a freshly built object whose
/// keys were inserted after `Array.prototype.sort`.
fn js_key_order(a: &str, b: &str) -> Ordering {
    match (array_index(a), array_index(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.encode_utf16().cmp(b.encode_utf16()),
    }
}

/// The value of `key` if JavaScript treats it as an array index: the canonical
/// decimal form of an integer in `0..=2^32-2`.
fn array_index(key: &str) -> Option<u32> {
    let canonical = !key.is_empty()
        && key.len() <= 10
        && key.bytes().all(|b| b.is_ascii_digit())
        && (key == "0" || !key.starts_with('0'));
    if !canonical {
        return None;
    }
    let value: u64 = key.parse().ok()?;
    u32::try_from(value).ok().filter(|v| *v != u32::MAX)
}

/// Appends `s` as a JSON string literal, escaped as `JSON.stringify` does.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl serde::Serialize for Capability {
    /// Serializes as a map in canonical order (see [`Capability::to_canonical_json`]).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.js_ordered();
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        for (pattern, ops) in entries {
            map.serialize_entry(pattern, &WireOps(ops))?;
        }
        map.end()
    }
}

struct WireOps(OpSet);

impl serde::Serialize for WireOps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let names = self.0.wire_names();
        let mut seq = serializer.serialize_seq(Some(names.len()))?;
        for name in names {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

impl<'de> serde::Deserialize<'de> for Capability {
    /// Deserializes from a map of pattern → operation names, with the bounds of
    /// [`Capability::parse`]; usable from JSON and from config formats alike.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Capability, D::Error> {
        deserializer.deserialize_map(CapabilityVisitor)
    }
}

struct CapabilityVisitor;

impl<'de> Visitor<'de> for CapabilityVisitor {
    type Value = Capability;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a capability object mapping resource names to arrays of operations")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Capability, A::Error> {
        let mut resources = BTreeMap::new();
        let mut seen = 0usize;
        while let Some(pattern) = map.next_key::<String>()? {
            // Count entries, not distinct keys, so repeated keys cannot dodge the bound.
            validate_pattern(&pattern, seen).map_err(de::Error::custom)?;
            seen += 1;
            let WireOpsIn(ops) = map.next_value()?;
            resources.insert(pattern, ops);
        }
        Ok(Capability {
            resources: resources.into(),
            text: None,
        })
    }
}

struct WireOpsIn(OpSet);

impl<'de> serde::Deserialize<'de> for WireOpsIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WireOpsIn, D::Error> {
        deserializer.deserialize_seq(WireOpsVisitor)
    }
}

struct WireOpsVisitor;

impl<'de> Visitor<'de> for WireOpsVisitor {
    type Value = WireOpsIn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of operation names")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireOpsIn, A::Error> {
        let mut ops = OpSet::EMPTY;
        let (mut count, mut star) = (0usize, false);
        while let Some(name) = seq.next_element::<String>()? {
            count += 1;
            star |= name == "*";
            // `*` stands for every operation and may not be combined with others.
            if star && count > 1 {
                return Err(de::Error::custom("\"*\" must be the only operation"));
            }
            let named = if name == "*" {
                OpSet::ALL
            } else {
                let op = Operation::from_name(&name)
                    .ok_or_else(|| de::Error::custom(format_args!("unknown operation {name:?}")))?;
                OpSet::of(op)
            };
            ops = ops.union(named);
        }
        if count == 0 {
            return Err(de::Error::custom(
                "a resource must grant at least one operation",
            ));
        }
        Ok(WireOpsIn(ops))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(capability: &str, channel: &str, op: Operation, expected: bool) {
        let parsed = Capability::parse(capability).unwrap();
        assert_eq!(
            parsed.allows(channel, op),
            expected,
            "{capability} on {channel:?} for {op}"
        );
    }

    /// The wildcard rules of ably.md §8, one row per case.
    #[test]
    fn matching_table() {
        use Operation::{Presence, Publish, Subscribe};
        let all = r#"{"*":["*"]}"#;
        check(all, "foo", Publish, true);
        check(all, "foo:bar:baz", Presence, true);
        check(all, "", Subscribe, true);
        check(all, "[meta]log", Subscribe, false);
        check(all, "[queue]app-q", Subscribe, false);
        check(all, "[?rewind=1]foo", Subscribe, true);
        check(all, "[abc", Subscribe, false);

        let ns = r#"{"ns:*":["subscribe"]}"#;
        check(ns, "ns:x", Subscribe, true);
        check(ns, "ns:x:y:z", Subscribe, true);
        check(ns, "ns:", Subscribe, true);
        check(ns, "ns", Subscribe, false);
        check(ns, "nsx:y", Subscribe, false);
        check(ns, "other:ns:x", Subscribe, false);
        check(ns, "ns:x", Publish, false);
        check(ns, "[?rewind=1]ns:x", Subscribe, true);

        let middle = r#"{"a:*:c":["publish"]}"#;
        check(middle, "a:b:c", Publish, true);
        check(middle, "a::c", Publish, true);
        check(middle, "a:b:d:c", Publish, false);
        check(middle, "a:c", Publish, false);
        check(middle, "a:b:c:d", Publish, false);

        let literal = r#"{"foo*":["publish"],"bar":["presence"]}"#;
        check(literal, "foo*", Publish, true);
        check(literal, "foobar", Publish, false);
        check(literal, "foo", Publish, false);
        check(literal, "bar", Presence, true);
        check(literal, "bar:x", Presence, false);

        let meta = r#"{"[meta]*":["subscribe"],"[*]any:*":["history"]}"#;
        check(meta, "[meta]log", Subscribe, true);
        check(meta, "[meta]log:push", Subscribe, true);
        check(meta, "log", Subscribe, false);
        check(meta, "[queue]q", Subscribe, false);
        check(meta, "[queue]any:q", Operation::History, true);
        check(meta, "any:q", Operation::History, true);
    }

    /// The operations on a channel are the union over every matching pattern.
    #[test]
    fn ops_for_unions_matches() {
        let cap = Capability::parse(r#"{"*":["subscribe"],"chat:*":["publish"]}"#).unwrap();
        let ops = cap.ops_for("chat:room");
        assert!(ops.contains(Operation::Subscribe) && ops.contains(Operation::Publish));
        assert_eq!(cap.ops_for("news"), OpSet::of(Operation::Subscribe));
    }

    /// Parsing rejects everything that is not an object of arrays of known names.
    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "null",
            "[]",
            r#"{"a":"publish"}"#,
            r#"{"a":[1]}"#,
            r#"{"a":["fly"]}"#,
            r#"{"":["*"]}"#,
            r#"{"a":["*"]"#,
        ] {
            let err = Capability::parse(bad).unwrap_err();
            assert_eq!(err.code(), 40000, "{bad:?}");
        }
    }

    /// Resource count and pattern length bounds hold, counting repeated keys.
    #[test]
    fn parse_bounds() {
        let long = format!(r#"{{"{}":["*"]}}"#, "x".repeat(PATTERN_BYTES_MAX + 1));
        assert!(Capability::parse(&long).is_err());
        let fits = format!(r#"{{"{}":["*"]}}"#, "x".repeat(PATTERN_BYTES_MAX));
        assert!(Capability::parse(&fits).is_ok());

        let many = |n: usize, distinct: bool| {
            let body: Vec<String> = (0..n)
                .map(|i| format!(r#""c{}":["publish"]"#, if distinct { i } else { 0 }))
                .collect();
            format!("{{{}}}", body.join(","))
        };
        assert!(Capability::parse(&many(RESOURCES_MAX, true)).is_ok());
        assert!(Capability::parse(&many(RESOURCES_MAX + 1, true)).is_err());
        assert!(Capability::parse(&many(RESOURCES_MAX + 1, false)).is_err());
    }

    fn canonical(json: &str) -> String {
        Capability::parse(json).unwrap().to_canonical_json()
    }

    /// Canonical JSON equals what ably-js `c14n` + `JSON.stringify` gives.
    #[test]
    fn canonical_json() {
        assert_eq!(Capability::all().to_canonical_json(), r#"{"*":["*"]}"#);
        assert_eq!(
            canonical(r#"{ "b" : ["subscribe", "publish"], "a": ["presence"] }"#),
            r#"{"a":["presence"],"b":["publish","subscribe"]}"#
        );
        // `*` stands alone, and a resource grants something (Ably refuses both).
        assert!(Capability::parse(r#"{"x":["publish","*"]}"#).is_err());
        assert!(Capability::parse(r#"{"x":["*","publish"]}"#).is_err());
        assert!(Capability::parse(r#"{"x":[]}"#).is_err());
        assert_eq!(
            canonical(r#"{"x":["subscribe","channel-metadata","history"]}"#),
            r#"{"x":["channel-metadata","history","subscribe"]}"#
        );
        // Array-index keys come first, numerically, as in any JS object.
        assert_eq!(
            canonical(r#"{"b":["*"],"10":["*"],"2":["*"],"02":["*"],"A":["*"]}"#),
            r#"{"2":["*"],"10":["*"],"02":["*"],"A":["*"],"b":["*"]}"#
        );
        // UTF-16 order puts U+1F600 (surrogate 0xD83D) before U+FF5E; byte order would not.
        assert_eq!(
            canonical(r#"{"～":["*"],"😀":["*"]}"#),
            r#"{"😀":["*"],"～":["*"]}"#
        );
        assert_eq!(
            canonical(r#"{"q\"\\\n\u0001é":["publish"]}"#),
            r#"{"q\"\\\n\u0001é":["publish"]}"#
        );
        assert_eq!(canonical("{}"), "{}");
    }

    /// Canonical JSON parses back to the same capability, and serde agrees with it.
    #[test]
    fn canonical_round_trip() {
        let cap =
            Capability::parse(r#"{"chat:*":["subscribe","presence"],"[meta]*":["*"]}"#).unwrap();
        let text = cap.to_canonical_json();
        assert_eq!(Capability::parse(&text).unwrap(), cap);
        assert_eq!(serde_json::to_string(&cap).unwrap(), text);
    }

    fn subset(a: &str, b: &str) -> bool {
        Capability::parse(a)
            .unwrap()
            .is_subset_of(&Capability::parse(b).unwrap())
    }

    /// Subset follows pattern coverage and operation inclusion.
    #[test]
    fn subset_table() {
        let all = r#"{"*":["*"]}"#;
        assert!(subset(r#"{"foo":["publish"]}"#, all));
        assert!(subset(r#"{"ns:*":["publish"]}"#, all));
        assert!(subset(all, all));
        assert!(!subset(r#"{"[meta]x":["subscribe"]}"#, all));
        assert!(subset(r#"{"ns:x":["publish"]}"#, r#"{"ns:*":["*"]}"#));
        assert!(subset(r#"{"ns:x:y":["publish"]}"#, r#"{"ns:*":["*"]}"#));
        assert!(subset(r#"{"ns:*":["publish"]}"#, r#"{"ns:*":["*"]}"#));
        assert!(!subset(r#"{"ns":["publish"]}"#, r#"{"ns:*":["*"]}"#));
        assert!(!subset(all, r#"{"ns:*":["*"]}"#));
        assert!(subset(r#"{"a:b:c":["*"]}"#, r#"{"a:*:c":["*"]}"#));
        assert!(subset(r#"{"a:*:c":["*"]}"#, r#"{"a:*":["*"]}"#));
        assert!(!subset(r#"{"a:*":["*"]}"#, r#"{"a:*:c":["*"]}"#));
        assert!(!subset(r#"{"a:*":["*"]}"#, r#"{"a:*:*":["*"]}"#));
        assert!(!subset(r#"{"foo*":["*"]}"#, r#"{"foo":["*"]}"#));
        assert!(!subset(r#"{"x:*":["*"]}"#, r#"{"x:y":["*"]}"#));
        assert!(!subset(r#"{"x":["publish"]}"#, r#"{"*":["subscribe"]}"#));
        // Operations may come from several covering patterns.
        assert!(subset(
            r#"{"chat":["publish","subscribe"]}"#,
            r#"{"*":["subscribe"],"chat":["publish"]}"#
        ));
        assert!(subset(r#"{"[meta]x":["*"]}"#, r#"{"[*]*":["*"]}"#));
        assert!(subset(r#"{"x":["*"]}"#, r#"{"[*]*":["*"]}"#));
        assert!(!subset(r#"{"[*]*":["*"]}"#, all));
    }

    fn intersect(key: &str, requested: &str) -> String {
        Capability::parse(key)
            .unwrap()
            .intersect(&Capability::parse(requested).unwrap())
            .to_canonical_json()
    }

    /// A token gets the overlap of what it asked for and what its key holds.
    #[test]
    fn intersect_table() {
        let all = r#"{"*":["*"]}"#;
        assert_eq!(
            intersect(all, r#"{"chat":["publish"]}"#),
            r#"{"chat":["publish"]}"#
        );
        assert_eq!(
            intersect(r#"{"chat:*":["publish","subscribe"]}"#, all),
            r#"{"chat:*":["publish","subscribe"]}"#
        );
        assert_eq!(
            intersect(
                r#"{"chat:*":["publish"]}"#,
                r#"{"*":["publish","presence"]}"#
            ),
            r#"{"chat:*":["publish"]}"#
        );
        assert_eq!(
            intersect(r#"{"a:*:c":["*"]}"#, r#"{"a:b:*":["subscribe"]}"#),
            r#"{"a:b:c":["subscribe"]}"#
        );
        assert_eq!(intersect(r#"{"x":["publish"]}"#, r#"{"y":["*"]}"#), "{}");
        assert_eq!(
            intersect(r#"{"x":["publish"]}"#, r#"{"x":["subscribe"]}"#),
            "{}"
        );
        assert_eq!(
            intersect(r#"{"[meta]*":["*"]}"#, r#"{"[*]*":["subscribe"]}"#),
            r#"{"[meta]*":["subscribe"]}"#
        );
        // The narrower key entry is dropped: the wider one already grants it.
        assert_eq!(
            intersect(
                r#"{"*":["*"],"chat":["publish"]}"#,
                r#"{"*":["*"],"[meta]x":["*"]}"#
            ),
            r#"{"*":["*"]}"#
        );
    }

    /// Params qualifiers are stripped; identity qualifiers are kept.
    #[test]
    fn strip_qualifier_table() {
        assert_eq!(strip_qualifier("[?rewind=1]foo"), "foo");
        assert_eq!(strip_qualifier("[?rewind=1&delta=vcdiff]a:b"), "a:b");
        assert_eq!(strip_qualifier("[meta]log"), "[meta]log");
        assert_eq!(strip_qualifier("[?broken"), "[?broken");
        assert_eq!(strip_qualifier("plain"), "plain");
    }

    /// Operation names round-trip and `OpSet::ALL` holds exactly every operation.
    #[test]
    fn operation_names() {
        for op in Operation::ALL {
            assert_eq!(Operation::from_name(op.name()), Some(op));
            assert!(OpSet::ALL.contains(op));
        }
        assert_eq!(Operation::ALL.into_iter().collect::<OpSet>(), OpSet::ALL);
        assert_eq!(Operation::from_name("*"), None);
        assert!(OpSet::EMPTY.is_empty());
    }
}
