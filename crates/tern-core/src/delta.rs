//! Ably channel deltas (`delta=vcdiff` channel param): a subscriber that holds a channel's
//! previous message gets the next one as a VCDIFF (RFC 3284) delta against it.
//!
//! The rules, as ably-js applies them (RTL18, PC3):
//! - a message's delta is taken against the payload of the message before it on the
//!   channel, as the client holds it: the data after the transport's own `base64` is
//!   undone (so text as its UTF-8 bytes, binary as its bytes);
//! - the delta message carries `extras.delta = {from: <base message id>, format: "vcdiff"}`,
//!   binary data and `vcdiff` appended to its encoding (JSON adds `base64` on the wire);
//! - a client checks only that the first message's `from` is the id of the last message
//!   it processed; within one frame each message's base is the message before it.
//!
//! So the delta form of an event is the same for every delta subscriber: the channel
//! builds it once, when the event is applied (only while it has delta attachments), and
//! each attachment gets it only when the last message event it received is exactly the
//! event the delta was taken against; otherwise (its first message, after a gap, after
//! its own publish with echo off, after a re-attach) it gets the full event.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use oxidelta::compress::encoder::{encode_all, CompressOptions};
use oxidelta::compress::secondary::SecondaryCompression;
use tern_protocol::{Data, Message};

use crate::cursor::OriginId;
use crate::event::ChannelEvent;

/// Where an event sits on its channel: its origin and origin sequence.
pub type Position = (OriginId, u64);

/// A channel's delta bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct DeltaState {
    /// Attachments that asked for deltas.
    attachments: usize,
    /// The channel's last message, while there are delta attachments.
    last: Option<Base>,
}

/// The message a next delta is taken against.
#[derive(Debug)]
struct Base {
    /// The event that carried it (its last message).
    at: Position,
    id: String,
    /// `None` when its data cannot be a delta base (no data, or a JSON value).
    payload: Option<Payload>,
}

/// A message's data as a client holds it once the transport's `base64` is undone.
#[derive(Clone, Debug)]
struct Payload {
    bytes: Bytes,
    /// The message's encoding without a trailing `base64` (the data is now bytes).
    encoding: Option<String>,
    /// The client holds it as text: a delta of it must say `utf-8` to turn the decoded
    /// bytes back into a string.
    text: bool,
}

impl DeltaState {
    pub(crate) fn attached(&mut self) {
        self.attachments += 1;
    }

    pub(crate) fn detached(&mut self) {
        self.attachments = self.attachments.saturating_sub(1);
        if self.attachments == 0 {
            self.last = None;
        }
    }

    /// Called for every event applied to the channel, in order: gives a MESSAGE event its
    /// delta form (when it has delta attachments and a base) and remembers its last
    /// message as the next base.
    pub(crate) fn prepare(&mut self, event: ChannelEvent) -> ChannelEvent {
        if !event.is_message() || self.attachments == 0 {
            return event;
        }
        let messages = event.frame.messages.as_deref().unwrap_or_default();
        let Some(last) = messages.last() else {
            return event;
        };
        let next = Base {
            at: (event.origin, event.seq),
            id: last.id.clone().unwrap_or_default(),
            payload: payload(last),
        };
        let variant = self.last.take().and_then(|base| variant(&event, base));
        self.last = Some(next);
        match variant {
            Some(variant) => event.with_delta(variant),
            None => event,
        }
    }
}

/// What one delta attachment needs to know: the last message event it was given.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeltaCursor {
    last: Option<Position>,
}

impl DeltaCursor {
    /// The form of `event` this attachment gets, and notes it as delivered.
    pub(crate) fn pick(&mut self, event: &Arc<ChannelEvent>) -> Arc<ChannelEvent> {
        if !event.is_message() {
            return event.clone();
        }
        let picked = match event.delta() {
            Some(delta) if self.last.is_some() && self.last == delta.base => delta.event.clone(),
            _ => event.clone(),
        };
        self.last = Some((event.origin, event.seq));
        picked
    }

    /// The attachment missed a message event (not delivered to it): the next must be full.
    pub(crate) fn missed(&mut self) {
        self.last = None;
    }
}

