//! Quotas: every quota whose operations match the request counts it under its key; the
//! tightest verdict is reported, and the first spent one refuses (or, in Audit, is a
//! would-deny). Global quotas the store cannot answer at once are left pending.

use crate::config::{QuotaConfig, QuotaKey, Window};
use crate::normalize::NormalizedPath;
use crate::quota::{QuotaStore, QuotaVerdict, calendar_window};

use super::compiled::{PortEngine, method_bit};
use super::decision::{Decision, PendingQuota, QuotaOutcome, Reason, RuleRef, Verdict};
use super::facts::{Request, claim_str, principal_of};
use super::trace::{Tracer, step};

/// The value a quota counts under, if the request has one.
pub(crate) fn key_of(q: &QuotaConfig, req: &Request<'_>) -> Option<String> {
    match &q.key {
        QuotaKey::Principal => principal_of(&req.identity),
        QuotaKey::Claim(c) => req
            .identity
            .jwt
            .and_then(|j| claim_str(j.claims.get(c)).map(|s| s.into_owned())),
        QuotaKey::ApiKey(p) => req
            .identity
            .api_key
            .filter(|k| k.provider == p)
            .map(|k| k.client.to_owned()),
        QuotaKey::Header(h) => req.headers.get_one(h).map(str::to_owned),
        QuotaKey::SourceIp => Some(req.source_ip.to_string()),
    }
}

/// Counts the request against every quota of `port` that applies to it.
pub(crate) fn apply<'e>(
    port: &'e PortEngine,
    req: &Request<'_>,
    path: &NormalizedPath,
    store: &dyn QuotaStore,
    trace: &mut dyn Tracer,
    d: &mut Decision<'e>,
) {
    let audit_port = port.audit();
    let mut matched = Vec::new();
    let applies = port
        .quotas
        .matching(path, method_bit(req.method), req.headers, &mut matched);
    for (i, _) in applies {
        let i = i as usize;
        let q = &port.cfg.quotas[i];
        let Some(key) = key_of(q, req) else {
            if trace.enabled() {
                trace.step(step(
                    &q.policy,
                    &q.name,
                    false,
                    "quota does not apply: the request has no value for its key".into(),
                ));
            }
            continue;
        };
        let Some(v) = store.try_acquire(req.port, i, q, &key, req.now_ms) else {
            if trace.enabled() {
                trace.step(step(
                    &q.policy,
                    &q.name,
                    false,
                    format!("quota key {key:?}: left to the shared store"),
                ));
            }
            d.pending.push(PendingQuota {
                port: req.port,
                index: i,
                key,
                audit: q.audit || audit_port,
                now_ms: req.now_ms,
            });
            continue;
        };
        if trace.enabled() {
            trace.step(step(
                &q.policy,
                &q.name,
                !v.allowed,
                format!("quota key {key:?}: {} of {} left", v.remaining, v.limit),
            ));
        }
        if !merge(d, q, key, v, q.audit || audit_port, req.now_ms) {
            return;
        }
    }
}

/// Folds one quota verdict into a decision: the tightest verdict is reported; a refusal
/// refuses (or, in Audit, is a would-deny). Returns false once the request is refused.
pub(crate) fn merge<'e>(
    d: &mut Decision<'e>,
    q: &'e QuotaConfig,
    key: String,
    v: QuotaVerdict,
    audit: bool,
    now_ms: u64,
) -> bool {
    let tighter = d
        .quota
        .as_ref()
        .is_none_or(|o| !v.allowed || (o.verdict.allowed && v.remaining < o.verdict.remaining));
    let outcome = QuotaOutcome {
        quota: RuleRef {
            policy: &q.policy,
            name: &q.name,
        },
        key,
        verdict: v,
        window_seconds: window_seconds(q, now_ms),
    };
    if !v.allowed {
        d.quota = Some(outcome);
        if audit {
            d.verdict = Verdict::WouldDeny(Reason::QuotaExceeded);
            return true;
        }
        d.deny(Reason::QuotaExceeded);
        d.rule = Some(RuleRef {
            policy: &q.policy,
            name: &q.name,
        });
        return false;
    }
    d.delay_ms = d.delay_ms.max(v.delay_ms);
    if tighter {
        d.quota = Some(outcome);
    }
    true
}

/// The period a quota's limit is per, in seconds: a Calendar window's is the current
/// window's own length (this month's days, not a nominal 30).
fn window_seconds(q: &QuotaConfig, now_ms: u64) -> u64 {
    let ms = match q.window {
        Window::Calendar(unit) => calendar_window(unit, now_ms).1,
        Window::Rolling => q.period_ms,
    };
    (ms / 1000).max(1)
}
