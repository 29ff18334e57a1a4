//! Deterministic simulation of several Tern nodes over `tern-core`: one seeded event
//! queue, virtual time, and a network that delays, drops, duplicates, reorders and
//! partitions, with nodes that crash, restart and join, and clocks that disagree.
//! Test-only; never part of the binary.
//!
//! Two shapes ([`Shape`]): one channel on 2 to 6 nodes (`tests/seeds.rs`, the sweep), and
//! many channels on many nodes (`tests/scaled.rs`: 3 regions × 10 nodes, 1,000 or 10,000
//! channels, 300 or 1,000 subscriptions spread over the nodes and drawn again on each
//! restart, two nodes that join late, churn, and the control bytes of `Heads` and
//! `Interest` measured per node).
//!
//! # Layout
//! - [`Rng`]: a small seeded generator (splitmix64), so a seed replays exactly.
//! - [`Sim`] (`cluster.rs`): the nodes, what each sees of the others (homes, remembered
//!   per channel and node set), routing of what a hub journals.
//! - `workload.rs`: publish, presence, crash, restart (and join).
//! - `node.rs`: one node incarnation (its `Hub`, recording subscriber, clients), boot and
//!   attach.
//! - `network.rs`: the in-flight queue and the faulty network, and each node taking in
//!   what reaches it.
//! - `replicate.rs`: interest, `Sync`, gap repair and `Heads`, each by the shipped rule.
//! - `acked.rs`: links, resend buffers and `ack_replicas` waiters.
//! - `invariants.rs`: the checks after every step, on the rules' bounds, and after heal.
//! - `stats.rs`: what a run did ([`Stats`]).
//!
//! # The rules are the shipped ones
//! Routing (homes, recipients, interest with its TTL), repair answers, `Sync` answers
//! and `Heads` anti-entropy are `tern-replication`'s functions, the ones `tern-cluster`'s
//! replicator drives: this crate has no copy of them, only the network, the clock, the
//! faults and the checks around them. A bug in a rule fails a seed here. What a frame
//! does, and in what order, is written once too: an item that reaches a node goes
//! through `tern_replication::receive` (events, `Heads`, `Skip`, `Sync` answers) or
//! `repair::plan`/`finish` (a `Repair`), as the driver's frames do, and `carry_out`
//! does for each `receive::Do` what the driver's `carry_out` does, with items in flight
//! instead of frames.
//!
//! # What it models of the cluster (`tern-cluster`'s replicator and membership)
//! - Regions: every node has one (the caller passes them; the sweep puts 1 to 3 nodes in
//!   each of 2 or 3 regions of `regions/topology.toml`, 1 ms apart inside a region). The
//!   channel's *home* in a region is `routing::home_in` (the rendezvous hash of app,
//!   channel and node id, ties by node id; a node keeps its id `n<index>` across restarts) among the nodes the observer counts live: those up, and crashed
//!   ones whose departure it has not noticed yet (it routes to them, and what it sends
//!   is lost).
//! - Clocks: each node's runs ahead of the simulation's by a fixed offset in
//!   `0..=Faults::skew_ms` (2 s in both tests): its hub stamps with it and its rules
//!   (interest TTL, waiters, resend buffer) take it for now.
//! - Subscribers: with one channel, each incarnation has one with probability 65%; with
//!   many, each has `subscriptions / nodes` on random channels. A node with one tells
//!   the nodes of its region (`Interest`, repeated each anti-entropy round, forgotten
//!   7 s after it was last heard, kept per node id as the replicator does, so a peer may
//!   still route to a restarted node's new incarnation on its predecessor's interest).
//!   The home attaches its subscriber at once; any other node first sends `Interest`
//!   and asks the region's home for the channel state (`Sync`; the home counts the
//!   interest first, as it comes first on the same link) and attaches when the answer
//!   (its log per origin as a repair answer from 1, a `Skip` for what its log starts
//!   after, its presence members, then its cursor, skipped to: `Synced`) arrives, asking
//!   again each second and attaching without it after 3 s.
//! - Routing (`routing::recipients`, over the node's view): every event a hub applies is journaled; its own go to the
//!   channel's home in every region the node knows a live node of and to the nodes of its
//!   region whose interest it holds; an event of a live origin of another region applied
//!   by the home of this region goes on to the interested nodes of this region; nothing
//!   else is sent (an interested node, or a home's copy of its own region's events,
//!   passes nothing on).
//! - An event ahead of a gap asks the node it came from for the missing range; the answer
//!   is the events still in that node's log, with a `Skip` where its cursor covers what
//!   its log lacks (events that were no-ops there, or a log dropped while idle), before,
//!   between or after them: `repair::answer`. The answer travels as one item, its parts
//!   in order, as the driver's control queue writes them on one link.
//! - History backfill (`backfill.rs`): a home that hears of a channel by `Heads` with
//!   nothing of it in memory and a store that does not cover the sender's cursor, or
//!   that takes a `Skip`, copies another region's home's store (`backfill::source`,
//!   `covers`, `Backfills`), asking again for a page not answered in time.
//! - Anti-entropy (`Heads`, `heads::wanted`): a node that keeps the channel (it has a subscriber, attached
//!   or waiting for the state, or it is the home of its region in its view) compares its
//!   cursor with each reachable peer's and asks that peer for the events it lacks of
//!   origins it does not believe live (a crashed incarnation's, its own previous one's),
//!   and of the peer's own events those the peer already had in its previous heads
//!   (newer ones may still be on their way); a live third origin's events come from that
//!   origin or the home's relay. A node that does not keep the channel ignores heads.
//! - Crash: the node loses its hub; items in flight to it are lost (what it sent before
//!   is on the wire and still arrives); it sends nothing while down. Each node up at the
//!   time learns of the departure after a failure-detection delay and then calls
//!   `hub.node_departed(tag + "-")` (the dead incarnation's connection ids) and treats
//!   the origin as dead (and no longer as a possible home). A node crashes only once
//!   membership has settled: every survivor noticed the previous crash, and
//!   `Faults::settle_ms` passed since the last crash or restart (see "Known limit"
//!   below).
//! - Restart: a new incarnation with a new origin id (never the old sequence space),
//!   a new connection-id tag, an empty hub and maybe a subscriber (attached as above,
//!   through `Sync` unless it is the home); if it keeps the channel it catches up from
//!   peers' heads. Like the real membership, it does not notice departures of
//!   incarnations it did not see live, but it learns them (its own previous one
//!   included) from the departed tags members publish: a node that notices a departure
//!   reports it to every member within `GOSSIP_SPREAD_MS`, and a restarted node gets
//!   every tag reported so far (the sim keeps that list even when every reporter has
//!   crashed since; the real one lives on the members). Every node sees a restarted node
//!   at once (gossip's delay in spreading a join is not modeled).
//!
//! Links (`acked.rs`): routed events carry link positions and wait in the shipped resend
//! buffer until `Stored`; each anti-entropy round resends a stalled link (go-back-N),
//! and publishes wait for `ack_replicas` in the shipped waiters.
//!
//! `Heads` as the driver sends them (`replicate.rs`): each node lists the channels its
//! hub holds (`Hub::cursors`, at most `HEADS_CHANNELS_MAX`) and sends each peer those it
//! shares with it (`heads::shares` in the sender's view); a [`Sizer`] (the test passes
//! `tern_cluster::wire`'s encoder) measures the bytes of each `Heads` and `Interest` frame
//! a node sends.
//!
//! The history store is a node's stored message ids, cursor and events (`node::Stored`,
//! fed by the journal); it survives a restart only with `Shape::durable_store` (off by
//! default: a restarted node starts with an empty store, as with the memory history; the
//! sweep turns it on in seeds 3 mod 4). With it, a restarted node takes its earlier
//! incarnations' recent stored events back into its hub (`recover`), as the server does.
//!
//! Not modeled: ordered QUIC streams (the network here loses and reorders every kind of
//! message, `Hello`, `Stored`, interest, `Sync` and its answer included, and only resends,
//! repair, heads, the interest refresh and asking again bring them back; a repair answer
//! and a `Sync` answer are each one item), a store commit before `Stored`, a subscriber's
//! last detach (`Interest` off), forwarded reads, gossip itself.
//!
//! # Known limit (crash cascades)
//! A LEAVE that was a no-op on a node is not in that node's log, and a node removes a
//! dead incarnation's members only once it noticed or was told of the departure. The
//! sweep keeps crashes `settle_ms` apart so that each departure is noticed before the
//! next crash; without that spacing (`settle_ms: 0`) a few seeds used to keep a member.
//!
//! # An answer to the previous incarnation
//! A home answers a `Sync` to the node id that asked; when that node restarted while the
//! request was in flight, the answer reaches the new incarnation. Applied, it made the
//! node hold a channel it neither subscribes to nor is the home of (the scaled run, seed
//! 1000 at 10,000 channels: "node 12 (n12i1) has no subscriber and was never the home,
//! yet holds origin …'s events"). The replicator now drops `SyncMembers`, `Synced` and
//! link-less events for a channel it does not keep, and so does the sim: both ask
//! `tern_replication::inbound` (counted in `Stats::stale_answers` when the answer was its
//! predecessor's). The same rule has a `Skip` for a kept channel open it (a home that
//! dropped the channel while idle recorded it nowhere and asked again every round).
//!
//! # Invariants
//! After every step ([`Sim::check_step`]), for each subscriber *incarnation*:
//! - per origin, events arrive in strictly increasing sequence order (no duplicate
//!   event), and no MESSAGE event is skipped, except messages published before this
//!   incarnation attached (they are in the state it attached to, or a restarted node may
//!   only find a peer's trimmed log). PRESENCE events may be skipped: one that changed
//!   nothing on a node is not fanned out there, nor logged, so a repair from that node
//!   skips it;
//! - no message id arrives twice;
//! - each channel's pending (out-of-order) events and log stay within `CoreLimits`;
//! - routing never sends to a node without a subscriber that is not the home in the
//!   sender's view, except on interest the sender still holds from that node's
//!   *previous* incarnation (counted in `Stats::stale_interest`);
//! - the rules' structures stay within their named bounds: each resend buffer within
//!   `PEER_BUFFER_MAX`, no reply waiting past twice `REPLICA_ACK_TIMEOUT`; and, at each
//!   `Heads` round (after the interest expiry the driver's tick does), each node's
//!   `routing::Interest` within `INTEREST_MAX` and within the (peer, channel) pairs its
//!   region's peers subscribed to in incarnations alive within `INTEREST_TTL` plus one
//!   network delay, each link's `PreviousHeads` within `4 × HEADS_CHANNELS_MAX`
//!   (`Stats::max_*` record the largest seen).
//!
//! After healing and draining ([`Sim::check_converged`]), for every channel that had an
//! event or a subscriber, over the live nodes that keep the channel (those with an attached subscriber, and each region's home among the live
//! nodes):
//! - every one has exactly the same set of messages (for a subscriber: what it was
//!   delivered plus what its hub held when it attached; for a home, with or without a
//!   subscriber: its store), and that set contains every message published by a live
//!   incarnation and every message of a crashed incarnation that a still-live survivor
//!   had applied when it crashed. Where nodes drop idle channels, a subscriber is owed
//!   only the messages published after it attached (a client attaching late gets the
//!   earlier ones from history, which the homes' stores must hold);
//! - every one has the same presence members (clientId, connectionId, data), equal to
//!   what the clients of every live node (subscribers or not) entered and did not leave;
//!   no crashed incarnation's connection is left in it;
//! - a live node that has no subscriber, was never its region's home since it booted,
//!   and got no event on a predecessor's interest or `Sync` holds no event of any origin
//!   but its own: the routing sent it nothing, and it asked for nothing.
//!
//! The sweep then makes the network lossless ([`Sim::calm`]), repeats interest, has every
//! live node publish once more and checks convergence again with no anti-entropy round:
//! routing alone (origin to homes and interested nodes, home relay, gap repair) must
//! bring those messages everywhere. `Heads` alone would repair a missing relay or home,
//! so only this phase shows one.
//!
//! # What the sweep found in the real rules (fixed)
//! - `Hub::skip_remote` dropped the pending events it skipped over instead of applying
//!   them, and `Synced` skips to the home's cursor. A home's log has holes where an event
//!   was a no-op there (a LEAVE of a member `node_departed` had already removed); its
//!   `Sync` answer sends the events after the hole, which wait behind it on the syncing
//!   node, and `Synced` moved the cursor past them and discarded them (seeds 52, 366).
//!   Now the waiting events apply first.
//! - A restarted node keeping its previous incarnation's presence member (seeds 76,
//!   491): the sim did not model the departed tags the real membership gossips to
//!   members that did not see an incarnation live; now it does (see Restart).
//! - A presence member lost at scale (`tests/scaled.rs`, seed 255 at 3 × 3 nodes, 200
//!   channels): a `Sync` answer opened with a `Skip` the asker (holding nothing of the
//!   channel yet) ignored, so an ENTER waited until after the members were seeded,
//!   changed nothing, was not logged, and a node repairing from the asker skipped it.
//!   `warm::answer_sync` now sends each origin's first logged event before its `Skip`.

