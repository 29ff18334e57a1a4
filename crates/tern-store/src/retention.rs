//! Retention rules per channel-name prefix.

/// Keep at most `max_count` items and nothing older than `max_age_ms` for channels whose
/// name starts with `prefix` ("" = every channel). The longest matching prefix wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionRule {
    pub prefix: String,
    pub max_count: u64,
    pub max_age_ms: i64,
}

/// The rule for `channel`, if any matches.
pub fn rule_for<'a>(rules: &'a [RetentionRule], channel: &str) -> Option<&'a RetentionRule> {
    rules
        .iter()
        .filter(|r| channel.starts_with(&r.prefix))
        .max_by_key(|r| r.prefix.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest matching prefix wins; no match means no rule.
    #[test]
    fn longest_prefix_wins() {
        let rule = |prefix: &str, max_count| RetentionRule {
            prefix: prefix.into(),
            max_count,
            max_age_ms: 1,
        };
        let rules = vec![rule("", 1), rule("chat:", 2), rule("chat:vip:", 3)];
        assert_eq!(rule_for(&rules, "x").unwrap().max_count, 1);
        assert_eq!(rule_for(&rules, "chat:a").unwrap().max_count, 2);
        assert_eq!(rule_for(&rules, "chat:vip:a").unwrap().max_count, 3);
        assert!(rule_for(&rules[1..], "x").is_none());
    }
}
