//! What a synchronous function is sent and what its answer means. No I/O: the caller
//! hands in the outcome of the HTTP exchange (status and body, or why there was none)
//! and gets a verdict with the failure policy already applied.
//!
//! Request (before publish), signed as webhooks are (`X-Ably-Key`, `X-Ably-Signature`):
//! `{"source":"channel.message","appId","channel","site","ruleId","connectionId"?,
//! "messages":[…]}`. Answer: `{"action":"accept"}`, `{"action":"reject",
//! "rejectionReason":…}` (Ably's before-publish moderation answer), or
//! `{"action":"accept","messages":[…]}` with one object per message sent, whose `name`,
//! `data`, `encoding` and `extras` replace the message's.
//!
//! Request (connect): `{"source":"connection.connect","appId","site","ruleId",
//! "connectionId","clientId"?,"keyName","transport","remoteAddress"?}`. Answer:
//! `{"action":"accept","clientId"?,"capability"?}` or `{"action":"reject",
//! "rejectionReason":…}`.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tern_protocol::{code, ErrorInfo, Message};

use super::config::{FailurePolicy, Hook, HookConfig, HookKind};
use crate::payload::{signature, Request, WEBHOOK_VERSION};

/// Longest rejection reason passed on to the client, in bytes.
const REASON_BYTES_MAX: usize = 1024;

/// Ably's code for a message a before-publish rule rejected: 42213
/// ("content_rejected_by_moderation"). Ably's before-publish rules are its moderation
/// rules (custom moderation is a before-publish function), and this is the code their
/// rejections carry; 42210 is the catch-all when the check is not identified.
pub const REJECTED_BY_FUNCTION: u32 = 42213;

/// The answer of a before-publish function, policy applied.
#[derive(Clone, Debug, PartialEq)]
pub enum PublishVerdict {
    /// Publish the messages as they are.
    Accept,
    /// Publish them with these changes: one per message, in order.
    Modify(Vec<MessageChange>),
    /// Refuse the publish (NACK / REST error) with this error.
    Reject(ErrorInfo),
}

/// What a function may change in a message: never its id, clientId, connectionId or
/// timestamp, so a function cannot make a message claim another publisher.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MessageChange {
    pub name: Option<String>,
    pub data: Option<tern_protocol::Data>,
    pub encoding: Option<String>,
    pub extras: Option<Value>,
}

impl MessageChange {
    /// Applies the change to `message`.
    pub fn apply(self, message: &mut Message) {
        message.name = self.name;
        message.data = self.data;
        message.encoding = self.encoding;
        message.extras = self.extras;
    }
}

/// The answer of a connect function, policy applied.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectVerdict {
    /// Accept the connection, with the clientId and capability (Ably's JSON form) the
    /// function attached, if any.
    Accept {
        client_id: Option<String>,
        capability: Option<String>,
    },
    /// Refuse it with this error.
    Reject(ErrorInfo),
}

/// Who is connecting, as a connect function is told.
#[derive(Clone, Debug, PartialEq)]
pub struct Connecting {
    pub connection_id: String,
    /// The clientId the credentials (and `clientId` parameter) give, if any.
    pub client_id: Option<String>,
    /// `appId.keyId` of the key the credentials are or were derived from.
    pub key_name: String,
    /// `web_socket` or `comet`.
    pub transport: &'static str,
    pub remote_address: Option<String>,
}

/// The request for a before-publish call.
pub fn publish_request(
    hook: &Hook,
    channel: &str,
    connection_id: Option<&str>,
    messages: &[Message],
) -> Request {
    let config = &hook.config;
    let mut body = envelope(config);
    body.insert("channel".into(), json!(channel));
    if let Some(id) = connection_id {
        body.insert("connectionId".into(), json!(id));
    }
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
        .collect();
    body.insert("messages".into(), Value::Array(messages));
    finish(config, body)
}

/// The request for a connect call.
pub fn connect_request(hook: &Hook, connecting: &Connecting) -> Request {
    let config = &hook.config;
    let mut body = envelope(config);
    body.insert("connectionId".into(), json!(connecting.connection_id));
    if let Some(client_id) = &connecting.client_id {
        body.insert("clientId".into(), json!(client_id));
    }
    body.insert("keyName".into(), json!(connecting.key_name));
    body.insert("transport".into(), json!(connecting.transport));
    if let Some(address) = &connecting.remote_address {
        body.insert("remoteAddress".into(), json!(address));
    }
    finish(config, body)
}

fn envelope(config: &HookConfig) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("source".into(), json!(config.kind.source()));
    body.insert("appId".into(), json!(config.app));
    body.insert("site".into(), json!(config.site));
    body.insert("ruleId".into(), json!(config.id));
    body
}

