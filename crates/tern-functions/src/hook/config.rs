//! Synchronous functions as configured: `[[apps.before_publish]]` (called before a
//! publish is accepted) and `[apps.on_connect]` (called before a connection is). Kept
//! apart from webhook rules ([`crate::RuleConfig`]): a webhook is asynchronous and
//! durable, these are a request the publisher or connecting client waits for.

use regex::Regex;

use crate::rule::{SigningKey, CHANNEL_FILTER_BYTES_MAX, HEADERS_MAX};

/// Which moment a function is called at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// Before a publish on a matching channel is accepted (Ably's before-publish
    /// rules; API Gateway's `$default` route).
    BeforePublish,
    /// Before a realtime connection is accepted (API Gateway's `$connect`).
    Connect,
}

impl HookKind {
    /// `source` in the request body.
    pub fn source(self) -> &'static str {
        match self {
            HookKind::BeforePublish => "channel.message",
            HookKind::Connect => "connection.connect",
        }
    }
}

/// What happens when the function cannot give an answer (down, timed out, a non-2xx,
/// an answer that does not parse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Fail open: as if the function had accepted.
    Accept,
    /// Fail closed: refused, with a 5xx-class error the client may retry on.
    Reject,
}

/// One function, as configured.
#[derive(Clone, Debug)]
pub struct HookConfig {
    /// Unique among the app's functions; sent as `ruleId`.
    pub id: String,
    pub app: String,
    pub kind: HookKind,
    /// Before-publish only: a regex searched in the channel name (as webhook rules);
    /// `None` = every channel.
    pub channel_filter: Option<String>,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub signing_key: Option<SigningKey>,
    /// The whole call (waiting for a free slot, connecting, the answer) takes at most
    /// this long; then `on_failure` decides.
    pub timeout_ms: u64,
    pub on_failure: FailurePolicy,
    /// Calls of this function in flight on this node at most; a call waits (within its
    /// timeout) for a slot.
    pub in_flight_max: usize,
    /// Bytes of an answer read at most; a longer answer is a failure.
    pub response_bytes_max: usize,
    /// Before-publish only: publishes of one realtime connection waiting (for this
    /// function or behind a publish that does) at most; beyond, the connection's
    /// frames are not read until the oldest is answered.
    pub connection_pending_max: usize,
    /// `site` in requests: the region, or `tern`.
    pub site: String,
}

