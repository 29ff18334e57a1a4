//! Retention rules per channel-name prefix, and which rows a trim deletes.

/// Keep at most `max_count` items per channel (messages and presence counted apart) and
/// nothing older than `max_age_ms`, for channels whose name starts with `prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionRule {
    /// Channel-name prefix such as `"chat:"`; `""` matches every channel. The longest
    /// matching prefix wins. A channel no rule matches is kept forever.
    pub prefix: String,
    pub max_count: u64,
    pub max_age_ms: i64,
}

/// The rule for a channel name, if any matches.
pub(crate) fn rule_for<'r>(
    rules: &'r [RetentionRule],
    channel: &[u8],
) -> Option<&'r RetentionRule> {
    rules
        .iter()
        .filter(|rule| channel.starts_with(rule.prefix.as_bytes()))
        .max_by_key(|rule| rule.prefix.len())
}

/// One channel's retention at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TrimPlan {
    pub(crate) max_count: u64,
    /// Items with a timestamp below this are too old.
    pub(crate) cutoff_ms: i64,
}

impl TrimPlan {
    pub(crate) fn new(rule: &RetentionRule, now_ms: i64) -> TrimPlan {
        TrimPlan {
            max_count: rule.max_count,
            cutoff_ms: now_ms.saturating_sub(rule.max_age_ms),
        }
    }

    /// Whether the oldest remaining row goes, given the channel holds `count` rows.
    /// Rows are visited oldest first, so the first row that stays ends the trim.
    pub(crate) fn doomed(&self, count: u64, timestamp_ms: i64) -> bool {
        count > self.max_count || timestamp_ms < self.cutoff_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, max_count: u64) -> RetentionRule {
        RetentionRule {
            prefix: prefix.into(),
            max_count,
            max_age_ms: 1,
        }
    }

    /// The longest matching prefix wins; no match means no rule.
    #[test]
    fn longest_prefix_wins() {
        let rules = vec![rule("", 1), rule("chat:vip:", 3), rule("chat:", 2)];
        let count = |channel: &str| rule_for(&rules, channel.as_bytes()).map(|r| r.max_count);
        assert_eq!(count("x"), Some(1));
        assert_eq!(count("chat:a"), Some(2));
        assert_eq!(count("chat:vip:a"), Some(3));
        assert_eq!(rule_for(&rules[1..], b"x"), None);
    }

    /// A row goes if the channel is over its count or the row is past its age; extreme
    /// ages saturate instead of overflowing.
    #[test]
    fn doomed_by_count_or_age() {
        let plan = TrimPlan::new(
            &RetentionRule {
                prefix: String::new(),
                max_count: 2,
                max_age_ms: 100,
            },
            1_000,
        );
        assert!(plan.doomed(3, 950));
        assert!(plan.doomed(1, 899));
        assert!(!plan.doomed(2, 900));
        let forever = RetentionRule {
            prefix: String::new(),
            max_count: u64::MAX,
            max_age_ms: i64::MAX,
        };
        assert!(!TrimPlan::new(&forever, i64::MIN).doomed(u64::MAX, i64::MIN));
    }
}
