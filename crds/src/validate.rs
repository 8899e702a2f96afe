//! Every rule an `ApiPolicy` spec must satisfy, each failure with its field path.
//!
//! This repeats the CRD schema's bounds and CEL rules (so files checked offline by
//! `apiward check` get the same answers as `kubectl apply`) and adds what CEL cannot
//! express: path-template and duration syntax, CIDRs, URL schemes, JWKS documents,
//! JSON pointers and RFC 3339 dates. Paths use kube-cel's format: `spec.rules[0].bind`.

use std::collections::BTreeSet;
use std::fmt;

use apiward_policy::{duration::parse_duration, template::PathTemplate, time::parse_rfc3339};

use crate::spec::*;

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct FieldError {
    /// Where, e.g. `spec.rules[2].to[0].paths[1]`.
    pub field: String,
    /// What is wrong and, where useful, how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Longest JWT clock skew accepted.
const MAX_CLOCK_SKEW_SECS: u64 = 300;

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn name(&mut self, field: &str, name: &str) {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            self.push(
                field,
                format!("{name:?} is not a valid name: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit"),
            );
        }
    }

    fn header(&mut self, field: &str, name: &str) {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+.^_`|~-".contains(&b)
            });
        if !valid {
            self.push(
                field,
                format!("{name:?} is not a valid header name (lower-case token characters only)"),
            );
        }
    }

    fn duration(&mut self, field: &str, value: &str) -> Option<std::time::Duration> {
        match parse_duration(value) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(field, e.to_string());
                None
            }
        }
    }

    fn unique<'a>(&mut self, field: &str, what: &str, names: impl Iterator<Item = &'a str>) {
        let mut seen = BTreeSet::new();
        for (i, n) in names.enumerate() {
            if !seen.insert(n) {
                self.push(format!("{field}[{i}]"), format!("duplicate {what} {n:?}"));
            }
        }
    }
}

/// Checks a spec. Returns every problem found (empty when valid), sorted by field.
pub fn validate(spec: &ApiPolicySpec) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    target_ref(&mut e, &spec.target_ref);
    let authn = spec.authentication.clone().unwrap_or_default();
    authentication(&mut e, &authn);
    if let Some(api) = &spec.api {
        api_surface(&mut e, api);
    }
    e.unique(
        "spec.rules",
        "rule name",
        spec.rules.iter().map(|r| r.name.as_str()),
    );
    for (i, r) in spec.rules.iter().enumerate() {
        rule(&mut e, &format!("spec.rules[{i}]"), r, &authn);
    }
    e.unique(
        "spec.quotas",
        "quota name",
        spec.quotas.iter().map(|q| q.name.as_str()),
    );
    for (i, q) in spec.quotas.iter().enumerate() {
        quota(&mut e, &format!("spec.quotas[{i}]"), q, &authn);
    }
    if let Some(l) = &spec.request_limits {
        request_limits(&mut e, l);
    }
    if let Some(f) = &spec.response_filter {
        response_filter(&mut e, f);
    }
    if let Some(eg) = &spec.egress {
        egress(&mut e, eg);
    }
    let mut errors = e.0;
    errors.sort();
    errors.dedup();
    errors
}

fn target_ref(e: &mut Errors, t: &TargetRef) {
    let mut seen = BTreeSet::new();
    for (i, p) in t.ports.iter().enumerate() {
        if *p == 0 {
            e.push(
                format!("spec.targetRef.ports[{i}]"),
                "port must be between 1 and 65535",
            );
        }
        if !seen.insert(p) {
            e.push(
                format!("spec.targetRef.ports[{i}]"),
                format!("duplicate port {p}"),
            );
        }
    }
    for (i, req) in t.selector.match_expressions.iter().flatten().enumerate() {
        let f = format!("spec.targetRef.selector.matchExpressions[{i}]");
        let values = req.values.as_ref().map_or(0, Vec::len);
        match req.operator.as_str() {
            "In" | "NotIn" if values == 0 => {
                e.push(f, format!("operator {} needs values", req.operator))
            }
            "Exists" | "DoesNotExist" if values > 0 => {
                e.push(f, format!("operator {} takes no values", req.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => e.push(
                format!("{f}.operator"),
                format!("unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

fn authentication(e: &mut Errors, a: &Authentication) {
    e.unique(
        "spec.authentication.jwt",
        "JWT provider name",
        a.jwt.iter().map(|p| p.name.as_str()),
    );
    for (i, p) in a.jwt.iter().enumerate() {
        let f = format!("spec.authentication.jwt[{i}]");
        e.name(&format!("{f}.name"), &p.name);
        if p.issuer.is_empty() {
            e.push(format!("{f}.issuer"), "issuer must not be empty");
        }
        let sources = usize::from(p.jwks_uri.is_some())
            + usize::from(p.jwks_secret_ref.is_some())
            + usize::from(p.jwks.is_some());
        if sources != 1 {
            e.push(
                f.clone(),
                "exactly one of jwksUri, jwksSecretRef or jwks must be set",
            );
        }
        if let Some(uri) = &p.jwks_uri {
            jwks_uri(e, &format!("{f}.jwksUri"), uri);
        }
        if let Some(doc) = &p.jwks
            && let Err(msg) = check_jwks_document(doc)
        {
            e.push(format!("{f}.jwks"), msg);
        }
        for (j, aud) in p.audiences.iter().enumerate() {
            if aud.is_empty() {
                e.push(format!("{f}.audiences[{j}]"), "audience must not be empty");
            }
        }
        if let Some(skew) = &p.clock_skew
            && let Some(d) = e.duration(&format!("{f}.clockSkew"), skew)
            && d.as_secs() > MAX_CLOCK_SKEW_SECS
        {
            e.push(format!("{f}.clockSkew"), "clock skew must be at most 5m");
        }
        for (claim, header) in &p.forward_claims {
            e.header(&format!("{f}.forwardClaims.{claim}"), header);
        }
        if let Some(h) = &p.header {
            e.header(&format!("{f}.header"), h);
        }
    }
    e.unique(
        "spec.authentication.apiKeys",
        "API-key provider name",
        a.api_keys.iter().map(|p| p.name.as_str()),
    );
    for (i, p) in a.api_keys.iter().enumerate() {
        let f = format!("spec.authentication.apiKeys[{i}]");
        e.name(&format!("{f}.name"), &p.name);
        if p.header.is_some() && p.query.is_some() {
            e.push(f.clone(), "set header or query, not both");
        }
        if let Some(h) = &p.header {
            e.header(&format!("{f}.header"), h);
        }
        if p.secret_ref.name.is_empty() {
            e.push(
                format!("{f}.secretRef.name"),
                "Secret name must not be empty",
            );
        }
    }
}

fn jwks_uri(e: &mut Errors, f: &str, uri: &str) {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"));
    match rest {
        None => e.push(f, format!("{uri:?} must be an https:// URL")),
        Some(rest) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            if host.is_empty() || host.contains('@') || host.contains(' ') {
                e.push(f, format!("{uri:?} has no valid host"));
            }
            if uri.contains('#') {
                e.push(f, format!("{uri:?} must not contain a fragment"));
            }
        }
    }
}

/// Checks that a string is a JWKS document: JSON with a non-empty `keys` array whose
/// entries have a `kty`. (The sidecar checks each key's parameters when it loads them.)
pub(crate) fn check_jwks_document(doc: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(doc)
        .map_err(|err| format!("not a JWKS document: invalid JSON: {err}"))?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS document: it needs a \"keys\" array")?;
    if keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    for (i, k) in keys.iter().enumerate() {
        match k.get("kty").and_then(|t| t.as_str()) {
            Some("RSA" | "EC" | "OKP") => {}
            Some("oct") => {
                return Err(format!(
                    "keys[{i}] is a symmetric (oct) key: HMAC is never accepted"
                ));
            }
            Some(other) => return Err(format!("keys[{i}] has unsupported kty {other:?}")),
            None => return Err(format!("keys[{i}] has no kty")),
        }
        if k.get("d").is_some() {
            return Err(format!(
                "keys[{i}] contains a private key (\"d\"): publish only public keys"
            ));
        }
    }
    Ok(())
}

fn api_surface(e: &mut Errors, api: &ApiSurface) {
    let mut seen = BTreeSet::new();
    for (i, ep) in api.endpoints.iter().enumerate() {
        let f = format!("spec.api.endpoints[{i}]");
        if let Err(err) = PathTemplate::parse(&ep.path) {
            e.push(format!("{f}.path"), err.to_string());
        }
        if !seen.insert((ep.method, ep.path.as_str())) {
            e.push(
                f.clone(),
                format!("duplicate endpoint {} {}", ep.method.as_str(), ep.path),
            );
        }
        if let Some(s) = &ep.sunset {
            if parse_rfc3339(s).is_none() {
                e.push(
                    format!("{f}.sunset"),
                    format!("{s:?} is not an RFC 3339 date-time (e.g. 2027-01-31T00:00:00Z)"),
                );
            }
            if !ep.deprecated {
                e.push(
                    format!("{f}.sunset"),
                    "an endpoint with a sunset date must be deprecated",
                );
            }
        }
    }
    if let Some(r) = &api.openapi_ref
        && (r.config_map_ref.name.is_empty() || r.config_map_ref.key.is_empty())
    {
        e.push(
            "spec.api.openapiRef.configMapRef",
            "name and key must not be empty",
        );
    }
}

fn rule(e: &mut Errors, f: &str, r: &AccessRule, authn: &Authentication) {
    e.name(&format!("{f}.name"), &r.name);
    for (i, s) in r.from.iter().enumerate() {
        source(e, &format!("{f}.from[{i}]"), s, authn);
    }
    let mut templates = Vec::new();
    for (i, op) in r.to.iter().enumerate() {
        templates.push(operation(e, &format!("{f}.to[{i}]"), op));
    }
    for (i, b) in r.bind.iter().enumerate() {
        let bf = format!("{f}.bind[{i}]");
        let set = usize::from(b.path_param.is_some())
            + usize::from(b.query_param.is_some())
            + usize::from(b.header.is_some());
        if set != 1 {
            e.push(
                bf.clone(),
                "exactly one of pathParam, queryParam or header must be set",
            );
        }
        if b.claim.is_empty() {
            e.push(format!("{bf}.claim"), "claim must not be empty");
        }
        if let Some(h) = &b.header {
            e.header(&format!("{bf}.header"), h);
        }
        if let Some(param) = &b.path_param {
            let every_path_has_it = !r.to.is_empty()
                && r.to.iter().all(|t| {
                    !t.paths.is_empty()
                        && t.paths.iter().all(|p| p.contains(&format!("{{{param}}}")))
                });
            if !every_path_has_it {
                e.push(
                    format!("{f}.bind"),
                    "every path of a rule must contain each bound {pathParam}",
                );
                continue;
            }
            // The textual check above is what CEL sees; the parsed check catches `{x}` in a glob.
            for ts in templates.iter().flatten() {
                if !ts.params().any(|p| p == param) {
                    e.push(
                        format!("{f}.bind"),
                        format!("path {} has no parameter {{{param}}}", ts.as_str()),
                    );
                }
            }
        }
    }
    if !r.bind.is_empty() {
        if r.from.is_empty() || r.from.iter().any(|s| s.jwt.is_none()) {
            e.push(
                format!("{f}.bind"),
                "a rule with bind needs every from entry to require a JWT (claims come from verified tokens)",
            );
        }
        if r.action != Action::Allow {
            e.push(format!("{f}.bind"), "bind applies to Allow rules only");
        }
    }
}

fn source(e: &mut Errors, f: &str, s: &Source, authn: &Authentication) {
    let has_identity = !s.service_accounts.is_empty()
        || !s.namespaces.is_empty()
        || !s.identities.is_empty()
        || s.jwt.is_some()
        || !s.api_keys.is_empty();
    if !has_identity && s.ip_blocks.is_empty() && !s.unauthenticated {
        e.push(f, "a from entry must name at least one kind of caller");
    }
    if s.unauthenticated && has_identity {
        e.push(
            format!("{f}.unauthenticated"),
            "unauthenticated cannot be combined with identities, JWTs or API keys",
        );
    }
    for (i, sa) in s.service_accounts.iter().enumerate() {
        let valid = sa.split_once('/').is_some_and(|(ns, name)| {
            let ok = |x: &str| {
                !x.is_empty()
                    && x.len() <= 253
                    && x.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    })
            };
            ok(ns) && ok(name) && !ns.contains('.')
        });
        if !valid {
            e.push(
                format!("{f}.serviceAccounts[{i}]"),
                format!("{sa:?} must be namespace/serviceaccount, e.g. shop/checkout"),
            );
        }
    }
    for (i, ns) in s.namespaces.iter().enumerate() {
        e.name(&format!("{f}.namespaces[{i}]"), ns);
    }
    for (i, id) in s.identities.iter().enumerate() {
        let ok = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .is_some_and(|(td, path)| {
                !td.is_empty() && !path.is_empty() && !id.contains(['?', '#', ' '])
            });
        if !ok {
            e.push(
                format!("{f}.identities[{i}]"),
                format!("{id:?} is not a SPIFFE ID (spiffe://trust-domain/path)"),
            );
        }
    }
    if let Some(j) = &s.jwt
        && !authn.jwt.iter().any(|p| p.name == j.provider)
    {
        e.push(
            format!("{f}.jwt.provider"),
            format!(
                "{:?} is not an entry of spec.authentication.jwt",
                j.provider
            ),
        );
    }
    for (i, k) in s.api_keys.iter().enumerate() {
        let provider = k.split_once('#').map_or(k.as_str(), |(p, _)| p);
        if !authn.api_keys.iter().any(|p| p.name == provider) {
            e.push(
                format!("{f}.apiKeys[{i}]"),
                format!("{provider:?} is not an entry of spec.authentication.apiKeys"),
            );
        }
    }
    for (i, c) in s.ip_blocks.iter().enumerate() {
        if c.parse::<ipnet::IpNet>().is_err() {
            e.push(
                format!("{f}.ipBlocks[{i}]"),
                format!("{c:?} is not a CIDR block (e.g. 10.0.0.0/8)"),
            );
        }
    }
}

fn operation(e: &mut Errors, f: &str, op: &Operation) -> Vec<PathTemplate> {
    let mut out = Vec::new();
    for (i, p) in op.paths.iter().enumerate() {
        match PathTemplate::parse(p) {
            Ok(t) => out.push(t),
            Err(err) => e.push(format!("{f}.paths[{i}]"), err.to_string()),
        }
    }
    let mut seen = BTreeSet::new();
    for (i, m) in op.methods.iter().enumerate() {
        if !seen.insert(m) {
            e.push(
                format!("{f}.methods[{i}]"),
                format!("duplicate method {}", m.as_str()),
            );
        }
    }
    for (i, h) in op.headers.iter().enumerate() {
        e.header(&format!("{f}.headers[{i}].name"), &h.name);
    }
    out
}

fn quota(e: &mut Errors, f: &str, q: &Quota, authn: &Authentication) {
    e.name(&format!("{f}.name"), &q.name);
    if let Some(m) = &q.matches {
        operation(e, &format!("{f}.match"), m);
    }
    let k = &q.key;
    let set = usize::from(k.principal)
        + usize::from(k.claim.is_some())
        + usize::from(k.api_key.is_some())
        + usize::from(k.header.is_some())
        + usize::from(k.source_ip);
    if set != 1 {
        e.push(
            format!("{f}.key"),
            "set exactly one of principal: true, claim, apiKey, header or sourceIP: true",
        );
    }
    if let Some(p) = &k.api_key
        && !authn.api_keys.iter().any(|a| &a.name == p)
    {
        e.push(
            format!("{f}.key.apiKey"),
            format!("{p:?} is not an entry of spec.authentication.apiKeys"),
        );
    }
    if let Some(h) = &k.header {
        e.header(&format!("{f}.key.header"), h);
    }
    if k.claim.as_deref() == Some("") {
        e.push(format!("{f}.key.claim"), "claim must not be empty");
    }
    let l = &q.limit;
    if l.requests == 0 {
        e.push(format!("{f}.limit.requests"), "requests must be at least 1");
    }
    match l.window {
        Window::Calendar => {
            if !["1s", "1m", "1h", "1d", "24h", "1mo"].contains(&l.per.as_str()) {
                e.push(
                    format!("{f}.limit.per"),
                    "a Calendar window's per must be one of 1s, 1m, 1h, 1d, 1mo",
                );
            }
            if l.burst.is_some_and(|b| b > 0) {
                e.push(
                    format!("{f}.limit.burst"),
                    "burst applies only to Rolling windows",
                );
            }
        }
        Window::Rolling => {
            if l.per == "1mo" {
                e.push(format!("{f}.limit.per"), "per: 1mo needs window: Calendar");
            } else if let Some(d) = e.duration(&format!("{f}.limit.per"), &l.per)
                && d.is_zero()
            {
                e.push(format!("{f}.limit.per"), "per must be longer than 0s");
            }
        }
    }
    match (q.on_exceed, &q.max_delay) {
        (OnExceed::Delay, None) => {
            e.push(format!("{f}.maxDelay"), "onExceed: Delay needs maxDelay")
        }
        (OnExceed::Reject, Some(_)) => e.push(
            format!("{f}.maxDelay"),
            "maxDelay applies only with onExceed: Delay",
        ),
        (OnExceed::Delay, Some(d)) => {
            if let Some(d) = e.duration(&format!("{f}.maxDelay"), d)
                && d.as_secs() > 60
            {
                e.push(
                    format!("{f}.maxDelay"),
                    "maxDelay must be at most 60s: longer waits hold connections open",
                );
            }
        }
        (OnExceed::Reject, None) => {}
    }
    if q.scope != QuotaScope::Global {
        if q.on_store_error.is_some() {
            e.push(
                format!("{f}.onStoreError"),
                "onStoreError applies only to scope: Global",
            );
        }
        if q.critical {
            e.push(
                format!("{f}.critical"),
                "critical applies only to scope: Global",
            );
        }
    }
}

fn request_limits(e: &mut Errors, l: &RequestLimits) {
    if let Some(t) = &l.timeout
        && let Some(d) = e.duration("spec.requestLimits.timeout", t)
        && d.is_zero()
    {
        e.push(
            "spec.requestLimits.timeout",
            "timeout must be longer than 0s",
        );
    }
    if l.max_json_depth == Some(0) {
        e.push(
            "spec.requestLimits.maxJsonDepth",
            "maxJsonDepth must be at least 1",
        );
    }
    if let Some(h) = l.max_header_bytes
        && !(256..=1_048_576).contains(&h)
    {
        e.push(
            "spec.requestLimits.maxHeaderBytes",
            "maxHeaderBytes must be between 256 and 1048576",
        );
    }
    for (i, ct) in l.content_types.iter().enumerate() {
        let ok = ct.split_once('/').is_some_and(|(t, s)| {
            let tok = |x: &str, star: bool| {
                !x.is_empty()
                    && x.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || b"!#$&^_.+-".contains(&b)
                            || (star && b == b'*')
                    })
            };
            tok(t, false) && tok(s, true)
        });
        if !ok {
            e.push(
                format!("spec.requestLimits.contentTypes[{i}]"),
                format!("{ct:?} is not a lower-case media type like application/json"),
            );
        }
    }
}

fn response_filter(e: &mut Errors, r: &ResponseFilter) {
    for (i, p) in r.remove_fields.iter().enumerate() {
        if let Err(msg) = check_json_pointer(p) {
            e.push(format!("spec.responseFilter.removeFields[{i}]"), msg);
        }
    }
    for (i, h) in r.remove_headers.iter().enumerate() {
        e.header(&format!("spec.responseFilter.removeHeaders[{i}]"), h);
    }
}

/// RFC 6901 syntax: `/`-separated tokens where `~` appears only as `~0` or `~1`.
fn check_json_pointer(p: &str) -> Result<(), String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!(
            "{p:?} is not a JSON pointer: it must start with '/'"
        ));
    };
    let tokens: Vec<&str> = rest.split('/').collect();
    if tokens.last() == Some(&"**") {
        return Err(format!(
            "{p:?}: '**' must be followed by the field to remove (e.g. /**/password)"
        ));
    }
    for token in tokens {
        if token == "-" {
            return Err(format!(
                "{p:?}: '-' (past the end of an array) names nothing to remove"
            ));
        }
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!("{p:?}: '~' must be written ~0 (and '/' as ~1)"));
            }
        }
    }
    Ok(())
}

fn egress(e: &mut Errors, eg: &Egress) {
    for (i, r) in eg.allow.iter().enumerate() {
        let f = format!("spec.egress.allow[{i}]");
        if r.hosts.is_empty() && r.cidrs.is_empty() {
            e.push(f.clone(), "an egress rule needs hosts or cidrs");
        }
        for (j, h) in r.hosts.iter().enumerate() {
            let name = h.strip_prefix("*.").unwrap_or(h);
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !ok {
                e.push(
                    format!("{f}.hosts[{j}]"),
                    format!("{h:?} is not a lower-case DNS name (a leading '*.' is allowed)"),
                );
            }
        }
        for (j, c) in r.cidrs.iter().enumerate() {
            if c.parse::<ipnet::IpNet>().is_err() {
                e.push(
                    format!("{f}.cidrs[{j}]"),
                    format!("{c:?} is not a CIDR block (e.g. 203.0.113.0/24)"),
                );
            }
        }
        for (j, p) in r.ports.iter().enumerate() {
            if *p == 0 {
                e.push(
                    format!("{f}.ports[{j}]"),
                    "port must be between 1 and 65535",
                );
            }
        }
    }
}
