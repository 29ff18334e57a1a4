//! The hub: every channel of this node, in a sharded map. The shard lock is held only to
//! find or create a channel; work on a channel happens under that channel's own lock, so
//! publishes to different channels never wait on each other.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tern_protocol::{Annotation, Message, PresenceMessage};

use crate::channel::{ApplyContext, RemoteEvent, RemoteOutcome};
use crate::channel::{AttachOptions, AttachSnapshot, Channel, ChannelStatus};
use crate::cursor::OriginId;
use crate::event::{ChannelEvent, Publisher, Subscriber};
use crate::journal::Journal;
use crate::key::ChannelKey;
use crate::limits::CoreLimits;
use crate::presence::PresenceError;

const SHARD_COUNT: usize = 64;
/// Connection-id prefixes of departed nodes remembered (see [`Hub::node_departed`]); past
/// it the oldest is forgotten. One per node incarnation that left the cluster.
const DEPARTED_PREFIXES_MAX: usize = 1_024;

/// What a publish produced.
#[derive(Clone, Debug)]
pub struct PublishOutcome {
    /// One serial per message, in order (a duplicate gets its original serial).
    pub serials: Vec<Option<String>>,
    /// The event fanned out, or `None` when every message was a duplicate.
    pub event: Option<Arc<ChannelEvent>>,
}

/// Why the core refused an operation. The edge maps each to an Ably error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The node already holds `channels_max` channels (Ably 90000).
    #[error("channel limit reached ({0} channels)")]
    TooManyChannels(usize),
    /// The app already holds `channels_per_app_max` channels on this node (90000).
    #[error("channel limit of this app reached ({0} channels)")]
    TooManyAppChannels(usize),
    /// A presence change was refused.
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

/// A dropped connection whose presence members leave once its grace period ends.
struct Dropped {
    app: Arc<str>,
    channels: Vec<Arc<str>>,
    deadline_ms: i64,
}

type Shard = Mutex<HashMap<ChannelKey, Arc<Mutex<Channel>>>>;

/// Channels per app: how many this node holds (entries removed at zero), and for app
/// statistics how many it created and the most it held since the last
/// [`Hub::take_app_channels`] (entries removed by it). Both hold only apps with channels
/// now or in the period, so they are bounded by the channels themselves.
#[derive(Default)]
struct AppChannels {
    held: HashMap<Arc<str>, usize>,
    period: HashMap<Arc<str>, (u64, usize)>,
}

/// One app's channels on this node, as [`Hub::take_app_channels`] reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppChannelCount {
    pub app: Arc<str>,
    /// Held now.
    pub held: usize,
    /// Created since the previous report.
    pub opened: u64,
    /// The most held at once since the previous report (at least `held`).
    pub peak: usize,
}

/// Dropped connections by id, and the same ids ordered by deadline.
#[derive(Default)]
struct DroppedSet {
    by_id: HashMap<Arc<str>, Dropped>,
    by_deadline: BTreeMap<(i64, Arc<str>), ()>,
}

/// Longest a dropped connection's presence may stay, whatever it asked for.
pub const PRESENCE_GRACE_MAX_MS: i64 = 60_000;

/// Every channel of this node.
pub struct Hub {
    origin: OriginId,
    limits: CoreLimits,
    journal: Option<Arc<dyn Journal>>,
    hasher: RandomState,
    shards: Box<[Shard]>,
    channel_count: AtomicUsize,
    /// Channels per app, bounded by `channels_per_app_max`.
    app_channels: Mutex<AppChannels>,
    dropped: Mutex<DroppedSet>,
    /// Connection-id prefixes of departed nodes, oldest first.
    departed: Mutex<VecDeque<Arc<str>>>,
    /// Called when a channel opens: the caller's housekeeping, asleep while nothing
    /// changes, has work again (see [`Hub::sweep`]).
    on_channel_opened: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a channel lock must not take every later caller down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new(origin: OriginId, limits: CoreLimits) -> Self {
        Hub::with_journal(origin, limits, None)
    }

