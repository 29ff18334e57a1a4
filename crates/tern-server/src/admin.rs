//! The admin port: a second listener, loopback by default, for the people and tools that
//! run a node rather than for its clients. It serves `/metrics` (Prometheus),
//! `/regions` (the cluster's live nodes), `/health` (as the client port does) and the
//! status page at `/`. None of it is on the client port: member addresses, loads and
//! counters are not for the public internet.
//!
//! # Threat model
//! Anyone who can reach the admin port learns the cluster's shape and traffic, nothing
//! more (every route is a read). On loopback that is the machine's own users. Bound to
//! any other address it needs `token`: every request must then carry it, as
//! `Authorization: Bearer <token>` or as the password of HTTP Basic (what a browser
//! sends for the status page), compared in constant time; and a node refuses to start
//! with a non-loopback `listen` and no token.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tern_edge::EdgeState;
use tokio::sync::watch;

/// `[admin]`: the monitoring listener (see config.example.toml).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// `false` runs without an admin listener.
    pub enabled: bool,
    /// `IP:port`; port 0 picks a free one (printed at start). Loopback by default.
    pub listen: SocketAddr,
    /// Bearer token every request must present; required when `listen` is not a
    /// loopback address.
    pub token: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
        }
    }
}

impl AdminSection {
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(token) = &self.token {
            anyhow::ensure!(
                token.len() >= 16,
                "admin.token must be at least 16 characters"
            );
        }
        anyhow::ensure!(
            !self.enabled || self.listen.ip().is_loopback() || self.token.is_some(),
            "admin.listen {} is not a loopback address: set admin.token (a bearer token \
             Prometheus and people present) or listen on 127.0.0.1",
            self.listen
        );
        Ok(())
    }
}

/// `tern dev`'s admin port for a region on client port `client`: 100 above it (8080 ->
/// 8180), or a free one when the client port is picked freely (0) or near the top.
pub fn dev_port(client: u16) -> u16 {
    match client {
        0 => 0,
        port => port.checked_add(100).unwrap_or(0),
    }
}

/// Renders this node's Prometheus text exposition.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin routes read.
pub struct Admin {
    pub edge: Arc<EdgeState>,
    pub cluster: Option<Arc<crate::cluster::EdgeCluster>>,
    pub render: Render,
    pub token: Option<String>,
    /// This node's id and region (`local` outside a cluster): its metric labels, and
    /// how `/regions` lists it when it is not in a cluster.
    pub node_id: String,
    pub region: String,
    pub client_url: String,
}

impl Admin {
    /// `node="…",region="…"`, as on every series of the recorder.
    fn labels(&self) -> String {
        let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        format!(
            r#"node="{}",region="{}""#,
            escape(&self.node_id),
            escape(&self.region)
        )
    }
}

/// Binds `section.listen` and serves the admin routes until `shutdown` flips; the bound
/// address, or `None` when the admin port is disabled.
pub async fn start(
    section: &crate::admin::AdminSection,
    admin: Admin,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<SocketAddr>> {
    if !section.enabled {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(section.listen)
        .await
        .with_context(|| format!("binding the admin listener {}", section.listen))?;
    let addr = listener.local_addr()?;
    let app = router(Arc::new(admin));
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(%err, "admin listener failed");
        }
    });
    Ok(Some(addr))
}

fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status))
        .route("/metrics", get(metrics))
        .route("/regions", get(regions))
        .route("/health", get(health))
        .layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            require_token,
        ))
        .with_state(admin)
}

