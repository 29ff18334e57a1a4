//! What every metric means: the `# HELP` line of `/metrics`. Series without labels, and
//! labelled ones whose labels are known at start, are registered at zero at start, so a
//! scrape sees every one of them from the first. (The `process_*` series are written by
//! `process.rs`; every series also carries `node` and `region`, from `recorder.rs`.)

/// (name, labelled, help) for every counter.
const COUNTERS: &[(&str, bool, &str)] = &[
    (
        "tern_cluster_frames_refused_total",
        true,
        "Cluster frames refused by shape checks, by reason",
    ),
    (
        "tern_cluster_hello_refused_total",
        true,
        "Cluster link greetings refused (node id, version), by reason",
    ),
    (
        "tern_comet_poll_timeouts_total",
        false,
        "Comet connections dropped for not polling within comet_poll_timeout_ms",
    ),
    (
        "tern_connection_handovers_total",
        false,
        "Connections resumed from another node's key, by outcome (taken, vouched, refused, unanswered)",
    ),
    (
        "tern_connections_refused_total",
        true,
        "Connections refused or cut before serving, by the setting that refused them",
    ),
    (
        "tern_control_frames_refused_total",
        false,
        "ATTACH/DETACH/HEARTBEAT frames refused by control_frames_per_second",
    ),
    (
        "tern_forward_failures_total",
        false,
        "REST reads forwarded to a channel's home that failed",
    ),
    (
        "tern_frames_sent_total",
        false,
        "Frames written to realtime clients",
    ),
    (
        "tern_departures_untracked_total",
        false,
        "Connections not tracked for node-departure reports (over the per-app bound)",
    ),
    (
        "tern_function_failures_total",
        true,
        "Before-publish and connect function calls that failed (on_failure decided), by function and reason",
    ),
    (
        "tern_function_rejections_total",
        false,
        "Publishes and connections a function rejected",
    ),
    (
        "tern_gossip_oversize_total",
        false,
        "Gossip datagrams too large to send",
    ),
    (
        "tern_gossip_rejected_total",
        true,
        "Gossip datagrams dropped before parsing (forged, stale, truncated), by reason",
    ),
    (
        "tern_history_backfilled_items_total",
        false,
        "History items copied from another region to a new channel home",
    ),
    (
        "tern_history_dropped_total",
        false,
        "History writes dropped (store queue full or write lost)",
    ),
    (
        "tern_messages_published_total",
        false,
        "Messages published on this node (REST, realtime, MQTT)",
    ),
    (
        "tern_mqtt_connections_total",
        false,
        "MQTT connections accepted",
    ),
    (
        "tern_mqtt_refused_total",
        true,
        "MQTT connections or packets refused, by reason",
    ),
    (
        "tern_nacks_total",
        false,
        "Publishes answered NACK (not stored, not replicated in time)",
    ),
    (
        "tern_outbound_overflows_total",
        false,
        "Client queues that overflowed (the client reads too slowly)",
    ),
    (
        "tern_push_delivered_total",
        false,
        "Push notifications delivered (ablyChannel transport)",
    ),
    (
        "tern_push_log_undecodable_total",
        false,
        "Push log entries that could not be decoded",
    ),
    (
        "tern_push_mutations_total",
        false,
        "Push registrations and subscriptions changed",
    ),
    (
        "tern_push_undelivered_total",
        true,
        "Push notifications not delivered, by reason",
    ),
    (
        "tern_replica_ack_timeouts_total",
        false,
        "Publishes whose replica acknowledgements timed out",
    ),
    (
        "tern_replication_buffer_drops_total",
        false,
        "Events dropped from a peer's resend buffer (the peer will repair)",
    ),
    (
        "tern_replication_control_bytes_total",
        true,
        "Bytes of replication control frames sent, by peer",
    ),
    (
        "tern_replication_event_bytes_total",
        true,
        "Bytes of replicated event frames sent, by peer",
    ),
    (
        "tern_replication_events_sent_total",
        true,
        "Events replicated to peers, by peer",
    ),
    (
        "tern_replication_frames_ignored_total",
        true,
        "Replication frames ignored, by reason",
    ),
    (
        "tern_replication_frames_refused_total",
        false,
        "Replication frames refused (too large to send)",
    ),
    (
        "tern_replication_handoff_channels_total",
        false,
        "Stored channels whose new home (after a membership change) this node told of them",
    ),
    (
        "tern_replication_dead_gaps_skipped_total",
        false,
        "Gaps of dead origins that no node filled for 30 s, skipped so the events held behind them were delivered",
    ),
    (
        "tern_replication_stalls_full_total",
        false,
        "Gaps not watched for giving up because 4,096 were watched already",
    ),
    (
        "tern_replication_interest_refused_total",
        false,
        "Interest announcements refused (over bounds)",
    ),
    (
        "tern_replication_resends_total",
        true,
        "Events sent to a peer again, by peer",
    ),
    (
        "tern_replication_warm_refused_total",
        false,
        "Channel state requests (Sync) refused",
    ),
    (
        "tern_stats_apps_refused_total",
        false,
        "Apps not counted in statistics (over stats.apps_max)",
    ),
    (
        "tern_stats_peer_failures_total",
        false,
        "Peers that did not answer a statistics request",
    ),
    (
        "tern_store_commit_failures_total",
        false,
        "History store commits that failed",
    ),
    (
        "tern_tls_handshake_failures_total",
        false,
        "Client TLS handshakes that failed",
    ),
    (
        "tern_webhook_events_delivered_total",
        true,
        "Events delivered to functions, by rule",
    ),
    (
        "tern_webhook_events_dropped_total",
        true,
        "Events given up on (retry_for_ms, outbox_items_max), by rule and reason",
    ),
    (
        "tern_webhook_requests_total",
        true,
        "Requests sent to functions, by rule and result",
    ),
    (
        "tern_webhook_takeovers_total",
        true,
        "Dead nodes' webhooks this node started delivering, by rule",
    ),
    (
        "tern_write_timeouts_total",
        false,
        "Client writes that timed out (write_timeout_ms)",
    ),
];

