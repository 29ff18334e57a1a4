//! The HTTP client of webhook delivery: POSTs over HTTP/1.1 on a kept-alive connection,
//! each bounded in time and in what it reads back. `http://` and `https://` (rustls,
//! TLS 1.2/1.3, the certificate verified against the system's roots, which
//! `SSL_CERT_FILE`/`SSL_CERT_DIR` can replace, as for other programs).

use std::sync::{Arc, OnceLock};
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
    /// `https://`: the host the certificate must name; `None` for `http://`.
    pub tls_host: Option<String>,
}

impl Target {
    /// Parses `http[s]://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(format!("'{url}' is not an http:// or https:// URL")),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("'{url}' has no host (or has credentials in it)"));
        }
        let port = authority
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok());
        let host = port.map_or(authority, |(host, _)| host);
        let authority = match (port, tls) {
            (Some(_), _) => authority.to_string(),
            (None, false) => format!("{authority}:80"),
            (None, true) => format!("{authority}:443"),
        };
        hyper::Uri::try_from(path).map_err(|e| format!("'{url}': {e}"))?;
        let tls_host = tls.then(|| host.trim_matches(|c| c == '[' || c == ']').to_string());
        if let Some(host) = &tls_host {
            rustls::pki_types::ServerName::try_from(host.as_str())
                .map_err(|e| format!("'{url}': {e}"))?;
        }
        Ok(Target {
            authority,
            path: path.to_string(),
            tls_host,
        })
    }
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One rule's connection to its function: kept open between requests (HTTP/1.1
/// keep-alive, one request at a time) and opened again when the function closed it.
pub struct Client {
    target: Target,
    /// The connection of the last request, if the function kept it open.
    idle: Option<Sender>,
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client { target, idle: None }
    }

    /// POSTs `request`; the answer's status, or why there was none. The whole exchange
    /// (connecting included) is bounded by `timeout`; a connection cut by it is not
    /// reused.
    pub async fn post(&mut self, request: &Request, timeout: Duration) -> Result<u16, String> {
        tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }

    async fn exchange(&mut self, request: &Request) -> Result<u16, String> {
        if let Some(mut sender) = self.idle.take() {
            if sender.ready().await.is_ok() {
                if let Ok(status) = self.send(sender, request).await {
                    return Ok(status);
                }
                // The function closed the kept connection as the request went out:
                // once more on a new one (at least once: it may have seen the first).
            }
        }
        let sender = connect(&self.target).await?;
        self.send(sender, request).await
    }

    /// Sends on `sender` and keeps it for the next request if the function left the
    /// connection open and its answer was read whole.
    async fn send(&mut self, mut sender: Sender, request: &Request) -> Result<u16, String> {
        let answer = sender
            .send_request(outbound(&self.target, request)?)
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        // Read (bounded) so the function sees its answer taken; its content is not used.
        let whole = Limited::new(answer.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .is_ok();
        if whole && !sender.is_closed() {
            self.idle = Some(sender);
        }
        Ok(status)
    }
}

pub(crate) async fn connect(target: &Target) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    match &target.tls_host {
        None => handshake(stream).await,
        Some(host) => {
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
            handshake(tls).await
        }
    }
}

async fn handshake<S>(stream: S) -> Result<Sender, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // Ends when the function or a dropped `Sender` closes the connection.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The TLS client configuration, built once: the system's root certificates.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!(
                    "no root certificates found for https functions ({:?})",
                    found.errors
                ));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

pub(crate) fn outbound(
    target: &Target,
    request: &Request,
) -> Result<hyper::Request<Full<Bytes>>, String> {
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
    Ok(outbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// URLs parse to what is dialled and requested (and, for https, the name the
    /// certificate must carry); junk is refused.
    #[test]
    fn parses_targets() {
        let t = Target::parse("http://127.0.0.1:8080/hooks?x=1").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/hooks?x=1");
        assert_eq!(t.tls_host, None);
        let t = Target::parse("http://example.com").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("example.com:80", "/")
        );
        let t = Target::parse("https://fn.example.com/ably").unwrap();
        assert_eq!(t.authority, "fn.example.com:443");
        assert_eq!(t.tls_host.as_deref(), Some("fn.example.com"));
        let t = Target::parse("https://localhost:8443/").unwrap();
        assert_eq!(t.authority, "localhost:8443");
        assert_eq!(t.tls_host.as_deref(), Some("localhost"));
        for bad in ["ftp://x/", "example.com", "http:///x", "http://u:p@h/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
