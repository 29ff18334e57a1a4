//! One rule's delivery as a state machine without I/O or a clock: events go in
//! ([`Delivery::push`]), requests come out ([`Delivery::poll`]), results go back in
//! ([`Delivery::on_result`]), and [`Delivery::next_wakeup`] says when to poll again.
//!
//! One request is in flight per rule, and a failed request is retried with the same
//! events before any later event is sent, so a function sees each channel's events in
//! order, within and across requests. Delivery is at least once: a request whose
//! answer is lost (timeout, crash) is sent again; each event carries a stable `serial`
//! to de-duplicate on.

use std::collections::VecDeque;

use tern_store::Position;

use crate::payload::{self, Entry, Request};
use crate::rule::{Mode, RuleConfig};

/// One event from the rule's outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// Where the event sits in the outbox; the delivered mark advances to it.
    pub position: Position,
    pub entry: Entry,
    /// Bytes of its JSON in a request (the outbox row's size).
    pub bytes: usize,
    /// When the driver queued it: a batch waits `batch_window_ms` from its oldest event.
    pub queued_ms: i64,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// POST this request to the rule's URL, then call [`Delivery::on_result`].
    Send(Request),
    /// The function answered 2xx for the events up to `upto`: record them delivered.
    Delivered { upto: Position, count: usize },
    /// The request kept failing for `retry_for_ms`: its events are given up (recorded
    /// as delivered so they are not tried again, and counted as dropped).
    Dropped { upto: Position, count: usize },
}

/// The request being delivered.
#[derive(Debug)]
struct InFlight {
    request: Request,
    /// Events of the queue's front it carries.
    count: usize,
    first_attempt_ms: i64,
    /// The delay before the next retry; grows by √2 per failure.
    delay_ms: i64,
    /// `Some(t)`: waiting to retry at `t`; `None`: sent, waiting for its result.
    retry_at_ms: Option<i64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Delivery {
    rule: RuleConfig,
    queue: VecDeque<Pending>,
    queue_bytes: usize,
    in_flight: Option<InFlight>,
}

impl Delivery {
    pub fn new(rule: RuleConfig) -> Delivery {
        Delivery {
            rule,
            queue: VecDeque::new(),
            queue_bytes: 0,
            in_flight: None,
        }
    }

    /// Queues an event after every event queued before it.
    pub fn push(&mut self, pending: Pending) {
        self.queue_bytes += pending.bytes;
        self.queue.push_back(pending);
    }