/// (name, labelled, help) for every gauge.
const GAUGES: &[(&str, bool, &str)] = &[
    (
        "tern_channels",
        false,
        "Channels held in memory on this node",
    ),
    (
        "tern_connections",
        true,
        "Open client connections on this node, by transport (ws, comet, sse, mqtt)",
    ),
    (
        "tern_build_info",
        true,
        "Always 1; the labels say which build runs (version, profile)",
    ),
    (
        "tern_link_rtt_seconds",
        true,
        "QUIC round-trip time to each linked peer (the network's, not emulated WAN delay)",
    ),
    (
        "tern_outbound_queue_depth_max",
        false,
        "Deepest outbound queue of any client of this node over the last 15 s (frames)",
    ),
    (
        "tern_replication_unacked_events",
        true,
        "Events sent to a peer and not yet acknowledged, by peer",
    ),
    (
        "tern_webhook_outbox_undelivered",
        true,
        "Events waiting in a rule's outbox, by rule",
    ),
];

/// (name, labelled, help) for every histogram (all in seconds; buckets in `recorder.rs`).
const HISTOGRAMS: &[(&str, bool, &str)] = &[
    (
        "tern_delivery_seconds",
        true,
        "Publish to written to a WebSocket subscriber of this node (oldest event of each write batch), by origin: local (published here) or remote (replicated)",
    ),
    (
        "tern_publish_ack_seconds",
        false,
        "Realtime publish applied to ACK queued (stored here and on ack_replicas peers)",
    ),
    (
        "tern_replication_lag_seconds",
        true,
        "Event queued for a peer to the peer's Stored ack covering it, by peer",
    ),
    (
        "tern_store_commit_seconds",
        false,
        "One history store commit (a group of appends)",
    ),
    (
        "tern_webhook_request_seconds",
        true,
        "One request to a function (webhook), by rule",
    ),
];

/// Describes every metric to the installed recorder and registers the unlabelled ones at
/// zero. Call once, after the recorder is installed.
pub fn describe_metrics() {
    for &(name, labelled, help) in COUNTERS {
        metrics::describe_counter!(name, help);
        if !labelled {
            metrics::counter!(name).increment(0);
        }
    }
    for &(name, labelled, help) in GAUGES {
        metrics::describe_gauge!(name, help);
        if !labelled {
            metrics::gauge!(name).increment(0.0);
        }
    }
    for &(name, labelled, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
        if !labelled {
            let _ = metrics::histogram!(name);
        }
    }
    // Labelled series whose labels are known at start.
    for transport in tern_edge::TRANSPORTS {
        metrics::gauge!("tern_connections", "transport" => transport).increment(0.0);
    }
    for origin in ["local", "remote"] {
        let _ = metrics::histogram!("tern_delivery_seconds", "origin" => origin);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    metrics::gauge!("tern_build_info", "version" => env!("CARGO_PKG_VERSION"), "profile" => profile)
        .set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code records is described here (its name appears in the table),
    /// so no series reaches `/metrics` without a `# HELP` line.
    #[test]
    fn every_recorded_metric_is_described() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut missing = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    if path.file_name().is_some_and(|n| n != "tests") {
                        stack.push(path);
                    }
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") || path.ends_with("describe.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("\"tern_") {
                    let name: String = text[at + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    let known = COUNTERS
                        .iter()
                        .chain(GAUGES)
                        .chain(HISTOGRAMS)
                        .any(|(n, _, _)| *n == name);
                    let recorded = text[..at].trim_end().ends_with('(');
                    if recorded && !known && !missing.contains(&name) {
                        missing.push(name);
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "metrics without a description: {missing:?}"
        );
    }
}
