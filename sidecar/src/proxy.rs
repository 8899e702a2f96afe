//! The inbound proxy: accept → (m)TLS by mode → HTTP/1.1 or HTTP/2 → the request pipeline
//! → the app on loopback → the response filter → record.
//!
//! Pipeline, one function per concern: [`authenticate`] → decide (engine: authorization,
//! declared API, quotas) → [`request_checks`] → forward → [`filter_response`] → [`record`].
//! Every request reads the config that is active when it arrives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apiward_policy::config::{MtlsMode, PortPolicy};
use apiward_policy::engine::{
    ApiKeyIdentity, Decision, Headers, Identity, JwtIdentity, NoTrace, Request as Facts,
};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Map, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::authn::AuthnError;
use crate::body::{HeldBody, LimitedBody, ProxyBody, full, json_depth, remove_pointer};
use crate::deadline::ConnState;
use crate::park::{Parking, Track, Tracked};
use crate::state::{Active, Shared};
use std::pin::Pin;

/// What is known about a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The verified mTLS peer identity.
    pub peer: Option<Arc<str>>,
    /// The caller's address.
    pub source: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Pooled clients to the app: HTTP/1.1, and HTTP/2 (prior knowledge) for gRPC.
#[derive(Clone, Debug)]
pub struct Upstream {
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
    authority: http::uri::Authority,
    /// One permit per HTTP/1.1 request in flight (and so per connection to the app).
    slots: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for a slot (`apiward_sidecar_upstream_waiting`).
    waiting: prometheus_client::metrics::gauge::Gauge,
}

impl Upstream {
    /// Clients with keep-alive pools; at most `max_http1` HTTP/1.1 requests (and so
    /// connections) to the app at once.
    pub fn new(
        addr: SocketAddr,
        idle: Duration,
        max_http1: usize,
        waiting: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.enforce_http(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(max_http1)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn);
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Self {
            http1,
            http2,
            authority,
            slots: Arc::new(tokio::sync::Semaphore::new(max_http1.max(1))),
            waiting,
        }
    }

    /// A slot for one HTTP/1.1 request, waiting (and counted as waiting) when all are taken.
    async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        self.waiting.inc();
        let p = self.slots.clone().acquire_owned().await.ok();
        self.waiting.dec();
        p
    }
}

/// Accepts inbound connections until the process ends.
pub async fn serve_inbound(listener: TcpListener, shared: Arc<Shared>, upstream: Upstream) {
    let max = shared
        .active
        .load()
        .as_ref()
        .map_or(20_000, |a| a.settings.limits.max_connections);
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    // Shared, not cloned: every open connection holds a pointer instead of 656 bytes.
    let upstream = Arc::new(upstream);
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the limit, a connection that has sent nothing yet makes room for this one;
        // with none, the new one waits (the accept loop with it) for a slot.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if shared.fresh.reclaim_oldest() {
                    shared.metrics.connections_reclaimed.inc();
                }
                match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let shared = shared.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let _permit = permit;
            shared.metrics.connections.inc();
            let conn = shared.fresh.register();
            let serve = handle_connection(tcp, source, &shared, upstream, &conn);
            tokio::pin!(serve);
            // Until its first request the connection may be reclaimed; after it, only the
            // connection itself is polled.
            tokio::select! {
                biased;
                _ = &mut serve => {}
                _ = conn.reclaim.notified() => {
                    if conn.requested() {
                        serve.await;
                    }
                }
            }
            shared.metrics.connections.dec();
        });
    }
}

