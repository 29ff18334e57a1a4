//! What one node counts per app: the open minute's counters (relaxed atomics, added
//! on the paths that do the work), its gauges (connections and channels, sampled by
//! the once-a-second tick), and the closed minutes (bounded). The tick closes a minute
//! once the clock has left it, so a count lands in the minute the tick closes, at most
//! a tick (about a second) late.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tern_core::AppChannelCount;

use super::entries::{
    Aggregate, Direction, Field, Key, Kind, Outcome, Request, Row, Transport, KEY_COUNT,
};
use super::interval::Unit;
use crate::config::StatsConfig;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gauges of the open minute, sampled by the tick.
#[derive(Debug)]
struct OpenMinute {
    /// Start of the minute the counters are counting (UTC, ms).
    start_ms: i64,
    /// Samples taken this minute, and the sums of the connections and channels seen.
    samples: u32,
    connections_sum: u64,
    channels_sum: u64,
    channels_peak: u64,
    channels_min: u64,
    /// The last sample: when, and the connections and channels it saw (what samples
    /// missed while housekeeping slept are taken as, see [`AppStats::fill`]).
    last: Option<(i64, u64, u64)>,
}

impl OpenMinute {
    fn new(start_ms: i64, channels: u64) -> Self {
        OpenMinute {
            start_ms,
            samples: 0,
            connections_sum: 0,
            channels_sum: 0,
            channels_peak: channels,
            channels_min: channels,
            last: None,
        }
    }
}

/// How often the gauges are sampled (the housekeeping tick).
const SAMPLE_EVERY_MS: i64 = 1_000;
/// Most samples [`AppStats::fill`] adds at once (an hour: a longer gap is a suspended
/// process, not a sleeping tick).
const FILL_MAX: i64 = 3_600;

/// One app's statistics on this node.
pub(crate) struct AppStats {
    /// Counted this minute, by [`Key`] (only sums are counted here; gauges below).
    counts: [AtomicU64; KEY_COUNT],
    /// Realtime connections of the app open on this node now, and the most and fewest
    /// this minute.
    connections: AtomicU64,
    connections_peak: AtomicU64,
    connections_min: AtomicU64,
    open: Mutex<OpenMinute>,
    /// Closed minutes (and fixtures) by start, at most `minutes_max`.
    closed: Mutex<BTreeMap<i64, Row>>,
    minutes_max: usize,
}

/// Messages (and presence messages) of one delivery batch, counted as they were
/// written to a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) messages: u64,
    pub(crate) message_bytes: u64,
    pub(crate) presence: u64,
    pub(crate) presence_bytes: u64,
}

impl AppStats {
    fn new(now_ms: i64, minutes_max: usize) -> Self {
        AppStats {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            connections: AtomicU64::new(0),
            connections_peak: AtomicU64::new(0),
            connections_min: AtomicU64::new(0),
            open: Mutex::new(OpenMinute::new(Unit::Minute.floor(now_ms), 0)),
            closed: Mutex::new(BTreeMap::new()),
            minutes_max,
        }
    }