    /// A hub whose every applied event is also handed to `journal` (the history store).
    pub fn with_journal(
        origin: OriginId,
        limits: CoreLimits,
        journal: Option<Arc<dyn Journal>>,
    ) -> Self {
        let shards = (0..SHARD_COUNT)
            .map(|_| Mutex::new(HashMap::new()))
            .collect();
        Hub {
            origin,
            limits,
            journal,
            hasher: RandomState::new(),
            shards,
            channel_count: AtomicUsize::new(0),
            app_channels: Mutex::new(AppChannels::default()),
            dropped: Mutex::new(DroppedSet::default()),
            departed: Mutex::new(VecDeque::new()),
            on_channel_opened: OnceLock::new(),
        }
    }

    /// Sets what to call when a channel opens (see [`Hub::sweep`]). Only the first
    /// call takes effect. `wake` runs under a shard lock: it must only signal (a
    /// notify), never call back into the hub.
    pub fn on_channel_opened(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_channel_opened.set(wake);
    }

    pub fn origin(&self) -> OriginId {
        self.origin
    }

    pub fn limits(&self) -> &CoreLimits {
        &self.limits
    }

    pub fn channel_count(&self) -> usize {
        self.channel_count.load(Ordering::Relaxed)
    }

    /// Every app's channels on this node: held now, created and the most held since the
    /// previous call, which this call starts anew. For app statistics, whose one caller
    /// asks about once a second.
    pub fn take_app_channels(&self) -> Vec<AppChannelCount> {
        let mut apps = lock(&self.app_channels);
        let AppChannels { held, period } = &mut *apps;
        let mut counts: HashMap<Arc<str>, AppChannelCount> = held
            .iter()
            .map(|(app, &held)| {
                let count = AppChannelCount {
                    app: app.clone(),
                    held,
                    opened: 0,
                    peak: held,
                };
                (app.clone(), count)
            })
            .collect();
        for (app, (opened, peak)) in period.drain() {
            let count = counts.entry(app.clone()).or_insert(AppChannelCount {
                app,
                held: 0,
                opened: 0,
                peak: 0,
            });
            count.opened = opened;
            count.peak = count.peak.max(peak);
        }
        counts.into_values().collect()
    }

