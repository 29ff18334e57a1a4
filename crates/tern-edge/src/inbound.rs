//! Unenveloped publishes (`POST /channels/{channel}/messages?enveloped=false`), the
//! shape of Ably's inbound webhooks: a third-party service posts its own body, which
//! becomes the `data` of one message, published through the ordinary REST path
//! (`rest::apply_publish`: capability, publish budget, hub, 201 once durable).
//!
//! The body's `Content-Type` decides the data: JSON (`application/json`, `…+json`) must
//! parse (bounded like every body, `tern_protocol::decode_value`) and is kept as its
//! text with encoding `json`, so SDKs hand subscribers the object; `text/*` that is
//! UTF-8 is a string; anything else (and text that is not UTF-8) is binary. An empty
//! body is a message without data. The message's name comes from the `name` query
//! param or the `X-Ably-Name` header, its id from `X-Ably-MessageId`, its clientId from
//! `X-Ably-ClientId` (checked against the credential like any clientId).
//!
//! A body over `max_message_size` is 413 with 40009 before anything is built (over
//! `max_frame_size` the router's body limit answers the same).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use tern_protocol::{code, Data, ErrorInfo, Format, Message};

/// The one message an unenveloped publish carries; `body_bytes_max` (the config's
/// `max_message_size`) bounds the body.
pub(crate) fn message(
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Bytes,
    body_bytes_max: usize,
) -> Result<Message, ErrorInfo> {
    if body.len() > body_bytes_max {
        return Err(ErrorInfo::with_status(
            code::MESSAGE_TOO_LARGE,
            413,
            format!(
                "request body of {} bytes is over the maximum message size of {body_bytes_max} bytes",
                body.len()
            ),
        ));
    }
    let header = |name: &str| {
        headers
            .get(name)
            .map(|value| {
                value.to_str().map(str::to_string).map_err(|_| {
                    ErrorInfo::new(code::BAD_REQUEST, format!("header {name} is not text"))
                })
            })
            .transpose()
    };
    let (data, encoding) = data_of(headers, body)?;
    Ok(Message {
        name: match query.get("name") {
            Some(name) => Some(name.clone()),
            None => header("x-ably-name")?,
        },
        id: header("x-ably-messageid")?,
        client_id: header("x-ably-clientid")?,
        data,
        encoding,
        ..Default::default()
    })
}

/// The body as message data and its encoding, by `Content-Type`.
fn data_of(headers: &HeaderMap, body: Bytes) -> Result<(Option<Data>, Option<String>), ErrorInfo> {
    if body.is_empty() {
        return Ok((None, None));
    }
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_json = media == "application/json" || media.ends_with("+json");
    if is_json {
        tern_protocol::decode_value::<serde::de::IgnoredAny>(Format::Json, &body).map_err(|e| {
            ErrorInfo::new(code::INVALID_MESSAGE_DATA, format!("body is not JSON: {e}"))
        })?;
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| ErrorInfo::new(code::INVALID_MESSAGE_DATA, "body is not UTF-8"))?;
        return Ok((Some(Data::String(text)), Some("json".into())));
    }
    if media.starts_with("text/") {
        if let Ok(text) = std::str::from_utf8(&body) {
            return Ok((Some(Data::String(text.to_string())), None));
        }
    }
    Ok((Some(Data::Binary(body)), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn check(content_type: &str, body: &[u8], data: Option<Data>, encoding: Option<&str>) {
        let message = message(
            &headers(&[("content-type", content_type)]),
            &HashMap::new(),
            Bytes::copy_from_slice(body),
            usize::MAX,
        )
        .unwrap();
        assert_eq!(message.data, data, "{content_type}");
        assert_eq!(message.encoding.as_deref(), encoding, "{content_type}");
    }

    /// The content type decides the data: JSON kept as text with encoding `json`,
    /// UTF-8 text as a string, anything else as bytes; an empty body is no data.
    #[test]
    fn data_by_content_type() {
        let json = r#"{"some":"json"}"#;
        check(
            "application/json",
            json.as_bytes(),
            Some(Data::String(json.into())),
            Some("json"),
        );
        check(
            "application/cloudevents+json; charset=utf-8",
            b"[1]",
            Some(Data::String("[1]".into())),
            Some("json"),
        );
        check(
            "text/plain; charset=utf-8",
            "héllo".as_bytes(),
            Some(Data::String("héllo".into())),
            None,
        );
        check(
            "text/plain",
            &[0xff, 0xfe],
            Some(Data::Binary(Bytes::from_static(&[0xff, 0xfe]))),
            None,
        );
        check(
            "application/octet-stream",
            &[0, 1, 2],
            Some(Data::Binary(Bytes::from_static(&[0, 1, 2]))),
            None,
        );
        check("", b"x", Some(Data::Binary(Bytes::from_static(b"x"))), None);
        check("application/json", b"", None, None);
    }

    /// A body that says JSON but is not is refused (40013), as is one nested past the
    /// decoder's bound, without a panic.
    #[test]
    fn bad_json_is_refused() {
        for body in [&b"{not json"[..], b"{} {}", &[b'['; 10_000]] {
            let error = message(
                &headers(&[("content-type", "application/json")]),
                &HashMap::new(),
                Bytes::copy_from_slice(body),
                usize::MAX,
            )
            .unwrap_err();
            assert_eq!(error.code, code::INVALID_MESSAGE_DATA);
        }
    }

    /// Name from the query (before the header), id and clientId from headers.
    #[test]
    fn name_id_and_client_id() {
        let h = headers(&[
            ("x-ably-name", "from-header"),
            ("x-ably-messageid", "id-1"),
            ("x-ably-clientid", "svc"),
        ]);
        let m = message(&h, &HashMap::new(), Bytes::new(), 10).unwrap();
        assert_eq!(m.name.as_deref(), Some("from-header"));
        assert_eq!(m.id.as_deref(), Some("id-1"));
        assert_eq!(m.client_id.as_deref(), Some("svc"));
        let query = HashMap::from([("name".to_string(), "from-query".to_string())]);
        let m = message(&h, &query, Bytes::new(), 10).unwrap();
        assert_eq!(m.name.as_deref(), Some("from-query"));
    }

    /// A body over the bound is 413 with 40009.
    #[test]
    fn oversized_body_is_413() {
        let error = message(
            &HeaderMap::new(),
            &HashMap::new(),
            Bytes::from(vec![0; 11]),
            10,
        )
        .unwrap_err();
        assert_eq!(
            (error.code, error.status_code),
            (code::MESSAGE_TOO_LARGE, 413)
        );
    }
}