fn finish(config: &HookConfig, body: Map<String, Value>) -> Request {
    let body = Bytes::from(serde_json::to_vec(&Value::Object(body)).unwrap_or_default());
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("x-ably-version".to_string(), WEBHOOK_VERSION.to_string()),
    ];
    headers.extend(config.headers.iter().cloned());
    if let Some(key) = &config.signing_key {
        headers.push(("x-ably-key".into(), key.name.clone()));
        headers.push(("x-ably-signature".into(), signature(&key.secret, &body)));
    }
    Request { body, headers }
}

/// How the HTTP exchange ended: the status and body read, or why there was none.
pub type Exchange = Result<(u16, Bytes), Failure>;

/// Why a call gave no usable answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// No answer within `timeout_ms` (including the wait for a free slot).
    TimedOut,
    /// Could not connect, the connection broke, or the answer was over
    /// `response_bytes_max`.
    Unreachable(String),
}

/// The verdict of a before-publish call on `sent` messages.
pub fn publish_verdict(hook: &Hook, exchange: Exchange, sent: usize) -> PublishVerdict {
    let answer = match parse(exchange) {
        Ok(answer) => answer,
        Err(failure) => return publish_failure(&hook.config, failure),
    };
    match answer.action.as_str() {
        "reject" => {
            PublishVerdict::Reject(rejected(&hook.config, REJECTED_BY_FUNCTION, &answer.reason))
        }
        "accept" => match answer.body.get("messages") {
            None | Some(Value::Null) => PublishVerdict::Accept,
            Some(Value::Array(changes)) if changes.len() == sent => {
                match changes.iter().map(change_of).collect::<Option<Vec<_>>>() {
                    Some(changes) => PublishVerdict::Modify(changes),
                    None => publish_failure(
                        &hook.config,
                        Failure::Unreachable("a changed message is not a message object".into()),
                    ),
                }
            }
            Some(_) => publish_failure(
                &hook.config,
                Failure::Unreachable(format!(
                    "answer's messages is not an array of {sent} message(s)"
                )),
            ),
        },
        other => publish_failure(
            &hook.config,
            Failure::Unreachable(format!("unknown action '{other}'")),
        ),
    }
}

/// The verdict of a connect call.
pub fn connect_verdict(hook: &Hook, exchange: Exchange) -> ConnectVerdict {
    let answer = match parse(exchange) {
        Ok(answer) => answer,
        Err(failure) => return connect_failure(&hook.config, failure),
    };
    match answer.action.as_str() {
        "reject" => ConnectVerdict::Reject(rejected(&hook.config, code::FORBIDDEN, &answer.reason)),
        "accept" => {
            let client_id = match answer.body.get("clientId") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if !id.is_empty() && id != "*" && id.len() <= 1024 => {
                    Some(id.clone())
                }
                Some(_) => {
                    return connect_failure(
                        &hook.config,
                        Failure::Unreachable("clientId is not a usable string".into()),
                    )
                }
            };
            let capability = match answer.body.get("capability") {
                None | Some(Value::Null) => None,
                Some(Value::String(text)) => Some(text.clone()),
                Some(object @ Value::Object(_)) => Some(object.to_string()),
                Some(_) => {
                    return connect_failure(
                        &hook.config,
                        Failure::Unreachable("capability is not an object".into()),
                    )
                }
            };
            ConnectVerdict::Accept {
                client_id,
                capability,
            }
        }
        other => connect_failure(
            &hook.config,
            Failure::Unreachable(format!("unknown action '{other}'")),
        ),
    }
}

struct Answer {
    action: String,
    reason: String,
    body: Map<String, Value>,
}

/// A 2xx whose body is a JSON object with a string `action`; anything else fails.
fn parse(exchange: Exchange) -> Result<Answer, Failure> {
    let (status, body) = exchange?;
    if !(200..300).contains(&status) {
        return Err(Failure::Unreachable(format!("answered {status}")));
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
        return Err(Failure::Unreachable("answer is not a JSON object".into()));
    };
    let Some(Value::String(action)) = body.get("action") else {
        return Err(Failure::Unreachable("answer has no action".into()));
    };
    let reason = match body.get("rejectionReason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    Ok(Answer {
        action: action.clone(),
        reason,
        body,
    })
}

