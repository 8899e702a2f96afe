//! The facts a decision is made on: the request as the sidecar saw it and who is calling,
//! established (verified) before the engine runs; and the pure helpers that read them.

use std::borrow::Cow;
use std::net::IpAddr;

use serde_json::Value;

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
    /// Whether any of these (lower-case) headers appears. A header map implements it as one
    /// pass over the request's header names instead of one hashed lookup per name.
    fn contains_any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.contains(n))
    }
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
pub fn claim_str(value: Option<&Value>) -> Option<Cow<'_, str>> {
    match value? {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(b.to_string().into()),
        _ => None,
    }
}

pub(crate) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
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
pub(crate) fn spiffe_namespace<'a>(id: &'a str, trust_domain: &str) -> Option<&'a str> {
    spiffe_parts(id).and_then(|(td, ns, _)| (td == trust_domain).then_some(ns))
}