async fn handle_connection(
    tcp: TcpStream,
    source: SocketAddr,
    shared: &Arc<Shared>,
    upstream: Arc<Upstream>,
    conn: &Arc<ConnState>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(active) = shared.active.load_full() else {
        return fail_conn(shared, "no_config"); // fail closed
    };
    // Redirected by iptables: the port the caller asked for. Connected directly: the app's.
    let port = crate::outbound::original_dst(&tcp)
        .ok()
        .filter(|d| tcp.local_addr().is_ok_and(|l| l != *d))
        .map_or(active.settings.inbound.port, |d| d.port());
    let mode = active
        .engine
        .as_ref()
        .map_or(MtlsMode::Strict, |e| e.mtls(port));
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(active.timeouts.handshake, tcp.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    let fail = |reason: &'static str| fail_conn(shared, reason);
    let is_tls = first[0] == 0x16;
    match (is_tls, mode, &active.tls) {
        (false, MtlsMode::Strict, _) => fail("plaintext_refused"),
        (true, MtlsMode::Disabled, _) | (true, _, None) => fail("tls_not_configured"),
        (true, _, Some(cfg)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            // A bounded number of handshakes at once: a burst of new connections waits in
            // the kernel's socket buffers instead of each holding handshake state here.
            let handshake = async {
                let _slot = shared.handshakes.acquire().await;
                acceptor.accept(tcp).await
            };
            // Boxed (like the HTTP state below): the connection task then holds only what the
            // current stage needs, not the largest of every stage's state machine.
            let stream =
                match tokio::time::timeout(active.timeouts.handshake, Box::pin(handshake)).await {
                    // Boxed too: the stream (1.2 KiB) then moves through the stages as a
                    // pointer; moved-from locals keep their space in a future's state.
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!(%source, error = %e, "TLS handshake failed");
                        return fail("handshake_failed");
                    }
                    Err(_) => return fail("handshake_timeout"),
                };
            let peer = match stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                Some(cert) => match crate::tls::spiffe_id(cert) {
                    Some(id) => Some(Arc::from(id)),
                    // A certificate the CA signed that is not one X.509-SVID (no URI SAN,
                    // several, or not SPIFFE): no identity is made up from it.
                    None => return fail("peer_identity_invalid"),
                },
                None => None,
            };
            let info = ConnInfo {
                peer,
                source,
                tls: true,
            };
            let proto = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Proto::Http2,
                Some(crate::tcp::ALPN) => {
                    return Box::pin(crate::tcp::serve_opaque(
                        stream, port, info, &active, shared,
                    ))
                    .await;
                }
                _ => Proto::Http1,
            };
            if port != active.settings.inbound.port {
                // HTTP is served for the app's port only; other ports are opaque TCP.
                return fail("port_not_served");
            }
            let first_request = tokio::time::Instant::now() + active.timeouts.first_request;
            drop(active);
            Box::pin(serve_http(
                stream,
                proto,
                info,
                shared,
                upstream,
                conn,
                first_request,
            ))
            .await;
        }
        (false, _, _) if port != active.settings.inbound.port => fail("port_not_served"),
        (false, _, _) => {
            // Plaintext: HTTP/1.1, or HTTP/2 with prior knowledge, told apart by the first
            // bytes, which must arrive within the first-request deadline.
            let first_request = tokio::time::Instant::now() + active.timeouts.first_request;
            drop(active);
            let info = ConnInfo {
                peer: None,
                source,
                tls: false,
            };
            let Some((detected, io)) = crate::deadline::detect(tcp, first_request).await else {
                return fail("first_request_timeout");
            };
            let proto = match detected {
                crate::deadline::Detected::Http1 => Proto::Http1,
                crate::deadline::Detected::Http2 => Proto::Http2,
            };
            Box::pin(serve_http(
                io,
                proto,
                info,
                shared,
                upstream,
                conn,
                first_request,
            ))
            .await;
        }
    }
}

/// A connection's HTTP version: by ALPN over TLS, by its first bytes in plaintext.
#[derive(Debug, Clone, Copy)]
enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

