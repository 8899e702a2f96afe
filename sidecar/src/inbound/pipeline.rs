//! One request through the pipeline: named stages over one [`RequestCtx`], and one place
//! that records the outcome.
//!
//! ```text
//! admit → authenticate → authorize → checks → body → forward → response
//!                                                                  │
//!        any stage: Err(Refusal) ─────────────────────────────→ record (once)
//! ```
//!
//! Each stage is `async fn(&mut RequestCtx, …) -> Result<_, Refusal>` in its own module.
//! Adding one is a file and a line in [`run`]. [`record::finish`] counts the metric, writes
//! the decision log line and the inventory row exactly once per request, whichever stage
//! ended it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use apiward_policy::config::{PortPolicy, RequestLimits};
use apiward_policy::engine::{Decision, Engine};
use http::{Request, Response};
use hyper::body::Incoming;

use super::authenticate::Caller;
use super::{ConnInfo, Upstream, authenticate, authorize, checks, forward, record, response};
use crate::body::ProxyBody;
use crate::refusal::Refusal;
use crate::state::{Active, Shared};

/// What the stages know about one request, filled in as it goes.
pub struct RequestCtx<'a> {
    /// Shared sidecar state (metrics, quotas, inventory).
    pub shared: &'a Arc<Shared>,
    /// The config active when the request arrived.
    pub active: &'a Active,
    /// Its engine.
    pub engine: &'a Engine,
    /// The connection.
    pub info: &'a ConnInfo,
    /// The request id (the caller's, when it sent a usable one).
    pub rid: String,
    /// When the request arrived.
    pub start: Instant,
    /// The request's method and URI as received (forwarding rewrites the head).
    pub method: http::Method,
    /// See `method`.
    pub uri: http::Uri,
    /// The app's port.
    pub port_no: u16,
    /// The port's policy, if one selects it.
    pub port: Option<&'a PortPolicy>,
    /// Its request limits (none when no policy selects the port).
    pub limits: &'a RequestLimits,
    /// Who is calling (after `authenticate`).
    pub caller: Caller,
    /// A credential refused on an Audit port: the request goes on as anonymous and is
    /// recorded as a would-deny with this reason.
    pub authn_would_deny: Option<&'static str>,
    /// The engine's decision (after `authorize`; allowed and unselected before).
    pub decision: Decision<'a>,
    /// Set when the streamed body went over its limit.
    pub body_tripped: Arc<AtomicBool>,
    /// The request reached the app (its duration is observed, whatever the app answered).
    pub forwarded: bool,
}

impl std::fmt::Debug for RequestCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCtx")
            .field("rid", &self.rid)
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

static NO_LIMITS: RequestLimits = RequestLimits {
    max_body_bytes: None,
    max_header_bytes: None,
    content_types: Vec::new(),
    max_json_depth: None,
    timeout_ms: None,
};

/// One request through the whole pipeline.
pub async fn handle(
    req: Request<Incoming>,
    info: &ConnInfo,
    shared: &Arc<Shared>,
    upstream: &Upstream,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let rid = super::request_id(req.headers(), shared);
    let Some(active) = shared.active.load_full() else {
        return Refusal::NO_CONFIG.response(&rid);
    };
    let Some(engine) = active.engine.as_ref() else {
        record::no_config(shared);
        return Refusal::NO_CONFIG.response(&rid);
    };
    let (head, body) = req.into_parts();
    let port_no = active.settings.inbound.port;
    let port = engine.port(port_no);
    let mut ctx = RequestCtx {
        shared,
        active: &active,
        engine,
        info,
        rid,
        start,
        method: head.method.clone(),
        uri: head.uri.clone(),
        port_no,
        port,
        limits: port.map_or(&NO_LIMITS, |p| &p.limits),
        caller: Caller::default(),
        authn_would_deny: None,
        decision: Decision::new(port.map_or_else(|| engine.mtls(port_no), |p| p.mtls)),
        body_tripped: Arc::default(),
        forwarded: false,
    };
    let outcome = run(&mut ctx, head, body, upstream).await;
    let resp = match outcome {
        Ok(resp) => resp,
        Err(refusal) => {
            let mut resp = refusal.response(&ctx.rid);
            if !ctx.decision.allowed() {
                // The engine refused: a quota refusal says which quota and when to retry.
                super::headers::rate_limit_headers(resp.headers_mut(), &ctx.decision);
            }
            record::finish(&ctx, resp.status().as_u16(), Some(&refusal));
            return resp;
        }
    };
    record::finish(&ctx, resp.status().as_u16(), None);
    resp
}

/// The stages, in order.
async fn run(
    ctx: &mut RequestCtx<'_>,
    head: http::request::Parts,
    body: Incoming,
    upstream: &Upstream,
) -> Result<Response<ProxyBody>, Refusal> {
    checks::admit(ctx, &head)?;
    authenticate::stage(ctx, &head).await?;
    authorize::stage(ctx, &head).await?;
    checks::stage(ctx, &head, &body)?;
    let body = checks::body(ctx, &head, body).await?;
    match forward::stage(ctx, head, body, upstream).await? {
        forward::Forwarded::Switched(resp) => Ok(resp),
        forward::Forwarded::Response(resp, slot) => response::stage(ctx, resp, slot).await,
    }
}
