//! MQTT 3.1.1 packets as a client sends them to the MQTT listener (`tern-edge`'s
//! `mqtt`): framed and decoded by the codec the listener uses, each packet's topics
//! through the topic-to-channel mapping and each payload through both payload mappings
//! (`tern_edge::mqtt::fuzzing::inbound` checks that they give it back unchanged).

/// The listener's default `packet_bytes_max`.
const PACKET_BYTES_MAX: usize = 66_560;
/// A small bound too, so over-size announcements are reached with small inputs.
const PACKET_BYTES_SMALL: usize = 64;

/// A client's byte stream: every whole packet decodes, maps or is refused, without a
/// panic; no more packets decode than there are pairs of bytes (the smallest packet).
pub fn mqtt_packets(data: &[u8]) {
    for max in [PACKET_BYTES_MAX, PACKET_BYTES_SMALL] {
        let decoded = tern_edge::mqtt::fuzzing::inbound(data, max);
        assert!(
            decoded <= data.len() / 2,
            "{decoded} packets from {} bytes",
            data.len()
        );
    }
}