/// Serves HTTP on a connection. The common case, HTTP/1.1, runs inline; HTTP/2 is boxed
/// so that every HTTP/1.1 connection task stays small (its state machine is several
/// kilobytes larger). A first request head must arrive by `first_request`; an HTTP/2
/// connection without open streams for `limits.idleTimeout` is sent GOAWAY.
async fn serve_http<IO>(
    io: IO,
    proto: Proto,
    info: ConnInfo,
    shared: &Arc<Shared>,
    upstream: Arc<Upstream>,
    conn: &Arc<ConnState>,
    first_request: tokio::time::Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, park_after, idle, streams, max_header) =
        shared.active.load().as_ref().map_or(
            (
                Duration::from_secs(10),
                Duration::ZERO,
                Duration::from_secs(60),
                256,
                65536,
            ),
            |a| {
                (
                    a.timeouts.header_read,
                    a.timeouts.park_idle_after,
                    a.timeouts.idle,
                    a.settings.limits.max_concurrent_streams,
                    a.settings.limits.max_header_bytes,
                )
            },
        );
    let info = Arc::new(info);
    // HTTP/1.1 over TLS is served in generations that park while idle (see `park`).
    let track = matches!(proto, Proto::Http1).then(Track::new);
    let shared2 = shared.clone();
    let track2 = track.clone();
    let conn2 = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let guard = track2.as_ref().map(|t| t.begin(&req));
        let in_flight = conn2.begin();
        let (info, shared, upstream) = (info.clone(), shared2.clone(), upstream.clone());
        // Boxed: hyper keeps the service future inline in every connection's state, so an
        // idle keep-alive connection would carry the whole request pipeline's state machine.
        Box::pin(async move {
            let resp = handle(req, &info, &shared, &upstream).await;
            drop(in_flight);
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, guard)))
        })
    });
    // The same limits on hyper's builders and hyper-util's (their types differ).
    macro_rules! h2_limits {
        ($b:expr) => {
            $b.timer(TokioTimer::new())
                .max_concurrent_streams(streams)
                .max_header_list_size(max_header as u32)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                // Rapid-reset floods (CVE-2023-44487): cap resets the peer and we cause.
                .max_pending_accept_reset_streams(Some(20))
                .max_local_error_reset_streams(Some(1024))
        };
    }
    macro_rules! h1_limits {
        ($b:expr) => {
            $b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_header.max(8192))
        };
    }
    // Closing drains what the client still sends, so a refusal sent before its body was
    // read reaches it instead of a reset.
    let io = crate::linger::Lingering::new(io);
    let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match (proto, track) {
        (Proto::Http1, Some(track)) => {
            let mut b = hyper::server::conn::http1::Builder::new();
            h1_limits!(b);
            let parking = Parking {
                after: park_after,
                header_timeout,
                parked: shared.metrics.parked_connections.clone(),
            };
            let serve = crate::park::serve_http1(io, svc, track, &b, parking);
            match conn.first_request_by(first_request, serve).await {
                Some(r) => r.map_err(Into::into),
                None => {
                    fail_conn(shared, "first_request_timeout");
                    Ok(())
                }
            }
        }
        _ => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            h2_limits!(b);
            let c = Box::pin(b.serve_connection(TokioIo::new(io), svc));
            Box::pin(serve_h2_with_deadlines(
                c,
                conn,
                first_request,
                idle,
                shared,
            ))
            .await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Counts a connection closed before it served anything, by reason.
fn fail_conn(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .handshake_failures
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
}

/// Drives an HTTP/2 connection with its deadlines: closed if no request has arrived by
/// `first_request` (a caller that never sends the preface, SETTINGS or a HEADERS frame),
/// sent GOAWAY when no stream has been open for `idle` (open streams finish first), and
/// dropped if it still has not ended a while after that.
async fn serve_h2_with_deadlines<C>(
    mut c: Pin<Box<C>>,
    conn: &ConnState,
    first_request: tokio::time::Instant,
    idle: Duration,
    shared: &Shared,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulH2,
{
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut goaway_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = c.as_mut() => return r.map_err(Into::into),
            _ = tokio::time::sleep_until(first_request), if !conn.requested() => {
                if !conn.requested() {
                    fail_conn(shared, "first_request_timeout");
                    return Ok(());
                }
            }
            _ = ticker.tick() => {
                let now = tokio::time::Instant::now();
                match goaway_at {
                    None if conn.requested() && conn.idle_ms(now_ms()) >= idle.as_millis() as u64 => {
                        c.as_mut().graceful();
                        goaway_at = Some(now);
                    }
                    Some(at) if now.duration_since(at) > idle.max(Duration::from_secs(1)) => {
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// hyper's HTTP/2 server connection, whose graceful shutdown sends GOAWAY.
trait GracefulH2 {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulH2 for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

struct HeaderView<'a>(&'a HeaderMap);

impl Headers for HeaderView<'_> {
    fn get_one(&self, name: &str) -> Option<&str> {
        let mut it = self.0.get_all(name).iter();
        match (it.next(), it.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn request_id(headers: &HeaderMap, shared: &Shared) -> String {
    if let Some(id) = headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok())
        && !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return id.to_owned();
    }
    new_request_id(shared)
}

/// A request id made here: `<pid>-<counter>`, both hex.
pub(crate) fn new_request_id(shared: &Shared) -> String {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    // The process id once (glibc does not cache it: a syscall per request otherwise).
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!("{:x}-{n:x}", PID.get_or_init(std::process::id))
}

/// Who the caller is: the mTLS peer plus a verified JWT and/or API key.
#[derive(Debug, Default)]
pub struct Caller {
    /// Provider id and claims of a verified JWT.
    pub jwt: Option<(String, Arc<Map<String, Value>>)>,
    /// Provider id and client of a valid API key.
    pub api_key: Option<(String, String)>,
}

/// Authenticates the credentials the port accepts. A credential that is presented but
/// invalid is an error (401), never silently ignored.
pub async fn authenticate(
    active: &Active,
    port: &PortPolicy,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Caller, AuthnError> {
    let mut caller = Caller::default();
    let now = now_ms() / 1000;
    // JWT: the provider whose issuer matches the token.
    let mut token_seen = false;
    for id in &port.jwt_providers {
        let Some(v) = active.jwt.get(id) else {
            continue;
        };
        let mut values = headers.get_all(v.provider.token_header.as_str()).iter();
        let Some(raw) = values.next() else {
            continue;
        };
        if values.next().is_some() {
            return Err(AuthnError::Ambiguous);
        }
        let Ok(raw) = raw.to_str() else {
            return Err(AuthnError::Malformed);
        };
        let token = if v.provider.token_header == "authorization" {
            match raw.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
                _ => continue,
            }
        } else {
            raw.trim()
        };
        token_seen = true;
        // With several issuers on the port, the unverified `iss` picks the one to verify
        // with; with one, verification checks `iss` itself and the token is decoded once.
        if port.jwt_providers.len() > 1 {
            match crate::authn::unverified_issuer(token) {
                None => return Err(AuthnError::Malformed),
                Some(iss) if iss != v.provider.issuer => continue,
                Some(_) => {}
            }
        }
        let claims = v.verify(token, now).await?;
        caller.jwt = Some((id.clone(), claims));
        break;
    }
    if token_seen && caller.jwt.is_none() {
        return Err(AuthnError::UnknownIssuer);
    }
    // API keys.
    for id in &port.api_key_providers {
        let Some(set) = active.api_keys.get(id) else {
            continue;
        };
        let presented = match (&set.provider.header, &set.provider.query) {
            (Some(h), _) if headers.contains_key(h.as_str()) => {
                let mut values = headers.get_all(h.as_str()).iter();
                let first = values.next().and_then(|v| v.to_str().ok());
                if values.next().is_some() {
                    return Err(AuthnError::Ambiguous);
                }
                first.map(str::to_owned)
            }
            (_, Some(q)) => {
                let mut values = query
                    .into_iter()
                    .flat_map(|qs| qs.split('&'))
                    .filter_map(|kv| {
                        kv.strip_prefix(q.as_str())
                            .and_then(|r| r.strip_prefix('='))
                    });
                let first = values.next();
                if values.next().is_some() {
                    return Err(AuthnError::Ambiguous);
                }
                first.map(str::to_owned)
            }
            _ => None,
        };
        let Some(presented) = presented else { continue };
        match set.client_of(&presented) {
            Some(client) => {
                caller.api_key = Some((id.clone(), client.to_owned()));
                break;
            }
            None => return Err(AuthnError::InvalidApiKey),
        }
    }
    Ok(caller)
}

/// A refusal: status, a small JSON body with a reason code and the request id, and the
/// headers a client needs (`WWW-Authenticate`, `Retry-After`). No internal detail.
/// A response the sidecar made to refuse a request, with its reason code: the outcome is
/// recorded as a denial with that reason, whichever stage made it.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str);

pub fn refusal(status: StatusCode, code: &'static str, request_id: &str) -> Response<ProxyBody> {
    let message = match status.as_u16() {
        400 => "the request is malformed or ambiguous",
        401 => "authentication is required",
        403 => "the caller is not allowed to perform this request",
        404 => "no such endpoint",
        405 => "method not allowed",
        410 => "this endpoint has been retired",
        413 => "the request body is too large",
        415 => "unsupported content type",
        429 => "too many requests",
        431 => "request headers too large",
        502 => "the upstream response could not be processed",
        503 => "the service is not ready",
        504 => "the upstream did not answer in time",
        _ => "the request was refused",
    };
    let body = serde_json::json!({"error": {"code": code, "status": status.as_u16(), "message": message, "requestId": request_id}});
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.extensions_mut().insert(Refused(code));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(X_REQUEST_ID, v);
    }
    if status == StatusCode::UNAUTHORIZED {
        let v = if code.starts_with("token_") {
            format!("Bearer error=\"invalid_token\", error_description=\"{code}\"")
        } else if code.starts_with("api_key") {
            "ApiKey".to_string()
        } else {
            "Bearer".to_string()
        };
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("Bearer")),
        );
    }
    r
}

/// Header names the pipeline sets or reads, parsed once: inserting a custom name given as
/// a string allocates a copy of it on every request.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
const SUNSET: HeaderName = HeaderName::from_static("sunset");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Connection-specific headers (with `HTTP2-Settings`, RFC 9113 §3.2's h2c upgrade).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HTTP2_SETTINGS,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a lookup per name.
    let any = h
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || (!keep_upgrade && k == header::UPGRADE));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

impl Caller {
    /// The verified facts the engine decides on.
    pub(crate) fn identity<'a>(&'a self, info: &'a ConnInfo) -> Identity<'a> {
        Identity {
            peer: info.peer.as_deref(),
            jwt: self.jwt.as_ref().map(|(p, c)| JwtIdentity {
                provider: p,
                claims: c,
            }),
            api_key: self.api_key.as_ref().map(|(p, c)| ApiKeyIdentity {
                provider: p,
                client: c,
            }),
        }
    }
}

fn decision_label(d: &Decision<'_>) -> &'static str {
    match (d.allowed, d.would_deny) {
        (false, _) => "deny",
        (true, true) => "would_deny",
        (true, false) => "allow",
    }
}

/// One request through the whole pipeline.
pub async fn handle(
    req: Request<Incoming>,
    info: &ConnInfo,
    shared: &Arc<Shared>,
    upstream: &Upstream,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let rid = request_id(req.headers(), shared);
    let Some(active) = shared.active.load_full() else {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "no_config", &rid);
    };
    let Some(engine) = active.engine.as_ref() else {
        record_simple(shared, "deny", "no_config", 503);
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "no_config", &rid);
    };
    let port_no = active.settings.inbound.port;
    let port = engine.port(port_no);
    // A reload may have made this connection's kind unacceptable.
    let mode = engine.mtls(port_no);
    if (mode == MtlsMode::Strict && info.peer.is_none()) || (mode == MtlsMode::Disabled && info.tls)
    {
        let mut r = refusal(StatusCode::FORBIDDEN, "mtls_required", &rid);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        record_simple(shared, "deny", "mtls_required", 403);
        return r;
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let max_header = port
        .and_then(|p| p.limits.max_header_bytes)
        .map_or(active.settings.limits.max_header_bytes, |m| m as usize);
    if header_bytes > max_header {
        record_simple(shared, "deny", "headers_too_large", 431);
        return refusal(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            &rid,
        );
    }

    // 1. authenticate
    let query = req.uri().query().map(str::to_owned);
    let audit_port = port.is_some_and(|p| p.mode == apiward_policy::config::Mode::Audit);
    let mut authn_would_deny = None;
    let caller = match port {
        Some(p) => match authenticate(&active, p, req.headers(), query.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                shared
                    .metrics
                    .authn_failures
                    .get_or_create(&crate::metrics::ReasonLabels { reason: e.code() })
                    .inc();
                // An ambiguous request is refused in Audit mode too: the app would pick
                // one of the credentials itself.
                if audit_port && e != AuthnError::Ambiguous {
                    authn_would_deny = Some(e.code());
                    Caller::default()
                } else {
                    log_decision(
                        shared,
                        &active,
                        &rid,
                        req.method().as_str(),
                        req.uri().path(),
                        info,
                        None,
                        "deny",
                        e.code(),
                        e.status(),
                        start,
                    );
                    record_simple(shared, "deny", e.code(), e.status());
                    let status =
                        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
                    return refusal(status, e.code(), &rid);
                }
            }
        },
        None => Caller::default(),
    };

    // 2. decide (authorization, declared API, quotas)
    let decided_at = Instant::now();
    let mut decision = {
        let headers_view = HeaderView(req.headers());
        let facts = Facts {
            port: port_no,
            method: req.method().as_str(),
            path: req.uri().path(),
            query: query.as_deref(),
            headers: &headers_view,
            identity: caller.identity(info),
            source_ip: info.source.ip().to_canonical(),
            now_ms: now_ms(),
        };
        engine.decide(&facts, &active.quotas(shared), &mut NoTrace)
    };
    active.settle_quotas(shared, engine, &mut decision).await;
    shared
        .metrics
        .decision_duration
        .observe(decided_at.elapsed().as_secs_f64());
    if authn_would_deny.is_some() {
        decision.would_deny = true;
    }
    if !decision.allowed {
        let status = StatusCode::from_u16(decision.status).unwrap_or(StatusCode::FORBIDDEN);
        let mut r = refusal(status, decision.reason.code(), &rid);
        rate_limit_headers(r.headers_mut(), &decision);
        log_decision(
            shared,
            &active,
            &rid,
            req.method().as_str(),
            req.uri().path(),
            info,
            Some(&decision),
            "deny",
            decision.reason.code(),
            status.as_u16(),
            start,
        );
        record(shared, &decision, status.as_u16());
        let (method, path) = (req.method().as_str(), req.uri().path());
        if active.settings.record_inventory {
            see(
                shared,
                port_no,
                method,
                path,
                &decision,
                status.as_u16(),
                &caller,
                info,
                start,
            );
        }
        return r;
    }
    if decision.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(decision.delay_ms)).await;
    }

    // 3. request checks
    let no_limits = apiward_policy::config::RequestLimits::default();
    let limits = port.map_or(&no_limits, |p| &p.limits);
    if let Err((status, code)) = request_checks(&req, limits) {
        let mut d = decision.clone();
        d.allowed = false;
        log_decision(
            shared,
            &active,
            &rid,
            req.method().as_str(),
            req.uri().path(),
            info,
            Some(&d),
            "deny",
            code,
            status.as_u16(),
            start,
        );
        record_simple(shared, "deny", code, status.as_u16());
        return refusal(status, code, &rid);
    }

    // 4. forward
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = forward(
        req, info, &active, port, &caller, &decision, &rid, upstream, limits, shared,
    )
    .await;
    let status = resp.status().as_u16();
    // Refused while forwarding (body limits, JSON depth, the upstream, the response
    // filter): recorded as a denial with that stage's reason, not as allowed.
    let refused_here = resp.extensions().get::<Refused>().map(|r| r.0);
    if refused_here.is_some() {
        decision.allowed = false;
    }
    let label = decision_label(&decision);
    let reason = refused_here.unwrap_or(authn_would_deny.unwrap_or(decision.reason.code()));
    record_status_rule(shared, label, reason, status, &decision);
    if active.settings.record_inventory {
        see(
            shared,
            port_no,
            method.as_str(),
            &path,
            &decision,
            status,
            &caller,
            info,
            start,
        );
    }
    log_decision(
        shared,
        &active,
        &rid,
        method.as_str(),
        &path,
        info,
        Some(&decision),
        label,
        reason,
        status,
        start,
    );
    shared
        .metrics
        .request_duration
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Content type, declared body size and JSON depth (when the body is JSON and a depth limit
/// is set, the body is read up to the size limit to check it).
fn request_checks(
    req: &Request<Incoming>,
    limits: &apiward_policy::config::RequestLimits,
) -> Result<(), (StatusCode, &'static str)> {
    // HTTP/2 carries a body without `content-length` or `transfer-encoding`: a request has
    // one unless its headers ended the stream (the same test holds for HTTP/1.1).
    let has_body = !http_body::Body::is_end_stream(req.body())
        || req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "0");
    if let Some(max) = limits.max_body_bytes {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
        }
    }
    if has_body && !limits.content_types.is_empty() {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let ok = limits.content_types.iter().any(|allowed| {
            allowed == &ct
                || allowed
                    .strip_suffix("/*")
                    .is_some_and(|prefix| ct.split('/').next() == Some(prefix))
        });
        if !ok {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
            ));
        }
    }
    Ok(())
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    req: Request<Incoming>,
    info: &ConnInfo,
    active: &Active,
    port: Option<&PortPolicy>,
    caller: &Caller,
    decision: &Decision<'_>,
    rid: &str,
    upstream: &Upstream,
    limits: &apiward_policy::config::RequestLimits,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let grpc = parts.version == Version::HTTP_2
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    // Only a WebSocket handshake (RFC 6455) is tunnelled once the app answers 101; any other
    // `Upgrade` (h2c, TLS, unknown protocols) is removed and the request served as HTTP/1.1,
    // so no later request on the connection can pass unchecked.
    let upgrade = parts.version == Version::HTTP_11 && is_websocket_handshake(&parts);
    let client_upgrade = if upgrade {
        Some(hyper::upgrade::on(parts_to_request(&mut parts)))
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if grpc {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Identity headers: remove every incoming copy, then set what was verified.
    parts.headers.remove(&active.identity_header);
    strip_underscore_spellings(&mut parts.headers, active, port);
    let mut forwarded: Vec<(HeaderName, String)> = Vec::new();
    for id in port.map(|p| p.jwt_providers.as_slice()).unwrap_or_default() {
        if let Some(v) = active.jwt.get(id) {
            for (claim, h) in &v.provider.forward_claims {
                // A name that does not parse cannot be in the request either.
                let Ok(n) = HeaderName::from_bytes(h.as_bytes()) else {
                    continue;
                };
                parts.headers.remove(&n);
                if let Some((pid, claims)) = &caller.jwt
                    && pid == id
                    && let Some(val) = apiward_policy::engine::claim_str(claims.get(claim))
                {
                    forwarded.push((n, val.into_owned()));
                }
            }
        }
    }
    if let Some(p) = apiward_policy::engine::principal_of(&caller.identity(info)) {
        forwarded.push((active.identity_header.clone(), p));
    }
    for (n, v) in forwarded {
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    let source = info.source.ip().to_canonical().to_string();
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {source}"),
        None => source,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(upstream.authority.clone());
    // The app gets the path the decision was made on, not the raw one.
    uri.path_and_query = Some(
        if decision.path.is_empty() || decision.path == parts.uri.path() {
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
        } else {
            let pq = match parts.uri.query() {
                Some(q) => format!("{}?{q}", decision.path),
                None => decision.path.clone(),
            };
            match http::uri::PathAndQuery::try_from(pq) {
                Ok(pq) => pq,
                Err(_) => return refusal(StatusCode::BAD_REQUEST, "invalid_path", rid),
            }
        },
    );
    parts.uri = match http::Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return refusal(StatusCode::BAD_REQUEST, "invalid_path", rid),
    };
    if let Some(a) = authority
        && let Ok(v) = HeaderValue::from_str(&a)
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.version = if grpc {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    // Body: size-limited while streaming; buffered only to check JSON depth.
    let tripped = Arc::new(AtomicBool::new(false));
    let max_body = limits.max_body_bytes.unwrap_or(u64::MAX);
    let body: ProxyBody =
        if let (Some(depth), true) = (limits.max_json_depth, is_json(&parts.headers)) {
            // A body check must read the body: a compressed one cannot be read here, and
            // passing it unread would skip the check.
            if parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                return refusal(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "compressed_body_unsupported",
                    rid,
                );
            }
            let cap = max_body.min(active.settings.limits.max_filtered_response_bytes as u64);
            match LimitedBody::new(body, cap, tripped.clone()).collect().await {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    if json_depth(&bytes) > depth as usize {
                        return refusal(StatusCode::BAD_REQUEST, "json_too_deep", rid);
                    }
                    full(bytes)
                }
                Err(_) if tripped.load(Ordering::Acquire) => {
                    return refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", rid);
                }
                Err(_) => return refusal(StatusCode::BAD_REQUEST, "body_read_failed", rid),
            }
        } else {
            LimitedBody::new(body, max_body, tripped.clone()).boxed()
        };
    let out = Request::from_parts(parts, body);
    let client = if grpc {
        &upstream.http2
    } else {
        &upstream.http1
    };
    let call = async {
        // HTTP/2 multiplexes one connection; HTTP/1.1 takes a slot until its response ends.
        let slot = if grpc { None } else { upstream.slot().await };
        (client.request(out).await, slot)
    };
    let (result, slot) = match limits.timeout_ms {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), call).await {
            Ok(r) => r,
            Err(_) => return refusal(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", rid),
        },
        None => call.await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if tripped.load(Ordering::Acquire) {
                let mut r = refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", rid);
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            tracing::warn!(request_id = rid, error = %e, "upstream request failed");
            return refusal(StatusCode::BAD_GATEWAY, "upstream_unavailable", rid);
        }
    };
    if tripped.load(Ordering::Acquire) {
        // The app answered before the body was cut off; the client still sees 413.
        let mut r = refusal(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", rid);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let to_websocket = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
        if client_upgrade.is_none() || !to_websocket {
            // A switch nobody asked for (or to another protocol): nothing is tunnelled.
            tracing::warn!(
                request_id = rid,
                "the app switched protocols unasked; refused"
            );
            let mut r = refusal(StatusCode::BAD_GATEWAY, "upstream_protocol_switch", rid);
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        if let Some(client_up) = client_upgrade {
            let upstream_up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_up.await, upstream_up.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
        let (mut rp, _) = resp.into_parts();
        rp.headers.remove(header::SERVER);
        return Response::from_parts(rp, full(Bytes::new()));
    }
    filter_response(resp, slot, port, decision, rid, active, shared).await
}

/// An RFC 6455 opening handshake: `GET`, `Upgrade: websocket` (the only protocol),
/// `Connection: upgrade`, version 13 and a 16-byte base64 key.
fn is_websocket_handshake(parts: &http::request::Parts) -> bool {
    let h = &parts.headers;
    let one = |name: &HeaderName| {
        let mut it = h.get_all(name).iter();
        match (it.next(), it.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    };
    parts.method == http::Method::GET
        && one(&header::UPGRADE).is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && one(&header::SEC_WEBSOCKET_VERSION) == Some("13")
        && one(&header::SEC_WEBSOCKET_KEY).is_some_and(|k| {
            k.len() == 24
                && k.ends_with("==")
                && k.bytes()
                    .take(22)
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        })
}

/// Removes incoming headers that spell a header the sidecar sets (or refuses) with
/// underscores: CGI, WSGI and Rack turn `x_user_id` into the same variable as
/// `x-user-id`, so the app would read the caller's value as a verified one.
fn strip_underscore_spellings(h: &mut HeaderMap, active: &Active, port: Option<&PortPolicy>) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let claim_headers = port
        .map(|p| p.jwt_providers.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|id| active.jwt.get(id))
        .flat_map(|v| v.provider.forward_claims.values());
    let mut protected: Vec<&str> = vec![
        active.identity_header.as_str(),
        "x-forwarded-for",
        "x-request-id",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    protected.extend(apiward_policy::engine::PATH_OVERRIDE_HEADERS);
    protected.extend(claim_headers.map(String::as_str));
    let doomed: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.contains('_')
                && protected.iter().any(|p| {
                    p.len() == k.len()
                        && p.bytes()
                            .zip(k.bytes())
                            .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
                })
        })
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// Builds a throwaway request around the parts so hyper can register the upgrade
/// (hyper keeps the pending upgrade in the request's extensions).
fn parts_to_request(parts: &mut http::request::Parts) -> Request<()> {
    let mut r = Request::new(());
    *r.extensions_mut() = std::mem::take(&mut parts.extensions);
    r
}

/// Response filter: removes headers, masks upstream 5xx bodies, removes JSON fields,
/// and adds deprecation and rate-limit headers.
async fn filter_response(
    resp: Response<Incoming>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    port: Option<&PortPolicy>,
    decision: &Decision<'_>,
    rid: &str,
    active: &Active,
    _shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(header::SERVER);
    parts.headers.remove(X_POWERED_BY);
    for h in port
        .map(|p| p.response.remove_headers.as_slice())
        .unwrap_or_default()
    {
        parts.headers.remove(h.as_str());
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    if decision.deprecated {
        parts
            .headers
            .insert(DEPRECATION, HeaderValue::from_static("true"));
        if let Some(s) = decision.sunset_unix
            && let Ok(v) = HeaderValue::from_str(&http_date(s))
        {
            parts.headers.insert(SUNSET, v);
        }
    }
    rate_limit_headers(&mut parts.headers, decision);
    let response = port.map(|p| &p.response);
    if parts.status.is_server_error() && response.is_none_or(|r| r.mask_server_errors) {
        let problem = serde_json::json!({
            "type": "about:blank",
            "title": "upstream error",
            "status": parts.status.as_u16(),
            "requestId": rid,
        });
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, full(problem.to_string()));
    }
    let fields = response
        .map(|r| r.remove_fields.as_slice())
        .unwrap_or_default();
    if fields.is_empty() || !has_body(&parts) {
        return Response::from_parts(parts, HeldBody::new(body, slot).boxed());
    }
    let refuse_unreadable = response
        .is_some_and(|r| r.on_unfilterable == apiward_policy::config::OnUnfilterable::Refuse);
    let unreadable = |parts: http::response::Parts, body: ProxyBody| {
        if refuse_unreadable {
            refusal(StatusCode::BAD_GATEWAY, "response_not_filterable", rid)
        } else {
            Response::from_parts(parts, body)
        }
    };
    let cap = active.settings.limits.max_filtered_response_bytes;
    // JSON is filtered; text and untyped bodies too when they parse as JSON (the same record
    // as `text/plain` must not slip through); anything else, or anything compressed, is
    // unreadable. Only what may be JSON is buffered (up to the cap).
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let json = is_json(&parts.headers);
    if encoded || !(json || may_be_json(&parts.headers)) || declared_len.is_some_and(|n| n > cap) {
        return unreadable(parts, HeldBody::new(body, slot).boxed());
    }
    let bytes = match http_body_util::Limited::new(body, cap).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return refusal(StatusCode::BAD_GATEWAY, "response_not_filterable", rid),
    };
    drop(slot);
    if bytes.is_empty() {
        // Nothing to filter (a HEAD response, an empty body).
        return Response::from_parts(parts, full(bytes));
    }
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) => {
            for f in fields {
                remove_pointer(&mut v, f);
            }
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        Err(_) if json => return refusal(StatusCode::BAD_GATEWAY, "response_not_filterable", rid),
        Err(_) => return unreadable(parts, full(bytes)),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, full(out))
}

