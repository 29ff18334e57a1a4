//! Mutable messages and annotations: the rules, with no I/O.
//!
//! A message is published once (`message.create`) and then changed by events of its
//! own: `message.update` and `message.delete` carry the whole new version,
//! `message.append` carries only the data to append, `message.summary` the annotation
//! summary. Each change is a channel event like any other (journaled, replicated,
//! delivered), whose message keeps the changed message's `serial` and gets its own
//! `version.serial`. The latest version of a message is the original folded with its
//! changes in `version.serial` order ([`latest`]); since serials are the same on every
//! node, so is the latest version, whichever order the changes arrived in.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};
use tern_protocol::{annotation_action, message_action, Annotation, Data, Message};

/// Why a change cannot apply to a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutationError {
    /// An append whose data is not of the message's kind (text onto text, bytes onto
    /// bytes, with the same encoding).
    #[error("appended data must be of the same type and encoding as the message's data")]
    AppendMismatch,
}

/// True for the actions that change an existing message (update, delete, append,
/// summary), whose `serial` names that message.
pub fn is_change(action: Option<u8>) -> bool {
    matches!(
        action,
        Some(
            message_action::UPDATE
                | message_action::DELETE
                | message_action::APPEND
                | message_action::SUMMARY
        )
    )
}

/// The message subscribers receive (and every store keeps) for a client's `change` to
/// the message whose latest version is `latest`: the message's identity (serial,
/// first timestamp, publisher), the fields the change gives and otherwise the latest
/// ones. An append carries only the appended data. `version` is the change's; the
/// caller (the core, on publish) fills its serial and timestamp.
pub fn apply_change(latest: &Message, change: Message) -> Result<Message, MutationError> {
    let action = change.action.unwrap_or(message_action::UPDATE);
    let (data, encoding) = if action == message_action::APPEND {
        if concat(
            latest.data.as_ref(),
            latest.encoding.as_deref(),
            change.data.as_ref(),
            change.encoding.as_deref(),
        )
        .is_none()
        {
            return Err(MutationError::AppendMismatch);
        }
        (change.data, change.encoding)
    } else if change.data.is_some() {
        (change.data, change.encoding)
    } else {
        (latest.data.clone(), latest.encoding.clone())
    };
    Ok(Message {
        id: change.id,
        client_id: latest.client_id.clone(),
        connection_id: latest.connection_id.clone(),
        connection_key: None,
        name: change.name.or_else(|| latest.name.clone()),
        data,
        encoding,
        extras: change.extras.or_else(|| latest.extras.clone()),
        timestamp: latest.timestamp,
        action: Some(action),
        serial: latest.serial.clone(),
        version: change.version,
        annotations: None,
    })
}

/// `latest` with one more stored change applied. Updates and deletes replace it (they
/// carry the whole version); an append adds its data and reads back as an update; a
/// summary replaces only the annotation summary.
pub fn fold(latest: Message, next: &Message) -> Message {
    match next.action {
        Some(message_action::SUMMARY) => Message {
            annotations: next.annotations.clone(),
            ..latest
        },
        Some(message_action::APPEND) => {
            let data = concat(
                latest.data.as_ref(),
                latest.encoding.as_deref(),
                next.data.as_ref(),
                next.encoding.as_deref(),
            );
            Message {
                // A mismatch was refused when the append was made; one that raced with
                // an update of another type is dropped the same way on every node.
                data: data.unwrap_or(latest.data),
                action: Some(message_action::UPDATE),
                version: next.version.clone(),
                ..latest
            }
        }
        _ => Message {
            annotations: latest.annotations.clone(),
            ..next.clone()
        },
    }
}

fn concat(
    base: Option<&Data>,
    base_encoding: Option<&str>,
    tail: Option<&Data>,
    tail_encoding: Option<&str>,
) -> Option<Option<Data>> {
    if base_encoding.unwrap_or_default() != tail_encoding.unwrap_or_default() {
        return None;
    }
    match (base, tail) {
        (_, None) => Some(base.cloned()),
        (None, Some(tail)) => Some(Some(tail.clone())),
        (Some(Data::String(a)), Some(Data::String(b))) => {
            Some(Some(Data::String(format!("{a}{b}"))))
        }
        (Some(Data::Binary(a)), Some(Data::Binary(b))) => {
            let mut joined = Vec::with_capacity(a.len() + b.len());
            joined.extend_from_slice(a);
            joined.extend_from_slice(b);
            Some(Some(Data::Binary(joined.into())))
        }
        _ => None,
    }
}

/// Sorts changes into the order they apply in: by `version.serial`, duplicates (the
/// same change from the log and the store) dropped.
pub fn order_changes(changes: &mut Vec<Message>) {
    let key = |m: &Message| {
        m.version
            .as_ref()
            .and_then(|v| v.serial.clone())
            .unwrap_or_default()
    };
    changes.sort_by_key(key);
    changes.dedup_by(|a, b| key(a) == key(b));
}