/// The delta form of an event and the event it was taken against.
#[derive(Debug)]
pub struct Delta {
    pub base: Option<Position>,
    pub event: Arc<ChannelEvent>,
}

/// The event with each message's data as a delta against the message before it, or
/// `None` when no message of it could be one.
fn variant(event: &ChannelEvent, base: Base) -> Option<Delta> {
    let mut frame = event.frame.clone();
    let messages = frame.messages.as_mut()?;
    let mut previous = base.payload.map(|p| (base.id, p));
    let mut any = false;
    for message in messages.iter_mut() {
        let current = payload(message);
        if let (Some((from, prev)), Some(cur)) = (&previous, &current) {
            if let Some(delta) = vcdiff(&prev.bytes, &cur.bytes) {
                into_delta(message, from, delta, cur);
                any = true;
            }
        }
        previous = current.map(|c| (message.id.clone().unwrap_or_default(), c));
    }
    any.then(|| Delta {
        base: Some(base.at),
        event: Arc::new(ChannelEvent::new(
            event.origin,
            event.seq,
            event.publisher.clone(),
            frame,
        )),
    })
}

/// `message` as a delta: binary data, `vcdiff` appended to its encoding, and
/// `extras.delta` naming the base (other extras are kept).
fn into_delta(message: &mut Message, from: &str, delta: Vec<u8>, payload: &Payload) {
    message.data = Some(Data::Binary(Bytes::from(delta)));
    let steps = payload.encoding.as_deref().into_iter();
    let steps = steps
        .chain(payload.text.then_some("utf-8"))
        .chain(["vcdiff"]);
    message.encoding = Some(steps.collect::<Vec<_>>().join("/"));
    let mut extras = match message.extras.take() {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    extras.insert(
        "delta".to_string(),
        serde_json::json!({"from": from, "format": "vcdiff"}),
    );
    message.extras = Some(serde_json::Value::Object(extras));
}

/// The message's data as the client holds it after undoing the transport's base64.
fn payload(message: &Message) -> Option<Payload> {
    let encoding = message.encoding.as_deref().filter(|e| !e.is_empty());
    match message.data.as_ref()? {
        Data::Binary(bytes) => Some(Payload {
            bytes: bytes.clone(),
            encoding: encoding.map(str::to_string),
            text: false,
        }),
        Data::String(text) => match encoding.and_then(|e| e.strip_suffix("base64")) {
            Some(rest) => Some(Payload {
                bytes: Bytes::from(STANDARD.decode(text).ok()?),
                encoding: Some(rest.trim_end_matches('/').to_string()).filter(|e| !e.is_empty()),
                text: false,
            }),
            None => Some(Payload {
                bytes: Bytes::copy_from_slice(text.as_bytes()),
                encoding: encoding.map(str::to_string),
                text: true,
            }),
        },
        Data::Json(_) => None,
    }
}

/// A VCDIFF delta that turns `source` into `target`, in the plain RFC 3284 form ably-js's
/// decoder reads (no checksum, no secondary compression).
pub fn vcdiff(source: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    let options = CompressOptions {
        checksum: false,
        secondary: SecondaryCompression::None,
        ..CompressOptions::default()
    };
    encode_all(Vec::new(), source, target, options).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxidelta::compress::decoder::decode_all;
    use tern_protocol::{action, ProtocolMessage};

    fn message_event(seq: u64, datas: &[(&str, Option<&str>)]) -> ChannelEvent {
        let messages = datas
            .iter()
            .enumerate()
            .map(|(i, (data, encoding))| Message {
                id: Some(format!("m{seq}:{i}")),
                data: Some(Data::String(data.to_string())),
                encoding: encoding.map(str::to_string),
                ..Default::default()
            })
            .collect();
        ChannelEvent::new(
            OriginId(7),
            seq,
            None,
            ProtocolMessage {
                action: action::MESSAGE,
                messages: Some(messages),
                ..Default::default()
            },
        )
    }

    fn decode(base: &[u8], message: &Message) -> Vec<u8> {
        let Some(Data::Binary(delta)) = &message.data else {
            panic!("not a delta: {message:?}");
        };
        decode_all(base, delta).expect("decodes")
    }

    /// The first event after a delta subscriber attaches has no base; the next one's
    /// delta form rebuilds it from the previous message and names that message.
    #[test]
    fn deltas_chain_from_the_previous_message() {
        let mut state = DeltaState::default();
        state.attached();
        let first = state.prepare(message_event(
            1,
            &[(r#"{"foo":"bar","count":1}"#, Some("json"))],
        ));
        assert!(first.delta().is_none());
        let second = state.prepare(message_event(
            2,
            &[
                (r#"{"foo":"bar","count":2}"#, Some("json")),
                ("plain text", None),
            ],
        ));
        let delta = second.delta().expect("a delta form");
        assert_eq!(delta.base, Some((OriginId(7), 1)));
        let messages = delta.event.frame.messages.as_ref().unwrap();
        assert_eq!(
            decode(br#"{"foo":"bar","count":1}"#, &messages[0]),
            br#"{"foo":"bar","count":2}"#
        );
        assert_eq!(messages[0].encoding.as_deref(), Some("json/utf-8/vcdiff"));
        assert_eq!(
            messages[0].extras,
            Some(serde_json::json!({"delta": {"from": "m1:0", "format": "vcdiff"}}))
        );
        // Within a frame, each message's base is the one before it.
        assert_eq!(
            decode(br#"{"foo":"bar","count":2}"#, &messages[1]),
            b"plain text"
        );
        assert_eq!(messages[1].encoding.as_deref(), Some("utf-8/vcdiff"));
        assert_eq!(
            messages[1].extras.as_ref().unwrap()["delta"]["from"],
            "m2:0"
        );
    }

    /// A base64 string is diffed as the bytes it stands for, and the delta's encoding
    /// drops that base64 (the delta itself is binary).
    #[test]
    fn base64_text_is_diffed_as_its_bytes() {
        let mut state = DeltaState::default();
        state.attached();
        state.prepare(message_event(
            1,
            &[("AAEC", Some("utf-8/cipher+aes-128-cbc/base64"))],
        ));
        let second = state.prepare(message_event(
            2,
            &[("AAED", Some("utf-8/cipher+aes-128-cbc/base64"))],
        ));
        let delta = second.delta().expect("a delta form");
        let message = &delta.event.frame.messages.as_ref().unwrap()[0];
        assert_eq!(decode(&[0, 1, 2], message), vec![0, 1, 3]);
        assert_eq!(
            message.encoding.as_deref(),
            Some("utf-8/cipher+aes-128-cbc/vcdiff")
        );
    }

    /// Without delta attachments nothing is computed or kept.
    #[test]
    fn no_delta_attachments_no_work() {
        let mut state = DeltaState::default();
        state.prepare(message_event(1, &[("a", None)]));
        assert!(state
            .prepare(message_event(2, &[("b", None)]))
            .delta()
            .is_none());
        state.attached();
        state.detached();
        assert!(state.last.is_none());
    }

    /// An attachment gets the delta form only right after the event it was taken
    /// against; after a missed event it gets the full one again.
    #[test]
    fn cursor_sends_a_delta_only_on_its_base() {
        let mut state = DeltaState::default();
        state.attached();
        let events: Vec<Arc<ChannelEvent>> = (1..=4)
            .map(|seq| {
                Arc::new(state.prepare(message_event(seq, &[(&format!("data {seq}"), None)])))
            })
            .collect();
        let mut cursor = DeltaCursor::default();
        let is_delta =
            |e: &Arc<ChannelEvent>| e.frame.messages.as_ref().unwrap()[0].extras.is_some();
        assert!(!is_delta(&cursor.pick(&events[0])));
        assert!(is_delta(&cursor.pick(&events[1])));
        cursor.missed();
        assert!(!is_delta(&cursor.pick(&events[3])));
        // A fresh cursor starting mid-stream gets a full event first.
        let mut late = DeltaCursor::default();
        assert!(!is_delta(&late.pick(&events[2])));
        assert!(is_delta(&late.pick(&events[3])));
    }
}
