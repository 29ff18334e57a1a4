//! Webhook rules: which events of which channels go to which URL, and how (Ably's
//! "integration rules" for generic HTTP endpoints).

use std::sync::Arc;

use regex::Regex;

/// Longest channel filter accepted, in bytes: a regex is compiled once at boot, but an
/// unbounded pattern is still an unbounded allocation.
pub const CHANNEL_FILTER_BYTES_MAX: usize = 1024;
/// Most extra headers per rule.
pub const HEADERS_MAX: usize = 32;

/// The event sources Ably's rules know (see `docs/functions.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `channel.message`: every message published.
    Message,
    /// `channel.presence`: every presence change (enter, update, leave).
    Presence,
    /// `channel.lifecycle`: a channel opened or closed, cluster-wide.
    Lifecycle,
    /// `channel.occupancy`: a channel's occupancy changed.
    Occupancy,
    /// `connection.disconnected`: a realtime connection ended for good (API Gateway's
    /// `$disconnect`; see `docs/functions.md`). Channel filters do not apply.
    Disconnect,
}

impl Source {
    /// Ably's name for the source, as in `source` and `x-ably-envelope-source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Message => "channel.message",
            Source::Presence => "channel.presence",
            Source::Lifecycle => "channel.lifecycle",
            Source::Occupancy => "channel.occupancy",
            Source::Disconnect => "connection.disconnected",
        }
    }

    pub fn parse(text: &str) -> Option<Source> {
        [
            Source::Message,
            Source::Presence,
            Source::Lifecycle,
            Source::Occupancy,
            Source::Disconnect,
        ]
        .into_iter()
        .find(|source| source.as_str() == text)
    }
}

/// Ably's request modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One request per event (one message or presence message).
    Single,
    /// Events collected for `batch_window_ms` (or until a bound) into one request.
    Batched,
}

/// The key whose secret signs a rule's requests (`X-Ably-Key`, `X-Ably-Signature`).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// `appId.keyId`, sent as `X-Ably-Key`.
    pub name: String,
    /// The part after the `:`: the HMAC-SHA256 key.
    pub secret: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: configs end up in logs.
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish()
    }
}

/// One rule of one app, as configured (`[[apps.rules]]`).
#[derive(Clone, Debug)]
pub struct RuleConfig {
    /// Unique within the app; sent as `webhookId` / `ruleId`. Also names the rule's
    /// outbox, so changing it abandons what the old id had pending.
    pub id: String,
    pub app: String,
    /// Ably's channel filter: a regex searched in the channel name (unanchored, as
    /// Ably's); `None` = every channel.
    pub channel_filter: Option<String>,
    pub sources: Vec<Source>,
    /// `http://host:port/path`.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub mode: Mode,
    /// Batched: how long the first queued event waits for company.
    pub batch_window_ms: i64,
    /// Batched: events per request at most (Ably: 1000).
    pub batch_items_max: usize,
    /// Bytes of event JSON per request at most (one larger event still goes alone).
    pub request_bytes_max: usize,
    /// Single mode only: `false` sends the message data as the body with
    /// `x-ably-message-*` headers (batched requests are always enveloped).
    pub enveloped: bool,
    pub signing_key: Option<SigningKey>,
    /// Events waiting for delivery at most; beyond, new events are dropped and counted.
    pub outbox_items_max: u64,
    /// One request (connect, send, response head and body) may take this long.
    pub request_timeout_ms: u64,
    /// First retry delay; each next one is √2 times longer (Ably's backoff) up to
    /// `retry_delay_max_ms`, with ±20 % jitter.
    pub retry_delay_initial_ms: i64,
    pub retry_delay_max_ms: i64,
    /// A request failing for this long is given up: its events are dropped, counted
    /// and logged (Ably keeps them 5 minutes).
    pub retry_for_ms: i64,
    /// `site` in payloads: where the event was delivered from (the region, or `tern`).
    pub site: String,
}

impl RuleConfig {
    pub const fn default_batch_window_ms() -> i64 {
        1000
    }
    pub const fn default_batch_items_max() -> usize {
        1000
    }
    pub const fn default_request_bytes_max() -> usize {
        1 << 20
    }
    pub const fn default_outbox_items_max() -> u64 {
        10_000
    }
    pub const fn default_request_timeout_ms() -> u64 {
        15_000
    }
    pub const fn default_retry_delay_initial_ms() -> i64 {
        1_000
    }
    pub const fn default_retry_delay_max_ms() -> i64 {
        60_000
    }
    pub const fn default_retry_for_ms() -> i64 {
        300_000
    }

    /// Checks everything that can be checked without a network; the error names the
    /// setting.
    pub fn validate(&self) -> Result<Rule, RuleError> {
        self.check_id()?;
        let filter = self.compile_filter()?;
        self.check_sources()?;
        crate::http::Target::parse(&self.url).map_err(|e| self.refuse("url", e))?;
        self.check_headers()?;
        if self.mode == Mode::Batched && !self.enveloped {
            return Err(self.refuse(
                "enveloped",
                "batched requests are always enveloped (as Ably's); set enveloped = true or request_mode = \"single\"",
            ));
        }
        self.check_limits()?;
        Ok(Rule {
            config: self.clone(),
            filter,
        })
    }

    fn refuse(&self, setting: &'static str, reason: impl Into<String>) -> RuleError {
        RuleError {
            rule: self.id.clone(),
            setting,
            reason: reason.into(),
        }
    }

