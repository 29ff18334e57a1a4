//! MQTT topics and Ably channels: a topic *is* the channel name, verbatim.
//!
//! MQTT's `/` levels stay in the name (`sensors/kitchen/temp` is the channel
//! `sensors/kitchen/temp`), and Ably namespaces work as they are, since `:` is an
//! ordinary character in a topic (`chat:lobby`). What Ably refuses as a channel name is
//! refused as a topic too: empty, starting with `:`, or starting with `[` (a channel
//! qualifier such as `[?rewind=1]`, which an MQTT client has no business sending).
//! Wildcards (`+`, `#`) have no channel to attach to: a subscription with one is
//! refused (SUBACK 0x80), and a PUBLISH to one is a protocol violation.

use crate::channel_name;

/// Why a topic names no channel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TopicError {
    /// `+` or `#` in the topic.
    Wildcard,
    /// Not a channel name Ably accepts (the reason is `channel_name`'s).
    Invalid(&'static str),
}

/// The channel an MQTT topic (or a subscription's topic filter) names.
pub(crate) fn channel(topic: &str) -> Result<&str, TopicError> {
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    if topic.starts_with('[') {
        return Err(TopicError::Invalid("a topic must not start with '['"));
    }
    let parsed = channel_name::parse(topic).map_err(TopicError::Invalid)?;
    Ok(parsed.base)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Topics map to channels verbatim, namespaces included; wildcards and what Ably
    /// refuses as a channel name are refused.
    #[test]
    fn topics_are_channel_names() {
        assert_eq!(channel("a"), Ok("a"));
        assert_eq!(channel("sensors/kitchen/temp"), Ok("sensors/kitchen/temp"));
        assert_eq!(channel("chat:lobby/room 1"), Ok("chat:lobby/room 1"));
        assert_eq!(channel("/leading/slash/"), Ok("/leading/slash/"));
        assert_eq!(channel("$SYS/x"), Ok("$SYS/x"));
        for wildcard in ["#", "a/#", "+/b", "a/+/c", "a+b"] {
            assert_eq!(channel(wildcard), Err(TopicError::Wildcard), "{wildcard}");
        }
        for bad in [
            "",
            ":x",
            "[?rewind=1]x",
            "[x",
            "a\u{0}b",
            &"x".repeat(2_049),
        ] {
            assert!(
                matches!(channel(bad), Err(TopicError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
