//! A connection that resumes on another node (its region failed, or DNS moved the
//! client) gets a new id there, since the registry is per node. Its own channel must
//! not be lost with the old id: the backend still pushes to the old id, and ably-js
//! re-attaches the old `[connection]<oldId>` channel with its channelSerial.
//!
//! So the new node claims the connection from the old one while it opens the new
//! connection: `POST /connections/{oldId}/handover` at the node the old id names, with
//! the resume key the client presented. The old node checks the key as a resume would
//! (its secret is the proof: only the client was ever given it), takes the parked state
//! (superseding a transport it still thinks is live) and remembers the old id as moved
//! to the new one (`ConnectionRegistry::moved`, until `connectionStateTtl`). The new
//! connection then owns the old id's channel as well as its own (subscribe only), so
//! ably-js's re-attach resumes it from its channelSerial with exactly the messages it
//! missed, and messages still POSTed to the old id (published on that channel at the old
//! node, replicated like any channel) keep reaching it. `GET` of the old id answers
//! `moved` with the new id; `DELETE` of it closes the new connection.
//!
//! The claim is bounded (`CLAIM_TIMEOUT`, 1.5 s; the old node's part within 0.5 s).
//! When the old node is dead or does not answer, the key's signature (`keys`: every
//! member signs connection keys under the same cluster secret) still proves the client
//! held the old connection, so the new connection owns its channel all the same, and
//! what the old node acknowledged before it died (on `ack_replicas`) reaches the client
//! by the channel's resume. The old id itself is 404 from then on (its node is gone):
//! the backend pushes to the new id, which the app learns on `connected`
//! (docs/functions.md). A claim repeated with the same key (the first one's CONNECTED
//! was lost with its transport) re-points the moved id at the newest connection.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tern_protocol::{code, ErrorInfo, Format};

use super::node_tag_of;
use crate::now_ms;
use crate::response::{body, ApiError};
use crate::state::EdgeState;

/// How long the old node waits for a transport it still thinks live to let go of the
/// connection. Well inside `CLAIM_TIMEOUT`, so the old node does not record a move the
/// new node has stopped waiting for (which would leave the old id `moved` to a
/// connection that does not own its channel).
const GIVE_SUPERSEDE_WAIT: Duration = Duration::from_millis(500);
/// How long opening a connection may wait for the old node to hand the old one over.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(1_500);
/// Most earlier ids one connection owns the channels of (a chain of cross-node resumes;
/// the oldest are dropped first).
pub(crate) const PREDECESSORS_MAX: usize = 4;

/// The handover request the new node sends.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Claim {
    /// The resume key the client presented (`<oldId>!<secret>`).
    key: String,
    /// The connection's id on the new node.
    to: String,
    /// The app and clientId the client connected with: must match, as for a resume.
    app_id: String,
    client_id: Option<String>,
}

/// The old node's answer: the ids the old connection had itself taken over.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Given {
    predecessors: Vec<String>,
}

/// How a claim ended.
enum Claimed {
    /// The old node handed the connection over; these are its own predecessors.
    Given(Vec<String>),
    /// The old node answered, and refused: the key does not resume the connection.
    Refused,
    /// No answer: the old node is gone, unreachable or too slow.
    Unanswered,
}

/// At the new node, while opening connection `to` for a resume whose `key` another node
/// issued: claims the old connection. Returns the ids whose channels `to` now owns
/// (the old id first, then its own predecessors), empty when the key proves nothing.
/// Owning the channel needs only proof that the client was given a key of the old
/// connection: the old node's answer, or the key's signature (`keys`), which also
/// covers an old node that died (the failover case: what it acknowledged before it
/// died reaches the client) and a key the old node no longer resumes (spent by an
/// earlier claim whose CONNECTED was lost, or expired). Reading the channel of a
/// connection whose key one holds gives nothing away: only its client was given it.
pub(crate) async fn claim(
    state: &EdgeState,
    key: &str,
    to: &str,
    app_id: &str,
    client_id: Option<&str>,
) -> Vec<Arc<str>> {
    let Some((old, secret)) = tern_core::registry::split_key(key) else {
        return Vec::new();
    };
    let claimed = ask(state, key, old, to, app_id, client_id).await;
    let vouched = state.connection_keys.vouches(old, secret);
    let (outcome, predecessors) = match claimed {
        Claimed::Given(predecessors) => ("taken", Some(predecessors)),
        _ if vouched => ("vouched", Some(Vec::new())),
        Claimed::Refused => ("refused", None),
        Claimed::Unanswered => ("unanswered", None),
    };
    metrics::counter!("tern_connection_handovers_total", "outcome" => outcome).increment(1);
    tracing::debug!(%old, %to, outcome, "connection handover");
    let Some(predecessors) = predecessors else {
        return Vec::new();
    };
    std::iter::once(old.to_string())
        .chain(predecessors)
        .filter(|id| node_tag_of(id).is_some())
        .take(PREDECESSORS_MAX)
        .map(Arc::from)
        .collect()
}