    /// Events queued, the in-flight ones included (the driver bounds this).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes of the events queued.
    pub fn bytes(&self) -> usize {
        self.queue_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A request to send now, if any: a due retry, or a new request once the rule's
    /// mode says one is ready. Call after every `push`, `on_result` and wakeup.
    pub fn poll(&mut self, now_ms: i64) -> Option<Action> {
        if let Some(flight) = &mut self.in_flight {
            return match flight.retry_at_ms {
                Some(at) if at <= now_ms => {
                    flight.retry_at_ms = None;
                    Some(Action::Send(flight.request.clone()))
                }
                _ => None,
            };
        }
        if !self.batch_ready(now_ms) {
            return None;
        }
        let count = self.batch_len();
        let entries: Vec<Entry> = self
            .queue
            .iter()
            .take(count)
            .map(|p| p.entry.clone())
            .collect();
        let request = match self.rule.mode {
            Mode::Single => payload::single(&self.rule, &entries[0]),
            Mode::Batched => payload::batched(&self.rule, &entries),
        };
        self.in_flight = Some(InFlight {
            request: request.clone(),
            count,
            first_attempt_ms: now_ms,
            delay_ms: 0,
            retry_at_ms: None,
        });
        Some(Action::Send(request))
    }

    /// The result of the request [`Self::poll`] returned: `delivered` for a 2xx.
    /// `jitter` in `[0, 1)` spreads retries (±20 %); the caller draws it.
    pub fn on_result(&mut self, delivered: bool, now_ms: i64, jitter: f64) -> Option<Action> {
        let flight = self.in_flight.as_mut()?;
        if flight.retry_at_ms.is_some() {
            // A result for a request not in flight: ignore rather than double-count.
            return None;
        }
        let given_up = now_ms - flight.first_attempt_ms >= self.rule.retry_for_ms;
        if !delivered && !given_up {
            flight.delay_ms = if flight.delay_ms == 0 {
                self.rule.retry_delay_initial_ms
            } else {
                // Ably's backoff: × √2 per failure, capped.
                ((flight.delay_ms as f64) * std::f64::consts::SQRT_2) as i64
            }
            .min(self.rule.retry_delay_max_ms);
            let spread = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
            flight.retry_at_ms = Some(now_ms + ((flight.delay_ms as f64) * spread) as i64);
            return None;
        }
        let count = flight.count;
        self.in_flight = None;
        let mut upto = Position::MIN;
        for pending in self.queue.drain(..count) {
            self.queue_bytes -= pending.bytes;
            upto = pending.position;
        }
        Some(if delivered {
            Action::Delivered { upto, count }
        } else {
            Action::Dropped { upto, count }
        })
    }

    /// When to call [`Self::poll`] next without new input: `None` = only after new
    /// input (nothing queued, or a request awaits its result).
    pub fn next_wakeup(&self) -> Option<i64> {
        if let Some(flight) = &self.in_flight {
            return flight.retry_at_ms;
        }
        let oldest = self.queue.front()?;
        Some(match self.rule.mode {
            Mode::Single => oldest.queued_ms,
            Mode::Batched if self.batch_full() => oldest.queued_ms,
            Mode::Batched => oldest.queued_ms + self.rule.batch_window_ms,
        })
    }

    fn batch_full(&self) -> bool {
        self.queue.len() >= self.rule.batch_items_max
            || self.queue_bytes >= self.rule.request_bytes_max
    }

    fn batch_ready(&self, now_ms: i64) -> bool {
        self.next_wakeup().is_some_and(|at| at <= now_ms)
    }

    /// Events in the next request: one in single mode; in batched mode as many as fit
    /// `batch_items_max` and `request_bytes_max` (at least one, however large).
    fn batch_len(&self) -> usize {
        if self.rule.mode == Mode::Single {
            return 1;
        }
        let mut bytes = 0;
        let mut count = 0;
        for pending in self.queue.iter().take(self.rule.batch_items_max) {
            if count > 0 && bytes + pending.bytes > self.rule.request_bytes_max {
                break;
            }
            bytes += pending.bytes;
            count += 1;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::config;
    use serde_json::Value;

    fn pending(seq: u64, queued_ms: i64) -> Pending {
        Pending {
            position: Position {
                timestamp_ms: 1000 + seq as i64,
                origin: 0,
                seq,
                index: 0,
            },
            entry: Entry {
                source: "channel.message".into(),
                app: "app".into(),
                channel: "ch".into(),
                timestamp: 1000 + seq as i64,
                serial: format!("s{seq}"),
                item: serde_json::json!({"id": format!("m{seq}")}),
            },
            bytes: 100,
            queued_ms,
        }
    }

    fn serials(action: &Action) -> Vec<String> {
        let Action::Send(request) = action else {
            panic!("not a send: {action:?}");
        };
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["serial"].as_str().unwrap().to_string())
            .collect()
    }

    /// A batch waits for its window from the oldest event, then carries at most
    /// `batch_items_max` events; the next batch waits for the first to be answered.
    #[test]
    fn batches_by_window_and_size() {
        let mut delivery = Delivery::new(config("r")); // window 100 ms, 3 items
        delivery.push(pending(1, 0));
        delivery.push(pending(2, 10));
        assert_eq!(delivery.poll(99), None);
        assert_eq!(delivery.next_wakeup(), Some(100));
        let first = delivery.poll(100).unwrap();
        assert_eq!(serials(&first), ["s1", "s2"]);
        for seq in 3..=7 {
            delivery.push(pending(seq, 110));
        }
        // One in flight at a time, even with a full batch queued.
        assert_eq!(delivery.poll(500), None);
        assert_eq!(delivery.next_wakeup(), None);
        let done = delivery.on_result(true, 120, 0.5).unwrap();
        assert_eq!(
            done,
            Action::Delivered {
                upto: pending(2, 0).position,
                count: 2
            }
        );
        // A full batch goes at once, without waiting for the window.
        assert_eq!(serials(&delivery.poll(121).unwrap()), ["s3", "s4", "s5"]);
        delivery.on_result(true, 122, 0.5);
        assert_eq!(delivery.poll(123), None, "two left: waits for the window");
        assert_eq!(serials(&delivery.poll(210).unwrap()), ["s6", "s7"]);
    }

    /// A failed request is retried, unchanged, after 1 s, 1.41 s, 2 s … (±20 %), and
    /// no later event overtakes it.
    #[test]
    fn retries_the_same_request_with_backoff() {
        let mut delivery = Delivery::new(config("r"));
        delivery.push(pending(1, 0));
        let Some(Action::Send(first)) = delivery.poll(100) else {
            panic!()
        };
        delivery.push(pending(2, 150));
        assert_eq!(delivery.on_result(false, 200, 0.5), None);
        assert_eq!(delivery.next_wakeup(), Some(1200));
        assert_eq!(delivery.poll(1199), None);
        assert_eq!(delivery.poll(1200), Some(Action::Send(first.clone())));
        assert_eq!(delivery.on_result(false, 1300, 0.5), None);
        assert_eq!(delivery.next_wakeup(), Some(1300 + 1414));
        assert_eq!(delivery.poll(2714), Some(Action::Send(first)));
        // Jitter 0 → 80 % of the 2 s delay.
        assert_eq!(delivery.on_result(false, 3000, 0.0), None);
        assert_eq!(delivery.next_wakeup(), Some(3000 + 1599));
        assert_eq!(delivery.on_result(true, 3000, 0.0), None, "not in flight");
        delivery.poll(5000);
        assert!(matches!(
            delivery.on_result(true, 5001, 0.0),
            Some(Action::Delivered { count: 1, .. })
        ));
        assert_eq!(serials(&delivery.poll(5200).unwrap()), ["s2"]);
    }

    /// The delay stops growing at `retry_delay_max_ms`, and after `retry_for_ms` of
    /// failures the events are dropped and the next ones go.
    #[test]
    fn gives_up_after_retry_for() {
        let mut rule = config("r");
        rule.retry_delay_max_ms = 5_000;
        rule.retry_for_ms = 60_000;
        let mut delivery = Delivery::new(rule);
        delivery.push(pending(1, 0));
        delivery.push(pending(2, 0));
        delivery.push(pending(3, 0));
        delivery.push(pending(4, 0));
        let mut now = 0;
        assert!(delivery.poll(now).is_some());
        loop {
            now += 10;
            match delivery.on_result(false, now, 0.5) {
                None => {
                    let at = delivery.next_wakeup().unwrap();
                    assert!(at - now <= 5_000, "delay capped");
                    now = at;
                    assert!(matches!(delivery.poll(now), Some(Action::Send(_))));
                }
                Some(action) => {
                    assert!(now >= 60_000);
                    assert_eq!(
                        action,
                        Action::Dropped {
                            upto: pending(3, 0).position,
                            count: 3
                        }
                    );
                    break;
                }
            }
        }
        assert_eq!(serials(&delivery.poll(now + 1000).unwrap()), ["s4"]);
    }

    /// Single mode sends each event alone, at once; the byte bound splits a batch but
    /// never refuses an event larger than it.
    #[test]
    fn single_mode_and_byte_bound() {
        let mut rule = config("r");
        rule.mode = Mode::Single;
        let mut delivery = Delivery::new(rule);
        delivery.push(pending(1, 50));
        delivery.push(pending(2, 50));
        let Some(Action::Send(request)) = delivery.poll(50) else {
            panic!()
        };
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["messages"][0]["id"], "m1");
        delivery.on_result(true, 51, 0.0);
        assert!(delivery.poll(51).is_some());

        let mut rule = config("r");
        rule.request_bytes_max = 250;
        let mut delivery = Delivery::new(rule);
        let mut big = pending(1, 0);
        big.bytes = 1000;
        delivery.push(big);
        delivery.push(pending(2, 0));
        delivery.push(pending(3, 0));
        assert_eq!(serials(&delivery.poll(0).unwrap()), ["s1"]);
        delivery.on_result(true, 1, 0.0);
        assert_eq!(serials(&delivery.poll(100).unwrap()), ["s2", "s3"]);
    }
}
