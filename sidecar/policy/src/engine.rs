//! The decision engine: request facts in, [`Decision`] out.
//!
//! Built once per [`SidecarConfig`] ([`Engine::new`]), then shared by every request. Order:
//! method checks → path normalization → declared API (undeclared, sunset) → Deny rules →
//! Allow rules (with bindings) → default deny → quotas. Audit (whole policy or one rule)
//! turns a refusal into a would-deny that lets the request through. A [`Tracer`] records
//! every rule considered, for `apiward explain`; the sidecar passes [`NoTrace`].

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::config::{
    Action, BindSource, MtlsMode, Operation, PortPolicy, QuotaConfig, QuotaKey, SidecarConfig,
    UndeclaredAction,
};
use crate::normalize::{NormalizedPath, PathError, normalize};
use crate::quota::{QuotaStore, QuotaVerdict};
use crate::router::{Router, capture};
use crate::template::PathTemplate;

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

/// A verified JWT.
#[derive(Debug, Clone, Copy)]
pub struct JwtIdentity<'a> {
    /// Provider id (`namespace/policy/name`).
    pub provider: &'a str,
    /// Its claims.
    pub claims: &'a serde_json::Map<String, Value>,
}

/// A valid API key.
#[derive(Debug, Clone, Copy)]
pub struct ApiKeyIdentity<'a> {
    /// Provider id.
    pub provider: &'a str,
    /// Client name.
    pub client: &'a str,
}

/// Who is calling, as established by the sidecar before the engine runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// The mTLS peer's SPIFFE ID.
    pub peer: Option<&'a str>,
    /// A verified JWT.
    pub jwt: Option<JwtIdentity<'a>>,
    /// A valid API key.
    pub api_key: Option<ApiKeyIdentity<'a>>,
}

impl Identity<'_> {
    /// No identity at all.
    pub fn is_anonymous(&self) -> bool {
        self.peer.is_none() && self.jwt.is_none() && self.api_key.is_none()
    }
}

/// Request headers, looked up by lower-case name.
pub trait Headers {
    /// The value if the header appears exactly once; `None` if absent or repeated.
    fn get_one(&self, name: &str) -> Option<&str>;
    /// Whether the header appears at all.
    fn contains(&self, name: &str) -> bool;
}

impl Headers for Vec<(&str, &str)> {
    fn get_one(&self, name: &str) -> Option<&str> {
        let mut it = self.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        match (it.next(), it.next()) {
            (Some((_, v)), None) => Some(v),
            _ => None,
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    }
}

/// The facts a decision is made on.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The inbound port (the app's port).
    pub port: u16,
    /// Method, as sent.
    pub method: &'a str,
    /// Raw path, without the query string.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a dyn Headers,
    /// Who is calling.
    pub identity: Identity<'a>,
    /// Source address.
    pub source_ip: IpAddr,
    /// Now, Unix milliseconds.
    pub now_ms: u64,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("port", &self.port)
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
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
    /// The request goes to the app (true also for Audit would-denies).
    pub allowed: bool,
    /// Policy would have refused it, but Audit mode let it through.
    pub would_deny: bool,
    /// Why.
    pub reason: Reason,
    /// The status to answer with when not allowed (200 when allowed).
    pub status: u16,
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
    /// spent): the caller asks the store asynchronously, then [`Engine::settle_quota`].
    pub pending: Vec<PendingQuota>,
    /// The normalized path the decision was made on, which the sidecar forwards (empty
    /// when the request was refused before its path was read).
    pub path: String,
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
}

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

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

fn method_bit(m: &str) -> u8 {
    METHODS
        .iter()
        .position(|x| *x == m)
        .map_or(0x80, |i| 1 << i)
}

#[derive(Debug, Clone)]
struct CompiledOp {
    methods: u8, // 0 = any
    any_path: bool,
    op: Operation,
}

#[derive(Debug, Clone)]
struct CompiledSource {
    principals: Vec<String>,
    namespaces: Vec<String>,
    ip_blocks: Vec<ipnet_lite::Cidr>,
}

