//! This node's occupancy reports (`tern_functions::lifecycle`): once a second, the
//! channels a lifecycle or occupancy rule matches whose local occupancy changed, and
//! every `REFRESH_MS` all non-empty ones, published on the app's internal occupancy
//! channel, where one node of the cluster aggregates them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tern_core::{ChannelKey, Hub, Publisher};
use tern_functions::lifecycle::{report_message, Metrics, Report, OCCUPANCY_CHANNEL, REFRESH_MS};
use tern_functions::{Outbox, Source};

/// How often local occupancy is compared with what was last reported (Ably debounces
/// occupancy events too).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Channels looked at per round at most.
const CHANNELS_SCAN_MAX: usize = 100_000;
/// Reports per published event (one message each).
const REPORTS_PER_EVENT: usize = 100;

/// Starts reporting if any rule wants lifecycle or occupancy events.
pub fn start(hub: Arc<Hub>, outbox: Arc<Outbox>) {
    if outbox.rules().iter().any(|r| wants_meta(&r.rule)) {
        tokio::spawn(report(hub, outbox));
    }
}

/// Whether `rule` wants lifecycle or occupancy events.
fn wants_meta(rule: &tern_functions::Rule) -> bool {
    rule.config
        .sources
        .iter()
        .any(|s| matches!(s, Source::Lifecycle | Source::Occupancy))
}

async fn report(hub: Arc<Hub>, outbox: Arc<Outbox>) {
    // What was last reported per channel (only non-empty ones are kept).
    let mut reported: HashMap<ChannelKey, Metrics> = HashMap::new();
    let mut refreshed_ms = 0;
    let mut tick = tokio::time::interval(REPORT_EVERY);
    loop {
        tick.tick().await;
        let now_ms = tern_edge::now_ms();
        let refresh = now_ms - refreshed_ms >= REFRESH_MS;
        if refresh {
            refreshed_ms = now_ms;
        }
        let mut current: HashMap<ChannelKey, Metrics> = HashMap::new();
        for (key, _) in hub.cursors(CHANNELS_SCAN_MAX) {
            let wanted = outbox.rules().iter().any(|r| {
                r.rule.matches(&key.app, &key.name, Source::Lifecycle)
                    || r.rule.matches(&key.app, &key.name, Source::Occupancy)
            });
            if !wanted {
                continue;
            }
            let metrics = hub
                .status(&key)
                .map(|s| Metrics::from_status(&s))
                .unwrap_or_default();
            if metrics != Metrics::default() {
                current.insert(key, metrics);
            }
        }
        let mut by_app: HashMap<String, Vec<Report>> = HashMap::new();
        if refresh {
            // A heartbeat per app, so a new aggregator's warm-up starts even when no
            // channel is occupied.
            for rule in outbox.rules().iter().filter(|r| wants_meta(&r.rule)) {
                by_app
                    .entry(rule.rule.config.app.clone())
                    .or_insert_with(|| {
                        vec![Report {
                            channel: String::new(),
                            metrics: Metrics::default(),
                        }]
                    });
            }
        }
        for (key, metrics) in &current {
            if refresh || reported.get(key) != Some(metrics) {
                by_app.entry(key.app.to_string()).or_default().push(Report {
                    channel: key.name.to_string(),
                    metrics: *metrics,
                });
            }
        }
        for key in reported.keys().filter(|k| !current.contains_key(*k)) {
            by_app.entry(key.app.to_string()).or_default().push(Report {
                channel: key.name.to_string(),
                metrics: Metrics::default(),
            });
        }
        for (app, reports) in by_app {
            let key = ChannelKey::new(&app, OCCUPANCY_CHANNEL);
            for chunk in reports.chunks(REPORTS_PER_EVENT) {
                let publisher = Publisher {
                    connection_id: None,
                    frame_id: format!("occupancy-{now_ms}-{}", rand::random::<u64>()),
                };
                let messages = chunk.iter().map(report_message).collect();
                if let Err(err) = hub.publish(&key, &publisher, messages, now_ms) {
                    tracing::warn!(%app, error = %err, "publishing occupancy reports failed");
                }
            }
        }
        reported = current;
    }
}
