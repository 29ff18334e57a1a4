//! HTTP responses in the shapes the Ably SDKs parse: error bodies with their exact
//! headers, msgpack or JSON bodies by `Accept`, and CORS for browsers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tern_protocol::{code, ErrorInfo, Format};

use crate::state::EdgeState;

/// An Ably error as an HTTP response: status ≥ 300, `X-Ably-ErrorCode`,
/// `X-Ably-ErrorMessage`, and `{"error":{…}}` with `Content-Type: application/json`
/// exactly (ably-js parses the body only for that exact string).
/// Most refusal log lines a second (beyond them a flood of bad requests is counted in
/// metrics, not logged line by line).
const REFUSAL_LOG_LINES_PER_SECOND: u64 = 10;

/// Logs a refused request or credential with its Ably code, at most
/// [`REFUSAL_LOG_LINES_PER_SECOND`] lines a second.
pub(crate) fn log_refusal(what: &'static str, err: &ErrorInfo) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    let second = (crate::now_ms() / 1000) as u64;
    let seen = WINDOW.load(Ordering::Relaxed);
    let (at, count) = (seen >> 16, seen & 0xffff);
    let next = if at == second {
        (second << 16) | (count + 1).min(0xffff)
    } else {
        (second << 16) | 1
    };
    WINDOW.store(next, Ordering::Relaxed);
    if next & 0xffff <= REFUSAL_LOG_LINES_PER_SECOND {
        tracing::info!(code = err.code, status = err.status_code, message = %err.message, "{what} refused");
    }
}

pub(crate) fn error_response(err: ErrorInfo) -> Response {
    log_refusal("request", &err);
    let status = StatusCode::from_u16(err.status_code)
        .ok()
        .filter(|s| s.as_u16() >= 300)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message: String = err
        .message
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                ' '
            }
        })
        .collect();
    let body = serde_json::json!({ "error": err }).to_string();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-ably-errorcode", HeaderValue::from(err.code));
    if let Ok(value) = HeaderValue::from_str(&message) {
        headers.insert("x-ably-errormessage", value);
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

/// Handler error type: any Ably error.
pub(crate) struct ApiError(pub ErrorInfo);

impl From<ErrorInfo> for ApiError {
    fn from(err: ErrorInfo) -> Self {
        ApiError(err)
    }
}

/// The format a REST client wants back: msgpack if it says so in `Accept` (or
/// `format=msgpack`), JSON otherwise.
pub(crate) fn response_format(headers: &HeaderMap, format_param: Option<&str>) -> Format {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if format_param == Some("msgpack") || accept.contains("application/x-msgpack") {
        Format::Msgpack
    } else {
        Format::Json
    }
}

/// The format of a request body, by `Content-Type` (JSON when absent or unknown).
pub(crate) fn request_format(headers: &HeaderMap) -> Format {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_content_type)
        .unwrap_or(Format::Json)
}

/// A body in the client's format with the matching content type.
pub(crate) fn body<T: Serialize>(status: StatusCode, format: Format, value: &T) -> Response {
    let bytes = tern_protocol::encode_value(format, value);
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

const ALLOW_HEADERS: &str =
    "authorization, content-type, accept, x-ably-version, ably-agent, x-ably-clientid, x-ably-lib";
const EXPOSE_HEADERS: &str = "link, x-ably-errorcode, x-ably-errormessage, x-ably-serverid";

/// A body over `max_frame_size` as an Ably error. axum's body limit answers a bare
/// `413` with a plain-text body, which the SDKs cannot read a code from; this gives
/// it 40009 with the `X-Ably-*` headers and an ErrorInfo body (status kept at 413).
pub(crate) async fn body_too_large(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE
        || response.headers().contains_key("x-ably-errorcode")
    {
        return response;
    }
    error_response(ErrorInfo::with_status(
        code::MESSAGE_TOO_LARGE,
        StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
        format!(
            "request body over the maximum of {} bytes",
            state.config.max_frame_size
        ),
    ))
}

/// CORS for browser SDKs: answers preflights and decorates every response.
///
/// ably-js in a browser sends its `Authorization` header as a credentialed request
/// (`credentials: "include"`, `withCredentials`), which browsers accept only when the
/// response names the exact origin and allows credentials. Doing that for any origin
/// would let every web page read answers obtained with whatever ambient credentials
/// the browser holds for this host (cookies or HTTP auth of a proxy in front of it),
/// so only origins listed in `cors_allowed_origins` get it. Every other origin gets
/// `Access-Control-Allow-Origin: *` without credentials: its pages can still read
/// public answers (`/time`) and send requests that carry their own `Authorization`
/// header or query credentials, just not as credentialed requests.
pub(crate) async fn cors(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .filter(|origin| origin_allowed(&state.config.cors_allowed_origins, origin))
        .cloned();
    let preflight = request.method() == Method::OPTIONS;
    let requested_headers = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    match origin {
        Some(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        None => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
    // The answer depends on the Origin, so caches must keep them apart.
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            requested_headers.unwrap_or(HeaderValue::from_static(ALLOW_HEADERS)),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
    }
    response
}

/// Whether `origin` may make credentialed requests: listed exactly (browsers send
/// `scheme://host[:port]`), or the list holds `"*"` (any origin; development only).
fn origin_allowed(allowed: &[String], origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    allowed
        .iter()
        .any(|entry| entry == "*" || entry.as_str() == origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only listed origins (or an explicit `*`) may make credentialed requests.
    #[test]
    fn origin_allowed_table() {
        let listed = vec!["https://app.example.com".to_owned()];
        let value = HeaderValue::from_static;
        assert!(origin_allowed(&listed, &value("https://app.example.com")));
        assert!(!origin_allowed(&listed, &value("https://evil.example")));
        assert!(!origin_allowed(
            &listed,
            &value("https://app.example.com.evil")
        ));
        assert!(!origin_allowed(&listed, &value("null")));
        assert!(!origin_allowed(&[], &value("https://app.example.com")));
        assert!(origin_allowed(
            &["*".to_owned()],
            &value("https://any.example")
        ));
    }
}