#[derive(Debug)]
struct PortEngine {
    cfg: PortPolicy,
    router: Router,
    ops: Vec<Vec<CompiledOp>>,          // per rule
    sources: Vec<Vec<CompiledSource>>,  // per rule, parallel to cfg.rules[i].from
    template_ops: Vec<Vec<(u32, u16)>>, // template id → (rule, op)
    any_path_ops: Vec<(u32, u16)>,
    endpoints: Router,
    endpoint_of_template: Vec<Vec<u32>>, // endpoints router template id → endpoint indices
    quota_ops: Vec<Vec<CompiledOp>>,
    quota_router: Router,
    quota_template_ops: Vec<Vec<(u32, u16)>>,
}

/// Error building an engine from a config (the compiler never produces one; hand-written
/// configs can).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config at {field}: {message}")]
pub struct EngineError {
    /// Where.
    pub field: String,
    /// What.
    pub message: String,
}

/// A compiled config, ready to decide.
#[derive(Debug)]
pub struct Engine {
    version: String,
    /// The mesh's SPIFFE trust domain: `namespaces` match only identities of it.
    trust_domain: String,
    default_mtls: MtlsMode,
    ports: HashMap<u16, PortEngine>,
}

mod ipnet_lite {
    use std::net::IpAddr;

    /// A parsed CIDR block.
    #[derive(Debug, Clone, Copy)]
    pub struct Cidr {
        addr: IpAddr,
        prefix: u8,
    }

    impl Cidr {
        pub fn parse(s: &str) -> Option<Self> {
            let (a, p) = s.split_once('/')?;
            let addr: IpAddr = a.parse().ok()?;
            let prefix: u8 = p.parse().ok()?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            (prefix <= max).then_some(Self { addr, prefix })
        }

        pub fn contains(&self, ip: IpAddr) -> bool {
            let ip = match (self.addr, ip) {
                (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                _ => ip,
            };
            match (self.addr, ip) {
                (IpAddr::V4(n), IpAddr::V4(a)) => {
                    let mask = if self.prefix == 0 {
                        0
                    } else {
                        u32::MAX << (32 - self.prefix)
                    };
                    u32::from(n) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(n), IpAddr::V6(a)) => {
                    let mask = if self.prefix == 0 {
                        0
                    } else {
                        u128::MAX << (128 - self.prefix)
                    };
                    u128::from(n) & mask == u128::from(a) & mask
                }
                _ => false,
            }
        }
    }
}

/// Compiled operations and their (template id, operation index) links.
type CompiledOps = (Vec<CompiledOp>, Vec<(u32, u16)>);

fn compile_ops(
    ops: &[Operation],
    router: &mut Router,
    field: &str,
) -> Result<CompiledOps, EngineError> {
    let mut out = Vec::with_capacity(ops.len());
    let mut links = Vec::new();
    for (j, op) in ops.iter().enumerate() {
        let mut methods = 0u8;
        for m in &op.methods {
            methods |= method_bit(m);
        }
        for (k, p) in op.paths.iter().enumerate() {
            let t = PathTemplate::parse(p).map_err(|e| EngineError {
                field: format!("{field}[{j}].paths[{k}]"),
                message: e.to_string(),
            })?;
            links.push((router.insert(t), j as u16));
        }
        out.push(CompiledOp {
            methods,
            any_path: op.paths.is_empty(),
            op: op.clone(),
        });
    }
    Ok((out, links))
}

impl PortEngine {
    fn new(cfg: &PortPolicy) -> Result<Self, EngineError> {
        let mut router = Router::default();
        let mut ops = Vec::new();
        let mut sources = Vec::new();
        let mut links: Vec<(u32, u32, u16)> = Vec::new();
        let mut any_path_ops = Vec::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let (compiled, l) = compile_ops(
                &r.to,
                &mut router,
                &format!("ports[{}].rules[{i}].to", cfg.port),
            )?;
            if r.to.is_empty() {
                any_path_ops.push((i as u32, u16::MAX));
            }
            for (j, c) in compiled.iter().enumerate() {
                if c.any_path {
                    any_path_ops.push((i as u32, j as u16));
                }
            }
            links.extend(l.into_iter().map(|(t, j)| (t, i as u32, j)));
            ops.push(compiled);
            let mut srcs = Vec::new();
            for (j, s) in r.from.iter().enumerate() {
                let mut ip_blocks = Vec::new();
                for (k, c) in s.ip_blocks.iter().enumerate() {
                    ip_blocks.push(ipnet_lite::Cidr::parse(c).ok_or_else(|| EngineError {
                        field: format!("ports[{}].rules[{i}].from[{j}].ipBlocks[{k}]", cfg.port),
                        message: format!("{c:?} is not a CIDR block"),
                    })?);
                }
                srcs.push(CompiledSource {
                    principals: s.principals.clone(),
                    namespaces: s.namespaces.clone(),
                    ip_blocks,
                });
            }
            sources.push(srcs);
        }
        let mut template_ops = vec![Vec::new(); router.len()];
        for (t, i, j) in links {
            template_ops[t as usize].push((i, j));
        }
        let mut endpoints = Router::default();
        let mut endpoint_of_template: Vec<Vec<u32>> = Vec::new();
        for (i, ep) in cfg.api.endpoints.iter().enumerate() {
            let t = PathTemplate::parse(&ep.path).map_err(|e| EngineError {
                field: format!("ports[{}].api.endpoints[{i}].path", cfg.port),
                message: e.to_string(),
            })?;
            let id = endpoints.insert(t) as usize;
            if endpoint_of_template.len() <= id {
                endpoint_of_template.resize(id + 1, Vec::new());
            }
            endpoint_of_template[id].push(i as u32);
        }
        let mut quota_router = Router::default();
        let mut quota_ops = Vec::new();
        let mut qlinks = Vec::new();
        for (i, q) in cfg.quotas.iter().enumerate() {
            let (compiled, l) = compile_ops(
                &q.matches,
                &mut quota_router,
                &format!("ports[{}].quotas[{i}].matches", cfg.port),
            )?;
            qlinks.extend(l.into_iter().map(|(t, j)| (t, i as u32, j)));
            quota_ops.push(compiled);
        }
        let mut quota_template_ops = vec![Vec::new(); quota_router.len()];
        for (t, i, j) in qlinks {
            quota_template_ops[t as usize].push((i, j));
        }
        Ok(Self {
            cfg: cfg.clone(),
            router,
            ops,
            sources,
            template_ops,
            any_path_ops,
            endpoints,
            endpoint_of_template,
            quota_ops,
            quota_router,
            quota_template_ops,
        })
    }
}

