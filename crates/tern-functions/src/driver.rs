//! One task per rule drives its [`Delivery`] with real time, the store and HTTP: it
//! loads committed outbox rows after the last one loaded (bounded in count and bytes),
//! sends what the state machine asks for, and writes a delivered mark after each 2xx.
//! After a restart it starts from the newest mark, so what was in flight when the node
//! died is sent again (at least once) and nothing committed is skipped.

use std::sync::Arc;
use std::time::Duration;

use tern_store::{Direction, HistoryQuery, HistoryStore, Position, StoredItem};
use tokio::task::JoinHandle;

use crate::delivery::{Action, Delivery, Pending};
use crate::http::{Client, Target};
use crate::outbox::{dropped, Outbox, RuleOutbox};
use crate::payload::Entry;

/// How often an idle driver looks at its outbox even without a wakeup (a safety net:
/// every commit wakes it).
const IDLE_RECHECK: Duration = Duration::from_secs(5);
/// A takeover of a dead node's webhooks ends once it has had nothing to deliver for
/// this long (repair brings a dead origin's stragglers within seconds).
const TAKEOVER_QUIET_END: Duration = Duration::from_secs(120);

/// Starts one delivery task per rule on the current runtime.
pub fn spawn(outbox: &Arc<Outbox>) -> Vec<JoinHandle<()>> {
    outbox
        .rules
        .iter()
        .map(|rule| {
            let driver = Driver::new(outbox.store.clone(), rule.clone());
            tokio::spawn(driver.run())
        })
        .collect()
}

