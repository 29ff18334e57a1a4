//! What a run did: fault, repair and ACK counts, and the largest sizes seen of the rules'
//! bounded structures (so a sweep can prove it exercised them).

/// Fault and repair counts of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub dropped: u64,
    pub duplicated: u64,
    pub gaps: u64,
    pub duplicates_seen: u64,
    pub crashes: u64,
    pub restarts: u64,
    /// Items in flight to a node that crashed before they arrived.
    pub lost_to_crash: u64,
    pub presence_changes: u64,
    /// Members removed by `node_departed` on survivors.
    pub departed_leaves: u64,
    /// Repair answers that skipped events missing from a peer's log.
    pub skips: u64,
    /// Node incarnations that booted without a subscriber.
    pub absent_subscribers: u64,
    /// Channel states (`Sync` answers) taken in by a node waiting to attach.
    pub syncs: u64,
    /// Subscribers that attached without the state (it did not come in time).
    pub warm_timeouts: u64,
    /// Events a home passed on to its region's interested nodes.
    pub relayed: u64,
    /// Events routed to a node without subscribers that was not the home, because a
    /// peer still held its previous incarnation's interest.
    pub stale_interest: u64,
    /// `Sync` answers that reached the next incarnation of the node that asked.
    pub stale_answers: u64,
    /// Channels dropped from a hub while idle (`Hub::sweep`).
    pub retired: u64,
    /// `Heads` entries a node sent a channel's new home after its view changed
    /// (`handoff`).
    pub handed_over: u64,
    /// Backfills started (a home copying a channel's stored history).
    pub backfills: u64,
    /// Events a restarted node took back from its store into its hub (`recover`).
    pub recovered: u64,
    /// Dead origins' gaps skipped after standing still (`stalls`).
    pub dead_gaps_skipped: u64,
    /// Gaps the stall table had no room to watch (`Do::StallsFull`).
    pub stalls_full: u64,
    /// Highest virtual time reached (ms).
    pub max_now_ms: i64,
    /// Publishes ACKed (`ack_replicas` met) and NACKed (timed out).
    pub acks: u64,
    pub nacks: u64,
    /// Frames sent again by the resend timer (`Hello` and events).
    pub resent: u64,
    /// Heads a node kept (`heads::shares`) and a peer would have compared.
    pub heads_unshared: u64,
    /// Heads a node shared but did not send: it and the peer agreed (`heads::Quiet`).
    pub heads_quiet: u64,
    /// Largest entry counts seen of the rules' bounded structures (see
    /// `Sim::check_bounds`): interest entries, previous heads, one resend buffer,
    /// waiting replies.
    pub max_interest: usize,
    pub max_previous_heads: usize,
    pub max_buffer: usize,
    pub max_waiters: usize,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.gaps += other.gaps;
        self.duplicates_seen += other.duplicates_seen;
        self.crashes += other.crashes;
        self.restarts += other.restarts;
        self.lost_to_crash += other.lost_to_crash;
        self.presence_changes += other.presence_changes;
        self.departed_leaves += other.departed_leaves;
        self.skips += other.skips;
        self.absent_subscribers += other.absent_subscribers;
        self.syncs += other.syncs;
        self.warm_timeouts += other.warm_timeouts;
        self.relayed += other.relayed;
        self.stale_interest += other.stale_interest;
        self.stale_answers += other.stale_answers;
        self.retired += other.retired;
        self.handed_over += other.handed_over;
        self.backfills += other.backfills;
        self.recovered += other.recovered;
        self.dead_gaps_skipped += other.dead_gaps_skipped;
        self.stalls_full += other.stalls_full;
        self.max_now_ms = self.max_now_ms.max(other.max_now_ms);
        self.acks += other.acks;
        self.nacks += other.nacks;
        self.resent += other.resent;
        self.heads_unshared += other.heads_unshared;
        self.heads_quiet += other.heads_quiet;
        self.max_interest = self.max_interest.max(other.max_interest);
        self.max_previous_heads = self.max_previous_heads.max(other.max_previous_heads);
        self.max_buffer = self.max_buffer.max(other.max_buffer);
        self.max_waiters = self.max_waiters.max(other.max_waiters);
    }
}