fn change_of(value: &Value) -> Option<MessageChange> {
    let Value::Object(fields) = value else {
        return None;
    };
    // Only the fields a function may change are read; a function that echoes the whole
    // message (id, clientId…) changes nothing else.
    let mut only = Map::new();
    for field in ["name", "data", "encoding", "extras"] {
        if let Some(v) = fields.get(field) {
            only.insert(field.into(), v.clone());
        }
    }
    let message: Message = serde_json::from_value(Value::Object(only)).ok()?;
    Some(MessageChange {
        name: message.name,
        data: message.data,
        encoding: message.encoding,
        extras: message.extras,
    })
}

fn rejected(config: &HookConfig, code: u32, reason: &str) -> ErrorInfo {
    let mut reason = reason.to_string();
    if reason.len() > REASON_BYTES_MAX {
        let mut end = REASON_BYTES_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let what = match config.kind {
        HookKind::BeforePublish => "message rejected by function",
        HookKind::Connect => "connection refused by function",
    };
    let text = if reason.is_empty() {
        format!("{what} '{}'", config.id)
    } else {
        format!("{what} '{}': {reason}", config.id)
    };
    ErrorInfo::new(code, text)
}

/// The error of a function that failed closed: 50003 when it timed out, 50000 when it
/// could not answer; a server-side failure, so the client may try again.
fn failed_closed(config: &HookConfig, failure: &Failure) -> ErrorInfo {
    match failure {
        Failure::TimedOut => ErrorInfo::new(
            code::TIMEOUT,
            format!(
                "function '{}' did not answer within {} ms",
                config.id, config.timeout_ms
            ),
        ),
        Failure::Unreachable(why) => ErrorInfo::new(
            code::INTERNAL,
            format!("function '{}' failed: {why}", config.id),
        ),
    }
}

fn count_failure(config: &HookConfig, failure: &Failure) {
    let reason = match failure {
        Failure::TimedOut => "timeout",
        Failure::Unreachable(_) => "error",
    };
    metrics::counter!("tern_function_failures_total", "function" => config.id.clone(), "reason" => reason)
        .increment(1);
    tracing::debug!(function = %config.id, ?failure, policy = ?config.on_failure, "function failed");
}

fn publish_failure(config: &HookConfig, failure: Failure) -> PublishVerdict {
    count_failure(config, &failure);
    match config.on_failure {
        FailurePolicy::Accept => PublishVerdict::Accept,
        FailurePolicy::Reject => PublishVerdict::Reject(failed_closed(config, &failure)),
    }
}

fn connect_failure(config: &HookConfig, failure: Failure) -> ConnectVerdict {
    count_failure(config, &failure);
    match config.on_failure {
        FailurePolicy::Accept => ConnectVerdict::Accept {
            client_id: None,
            capability: None,
        },
        FailurePolicy::Reject => ConnectVerdict::Reject(failed_closed(config, &failure)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::config::tests::config;
    use crate::rule::SigningKey;
    use tern_protocol::Data;

    fn hook(kind: HookKind, policy: FailurePolicy) -> Hook {
        let mut c = config(kind);
        c.on_failure = policy;
        c.validate().unwrap()
    }

    fn answer(body: &str) -> Exchange {
        Ok((200, Bytes::from(body.to_string())))
    }

    /// accept, reject (with Ably's 42213 and the function's reason) and modify are read
    /// from the answer; a modification changes only name, data, encoding and extras.
    #[test]
    fn publish_answers() {
        let h = hook(HookKind::BeforePublish, FailurePolicy::Reject);
        assert_eq!(
            publish_verdict(&h, answer(r#"{"action":"accept"}"#), 1),
            PublishVerdict::Accept
        );
        let PublishVerdict::Reject(error) = publish_verdict(
            &h,
            answer(r#"{"action":"reject","rejectionReason":"no swearing"}"#),
            1,
        ) else {
            panic!("not rejected")
        };
        assert_eq!(error.code, 42213);
        assert_eq!(error.status_code, 422);
        assert!(
            error.message.ends_with(": no swearing"),
            "{}",
            error.message
        );
        let PublishVerdict::Reject(error) = publish_verdict(
            &h,
            answer(r#"{"action":"reject","rejectionReason":{"why":"spam"}}"#),
            1,
        ) else {
            panic!("not rejected")
        };
        assert!(error.message.contains(r#"{"why":"spam"}"#));
        let modified = publish_verdict(
            &h,
            answer(
                r#"{"action":"accept","messages":[{"id":"forged","clientId":"mallory","name":"n","data":"clean"}]}"#,
            ),
            1,
        );
        let PublishVerdict::Modify(changes) = modified else {
            panic!("not modified")
        };
        let mut message = Message {
            id: Some("orig".into()),
            client_id: Some("alice".into()),
            data: Some(Data::String("dirty".into())),
            ..Default::default()
        };
        changes.into_iter().next().unwrap().apply(&mut message);
        assert_eq!(message.data, Some(Data::String("clean".into())));
        assert_eq!(message.name.as_deref(), Some("n"));
        assert_eq!(message.id.as_deref(), Some("orig"));
        assert_eq!(message.client_id.as_deref(), Some("alice"));
    }

    /// Anything but a well-formed 2xx answer is a failure, and the policy decides:
    /// fail open accepts, fail closed rejects with 50003 (timeout) or 50000.
    #[test]
    fn failures_follow_the_policy() {
        let broken: Vec<Exchange> = vec![
            Err(Failure::TimedOut),
            Err(Failure::Unreachable("refused".into())),
            Ok((500, Bytes::new())),
            answer("not json"),
            answer(r#"{"verdict":"ok"}"#),
            answer(r#"{"action":"maybe"}"#),
            answer(r#"{"action":"accept","messages":[]}"#),
            answer(r#"{"action":"accept","messages":[1]}"#),
        ];
        let open = hook(HookKind::BeforePublish, FailurePolicy::Accept);
        let closed = hook(HookKind::BeforePublish, FailurePolicy::Reject);
        for exchange in broken {
            assert_eq!(
                publish_verdict(&open, exchange.clone(), 1),
                PublishVerdict::Accept,
                "{exchange:?}"
            );
            let PublishVerdict::Reject(error) = publish_verdict(&closed, exchange.clone(), 1)
            else {
                panic!("{exchange:?} not rejected")
            };
            let expected = if exchange == Err(Failure::TimedOut) {
                50003
            } else {
                50000
            };
            assert_eq!(error.code, expected, "{exchange:?}");
        }
    }

    /// A connect function may refuse (40300, its reason), attach a clientId and a
    /// capability, or fail by its policy.
    #[test]
    fn connect_answers() {
        let h = hook(HookKind::Connect, FailurePolicy::Reject);
        let ConnectVerdict::Reject(error) = connect_verdict(
            &h,
            answer(r#"{"action":"reject","rejectionReason":"banned"}"#),
        ) else {
            panic!("not refused")
        };
        assert_eq!((error.code, error.status_code), (40300, 403));
        assert!(error.message.ends_with(": banned"));
        assert_eq!(
            connect_verdict(
                &h,
                answer(
                    r#"{"action":"accept","clientId":"bob","capability":{"chat:*":["subscribe"]}}"#
                )
            ),
            ConnectVerdict::Accept {
                client_id: Some("bob".into()),
                capability: Some(r#"{"chat:*":["subscribe"]}"#.into()),
            }
        );
        let ConnectVerdict::Reject(error) =
            connect_verdict(&h, answer(r#"{"action":"accept","clientId":"*"}"#))
        else {
            panic!("a wildcard clientId is not a clientId")
        };
        assert_eq!(error.code, 50000);
        let open = hook(HookKind::Connect, FailurePolicy::Accept);
        assert_eq!(
            connect_verdict(&open, Err(Failure::TimedOut)),
            ConnectVerdict::Accept {
                client_id: None,
                capability: None
            }
        );
    }

    /// Requests are signed as webhooks are and carry what the docs say.
    #[test]
    fn requests() {
        let mut c = config(HookKind::BeforePublish);
        c.signing_key = Some(SigningKey {
            name: "app.k".into(),
            secret: "s3cret".into(),
        });
        let h = c.validate().unwrap();
        let message = Message {
            client_id: Some("alice".into()),
            data: Some(Data::String("hi".into())),
            ..Default::default()
        };
        let request = publish_request(&h, "chat:1", Some("conn-1"), &[message]);
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["source"], "channel.message");
        assert_eq!(body["channel"], "chat:1");
        assert_eq!(body["connectionId"], "conn-1");
        assert_eq!(body["ruleId"], "fn");
        assert_eq!(body["messages"][0]["data"], "hi");
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("x-ably-key").as_deref(), Some("app.k"));
        assert_eq!(
            header("x-ably-signature"),
            Some(signature("s3cret", &request.body))
        );
        let h = config(HookKind::Connect).validate().unwrap();
        let request = connect_request(
            &h,
            &Connecting {
                connection_id: "c1".into(),
                client_id: None,
                key_name: "app.k".into(),
                transport: "web_socket",
                remote_address: Some("127.0.0.1:5000".into()),
            },
        );
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["source"], "connection.connect");
        assert_eq!(body["transport"], "web_socket");
        assert_eq!(body["remoteAddress"], "127.0.0.1:5000");
        assert!(body.get("clientId").is_none());
    }
}
