//! The `/push` REST endpoints (RSH1) and who may call them.
//!
//! Callers: a key or token (as on every REST route), optionally proving it acts for
//! one device with `X-Ably-DeviceToken` (the device's `deviceIdentityToken`) or
//! `X-Ably-DeviceSecret`; or a device alone, with its identity token as the bearer
//! token (ably-js updates and deregisters its device that way).
//!
//! Rules: `push-admin` on `*` may do everything. Otherwise (40160 when refused):
//! registering a device needs `push-subscribe` on some channel, and the device's
//! clientId must be the caller's; reading, updating or removing a device needs proof
//! of that device; subscribing needs `push-subscribe` on the channel and either proof
//! of the device or the subscription's clientId being the caller's; listing
//! subscriptions needs a filter on a proven device or the caller's clientId; listing
//! devices or channels and push publish need `push-admin`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use tern_auth::{AuthContext, ClientIdentity, Operation};
use tern_protocol::{code, ErrorInfo};

use super::registry::{Device, Filter, Mutation, Registry, Subscription, Target};
use super::{delivery, load, write};
use crate::credentials::{message_client_id, rest_auth};
use crate::now_ms;
use crate::response::{body, request_format, response_format, ApiError};
use crate::rest::decode_body;
use crate::state::EdgeState;

type Params = Query<HashMap<String, String>>;

/// Marks a device identity token Tern issued: `tern-device:<app>:<secret>`.
const DEVICE_TOKEN_PREFIX: &str = "tern-device:";
/// Items per list page unless `limit` says otherwise, and the most it may say.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1_000;