    /// Adds `n` to a counter: one relaxed atomic add.
    pub(crate) fn add(&self, key: Key, n: u64) {
        if n > 0 {
            self.counts[key.index()].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A publish this node accepted from a client: `count` messages of `bytes` (Ably's
    /// message size) in all.
    pub(crate) fn received(&self, transport: Transport, kind: Kind, count: usize, bytes: usize) {
        self.add(
            Key::message(Direction::Inbound, transport, kind, Field::Count),
            count as u64,
        );
        self.add(
            Key::message(Direction::Inbound, transport, kind, Field::Data),
            bytes as u64,
        );
    }

    /// What one realtime connection's writer wrote in one batch.
    pub(crate) fn delivered(&self, batch: &Delivered) {
        let key = |kind, field| Key::message(Direction::Outbound, Transport::Realtime, kind, field);
        self.add(key(Kind::Messages, Field::Count), batch.messages);
        self.add(key(Kind::Messages, Field::Data), batch.message_bytes);
        self.add(key(Kind::Presence, Field::Count), batch.presence);
        self.add(key(Kind::Presence, Field::Data), batch.presence_bytes);
    }

    /// One REST request of the app ended.
    pub(crate) fn requested(&self, request: Request, outcome: Outcome) {
        self.add(Key::request(request, outcome), 1);
    }

    /// A realtime connection of the app is open until the returned guard is dropped;
    /// `new` (not a resume of an existing connection) counts it as opened.
    pub(crate) fn connection_opened(self: &Arc<Self>, new: bool) -> OpenConnection {
        if new {
            self.add(Key::CONNECTIONS_OPENED, 1);
        }
        let now = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.connections_peak.fetch_max(now, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Once a second: counts the channels the hub opened since the last tick (in the
    /// minute they happened in), closes the open minute once the clock has left it,
    /// then samples the gauges into the minute now open.
    fn tick(&self, now_ms: i64, channels: Option<&AppChannelCount>) {
        let held = channels.map_or(0, |c| c.held as u64);
        let mut open = lock(&self.open);
        if let Some(channels) = channels {
            self.add(Key::CHANNELS_OPENED, channels.opened);
            open.channels_peak = open.channels_peak.max(channels.peak as u64);
        }
        let minute = Unit::Minute.floor(now_ms);
        if minute > open.start_ms {
            self.close(&mut open, minute, held);
        }
        let connections = self.connections.load(Ordering::Relaxed);
        open.samples += 1;
        open.connections_sum += connections;
        open.channels_sum += held;
        open.channels_peak = open.channels_peak.max(held);
        open.channels_min = open.channels_min.min(held);
        open.last = Some((now_ms, connections, held));
    }

    /// Closes the open minute and opens the one starting at `minute` with `held`
    /// channels.
    fn close(&self, open: &mut OpenMinute, minute: i64, held: u64) {
        let closing = open.start_ms;
        let row = self.snapshot(open, true);
        let last = open.last;
        *open = OpenMinute::new(minute, held);
        open.last = last;
        let connections = self.connections.load(Ordering::Relaxed);
        self.connections_peak.store(connections, Ordering::Relaxed);
        self.connections_min.store(connections, Ordering::Relaxed);
        if !row.is_empty() {
            self.insert(closing, row);
        }
    }

    /// Adds the samples a once-a-second tick would have taken between the last sample
    /// and `now_ms` (exclusive of the tick at `now_ms` itself), with the last sample's
    /// values, each in its minute (closing minutes on the way). Housekeeping sleeps
    /// only while nothing changes ([`AppStats::is_steady`]), so those are the values.
    fn fill(&self, now_ms: i64) {
        let mut open = lock(&self.open);
        let Some((mut at, connections, held)) = open.last else {
            return;
        };
        let first = at;
        while at + 2 * SAMPLE_EVERY_MS <= now_ms && at - first < FILL_MAX * SAMPLE_EVERY_MS {
            at += SAMPLE_EVERY_MS;
            let minute = Unit::Minute.floor(at);
            if minute > open.start_ms {
                self.close(&mut open, minute, held);
            }
            open.samples += 1;
            open.connections_sum += connections;
            open.channels_sum += held;
        }
        open.last = Some((at, connections, held));
    }

    /// No connection open: the connection gauge holds still until one opens (which
    /// wakes housekeeping). Counts need no tick until the minute closes.
    fn is_steady(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0
    }

    /// The open minute's row; `take` also zeroes its counters (closing it).
    fn snapshot(&self, open: &OpenMinute, take: bool) -> Row {
        let counts = Key::all().map(|key| {
            let counter = &self.counts[key.index()];
            let value = if take {
                counter.swap(0, Ordering::Relaxed)
            } else {
                counter.load(Ordering::Relaxed)
            };
            (key, value as f64)
        });
        let samples = f64::from(open.samples.max(1));
        let current = self.connections.load(Ordering::Relaxed) as f64;
        let gauges = [
            (
                Key::CONNECTIONS_PEAK,
                self.connections_peak.load(Ordering::Relaxed) as f64,
            ),
            (
                Key::CONNECTIONS_MIN,
                self.connections_min.load(Ordering::Relaxed) as f64,
            ),
            (Key::CHANNELS_PEAK, open.channels_peak as f64),
            (Key::CHANNELS_MIN, open.channels_min as f64),
        ];
        let means = if open.samples == 0 {
            [
                (Key::CONNECTIONS_MEAN, current),
                (Key::CHANNELS_MEAN, open.channels_peak as f64),
            ]
        } else {
            [
                (Key::CONNECTIONS_MEAN, open.connections_sum as f64 / samples),
                (Key::CHANNELS_MEAN, open.channels_sum as f64 / samples),
            ]
        };
        Row::from_values(
            counts
                .filter(|(key, _)| !is_gauge(*key))
                .chain(gauges)
                .chain(means),
        )
    }

    /// Adds `row` to the minute starting at `start_ms` (merged with what it holds),
    /// then drops the oldest minutes beyond `minutes_max`.
    pub(crate) fn insert(&self, start_ms: i64, row: Row) {
        let mut closed = lock(&self.closed);
        let merged = match closed.get(&start_ms) {
            Some(held) => held.merged(&row),
            None => row,
        };
        closed.insert(start_ms, merged);
        while closed.len() > self.minutes_max {
            closed.pop_first();
        }
    }

    /// The intervals of `query`: one row per interval of its unit that has any minute,
    /// in its direction, at most `limit`; `more` when there are further intervals.
    pub(crate) fn query(&self, query: &Query) -> Page {
        let (from, to) = query.minute_range();
        let open = {
            let open = lock(&self.open);
            let row = self.snapshot(&open, false);
            ((from..to).contains(&open.start_ms) && !row.is_empty()).then_some((open.start_ms, row))
        };
        let closed = lock(&self.closed);
        let range = closed.range(from..to).map(|(start, row)| (*start, row));
        match query.direction {
            Order::Forwards => group(query, with_open(range, open, Order::Forwards)),
            Order::Backwards => group(query, with_open(range.rev(), open, Order::Backwards)),
        }
    }
}

/// The closed minutes (in `order`) with the open minute in its place; a closed row of
/// the same minute (a fixture for it) is merged with it.
fn with_open<'a>(
    closed: impl Iterator<Item = (i64, &'a Row)>,
    mut open: Option<(i64, Row)>,
    order: Order,
) -> impl Iterator<Item = (i64, Cow<'a, Row>)> {
    let mut closed = closed.peekable();
    std::iter::from_fn(move || {
        let next_closed = closed.peek().map(|(start, _)| *start);
        let open_first = match (&open, next_closed) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some((at, _)), Some(next)) if *at == next => {
                let (_, held) = closed.next()?;
                let (_, row) = open.take()?;
                return Some((next, Cow::Owned(held.merged(&row))));
            }
            (Some((at, _)), Some(next)) => (order == Order::Forwards) == (*at < next),
        };
        if open_first {
            open.take().map(|(start, row)| (start, Cow::Owned(row)))
        } else {
            closed
                .next()
                .map(|(start, row)| (start, Cow::Borrowed(row)))
        }
    })
}

/// Whether a key is a gauge (sampled), not a counter.
fn is_gauge(key: Key) -> bool {
    matches!(
        key,
        Key::CONNECTIONS_PEAK
            | Key::CONNECTIONS_MIN
            | Key::CONNECTIONS_MEAN
            | Key::CHANNELS_PEAK
            | Key::CHANNELS_MIN
            | Key::CHANNELS_MEAN
    )
}

/// Groups minute rows (in the query's order) into the query's intervals, stopping
/// after `limit` of them.
fn group<'a>(query: &Query, minutes: impl Iterator<Item = (i64, Cow<'a, Row>)>) -> Page {
    let mut intervals: Vec<(i64, Aggregate)> = Vec::new();
    for (start, row) in minutes {
        let interval = query.unit.floor(start);
        if intervals.last().is_none_or(|(at, _)| *at != interval) {
            if intervals.len() == query.limit {
                return Page {
                    intervals: finish(intervals),
                    more: true,
                };
            }
            intervals.push((interval, Aggregate::default()));
        }
        if let Some((_, total)) = intervals.last_mut() {
            total.add(&row);
        }
    }
    Page {
        intervals: finish(intervals),
        more: false,
    }
}

fn finish(intervals: Vec<(i64, Aggregate)>) -> Vec<(i64, Row)> {
    intervals
        .into_iter()
        .map(|(start, total)| (start, total.finish()))
        .collect()
}

/// Keeps the app's connection counted as open; dropping it counts the close.
pub(crate) struct OpenConnection(Arc<AppStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let now = self.0.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.connections_min.fetch_min(now, Ordering::Relaxed);
    }
}

/// Which way a query walks intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    Forwards,
    Backwards,
}