    fn shard(&self, key: &ChannelKey) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARD_COUNT]
    }

    fn find(&self, key: &ChannelKey) -> Option<Arc<Mutex<Channel>>> {
        lock(self.shard(key)).get(key).cloned()
    }

    fn context<'a>(&'a self, key: &'a ChannelKey, now_ms: i64) -> ApplyContext<'a> {
        ApplyContext {
            key,
            origin: self.origin,
            limits: &self.limits,
            journal: self.journal.as_deref(),
            departed: &self.departed,
            now_ms,
        }
    }

    /// Runs `f` on the channel under its lock, creating the channel if needed. A channel
    /// retired by [`Hub::sweep`] between lookup and lock is looked up again.
    fn with_channel<R>(
        &self,
        key: &ChannelKey,
        now_ms: i64,
        f: impl FnOnce(&mut Channel) -> R,
    ) -> Result<R, CoreError> {
        loop {
            let channel = self.find_or_create(key, now_ms)?;
            let mut guard = lock(&channel);
            if !guard.retired {
                return Ok(self.watching_attachments(key, &mut guard, f));
            }
        }
    }

    /// Runs `f` and tells the journal when the channel gained its first attachment or
    /// lost its last.
    fn watching_attachments<R>(
        &self,
        key: &ChannelKey,
        channel: &mut Channel,
        f: impl FnOnce(&mut Channel) -> R,
    ) -> R {
        let before = channel.has_attachments();
        let result = f(channel);
        let after = channel.has_attachments();
        if before != after {
            if let Some(journal) = &self.journal {
                journal.interest(key, after);
            }
        }
        result
    }

    /// Runs `f` on an existing channel under its lock.
    fn with_existing<R>(&self, key: &ChannelKey, f: impl FnOnce(&mut Channel) -> R) -> Option<R> {
        let channel = self.find(key)?;
        let mut guard = lock(&channel);
        (!guard.retired).then(|| self.watching_attachments(key, &mut guard, f))
    }

    fn find_or_create(
        &self,
        key: &ChannelKey,
        now_ms: i64,
    ) -> Result<Arc<Mutex<Channel>>, CoreError> {
        if let Some(channel) = self.find(key) {
            return Ok(channel);
        }
        // Read before taking the shard lock: it may touch the store.
        let restored = self.journal.as_ref().map(|j| j.restore(key));
        let mut shard = lock(self.shard(key));
        if let Some(channel) = shard.get(key) {
            return Ok(channel.clone());
        }
        if self.channel_count.load(Ordering::Relaxed) >= self.limits.channels_max {
            return Err(CoreError::TooManyChannels(self.limits.channels_max));
        }
        {
            let mut apps = lock(&self.app_channels);
            let AppChannels { held, period } = &mut *apps;
            let count = held.entry(key.app.clone()).or_insert(0);
            if *count >= self.limits.channels_per_app_max {
                return Err(CoreError::TooManyAppChannels(
                    self.limits.channels_per_app_max,
                ));
            }
            *count += 1;
            let (opened, peak) = period.entry(key.app.clone()).or_default();
            *opened += 1;
            *peak = (*peak).max(*count);
        }
        self.channel_count.fetch_add(1, Ordering::Relaxed);
        if let Some(wake) = self.on_channel_opened.get() {
            wake();
        }
        let mut created = Channel::new(key.name.clone(), now_ms);
        if let Some(cursor) = restored {
            created.restore(cursor, self.origin);
        }
        let channel = Arc::new(Mutex::new(created));
        shard.insert(key.clone(), channel.clone());
        Ok(channel)
    }

    /// Attaches a connection. `reply` runs under the channel lock with the snapshot the
    /// ATTACHED reply and presence SYNC need; whatever it queues for the connection
    /// precedes every event published after this attach.
    pub fn attach(
        &self,
        key: &ChannelKey,
        connection_id: Arc<str>,
        options: AttachOptions,
        sink: Arc<dyn Subscriber>,
        reply: impl FnOnce(&AttachSnapshot),
        now_ms: i64,
    ) -> Result<(), CoreError> {
        self.with_channel(key, now_ms, |c| {
            c.attach(self.origin, connection_id, options, sink, reply, now_ms)
        })
    }

    /// Stops deliveries to a connection on one channel. Returns whether it was attached.
    pub fn detach(&self, key: &ChannelKey, connection_id: &str, now_ms: i64) -> bool {
        self.with_existing(key, |c| c.detach(connection_id, now_ms))
            .unwrap_or(false)
    }

    /// Publishes messages on a channel and fans them out.
    pub fn publish(
        &self,
        key: &ChannelKey,
        publisher: &Publisher,
        messages: Vec<Message>,
        now_ms: i64,
    ) -> Result<PublishOutcome, CoreError> {
        let ctx = self.context(key, now_ms);
        let (serials, event) =
            self.with_channel(key, now_ms, |c| c.publish(&ctx, publisher, messages))?;
        Ok(PublishOutcome { serials, event })
    }

    /// Publishes annotations of messages (see `Channel::annotate`); their serials.
    pub fn annotate(
        &self,
        key: &ChannelKey,
        publisher: &Publisher,
        annotations: Vec<Annotation>,
        now_ms: i64,
    ) -> Result<(Vec<String>, Arc<ChannelEvent>), CoreError> {
        let ctx = self.context(key, now_ms);
        self.with_channel(key, now_ms, |c| c.annotate(&ctx, publisher, annotations))
    }

    /// The message with `serial` as first published (if this node's log of the channel
    /// still holds it) and the changes to it the log holds, for reads that must see
    /// changes not yet committed to the store.
    pub fn logged_message(
        &self,
        key: &ChannelKey,
        serial: &str,
    ) -> (Option<Message>, Vec<Message>) {
        self.with_existing(key, |c| c.message(serial))
            .unwrap_or_default()
    }

    /// Applies presence changes, each with id, clientId, connectionId and timestamp set.
    pub fn presence(
        &self,
        key: &ChannelKey,
        publisher: &Publisher,
        changes: Vec<PresenceMessage>,
        now_ms: i64,
    ) -> Result<(), CoreError> {
        let ctx = self.context(key, now_ms);
        self.with_channel(key, now_ms, |c| c.presence(&ctx, publisher, changes))??;
        Ok(())
    }

    /// Takes in presence members another node holds (a channel's state when this node
    /// starts receiving it), newer-wins like every change, without broadcasting: nobody
    /// is attached here yet. Members of departed nodes are ignored.
    pub fn seed_members(
        &self,
        key: &ChannelKey,
        members: Vec<PresenceMessage>,
        now_ms: i64,
    ) -> usize {
        let ctx = self.context(key, now_ms);
        self.with_channel(key, now_ms, |c| c.seed_members(&ctx, members))
            .unwrap_or(0)
    }

    /// Current presence members of a channel.
    pub fn members(&self, key: &ChannelKey) -> Vec<PresenceMessage> {
        self.with_existing(key, |c| c.members()).unwrap_or_default()
    }

    /// Applies an event from another origin (see `Channel::apply_remote`).
    pub fn apply_remote(
        &self,
        key: &ChannelKey,
        event: RemoteEvent,
        now_ms: i64,
    ) -> Result<RemoteOutcome, CoreError> {
        let ctx = self.context(key, now_ms);
        self.with_channel(key, now_ms, |c| c.apply_remote(&ctx, event))
    }

    /// Moves a channel's cursor for `origin` past events no peer can supply (see
    /// `Channel::skip_remote`); only for a channel this node holds.
    pub fn skip_remote(&self, key: &ChannelKey, origin: OriginId, upto: u64, now_ms: i64) -> usize {
        let ctx = self.context(key, now_ms);
        self.with_existing(key, |c| c.skip_remote(&ctx, origin, upto))
            .unwrap_or(0)
    }

    /// [`Hub::skip_remote`] for a channel this node keeps (its home, or interested),
    /// opening it if it is not in memory. A kept channel dropped here while idle
    /// (`Hub::sweep`) comes back with only this node's own position (`Journal::restore`);
    /// anti-entropy then asks a peer for the other origins' events, and a peer whose log
    /// no longer has them answers `Skip`. Recorded only on an open channel, that answer
    /// was lost and the same range was asked for again every round, for as long as the
    /// peer held the channel.
    pub fn skip_remote_kept(
        &self,
        key: &ChannelKey,
        origin: OriginId,
        upto: u64,
        now_ms: i64,
    ) -> Result<usize, CoreError> {
        let ctx = self.context(key, now_ms);
        self.with_channel(key, now_ms, |c| c.skip_remote(&ctx, origin, upto))
    }

    /// Every channel this node holds with its cursor, at most `max` of them (for
    /// anti-entropy between nodes).
    pub fn cursors(&self, max: usize) -> Vec<(ChannelKey, crate::Cursor)> {
        self.cursors_from(0, max).0
    }

    /// At most `max` channels with their cursors, starting `skip` channels in (in the
    /// hub's order, wrapping around), and the `skip` of the next page: rounds that pass
    /// it on cover every channel in turn, also when a node holds more than `max` (a
    /// fixed first page would leave the rest without anti-entropy for good). Channels
    /// opened or closed between rounds move the order, so one may be listed twice or
    /// wait a round more; none waits for ever. Each channel's lock is taken alone.
    pub fn cursors_from(
        &self,
        skip: usize,
        max: usize,
    ) -> (Vec<(ChannelKey, crate::Cursor)>, usize) {
        // Only the page is cloned: the rest of the hub is counted and skipped, so a
        // round costs its page, not every channel the node holds.
        let total: usize = self.shards.iter().map(|shard| lock(shard).len()).sum();
        if total == 0 {
            return (Vec::new(), 0);
        }
        let start = skip % total;
        let taken = max.min(total);
        let mut page: Vec<(ChannelKey, Arc<Mutex<Channel>>)> = Vec::with_capacity(taken);
        // The page is [start, start + taken) of the channels in shard order, wrapping:
        // at most two runs of that order.
        let first = taken.min(total - start);
        for (from, count) in [(start, first), (0, taken - first)] {
            let mut skip = from;
            let mut left = count;
            for shard in self.shards.iter() {
                if left == 0 {
                    break;
                }
                let shard = lock(shard);
                if skip >= shard.len() {
                    skip -= shard.len();
                    continue;
                }
                let before = page.len();
                page.extend(
                    shard
                        .iter()
                        .skip(skip)
                        .take(left)
                        .map(|(k, c)| (k.clone(), c.clone())),
                );
                left -= page.len() - before;
                skip = 0;
            }
        }
        // Channels opened or closed between the count and the walk shorten the page;
        // the next round starts after what was listed.
        let listed = page.len();
        let out = page
            .into_iter()
            .map(|(key, channel)| {
                let cursor = lock(&channel).cursor().clone();
                (key, cursor)
            })
            .collect();
        (out, (start + listed) % total)
    }

    /// Logged events of `origin` in `from..=to` on a channel, to repair a peer's gap.
    pub fn events_of(
        &self,
        key: &ChannelKey,
        origin: OriginId,
        from: u64,
        to: u64,
    ) -> Vec<Arc<ChannelEvent>> {
        self.with_existing(key, |c| c.events_of(origin, from, to))
            .unwrap_or_default()
    }

    /// A channel's cursor on this node (empty if not held).
    pub fn cursor(&self, key: &ChannelKey) -> crate::Cursor {
        self.with_existing(key, |c| c.cursor().clone())
            .unwrap_or_default()
    }

    /// Remote events waiting behind a gap on a channel.
    pub fn pending_len(&self, key: &ChannelKey) -> usize {
        self.with_existing(key, |c| c.pending_len()).unwrap_or(0)
    }

    /// `origin`'s cursor on a channel held here and the first of its events waiting
    /// behind a gap, if any waits.
    pub fn held_back(&self, key: &ChannelKey, origin: OriginId) -> Option<(u64, u64)> {
        self.with_existing(key, |c| {
            Some((c.cursor().get(origin), c.first_pending(origin)?))
        })
        .flatten()
    }

    /// Events held in a channel's in-memory log (0 if the channel is not held).
    pub fn log_len(&self, key: &ChannelKey) -> usize {
        self.with_existing(key, |c| c.log_len()).unwrap_or(0)
    }

    /// Occupancy of a channel, or `None` if this node does not hold it.
    pub fn status(&self, key: &ChannelKey) -> Option<ChannelStatus> {
        self.with_existing(key, |c| c.status())
    }

    /// Every presence member of `connection_id` on this channel leaves now, with
    /// LEAVEs broadcast and journaled, as when the connection closes (used also when
    /// its credential stops allowing presence there).
    pub fn leave(&self, key: &ChannelKey, connection_id: &str, now_ms: i64) {
        let ctx = self.context(key, now_ms);
        self.with_existing(key, |c| c.leave_connection(&ctx, connection_id));
    }

    /// Narrows a connection's attachment to the mode bits in `granted` (its credential
    /// changed): deliveries and occupancy follow the narrowed modes from the next event.
    /// Returns the modes it had, or `None` when it is not attached.
    pub fn restrict_modes(
        &self,
        key: &ChannelKey,
        connection_id: &str,
        granted: u64,
    ) -> Option<u64> {
        self.with_existing(key, |c| c.restrict_modes(connection_id, granted))
            .flatten()
    }

    /// A node departed the cluster: every presence member of a connection it issued
    /// (connection ids starting with `prefix`) leaves, on every channel. Every surviving
    /// node does this on its own; where another's LEAVE arrived first, its own is a no-op.
    /// Presence of those connections that arrives later is ignored. Returns how many
    /// members left here.
    pub fn node_departed(&self, prefix: &str, now_ms: i64) -> usize {
        if prefix.is_empty() {
            return 0;
        }
        {
            let mut departed = lock(&self.departed);
            if !departed.iter().any(|p| &**p == prefix) {
                departed.push_back(prefix.into());
                if departed.len() > DEPARTED_PREFIXES_MAX {
                    departed.pop_front();
                }
            }
        }
        let keys: Vec<ChannelKey> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).keys().cloned().collect::<Vec<_>>())
            .collect();
        let mut count = 0;
        for key in keys {
            let ctx = self.context(&key, now_ms);
            count += self
                .with_existing(&key, |c| c.leave_connections_with_prefix(&ctx, prefix))
                .unwrap_or(0);
        }
        count
    }

    /// A connection closed cleanly (CLOSE): detach it everywhere and its members leave now.
    pub fn connection_closed(
        &self,
        app: &str,
        connection_id: &str,
        channels: &[Arc<str>],
        now_ms: i64,
    ) {
        self.forget_dropped(connection_id);
        for name in channels {
            let key = ChannelKey {
                app: app.into(),
                name: name.clone(),
            };
            self.detach(&key, connection_id, now_ms);
            self.leave(&key, connection_id, now_ms);
        }
    }

    /// A connection's transport went away without CLOSE: deliveries stop now, and its
    /// presence members leave after `presence_leave_grace_ms` unless it comes back first.
    pub fn connection_dropped(
        &self,
        app: &str,
        connection_id: &str,
        channels: Vec<Arc<str>>,
        now_ms: i64,
    ) {
        let grace_ms = self.limits.presence_leave_grace_ms;
        self.connection_dropped_for(app, connection_id, channels, now_ms, grace_ms);
    }

    /// As [`Hub::connection_dropped`], with the connection's own grace period (Ably's
    /// `remainPresentFor` connection param), clamped to
    /// `0..=PRESENCE_GRACE_MAX_MS`.
    pub fn connection_dropped_for(
        &self,
        app: &str,
        connection_id: &str,
        channels: Vec<Arc<str>>,
        now_ms: i64,
        grace_ms: i64,
    ) {
        for name in &channels {
            let key = ChannelKey {
                app: app.into(),
                name: name.clone(),
            };
            self.detach(&key, connection_id, now_ms);
        }
        let deadline_ms = now_ms + grace_ms.clamp(0, PRESENCE_GRACE_MAX_MS);
        let evicted = {
            let mut dropped = lock(&self.dropped);
            let DroppedSet { by_id, by_deadline } = &mut *dropped;
            let id: Arc<str> = connection_id.into();
            by_id.insert(
                id.clone(),
                Dropped {
                    app: app.into(),
                    channels,
                    deadline_ms,
                },
            );
            by_deadline.insert((deadline_ms, id), ());
            // Bound: past the limit, the oldest dropped connection leaves early.
            if by_id.len() > self.limits.dropped_connections_max {
                by_deadline
                    .pop_first()
                    .and_then(|((_, id), ())| by_id.remove(&id).map(|d| (id, d)))
            } else {
                None
            }
        };
        if let Some((id, gone)) = evicted {
            self.leave_all(&id, &gone, now_ms);
        }
    }

    /// A dropped connection came back (resume) before its grace period ended.
    pub fn forget_dropped(&self, connection_id: &str) -> bool {
        let mut dropped = lock(&self.dropped);
        let DroppedSet { by_id, by_deadline } = &mut *dropped;
        match by_id.remove(connection_id) {
            Some(gone) => {
                by_deadline.remove(&(gone.deadline_ms, connection_id.into()));
                true
            }
            None => false,
        }
    }

    fn leave_all(&self, connection_id: &str, gone: &Dropped, now_ms: i64) {
        for name in &gone.channels {
            let key = ChannelKey {
                app: gone.app.clone(),
                name: name.clone(),
            };
            self.leave(&key, connection_id, now_ms);
        }
    }

    /// Periodic housekeeping: members of connections dropped past their grace period
    /// leave; channels empty for longer than `channel_idle_retain_ms` are dropped.
    /// Call about once a second while it returns `true` (something is still waiting:
    /// a dropped connection's members, an empty channel, a channel opened since the
    /// last [`Hub::take_app_channels`]). After `false`, nothing changes here until a
    /// connection attaches or drops, or a channel opens (the `on_channel_opened` call).
    pub fn sweep(&self, now_ms: i64) -> bool {
        loop {
            let due = {
                let mut dropped = lock(&self.dropped);
                let DroppedSet { by_id, by_deadline } = &mut *dropped;
                match by_deadline.first_key_value() {
                    Some(((deadline, _), ())) if *deadline <= now_ms => {
                        let ((_, id), ()) = by_deadline.pop_first().expect("checked non-empty");
                        by_id.remove(&id).map(|gone| (id, gone))
                    }
                    _ => break,
                }
            };
            if let Some((id, gone)) = due {
                self.leave_all(&id, &gone, now_ms);
            }
        }
        let mut waiting = false;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            let mut retired: Vec<Arc<str>> = Vec::new();
            shard.retain(|key, channel| {
                let mut channel = lock(channel);
                let empty = channel.is_empty();
                let idle = empty
                    && channel
                        .empty_since_ms
                        .is_some_and(|since| now_ms - since >= self.limits.channel_idle_retain_ms)
                    && self.journal.as_ref().is_none_or(|j| j.may_drop(key));
                waiting |= empty && !idle;
                channel.retired = idle;
                if idle {
                    retired.push(key.app.clone());
                }
                !idle
            });
            self.channel_count
                .fetch_sub(before - shard.len(), Ordering::Relaxed);
            let mut apps = lock(&self.app_channels);
            for app in retired {
                if let Some(count) = apps.held.get_mut(&app) {
                    *count -= 1;
                    if *count == 0 {
                        apps.held.remove(&app);
                    }
                }
            }
        }
        waiting
            || !lock(&self.dropped).by_id.is_empty()
            || !lock(&self.app_channels).period.is_empty()
    }
}