/// Who is calling.
struct Caller {
    app: String,
    /// The key or token and the identity it acts as; `None` for a device alone.
    credential: Option<(AuthContext, ClientIdentity)>,
    /// A device identity token shown (header or bearer), checked against a device.
    device_token: Option<String>,
    /// A device secret shown (`X-Ably-DeviceSecret`), checked against a device.
    device_secret: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A device identity token presented as the bearer token (`Bearer base64(token)`).
fn bearer_device_token(headers: &HeaderMap, q: &HashMap<String, String>) -> Option<String> {
    let decoded = header(headers, "authorization")
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, value)| {
            base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    decoded
        .or_else(|| q.get("access_token").cloned())
        .filter(|t| t.starts_with(DEVICE_TOKEN_PREFIX))
}

/// The app a device identity token belongs to.
fn token_app(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(DEVICE_TOKEN_PREFIX)?;
    Some(rest.rsplit_once(':')?.0).filter(|app| !app.is_empty())
}

fn authenticate(
    state: &EdgeState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<Caller, ErrorInfo> {
    let device_secret = header(headers, "x-ably-devicesecret").map(str::to_string);
    if let Some(token) = bearer_device_token(headers, q) {
        // Only an app of this node: the app names state kept per app, and a client must
        // not make the node keep state for names it made up.
        let app = token_app(&token)
            .filter(|app| state.keys.keys().any(|k| k.app_id == *app))
            .ok_or_else(|| {
                ErrorInfo::new(code::INVALID_CREDENTIALS, "unrecognised device token")
            })?;
        return Ok(Caller {
            app: app.to_string(),
            credential: None,
            device_token: Some(token),
            device_secret,
        });
    }
    let (auth, identity) = rest_auth(&state.keys, headers, q, now_ms())?;
    Ok(Caller {
        app: auth.app_id.clone(),
        credential: Some((auth, identity)),
        device_token: header(headers, "x-ably-devicetoken").map(str::to_string),
        device_secret,
    })
}

/// The app a push request is for (to find its home), if it authenticates.
pub(crate) fn app_of(state: &EdgeState, request: &Request) -> Option<String> {
    let q: Params = Query::try_from_uri(request.uri()).ok()?;
    authenticate(state, request.headers(), &q)
        .ok()
        .map(|c| c.app)
}

fn denied(what: &str) -> ErrorInfo {
    ErrorInfo::new(
        code::CAPABILITY_DENIED,
        format!("{what}: not permitted by this credential's capability"),
    )
}

impl Caller {
    fn is_admin(&self) -> bool {
        self.credential
            .as_ref()
            .is_some_and(|(auth, _)| auth.capability.allows("*", Operation::PushAdmin))
    }

    fn may_subscribe(&self, channel: Option<&str>) -> bool {
        let Some((auth, _)) = &self.credential else {
            return false;
        };
        match channel {
            Some(channel) => auth.capability.allows(channel, Operation::PushSubscribe),
            None => auth
                .capability
                .resources()
                .any(|(_, ops)| ops.contains(Operation::PushSubscribe)),
        }
    }

    /// Whether the caller proved it acts for `device`.
    fn owns(&self, device: &Device) -> bool {
        let token = self
            .device_token
            .as_deref()
            .is_some_and(|t| constant_eq(t, &device.identity_token));
        let secret = match (&self.device_secret, &device.device_secret) {
            (Some(shown), Some(known)) => constant_eq(shown, known),
            _ => false,
        };
        token || secret
    }

    fn client_id(&self) -> Option<&str> {
        match &self.credential {
            Some((_, ClientIdentity::Id(id))) => Some(id),
            _ => None,
        }
    }
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A device as the SDKs send it; unknown fields (`deviceIdentityToken`, `push.state`)
/// are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeviceInput {
    id: Option<String>,
    client_id: Option<String>,
    platform: Option<String>,
    form_factor: Option<String>,
    metadata: Option<Value>,
    device_secret: Option<String>,
    push: Option<PushInput>,
}

#[derive(Deserialize, Default)]
struct PushInput {
    recipient: Option<Value>,
}

fn device_json(device: &Device, with_secret: bool) -> Value {
    let mut out = json!({
        "id": device.id,
        "platform": device.platform,
        "formFactor": device.form_factor,
        "metadata": device.metadata.clone().unwrap_or_else(|| json!({})),
        "push": { "recipient": device.recipient, "state": "ACTIVE" },
    });
    if let Some(client_id) = &device.client_id {
        out["clientId"] = json!(client_id);
    }
    if with_secret {
        if let Some(secret) = &device.device_secret {
            out["deviceSecret"] = json!(secret);
        }
    }
    out
}

/// A registration answer: the device and its `deviceIdentityToken`.
fn registered_json(device: &Device) -> Value {
    let mut out = device_json(device, true);
    out["deviceIdentityToken"] = json!({
        "token": device.identity_token,
        "issued": now_ms(),
        "capability": "",
        "clientId": device.client_id,
    });
    out
}

fn subscription_json(subscription: &Subscription) -> Value {
    match &subscription.target {
        Target::Device(id) => json!({ "channel": subscription.channel, "deviceId": id }),
        Target::Client(id) => json!({ "channel": subscription.channel, "clientId": id }),
    }
}

fn new_identity_token(app: &str) -> String {
    let random: [u8; 24] = rand::rng().random();
    format!(
        "{DEVICE_TOKEN_PREFIX}{app}:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

fn reply(
    status: StatusCode,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    value: &Value,
) -> Response {
    body(
        status,
        response_format(headers, q.get("format").map(String::as_str)),
        value,
    )
}

fn required<'a>(value: &'a Option<String>, what: &str) -> Result<&'a str, ErrorInfo> {
    value
        .as_deref()
        .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, format!("{what} is required")))
}