/// Whether a response has a body at all (`204`, `304` and `Content-Length: 0` do not).
fn has_body(parts: &http::response::Parts) -> bool {
    !matches!(parts.status.as_u16(), 204 | 304)
        && parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() != b"0")
}

/// Text or no content type at all: a body that may still be JSON.
fn may_be_json(h: &HeaderMap) -> bool {
    match h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(ct) => ct.trim_start().to_ascii_lowercase().starts_with("text/"),
    }
}

/// RFC 9110 IMF-fixdate.
fn http_date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = apiward_policy::time::civil_from_days(days);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `RateLimit-Policy`, `RateLimit` (IETF draft) and the legacy `X-RateLimit-*`, plus
/// `Retry-After` on refusals.
fn rate_limit_headers(h: &mut HeaderMap, d: &Decision<'_>) {
    let Some(q) = &d.quota else { return };
    let v = &q.verdict;
    let reset = v.reset_ms.div_ceil(1000);
    let name = &q.quota.name;
    let mut set = |n: HeaderName, value: Option<HeaderValue>| {
        if let Some(val) = value {
            h.insert(n, val);
        }
    };
    set(
        RATELIMIT_POLICY,
        formatted(format_args!(
            "\"{name}\";q={};w={}",
            v.limit, q.window_seconds
        )),
    );
    set(
        RATELIMIT,
        formatted(format_args!("\"{name}\";r={};t={reset}", v.remaining)),
    );
    set(X_RATELIMIT_LIMIT, Some(HeaderValue::from(v.limit)));
    set(X_RATELIMIT_REMAINING, Some(HeaderValue::from(v.remaining)));
    set(X_RATELIMIT_RESET, Some(HeaderValue::from(reset)));
    if !v.allowed {
        set(
            header::RETRY_AFTER,
            Some(HeaderValue::from(v.retry_after_ms.div_ceil(1000).max(1))),
        );
    }
}

