//! What one publish or presence frame may carry, checked the same way for REST and
//! realtime before anything reaches the hub (so nothing over it is journaled, logged,
//! replicated or answered with a serial).
//!
//! Every client-supplied byte is counted: Ably's `maxMessageSize` counts name, clientId,
//! data and extras; we also count id and encoding (see
//! [`tern_core::event::message_bytes`]). The message count is bounded too: without it, a
//! body of 300,000 empty messages is small on the wire but expands to a huge event once
//! the server adds ids, serials and timestamps to each.

use tern_core::event::{message_size, presence_size};
use tern_protocol::{code, Annotation, ErrorInfo, Message, PresenceMessage};

use crate::config::EdgeConfig;

fn too_large(what: String) -> ErrorInfo {
    ErrorInfo::new(code::MESSAGE_TOO_LARGE, what)
}

/// Bytes of the fields a client supplies beyond Ably's message size (id, encoding):
/// with it, a message counts [`tern_core::event::message_bytes`].
fn id_and_encoding(id: Option<&String>, encoding: Option<&String>) -> usize {
    id.map_or(0, String::len) + encoding.map_or(0, String::len)
}

/// Refuses (40009) a publish with too many messages, a message id over
/// `message_id_bytes_max`, or more than `max_message_size` bytes in all. `Ok` is the
/// publish's size as Ably counts it (app statistics report it).
pub(crate) fn check_messages(
    messages: &[Message],
    config: &EdgeConfig,
) -> Result<usize, ErrorInfo> {
    let size: usize = messages.iter().map(message_size).sum();
    let supplied: usize = messages
        .iter()
        .map(|m| id_and_encoding(m.id.as_ref(), m.encoding.as_ref()) + change_bytes(m))
        .sum();
    check(
        messages.len(),
        messages.iter().map(|m| m.id.as_deref()),
        size + supplied,
        config,
    )?;
    Ok(size)
}

/// Bytes an update, delete or append carries beyond a message: the serial it names and
/// its operation (clientId, description, metadata), all stored and sent on with it.
fn change_bytes(m: &Message) -> usize {
    let version = m.version.as_ref().map_or(0, |v| {
        v.serial.as_ref().map_or(0, String::len)
            + v.client_id.as_ref().map_or(0, String::len)
            + v.description.as_ref().map_or(0, String::len)
            + v.metadata.as_ref().map_or(0, |meta| meta.to_string().len())
    });
    version
        + m.serial.as_ref().map_or(0, String::len)
        + m.annotations.as_ref().map_or(0, |a| a.to_string().len())
}

/// As [`check_messages`], for the annotations of one publish: every field a client
/// supplies counts (type, name, clientId, data, extras, id, encoding, messageSerial).
pub(crate) fn check_annotations(
    annotations: &[Annotation],
    config: &EdgeConfig,
) -> Result<usize, ErrorInfo> {
    let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
    let size: usize = annotations
        .iter()
        .map(|a| {
            text(&a.kind)
                + text(&a.name)
                + text(&a.client_id)
                + a.data.as_ref().map_or(0, |d| {
                    tern_core::event::message_size(&Message {
                        data: Some(d.clone()),
                        ..Default::default()
                    })
                })
                + a.extras.as_ref().map_or(0, |e| e.to_string().len())
        })
        .sum();
    let supplied: usize = annotations
        .iter()
        .map(|a| id_and_encoding(a.id.as_ref(), a.encoding.as_ref()) + text(&a.message_serial))
        .sum();
    check(
        annotations.len(),
        annotations.iter().map(|a| a.id.as_deref()),
        size + supplied,
        config,
    )?;
    Ok(size)
}

/// As [`check_messages`], for the presence messages of one PRESENCE frame.
pub(crate) fn check_presence(
    changes: &[PresenceMessage],
    config: &EdgeConfig,
) -> Result<usize, ErrorInfo> {
    let size: usize = changes.iter().map(presence_size).sum();
    let supplied: usize = changes
        .iter()
        .map(|p| id_and_encoding(p.id.as_ref(), p.encoding.as_ref()))
        .sum();
    check(
        changes.len(),
        changes.iter().map(|p| p.id.as_deref()),
        size + supplied,
        config,
    )?;
    Ok(size)
}

