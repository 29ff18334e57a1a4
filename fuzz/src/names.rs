//! Channel names as clients send them (`tern-edge`'s `channel_name`): in ATTACH and
//! publish frames, REST paths; `[?rewind=…]` params and `[filter=…]` subscription
//! filters among them.

use tern_core::Rewind;
use tern_edge::fuzzing::{
    channel_filter, filter_selects, parse_channel_name, parse_rewind, CHANNEL_NAME_MAX,
    REWIND_COUNT_MAX,
};

use crate::NOW_MS;

/// A channel name: what parses has a non-empty base that ends the name, within the
/// length bound and free of control characters; every param value, and the whole
/// input, goes through the rewind parser.
pub fn channel_name(data: &[u8]) {
    // Names arrive as JSON or msgpack strings, or percent-decoded path segments: UTF-8.
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    rewind(name);
    let Ok((base, params)) = parse_channel_name(name) else {
        return;
    };
    assert!(!base.is_empty(), "empty base from {name:?}");
    assert!(
        name.len() <= CHANNEL_NAME_MAX,
        "{} bytes accepted",
        name.len()
    );
    assert!(
        name.ends_with(base),
        "base {base:?} is not the end of {name:?}"
    );
    assert!(
        !base.chars().any(char::is_control),
        "control character in {base:?}"
    );
    if let Some(filter) = channel_filter(name) {
        assert!(
            name.starts_with("[filter="),
            "filter without [filter= in {name:?}"
        );
        // Any filter a client can name is decoded and evaluated without a panic.
        let _ = filter_selects(filter);
    } else if base.len() < name.len() {
        assert!(name.starts_with("[?"), "qualifier without [? in {name:?}");
    } else {
        assert!(params.is_empty(), "params without a qualifier in {name:?}");
    }
    for value in params.values() {
        rewind(value);
    }
}

/// A `rewind` value: counts are capped, durations reach back from now, never forward.
fn rewind(value: &str) {
    match parse_rewind(value, NOW_MS) {
        Ok(Rewind::Count(count)) => assert!(count <= REWIND_COUNT_MAX, "rewind {count}"),
        Ok(Rewind::Since(since_ms)) => assert!(since_ms <= NOW_MS, "rewind into the future"),
        Err(_) => {}
    }
}
