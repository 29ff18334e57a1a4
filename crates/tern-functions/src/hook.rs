//! Synchronous functions: called while a publisher or a connecting client waits, and
//! able to change the outcome (before-publish functions; the `$connect` function).
//! The asynchronous `$disconnect` event goes through the webhook outbox instead
//! ([`crate::Outbox::record_disconnect`]).
//!
//! # Layout
//! - [`config`]: [`HookConfig`] (what `[[apps.before_publish]]` and
//!   `[apps.on_connect]` hold), validation, channel filter.
//! - [`verdict`]: the request bodies and what an answer means, failure policy applied
//!   (no I/O).
//! - [`order`]: [`order::Pipeline`], one connection's publishes kept in order while
//!   some wait for a verdict (no I/O).
//! - here: [`Hooks`], every function of the node, and [`Caller`], the bounded HTTP
//!   side of one function.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tokio::sync::Semaphore;

pub mod config;
pub mod order;
pub mod verdict;

pub use config::{FailurePolicy, Hook, HookConfig, HookError, HookKind};
pub use verdict::{ConnectVerdict, Connecting, MessageChange, PublishVerdict};

use crate::http::{connect, outbound, Sender};
use crate::payload::Request;
use verdict::{Exchange, Failure};

/// Every synchronous function of this node.
#[derive(Default)]
pub struct Hooks {
    callers: Vec<Arc<Caller>>,
}

impl Hooks {
    /// The node's functions, validated. Before-publish functions are tried in this
    /// order; the first whose filter matches a channel is the one called.
    pub fn new(hooks: Vec<Hook>) -> Hooks {
        Hooks {
            callers: hooks.into_iter().map(Caller::new).map(Arc::new).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }

    /// The before-publish function of `channel` of `app`, if one matches.
    pub fn before_publish(&self, app: &str, channel: &str) -> Option<&Arc<Caller>> {
        self.callers
            .iter()
            .find(|caller| caller.hook.matches(app, channel))
    }

    /// The connect function of `app`, if it has one.
    pub fn on_connect(&self, app: &str) -> Option<&Arc<Caller>> {
        self.callers.iter().find(|caller| {
            caller.hook.config.kind == HookKind::Connect && caller.hook.config.app == app
        })
    }

    /// The longest any of these functions may take to answer (its `timeout_ms`): how
    /// long a publish can wait here before the hub, which a node forwarding a write to
    /// this one must allow for.
    pub fn longest_timeout(&self) -> Duration {
        self.callers
            .iter()
            .map(|c| Duration::from_millis(c.hook.config.timeout_ms))
            .max()
            .unwrap_or_default()
    }

    /// How many publishes of one connection of `app` may wait at once (the smallest
    /// `connection_pending_max` of its before-publish functions).
    pub fn connection_pending_max(&self, app: &str) -> usize {
        self.callers
            .iter()
            .filter(|c| c.hook.config.kind == HookKind::BeforePublish && c.hook.config.app == app)
            .map(|c| c.hook.config.connection_pending_max)
            .min()
            .unwrap_or(HookConfig::default_connection_pending_max())
    }
}

/// One function's HTTP side: at most `in_flight_max` calls at once (a call waits for a
/// slot within its timeout), on kept-alive connections.
pub struct Caller {
    pub hook: Hook,
    slots: Semaphore,
    /// Connections the function left open, for the next calls (at most one per slot).
    idle: Mutex<Vec<Sender>>,
}

impl Caller {
    fn new(hook: Hook) -> Caller {
        Caller {
            slots: Semaphore::new(hook.config.in_flight_max),
            idle: Mutex::new(Vec::new()),
            hook,
        }
    }

    /// Calls the function about a publish of `messages` on `channel`; resolves to the
    /// verdict, policy applied. The messages are serialized now, so the future owns
    /// what it needs.
    pub fn before_publish(
        self: &Arc<Self>,
        channel: &str,
        connection_id: Option<&str>,
        messages: &[tern_protocol::Message],
    ) -> impl std::future::Future<Output = PublishVerdict> + Send + 'static {
        let request = verdict::publish_request(&self.hook, channel, connection_id, messages);
        let sent = messages.len();
        let caller = self.clone();
        async move {
            let exchange = caller.call(&request).await;
            verdict::publish_verdict(&caller.hook, exchange, sent)
        }
    }

    /// Calls the connect function about `connecting`.
    pub async fn on_connect(&self, connecting: &Connecting) -> ConnectVerdict {
        let request = verdict::connect_request(&self.hook, connecting);
        let exchange = self.call(&request).await;
        verdict::connect_verdict(&self.hook, exchange)
    }

    /// One POST, bounded in time (slot wait included) and in what is read back.
    async fn call(&self, request: &Request) -> Exchange {
        let timeout = Duration::from_millis(self.hook.config.timeout_ms);
        let exchange = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| Failure::Unreachable("shutting down".into()))?;
            self.exchange(request).await.map_err(Failure::Unreachable)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Failure::TimedOut))
    }

    async fn exchange(&self, request: &Request) -> Result<(u16, Bytes), String> {
        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(mut sender) = kept {
            if sender.ready().await.is_ok() {
                if let Ok(answer) = self.send(sender, request).await {
                    return Ok(answer);
                }
                // Closed by the function as the request went out: once more on a new
                // connection (the function may see the request twice).
            }
        }
        let sender = connect(&self.hook.target).await?;
        self.send(sender, request).await
    }

    async fn send(&self, mut sender: Sender, request: &Request) -> Result<(u16, Bytes), String> {
        let answer = sender
            .send_request(outbound(&self.hook.target, request)?)
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status().as_u16();
        let body = Limited::new(answer.into_body(), self.hook.config.response_bytes_max)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.hook.config.in_flight_max {
                idle.push(sender);
            }
        }
        Ok((status, body))
    }
}
