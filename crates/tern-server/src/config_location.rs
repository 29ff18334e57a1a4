//! Where in a config file a value was written, for the errors serde cannot place. A
//! key's capability is JSON inside a TOML string: serde_json's "line 1 column 17" is a
//! position in that string, which in a file of fifty lines points nowhere. This finds
//! the string in the file (through toml's spanned parse tree) and maps the JSON's
//! position to the file's line and column.

use toml::de::{DeTable, DeValue};

/// A 1-based line and column of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileLocation {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for FileLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// One step of a path into the TOML tree: a table key or an array index.
pub(crate) enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The file position of a JSON error inside the TOML string at `path`, when the file
/// holds that string as `json` (a `--set` may have replaced it: then `None`, and the
/// error is reported without a file position). The column is exact for literal strings
/// and for basic strings without escapes before the error.
pub(crate) fn json_error_location(
    text: &str,
    path: &[Step<'_>],
    json: &str,
    err: &serde_json::Error,
) -> Option<FileLocation> {
    let start = string_value_start(text, path, json)?;
    let rest = &text[start..];
    let delimiter = ["'''", "\"\"\"", "'", "\""]
        .into_iter()
        .find(|d| rest.starts_with(d))?;
    let mut content = start + delimiter.len();
    // TOML trims a newline right after a multi-line string's opening delimiter.
    if delimiter.len() == 3 {
        if text[content..].starts_with("\r\n") {
            content += 2;
        } else if text[content..].starts_with('\n') {
            content += 1;
        }
    }
    let mut offset = content;
    for _ in 1..err.line() {
        offset += text[offset..].find('\n')? + 1;
    }
    let line_text = &text[offset..];
    let line_end = line_text.find('\n').unwrap_or(line_text.len());
    offset += line_text[..line_end]
        .char_indices()
        .nth(err.column().saturating_sub(1))
        .map_or(line_end, |(i, _)| i);
    Some(location_of(text, offset))
}

/// serde_json's message without its " at line L column C" (given by the location).
pub(crate) fn json_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// The byte offset of the opening quote of the string at `path`, if it is `expected`.
fn string_value_start(text: &str, path: &[Step<'_>], expected: &str) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut at = root.get_ref().get(*first)?;
    for step in rest {
        at = match (step, at.get_ref()) {
            (Step::Key(key), DeValue::Table(table)) => table.get(*key)?,
            (Step::Index(i), DeValue::Array(array)) => array.get(*i)?,
            _ => return None,
        };
    }
    match at.get_ref() {
        DeValue::String(s) if s.as_ref() == expected => Some(at.span().start),
        _ => None,
    }
}

fn location_of(text: &str, offset: usize) -> FileLocation {
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    FileLocation {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locate(text: &str, json: &str) -> Option<FileLocation> {
        let err = serde_json::from_str::<serde_json::Value>(json).unwrap_err();
        let path = [
            Step::Key("apps"),
            Step::Index(0),
            Step::Key("keys"),
            Step::Index(1),
            Step::Key("capability"),
        ];
        json_error_location(text, &path, json, &err)
    }

    /// A JSON error in a one-line literal string points at the file's character.
    #[test]
    fn one_line_string() {
        let json = r#"{"*":["publish",]}"#;
        let text = format!(
            "[[apps]]\nid = 'a'\n[[apps.keys]]\nid = 'k'\nsecret = 's'\n\
             [[apps.keys]]\nid = 'j'\nsecret = 's'\ncapability = '{json}'\n"
        );
        let at = locate(&text, json).unwrap();
        assert_eq!(at.line, 9);
        let line = text.lines().nth(8).unwrap();
        assert_eq!(&line[at.column - 1..], "]}'", "{line}");
    }

    /// In a multi-line string, the JSON's third line is the file's third line after
    /// the opening delimiter.
    #[test]
    fn multi_line_string() {
        let json = "{\n  \"chat:*\": [\"publish\"],\n  \"x\": [\"subscribe\"\n}";
        let text = format!(
            "[[apps]]\nid = 'a'\n[[apps.keys]]\nid = 'k'\nsecret = 's'\n\
             [[apps.keys]]\nid = 'j'\nsecret = 's'\ncapability = \"\"\"\n{json}\"\"\"\n"
        );
        let at = locate(&text, json).unwrap();
        assert_eq!(at.line, 13, "the closing brace: {at}");
    }

    /// A value the file does not hold (replaced by --set), or a path that is not
    /// there, has no file position.
    #[test]
    fn not_in_the_file() {
        let text = "[[apps]]\nid = 'a'\n[[apps.keys]]\nid = 'k'\nsecret = 's'\n";
        assert_eq!(locate(text, "{"), None);
        let text = format!("{text}[[apps.keys]]\nid = 'j'\nsecret = 's'\ncapability = '{{}}'\n");
        assert_eq!(locate(&text, "{"), None, "the file holds another value");
    }
}
