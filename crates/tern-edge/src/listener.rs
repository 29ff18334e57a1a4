//! The client port: accepts TCP connections and serves HTTP/1.1 on them (REST, and the
//! WebSocket handshake that takes a connection out of HTTP).
//!
//! Threat model: anyone who reaches the port can open connections and send bytes as
//! slowly as they like, or not at all. A WebSocket connection is bounded by
//! `connections_max` and by its writer's `write_timeout_ms` (`connection`); what comes
//! before the upgrade is bounded here:
//! - a request head must arrive within `header_read_timeout_ms` of the connection's
//!   start or of its previous request's end (hyper's header timer), so neither a silent
//!   connection nor one trickling its headers (slowloris) is held longer;
//! - a request head is at most `request_head_bytes_max` (hyper's read buffer; larger →
//!   431), so a partial head costs at most that;
//! - at most `http_connections_max` connections are not WebSocket connections at once
//!   (handshakes in progress and REST clients, whose requests take their slot until the
//!   connection closes or upgrades);
//! - at most `connections_per_ip_max` connections of either kind per source address.
//!
//! With `[server.tls]` the TLS handshake comes first, under the same header timer: a
//! connection that does not finish its handshake and deliver a request head within
//! `header_read_timeout_ms` is closed (`crate::tls`).
//!
//! A connection over a cap is answered 503 with an Ably error body, written without
//! reading its request, and closed. Refusals, and header timeouts of connections that
//! never delivered a request, are counted in `tern_connections_refused_total{reason}`.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tern_protocol::{code, ErrorInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::EdgeConfig;
use crate::state::EdgeState;

/// hyper panics on a smaller read buffer.
const REQUEST_HEAD_BYTES_MIN: usize = 8_192;
/// How long accepting pauses after it failed for lack of resources (no file descriptor
/// left): retrying at once would spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Serves the edge's router on `listener` until the node shuts down (`state.shutdown`),
/// then waits for the HTTP requests in flight; WebSocket connections end themselves.
pub async fn serve(listener: TcpListener, state: Arc<EdgeState>) {
    let gate = Gate::new(&state.config);
    let http = Arc::new(http_builder(&state.config));
    let app = crate::router(state.clone());
    let mut shutdown = state.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            // Cancel-safe: a connection is either returned or left in the kernel's queue.
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
            () = shutting_down(&mut shutdown) => break,
        };
        state.arrived();
        match gate.admit(peer.ip()) {
            Ok(admitted) => {
                let connection = Connection {
                    http: http.clone(),
                    app: app.clone(),
                    shutdown: state.shutdown.clone(),
                    tls: state.tls.as_ref().map(|tls| tls.acceptor()),
                    handshake_timeout: Duration::from_millis(state.config.header_read_timeout_ms),
                };
                tokio::spawn(connection.serve(tcp, peer, admitted));
            }
            Err(refusal) => refusal.answer(&tcp),
        }
    }
    gate.drained().await;
}

/// Resolves once the node shuts down (or whoever could shut it down is gone).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

fn http_builder(config: &EdgeConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_buf_size(config.request_head_bytes_max.max(REQUEST_HEAD_BYTES_MIN));
    builder
}

/// A failed `accept`: a connection reset before we took it is its client's business;
/// anything else (out of file descriptors, memory) is ours, so wait before retrying.
async fn accept_failed(err: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%err, "accepting a connection failed; pausing");
    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
}