/// The latest version of `original` after `changes` (in any order).
pub fn latest(original: Message, mut changes: Vec<Message>) -> Message {
    order_changes(&mut changes);
    changes.iter().fold(original, fold)
}

/// Every version of `original`, oldest first: the original, then the message as each
/// update, delete or append left it (summaries are not versions).
pub fn versions(original: Message, mut changes: Vec<Message>) -> Vec<Message> {
    order_changes(&mut changes);
    let mut out = vec![original.clone()];
    let mut current = original;
    for change in &changes {
        current = fold(current, change);
        if change.action != Some(message_action::SUMMARY) {
            out.push(current.clone());
        }
    }
    out
}

/// The summary of a message's annotations (`{type: …}`, the value of
/// `annotations.summary`), from its annotations in serial order. Aggregations follow
/// Ably's: `distinct.v1` (each client once per name), `unique.v1` (each client on one
/// name), `multiple.v1` (counts per client), `flag.v1` (clients), `total.v1` (a count).
/// Deletes withdraw the client's earlier annotations; unknown aggregations are left out.
pub fn summarize(annotations: &[Annotation]) -> Value {
    let mut by_type: BTreeMap<&str, Vec<&Annotation>> = BTreeMap::new();
    for annotation in annotations {
        if let Some(kind) = annotation.kind.as_deref() {
            by_type.entry(kind).or_default().push(annotation);
        }
    }
    let mut summary = Map::new();
    for (kind, items) in by_type {
        let aggregation = kind.rsplit_once(':').map_or(kind, |(_, a)| a);
        let value = match aggregation {
            "distinct.v1" => names_to_clients(&items, false),
            "unique.v1" => names_to_clients(&items, true),
            "multiple.v1" => multiple(&items),
            "flag.v1" => flag(&items),
            "total.v1" => {
                json!({ "total": items.iter().map(|a| if is_delete(a) { -1 } else { 1 }).sum::<i64>().max(0) })
            }
            _ => continue,
        };
        summary.insert(kind.to_string(), value);
    }
    Value::Object(summary)
}

fn is_delete(annotation: &Annotation) -> bool {
    annotation.action == Some(annotation_action::DELETE)
}

/// `distinct.v1` / `unique.v1`: name → the clients on it.
fn names_to_clients(items: &[&Annotation], one_name_per_client: bool) -> Value {
    let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut first_seen: Vec<&str> = Vec::new();
    for a in items {
        let (Some(client), Some(name)) = (a.client_id.as_deref(), a.name.as_deref()) else {
            continue;
        };
        if is_delete(a) {
            if let Some(clients) = names.get_mut(name) {
                clients.remove(client);
            }
            continue;
        }
        if one_name_per_client {
            for clients in names.values_mut() {
                clients.remove(client);
            }
        }
        if !names.contains_key(name) {
            first_seen.push(name);
        }
        names.entry(name).or_default().insert(client);
    }
    let mut out = Map::new();
    for name in first_seen {
        let clients = &names[name];
        if !clients.is_empty() {
            out.insert(
                name.to_string(),
                json!({ "total": clients.len(), "clientIds": clients, "clipped": false }),
            );
        }
    }
    Value::Object(out)
}

fn multiple(items: &[&Annotation]) -> Value {
    let mut names: BTreeMap<&str, (BTreeMap<&str, i64>, i64)> = BTreeMap::new();
    for a in items {
        let Some(name) = a.name.as_deref() else {
            continue;
        };
        let (clients, unidentified) = names.entry(name).or_default();
        match (a.client_id.as_deref(), is_delete(a)) {
            (Some(client), true) => {
                clients.remove(client);
            }
            (Some(client), false) => {
                *clients.entry(client).or_default() += a.count.unwrap_or(1).max(0)
            }
            (None, false) => *unidentified += a.count.unwrap_or(1).max(0),
            (None, true) => {}
        }
    }
    let mut out = Map::new();
    for (name, (clients, unidentified)) in names {
        let total = clients.values().sum::<i64>() + unidentified;
        if total > 0 {
            out.insert(
                name.to_string(),
                json!({ "total": total, "clientIds": clients, "totalUnidentified": unidentified, "totalClientIds": clients.len(), "clipped": false }),
            );
        }
    }
    Value::Object(out)
}

