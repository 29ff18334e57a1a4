//! Subscription filters: the expression of a derived channel `[filter=<base64>]name`
//! (ably-js `channels.getDerived(name, { filter })`), which delivers only the messages
//! it holds true for.
//!
//! The subset of JMESPath Ably documents for filters: the fields `name` and
//! `headers.<key>` (`message.extras.headers`, a flat object; a key may be quoted,
//! `headers."x-y"`), literals as JSON in backticks (`` `"text"` ``, `` `42` ``,
//! `` `true` ``) or raw strings in single quotes (`'text'`), comparisons `==`, `!=`,
//! `<`, `<=`, `>`, `>=`, and `&&`, `||`, `!` with parentheses. Semantics as JMESPath:
//! a missing field is `null`; ordering comparisons hold only between numbers (else
//! `null`); `&&` and `||` return an operand; an expression selects a message when its
//! value is truthy (not `false`, `null`, or an empty string, array or object).
//!
//! Input is a client's: [`parse`] never panics, bounds the text to
//! [`FILTER_BYTES_MAX`] and the nesting to [`FILTER_DEPTH_MAX`] (so neither parsing nor
//! evaluation can recurse deeply), and evaluation is linear in the expression.

use serde_json::Value;
use tern_protocol::Message;

/// Longest filter expression accepted (decoded), in bytes.
pub(crate) const FILTER_BYTES_MAX: usize = 1_024;
/// Deepest nesting of parentheses and `!` accepted.
pub(crate) const FILTER_DEPTH_MAX: usize = 32;