/// Why a connection was turned away or cut off: the `reason` label of
/// `tern_connections_refused_total`, named after the setting that did it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Its address already has `connections_per_ip_max` connections.
    PerIp,
    /// `http_connections_max` connections are not WebSocket connections yet.
    HttpConnections,
    /// It sent no complete request head within `header_read_timeout_ms` of opening.
    HeaderTimeout,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::PerIp => "connections_per_ip_max",
            Refusal::HttpConnections => "http_connections_max",
            Refusal::HeaderTimeout => "header_read_timeout",
        }
    }

    fn count(self) {
        metrics::counter!("tern_connections_refused_total", "reason" => self.reason()).increment(1);
    }

    /// Counts the refusal and answers 503 with an Ably error body, then the caller drops
    /// (closes) the socket. One non-blocking write into a new socket's empty send
    /// buffer: it fits, and a refused client costs nothing more, not even reading its
    /// request. A client whose request was already in flight may see a reset instead.
    fn answer(self, tcp: &TcpStream) {
        self.count();
        let message = match self {
            Refusal::PerIp => "too many connections from this address",
            _ => "too many connections waiting on this node",
        };
        let error = ErrorInfo::with_status(code::RATE_LIMIT, 503, message);
        let body = serde_json::json!({ "error": error }).to_string();
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nx-ably-errorcode: {}\r\nx-ably-errormessage: {message}\r\n\
             access-control-allow-origin: *\r\nconnection: close\r\n\r\n{body}",
            body.len(),
            error.code,
        );
        let _ = tcp.try_write(response.as_bytes());
    }
}

/// The caps a new connection must fit under before it is served.
struct Gate {
    /// One permit per connection not (yet) upgraded to WebSocket.
    http: Arc<Semaphore>,
    http_max: u32,
    /// 0: no per-address cap (and no counting).
    per_ip_max: usize,
    /// Open connections per source address; an address leaves the map with its last one.
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// What an admitted connection holds: its HTTP slot until it closes or upgrades, its
/// address's slot until the socket closes.
struct Admitted {
    http: OwnedSemaphorePermit,
    address: Option<AddressSlot>,
}

impl Gate {
    fn new(config: &EdgeConfig) -> Gate {
        let http_max = config.http_connections_max.clamp(1, u32::MAX as usize) as u32;
        Gate {
            http: Arc::new(Semaphore::new(http_max as usize)),
            http_max,
            per_ip_max: config.connections_per_ip_max,
            per_ip: Arc::default(),
        }
    }

    /// The address cap is checked first, so one address's flood is counted as such and
    /// takes no HTTP slot.
    fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let address = self.claim_address(ip)?;
        let http = self
            .http
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::HttpConnections)?;
        Ok(Admitted { http, address })
    }

    fn claim_address(&self, ip: IpAddr) -> Result<Option<AddressSlot>, Refusal> {
        if self.per_ip_max == 0 {
            return Ok(None);
        }
        // An IPv4 client of a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let mut counts = lock(&self.per_ip);
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.per_ip_max {
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(Some(AddressSlot {
            ip,
            counts: self.per_ip.clone(),
        }))
    }

    /// Waits until every HTTP connection has closed or upgraded.
    async fn drained(&self) {
        let _ = self.http.acquire_many(self.http_max).await;
    }
}

fn lock(counts: &Mutex<HashMap<IpAddr, usize>>) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
    counts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One connection's share of its address's count, given back when dropped.
struct AddressSlot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What serving one connection needs from the listener.
struct Connection {
    http: Arc<http1::Builder>,
    app: Router,
    shutdown: watch::Receiver<bool>,
    /// The acceptor current when the connection arrived (a reload changes later ones).
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
}

impl Connection {
    /// Serves HTTP until the connection closes or upgrades to a WebSocket (which then
    /// owns the socket, and `connections_max` counts it).
    async fn serve(mut self, tcp: TcpStream, peer: std::net::SocketAddr, admitted: Admitted) {
        let Admitted { http, address } = admitted;
        // Without TCP_NODELAY, Nagle holds small frames behind the peer's delayed ACK:
        // a 20-40 ms floor on delivery latency (docs/benchmarks.md).
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            None => Io::Plain(tcp),
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Io::Tls(Box::new(tls)),
                    Ok(Err(err)) => {
                        metrics::counter!("tern_tls_handshake_failures_total").increment(1);
                        tracing::debug!(%err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        Refusal::HeaderTimeout.count();
                        return;
                    }
                }
            }
        };
        let reset = ResetOnClose::default();
        let io = TokioIo::new(ClientStream {
            io,
            reset: reset.clone(),
            _address: address,
        });
        let requested = Arc::new(AtomicBool::new(false));
        let service = ConnectionService {
            inner: TowerToHyperService::new(self.app),
            peer: crate::hooks::Peer(peer),
            reset,
            requested: requested.clone(),
        };
        let conn = self.http.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            // The node shuts down: finish the request in flight, then close.
            () = shutting_down(&mut self.shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        drop(http);
        // A keep-alive connection timing out between requests is normal; one that never
        // delivered a request head is what a silent or slowloris client looks like.
        if result.is_err_and(|err| err.is_timeout()) && !requested.load(Ordering::Relaxed) {
            Refusal::HeaderTimeout.count();
        }
    }
}