fn flag(items: &[&Annotation]) -> Value {
    let mut clients: BTreeSet<&str> = BTreeSet::new();
    for a in items {
        let Some(client) = a.client_id.as_deref() else {
            continue;
        };
        if is_delete(a) {
            clients.remove(client);
        } else {
            clients.insert(client);
        }
    }
    json!({ "total": clients.len(), "clientIds": clients, "clipped": false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::MessageVersion;

    fn original() -> Message {
        Message {
            id: Some("p:0".into()),
            client_id: Some("author".into()),
            name: Some("greeting".into()),
            data: Some(Data::String("Hello".into())),
            timestamp: Some(100),
            action: Some(message_action::CREATE),
            serial: Some("s0".into()),
            ..Default::default()
        }
    }

    fn change(action: u8, data: &str, version: &str) -> Message {
        Message {
            action: Some(action),
            data: Some(Data::String(data.into())),
            serial: Some("s0".into()),
            version: Some(MessageVersion {
                serial: Some(version.into()),
                client_id: Some("editor".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An update keeps the message's identity and the fields it does not give.
    #[test]
    fn update_keeps_identity_and_missing_fields() {
        let made = apply_change(&original(), change(message_action::UPDATE, "Hi", "v1")).unwrap();
        assert_eq!(made.serial.as_deref(), Some("s0"));
        assert_eq!(made.name.as_deref(), Some("greeting"));
        assert_eq!(made.client_id.as_deref(), Some("author"));
        assert_eq!(made.timestamp, Some(100));
        assert_eq!(made.data, Some(Data::String("Hi".into())));
        assert_eq!(made.action, Some(message_action::UPDATE));
        assert_eq!(latest(original(), vec![made.clone()]), made);
    }

    /// Appends are delivered as fragments but read back joined, as an update with the
    /// last append's version, in version order whatever order they arrived in.
    #[test]
    fn appends_join_in_version_order() {
        let a = apply_change(&original(), change(message_action::APPEND, " wide", "v2")).unwrap();
        let b = apply_change(&original(), change(message_action::APPEND, " world", "v1")).unwrap();
        assert_eq!(a.data, Some(Data::String(" wide".into())));
        assert_eq!(a.action, Some(message_action::APPEND));
        let joined = latest(original(), vec![a.clone(), b.clone(), a.clone()]);
        assert_eq!(joined.data, Some(Data::String("Hello world wide".into())));
        assert_eq!(joined.action, Some(message_action::UPDATE));
        assert_eq!(joined.version.unwrap().serial.as_deref(), Some("v2"));
        let all = versions(original(), vec![a, b]);
        let actions: Vec<_> = all.iter().map(|m| m.action).collect();
        assert_eq!(actions, [Some(0), Some(1), Some(1)]);
    }

    /// Appending text to bytes (or with another encoding) is refused.
    #[test]
    fn append_mismatch_is_refused() {
        let mut bytes = original();
        bytes.data = Some(Data::Binary(vec![1u8].into()));
        assert_eq!(
            apply_change(&bytes, change(message_action::APPEND, "x", "v1")),
            Err(MutationError::AppendMismatch)
        );
        let mut json = change(message_action::APPEND, "{}", "v1");
        json.encoding = Some("json".into());
        assert_eq!(
            apply_change(&original(), json),
            Err(MutationError::AppendMismatch)
        );
    }

    /// A delete is a version like an update; a later summary keeps it and adds counts.
    #[test]
    fn delete_then_summary() {
        let deleted = apply_change(&original(), change(message_action::DELETE, "", "v1")).unwrap();
        let summary = Message {
            action: Some(message_action::SUMMARY),
            annotations: Some(json!({"summary": {}})),
            version: Some(MessageVersion {
                serial: Some("v2".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = latest(original(), vec![summary, deleted]);
        assert_eq!(now.action, Some(message_action::DELETE));
        assert_eq!(now.annotations, Some(json!({"summary": {}})));
        assert_eq!(versions(original(), vec![]).len(), 1);
    }

    fn annotation(kind: &str, name: &str, client: &str, action: u8) -> Annotation {
        Annotation {
            action: Some(action),
            kind: Some(kind.into()),
            name: Some(name.into()),
            client_id: Some(client.into()),
            ..Default::default()
        }
    }

    /// Each aggregation counts as Ably documents it, deletes included.
    #[test]
    fn summaries_by_aggregation() {
        let d = "reaction:distinct.v1";
        let u = "vote:unique.v1";
        let items = vec![
            annotation(d, "👍", "a", 0),
            annotation(d, "👍", "a", 0),
            annotation(d, "👍", "b", 0),
            annotation(d, "😕", "a", 0),
            annotation(d, "😕", "a", 1),
            annotation(u, "yes", "a", 0),
            annotation(u, "no", "a", 0),
            annotation("f:flag.v1", "", "a", 0),
            annotation("t:total.v1", "", "a", 0),
            annotation("t:total.v1", "", "b", 0),
            Annotation {
                count: Some(3),
                ..annotation("m:multiple.v1", "x", "a", 0)
            },
            annotation("m:multiple.v1", "x", "b", 0),
            annotation("other:whatever.v9", "x", "a", 0),
        ];
        assert_eq!(
            summarize(&items),
            json!({
                d: {"👍": {"total": 2, "clientIds": ["a", "b"], "clipped": false}},
                u: {"no": {"total": 1, "clientIds": ["a"], "clipped": false}},
                "f:flag.v1": {"total": 1, "clientIds": ["a"], "clipped": false},
                "t:total.v1": {"total": 2},
                "m:multiple.v1": {"x": {"total": 4, "clientIds": {"a": 3, "b": 1}, "totalUnidentified": 0, "totalClientIds": 2, "clipped": false}},
            })
        );
    }
}