/// Sends the claim to the node that issued `old`.
async fn ask(
    state: &EdgeState,
    key: &str,
    old: &str,
    to: &str,
    app_id: &str,
    client_id: Option<&str>,
) -> Claimed {
    let holder = node_tag_of(old).and_then(|tag| state.cluster.as_ref()?.node_by_tag(tag));
    let Some(node) = holder else {
        return Claimed::Unanswered;
    };
    let claim = Claim {
        key: key.to_string(),
        to: to.to_string(),
        app_id: app_id.to_string(),
        client_id: client_id.map(str::to_string),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = tern_protocol::encode_value(Format::Json, &claim);
    let path = format!("/connections/{old}/handover");
    let answer = crate::forward::call(
        &node.client_url,
        Method::POST,
        &path,
        headers,
        body,
        CLAIM_TIMEOUT,
    )
    .await;
    match answer {
        Ok((StatusCode::OK, bytes)) => {
            match tern_protocol::decode_value::<Given>(Format::Json, &bytes) {
                Ok(given) => Claimed::Given(given.predecessors),
                Err(_) => Claimed::Unanswered,
            }
        }
        // A node that answers for itself: 404 (the key resumes nothing there) or 400.
        Ok((status, _)) if status.is_client_error() => Claimed::Refused,
        Ok((status, _)) => {
            tracing::info!(%old, %to, %status, "connection handover failed");
            Claimed::Unanswered
        }
        Err(reason) => {
            tracing::info!(%old, %to, %reason, "connection handover failed");
            Claimed::Unanswered
        }
    }
}

/// `POST /connections/{id}/handover` at the node holding `id`: see the module doc.
/// 200 with the old connection's own predecessors; 404/80008 when the key does not
/// resume it (unknown, expired, spent, another app or clientId).
pub(crate) async fn give(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let claim: Claim = crate::rest::decode_body(Format::Json, &bytes)?;
    let names_id = tern_core::registry::split_key(&claim.key).is_some_and(|(old, _)| old == id);
    if !names_id || node_tag_of(&claim.to).is_none() {
        return Err(ErrorInfo::new(code::BAD_REQUEST, "handover names another connection").into());
    }
    let refused =
        |error: ErrorInfo| ApiError(ErrorInfo::with_status(error.code, 404, error.message));
    let taken = crate::session::take_parked(
        &state,
        &claim.key,
        &claim.app_id,
        claim.client_id.as_deref(),
        GIVE_SUPERSEDE_WAIT,
    )
    .await;
    let (old, parked, _) = match taken {
        Ok(taken) => taken,
        Err(error) => {
            // Moved already, by a claim whose CONNECTED the client never got: it
            // resumed again, from the same key, as `to`. Follow it there.
            let secret = tern_core::registry::split_key(&claim.key).map_or("", |(_, s)| s);
            let again = state.connection_keys.vouches(&id, secret) && {
                let mut registry = state.registry();
                let moved_here = matches!(
                    registry.lookup(&id, now_ms()),
                    Some(tern_core::Lookup::Moved { app, .. }) if **app == *claim.app_id
                );
                moved_here && registry.repoint(&id, claim.to.as_str().into())
            };
            if again {
                let given = Given {
                    predecessors: Vec::new(),
                };
                return Ok(body(StatusCode::OK, Format::Json, &given).into_response());
            }
            return Err(refused(error));
        }
    };
    // It ended here; the client goes on as `to` on the other node. Its presence
    // members still leave after the grace period (the new connection re-enters).
    super::ended_here(&state, &old, &parked, crate::hooks::EndReason::Moved);
    let deadline_ms = now_ms() + state.config.connection_state_ttl_ms as i64;
    state.registry().moved(
        old,
        claim.to.as_str().into(),
        parked.info.app_id.as_str().into(),
        deadline_ms,
    );
    let given = Given {
        predecessors: parked
            .info
            .predecessors
            .iter()
            .map(|id| id.to_string())
            .collect(),
    };
    Ok(body(StatusCode::OK, Format::Json, &given).into_response())
}