/// The device `input` describes, replacing `existing` (whose identity token it keeps).
fn device_from(
    caller: &Caller,
    input: DeviceInput,
    existing: Option<&Device>,
) -> Result<Device, ErrorInfo> {
    let client_id = match (&caller.credential, caller.is_admin()) {
        (Some((_, identity)), false) => message_client_id(identity, input.client_id.as_deref())?,
        _ => input
            .client_id
            .or_else(|| caller.client_id().map(str::to_string)),
    };
    let recipient = input
        .push
        .and_then(|p| p.recipient)
        .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, "push.recipient is required"))?;
    Ok(Device {
        id: required(&input.id, "id")?.to_string(),
        client_id,
        platform: required(&input.platform, "platform")?.to_string(),
        form_factor: required(&input.form_factor, "formFactor")?.to_string(),
        metadata: input.metadata,
        device_secret: input.device_secret,
        recipient,
        identity_token: existing.map_or_else(
            || new_identity_token(&caller.app),
            |d| d.identity_token.clone(),
        ),
    })
}

/// Registers (or re-registers) a device: `POST /push/deviceRegistrations` and
/// `PUT /push/deviceRegistrations/{id}`.
async fn save_device(
    state: &EdgeState,
    caller: &Caller,
    mut input: DeviceInput,
    path_id: Option<String>,
) -> Result<Value, ErrorInfo> {
    if let Some(id) = path_id {
        if input.id.as_ref().is_some_and(|given| *given != id) {
            return Err(ErrorInfo::new(
                code::BAD_REQUEST,
                "the device id in the body differs from the path's",
            ));
        }
        input.id = Some(id);
    }
    let id = required(&input.id, "id")?.to_string();
    let mut app = load(state, &caller.app).await?;
    let existing = app.registry.device(&id).cloned();
    // Re-registering a device needs proof of it: its token, or its secret (in a header
    // or, as a registration carries it, in the body).
    let secret_in_body = |device: &Device| match (&input.device_secret, &device.device_secret) {
        (Some(shown), Some(known)) => constant_eq(shown, known),
        _ => false,
    };
    let allowed = caller.is_admin()
        || match &existing {
            Some(device) => {
                caller.may_subscribe(None) && (caller.owns(device) || secret_in_body(device))
            }
            None => caller.may_subscribe(None),
        };
    if !allowed {
        return Err(denied("register this device"));
    }
    let device = device_from(caller, input, existing.as_ref())?;
    device.check(&state.config.push)?;
    write(
        state,
        &mut app,
        &caller.app,
        Mutation::PutDeviceV1 {
            device: device.clone(),
        },
    )
    .await?;
    Ok(registered_json(&device))
}

fn decode_device(headers: &HeaderMap, bytes: &[u8]) -> Result<DeviceInput, ErrorInfo> {
    decode_body(request_format(headers), bytes)
}

/// `POST /push/deviceRegistrations`: registers a device (push activation).
pub(crate) async fn register(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let input = decode_device(&headers, &bytes)?;
    let saved = save_device(&state, &caller, input, None).await?;
    Ok(reply(StatusCode::CREATED, &headers, &q, &saved))
}

/// `PUT /push/deviceRegistrations/{id}`: creates or replaces a device.
pub(crate) async fn put_device(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let input = decode_device(&headers, &bytes)?;
    let saved = save_device(&state, &caller, input, Some(id)).await?;
    Ok(reply(StatusCode::OK, &headers, &q, &saved))
}

/// `PATCH /push/deviceRegistrations/{id}`: changes some fields of a device (ably-js
/// sends a new `push.recipient` with the device's own token).
pub(crate) async fn patch_device(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let patch = decode_device(&headers, &bytes)?;
    let mut app = load(&state, &caller.app).await?;
    let mut device = owned_device(&caller, &app.registry, &id)?.clone();
    if let Some(recipient) = patch.push.and_then(|p| p.recipient) {
        device.recipient = recipient;
    }
    if let Some(metadata) = patch.metadata {
        device.metadata = Some(metadata);
    }
    if let Some(form_factor) = patch.form_factor {
        device.form_factor = form_factor;
    }
    if patch.client_id.is_some() {
        device.client_id = match (&caller.credential, caller.is_admin()) {
            (Some((_, identity)), false) => {
                message_client_id(identity, patch.client_id.as_deref())?
            }
            (None, _) => return Err(denied("change a device's clientId").into()),
            _ => patch.client_id,
        };
    }
    device.check(&state.config.push)?;
    write(
        &state,
        &mut app,
        &caller.app,
        Mutation::PutDeviceV1 {
            device: device.clone(),
        },
    )
    .await?;
    Ok(reply(
        StatusCode::OK,
        &headers,
        &q,
        &device_json(&device, true),
    ))
}

