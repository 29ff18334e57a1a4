//! Channel names as clients send them: `name`, or `[?rewind=1&delta=vcdiff]name` with
//! channel params in a qualifier, or a derived channel `[filter=<base64>]name` (a
//! subscription filter, `crate::filter`; params may follow: `[filter=<b64>?rewind=1]`).
//! The hub keys channels by the bare name; frames sent back to a client use the name
//! exactly as that client attached it.

use std::collections::BTreeMap;

/// Longest channel name accepted, qualifier included.
pub(crate) const CHANNEL_NAME_MAX: usize = 2_048;

/// A parsed channel name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ChannelName<'a> {
    /// The name without qualifier: what the hub and capabilities see.
    pub base: &'a str,
    /// Params from a `[?a=b&c=d]` qualifier.
    pub params: BTreeMap<String, String>,
    /// The base64 filter expression of a derived channel (`[filter=…]name`).
    pub filter: Option<&'a str>,
}

impl ChannelName<'_> {
    /// What a derived channel's attachment is known by on its connection: the filter
    /// qualifier and the bare name, params left out (a re-attach may change them).
    pub fn derived_key(&self) -> Option<String> {
        self.filter
            .map(|filter| format!("[filter={filter}]{}", self.base))
    }
}

/// The Ably error for a name [`parse`] refused: 40010, invalid channel name.
pub(crate) fn invalid(reason: &str) -> tern_protocol::ErrorInfo {
    tern_protocol::ErrorInfo::new(tern_protocol::code::INVALID_CHANNEL_NAME, reason)
}

/// Checks a bare name as Ably does: not empty, not starting with `:` (a namespace
/// separator with no namespace) or `[` (a qualifier).
fn check_base(base: &str) -> Result<(), &'static str> {
    match base.chars().next() {
        None => Err("channel name is empty"),
        Some(':') => Err("channel name must not start with ':'"),
        Some('[') => Err("channel name must not start with '['"),
        Some(_) => Ok(()),
    }
}

/// Parses a channel name a realtime connection attaches: as [`parse`], and also a
/// connection's own channel `[connection]<connectionId>` (`crate::connections`), whose
/// bare name keeps the qualifier (the hub keys it so) and which only that connection
/// may attach (the caller checks). Every other path (REST, SSE, MQTT, publish) uses
/// [`parse`], which refuses it.
pub(crate) fn parse_attachable(name: &str) -> Result<ChannelName<'_>, &'static str> {
    if crate::connections::owner_of(name).is_some() {
        return Ok(ChannelName {
            base: name,
            params: BTreeMap::new(),
            filter: None,
        });
    }
    parse(name)
}

/// Parses a channel name. `Err` carries the reason for a 40010 reply ([`invalid`]).
pub(crate) fn parse(name: &str) -> Result<ChannelName<'_>, &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > CHANNEL_NAME_MAX {
        return Err("channel name is too long");
    }
    if name.chars().any(char::is_control) {
        return Err("channel name contains control characters");
    }
    let Some(rest) = name.strip_prefix('[') else {
        check_base(name)?;
        return Ok(ChannelName {
            base: name,
            params: BTreeMap::new(),
            filter: None,
        });
    };
    let (qualifier, base) = rest
        .split_once(']')
        .ok_or("unterminated channel qualifier")?;
    let (filter, query) = match qualifier.strip_prefix("filter=") {
        Some(derived) => {
            let (filter, query) = derived.split_once('?').unwrap_or((derived, ""));
            if filter.is_empty() {
                return Err("empty channel filter");
            }
            (Some(filter), query)
        }
        None => (
            None,
            qualifier
                .strip_prefix('?')
                .ok_or("unsupported channel qualifier (only [?params] and [filter=…])")?,
        ),
    };
    check_base(base)?;
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(k.to_string(), v.to_string());
    }
    Ok(ChannelName {
        base,
        params,
        filter,
    })
}

