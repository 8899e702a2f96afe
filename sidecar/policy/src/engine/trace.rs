//! Tracing a decision for `apiward explain`: every rule considered, and why it matched or
//! not. The sidecar passes [`NoTrace`], whose `enabled()` is false, so the hot path formats
//! nothing.

use super::facts::Identity;
use crate::config::Action;

/// One step of a decision, for `apiward explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceStep {
    /// Policy, if the step is about a rule or quota.
    pub policy: String,
    /// Rule/quota/step name.
    pub name: String,
    /// Whether it matched.
    pub matched: bool,
    /// Why (one line).
    pub why: String,
}

/// Receives trace steps.
pub trait Tracer {
    /// Whether steps are wanted at all (so the hot path skips formatting).
    fn enabled(&self) -> bool;
    /// Records one step.
    fn step(&mut self, step: TraceStep);
}

/// The sidecar's tracer: records nothing, costs nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTrace;

impl Tracer for NoTrace {
    fn enabled(&self) -> bool {
        false
    }
    fn step(&mut self, _: TraceStep) {}
}

impl Tracer for Vec<TraceStep> {
    fn enabled(&self) -> bool {
        true
    }
    fn step(&mut self, step: TraceStep) {
        self.push(step);
    }
}

pub(crate) fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "Allow",
        Action::Deny => "Deny",
    }
}

pub(crate) fn yes(b: bool) -> &'static str {
    if b { "matches" } else { "does not match" }
}

pub(crate) fn step(policy: &str, name: &str, matched: bool, why: String) -> TraceStep {
    TraceStep {
        policy: policy.to_owned(),
        name: name.to_owned(),
        matched,
        why,
    }
}

pub(crate) fn describe_identity(id: &Identity<'_>) -> String {
    let mut parts = Vec::new();
    if let Some(p) = id.peer {
        parts.push(format!("peer {p}"));
    }
    if let Some(j) = id.jwt {
        parts.push(format!("JWT from {}", j.provider));
    }
    if let Some(k) = id.api_key {
        parts.push(format!("API key {}#{}", k.provider, k.client));
    }
    if parts.is_empty() {
        "no identity".into()
    } else {
        parts.join(", ")
    }
}