/// The device `id`, if the caller may act on it (admin or proof of the device).
fn owned_device<'a>(
    caller: &Caller,
    registry: &'a Registry,
    id: &str,
) -> Result<&'a Device, ErrorInfo> {
    match registry.device(id) {
        Some(device) if caller.is_admin() || caller.owns(device) => Ok(device),
        // A non-admin learns nothing of devices it cannot prove.
        _ if !caller.is_admin() => Err(denied("access this device")),
        _ => Err(ErrorInfo::new(
            code::NOT_FOUND,
            format!("no device registration with id '{id}'"),
        )),
    }
}

/// `GET /push/deviceRegistrations/{id}`.
pub(crate) async fn get_device(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let app = load(&state, &caller.app).await?;
    let device = owned_device(&caller, &app.registry, &id)?;
    Ok(reply(
        StatusCode::OK,
        &headers,
        &q,
        &device_json(device, true),
    ))
}

/// `DELETE /push/deviceRegistrations/{id}`: removes the device and its subscriptions
/// (nothing to remove is not an error).
pub(crate) async fn delete_device(
    State(state): State<Arc<EdgeState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    remove_devices(&state, &caller, Some(id), None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /push/deviceRegistrations?deviceId=…&clientId=…`.
pub(crate) async fn delete_devices(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let device_id = q.get("deviceId").cloned();
    let client_id = q.get("clientId").cloned();
    if device_id.is_none() && client_id.is_none() {
        return Err(ErrorInfo::new(code::BAD_REQUEST, "deviceId or clientId is required").into());
    }
    remove_devices(&state, &caller, device_id, client_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove_devices(
    state: &EdgeState,
    caller: &Caller,
    device_id: Option<String>,
    client_id: Option<String>,
) -> Result<(), ErrorInfo> {
    let mut app = load(state, &caller.app).await?;
    if !caller.is_admin() {
        // Without push-admin: only a device it proves, and nothing by clientId alone.
        let device = device_id
            .as_deref()
            .and_then(|id| app.registry.device(id))
            .filter(|d| caller.owns(d));
        if device.is_none() {
            return Err(denied("remove devices"));
        }
    }
    let filter = Filter {
        channel: None,
        device_id,
        client_id,
    };
    write(
        state,
        &mut app,
        &caller.app,
        Mutation::RemoveDevicesV1 { filter },
    )
    .await
}

fn page_limit(q: &HashMap<String, String>) -> usize {
    q.get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(PAGE_DEFAULT)
        .clamp(1, PAGE_MAX)
}

/// `GET /push/deviceRegistrations?deviceId=…&clientId=…`: push-admin only.
pub(crate) async fn list_devices(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    if !caller.is_admin() {
        return Err(denied("list device registrations").into());
    }
    let filter = Filter {
        channel: None,
        device_id: q.get("deviceId").cloned(),
        client_id: q.get("clientId").cloned(),
    };
    let limit = page_limit(&q);
    let app = load(&state, &caller.app).await?;
    let mut devices = app
        .registry
        .devices(&filter, q.get("page").map(String::as_str), limit + 1);
    let next = (devices.len() > limit).then(|| devices[limit - 1].id.clone());
    devices.truncate(limit);
    let items: Vec<Value> = devices.iter().map(|d| device_json(d, false)).collect();
    Ok(crate::history::page_response(
        &headers,
        &q,
        "deviceRegistrations",
        items,
        next,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionInput {
    channel: Option<String>,
    device_id: Option<String>,
    client_id: Option<String>,
}

/// `POST /push/channelSubscriptions`: subscribes a device or a clientId to a channel.
pub(crate) async fn subscribe(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let input: SubscriptionInput = decode_body(request_format(&headers), &bytes)?;
    let channel = required(&input.channel, "channel")?.to_string();
    let target = match (input.device_id, input.client_id) {
        (Some(id), None) => Target::Device(id),
        (None, Some(id)) => Target::Client(id),
        _ => {
            return Err(ErrorInfo::new(
                code::BAD_REQUEST,
                "a subscription names exactly one of deviceId and clientId",
            )
            .into())
        }
    };
    let mut app = load(&state, &caller.app).await?;
    let allowed = caller.is_admin()
        || (caller.may_subscribe(Some(&channel))
            && match &target {
                Target::Device(id) => app.registry.device(id).is_some_and(|d| caller.owns(d)),
                Target::Client(id) => caller.client_id() == Some(id.as_str()),
            });
    if !allowed {
        return Err(denied("subscribe to push on this channel").into());
    }
    let subscription = Subscription { channel, target };
    write(
        &state,
        &mut app,
        &caller.app,
        Mutation::SubscribeV1 {
            subscription: subscription.clone(),
        },
    )
    .await?;
    Ok(reply(
        StatusCode::CREATED,
        &headers,
        &q,
        &subscription_json(&subscription),
    ))
}

fn subscription_filter(q: &HashMap<String, String>) -> Filter {
    Filter {
        channel: q.get("channel").cloned(),
        device_id: q.get("deviceId").cloned(),
        client_id: q.get("clientId").cloned(),
    }
}

/// Whether a caller without push-admin may see or remove the subscriptions `filter`
/// selects: only those of a device it proves or of its own clientId.
fn may_touch(caller: &Caller, registry: &Registry, filter: &Filter) -> bool {
    if caller.is_admin() {
        return true;
    }
    if filter
        .channel
        .as_deref()
        .is_some_and(|c| !caller.may_subscribe(Some(c)))
    {
        return false;
    }
    let device = filter
        .device_id
        .as_deref()
        .and_then(|id| registry.device(id))
        .is_some_and(|d| caller.owns(d));
    let client = filter.client_id.is_some() && filter.client_id.as_deref() == caller.client_id();
    match (&filter.device_id, &filter.client_id) {
        (Some(_), Some(_)) => device && client,
        (Some(_), None) => device,
        (None, Some(_)) => client,
        (None, None) => false,
    }
}

/// `DELETE /push/channelSubscriptions?channel=…&deviceId=…&clientId=…`.
pub(crate) async fn unsubscribe(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let filter = subscription_filter(&q);
    if filter.names_nothing() {
        return Err(ErrorInfo::new(
            code::BAD_REQUEST,
            "channel, deviceId or clientId is required",
        )
        .into());
    }
    let mut app = load(&state, &caller.app).await?;
    if !may_touch(&caller, &app.registry, &filter) {
        return Err(denied("remove these push subscriptions").into());
    }
    write(
        &state,
        &mut app,
        &caller.app,
        Mutation::UnsubscribeV1 { filter },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn encode_page(subscription: &Subscription) -> String {
    let json = serde_json::to_vec(subscription).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_page(page: &str) -> Result<Subscription, ErrorInfo> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(page)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ErrorInfo::new(code::INVALID_PARAMETER_VALUE, "invalid page"))
}

/// `GET /push/channelSubscriptions?channel=…&deviceId=…&clientId=…&concatFilters=…`.
pub(crate) async fn list_subscriptions(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let filter = subscription_filter(&q);
    let any = q.get("concatFilters").is_some_and(|v| v == "true");
    let after = q.get("page").map(|p| decode_page(p)).transpose()?;
    let limit = page_limit(&q);
    let app = load(&state, &caller.app).await?;
    if !may_touch(&caller, &app.registry, &filter) {
        return Err(denied("list these push subscriptions").into());
    }
    let mut found = app
        .registry
        .subscriptions(&filter, any, after.as_ref(), limit + 1);
    let next = (found.len() > limit).then(|| encode_page(found[limit - 1]));
    found.truncate(limit);
    let items: Vec<Value> = found.into_iter().map(subscription_json).collect();
    Ok(crate::history::page_response(
        &headers,
        &q,
        "channelSubscriptions",
        items,
        next,
    ))
}

/// `GET /push/channels`: channels with at least one subscription; push-admin only.
pub(crate) async fn list_channels(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    if !caller.is_admin() {
        return Err(denied("list push channels").into());
    }
    let limit = page_limit(&q);
    let app = load(&state, &caller.app).await?;
    let mut channels = app
        .registry
        .channels(q.get("page").map(String::as_str), limit + 1);
    let next = (channels.len() > limit).then(|| channels[limit - 1].to_string());
    channels.truncate(limit);
    Ok(crate::history::page_response(
        &headers, &q, "channels", channels, next,
    ))
}

/// `POST /push/publish`: `{recipient, notification, data, …}`; push-admin only. The
/// recipient is a device (`deviceId`), a client's devices (`clientId`) or a transport
/// address (`transportType` …).
pub(crate) async fn publish(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    if !caller.is_admin() {
        return Err(denied("push publish").into());
    }
    let mut payload: Value = decode_body(request_format(&headers), &bytes)?;
    let recipient = payload
        .as_object_mut()
        .and_then(|o| o.remove("recipient"))
        .ok_or_else(|| ErrorInfo::new(code::BAD_REQUEST, "recipient is required"))?;
    let recipients = recipients_of(&state, &caller.app, &recipient).await?;
    delivery::deliver(&state, &caller.app, &recipients, &payload);
    Ok(reply(StatusCode::CREATED, &headers, &q, &json!({})))
}

/// The transport addresses a publish recipient stands for.
async fn recipients_of(
    state: &EdgeState,
    app_id: &str,
    recipient: &Value,
) -> Result<Vec<Value>, ErrorInfo> {
    let field = |name: &str| recipient.get(name).and_then(Value::as_str);
    if let Some(id) = field("deviceId") {
        let app = load(state, app_id).await?;
        return Ok(app
            .registry
            .device(id)
            .map(|d| d.recipient.clone())
            .into_iter()
            .collect());
    }
    if let Some(id) = field("clientId") {
        let app = load(state, app_id).await?;
        return Ok(app
            .registry
            .client_devices(id)
            .into_iter()
            .map(|d| d.recipient.clone())
            .collect());
    }
    super::registry::check_recipient(recipient, &state.config.push)?;
    Ok(vec![recipient.clone()])
}

#[derive(Deserialize)]
struct PublishedInput {
    channel: String,
    payloads: Vec<Value>,
}

/// `POST /push/tern/published` (Tern's own, see `delivery::on_published`): the push
/// payloads of a message published on `channel` at another node of this region,
/// delivered to the channel's subscribers here. Needs `publish` on the channel: what
/// it does is what publishing a message with `extras.push` there does.
pub(crate) async fn published(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &q)?;
    let input: PublishedInput = decode_body(request_format(&headers), &bytes)?;
    let base = crate::channel_name::parse(&input.channel)
        .map_err(crate::channel_name::invalid)?
        .base;
    let allowed = caller
        .credential
        .as_ref()
        .is_some_and(|(auth, _)| auth.capability.allows(base, Operation::Publish));
    if !allowed {
        return Err(crate::credentials::denied("publish", base).into());
    }
    if input.payloads.len() > state.config.messages_per_publish_max {
        return Err(ErrorInfo::new(
            code::BAD_REQUEST,
            "more push payloads than one publish may carry",
        )
        .into());
    }
    let payloads: Vec<Value> = input
        .payloads
        .into_iter()
        .filter(Value::is_object)
        .collect();
    delivery::deliver_to_subscribers(&state, &caller.app, base, &payloads).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
