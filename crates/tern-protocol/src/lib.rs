//! Tern's Ably wire types and codecs.
//!
//! Everything a Tern node puts on or takes off the wire in Ably's shape: the realtime
//! `ProtocolMessage` and what it carries (`Message`, `PresenceMessage`, `ErrorInfo`,
//! `ConnectionDetails`), the JSON and msgpack codecs for them, and the one table of Ably
//! error codes that every other crate maps its client-visible failures onto.
//!
//! The crate does no I/O and knows nothing about connections or channels: it turns bytes
//! into values and values into bytes. Decoding is total over its input: any byte string
//! yields a value or a [`DecodeError`], never a panic.
//!
//! # Layout
//!
//! - `constants`: action numbers ([`action`], [`presence_action`]) and [`flags`] bits.
//! - `error`: [`ErrorInfo`], the [`code`] table and [`status_code_for`].
//! - `data`: [`Data`], a message payload that is a string, bytes or a JSON value.
//! - `message`: [`Message`] and [`PresenceMessage`], including the JSON rule that binary
//!   data travels as base64 with `/base64` appended to its encoding.
//! - `protocol_message`: [`ProtocolMessage`], the realtime frame, and its parts.
//! - `codec`: [`Format`], [`decode`], [`encode`], [`decode_messages`], [`decode_value`],
//!   [`encode_value`].
//! - `integer`: lenient integer decoding (any msgpack width, integral floats).

mod codec;
mod constants;
mod data;
mod error;
mod integer;
mod message;
mod protocol_message;

pub use codec::{decode, decode_messages, decode_value, encode, encode_value, DecodeError, Format};
pub use constants::{action, annotation_action, flags, message_action, presence_action};
pub use data::Data;
pub use error::{code, status_code_for, ErrorInfo};
pub use message::{to_json_safe, Annotation, Message, MessageVersion, PresenceMessage};
pub use protocol_message::{AuthDetails, ConnectionDetails, ProtocolMessage, PublishResult};