mod acked;
mod backfill;
mod cluster;
mod invariants;
mod network;
mod node;
mod replicate;
mod stats;
mod workload;

pub use cluster::Sim;
pub use stats::Stats;
pub use tern_core::ChannelKey;

/// One-way delay in ms between two nodes of the same region.
pub const SAME_REGION_MS: i64 = 1;

/// The one-way delay matrix of nodes in `node_regions` (a region index per node):
/// [`SAME_REGION_MS`] within a region, `between(a, b)` from region a to region b.
pub fn latencies(node_regions: &[usize], between: impl Fn(usize, usize) -> i64) -> Vec<Vec<i64>> {
    node_regions
        .iter()
        .map(|&a| {
            node_regions
                .iter()
                .map(|&b| {
                    if a == b {
                        SAME_REGION_MS
                    } else {
                        between(a, b)
                    }
                })
                .collect()
        })
        .collect()
}

/// splitmix64: tiny, seedable, good enough for fault injection.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Fault rates, in percent per message, and timings.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop: u64,
    pub duplicate: u64,
    /// Extra random delay (ms) on top of the link latency: reorders messages.
    pub jitter_ms: u64,
    /// Failure detection: each survivor learns of a crash within this many ms.
    pub detect_ms: u64,
    /// A node crashes only this long after the previous crash or restart, and once every
    /// survivor has noticed the previous crash (see [`Sim::crash`]).
    pub settle_ms: i64,
    /// Each node's clock runs ahead of the simulation's by a fixed random offset in
    /// `0..=skew_ms` ms: what its hub stamps and what its rules take for now.
    pub skew_ms: u64,
    /// A link's `Hello` and events reach the peer in the order sent (one QUIC stream),
    /// though any of them may still be lost or doubled; other frames are reordered
    /// freely. Off, everything is reordered (the seed sweep: a harsher network).
    pub ordered_links: bool,
}