/// A header value formatted on the stack (a heap string only when it is long).
fn formatted(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    let mut buf = [0u8; 160];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    match std::io::Write::write_fmt(&mut cur, args) {
        Ok(()) => {
            let n = cur.position() as usize;
            HeaderValue::from_bytes(&buf[..n]).ok()
        }
        Err(_) => HeaderValue::from_str(&args.to_string()).ok(),
    }
}

/// Counts the request in the inventory (see [`crate::inventory`]); callers check
/// `recordInventory`.
#[allow(clippy::too_many_arguments)]
fn see(
    shared: &Shared,
    port: u16,
    method: &str,
    path: &str,
    d: &Decision<'_>,
    status: u16,
    caller: &Caller,
    info: &ConnInfo,
    start: Instant,
) {
    use apiward_policy::report::AuthKind;
    let id = caller.identity(info);
    let auth = if id.api_key.is_some() {
        AuthKind::ApiKey
    } else if id.jwt.is_some() {
        AuthKind::Jwt
    } else if id.peer.is_some() {
        AuthKind::Mtls
    } else {
        AuthKind::None
    };
    let principal = apiward_policy::engine::principal_of(&id);
    shared.inventory.record(&crate::inventory::Seen {
        port,
        method,
        path,
        declared: d.template.filter(|_| d.declared),
        status,
        auth,
        principal: principal.as_deref(),
        denied: !d.allowed,
        would_deny: d.would_deny,
        latency_micros: start.elapsed().as_micros() as u64,
        now: (now_ms() / 1000) as i64,
    });
}