/// Refuses a request without the configured bearer token (401), when there is one.
async fn require_token(
    State(admin): State<Arc<Admin>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &admin.token {
        if !presents(request.headers(), token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"tern admin\"")],
                "admin token required\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// Whether `headers` carry the token: `Authorization: Bearer <token>` (Prometheus,
/// scripts) or HTTP Basic with the token as the password, any user name (a browser asks
/// for it on the 401 and sends it with the status page's own requests). Compared in
/// constant time.
fn presents(headers: &HeaderMap, token: &str) -> bool {
    use base64::Engine;
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(bearer) = value.strip_prefix("Bearer ") {
        bearer.as_bytes().to_vec()
    } else if let Some(basic) = value.strip_prefix("Basic ") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
            return false;
        };
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// `GET /metrics`: Prometheus text exposition of this node.
async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    admin.edge.refresh_gauges();
    if let Some(cluster) = &admin.cluster {
        cluster.replicator.record_link_rtts();
    }
    let mut text = (admin.render)();
    if let Some(process) = crate::process::ProcessStats::read() {
        text.push_str(&process.render(&admin.labels()));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /regions`: the cluster's live nodes by region; a node outside a cluster lists
/// itself, in region `local`.
async fn regions(State(admin): State<Arc<Admin>>) -> Response {
    axum::Json(regions_of(&admin)).into_response()
}

fn regions_of(admin: &Admin) -> serde_json::Value {
    admin.edge.cluster_regions().unwrap_or_else(|| {
        serde_json::json!({
            "self": "local",
            "regions": [{
                "region": "local",
                "nodes": [{
                    "nodeId": admin.node_id,
                    "endpoint": admin.client_url,
                    "load": admin.edge.connection_count(),
                }],
            }],
        })
    })
}

/// The status page: one self-contained file (inline CSS and JS, no external assets)
/// that reads `/status.json` and `/metrics` every 2 s.
const STATUS_PAGE: &str = include_str!("status.html");

/// Lines of recent warnings and errors `/status.json` shows.
const RECENT_SHOWN: usize = 50;

/// `GET /`: the status page.
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

/// `GET /status.json`: this node, its health, the cluster's live nodes and the recent
/// warnings and errors logged on its threads; the page takes the numbers from
/// `/metrics`.
async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let (healthy, health) = admin.edge.health_report();
    axum::Json(serde_json::json!({
        "node": admin.node_id,
        "region": admin.region,
        "version": env!("CARGO_PKG_VERSION"),
        "clientUrl": admin.client_url,
        "healthy": healthy,
        "health": health,
        "cluster": regions_of(&admin),
        "recent": crate::recent::for_node(&admin.node_id, RECENT_SHOWN),
        "nowMs": tern_edge::now_ms(),
    }))
    .into_response()
}

/// `GET /health`: as on the client port.
async fn health(State(admin): State<Arc<Admin>>) -> Response {
    let (healthy, body) = admin.edge.health_report();
    let status = match healthy {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> AdminSection {
        toml::from_str(text).unwrap()
    }

    /// Loopback needs no token; any other address does, and a short one is refused.
    #[test]
    fn a_public_admin_port_needs_a_token() {
        assert!(section("").validate().is_ok());
        assert!(section(r#"listen = "127.0.0.1:9464""#).validate().is_ok());
        assert!(section(r#"listen = "[::1]:9464""#).validate().is_ok());
        let err = section(r#"listen = "0.0.0.0:9464""#)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("admin.token"), "{err}");
        assert!(section(
            r#"listen = "0.0.0.0:9464"
token = "0123456789abcdef""#
        )
        .validate()
        .is_ok());
        assert!(section(
            r#"listen = "0.0.0.0:9464"
enabled = false"#
        )
        .validate()
        .is_ok());
        let err = section(r#"token = "short""#).validate().unwrap_err();
        assert!(err.to_string().contains("16"), "{err}");
    }

    #[test]
    fn bearer_tokens_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!presents(&headers, "0123456789abcdef"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert!(presents(&headers, "0123456789abcdef"));
        assert!(!presents(&headers, "0123456789abcdeF"));
        assert!(!presents(&headers, "0123456789abcdef0"));
        headers.insert(
            header::AUTHORIZATION,
            "Basic 0123456789abcdef".parse().unwrap(),
        );
        assert!(!presents(&headers, "0123456789abcdef"));
        // "admin:0123456789abcdef"
        let basic = "Basic YWRtaW46MDEyMzQ1Njc4OWFiY2RlZg==";
        headers.insert(header::AUTHORIZATION, basic.parse().unwrap());
        assert!(presents(&headers, "0123456789abcdef"));
        assert!(!presents(&headers, "0123456789abcdeF"));
    }
}
