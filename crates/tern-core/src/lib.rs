//! Tern core: channels, fan-out decisions, presence, cursors and dropped-connection
//! bookkeeping. This crate does no I/O and reads no clock: callers pass `now_ms`, and
//! randomness (origin ids) comes from the caller too, so the whole core can run under a
//! deterministic simulation.
//!
//! # Layout
//! - [`cursor`]: [`OriginId`] and [`Cursor`], the per-channel vector `origin → sequence`
//!   that is encoded as the Ably `channelSerial`.
//! - [`event`]: [`ChannelEvent`], one published frame, encoded at most once per wire format
//!   and shared by every subscriber.
//! - [`delta`]: Ably channel deltas (`delta=vcdiff`): each message event's VCDIFF form,
//!   built once per event while a channel has delta subscribers.
//! - [`presence`]: [`PresenceSet`], the members of one channel and how changes merge.
//! - [`log`]: each channel's bounded recent log: resume, rewind, continuity checks.
//! - [`registry`]: [`ConnectionRegistry`], connection state parked between a transport
//!   drop and a resume, for at most `connectionStateTtl`.
//! - [`channel`]: one channel's state: subscribers, presence, cursor.
//! - [`key`]: [`ChannelKey`], a channel's identity and its home score per node.
//! - [`journal`]: [`Journal`], the hook every applied event passes (store, cluster).
//! - [`hub`]: [`Hub`], the sharded map of channels that the edge talks to.
//! - [`limits`]: [`CoreLimits`], the bounds the core enforces.
//! - [`serial`]: message serials, fixed-width text that sorts in channel order and names
//!   the message's store position.
//! - [`mutation`]: how updates, deletes and appends change a message and annotations add
//!   up to a summary (pure rules).
//!
//! The core depends on `tern-protocol` only for the payload types (`Message`,
//! `PresenceMessage`) and the frame it pre-builds for fan-out; it never parses frames (a
//! delta reads message data only as the opaque bytes a client holds).

pub mod channel;
pub mod cursor;
pub mod delta;
pub mod event;
pub mod hub;
pub mod journal;
pub mod key;
pub mod limits;
pub mod log;
pub mod mutation;
pub mod presence;
pub mod registry;
pub mod serial;

pub use channel::{AttachOptions, AttachSnapshot, ChannelStatus, RemoteEvent, RemoteOutcome};
pub use cursor::{Cursor, OriginId};
pub use event::{ChannelEvent, Publisher, Subscriber};
pub use hub::{AppChannelCount, CoreError, Hub, PublishOutcome};
pub use journal::Journal;
pub use key::ChannelKey;
pub use limits::CoreLimits;
pub use log::{LogLimits, Rewind};
pub use presence::PresenceSet;
pub use registry::{ConnectionRegistry, KeyChain, Lookup, ResumeError};
pub use serial::SerialPosition;
