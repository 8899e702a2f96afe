//! Authorization: which rules match the operation, then Deny rules (any match refuses),
//! then Allow rules (the caller, then the bindings of path, query or header values to
//! claims), then default deny. Audit (the port's or a rule's) turns a refusal into a
//! would-deny.

use std::borrow::Cow;
use std::ops::ControlFlow;

use crate::config::{Action, BindSource};
use crate::normalize::NormalizedPath;
use crate::router::capture;

use super::compiled::{PortEngine, Target, method_bit};
use super::decision::{Decision, Reason, RuleRef, Verdict};
use super::facts::{Request, claim_matches, claim_str, query_param, spiffe_namespace};
use super::trace::{Tracer, action_name, describe_identity, step, yes};

/// Decides the rules of `port` for `req`. `matched` is left holding the templates of the
/// rules' router that the path matches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn authorize<'e>(
    port: &'e PortEngine,
    trust_domain: &str,
    req: &Request<'_>,
    path: &NormalizedPath,
    matched: &mut Vec<u32>,
    trace: &mut dyn Tracer,
    d: &mut Decision<'e>,
) -> ControlFlow<()> {
    let audit_port = port.audit();
    let tracing = trace.enabled();
    // Only rules whose operation matches are considered further, so the cost follows the
    // number of candidate rules, not the size of the policy. Rule order decides which
    // Allow rule is reported.
    let candidates = port
        .rules
        .matching(path, method_bit(req.method), req.headers, matched);
    if tracing {
        for (i, r) in port.cfg.rules.iter().enumerate() {
            if candidates
                .binary_search_by_key(&(i as u32), |c| c.0)
                .is_err()
            {
                trace.step(step(
                    &r.policy,
                    &r.name,
                    false,
                    format!(
                        "{} rule: operation does not match ({} {})",
                        action_name(r.action),
                        req.method,
                        path.as_str()
                    ),
                ));
            }
        }
    }

    // Deny rules first: any match refuses.
    for &(i, _) in &candidates {
        let (i, r) = (i as usize, &port.cfg.rules[i as usize]);
        if r.action != Action::Deny {
            continue;
        }
        let from = caller_matches(port, trust_domain, i, req);
        if tracing {
            trace.step(step(
                &r.policy,
                &r.name,
                from,
                format!("Deny rule: operation matches, caller {}", yes(from)),
            ));
        }
        if from {
            d.rule = Some(RuleRef {
                policy: &r.policy,
                name: &r.name,
            });
            d.refuse_unless(r.audit || audit_port, Reason::DeniedByRule);
            if !d.allowed() {
                return ControlFlow::Break(());
            }
        }
    }

    // Allow rules.
    let mut allowed_by: Option<usize> = None;
    let mut bind_failure: Option<(usize, String)> = None;
    let mut audited_binding = false;
    let mut needs_identity = false;
    for &(i, t) in &candidates {
        let (i, r) = (i as usize, &port.cfg.rules[i as usize]);
        if r.action != Action::Allow {
            continue;
        }
        if !caller_matches(port, trust_domain, i, req) {
            needs_identity |= r
                .from
                .iter()
                .all(|s| !s.unauthenticated && s.ip_blocks.is_empty());
            if tracing {
                trace.step(step(
                    &r.policy,
                    &r.name,
                    false,
                    format!(
                        "operation matches; caller does not ({})",
                        describe_identity(&req.identity)
                    ),
                ));
            }
            continue;
        }
        match binding_failure(port, i, t, path, req) {
            Some(why) => {
                if tracing {
                    trace.step(step(
                        &r.policy,
                        &r.name,
                        false,
                        format!("operation and caller match; binding failed: {why}"),
                    ));
                }
                if r.audit && allowed_by.is_none() {
                    audited_binding = true;
                    allowed_by = Some(i);
                    bind_failure = Some((i, why));
                } else if bind_failure.is_none() {
                    bind_failure = Some((i, why));
                }
            }
            None => {
                if tracing {
                    trace.step(step(
                        &r.policy,
                        &r.name,
                        true,
                        "operation, caller and bindings match: allow".into(),
                    ));
                }
                allowed_by = Some(i);
                // An Audit rule keeps looking for one that allows without reservation.
                if !r.audit || audited_binding || d.would_deny() {
                    break;
                }
            }
        }
    }
    match allowed_by {
        Some(i) => {
            let r = &port.cfg.rules[i];
            d.rule = d.rule.or(Some(RuleRef {
                policy: &r.policy,
                name: &r.name,
            }));
            if audited_binding && d.verdict == Verdict::Allow {
                d.verdict = Verdict::WouldDeny(Reason::BindingFailed);
                d.detail = bind_failure.map(|(_, w)| w);
            }
            ControlFlow::Continue(())
        }
        None => {
            let reason = if let Some((i, why)) = bind_failure {
                let r = &port.cfg.rules[i];
                d.rule = Some(RuleRef {
                    policy: &r.policy,
                    name: &r.name,
                });
                d.detail = Some(why);
                Reason::BindingFailed
            } else if needs_identity && req.identity.is_anonymous() {
                Reason::Unauthenticated
            } else {
                Reason::NoMatchingRule
            };
            if tracing {
                trace.step(step(
                    "",
                    "default",
                    false,
                    format!("no Allow rule allows the request: {}", reason.code()),
                ));
            }
            d.refuse_unless(audit_port, reason);
            if d.allowed() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        }
    }
}