/// How many channels the cluster has and how many subscriptions its nodes hold.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// 1: one channel, which each node incarnation subscribes to with 65% chance (the
    /// seed sweep). More: each incarnation subscribes to `subscriptions / nodes` random
    /// channels (drawn again on restart).
    pub channels: usize,
    pub subscriptions: usize,
    /// The last `joiners` nodes start down, never seen by anyone: their first
    /// [`Sim::restart`] is a node joining the cluster.
    pub joiners: usize,
    /// How long a channel with neither attachments nor presence nor events stays in a
    /// node's hub (`CoreLimits::channel_idle_retain_ms`, 120 s in the server); `None`:
    /// for ever. Nodes sweep at every heads round, as the server's housekeeping does
    /// every second; a home with no subscriber of its own drops the channel between
    /// bursts and opens it again, continuing its own sequence from its store.
    pub idle_retain_ms: Option<i64>,
    /// A node's history store survives its restart, as `tern-store` on disk does (the
    /// restarted node's channels continue from it, `Journal::restore`, and it takes its
    /// earlier origins' recent events back, `recover`); off, a restart starts with an
    /// empty store, as the memory history does.
    pub durable_store: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            channels: 1,
            subscriptions: 0,
            joiners: 0,
            // Kept in memory; see `IDLE_RETAIN_MS`.
            idle_retain_ms: None,
            durable_store: false,
        }
    }
}

