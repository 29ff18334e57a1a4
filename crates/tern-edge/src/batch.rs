//! Batch REST: the same messages published to several channels (`POST /messages`,
//! RSC22) and the presence of several channels read at once (`GET /presence?channels=`,
//! RSC24). Each channel is handled as its single-channel request would be (capability,
//! limits, durability, forwarding to the channel's home), and fails on its own: one
//! refused channel is an `error` in its result, not a failed request.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tern_auth::Operation;
use tern_protocol::{code, ErrorInfo, Format, Message, PresenceMessage};

use crate::credentials::{denied, rest_auth};
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::rest::{channel_key, members_of, publish_messages, PublishResponse};
use crate::state::EdgeState;

/// Channels one batch request may name in all (over every spec), so one request cannot
/// fan out into unbounded work.
pub(crate) const BATCH_CHANNELS_MAX: usize = 100;

/// One `BatchPublishSpec`: these messages, to each of these channels.
#[derive(Deserialize)]
struct PublishSpec {
    channels: Vec<String>,
    messages: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Message>),
    One(Box<Message>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<Message> {
        match self {
            OneOrMany::Many(messages) => messages,
            OneOrMany::One(message) => vec![*message],
        }
    }
}

/// A `BatchResult`: how many channels succeeded and failed, and each one's outcome.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BatchResult<T> {
    success_count: usize,
    failure_count: usize,
    results: Vec<T>,
}

impl<T> BatchResult<T> {
    pub(crate) fn of(results: Vec<Result<T, T>>) -> Self {
        let failure_count = results.iter().filter(|r| r.is_err()).count();
        BatchResult {
            success_count: results.len() - failure_count,
            failure_count,
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| e))
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum PublishOutcome {
    Published {
        channel: String,
        #[serde(rename = "messageId")]
        message_id: String,
    },
    Failed {
        channel: String,
        error: ErrorInfo,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
enum PresenceOutcome {
    Members {
        channel: String,
        presence: Vec<PresenceMessage>,
    },
    Failed {
        channel: String,
        error: ErrorInfo,
    },
}

fn too_many(count: usize) -> ErrorInfo {
    ErrorInfo::new(
        code::INVALID_PARAMETER_VALUE,
        format!("a batch may name at most {BATCH_CHANNELS_MAX} channels, not {count}"),
    )
}

/// The body of `POST /messages`: an array of specs (ably-js `batchPublish`, answered
/// with one `BatchResult` per spec), or one spec (the older batch API `rest.request`
/// uses, answered with the flat list of its channels' outcomes).
#[derive(Deserialize)]
#[serde(untagged)]
enum PublishBody {
    Many(Vec<PublishSpec>),
    One(PublishSpec),
}

/// `POST /messages`: batch publish.
pub(crate) async fn publish(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (auth, identity) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let format = response_format(&headers, q.get("format").map(String::as_str));
    let (specs, one) = match crate::rest::decode_body(request_format(&headers), &bytes)? {
        PublishBody::Many(specs) => (specs, false),
        PublishBody::One(spec) => (vec![spec], true),
    };
    let count: usize = specs.iter().map(|s| s.channels.len()).sum();
    if count > BATCH_CHANNELS_MAX {
        return Err(too_many(count).into());
    }
    let (auth, identity) = (&auth, &identity);
    let state = &state;
    let mut results = join_all(
        specs
            .into_iter()
            .map(|spec| publish_spec(state, auth, identity, spec)),
    )
    .await;
    if !one {
        return Ok(body(StatusCode::CREATED, format, &results));
    }
    let result = results.pop().expect("one spec");
    if result.failure_count == 0 {
        return Ok(body(StatusCode::CREATED, format, &result.results));
    }
    // Some channels failed: 400 with 40020 (partial success) and every outcome.
    let mut response = body(StatusCode::BAD_REQUEST, format, &result.results);
    let code = axum::http::HeaderValue::from(code::BATCH_PARTIAL_SUCCESS);
    response.headers_mut().insert("x-ably-errorcode", code);
    Ok(response)
}

/// One spec: its messages published to each of its channels, each on its own.
async fn publish_spec(
    state: &EdgeState,
    auth: &tern_auth::AuthContext,
    identity: &tern_auth::ClientIdentity,
    spec: PublishSpec,
) -> BatchResult<PublishOutcome> {
    let messages = spec.messages.into_vec();
    let outcomes = join_all(spec.channels.into_iter().map(|channel| {
        let messages = messages.clone();
        async move {
            match publish_messages(state, auth, identity, &channel, messages).await {
                Ok(PublishResponse { message_id, .. }) => Ok(PublishOutcome::Published {
                    channel,
                    message_id,
                }),
                Err(error) => Err(PublishOutcome::Failed { channel, error }),
            }
        }
    }))
    .await;
    BatchResult::of(outcomes)
}

/// `GET /presence?channels=a,b`: each channel's members, as `GET …/presence` lists them
/// (from the channel's home in a cluster).
pub(crate) async fn presence(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (auth, _) = rest_auth(&state.keys, &headers, &q, now_ms())?;
    let channels: Vec<String> = q
        .get("channels")
        .map(|c| {
            c.split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if channels.is_empty() {
        return Err(ErrorInfo::new(code::BAD_REQUEST, "no channels given").into());
    }
    if channels.len() > BATCH_CHANNELS_MAX {
        return Err(too_many(channels.len()).into());
    }
    let (auth, state, headers) = (&auth, &state, &headers);
    let outcomes = join_all(channels.into_iter().map(|channel| async move {
        let members = async {
            let key = channel_key(&auth.app_id, &channel)?;
            if !auth.capability.allows(&key.name, Operation::Subscribe) {
                return Err(denied("presence get", &key.name));
            }
            match state.cluster.as_ref().and_then(|c| c.home_url(&key)) {
                Some(home) => members_at_home(&home, &channel, headers).await,
                None => Ok(members_of(state, &key, &HashMap::new())),
            }
        };
        match members.await {
            Ok(presence) => Ok(PresenceOutcome::Members { channel, presence }),
            Err(error) => Err(PresenceOutcome::Failed { channel, error }),
        }
    }))
    .await;
    Ok(body(
        StatusCode::OK,
        response_format(headers, q.get("format").map(String::as_str)),
        &BatchResult::of(outcomes),
    ))
}

/// A channel's members read from its home (msgpack, so binary data stays binary).
async fn members_at_home(
    home: &str,
    channel: &str,
    headers: &HeaderMap,
) -> Result<Vec<PresenceMessage>, ErrorInfo> {
    let path = format!(
        "/channels/{}/presence?format=msgpack",
        percent_encoding::utf8_percent_encode(channel, percent_encoding::NON_ALPHANUMERIC)
    );
    let unreachable = |why: String| {
        ErrorInfo::with_status(
            code::TIMEOUT,
            504,
            format!("the node that keeps this channel did not answer ({why})"),
        )
    };
    let (status, bytes) = crate::forward::get_from_home(home, &path, headers)
        .await
        .map_err(unreachable)?;
    if !status.is_success() {
        let error: ErrorInfo = crate::rest::decode_body::<ErrorBody>(Format::Msgpack, &bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| unreachable(format!("status {status}")));
        return Err(error);
    }
    crate::rest::decode_body(Format::Msgpack, &bytes)
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInfo,
}