    fn check_id(&self) -> Result<(), RuleError> {
        let valid = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(())
        } else {
            Err(self.refuse("id", "must be 1-64 of [A-Za-z0-9_-]"))
        }
    }

    fn compile_filter(&self) -> Result<Option<Regex>, RuleError> {
        let Some(pattern) = &self.channel_filter else {
            return Ok(None);
        };
        if pattern.len() > CHANNEL_FILTER_BYTES_MAX {
            return Err(self.refuse(
                "channel_filter",
                format!("longer than {CHANNEL_FILTER_BYTES_MAX} bytes"),
            ));
        }
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(Some)
            .map_err(|e| self.refuse("channel_filter", e.to_string()))
    }

    fn check_sources(&self) -> Result<(), RuleError> {
        if self.sources.is_empty() {
            return Err(self.refuse("events", "is empty"));
        }
        Ok(())
    }

    fn check_headers(&self) -> Result<(), RuleError> {
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
        Ok(())
    }

    fn check_limits(&self) -> Result<(), RuleError> {
        let positive = [
            ("batch_items_max", self.batch_items_max as i64),
            ("request_bytes_max", self.request_bytes_max as i64),
            ("outbox_items_max", self.outbox_items_max as i64),
            ("request_timeout_ms", self.request_timeout_ms as i64),
            ("retry_delay_initial_ms", self.retry_delay_initial_ms),
            ("retry_delay_max_ms", self.retry_delay_max_ms),
        ];
        if let Some((name, _)) = positive.into_iter().find(|(_, value)| *value <= 0) {
            return Err(self.refuse(name, "must be > 0"));
        }
        if self.batch_items_max > tern_store::LIMIT_MAX {
            return Err(self.refuse(
                "batch_items_max",
                format!("is at most {}", tern_store::LIMIT_MAX),
            ));
        }
        if self.batch_window_ms < 0 {
            return Err(self.refuse("batch_window_ms", "must be >= 0"));
        }
        if self.retry_for_ms < 0 {
            return Err(self.refuse("retry_for_ms", "must be >= 0"));
        }
        Ok(())
    }
}

/// Why a rule was refused at boot: which rule, which setting, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rules.{setting} of rule '{rule}': {reason}")]
pub struct RuleError {
    /// The rule's id, as configured.
    pub rule: String,
    /// The setting at fault, as named in `[[apps.rules]]`.
    pub setting: &'static str,
    pub reason: String,
}

/// A validated rule: its config and compiled filter.
#[derive(Clone, Debug)]
pub struct Rule {
    pub config: RuleConfig,
    filter: Option<Regex>,
}

impl Rule {
    /// Whether an event of `source` on `channel` of `app` goes to this rule. Tern's
    /// internal channels (`[tern]push`, `[internal]revocations`: names no client can use,
    /// as they start with `[`) never do: their events are the node's own state.
    pub fn matches(&self, app: &str, channel: &str, source: Source) -> bool {
        !channel.starts_with('[')
            && self.config.app == app
            && self.config.sources.contains(&source)
            && self.filter.as_ref().is_none_or(|f| f.is_match(channel))
    }
}

/// Every rule of every app, shared.
pub type Rules = Arc<Vec<Rule>>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(id: &str) -> RuleConfig {
        RuleConfig {
            id: id.into(),
            app: "app".into(),
            channel_filter: None,
            sources: vec![Source::Message],
            url: "http://127.0.0.1:9/hook".into(),
            headers: Vec::new(),
            mode: Mode::Batched,
            batch_window_ms: 100,
            batch_items_max: 3,
            request_bytes_max: 1 << 20,
            enveloped: true,
            signing_key: None,
            outbox_items_max: 100,
            request_timeout_ms: 1000,
            retry_delay_initial_ms: 1000,
            retry_delay_max_ms: 60_000,
            retry_for_ms: 300_000,
            site: "tern".into(),
        }
    }

    /// The channel filter is an unanchored regex search, as Ably's examples read.
    #[test]
    fn filter_follows_ablys_examples() {
        let names = [
            "mychannel:public",
            "public",
            "public:events",
            "public:events:conferences",
            "public:news:americas",
            "public:news:europe",
        ];
        let cases: [(&str, &[&str]); 4] = [
            ("^public$", &["public"]),
            (":public$", &["mychannel:public"]),
            ("^public.*europe$", &["public:news:europe"]),
            ("news", &["public:news:americas", "public:news:europe"]),
        ];
        for (pattern, expected) in cases {
            let mut c = config("r");
            c.channel_filter = Some(pattern.into());
            let rule = c.validate().unwrap();
            let got: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| rule.matches("app", n, Source::Message))
                .collect();
            assert_eq!(got, expected, "{pattern}");
        }
        let rule = config("r").validate().unwrap();
        assert!(rule.matches("app", "public", Source::Message));
        assert!(!rule.matches("app", "[tern]push", Source::Message));
        assert!(!rule.matches("app", "[internal]revocations", Source::Message));
        assert!(!rule.matches("other-app", "public", Source::Message));
        assert!(!rule.matches("app", "public", Source::Presence));
    }

    /// Settings that cannot work are refused at boot, naming the setting.
    #[test]
    fn invalid_rules_are_refused() {
        let mut cases: Vec<(RuleConfig, &str)> = Vec::new();
        let mut c = config("bad id");
        c.id = "bad id".into();
        cases.push((c, "rules.id"));
        let mut c = config("r");
        c.channel_filter = Some("(".into());
        cases.push((c, "channel_filter"));
        let mut c = config("r");
        c.sources = Vec::new();
        cases.push((c, "rules.events"));
        let mut c = config("r");
        c.url = "ftp://example.com/".into();
        cases.push((c, "rules.url"));
        let mut c = config("r");
        c.enveloped = false;
        cases.push((c, "rules.enveloped"));
        let mut c = config("r");
        c.headers = vec![("bad header".into(), "v".into())];
        cases.push((c, "rules.headers"));
        let mut c = config("r");
        c.batch_items_max = 0;
        cases.push((c, "batch_items_max"));
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
    }
}