/// Whether one of the rule's sources matches the caller (a rule without sources matches
/// everyone). Within a source every field given must match.
fn caller_matches(port: &PortEngine, trust_domain: &str, rule: usize, req: &Request<'_>) -> bool {
    let sources = &port.sources[rule];
    if sources.is_empty() {
        return true;
    }
    let id = &req.identity;
    sources.iter().any(|c| {
        let s = &c.source;
        if s.unauthenticated && !id.is_anonymous() {
            return false;
        }
        if !s.principals.is_empty() && !id.peer.is_some_and(|p| s.principals.iter().any(|x| x == p))
        {
            return false;
        }
        if !s.namespaces.is_empty() {
            let ns = id.peer.and_then(|p| spiffe_namespace(p, trust_domain));
            if !ns.is_some_and(|n| s.namespaces.iter().any(|x| x == n)) {
                return false;
            }
        }
        if let Some(j) = &s.jwt {
            let Some(tok) = id.jwt else { return false };
            if tok.provider != j.provider {
                return false;
            }
            if !j
                .claims
                .iter()
                .all(|(k, v)| claim_matches(k, tok.claims.get(k), v))
            {
                return false;
            }
        }
        if !s.api_keys.is_empty() {
            let Some(k) = id.api_key else { return false };
            let ok = s.api_keys.iter().any(|want| match want.split_once('#') {
                Some((p, c)) => p == k.provider && c == k.client,
                None => want == k.provider,
            });
            if !ok {
                return false;
            }
        }
        c.ip_blocks.is_empty() || c.ip_allowed(req.source_ip)
    })
}

/// The first binding of the rule whose value differs from its claim (or is missing), as
/// one line for the decision log; `None` when every binding holds.
fn binding_failure(
    port: &PortEngine,
    rule: usize,
    target: Target,
    path: &NormalizedPath,
    req: &Request<'_>,
) -> Option<String> {
    let r = &port.cfg.rules[rule];
    for b in &r.bind {
        let claim = req
            .identity
            .jwt
            .and_then(|j| claim_str(j.claims.get(&b.claim)));
        let (what, value): (String, Option<Cow<'_, str>>) = match &b.source {
            BindSource::PathParam(p) => (
                format!("path parameter {{{p}}}"),
                match target {
                    Target::Template(t) => capture(port.rules.template(t), path, p).map(Into::into),
                    Target::AnyPath => None,
                },
            ),
            BindSource::QueryParam(q) => {
                (format!("query parameter {q}"), query_param(req.query, q))
            }
            BindSource::Header(h) => (
                format!("header {h}"),
                req.headers.get_one(h).map(Into::into),
            ),
        };
        match (value, claim) {
            (Some(v), Some(c)) if v == c => {}
            (Some(v), Some(c)) => {
                return Some(format!("{what} is {v:?} but claim {} is {c:?}", b.claim));
            }
            (None, _) => return Some(format!("{what} is missing or repeated")),
            (_, None) => return Some(format!("claim {} is missing or not a string", b.claim)),
        }
    }
    None
}
