//! The outcome of a request, recorded in one place, once: the request metric, the decision
//! log line and the inventory row, whichever stage ended it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use apiward_policy::engine::{Decision, RuleRef};
use apiward_policy::report::AuthKind;

use super::ConnInfo;
use super::pipeline::RequestCtx;
use crate::refusal::Refusal;
use crate::state::{Active, Shared};

/// Records a request the pipeline finished with `status`; `refused` when a stage refused it.
pub fn finish(ctx: &RequestCtx<'_>, status: u16, refused: Option<&Refusal>) {
    let d = &ctx.decision;
    let (label, reason) = match (refused, ctx.authn_would_deny) {
        (Some(r), _) => ("deny", r.code),
        (None, Some(code)) => ("would_deny", code),
        (None, None) => (d.label(), d.reason().code()),
    };
    // The rule label names the rule that decided: none when a stage after the engine
    // refused a request the rules allowed.
    let rule = match refused {
        Some(_) if d.allowed() => None,
        _ => d.rule,
    };
    count(ctx.shared, label, reason, rule, status);
    log_decision(
        ctx.shared,
        ctx.active,
        &ctx.rid,
        ctx.method.as_str(),
        ctx.uri.path(),
        ctx.info,
        Some(d),
        label,
        reason,
        status,
        ctx.start,
    );
    if ctx.active.settings.record_inventory {
        see(ctx, status, refused.is_some() || !d.allowed());
    }
    if ctx.forwarded {
        ctx.shared
            .metrics
            .request_duration
            .observe(ctx.start.elapsed().as_secs_f64());
    }
}

/// A request refused because no config is loaded (counted only: there is no config to log
/// or inventory under).
pub fn no_config(shared: &Shared) {
    record_simple(
        shared,
        "deny",
        Refusal::NO_CONFIG.code,
        Refusal::NO_CONFIG.status,
    );
}

/// Counts the request in the inventory (see [`crate::inventory`]).
fn see(ctx: &RequestCtx<'_>, status: u16, denied: bool) {
    let id = ctx.caller.identity(ctx.info);
    let auth = if id.api_key.is_some() {
        AuthKind::ApiKey
    } else if id.jwt.is_some() {
        AuthKind::Jwt
    } else if id.peer.is_some() {
        AuthKind::Mtls
    } else {
        AuthKind::None
    };
    let d = &ctx.decision;
    let principal = apiward_policy::engine::principal_of(&id);
    ctx.shared.inventory.record(&crate::inventory::Seen {
        port: ctx.port_no,
        method: ctx.method.as_str(),
        path: ctx.uri.path(),
        declared: d.template.filter(|_| d.declared),
        status,
        auth,
        principal: principal.as_deref(),
        denied,
        would_deny: d.would_deny() || (!denied && ctx.authn_would_deny.is_some()),
        latency_micros: ctx.start.elapsed().as_micros() as u64,
        now: (super::now_ms() / 1000) as i64,
    });
}

fn count(
    shared: &Shared,
    decision: &'static str,
    reason: &'static str,
    rule: Option<RuleRef<'_>>,
    status: u16,
) {
    let (policy, rule) = rule.map_or((String::new(), String::new()), |r| {
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

/// Counts a request outside the HTTP pipeline (opaque TCP) by decision and reason.
pub(crate) fn record_simple(
    shared: &Shared,
    decision: &'static str,
    reason: &'static str,
    status: u16,
) {
    count(shared, decision, reason, None, status);
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
