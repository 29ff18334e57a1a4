//! Realtime frames and REST publish bodies (`tern-protocol`).

use tern_protocol::{
    decode, decode_messages, decode_value, encode, encode_value, Format, ProtocolMessage,
};

use crate::same::same;

/// A WebSocket text frame (`format=json`): decodes or is an error; what decodes goes
/// back out and comes back the same.
pub fn realtime_json(data: &[u8]) {
    realtime(Format::Json, data);
}

/// A WebSocket binary frame (`format=msgpack`), as [`realtime_json`].
pub fn realtime_msgpack(data: &[u8]) {
    realtime(Format::Msgpack, data);
}

fn realtime(format: Format, data: &[u8]) {
    let Ok(frame) = decode(format, data) else {
        return;
    };
    // The server re-encodes decoded frames (fan-out, replication): they must survive.
    let bytes = encode(format, &frame);
    let again = decode(format, &bytes)
        .unwrap_or_else(|err| panic!("{format:?} frame re-encoded to undecodable bytes: {err}"));
    assert!(
        same(&frame, &again),
        "{format:?} frame changed in a round trip:\n{frame:?}\n{again:?}"
    );
    // A frame of one format must also travel in the other (a JSON subscriber of a
    // msgpack publisher); JSON turns binary into base64 text, so only decodability holds.
    let other = match format {
        Format::Json => Format::Msgpack,
        Format::Msgpack => Format::Json,
    };
    let crossed = encode(other, &frame);
    if let Err(err) = decode(other, &crossed) {
        panic!("{format:?} frame re-encoded as {other:?} does not decode: {err}");
    }
}

/// A REST publish body, in both formats (the `Content-Type` is the client's say): one
/// message or an array; what decodes round-trips.
pub fn rest_messages(data: &[u8]) {
    for format in [Format::Json, Format::Msgpack] {
        let Ok(messages) = decode_messages(format, data) else {
            continue;
        };
        let bytes = encode_value(format, &messages);
        let again = decode_messages(format, &bytes).unwrap_or_else(|err| {
            panic!("{format:?} messages re-encoded to undecodable bytes: {err}")
        });
        assert!(
            same(&messages, &again),
            "{format:?} messages changed in a round trip:\n{messages:?}\n{again:?}"
        );
    }
}

/// A comet send body (`POST /comet/{key}/send`): an array of frames, in both formats
/// (the connection's `format` decides); what decodes round-trips, frame by frame.
pub fn comet_send(data: &[u8]) {
    for format in [Format::Json, Format::Msgpack] {
        let Ok(frames) = decode_value::<Vec<ProtocolMessage>>(format, data) else {
            continue;
        };
        let bytes = encode_value(format, &frames);
        let again = decode_value::<Vec<ProtocolMessage>>(format, &bytes).unwrap_or_else(|err| {
            panic!("{format:?} comet frames re-encoded to undecodable bytes: {err}")
        });
        assert_eq!(
            frames.len(),
            again.len(),
            "{format:?} comet frames lost in a round trip"
        );
        for (frame, back) in frames.iter().zip(&again) {
            assert!(
                same(frame, back),
                "{format:?} comet frame changed in a round trip:\n{frame:?}\n{back:?}"
            );
        }
    }
}