/// Set by a WebSocket's writer when it gives up on a client that does not read
/// (`connection`): the socket is then closed with a reset (SO_LINGER 0) instead of a
/// FIN queued behind megabytes the client will never read, so the kernel frees it and
/// its send queue at once rather than keeping an orphan that probes a zero window.
#[derive(Clone, Debug, Default)]
pub(crate) struct ResetOnClose(Arc<AtomicBool>);

impl ResetOnClose {
    pub(crate) fn arm(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn armed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The router as one connection's service: notes that the connection delivered a
/// request, and hands a WebSocket handshake the connection's [`ResetOnClose`] (a
/// request extension), so the WebSocket's writer can reach the socket it cannot see.
struct ConnectionService<S> {
    inner: S,
    /// The client's address, handed to every request (the `$connect` function is told).
    peer: crate::hooks::Peer,
    reset: ResetOnClose,
    requested: Arc<AtomicBool>,
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnectionService<S>
where
    S: hyper::service::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.requested.store(true, Ordering::Relaxed);
        request.extensions_mut().insert(self.peer);
        if request.headers().contains_key(header::UPGRADE) {
            request.extensions_mut().insert(self.reset.clone());
        }
        self.inner.call(request)
    }
}

/// A client's socket. It holds its address's slot for as long as it is open, through
/// an upgrade too: hyper hands this same value to the WebSocket.
struct ClientStream {
    io: Io,
    reset: ResetOnClose,
    _address: Option<AddressSlot>,
}

/// The socket, plain or inside TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Forwards a poll to the plain or TLS stream.
macro_rules! io_call {
    ($self:expr, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $call
            }
        }
    };
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.reset.armed() {
            let _ = self.io.tcp().set_zero_linger();
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_of(http_max: usize, per_ip_max: usize) -> Gate {
        Gate::new(&EdgeConfig {
            http_connections_max: http_max,
            connections_per_ip_max: per_ip_max,
            ..EdgeConfig::default()
        })
    }

    /// The address cap counts per address, frees a slot when its connection goes, and
    /// forgets an address with its last connection.
    #[test]
    fn address_slots_are_counted_and_given_back() {
        let gate = gate_of(100, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerIp));
        let other = gate.admit(b).unwrap();
        drop(first);
        let _again = gate.admit(a).unwrap();
        // The same client over IPv4-mapped IPv6 is the same address.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(gate.admit(mapped).err(), Some(Refusal::PerIp));
        drop(other);
        assert!(!lock(&gate.per_ip).contains_key(&b));
    }

    /// The HTTP cap refuses past its size, a refused connection keeps no address slot,
    /// and 0 means no address cap at all.
    #[test]
    fn http_slots_are_capped_without_leaking_address_slots() {
        let gate = gate_of(1, 5);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held = gate.admit(ip).unwrap();
        assert_eq!(gate.admit(ip).err(), Some(Refusal::HttpConnections));
        assert_eq!(lock(&gate.per_ip).get(&ip), Some(&1));
        drop(held);
        assert!(lock(&gate.per_ip).is_empty());
        let unlimited = gate_of(100, 0);
        let kept: Vec<_> = (0..50).map(|_| unlimited.admit(ip).unwrap()).collect();
        assert_eq!(kept.len(), 50);
        assert!(lock(&unlimited.per_ip).is_empty());
    }
}