fn record(shared: &Shared, d: &Decision<'_>, status: u16) {
    record_status_rule(shared, decision_label(d), d.reason.code(), status, d);
}

fn record_status_rule(
    shared: &Shared,
    decision: &'static str,
    reason: &'static str,
    status: u16,
    d: &Decision<'_>,
) {
    let (policy, rule) = d.rule.map_or((String::new(), String::new()), |r| {
        (r.policy.to_owned(), r.name.to_owned())
    });
    shared
        .metrics
        .requests
        .get_or_create(&crate::metrics::RequestLabels {
            decision,
            reason,
            policy,
            rule,
            status,
        })
        .inc();
}

pub(crate) fn record_simple(
    shared: &Shared,
    decision: &'static str,
    reason: &'static str,
    status: u16,
) {
    shared
        .metrics
        .requests
        .get_or_create(&crate::metrics::RequestLabels {
            decision,
            reason,
            policy: String::new(),
            rule: String::new(),
            status,
        })
        .inc();
}

/// One JSON decision-log line per denied request (allowed ones sampled). Never logs
/// tokens, keys, header values or query strings.
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_decision(
    shared: &Shared,
    active: &Active,
    rid: &str,
    method: &str,
    path: &str,
    info: &ConnInfo,
    d: Option<&Decision<'_>>,
    decision: &str,
    reason: &str,
    status: u16,
    start: Instant,
) {
    if decision == "allow" {
        let f = active.settings.log_allowed_fraction;
        let n = shared.counter.load(Ordering::Relaxed);
        if f <= 0.0 || !n.is_multiple_of((1.0 / f).round().max(1.0) as u64) {
            return;
        }
    }
    tracing::info!(
        target: "apiward::decision",
        request_id = rid,
        method,
        path,
        template = d.and_then(|d| d.template).unwrap_or(""),
        decision,
        reason,
        status,
        policy = d.and_then(|d| d.rule).map_or("", |r| r.policy),
        rule = d.and_then(|d| d.rule).map_or("", |r| r.name),
        detail = d.and_then(|d| d.detail.as_deref()).unwrap_or(""),
        peer = info.peer.as_deref().unwrap_or(""),
        source_ip = %info.source.ip(),
        latency_us = start.elapsed().as_micros() as u64,
        config_version = active.version(),
    );
}