impl HookConfig {
    pub const fn default_timeout_ms() -> u64 {
        2_000
    }
    pub const fn default_in_flight_max() -> usize {
        256
    }
    pub const fn default_response_bytes_max() -> usize {
        64 * 1024
    }
    pub const fn default_connection_pending_max() -> usize {
        32
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<Hook, HookError> {
        let valid_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_id {
            return Err(self.refuse("id", "must be 1-64 of [A-Za-z0-9_-]"));
        }
        let filter = match &self.channel_filter {
            None => None,
            Some(_) if self.kind == HookKind::Connect => {
                return Err(self.refuse("channel_filter", "a connect function has none"))
            }
            Some(pattern) if pattern.len() > CHANNEL_FILTER_BYTES_MAX => {
                return Err(self.refuse(
                    "channel_filter",
                    format!("longer than {CHANNEL_FILTER_BYTES_MAX} bytes"),
                ))
            }
            Some(pattern) => Some(
                regex::RegexBuilder::new(pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| self.refuse("channel_filter", e.to_string()))?,
            ),
        };
        let target = crate::http::Target::parse(&self.url).map_err(|e| self.refuse("url", e))?;
        if self.headers.len() > HEADERS_MAX {
            return Err(self.refuse("headers", format!("more than {HEADERS_MAX}")));
        }
        for (name, value) in &self.headers {
            let valid = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && hyper::header::HeaderValue::from_str(value).is_ok();
            if !valid {
                return Err(self.refuse("headers", format!("'{name}' is not a valid header")));
            }
        }
        let positive = [
            ("timeout_ms", self.timeout_ms as usize),
            ("in_flight_max", self.in_flight_max),
            ("response_bytes_max", self.response_bytes_max),
            ("connection_pending_max", self.connection_pending_max),
        ];
        if let Some((name, _)) = positive.into_iter().find(|(_, v)| *v == 0) {
            return Err(self.refuse(name, "must be > 0"));
        }
        if self.response_bytes_max > 16 << 20 {
            return Err(self.refuse("response_bytes_max", "is at most 16 MiB"));
        }
        Ok(Hook {
            config: self.clone(),
            filter,
            target,
        })
    }

    fn refuse(&self, setting: &'static str, reason: impl Into<String>) -> HookError {
        HookError {
            function: self.id.clone(),
            setting,
            reason: reason.into(),
        }
    }
}

/// Why a function was refused at boot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting} of function '{function}': {reason}")]
pub struct HookError {
    /// The function's id.
    pub function: String,
    /// The setting at fault, as named in the config file.
    pub setting: &'static str,
    pub reason: String,
}

/// A validated function.
#[derive(Clone, Debug)]
pub struct Hook {
    pub config: HookConfig,
    filter: Option<Regex>,
    pub(crate) target: crate::http::Target,
}

impl Hook {
    /// Whether a publish on `channel` of `app` goes through this function. Internal
    /// channels (names starting `[`, which no client can publish to) never do.
    pub fn matches(&self, app: &str, channel: &str) -> bool {
        self.config.kind == HookKind::BeforePublish
            && self.config.app == app
            && !channel.starts_with('[')
            && self.filter.as_ref().is_none_or(|f| f.is_match(channel))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(kind: HookKind) -> HookConfig {
        HookConfig {
            id: "fn".into(),
            app: "app".into(),
            kind,
            channel_filter: None,
            url: "http://127.0.0.1:9/fn".into(),
            headers: Vec::new(),
            signing_key: None,
            timeout_ms: 1000,
            on_failure: FailurePolicy::Reject,
            in_flight_max: 4,
            response_bytes_max: 1024,
            connection_pending_max: 8,
            site: "tern".into(),
        }
    }

    /// A before-publish function applies to the app's channels its filter finds, never
    /// to internal channels or other apps; a connect function to no publish.
    #[test]
    fn matching() {
        let mut c = config(HookKind::BeforePublish);
        c.channel_filter = Some("^chat:".into());
        let hook = c.validate().unwrap();
        assert!(hook.matches("app", "chat:1"));
        assert!(!hook.matches("app", "news"));
        assert!(!hook.matches("other", "chat:1"));
        let hook = config(HookKind::BeforePublish).validate().unwrap();
        assert!(hook.matches("app", "anything"));
        assert!(!hook.matches("app", "[tern]push"));
        let hook = config(HookKind::Connect).validate().unwrap();
        assert!(!hook.matches("app", "anything"));
    }

    type Change = Box<dyn Fn(&mut HookConfig)>;

    /// Settings that cannot work are refused, naming the setting.
    #[test]
    fn refusals() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.id = "a b".into()), "id"),
            (Box::new(|c| c.url = "ftp://x/".into()), "url"),
            (
                Box::new(|c| c.channel_filter = Some("(".into())),
                "channel_filter",
            ),
            (Box::new(|c| c.timeout_ms = 0), "timeout_ms"),
            (Box::new(|c| c.in_flight_max = 0), "in_flight_max"),
            (Box::new(|c| c.response_bytes_max = 0), "response_bytes_max"),
            (
                Box::new(|c| {
                    c.kind = HookKind::Connect;
                    c.channel_filter = Some("x".into())
                }),
                "channel_filter",
            ),
        ];
        for (change, setting) in cases {
            let mut c = config(HookKind::BeforePublish);
            change(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
    }
}
