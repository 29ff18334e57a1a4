//! Bounds the core enforces. Every map that client input can grow has one here.

use crate::log::LogLimits;

/// Limits for the channel hub. Capacities come from config (`tern-server`), never inline.
#[derive(Clone, Debug)]
pub struct CoreLimits {
    /// Channels that may exist at once per node; attach/publish beyond it fails (90000).
    pub channels_max: usize,
    /// Channels one app may have at once on this node, so one app (or one key) cannot
    /// take every channel of the node from the others (90000 beyond).
    pub channels_per_app_max: usize,
    /// Presence members per channel; an enter beyond it is refused (91003).
    pub presence_members_max: usize,
    /// How long a dropped connection's presence members stay before they leave everywhere.
    pub presence_leave_grace_ms: i64,
    /// How long an empty channel (no subscribers, no members) is kept before it is dropped.
    /// At least `connectionStateTtl`, so a cursor a client may still resume from stays valid.
    pub channel_idle_retain_ms: i64,
    /// Dropped connections remembered at once (awaiting presence expiry).
    pub dropped_connections_max: usize,
    /// Each channel's in-memory log (resume, rewind, untilAttach continuity).
    pub log: LogLimits,
    /// How long a client-supplied message id is remembered for de-duplication.
    pub idempotency_window_ms: i64,
    /// Client-supplied ids remembered per channel.
    pub idempotency_ids_max: usize,
    /// Remote events held per channel while waiting for a gap to be repaired.
    pub pending_max: usize,
}

impl Default for CoreLimits {
    fn default() -> Self {
        CoreLimits {
            channels_max: 100_000,
            channels_per_app_max: 50_000,
            presence_members_max: 20_000,
            presence_leave_grace_ms: 15_000,
            channel_idle_retain_ms: 120_000,
            dropped_connections_max: 100_000,
            log: LogLimits {
                events_max: 2_000,
                bytes_max: 8 << 20,
                age_max_ms: 120_000,
            },
            idempotency_window_ms: 120_000,
            idempotency_ids_max: 10_000,
            pending_max: 10_000,
        }
    }
}
