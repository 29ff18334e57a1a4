//! `[[apps.rules]]`: an app's webhook rules as written in the config file, turned into
//! `tern_functions` rules (see config.example.toml and docs/functions.md).

use std::collections::BTreeMap;

use serde::Deserialize;
use tern_functions::{Mode, Rule, RuleConfig, SigningKey, Source};

use crate::config::{AppConfig, Config};

/// One `[[apps.rules]]` table.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub id: String,
    /// Regex searched in channel names; absent = every channel.
    pub channel_filter: Option<String>,
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// "single" or "batched".
    #[serde(default = "default_request_mode")]
    pub request_mode: String,
    #[serde(default = "RuleConfig::default_batch_window_ms")]
    pub batch_window_ms: i64,
    #[serde(default = "RuleConfig::default_batch_items_max")]
    pub batch_items_max: usize,
    #[serde(default = "RuleConfig::default_request_bytes_max")]
    pub request_bytes_max: usize,
    #[serde(default = "default_enveloped")]
    pub enveloped: bool,
    /// Id of one of the app's keys (`[[apps.keys]] id`); absent = unsigned.
    pub sign_with_key: Option<String>,
    #[serde(default = "RuleConfig::default_outbox_items_max")]
    pub outbox_items_max: u64,
    #[serde(default = "RuleConfig::default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "RuleConfig::default_retry_delay_initial_ms")]
    pub retry_delay_initial_ms: i64,
    #[serde(default = "RuleConfig::default_retry_delay_max_ms")]
    pub retry_delay_max_ms: i64,
    #[serde(default = "RuleConfig::default_retry_for_ms")]
    pub retry_for_ms: i64,
}

fn default_events() -> Vec<String> {
    vec![Source::Message.as_str().into()]
}

fn default_request_mode() -> String {
    "batched".into()
}

fn default_enveloped() -> bool {
    true
}

/// The key `key_id` of `app` as a function's signing key (`X-Ably-Key`,
/// `X-Ably-Signature`); `what` names the setting in the error when the app has no such
/// key. Shared by webhook rules and synchronous functions (`hooks.rs`).
pub(crate) fn signing_key(
    app: &AppConfig,
    key_id: Option<&str>,
    what: &str,
) -> anyhow::Result<Option<SigningKey>> {
    let Some(key_id) = key_id else {
        return Ok(None);
    };
    let key = app
        .keys
        .iter()
        .find(|k| k.id == key_id)
        .ok_or_else(|| anyhow::anyhow!("{what}: app '{}' has no key '{key_id}'", app.id))?;
    Ok(Some(SigningKey {
        name: format!("{}.{}", app.id, key.id),
        secret: key.secret.clone(),
    }))
}

