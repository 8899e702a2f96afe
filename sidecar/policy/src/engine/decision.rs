//! What the engine says about one request: a [`Verdict`] with its [`Reason`], and what the
//! sidecar needs to act on it (the rule, the template, the quota outcome).

use crate::config::MtlsMode;
use crate::quota::QuotaVerdict;

/// Why a decision came out the way it did. `code()` is stable: logs, metrics and
/// refusal bodies use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An Allow rule matched.
    Allowed,
    /// No policy selects this port.
    NoPolicy,
    /// A Deny rule matched.
    DeniedByRule,
    /// No Allow rule matched (default deny).
    NoMatchingRule,
    /// An Allow rule matched the caller and operation but a bound value differed from its claim.
    BindingFailed,
    /// Only authenticated callers could be allowed, and this one has no identity.
    Unauthenticated,
    /// The path is malformed or ambiguous.
    InvalidPath,
    /// TRACE, TRACK or CONNECT.
    MethodNotAllowed,
    /// A method-override header (or `_method` query parameter) was sent.
    MethodOverride,
    /// A header frameworks read as the path (`X-Original-URL`, `X-Rewrite-URL`) was sent.
    PathOverride,
    /// The endpoint is not declared and undeclared endpoints are denied.
    UndeclaredEndpoint,
    /// The endpoint is past its sunset date.
    Sunset,
    /// A quota is spent.
    QuotaExceeded,
}

impl Reason {
    /// Every reason, for tables and tests.
    pub const ALL: [Reason; 13] = [
        Reason::Allowed,
        Reason::NoPolicy,
        Reason::DeniedByRule,
        Reason::NoMatchingRule,
        Reason::BindingFailed,
        Reason::Unauthenticated,
        Reason::InvalidPath,
        Reason::MethodNotAllowed,
        Reason::MethodOverride,
        Reason::PathOverride,
        Reason::UndeclaredEndpoint,
        Reason::Sunset,
        Reason::QuotaExceeded,
    ];

    /// Stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::NoPolicy => "no_policy",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::NoMatchingRule => "no_matching_rule",
            Reason::BindingFailed => "binding_failed",
            Reason::Unauthenticated => "unauthenticated",
            Reason::InvalidPath => "invalid_path",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::MethodOverride => "method_override",
            Reason::PathOverride => "path_override",
            Reason::UndeclaredEndpoint => "undeclared_endpoint",
            Reason::Sunset => "sunset",
            Reason::QuotaExceeded => "quota_exceeded",
        }
    }

    /// The HTTP status of a refusal for this reason.
    pub fn status(self) -> u16 {
        match self {
            Reason::Allowed | Reason::NoPolicy => 200,
            Reason::DeniedByRule | Reason::NoMatchingRule | Reason::BindingFailed => 403,
            Reason::Unauthenticated => 401,
            Reason::InvalidPath | Reason::MethodOverride | Reason::PathOverride => 400,
            Reason::MethodNotAllowed => 405,
            Reason::UndeclaredEndpoint => 404,
            Reason::Sunset => 410,
            Reason::QuotaExceeded => 429,
        }
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The request goes to the app.
    Allow,
    /// Policy would refuse it for this reason, but Audit lets it through.
    WouldDeny(Reason),
    /// Refused for this reason.
    Deny(Reason),
}

/// Which rule or quota decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef<'e> {
    /// `namespace/name` of the policy.
    pub policy: &'e str,
    /// Rule or quota name.
    pub name: &'e str,
}

/// The quota outcome attached to a decision (the tightest quota that applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaOutcome<'e> {
    /// The quota.
    pub quota: RuleRef<'e>,
    /// The key counted.
    pub key: String,
    /// The verdict.
    pub verdict: QuotaVerdict,
    /// The period the limit is per, in seconds (for `RateLimit-Policy`).
    pub window_seconds: u64,
}

