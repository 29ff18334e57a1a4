//! Fuzz harnesses for every Tern decoder that takes network bytes.
//!
//! Each harness takes raw bytes, runs the real decoder on them and, where they decode,
//! checks what must hold of the result (a round trip, a bound, a narrowing). A panic,
//! a failed check, a hang or a runaway allocation is a finding. The same functions run
//! under libFuzzer (`fuzz_targets/`, through `cargo fuzz`) and, for the smoke test and
//! the saved findings, as a plain test over the checked-in corpus (`tests/corpus.rs`).
//!
//! # Layout
//!
//! - `protocol`: realtime `ProtocolMessage` in JSON and msgpack, REST publish bodies,
//!   comet send bodies (arrays of frames).
//! - `auth`: token request bodies, Tern's `tn1.` tokens, HS256 JWTs.
//! - `names`: channel names with `[?params]` qualifiers, the `rewind` param.
//! - `serials`: `channelSerial` cursors, history page positions and message serials.
//! - `cluster`: inter-node `FrameV1` and the authenticated gossip datagram.
//! - `mqtt`: MQTT 3.1.1 packets from a client of the MQTT listener.
//! - `same`: value comparison that allows for float parsing's last bit.

pub mod auth;
pub mod cluster;
pub mod mqtt;
pub mod names;
pub mod protocol;
pub mod same;
pub mod serials;

/// The clock every harness passes to code that takes `now_ms`, so that a run is a
/// function of its input: 2026-12-06T07:38:45Z, when `seeds/capture.mjs` recorded the
/// SDK traffic, so captured token requests are within their timestamp window.
pub const NOW_MS: i64 = 1_796_542_725_000;

/// One fuzz target: its name (a `fuzz_targets/` file and a `corpus/` folder) and its
/// harness.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `scripts/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "realtime_json",
        run: protocol::realtime_json,
    },
    Target {
        name: "realtime_msgpack",
        run: protocol::realtime_msgpack,
    },
    Target {
        name: "rest_messages",
        run: protocol::rest_messages,
    },
    Target {
        name: "comet_send",
        run: protocol::comet_send,
    },
    Target {
        name: "token_request",
        run: auth::token_request,
    },
    Target {
        name: "tern_token",
        run: auth::tern_token,
    },
    Target {
        name: "jwt",
        run: auth::jwt,
    },
    Target {
        name: "channel_name",
        run: names::channel_name,
    },
    Target {
        name: "channel_serial",
        run: serials::channel_serial,
    },
    Target {
        name: "page_position",
        run: serials::page_position,
    },
    Target {
        name: "message_serial",
        run: serials::message_serial,
    },
    Target {
        name: "cluster_frame",
        run: cluster::cluster_frame,
    },
    Target {
        name: "cluster_record",
        run: cluster::cluster_record,
    },
    Target {
        name: "gossip_datagram",
        run: cluster::gossip_datagram,
    },
    Target {
        name: "mqtt_packets",
        run: mqtt::mqtt_packets,
    },
];