/// Starts delivering a dead origin's shadow rows accepted at or after `from_ms`
/// ([`crate::handover`]).
pub(crate) fn spawn_takeover(store: Arc<dyn HistoryStore>, shadow: Arc<RuleOutbox>, from_ms: i64) {
    let mut driver = Driver::new(store, shadow);
    driver.from_ms = Some(from_ms);
    tokio::spawn(driver.run());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Driver {
    store: Arc<dyn HistoryStore>,
    outbox: Arc<RuleOutbox>,
    client: Client,
    delivery: Delivery,
    /// The last outbox row loaded into `delivery`.
    loaded: Position,
    /// Rows loaded at most at once: two requests' worth, in count and in bytes.
    load_items_max: usize,
    load_bytes_max: usize,
    loaded_bytes: usize,
    /// Timestamp of the last mark written.
    mark_ms: i64,
    /// A takeover: shadow rows accepted before this are skipped (the dead origin
    /// delivered them), and the task ends after [`TAKEOVER_QUIET_END`] with nothing.
    from_ms: Option<i64>,
    /// When a row was last loaded or a request last answered.
    active_at: std::time::Instant,
}

impl Driver {
    fn new(store: Arc<dyn HistoryStore>, outbox: Arc<RuleOutbox>) -> Driver {
        let config = &outbox.rule.config;
        // Validated with the rule; `run` reports a failure if not.
        let target = Target::parse(&config.url).unwrap_or(Target {
            authority: String::new(),
            path: "/".into(),
            tls_host: None,
        });
        Driver {
            load_items_max: 2 * config.batch_items_max,
            load_bytes_max: 2 * config.request_bytes_max,
            loaded_bytes: 0,
            mark_ms: 0,
            delivery: Delivery::new(config.clone()),
            client: Client::new(target),
            store,
            outbox,
            loaded: Position::MIN,
            from_ms: None,
            active_at: std::time::Instant::now(),
        }
    }

    async fn run(mut self) {
        let rule = self.outbox.rule.config.id.clone();
        let store = self.store.clone();
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.read_delivered(store.as_ref())).await {
            Ok(Ok(position)) => {
                tracing::debug!(%rule, delivered = ?position, "webhook delivery starts after the delivered mark");
                self.loaded = position;
            }
            other => {
                // Without the mark, start from the oldest row kept: duplicates, not loss.
                tracing::warn!(%rule, ?other, "reading the webhook delivered mark failed");
            }
        }
        loop {
            // Loaded again after every action: a delivery makes room for more rows.
            self.load().await;
            if let Some(action) = self.delivery.poll(now_ms()) {
                self.act(action).await;
                continue;
            }
            if self.from_ms.is_some()
                && self.delivery.is_empty()
                && self.active_at.elapsed() >= TAKEOVER_QUIET_END
            {
                tracing::info!(%rule, "webhook takeover done");
                return;
            }
            let wait = self.delivery.next_wakeup().map_or(IDLE_RECHECK, |at| {
                Duration::from_millis(
                    (at - now_ms()).clamp(0, IDLE_RECHECK.as_millis() as i64) as u64
                )
            });
            // Woken by a commit of new rows, or when the state machine's time comes.
            let _ = tokio::time::timeout(wait, self.outbox.committed.notified()).await;
        }
    }

    /// Loads committed rows after `loaded` while there is room.
    async fn load(&mut self) {
        if self.outbox.shadow_of.is_none() {
            // Here too, not only after a delivery: a function that is down delivers
            // nothing, and its backlog is what the gauge is for.
            metrics::gauge!("tern_webhook_outbox_undelivered", "rule" => self.outbox.rule.config.id.clone())
                .set(self.outbox.undelivered() as f64);
        }
        while self.delivery.len() < self.load_items_max && self.loaded_bytes < self.load_bytes_max {
            let mut query = HistoryQuery::new(self.outbox.entries.clone());
            query.direction = Direction::Forwards;
            query.after = Some(self.loaded);
            // A page is read whole: at most one request's worth at a time.
            query.limit = (self.load_items_max - self.delivery.len())
                .min(self.outbox.rule.config.batch_items_max);
            let store = self.store.clone();
            let page = match tokio::task::spawn_blocking(move || store.query(&query)).await {
                Ok(Ok(page)) => page,
                other => {
                    tracing::warn!(rule = %self.outbox.rule.config.id, ?other, "reading the webhook outbox failed");
                    return;
                }
            };
            let mut more = page.next.is_some() && !page.items.is_empty();
            tracing::trace!(
                rule = %self.outbox.rule.config.id,
                first = page.items.first().map(|i| i.seq),
                last = page.items.last().map(|i| i.seq),
                more,
                "webhook outbox rows loaded"
            );
            for item in page.items {
                if self.loaded_bytes >= self.load_bytes_max && !self.delivery.is_empty() {
                    // Full in bytes: the rest stay on disk, read again after `loaded`.
                    more = false;
                    break;
                }
                self.push(item);
            }
            if !more {
                return;
            }
        }
    }

    fn push(&mut self, item: StoredItem) {
        self.active_at = std::time::Instant::now();
        if let Some(from_ms) = self.from_ms {
            let accepted = crate::handover::ShadowRow::accepted_ms(&item.payload);
            if accepted.is_some_and(|ms| ms < from_ms) {
                // Delivered by the dead origin before its last published mark.
                self.loaded = item.position();
                return;
            }
        }
        let expected = self.loaded.seq + 1;
        // Shadow rows are not numbered densely: gaps mean nothing there.
        if self.outbox.shadow_of.is_none() && self.loaded != Position::MIN && item.seq > expected {
            // Rows removed before delivery (retention): counted, never silent.
            dropped(&self.outbox.rule.config.id, "expired", item.seq - expected);
        }
        self.loaded = item.position();
        let Some(entry) = Entry::decode(&item.payload) else {
            dropped(&self.outbox.rule.config.id, "undecodable", 1);
            return;
        };
        self.loaded_bytes += item.payload.len();
        self.delivery.push(Pending {
            position: item.position(),
            entry,
            bytes: item.payload.len(),
            queued_ms: now_ms(),
        });
    }

    async fn act(&mut self, action: Action) {
        let rule = self.outbox.rule.config.id.clone();
        match action {
            Action::Send(request) => {
                self.active_at = std::time::Instant::now();
                let timeout = Duration::from_millis(self.outbox.rule.config.request_timeout_ms);
                let started = std::time::Instant::now();
                let result = self.client.post(&request, timeout).await;
                metrics::histogram!("tern_webhook_request_seconds", "rule" => rule.clone())
                    .record(started.elapsed().as_secs_f64());
                let delivered = matches!(result, Ok(status) if (200..300).contains(&status));
                let outcome = match &result {
                    Ok(status) => status.to_string(),
                    Err(_) => "error".to_string(),
                };
                metrics::counter!("tern_webhook_requests_total", "rule" => rule.clone(), "status" => outcome)
                    .increment(1);
                if !delivered {
                    tracing::debug!(%rule, ?result, "webhook request failed; will retry");
                }
                let jitter: f64 = rand::random();
                if let Some(next) = self.delivery.on_result(delivered, now_ms(), jitter) {
                    Box::pin(self.act(next)).await;
                }
            }
            Action::Delivered { upto, count } => {
                metrics::counter!("tern_webhook_events_delivered_total", "rule" => rule)
                    .increment(count as u64);
                self.mark(upto);
            }
            Action::Dropped { upto, count } => {
                dropped(&rule, "retry_for_elapsed", count as u64);
                self.mark(upto);
            }
        }
    }

    /// Records `upto` as delivered: the newest mark row (durable with the next group
    /// commit; a crash before it only means `upto`'s request is sent again).
    fn mark(&mut self, upto: Position) {
        tracing::trace!(rule = %self.outbox.rule.config.id, upto = upto.seq, "webhook events delivered");
        self.outbox.set_delivered(upto);
        if self.outbox.shadow_of.is_none() {
            metrics::gauge!("tern_webhook_outbox_undelivered", "rule" => self.outbox.rule.config.id.clone())
                .set(self.outbox.undelivered() as f64);
        }
        self.loaded_bytes = self.delivery.bytes();
        // Never behind the previous mark, so the newest by position is the latest.
        self.mark_ms = self.mark_ms.max(now_ms());
        let item = StoredItem {
            timestamp_ms: self.mark_ms,
            origin: 0,
            seq: upto.seq,
            index: 0,
            payload: upto.encode().into(),
        };
        let noop = Box::new(|_: Result<(), tern_store::StoreError>| {});
        if let Err(err) = self
            .store
            .append(vec![(self.outbox.marks.clone(), item)], noop)
        {
            tracing::warn!(rule = %self.outbox.rule.config.id, error = %err, "writing the webhook delivered mark failed");
        }
    }
}
