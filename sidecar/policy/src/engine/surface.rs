//! The declared surface: what a request line may be at all (no TRACE, no method or path
//! overrides), and, when the port declares its API, which endpoint it is (undeclared,
//! deprecated, past its sunset).

use std::ops::ControlFlow;

use crate::config::UndeclaredAction;
use crate::normalize::NormalizedPath;

use super::compiled::PortEngine;
use super::decision::{Decision, Reason};
use super::facts::Request;
use super::trace::{Tracer, step};

/// Method-override headers: the app would run another method than the one decided on.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Refusals that hold with or without a policy: these bypass method- and path-based rules.
pub(crate) fn request_line(req: &Request<'_>) -> Result<(), Reason> {
    if matches!(req.method, "TRACE" | "TRACK" | "CONNECT") {
        return Err(Reason::MethodNotAllowed);
    }
    if req.headers.contains_any(&METHOD_OVERRIDE_HEADERS)
        || req.query.is_some_and(has_method_override_param)
    {
        return Err(Reason::MethodOverride);
    }
    // Headers Symfony, Zend and IIS read as the path instead of the request line's:
    // the app would route a path the policy never saw.
    if req.headers.contains_any(&PATH_OVERRIDE_HEADERS) {
        return Err(Reason::PathOverride);
    }
    Ok(())
}

/// The declared endpoint the request is for (an exact path wins over a template; `HEAD`
/// matches a declared `GET`). Undeclared: refused, a would-deny, or let through, as the
/// port says; past its sunset: refused.
pub(crate) fn declared<'e>(
    port: &'e PortEngine,
    req: &Request<'_>,
    path: &NormalizedPath,
    matched: &mut Vec<u32>,
    trace: &mut dyn Tracer,
    d: &mut Decision<'e>,
) -> ControlFlow<()> {
    let api = &port.cfg.api;
    port.declared.router.matches(path, matched);
    let ep = matched
        .iter()
        .flat_map(|t| port.declared.of_template[*t as usize].iter())
        .map(|&i| i as usize)
        .filter(|&i| {
            let m = api.endpoints[i].method.as_str();
            m == req.method || (req.method == "HEAD" && m == "GET")
        })
        .min_by_key(|&i| !port.declared.exact[i])
        .map(|i| &api.endpoints[i]);
    matched.clear();
    let Some(ep) = ep else {
        if trace.enabled() {
            trace.step(step(
                "",
                "api",
                false,
                format!(
                    "{} {} is not a declared endpoint ({:?})",
                    req.method,
                    path.as_str(),
                    api.undeclared
                ),
            ));
        }
        match api.undeclared {
            UndeclaredAction::Allow => {}
            UndeclaredAction::Audit => d.refuse_unless(true, Reason::UndeclaredEndpoint),
            UndeclaredAction::Deny => {
                d.refuse_unless(port.audit(), Reason::UndeclaredEndpoint);
                if !d.allowed() {
                    return ControlFlow::Break(());
                }
            }
        }
        return ControlFlow::Continue(());
    };
    d.template = Some(ep.path.as_str());
    d.declared = true;
    d.deprecated = ep.deprecated;
    d.sunset_unix = ep.sunset_unix;
    if ep
        .sunset_unix
        .is_some_and(|s| (req.now_ms / 1000) as i64 >= s)
    {
        if trace.enabled() {
            trace.step(step(
                "",
                "api",
                true,
                format!("{} {} is past its sunset", ep.method, ep.path),
            ));
        }
        d.deny(Reason::Sunset);
        return ControlFlow::Break(());
    }
    ControlFlow::Continue(())
}

/// Request headers some frameworks take as the path to route.
pub const PATH_OVERRIDE_HEADERS: [&str; 4] = [
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-original-uri",
];

/// `_method=` (any case, encoded or not) in a query string: Rails, Laravel and Express's
/// method-override read it as the method.
fn has_method_override_param(query: &str) -> bool {
    query.split('&').any(|kv| {
        let k = kv.split_once('=').map_or(kv, |(k, _)| k);
        let rest = if k.len() >= 3 && k.as_bytes()[..3].eq_ignore_ascii_case(b"%5f") {
            Some(&k[3..])
        } else {
            k.strip_prefix('_')
        };
        rest.is_some_and(|r| r.eq_ignore_ascii_case("method"))
            || k.eq_ignore_ascii_case("x-http-method-override")
            || k.eq_ignore_ascii_case("x-method-override")
    })
}
