//! The last warnings, errors and refusals this process logged, for the status page: a
//! `tracing` layer that keeps the newest `RECENT_MAX` WARN/ERROR events, and the edge's
//! refused-request lines, in a ring. Each entry
//! names the thread that logged it, so a node's page can tell its own lines (its
//! runtime's threads are named `tern-<node>`) from another node's in `tern dev`.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Entries kept (process-wide); older ones are dropped.
const RECENT_MAX: usize = 200;
/// Longest message kept, in bytes (a log line quoting client input cannot grow the ring).
const MESSAGE_BYTES_MAX: usize = 500;

static RECENT: Mutex<VecDeque<Entry>> = Mutex::new(VecDeque::new());

/// Where the edge logs refused requests and credentials (with their Ably code, at INFO,
/// rate-limited): kept too, as `refused`, when the log filter lets INFO through.
const REFUSALS_TARGET: &str = "tern_edge::response";

#[derive(Clone, Debug, serde::Serialize)]
pub struct Entry {
    #[serde(rename = "atMs")]
    pub at_ms: i64,
    pub level: &'static str,
    pub target: String,
    pub message: String,
    pub thread: String,
}

/// The layer to add to the subscriber.
pub struct RecentErrors;

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let level = *event.metadata().level();
        let refusal = event.metadata().target() == REFUSALS_TARGET;
        if level > Level::WARN && !refusal {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut message = text.into_line();
        if message.len() > MESSAGE_BYTES_MAX {
            let mut end = MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        let entry = Entry {
            at_ms: tern_edge::now_ms(),
            level: match level {
                Level::ERROR => "error",
                Level::WARN => "warn",
                _ => "refused",
            },
            target: event.metadata().target().to_string(),
            message,
            thread: std::thread::current().name().unwrap_or("").to_string(),
        };
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_MAX {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}

/// The message, then ` key=value` for each other field. An event can carry a field
/// named `message` beside its format message (the edge's refusals do): both are kept,
/// in the order visited (the format message first).
#[derive(Default)]
struct Text {
    messages: Vec<String>,
    fields: String,
}

impl Text {
    fn into_line(self) -> String {
        self.messages.join(": ") + &self.fields
    }
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.messages.push(format!("{value:?}"));
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.messages.push(value.to_string());
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// The newest `max` entries logged on `node`'s threads (`tern-<node>`) or on threads
/// of no node (the writer thread, the main thread), newest first.
pub fn for_node(node: &str, max: usize) -> Vec<Entry> {
    let own = format!("tern-{node}");
    let recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    recent
        .iter()
        .rev()
        .filter(|e| e.thread == own || !e.thread.starts_with("tern-") || is_shared(&e.thread))
        .take(max)
        .cloned()
        .collect()
}

/// Threads that serve every node of the process (named `tern-…` but not a node's).
fn is_shared(thread: &str) -> bool {
    matches!(thread, "tern-history-writer" | "tern-wan-emulation")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// WARN and ERROR lines and the edge's refusals are kept with their fields, other
    /// INFO lines are not, and a node sees its own threads' lines and no other node's.
    #[test]
    fn keeps_warnings_by_thread() {
        // Each thread logs through this subscriber (threads do not inherit a default).
        let subscriber = tracing_subscriber::registry().with(RecentErrors);
        let dispatch = tracing::Dispatch::new(subscriber);
        for (thread, warn) in [("tern-a-1", true), ("tern-b-1", false), ("tern-a-1", true)] {
            let dispatch = dispatch.clone();
            std::thread::Builder::new()
                .name(thread.into())
                .spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        if warn {
                            tracing::warn!(code = 40101, "refused a key");
                            tracing::info!(target: "tern_edge::response", code = 40101,
                                message = %"invalid key", "credential refused");
                        } else {
                            tracing::error!("b failed");
                        }
                        tracing::info!("not kept");
                    })
                })
                .unwrap()
                .join()
                .unwrap();
        }
        let a = for_node("a-1", 10);
        assert!(a.len() >= 2, "{a:?}");
        assert!(a.iter().all(|e| e.thread == "tern-a-1"), "{a:?}");
        assert_eq!(a[0].message, "credential refused: invalid key code=40101");
        assert_eq!(a[0].level, "refused");
        assert_eq!(a[1].message, "refused a key code=40101");
        assert_eq!(a[1].level, "warn");
        let b = for_node("b-1", 10);
        assert!(b
            .iter()
            .any(|e| e.message == "b failed" && e.level == "error"));
        assert!(b.iter().all(|e| e.thread == "tern-b-1"), "{b:?}");
    }
}