impl RuleSection {
    fn to_config(&self, app: &AppConfig, site: &str) -> anyhow::Result<RuleConfig> {
        let sources = self
            .events
            .iter()
            .map(|e| {
                Source::parse(e).ok_or_else(|| {
                    anyhow::anyhow!(
                        "apps.rules.events of rule '{}': unknown event type '{e}'",
                        self.id
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mode = match self.request_mode.as_str() {
            "single" => Mode::Single,
            "batched" => Mode::Batched,
            other => anyhow::bail!(
                "apps.rules.request_mode of rule '{}': '{other}' is not \"single\" or \"batched\"",
                self.id
            ),
        };
        let what = format!("apps.rules.sign_with_key of rule '{}'", self.id);
        let signing_key = signing_key(app, self.sign_with_key.as_deref(), &what)?;
        Ok(RuleConfig {
            id: self.id.clone(),
            app: app.id.clone(),
            channel_filter: self.channel_filter.clone(),
            sources,
            url: self.url.clone(),
            headers: self.headers.clone().into_iter().collect(),
            mode,
            batch_window_ms: self.batch_window_ms,
            batch_items_max: self.batch_items_max,
            request_bytes_max: self.request_bytes_max,
            enveloped: self.enveloped,
            signing_key,
            outbox_items_max: self.outbox_items_max,
            request_timeout_ms: self.request_timeout_ms,
            retry_delay_initial_ms: self.retry_delay_initial_ms,
            retry_delay_max_ms: self.retry_delay_max_ms,
            retry_for_ms: self.retry_for_ms,
            site: site.into(),
        })
    }
}

/// Every app's rules, validated; `site` is what payloads name as where they came
/// from (the region, or "tern" for a single node). Rule ids are unique per app.
pub fn rules(config: &Config, site: &str) -> anyhow::Result<Vec<Rule>> {
    let mut out = Vec::new();
    for app in &config.apps {
        let mut ids = std::collections::HashSet::new();
        for section in &app.rules {
            anyhow::ensure!(
                ids.insert(section.id.as_str()),
                "apps.rules.id '{}' appears twice in app '{}'",
                section.id,
                app.id
            );
            let rule = section
                .to_config(app, site)?
                .validate()
                .map_err(|e| anyhow::anyhow!("apps.{e}"))?;
            out.push(rule);
        }
    }
    Ok(out)
}

/// The store's retention rule for outboxes, if any rule exists: keeps the newest
/// `outbox_items_max` rows of the largest rule.
pub fn outbox_retention(config: &Config) -> Option<tern_store::RetentionRule> {
    let items_max = config
        .apps
        .iter()
        .flat_map(|app| &app.rules)
        .map(|rule| rule.outbox_items_max)
        .max()?;
    Some(tern_functions::outbox::retention_rule(items_max))
}

/// The store's retention rule for occupancy reports (`[internal]occupancy`), if any rule
/// wants lifecycle or occupancy events: only the aggregate in memory reads them, so an
/// hour of them (at most 1,000 per app) is plenty to look back at.
pub fn occupancy_retention(config: &Config) -> Option<tern_store::RetentionRule> {
    let wanted = config.apps.iter().flat_map(|app| &app.rules).any(|rule| {
        rule.events
            .iter()
            .any(|e| e == Source::Lifecycle.as_str() || e == Source::Occupancy.as_str())
    });
    wanted.then(|| tern_store::RetentionRule {
        prefix: tern_functions::lifecycle::OCCUPANCY_CHANNEL.into(),
        max_count: 1_000,
        max_age_ms: 60 * 60 * 1000,
    })
}

/// The hub's journal, and the webhook outbox behind it if any rule exists.
pub type Journaled = (
    std::sync::Arc<dyn tern_core::Journal>,
    Option<std::sync::Arc<tern_functions::Outbox>>,
);

/// The hub's journal with webhook outboxes in front of `history` (the store journal),
/// and the outbox whose deliveries [`tern_functions::spawn`] starts; without rules,
/// `history` alone. Reads what an earlier run left undelivered (blocking, at boot).
pub fn journal(
    config: &Config,
    site: &str,
    store: std::sync::Arc<dyn tern_store::HistoryStore>,
    origin: tern_core::OriginId,
    history: std::sync::Arc<dyn tern_core::Journal>,
) -> anyhow::Result<Journaled> {
    let rules = rules(config, site)?;
    if rules.is_empty() {
        return Ok((history, None));
    }
    let outbox = tern_functions::Outbox::open(store, origin, rules)
        .map_err(|e| anyhow::anyhow!("opening the webhook outboxes: {e}"))?;
    let journal = std::sync::Arc::new(tern_functions::OutboxJournal {
        history,
        outbox: outbox.clone(),
    });
    Ok((journal, Some(outbox)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "[[apps]]\nid='a'\n[[apps.keys]]\nid='k'\nsecret='s3cret'\n";

    /// A rule with every setting turns into the rule it describes, signed with the
    /// named key's secret.
    #[test]
    fn full_rule() {
        let text = format!(
            "{APP}[[apps.rules]]\nid='r1'\nchannel_filter='^chat:'\n\
             events=['channel.message','channel.presence']\nurl='http://127.0.0.1:9/h'\n\
             headers={{x-team='blue'}}\nrequest_mode='single'\nenveloped=false\n\
             sign_with_key='k'\nbatch_window_ms=50\noutbox_items_max=7\n"
        );
        let config = Config::parse(&text).unwrap();
        let rules = rules(&config, "eu-west").unwrap();
        let c = &rules[0].config;
        assert_eq!(c.app, "a");
        assert_eq!(c.sources, [Source::Message, Source::Presence]);
        assert_eq!(c.mode, Mode::Single);
        assert!(!c.enveloped);
        assert_eq!(c.headers, [("x-team".to_string(), "blue".to_string())]);
        let key = c.signing_key.as_ref().unwrap();
        assert_eq!((key.name.as_str(), key.secret.as_str()), ("a.k", "s3cret"));
        assert_eq!((c.batch_window_ms, c.outbox_items_max), (50, 7));
        assert_eq!(c.site, "eu-west");
        assert!(rules[0].matches("a", "chat:1", Source::Presence));
        assert!(!rules[0].matches("a", "news", Source::Message));
        assert_eq!(outbox_retention(&config).unwrap().max_count, 7);
    }

    /// The commented rule in config.example.toml parses once uncommented.
    #[test]
    fn example_rule_parses() {
        let example = include_str!("../../../config.example.toml");
        let start = example.find("# [[apps.rules]]").expect("example rule");
        let block: String = example[start..]
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.strip_prefix("# ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let text =
            format!("{APP}{block}\n").replace("sign_with_key = \"root\"", "sign_with_key = \"k\"");
        let config = Config::parse(&text).unwrap();
        let rules = rules(&config, "tern").unwrap();
        assert_eq!(rules[0].config.id, "chat-hook");
        assert_eq!(rules[0].config.sources, [Source::Message, Source::Presence]);
    }

    /// Bad rules fail at boot with the setting named.
    #[test]
    fn bad_rules() {
        let cases = [
            (
                "url='http://h:1/'\nsign_with_key='nope'\n",
                "has no key 'nope'",
            ),
            (
                "url='http://h:1/'\nevents=['channel.bogus']\n",
                "unknown event type",
            ),
            (
                "url='http://h:1/'\nrequest_mode='streamed'\n",
                "request_mode",
            ),
            ("url='ftp://h/'\n", "rules.url"),
            ("url='http://h:1/'\nchannel_filter='('\n", "channel_filter"),
            ("url='http://h:1/'\nunknown_setting=1\n", "unknown field"),
        ];
        for (body, expected) in cases {
            let text = format!("{APP}[[apps.rules]]\nid='r'\n{body}");
            // Validation runs the rules through `rules`, so parsing refuses them.
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        let twice = format!("{APP}[[apps.rules]]\nid='r'\nurl='http://h:1/'\n[[apps.rules]]\nid='r'\nurl='http://h:1/'\n");
        let err = Config::parse(&twice).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }
}