fn method_ok(op: &CompiledOp, bit: u8) -> bool {
    op.methods == 0 || op.methods & bit != 0
}

fn headers_ok(op: &CompiledOp, h: &dyn Headers) -> bool {
    op.op.headers.iter().all(|m| match &m.value {
        None => h.contains(&m.name),
        Some(v) => h.get_one(&m.name) == Some(v.as_str()),
    })
}

/// Does a claim satisfy a required value? Strings compare exactly; lists must contain it;
/// `scope`/`scp` strings are split on spaces; numbers and booleans compare by text.
pub fn claim_matches(claim: &str, value: Option<&Value>, required: &str) -> bool {
    match value {
        Some(Value::String(s)) if claim == "scope" || claim == "scp" => {
            s.split(' ').any(|w| w == required)
        }
        Some(Value::String(s)) => s == required,
        Some(Value::Array(a)) => a.iter().any(|v| claim_matches("", Some(v), required)),
        Some(Value::Number(n)) => n.to_string() == required,
        Some(Value::Bool(b)) => (if *b { "true" } else { "false" }) == required,
        _ => false,
    }
}

/// A claim as a plain string (for bindings and quota keys): strings as-is, numbers and
/// booleans by text; objects, lists and nulls have none.
pub fn claim_str(value: Option<&Value>) -> Option<std::borrow::Cow<'_, str>> {
    match value? {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(b.to_string().into()),
        _ => None,
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut found = None;
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                return None; // repeated: ambiguous, fail the binding
            }
            found = Some(v);
        }
    }
    let v = found?;
    if !v.contains('%') && !v.contains('+') {
        return Some(v.into());
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = char::from(b[i + 1]).to_digit(16)?;
                let l = char::from(b[i + 2]).to_digit(16)?;
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            b'%' => return None,
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Into::into)
}

/// The caller's principal — what quotas keyed by `principal` count and what the app is told:
/// `apikey:<provider>#<client>`, `jwt:<provider>|<sub>`, or the mTLS SPIFFE ID.
pub fn principal_of(id: &Identity<'_>) -> Option<String> {
    if let Some(k) = id.api_key {
        return Some(format!("apikey:{}#{}", k.provider, k.client));
    }
    if let Some(j) = id.jwt {
        let sub = claim_str(j.claims.get("sub"))?;
        return Some(format!("jwt:{}|{}", j.provider, sub));
    }
    id.peer.map(|p| p.to_owned())
}