/// A parsed filter expression.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Filter {
    /// The message's name.
    Name,
    /// One of `extras.headers`.
    Header(String),
    Literal(Value),
    Not(Box<Filter>),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Compare(Comparison, Box<Filter>, Box<Filter>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Comparison {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Parses the base64 expression of a `[filter=…]` qualifier (ably-js encodes it with
/// the standard alphabet; the URL-safe one is taken too); `Err` says why.
pub(crate) fn decode(encoded: &str) -> Result<Filter, String> {
    use base64::Engine as _;
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ];
    let bytes = engines
        .iter()
        .find_map(|engine| engine.decode(encoded).ok())
        .ok_or("filter is not base64")?;
    let text = String::from_utf8(bytes).map_err(|_| "filter is not UTF-8".to_owned())?;
    parse(&text)
}

/// Parses an expression; `Err` says why (for a 40010 reply).
pub(crate) fn parse(text: &str) -> Result<Filter, String> {
    if text.len() > FILTER_BYTES_MAX {
        return Err(format!("filter expression over {FILTER_BYTES_MAX} bytes"));
    }
    let mut parser = Parser {
        text,
        at: 0,
        depth: 0,
    };
    let filter = parser.or()?;
    parser.skip_space();
    if parser.at != text.len() {
        return Err(format!("unexpected input at offset {}", parser.at));
    }
    Ok(filter)
}

impl Filter {
    /// Whether the expression selects `message`.
    pub(crate) fn selects(&self, message: &Message) -> bool {
        truthy(&self.value(message))
    }

    fn value(&self, message: &Message) -> Value {
        match self {
            Filter::Name => message.name.clone().map_or(Value::Null, Value::String),
            Filter::Header(key) => message
                .extras
                .as_ref()
                .and_then(|extras| extras.get("headers"))
                .and_then(|headers| headers.get(key))
                .cloned()
                .unwrap_or(Value::Null),
            Filter::Literal(value) => value.clone(),
            Filter::Not(inner) => Value::Bool(!truthy(&inner.value(message))),
            Filter::And(left, right) => {
                let left = left.value(message);
                if truthy(&left) {
                    right.value(message)
                } else {
                    left
                }
            }
            Filter::Or(left, right) => {
                let left = left.value(message);
                if truthy(&left) {
                    left
                } else {
                    right.value(message)
                }
            }
            Filter::Compare(op, left, right) => {
                compare(*op, &left.value(message), &right.value(message))
            }
        }
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Bool(true) | Value::Number(_) => true,
    }
}

fn compare(op: Comparison, left: &Value, right: &Value) -> Value {
    let equal = || match (left.as_f64(), right.as_f64()) {
        // 26095 and 26095.0 are the same JSON number.
        (Some(l), Some(r)) => l == r,
        _ => left == right,
    };
    match op {
        Comparison::Eq => Value::Bool(equal()),
        Comparison::Ne => Value::Bool(!equal()),
        _ => match (left.as_f64(), right.as_f64()) {
            (Some(l), Some(r)) => Value::Bool(match op {
                Comparison::Lt => l < r,
                Comparison::Le => l <= r,
                Comparison::Gt => l > r,
                _ => l >= r,
            }),
            _ => Value::Null,
        },
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.text.len() - trimmed.len();
    }

    /// Consumes `token` (after spaces) if it is next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > FILTER_DEPTH_MAX {
            return Err(format!("filter nested deeper than {FILTER_DEPTH_MAX}"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.not()?;
        while self.eat("&&") {
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Filter, String> {
        self.skip_space();
        if self.rest().starts_with('!') && !self.rest().starts_with("!=") {
            self.at += 1;
            self.deeper()?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(inner)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Filter, String> {
        let left = self.primary()?;
        // Longer operators first, so `<=` is not read as `<`.
        let ops = [
            ("==", Comparison::Eq),
            ("!=", Comparison::Ne),
            ("<=", Comparison::Le),
            (">=", Comparison::Ge),
            ("<", Comparison::Lt),
            (">", Comparison::Gt),
        ];
        for (token, op) in ops {
            if self.eat(token) {
                let right = self.primary()?;
                return Ok(Filter::Compare(op, Box::new(left), Box::new(right)));
            }
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Filter, String> {
        self.skip_space();
        if self.eat("(") {
            self.deeper()?;
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err("missing ')'".into());
            }
            return Ok(inner);
        }
        if self.eat("`") {
            let end = self.rest().find('`').ok_or("unterminated `literal`")?;
            let json = &self.rest()[..end];
            let value =
                serde_json::from_str(json).map_err(|_| format!("invalid JSON literal `{json}`"))?;
            self.at += end + 1;
            return Ok(Filter::Literal(value));
        }
        if self.eat("'") {
            let end = self.rest().find('\'').ok_or("unterminated 'string'")?;
            let text = self.rest()[..end].to_owned();
            self.at += end + 1;
            return Ok(Filter::Literal(Value::String(text)));
        }
        let field = self
            .identifier()
            .ok_or_else(|| format!("expected a field or literal at offset {}", self.at))?;
        match field.as_str() {
            "name" => Ok(Filter::Name),
            "headers" => {
                if !self.eat(".") {
                    return Err("expected headers.<key>".into());
                }
                self.header_key().map(Filter::Header)
            }
            other => Err(format!(
                "unknown field '{other}' (use name or headers.<key>)"
            )),
        }
    }

    fn identifier(&mut self) -> Option<String> {
        self.skip_space();
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let identifier = rest[..len].to_owned();
        self.at += len;
        Some(identifier)
    }

    /// `key` or JMESPath's quoted identifier `"any key"` (a JSON string).
    fn header_key(&mut self) -> Result<String, String> {
        if self.rest().starts_with('"') {
            let mut stream = serde_json::Deserializer::from_str(self.rest()).into_iter::<String>();
            let key = stream
                .next()
                .and_then(Result::ok)
                .ok_or("invalid quoted header key")?;
            self.at += stream.byte_offset();
            return Ok(key);
        }
        self.identifier()
            .ok_or_else(|| "expected a header key".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(name: Option<&str>, headers: Option<Value>) -> Message {
        Message {
            name: name.map(str::to_owned),
            extras: headers.map(|headers| json!({ "headers": headers })),
            ..Default::default()
        }
    }

    fn selects(filter: &str, message: &Message) -> bool {
        parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .selects(message)
    }

    /// The ably-js suite's filter selects exactly the messages its test expects.
    #[test]
    fn suite_expression() {
        let filter = r#"name == `"filtered"` && headers.number == `26095`"#;
        let hit = message(
            Some("filtered"),
            Some(json!({"name": "Lorem Choo", "number": 26095, "bool": true})),
        );
        assert!(selects(filter, &hit));
        assert!(!selects(filter, &message(Some("filtered"), None)));
        assert!(!selects(
            filter,
            &message(Some("filtered"), Some(json!({"number": 12345})))
        ));
        assert!(!selects(
            filter,
            &message(Some("end"), Some(json!({"number": 26095})))
        ));
    }

    /// Operators, literals, precedence and JMESPath truthiness.
    #[test]
    fn operators_and_literals() {
        let m = message(
            Some("ice-cream"),
            Some(json!({"flavor": "strawberry", "cost": 35, "x-y": true, "empty": ""})),
        );
        for (filter, expected) in [
            ("name == 'ice-cream'", true),
            ("name != 'ice-cream'", false),
            ("headers.cost < `50`", true),
            ("headers.cost <= `35`", true),
            ("headers.cost > `35`", false),
            ("headers.cost >= `35.0`", true),
            ("headers.flavor < `50`", false),
            ("headers.\"x-y\"", true),
            ("headers.empty", false),
            ("headers.missing", false),
            ("headers.missing == `null`", true),
            ("!headers.missing", true),
            ("!(headers.cost == `35`)", false),
            (
                "name == 'x' || headers.cost == `35` && headers.flavor == 'strawberry'",
                true,
            ),
            (
                "(name == 'x' || headers.cost == `35`) && headers.flavor == 'vanilla'",
                false,
            ),
            ("  headers.cost==`35`  ", true),
            ("`true`", true),
            ("headers.cost != `35`", false),
        ] {
            assert_eq!(selects(filter, &m), expected, "{filter}");
        }
    }

    /// Malformed, oversized and too deeply nested expressions are refused, never panic.
    #[test]
    fn refuses_bad_expressions() {
        for bad in [
            "",
            "name ==",
            "body == `1`",
            "headers",
            "headers.",
            "(name",
            "`{nope`",
            "'open",
            "name == 'a' extra",
            "headers.\"unterminated",
            "1name",
            "name === 'a'",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = format!(
            "{}name{}",
            "(".repeat(FILTER_DEPTH_MAX + 1),
            ")".repeat(FILTER_DEPTH_MAX + 1)
        );
        assert!(parse(&deep).is_err());
        let nots = format!("{}name", "!".repeat(FILTER_DEPTH_MAX + 1));
        assert!(parse(&nots).is_err());
        let ok = format!(
            "{}name{}",
            "(".repeat(FILTER_DEPTH_MAX),
            ")".repeat(FILTER_DEPTH_MAX)
        );
        assert!(parse(&ok).is_ok());
        let long = format!("name == '{}'", "a".repeat(FILTER_BYTES_MAX));
        assert!(parse(&long).is_err());
    }

    /// Arbitrary input never panics.
    #[test]
    fn never_panics() {
        use proptest::prelude::*;
        proptest!(|(text in ".{0,200}")| {
            let _ = parse(&text).map(|f| f.selects(&message(Some("a"), Some(json!({"k": 1})))));
        });
        proptest!(|(text in "[ ()!=<>&|`'\"a-z.0-9]{0,120}")| {
            let _ = parse(&text).map(|f| f.selects(&message(Some("a"), Some(json!({"k": 1})))));
        });
    }
}
