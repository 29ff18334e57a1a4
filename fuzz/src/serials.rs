//! Cursors a client hands back: `channelSerial` (ATTACH, `from_serial`), history
//! page positions (`page=` in a `Link`) and message serials (a URL's `{serial}`, a
//! change's `serial`, an annotation's `messageSerial`).

use tern_core::cursor::CURSOR_ORIGINS_MAX;
use tern_core::{Cursor, SerialPosition};
use tern_store::Position;

/// A `channelSerial`: what decodes re-encodes to a serial that decodes to the same
/// cursor, within the origin bound and in the URL-safe alphabet.
pub fn channel_serial(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(cursor) = Cursor::decode(text) else {
        return;
    };
    assert!(cursor.origins().count() <= CURSOR_ORIGINS_MAX);
    let encoded = cursor.encode();
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'.' || b == b'-'),
        "{encoded:?} is not URL-safe"
    );
    assert_eq!(
        Cursor::decode(&encoded),
        Some(cursor),
        "{text:?} → {encoded:?}"
    );
}

/// A history `page` position: what decodes re-encodes to the same position, in
/// lowercase hex and dashes.
pub fn page_position(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(position) = Position::decode(text) else {
        return;
    };
    let encoded = position.encode();
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-'),
        "{encoded:?} is not lowercase hex"
    );
    assert_eq!(
        Position::decode(&encoded),
        Some(position),
        "{text:?} → {encoded:?}"
    );
}

/// A message serial: what decodes re-encodes to the same text (so a serial names one
/// position), fixed-width.
pub fn message_serial(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(position) = SerialPosition::decode(text) else {
        return;
    };
    let encoded = position.encode();
    assert_eq!(encoded, text, "{text:?} decodes to another serial");
    assert_eq!(encoded.len(), tern_core::serial::SERIAL_LEN);
}