/// A control frame a node sends, for [`Sim::sizer`] to measure (the simulation has no
/// encoder of its own: a test passes `tern_cluster::wire`'s).
pub enum Control<'a> {
    /// One `Heads` frame: channels with the sender's cursor (origin, sequence).
    Heads(&'a [(&'a ChannelKey, &'a [(u64, u64)])]),
    /// One `Interest` frame (on) for these channels.
    Interest(&'a [&'a ChannelKey]),
}

/// Measures the encoded bytes of a control frame.
pub type Sizer = Box<dyn Fn(Control) -> usize>;

/// Presence clients per node incarnation.
pub(crate) const CLIENTS: usize = 3;

/// Chance (percent) that a node incarnation has a subscriber on the channel.
pub(crate) const SUBSCRIBED_PERCENT: u64 = 65;

/// A node waiting for the channel's state asks again after this long
/// (`ASK_AGAIN_AFTER`) and attaches anyway after `WARM_TIMEOUT_MS` (`WARM_TIMEOUT`).
pub(crate) const ASK_AGAIN_MS: i64 = 1_000;
/// A [`Shape::idle_retain_ms`] short enough that runs drop channels while idle and open
/// them again: the seed sweep uses it for odd seeds. The convergence check then owes a
/// subscriber only what was published after it attached (earlier messages are history,
/// in the homes' stores), and homes copy stored history (`backfill`). Much shorter, a
/// channel is dropped before its origin noticed that the home it sent to died, and its
/// log can no longer repair the new home's subscribers (seed 716 at 100 ms: a live
/// subscriber misses the message); the server's 120 s is far longer than its ~2 s
/// failure detection. The scaled runs keep channels in memory: see docs/reliability.md.
pub const IDLE_RETAIN_MS: i64 = 500;
/// The idle retention of the sweep's seeds with stores that survive restarts (3 mod 4).
/// A restarted node holds the channels it took its earlier events back into
/// (`recover`) only while they are idle: dropped before its first `Heads` round (1 s)
/// listed them, no peer ever asks for those events (seeds 295, 373 and 1011 at 500 ms);
/// the server keeps an idle channel for 120 s.
pub const DURABLE_IDLE_RETAIN_MS: i64 = 2_000;
pub(crate) const WARM_TIMEOUT_MS: i64 = 3_000;
/// How long gossip takes to carry a member's departed-tag list to every other member.
pub(crate) const GOSSIP_SPREAD_MS: u64 = 300;

pub(crate) const ALL_MODES: u64 = tern_protocol::flags::PUBLISH
    | tern_protocol::flags::SUBSCRIBE
    | tern_protocol::flags::PRESENCE
    | tern_protocol::flags::PRESENCE_SUBSCRIBE;

/// Anti-entropy rounds (a second apart) a run's last phase takes at most after the
/// heal: long enough for a gap nobody can fill to be given up (`stalls`), whether its
/// origin's node came back or not, with 50 rounds to spare for repairs that are
/// themselves dropped.
pub fn final_rounds() -> u64 {
    use tern_replication::stalls::{GAP_GIVE_UP, GAP_GIVE_UP_GONE};
    GAP_GIVE_UP.max(GAP_GIVE_UP_GONE).as_secs() + 50
}