impl Engine {
    /// Compiles a config. Fails only on configs the compiler would never produce.
    pub fn new(cfg: &SidecarConfig) -> Result<Self, EngineError> {
        let mut ports = HashMap::new();
        for p in &cfg.ports {
            ports.insert(p.port, PortEngine::new(p)?);
        }
        Ok(Self {
            version: cfg.version.clone(),
            trust_domain: cfg.trust_domain.clone(),
            default_mtls: cfg.default_mtls,
            ports,
        })
    }

    /// The config version this engine enforces.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The mTLS mode of a port.
    pub fn mtls(&self, port: u16) -> MtlsMode {
        self.ports
            .get(&port)
            .map_or(self.default_mtls, |p| p.cfg.mtls)
    }

    /// The compiled policy of a port, if a policy selects it.
    pub fn port(&self, port: u16) -> Option<&PortPolicy> {
        self.ports.get(&port).map(|p| &p.cfg)
    }

    /// Decides one request.
    pub fn decide<'e>(
        &'e self,
        req: &Request<'_>,
        quotas: &dyn QuotaStore,
        trace: &mut dyn Tracer,
    ) -> Decision<'e> {
        let mtls = self.mtls(req.port);
        let mut d = Decision {
            allowed: true,
            would_deny: false,
            reason: Reason::Allowed,
            status: 200,
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
        };
        let refuse = |d: &mut Decision<'e>, reason: Reason| {
            d.allowed = false;
            d.reason = reason;
            d.status = reason.status();
        };
        // Always refused, with or without a policy: these bypass method-based rules.
        if matches!(req.method, "TRACE" | "TRACK" | "CONNECT") {
            refuse(&mut d, Reason::MethodNotAllowed);
            return d;
        }
        if [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ]
        .iter()
        .any(|h| req.headers.contains(h))
            || req.query.is_some_and(has_method_override_param)
        {
            refuse(&mut d, Reason::MethodOverride);
            return d;
        }
        // Headers Symfony, Zend and IIS read as the path instead of the request line's:
        // the app would route a path the policy never saw.
        if PATH_OVERRIDE_HEADERS
            .iter()
            .any(|h| req.headers.contains(h))
        {
            refuse(&mut d, Reason::PathOverride);
            return d;
        }
        let path = match normalize(req.path) {
            Ok(p) => p,
            Err(e) => {
                if trace.enabled() {
                    trace.step(step("", "path", false, format!("{}: {e}", req.path)));
                }
                refuse(&mut d, Reason::InvalidPath);
                d.detail = Some(path_error_detail(e));
                return d;
            }
        };
        let Some(port) = self.ports.get(&req.port) else {
            d.reason = Reason::NoPolicy;
            if trace.enabled() {
                trace.step(step(
                    "",
                    "port",
                    false,
                    format!("no policy selects port {}: allowed", req.port),
                ));
            }
            d.path = path.into_string();
            return d;
        };
        if trace.enabled() && path.as_str() != req.path {
            trace.step(step(
                "",
                "path",
                true,
                format!("normalized {} to {}", req.path, path.as_str()),
            ));
        }
        let audit_port = port.cfg.mode == crate::config::Mode::Audit;
        let bit = method_bit(req.method);
        let mut matched: Vec<u32> = Vec::new();

        // Declared API.
        if port.cfg.api.declared {
            port.endpoints.matches(&path, &mut matched);
            let ep = matched
                .iter()
                .flat_map(|t| port.endpoint_of_template[*t as usize].iter())
                .map(|&i| &port.cfg.api.endpoints[i as usize])
                .filter(|e| e.method == req.method || (req.method == "HEAD" && e.method == "GET"))
                .min_by_key(|e| {
                    PathTemplate::parse(&e.path).map(|t| t.is_exact()).ok() != Some(true)
                });
            match ep {
                Some(ep) => {
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
                        refuse(&mut d, Reason::Sunset);
                        return d;
                    }
                }
                None => {
                    let undeclared = port.cfg.api.undeclared;
                    if trace.enabled() {
                        trace.step(step(
                            "",
                            "api",
                            false,
                            format!(
                                "{} {} is not a declared endpoint ({undeclared:?})",
                                req.method,
                                path.as_str()
                            ),
                        ));
                    }
                    match undeclared {
                        UndeclaredAction::Deny if !audit_port => {
                            refuse(&mut d, Reason::UndeclaredEndpoint);
                            return d;
                        }
                        UndeclaredAction::Deny | UndeclaredAction::Audit => {
                            d.would_deny = true;
                            d.reason = Reason::UndeclaredEndpoint;
                        }
                        UndeclaredAction::Allow => {}
                    }
                }
            }
            matched.clear();
        }

        // Which rules match the operation: only these are considered further, so the cost
        // follows the number of candidate rules, not the size of the policy.
        let tracing = trace.enabled();
        port.router.matches(&path, &mut matched);
        let mut candidates: Vec<(u32, u32)> = Vec::new(); // (rule, template or u32::MAX = any path)
        for &t in &matched {
            for &(i, j) in &port.template_ops[t as usize] {
                let op = &port.ops[i as usize][j as usize];
                if method_ok(op, bit) && headers_ok(op, req.headers) {
                    candidates.push((i, t));
                }
            }
        }
        for &(i, j) in &port.any_path_ops {
            if j == u16::MAX || {
                let op = &port.ops[i as usize][j as usize];
                method_ok(op, bit) && headers_ok(op, req.headers)
            } {
                candidates.push((i, u32::MAX));
            }
        }
        // Rule order decides which Allow rule is reported; keep the first template per rule.
        candidates.sort_unstable();
        candidates.dedup_by_key(|c| c.0);
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
            let from = self.caller_matches(port, i, req);
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
                if r.audit || audit_port {
                    d.would_deny = true;
                    d.reason = Reason::DeniedByRule;
                } else {
                    refuse(&mut d, Reason::DeniedByRule);
                    return d;
                }
            }
        }

        // Allow rules.
        let mut allowed_by: Option<usize> = None;
        let mut bind_failure: Option<(usize, String)> = None;
        let mut needs_identity = false;
        for &(i, t) in &candidates {
            let (i, r) = (i as usize, &port.cfg.rules[i as usize]);
            if r.action != Action::Allow {
                continue;
            }
            if !self.caller_matches(port, i, req) {
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
            match self.binding_failure(port, i, t, &path, req) {
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
                        d.would_deny = true;
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
                    if !r.audit || d.would_deny {
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
                if d.reason == Reason::Allowed && d.would_deny {
                    d.reason = Reason::BindingFailed;
                    d.detail = bind_failure.map(|(_, w)| w);
                }
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
                if audit_port {
                    d.would_deny = true;
                    d.reason = reason;
                } else {
                    refuse(&mut d, reason);
                    return d;
                }
            }
        }

        // Quotas: every matching quota counts; the tightest verdict is reported.
        if !port.cfg.quotas.is_empty() {
            self.apply_quotas(port, req, &path, quotas, trace, &mut d, audit_port);
        }
        if d.template.is_none() {
            d.template = matched.first().map(|&t| port.router.template(t).as_str());
        }
        d.path = path.into_string();
        d
    }

    fn caller_matches(&self, port: &PortEngine, rule: usize, req: &Request<'_>) -> bool {
        let r = &port.cfg.rules[rule];
        if r.from.is_empty() {
            return true;
        }
        let id = &req.identity;
        r.from.iter().zip(&port.sources[rule]).any(|(s, c)| {
            if s.unauthenticated && !id.is_anonymous() {
                return false;
            }
            if !c.principals.is_empty()
                && !id.peer.is_some_and(|p| c.principals.iter().any(|x| x == p))
            {
                return false;
            }
            if !c.namespaces.is_empty() {
                let ns = id
                    .peer
                    .and_then(|p| spiffe_namespace(p, &self.trust_domain));
                if !ns.is_some_and(|n| c.namespaces.iter().any(|x| x == n)) {
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
            if !c.ip_blocks.is_empty() && !c.ip_blocks.iter().any(|b| b.contains(req.source_ip)) {
                return false;
            }
            true
        })
    }

    fn binding_failure(
        &self,
        port: &PortEngine,
        rule: usize,
        template: u32,
        path: &NormalizedPath,
        req: &Request<'_>,
    ) -> Option<String> {
        let r = &port.cfg.rules[rule];
        for b in &r.bind {
            let claim = req
                .identity
                .jwt
                .and_then(|j| claim_str(j.claims.get(&b.claim)));
            let (what, value): (String, Option<std::borrow::Cow<'_, str>>) = match &b.source {
                BindSource::PathParam(p) => (
                    format!("path parameter {{{p}}}"),
                    (template != u32::MAX)
                        .then(|| capture(port.router.template(template), path, p))
                        .flatten()
                        .map(Into::into),
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

    #[allow(clippy::too_many_arguments)]
    fn apply_quotas<'e>(
        &'e self,
        port: &'e PortEngine,
        req: &Request<'_>,
        path: &NormalizedPath,
        store: &dyn QuotaStore,
        trace: &mut dyn Tracer,
        d: &mut Decision<'e>,
        audit_port: bool,
    ) {
        let bit = method_bit(req.method);
        let mut applies = vec![false; port.cfg.quotas.len()];
        let mut matched = Vec::new();
        port.quota_router.matches(path, &mut matched);
        for t in matched {
            for &(i, j) in &port.quota_template_ops[t as usize] {
                let op = &port.quota_ops[i as usize][j as usize];
                applies[i as usize] |= method_ok(op, bit) && headers_ok(op, req.headers);
            }
        }
        for (i, ops) in port.quota_ops.iter().enumerate() {
            applies[i] |= ops.is_empty()
                || ops
                    .iter()
                    .any(|op| op.any_path && method_ok(op, bit) && headers_ok(op, req.headers));
        }
        for (i, q) in port.cfg.quotas.iter().enumerate() {
            if !applies[i] {
                continue;
            }
            let key = match &q.key {
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
            };
            let Some(key) = key else {
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
            if !merge_quota(d, q, key, v, q.audit || audit_port) {
                return;
            }
        }
    }

    /// Applies the verdict for a [`PendingQuota`] of `d` (asked of the store by the caller).
    /// Returns false if the quota refused the request (then `d` says so).
    pub fn settle_quota<'e>(
        &'e self,
        d: &mut Decision<'e>,
        pending: PendingQuota,
        verdict: QuotaVerdict,
    ) -> bool {
        let Some(q) = self
            .ports
            .get(&pending.port)
            .and_then(|p| p.cfg.quotas.get(pending.index))
        else {
            return true;
        };
        merge_quota(d, q, pending.key, verdict, pending.audit)
    }

    /// The quota a [`PendingQuota`] refers to.
    pub fn quota(&self, pending: &PendingQuota) -> Option<&QuotaConfig> {
        self.ports
            .get(&pending.port)
            .and_then(|p| p.cfg.quotas.get(pending.index))
    }
}

/// Folds one quota verdict into a decision: the tightest verdict is reported; a refusal
/// refuses (or, in Audit, is a would-deny). Returns false once the request is refused.
fn merge_quota<'e>(
    d: &mut Decision<'e>,
    q: &'e QuotaConfig,
    key: String,
    v: QuotaVerdict,
    audit: bool,
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
        window_seconds: (q.period_ms / 1000).max(1),
    };
    if !v.allowed {
        d.quota = Some(outcome);
        if audit {
            d.would_deny = true;
            d.reason = Reason::QuotaExceeded;
            return true;
        }
        d.allowed = false;
        d.reason = Reason::QuotaExceeded;
        d.status = 429;
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

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "Allow",
        Action::Deny => "Deny",
    }
}

fn yes(b: bool) -> &'static str {
    if b { "matches" } else { "does not match" }
}

fn step(policy: &str, name: &str, matched: bool, why: String) -> TraceStep {
    TraceStep {
        policy: policy.to_owned(),
        name: name.to_owned(),
        matched,
        why,
    }
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

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<name>` → (trust domain, namespace, name);
/// `None` for any other shape.
pub fn spiffe_parts(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
            if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
        {
            Some((td, ns, sa))
        }
        _ => None,
    }
}

/// The namespace of a SPIFFE ID of `trust_domain`: `None` for an ID of another trust
/// domain or of another shape.
fn spiffe_namespace<'a>(id: &'a str, trust_domain: &str) -> Option<&'a str> {
    spiffe_parts(id).and_then(|(td, ns, _)| (td == trust_domain).then_some(ns))
}

fn describe_identity(id: &Identity<'_>) -> String {
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

fn path_error_detail(e: PathError) -> String {
    e.to_string()
}