/// A statistics query, validated (see `stats::parse_query`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Query {
    pub(crate) unit: Unit,
    /// Start of the first and of the last interval included (unit-aligned).
    pub(crate) first: i64,
    pub(crate) last: i64,
    pub(crate) direction: Order,
    pub(crate) limit: usize,
    /// Start of the last interval of the previous page: this page continues after it.
    pub(crate) after: Option<i64>,
}

impl Query {
    /// The minutes to read: `[from, to)`.
    fn minute_range(&self) -> (i64, i64) {
        let mut from = self.first;
        let mut to = self.unit.next(self.last);
        match (self.after, self.direction) {
            (Some(after), Order::Forwards) => from = from.max(self.unit.next(after)),
            (Some(after), Order::Backwards) => to = to.min(after),
            (None, _) => {}
        }
        (from, to.max(from))
    }
}

/// One page of a query: `(interval start, row)` in the query's direction.
#[derive(Debug, PartialEq)]
pub(crate) struct Page {
    pub(crate) intervals: Vec<(i64, Row)>,
    pub(crate) more: bool,
}

/// Every app's statistics on this node.
pub(crate) struct Stats {
    config: StatsConfig,
    apps: RwLock<HashMap<Arc<str>, Arc<AppStats>>>,
}

impl Stats {
    pub(crate) fn new(config: StatsConfig) -> Self {
        Stats {
            config,
            apps: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn config(&self) -> &StatsConfig {
        &self.config
    }

    /// The app's statistics, made on first use; `None` once `apps_max` apps are kept
    /// (that app is then not counted). `app` must be an app of the config (an
    /// authenticated credential's), so callers cannot grow the map at will.
    pub(crate) fn app(&self, app: &str, now_ms: i64) -> Option<Arc<AppStats>> {
        if let Some(stats) = self.apps.read().unwrap_or_else(|p| p.into_inner()).get(app) {
            return Some(stats.clone());
        }
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = apps.get(app) {
            return Some(stats.clone());
        }
        if apps.len() >= self.config.apps_max {
            metrics::counter!("tern_stats_apps_refused_total").increment(1);
            tracing::warn!(
                app,
                apps_max = self.config.apps_max,
                "app statistics: too many apps, this one is not counted"
            );
            return None;
        }
        let stats = Arc::new(AppStats::new(now_ms, self.config.minutes_max));
        apps.insert(app.into(), stats.clone());
        Some(stats)
    }

    /// Every app is steady: no connection open. Until one opens, ticks only sample
    /// unchanged gauges, which [`Stats::fill`] can take later, and counts wait for the
    /// minute to close.
    pub(crate) fn is_steady(&self) -> bool {
        self.apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(|stats| stats.is_steady())
    }

    /// After housekeeping slept: the samples its ticks would have taken (see
    /// [`AppStats::fill`]). Call before [`Stats::tick`].
    pub(crate) fn fill(&self, now_ms: i64) {
        for stats in self.apps.read().unwrap_or_else(|p| p.into_inner()).values() {
            stats.fill(now_ms);
        }
    }

    /// The app's statistics if it has any.
    pub(crate) fn existing(&self, app: &str) -> Option<Arc<AppStats>> {
        self.apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .cloned()
    }

    /// Once a second: samples every app's gauges (`channels` from the hub) and closes
    /// minutes the clock has left.
    pub(crate) fn tick(&self, now_ms: i64, channels: Vec<AppChannelCount>) {
        let by_app: HashMap<&str, &AppChannelCount> =
            channels.iter().map(|c| (&*c.app, c)).collect();
        for count in &channels {
            // An app with channels but nothing else counted yet.
            let _ = self.app(&count.app, now_ms);
        }
        let apps: Vec<(Arc<str>, Arc<AppStats>)> = self
            .apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(app, stats)| (app.clone(), stats.clone()))
            .collect();
        for (app, stats) in apps {
            stats.tick(now_ms, by_app.get(&*app).copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_738_594_800_000; // 2025-02-03 15:00:00 UTC

    fn app() -> Arc<AppStats> {
        Arc::new(AppStats::new(T0, 10_080))
    }

    fn count(row: &Row) -> f64 {
        row.get(Key::message(
            Direction::Inbound,
            Transport::Rest,
            Kind::Messages,
            Field::Count,
        ))
    }

    fn query(unit: Unit, direction: Order, limit: usize, after: Option<i64>) -> Query {
        Query {
            unit,
            first: 0,
            last: unit.floor(T0 + 10 * 3_600_000),
            direction,
            limit,
            after,
        }
    }

    /// Counts land in the open minute; the tick closes a minute once the clock has left
    /// it, and the next minute starts from zero.
    #[test]
    fn minutes_close_on_the_tick() {
        let app = app();
        app.received(Transport::Rest, Kind::Messages, 2, 20);
        app.tick(T0 + 59_999, None);
        app.received(Transport::Rest, Kind::Messages, 1, 10);
        app.tick(T0 + 60_500, None);
        app.received(Transport::Rest, Kind::Messages, 5, 50);
        let page = app.query(&query(Unit::Minute, Order::Forwards, 100, None));
        let counts: Vec<(i64, f64)> = page.intervals.iter().map(|(s, r)| (*s, count(r))).collect();
        assert_eq!(counts, vec![(T0, 3.0), (T0 + 60_000, 5.0)]);
        assert!(!page.more);
    }

    /// Connection gauges: the peak and minimum of the minute, the mean of the samples,
    /// and `opened` only for new connections.
    #[test]
    fn connection_gauges() {
        let app = app();
        let a = app.connection_opened(true);
        let b = app.connection_opened(true);
        let c = app.connection_opened(false);
        drop(b);
        app.tick(T0 + 1_000, None); // 2 open
        drop(c);
        app.tick(T0 + 2_000, None); // 1 open
        app.tick(T0 + 60_000, None);
        let page = app.query(&query(Unit::Minute, Order::Forwards, 100, None));
        let row = &page.intervals[0].1;
        assert_eq!(row.get(Key::CONNECTIONS_OPENED), 2.0);
        assert_eq!(row.get(Key::CONNECTIONS_PEAK), 3.0);
        assert_eq!(
            row.get(Key::CONNECTIONS_MIN),
            0.0,
            "none were open when it began"
        );
        assert_eq!(row.get(Key::CONNECTIONS_MEAN), 1.5);
        drop(a);
        // The next minute starts from what is open (1), and its minimum sees the close.
        app.tick(T0 + 120_000, None);
        let page = app.query(&query(Unit::Minute, Order::Forwards, 100, None));
        let row = &page.intervals[1].1;
        assert_eq!(
            (
                row.get(Key::CONNECTIONS_PEAK),
                row.get(Key::CONNECTIONS_MIN)
            ),
            (1.0, 0.0)
        );
    }

    /// Samples skipped while housekeeping slept are filled in with the last sample's
    /// values, in the minutes they fall in: the means match a tick every second.
    #[test]
    fn skipped_samples_are_filled() {
        let ticked = app();
        let slept = app();
        for app in [&ticked, &slept] {
            let a = app.connection_opened(true);
            app.tick(T0 + 1_000, None); // 1 open
            drop(a);
            app.tick(T0 + 2_000, None); // 0 open, then steady
        }
        for second in 3..=89 {
            ticked.tick(T0 + second * 1_000, None);
        }
        assert!(slept.is_steady());
        slept.fill(T0 + 89_000);
        slept.tick(T0 + 89_000, None);
        for app in [&ticked, &slept] {
            app.tick(T0 + 120_000, None);
        }
        let rows = |app: &AppStats| {
            let page = app.query(&query(Unit::Minute, Order::Forwards, 100, None));
            page.intervals
                .iter()
                .map(|(start, row)| (*start, row.get(Key::CONNECTIONS_MEAN)))
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(&slept), rows(&ticked));
        assert_eq!(rows(&ticked)[0], (T0, 1.0 / 59.0));
    }

    /// Channel gauges come from the hub's report on each tick.
    #[test]
    fn channel_gauges() {
        let app = app();
        let report = |held, opened, peak| AppChannelCount {
            app: "a".into(),
            held,
            opened,
            peak,
        };
        app.tick(T0 + 1_000, Some(&report(2, 3, 3)));
        app.tick(T0 + 2_000, Some(&report(0, 0, 2)));
        app.tick(T0 + 60_000, Some(&report(0, 0, 0)));
        let page = app.query(&query(Unit::Minute, Order::Forwards, 100, None));
        let row = &page.intervals[0].1;
        assert_eq!(row.get(Key::CHANNELS_OPENED), 3.0);
        assert_eq!(row.get(Key::CHANNELS_PEAK), 3.0);
        assert_eq!(row.get(Key::CHANNELS_MIN), 0.0);
        assert_eq!(row.get(Key::CHANNELS_MEAN), 1.0);
    }

    /// Minutes aggregate into hours, days and months; a page holds at most `limit`
    /// intervals and the next page continues after the last one, both ways.
    #[test]
    fn aggregation_and_paging() {
        let app = app();
        let minute = |offset_min: i64, n: usize| {
            let row = Row::from_values([(
                Key::message(
                    Direction::Inbound,
                    Transport::Rest,
                    Kind::Messages,
                    Field::Count,
                ),
                n as f64,
            )]);
            app.insert(T0 + offset_min * 60_000, row);
        };
        minute(0, 1);
        minute(1, 2);
        minute(61, 4); // next hour
        minute(122, 8); // the hour after
        let hours = app.query(&query(Unit::Hour, Order::Forwards, 100, None));
        let got: Vec<(i64, f64)> = hours
            .intervals
            .iter()
            .map(|(s, r)| (*s, count(r)))
            .collect();
        assert_eq!(
            got,
            vec![(T0, 3.0), (T0 + 3_600_000, 4.0), (T0 + 7_200_000, 8.0)]
        );
        let day = app.query(&query(Unit::Day, Order::Forwards, 100, None));
        assert_eq!(day.intervals.len(), 1);
        assert_eq!(count(&day.intervals[0].1), 15.0);
        let month = app.query(&query(Unit::Month, Order::Backwards, 100, None));
        assert_eq!(month.intervals.len(), 1);
        assert_eq!(Unit::Month.id(month.intervals[0].0), "2025-02-01:00");

        // Backwards, one hour per page.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = app.query(&query(Unit::Hour, Order::Backwards, 1, after));
            assert_eq!(page.intervals.len(), 1);
            seen.push(count(&page.intervals[0].1));
            after = Some(page.intervals[0].0);
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, vec![8.0, 4.0, 3.0]);
        // Forwards, two minutes per page.
        let first = app.query(&query(Unit::Minute, Order::Forwards, 2, None));
        assert!(first.more);
        let second = app.query(&query(
            Unit::Minute,
            Order::Forwards,
            2,
            Some(first.intervals[1].0),
        ));
        let got: Vec<f64> = second.intervals.iter().map(|(_, r)| count(r)).collect();
        assert_eq!((got, second.more), (vec![4.0, 8.0], false));
    }

    /// The range bounds intervals by their start; fixtures for the open minute add to
    /// what it counted.
    #[test]
    fn range_and_open_minute_fixture() {
        let app = app();
        app.received(Transport::Rest, Kind::Messages, 1, 1);
        let row = Row::from_values([(
            Key::message(
                Direction::Inbound,
                Transport::Rest,
                Kind::Messages,
                Field::Count,
            ),
            10.0,
        )]);
        app.insert(T0, row.clone());
        app.insert(T0 + 120_000, row);
        let mut q = query(Unit::Minute, Order::Forwards, 100, None);
        let got: Vec<f64> = app
            .query(&q)
            .intervals
            .iter()
            .map(|(_, r)| count(r))
            .collect();
        assert_eq!(got, vec![11.0, 10.0]);
        q.first = T0 + 60_000;
        let got: Vec<f64> = app
            .query(&q)
            .intervals
            .iter()
            .map(|(_, r)| count(r))
            .collect();
        assert_eq!(got, vec![10.0]);
        q.first = 0;
        q.last = T0;
        let got: Vec<f64> = app
            .query(&q)
            .intervals
            .iter()
            .map(|(_, r)| count(r))
            .collect();
        assert_eq!(got, vec![11.0]);
    }

    /// At most `minutes_max` minutes are kept per app (the newest), fixtures included,
    /// and at most `apps_max` apps.
    #[test]
    fn bounds() {
        let app = Arc::new(AppStats::new(T0, 3));
        let row = Row::from_values([(Key::CONNECTIONS_OPENED, 1.0)]);
        for minute in 0..5 {
            app.insert(T0 + minute * 60_000, row.clone());
        }
        let starts: Vec<i64> = app
            .query(&query(Unit::Minute, Order::Forwards, 100, None))
            .intervals
            .iter()
            .map(|(s, _)| (s - T0) / 60_000)
            .collect();
        assert_eq!(starts, vec![2, 3, 4]);
        let stats = Stats::new(StatsConfig {
            apps_max: 2,
            ..StatsConfig::default()
        });
        assert!(stats.app("a", T0).is_some());
        assert!(stats.app("b", T0).is_some());
        assert!(stats.app("c", T0).is_none());
        assert!(stats.app("a", T0).is_some(), "known apps still count");
    }
}