/// Most messages a count rewind may ask for.
pub(crate) const REWIND_COUNT_MAX: usize = 100;

/// Parses the `rewind` channel param: a message count (`"10"`) or a duration
/// (`"500ms"`, `"10s"`, `"2m"`, `"1h"`) back from `now_ms`.
pub(crate) fn parse_rewind(value: &str, now_ms: i64) -> Result<tern_core::Rewind, &'static str> {
    const INVALID: &str = "invalid rewind: use a count (\"10\") or a duration (\"30s\", \"2m\")";
    if let Ok(count) = value.parse::<usize>() {
        return Ok(tern_core::Rewind::Count(count.min(REWIND_COUNT_MAX)));
    }
    let split = value.find(|c: char| !c.is_ascii_digit()).ok_or(INVALID)?;
    let (number, unit) = value.split_at(split);
    let number: i64 = number.parse().map_err(|_| INVALID)?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(INVALID),
    };
    let back_ms = number.checked_mul(unit_ms).ok_or(INVALID)?;
    Ok(tern_core::Rewind::Since(now_ms.saturating_sub(back_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rewind params parse as counts (capped) and durations; anything else is refused.
    #[test]
    fn parses_rewind() {
        use tern_core::Rewind;
        assert_eq!(parse_rewind("5", 1_000), Ok(Rewind::Count(5)));
        assert_eq!(parse_rewind("5000", 0), Ok(Rewind::Count(REWIND_COUNT_MAX)));
        assert_eq!(parse_rewind("10s", 60_000), Ok(Rewind::Since(50_000)));
        assert_eq!(parse_rewind("2m", 200_000), Ok(Rewind::Since(80_000)));
        assert_eq!(parse_rewind("500ms", 1_000), Ok(Rewind::Since(500)));
        for bad in ["", "x", "10d", "s", "-1", "99999999999999999999h"] {
            assert!(parse_rewind(bad, 0).is_err(), "{bad}");
        }
    }

    /// Plain names pass through; qualifiers yield params and the bare name; malformed
    /// names are refused with a reason.
    #[test]
    fn parses_qualifiers() {
        assert_eq!(parse("room").unwrap().base, "room");
        let q = parse("[?rewind=1&delta=vcdiff]chat:room").unwrap();
        assert_eq!(q.base, "chat:room");
        assert_eq!(q.params.get("rewind").map(String::as_str), Some("1"));
        assert!(parse("").is_err());
        assert!(parse("[?rewind=1").is_err());
        assert!(parse("[meta]x").is_err());
        assert!(parse("[?a=1]").is_err());
        assert!(parse("a\u{0}b").is_err());
        // Ably's rules: no leading ':' (so not '::' either) and no second qualifier.
        for bad in [":hell", "::", "[?a=1]:x", "[?a=1][?b=2]x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("a::b").unwrap().base, "a::b");
        assert_eq!(invalid("x").code, 40010);
    }

    /// Derived channels: the filter, any params after it, and the bare name; an empty
    /// filter is refused; a plain qualifier has no filter.
    #[test]
    fn parses_filter_qualifiers() {
        let derived = parse("[filter=bmFtZQ==]chan").unwrap();
        assert_eq!((derived.base, derived.filter), ("chan", Some("bmFtZQ==")));
        assert_eq!(
            derived.derived_key().as_deref(),
            Some("[filter=bmFtZQ==]chan")
        );
        let with_params = parse("[filter=bmFtZQ==?rewind=1]chan").unwrap();
        assert_eq!(with_params.filter, Some("bmFtZQ=="));
        assert_eq!(
            with_params.params.get("rewind").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            with_params.derived_key().as_deref(),
            Some("[filter=bmFtZQ==]chan")
        );
        assert!(parse("[filter=]chan").is_err());
        assert!(parse("[filter=?a=1]chan").is_err());
        assert!(parse("[internal]revocations").is_err());
        assert_eq!(parse("[?a=1]chan").unwrap().filter, None);
    }
}