fn check<'a>(
    count: usize,
    mut ids: impl Iterator<Item = Option<&'a str>>,
    size: usize,
    config: &EdgeConfig,
) -> Result<(), ErrorInfo> {
    if count > config.messages_per_publish_max {
        return Err(too_large(format!(
            "too many messages in one publish ({count} > {})",
            config.messages_per_publish_max
        )));
    }
    if ids.any(|id| id.is_some_and(|id| id.len() > config.message_id_bytes_max)) {
        return Err(too_large(format!(
            "message id longer than {} bytes",
            config.message_id_bytes_max
        )));
    }
    if size > config.max_message_size {
        return Err(too_large(format!(
            "maximum message length exceeded ({size} > {} bytes)",
            config.max_message_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::Data;

    fn config() -> EdgeConfig {
        EdgeConfig {
            max_message_size: 100,
            messages_per_publish_max: 3,
            message_id_bytes_max: 8,
            ..Default::default()
        }
    }

    fn message(f: impl FnOnce(&mut Message)) -> Message {
        let mut m = Message::default();
        f(&mut m);
        m
    }

    /// Each client-supplied field counts, and so does the number of messages.
    #[test]
    fn every_supplied_byte_and_the_count_are_bounded() {
        let c = config();
        let ok = |ms: &[Message]| check_messages(ms, &c).is_ok();
        let code_of = |ms: &[Message]| check_messages(ms, &c).unwrap_err().code;
        assert!(ok(&[message(
            |m| m.data = Some(Data::String("x".repeat(100)))
        )]));
        assert_eq!(
            code_of(&[message(|m| m.data = Some(Data::String("x".repeat(101))))]),
            40009
        );
        assert_eq!(
            code_of(&[message(|m| m.name = Some("n".repeat(101)))]),
            40009
        );
        assert_eq!(
            code_of(&[message(|m| m.client_id = Some("c".repeat(101)))]),
            40009
        );
        assert_eq!(
            code_of(&[message(|m| m.encoding = Some("e".repeat(101)))]),
            40009
        );
        assert_eq!(
            code_of(&[message(
                |m| m.extras = Some(serde_json::json!({"k": "v".repeat(100)}))
            )]),
            40009
        );
        assert!(ok(&[message(|m| m.id = Some("12345678".into()))]));
        assert_eq!(
            code_of(&[message(|m| m.id = Some("123456789".into()))]),
            40009
        );
        assert!(ok(&vec![Message::default(); 3]));
        assert_eq!(code_of(&vec![Message::default(); 4]), 40009);
        // Split over several messages, the total still counts.
        let half = || message(|m| m.data = Some(Data::String("x".repeat(60))));
        assert_eq!(code_of(&[half(), half()]), 40009);
    }

    /// What passes is reported at Ably's size (name, clientId, data, extras), without
    /// the id and encoding that still count against the limit.
    #[test]
    fn reports_ablys_size() {
        let c = config();
        let m = message(|m| {
            m.name = Some("nm".into());
            m.data = Some(Data::String("data".into()));
            m.id = Some("id".into());
            m.encoding = Some("utf-8".into());
        });
        assert_eq!(check_messages(&[m.clone(), m], &c), Ok(12));
        let p = PresenceMessage {
            client_id: Some("cid".into()),
            id: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(check_presence(&[p], &c), Ok(3));
    }

    /// Presence messages are bounded the same way.
    #[test]
    fn presence_is_bounded_like_messages() {
        let c = config();
        let member = |f: fn(&mut PresenceMessage)| {
            let mut p = PresenceMessage::default();
            f(&mut p);
            p
        };
        assert!(check_presence(&[member(|p| p.id = Some("a".into()))], &c).is_ok());
        for p in [
            member(|p| p.id = Some("i".repeat(9))),
            member(|p| p.encoding = Some("e".repeat(101))),
            member(|p| p.client_id = Some("c".repeat(101))),
        ] {
            assert_eq!(check_presence(&[p], &c).unwrap_err().code, 40009);
        }
        assert_eq!(
            check_presence(&vec![PresenceMessage::default(); 4], &c)
                .unwrap_err()
                .code,
            40009
        );
    }

    /// An update's operation and the serial it names count like the message's own fields,
    /// and so does every field of an annotation.
    #[test]
    fn changes_and_annotations_are_counted() {
        let c = config();
        let change = |description: &str| {
            message(|m| {
                m.serial = Some("s".repeat(10));
                m.version = Some(tern_protocol::MessageVersion {
                    description: Some(description.into()),
                    metadata: Some(serde_json::json!({"k": "v"})),
                    ..Default::default()
                });
            })
        };
        assert!(check_messages(&[change(&"d".repeat(60))], &c).is_ok());
        assert_eq!(
            check_messages(&[change(&"d".repeat(90))], &c)
                .unwrap_err()
                .code,
            code::MESSAGE_TOO_LARGE
        );
        let annotation = |name: &str| Annotation {
            kind: Some("reaction:distinct.v1".into()),
            name: Some(name.into()),
            message_serial: Some("s".repeat(10)),
            ..Default::default()
        };
        assert!(check_annotations(&[annotation("👍")], &c).is_ok());
        assert_eq!(
            check_annotations(&[annotation(&"x".repeat(75))], &c)
                .unwrap_err()
                .code,
            code::MESSAGE_TOO_LARGE
        );
        let four = vec![annotation("a"); 4];
        assert_eq!(
            check_annotations(&four, &c).unwrap_err().code,
            code::MESSAGE_TOO_LARGE
        );
    }
}
