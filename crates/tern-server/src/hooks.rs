//! `[[apps.before_publish]]` and `[apps.on_connect]`: an app's synchronous functions as
//! written in the config file, turned into `tern_functions::hook` functions (see
//! config.example.toml and docs/functions.md). Kept apart from `[[apps.rules]]`
//! (webhooks, `rules.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use tern_functions::hook::{FailurePolicy, Hook, HookConfig, HookKind};

use crate::config::{AppConfig, Config};

/// One `[[apps.before_publish]]` table, or the `[apps.on_connect]` table (which has no
/// `channel_filter` or `connection_pending_max`).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FunctionSection {
    pub id: String,
    /// Before publish: regex searched in channel names; absent = every channel.
    pub channel_filter: Option<String>,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Id of one of the app's keys; absent = unsigned.
    pub sign_with_key: Option<String>,
    #[serde(default = "HookConfig::default_timeout_ms")]
    pub timeout_ms: u64,
    /// "accept" (fail open) or "reject" (fail closed).
    #[serde(default = "default_on_failure")]
    pub on_failure: String,
    #[serde(default = "HookConfig::default_in_flight_max")]
    pub in_flight_max: usize,
    #[serde(default = "HookConfig::default_response_bytes_max")]
    pub response_bytes_max: usize,
    #[serde(default = "HookConfig::default_connection_pending_max")]
    pub connection_pending_max: usize,
}

fn default_on_failure() -> String {
    "reject".into()
}

impl FunctionSection {
    fn to_config(&self, app: &AppConfig, kind: HookKind, site: &str) -> anyhow::Result<HookConfig> {
        let table = match kind {
            HookKind::BeforePublish => "apps.before_publish",
            HookKind::Connect => "apps.on_connect",
        };
        let on_failure = match self.on_failure.as_str() {
            "accept" => FailurePolicy::Accept,
            "reject" => FailurePolicy::Reject,
            other => anyhow::bail!(
                "{table}.on_failure of function '{}': '{other}' is not \"accept\" or \"reject\"",
                self.id
            ),
        };
        let what = format!("{table}.sign_with_key of function '{}'", self.id);
        let signing_key = crate::rules::signing_key(app, self.sign_with_key.as_deref(), &what)?;
        Ok(HookConfig {
            id: self.id.clone(),
            app: app.id.clone(),
            kind,
            channel_filter: self.channel_filter.clone(),
            url: self.url.clone(),
            headers: self.headers.clone().into_iter().collect(),
            signing_key,
            timeout_ms: self.timeout_ms,
            on_failure,
            in_flight_max: self.in_flight_max,
            response_bytes_max: self.response_bytes_max,
            connection_pending_max: self.connection_pending_max,
            site: site.into(),
        })
    }
}

/// Every app's functions, validated, before-publish ones in the order written (the
/// first whose filter matches a channel is called). Function ids are unique per app.
pub fn hooks(config: &Config, site: &str) -> anyhow::Result<Vec<Hook>> {
    let mut out = Vec::new();
    for app in &config.apps {
        let mut ids = std::collections::HashSet::new();
        let sections = app
            .before_publish
            .iter()
            .map(|s| (s, HookKind::BeforePublish))
            .chain(app.on_connect.iter().map(|s| (s, HookKind::Connect)));
        for (section, kind) in sections {
            anyhow::ensure!(
                ids.insert(section.id.as_str()),
                "function id '{}' appears twice in app '{}'",
                section.id,
                app.id
            );
            let table = match kind {
                HookKind::BeforePublish => "apps.before_publish",
                HookKind::Connect => "apps.on_connect",
            };
            let hook = section
                .to_config(app, kind, site)?
                .validate()
                .map_err(|e| anyhow::anyhow!("{table}.{e}"))?;
            out.push(hook);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "[[apps]]\nid='a'\n[[apps.keys]]\nid='k'\nsecret='s3cret'\n";

    /// Both tables turn into the functions they describe.
    #[test]
    fn sections() {
        let text = format!(
            "{APP}[[apps.before_publish]]\nid='mod'\nchannel_filter='^chat:'\n\
             url='http://127.0.0.1:9/m'\nsign_with_key='k'\non_failure='accept'\ntimeout_ms=250\n\
             [apps.on_connect]\nid='gate'\nurl='http://127.0.0.1:9/c'\n"
        );
        let config = Config::parse(&text).unwrap();
        let hooks = hooks(&config, "eu-west").unwrap();
        assert_eq!(hooks.len(), 2);
        let publish = &hooks[0];
        assert_eq!(publish.config.kind, HookKind::BeforePublish);
        assert_eq!(publish.config.on_failure, FailurePolicy::Accept);
        assert_eq!(publish.config.timeout_ms, 250);
        assert_eq!(publish.config.signing_key.as_ref().unwrap().name, "a.k");
        assert!(publish.matches("a", "chat:1"));
        assert!(!publish.matches("a", "news"));
        let connect = &hooks[1];
        assert_eq!(connect.config.kind, HookKind::Connect);
        assert_eq!(connect.config.on_failure, FailurePolicy::Reject);
        assert_eq!(connect.config.site, "eu-west");
    }

    /// The commented example in config.example.toml parses once uncommented.
    #[test]
    fn example_parses() {
        let example = include_str!("../../../config.example.toml");
        let start = example
            .find("# [[apps.before_publish]]")
            .expect("example function");
        let block: String = example[start..]
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.strip_prefix("# ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let text =
            format!("{APP}{block}\n").replace("sign_with_key = \"root\"", "sign_with_key = \"k\"");
        let config = Config::parse(&text).unwrap();
        let hooks = hooks(&config, "tern").unwrap();
        assert_eq!(hooks.len(), 2, "{block}");
    }

    /// Bad functions fail at boot with the setting named.
    #[test]
    fn bad_functions() {
        let cases = [
            ("url='http://h:1/'\non_failure='maybe'\n", "on_failure"),
            (
                "url='http://h:1/'\nsign_with_key='nope'\n",
                "has no key 'nope'",
            ),
            ("url='ftp://h/'\n", "apps.before_publish.url"),
            ("url='http://h:1/'\ntimeout_ms=0\n", "timeout_ms"),
            ("url='http://h:1/'\nbogus=1\n", "unknown field"),
        ];
        for (body, expected) in cases {
            let text = format!("{APP}[[apps.before_publish]]\nid='f'\n{body}");
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        let twice = format!(
            "{APP}[[apps.before_publish]]\nid='f'\nurl='http://h:1/'\n[apps.on_connect]\nid='f'\nurl='http://h:1/'\n"
        );
        let err = Config::parse(&twice).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        let filtered =
            format!("{APP}[apps.on_connect]\nid='c'\nurl='http://h:1/'\nchannel_filter='x'\n");
        let err = Config::parse(&filtered).unwrap_err().to_string();
        assert!(err.contains("apps.on_connect.channel_filter"), "{err}");
    }
}
