//! Tern functions: outbound webhooks to serverless functions (Ably's integration rules
//! for HTTP endpoints). A rule names an app's channels (a regex), event sources, a URL,
//! headers, a request mode and a signing key; every matching event this node accepted is
//! written to the rule's outbox in the history store, in the same writer queue as the
//! event, and delivered from there, at least once, in order, until a 2xx.
//!
//! # Layout
//! - [`rule`]: [`RuleConfig`] (what `[[apps.rules]]` holds), validation, channel filter.
//! - [`payload`]: Ably's webhook bodies and headers, and the `X-Ably-Signature`.
//! - [`delivery`]: one rule's batching, retries and give-up as a state machine that
//!   takes `now_ms` and returns actions (no I/O).
//! - [`outbox`]: the outbox rows in the store, the journal that writes them, recovery.
//! - [`lifecycle`]: `channel.lifecycle` / `channel.occupancy` from occupancy reports
//!   every node publishes, aggregated by one node.
//! - [`handover`]: shadow rows of other nodes' events, delivered marks for gossip, and
//!   the takeover of a dead node's webhooks.
//! - `driver`: the task per rule that runs a [`delivery::Delivery`] against the store and
//!   HTTP.
//! - [`http`]: one bounded HTTP/1.1 POST.
//! - [`hook`]: synchronous functions (before publish, `$connect`): config, verdicts,
//!   the per-connection ordering pipeline, the bounded caller.
//!
//! Architecture invariant: an event's outbox rows are queued to the store right after
//! the event's own rows, under the channel lock, so the store barrier an ACK waits on
//! covers them: an ACKed event's webhook survives `kill -9`. A row leaves the queue of
//! work only when the function answered 2xx for it (or after `retry_for_ms` of failures,
//! counted as dropped); the delivered mark is written after the 2xx, so a crash in
//! between re-sends, never skips.

pub mod delivery;
mod driver;
pub mod handover;
pub mod hook;
pub mod http;
pub mod lifecycle;
pub mod outbox;
pub mod payload;
pub mod rule;

pub use driver::spawn;
pub use handover::Placement;
pub use hook::{Hook, HookConfig, Hooks};
pub use outbox::{Outbox, OutboxJournal};
pub use rule::{Mode, Rule, RuleConfig, RuleError, SigningKey, Source};