/// What the engine decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'e> {
    /// Allow, would-deny or deny, with the reason.
    pub verdict: Verdict,
    /// A policy selects the request's port (an allowed request on a port none selects is
    /// reported as `no_policy`).
    pub selected: bool,
    /// The rule (or quota) that decided, if one did.
    pub rule: Option<RuleRef<'e>>,
    /// The declared or matched path template, if any.
    pub template: Option<&'e str>,
    /// Quota outcome, if a quota applied.
    pub quota: Option<QuotaOutcome<'e>>,
    /// Wait this long before forwarding (Delay quotas), in ms.
    pub delay_ms: u64,
    /// For binding failures: the bound parameter that did not match.
    pub detail: Option<String>,
    /// `template` is a declared endpoint's (not a rule's).
    pub declared: bool,
    /// The matched declared endpoint is deprecated.
    pub deprecated: bool,
    /// Sunset of the matched endpoint (Unix s), if any.
    pub sunset_unix: Option<i64>,
    /// The port's mTLS mode (for the sidecar's connection-level checks).
    pub mtls: MtlsMode,
    /// Quotas the store could not answer at once (Global quotas whose local lease is
    /// spent): the caller asks the store asynchronously, then
    /// [`Engine::settle_quota`](super::Engine::settle_quota).
    pub pending: Vec<PendingQuota>,
    /// The normalized path the decision was made on, which the sidecar forwards (empty
    /// when the request was refused before its path was read).
    pub path: String,
}

impl<'e> Decision<'e> {
    /// Allowed so far, on a port with `mtls`.
    pub fn new(mtls: MtlsMode) -> Self {
        Self {
            verdict: Verdict::Allow,
            selected: false,
            rule: None,
            template: None,
            quota: None,
            delay_ms: 0,
            detail: None,
            declared: false,
            deprecated: false,
            sunset_unix: None,
            mtls,
            pending: Vec::new(),
            path: String::new(),
        }
    }

    /// The request goes to the app (true for Audit would-denies too).
    pub fn allowed(&self) -> bool {
        !matches!(self.verdict, Verdict::Deny(_))
    }

    /// Policy would have refused it, but Audit let it through.
    pub fn would_deny(&self) -> bool {
        matches!(self.verdict, Verdict::WouldDeny(_))
    }

    /// Why.
    pub fn reason(&self) -> Reason {
        match self.verdict {
            Verdict::Allow if self.selected => Reason::Allowed,
            Verdict::Allow => Reason::NoPolicy,
            Verdict::WouldDeny(r) | Verdict::Deny(r) => r,
        }
    }

    /// The status to answer with: the refusal's, or 200.
    pub fn status(&self) -> u16 {
        match self.verdict {
            Verdict::Deny(r) => r.status(),
            _ => 200,
        }
    }

    /// `allow`, `would_deny` or `deny` (the metric and decision-log label).
    pub fn label(&self) -> &'static str {
        match self.verdict {
            Verdict::Allow => "allow",
            Verdict::WouldDeny(_) => "would_deny",
            Verdict::Deny(_) => "deny",
        }
    }

    /// Refuses for `reason`.
    pub(crate) fn deny(&mut self, reason: Reason) {
        self.verdict = Verdict::Deny(reason);
    }

    /// Refuses for `reason`, or only records a would-deny when `audit`.
    pub(crate) fn refuse_unless(&mut self, audit: bool, reason: Reason) {
        self.verdict = if audit {
            Verdict::WouldDeny(reason)
        } else {
            Verdict::Deny(reason)
        };
    }
}

/// A quota left for the caller to count (see [`Decision::pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingQuota {
    /// The port the request came in on.
    pub port: u16,
    /// The quota's index within the port.
    pub index: usize,
    /// The key counted.
    pub key: String,
    /// Exceeding it is only a would-deny (Audit).
    pub audit: bool,
    /// When the request was decided (Unix ms).
    pub now_ms: u64,
}
