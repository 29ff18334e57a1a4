//! The HTTP client of webhook delivery: one POST over HTTP/1.1, bounded in time and in
//! what it reads back. Plain `http://` only for now: `https://` needs a TLS client
//! (tokio-rustls and root certificates), not yet among Tern's dependencies.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;

use crate::payload::Request;

/// Most bytes of a function's answer read (and thrown away): enough for any error page,
/// and a function cannot make the node buffer more.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// Where a rule's requests go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port`, what is dialled and sent as `Host`.
    pub authority: String,
    /// Path and query.
    pub path: String,
}

impl Target {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err("https targets are not supported yet (plain http only)".into())
            }
            _ => return Err(format!("'{url}' is not an http:// URL")),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("'{url}' has no host (or has credentials in it)"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        hyper::Uri::try_from(path).map_err(|e| format!("'{url}': {e}"))?;
        Ok(Target {
            authority,
            path: path.to_string(),
        })
    }
}

/// POSTs `request` to `target` over a fresh connection; the answer's status, or why
/// there was none. The whole exchange is bounded by `timeout`.
pub async fn post(target: &Target, request: &Request, timeout: Duration) -> Result<u16, String> {
    tokio::time::timeout(timeout, exchange(target, request))
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

async fn exchange(target: &Target, request: &Request) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut outbound = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(&target.path)
        .header(hyper::header::HOST, &target.authority)
        .body(Full::new(Bytes::clone(&request.body)))
        .map_err(|e| e.to_string())?;
    for (name, value) in &request.headers {
        // Validated with the rule; a value that still does not parse is skipped.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            outbound.headers_mut().append(name, value);
        }
    }
    let answer = sender
        .send_request(outbound)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status().as_u16();
    // Read (bounded) so the function sees its answer taken; its content is not used.
    let _ = Limited::new(answer.into_body(), RESPONSE_BYTES_MAX)
        .collect()
        .await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// URLs parse to what is dialled and requested; https and junk are refused.
    #[test]
    fn parses_targets() {
        let t = Target::parse("http://127.0.0.1:8080/hooks?x=1").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/hooks?x=1");
        let t = Target::parse("http://example.com").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("example.com:80", "/")
        );
        for bad in [
            "https://example.com/",
            "ftp://x/",
            "example.com",
            "http:///x",
            "http://u:p@h/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
