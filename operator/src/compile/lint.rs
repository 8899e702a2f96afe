//! Lints: valid policies that are probably not what their authors meant — the security
//! misconfigurations users actually ship (OWASP API8, API9). Each has a stable code, a
//! severity and a one-line fix. `apiward check --strict` fails on any of them.

use apiward_crds::{AccessRule, Action, ApiPolicy, Method, Mode, MtlsMode, Operation};
use apiward_policy::normalize::normalize;
use apiward_policy::router::Router;
use apiward_policy::template::{PathTemplate, Segment};

/// One lint finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lint {
    /// Stable code, `AW0nn`.
    pub code: &'static str,
    /// Field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: &'static str,
}

const WRITES: [Method; 4] = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

fn open_to_anyone(r: &AccessRule) -> bool {
    r.from.is_empty()
        || r.from
            .iter()
            .any(|s| s.unauthenticated || (!has_identity(s) && !s.ip_blocks.is_empty()))
}

fn has_identity(s: &apiward_crds::Source) -> bool {
    !s.service_accounts.is_empty()
        || !s.namespaces.is_empty()
        || !s.identities.is_empty()
        || s.jwt.is_some()
        || !s.api_keys.is_empty()
}

fn allows_writes(r: &AccessRule) -> bool {
    r.to.is_empty()
        || r.to
            .iter()
            .any(|o| o.methods.is_empty() || o.methods.iter().any(|m| WRITES.contains(m)))
}

fn covers_everything(o: &Operation) -> bool {
    o.paths.is_empty() || o.paths.iter().any(|p| p == "/**")
}

/// A concrete path a template describes (`{id}` → `x1`, `*` → `x`, `**` → nothing).
fn sample_path(t: &PathTemplate) -> String {
    let mut out = String::new();
    for s in t.segments() {
        match s {
            Segment::Literal(l) => {
                out.push('/');
                out.push_str(l);
            }
            Segment::Param(_) => out.push_str("/x1"),
            Segment::Glob(parts) => {
                out.push('/');
                out.push_str(&parts.join("x"));
            }
            Segment::Tail => {}
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

fn op_matches(o: &Operation, method: &str, path: &str) -> bool {
    if !o.methods.is_empty() && !o.methods.iter().any(|m| m.as_str() == method) {
        return false;
    }
    if o.paths.is_empty() {
        return true;
    }
    let Ok(np) = normalize(path) else {
        return false;
    };
    let mut r = Router::default();
    for p in &o.paths {
        if let Ok(t) = PathTemplate::parse(p) {
            r.insert(t);
        }
    }
    let mut hits = Vec::new();
    r.matches(&np, &mut hits);
    !hits.is_empty()
}

/// Does `outer` match every request `inner` matches (conservatively)?
fn op_covers(outer: &Operation, inner: &Operation) -> bool {
    let methods_ok = outer.methods.is_empty()
        || (!inner.methods.is_empty() && inner.methods.iter().all(|m| outer.methods.contains(m)));
    let paths_ok = outer.paths.is_empty()
        || outer.paths.iter().any(|p| p == "/**")
        || (!inner.paths.is_empty() && inner.paths.iter().all(|p| outer.paths.contains(p)));
    methods_ok && paths_ok && outer.headers.is_empty()
}

/// Lints one (valid) policy.
pub fn lint(p: &ApiPolicy) -> Vec<Lint> {
    let spec = &p.spec;
    let mut out = Vec::new();
    let mut push = |code, field: String, message: String, fix| {
        out.push(Lint {
            code,
            field,
            message,
            fix,
        })
    };
    match spec.mtls {
        MtlsMode::Strict => {}
        m => push(
            "AW001",
            "spec.mtls".into(),
            format!(
                "mtls is {m:?}: callers outside the mesh reach the workload without a verified identity"
            ),
            "set mtls: Strict once every caller is in the mesh",
        ),
    }
    if spec.mode == Mode::Audit {
        push(
            "AW002",
            "spec.mode".into(),
            "the policy is in Audit mode: nothing it decides is enforced".into(),
            "switch to mode: Enforce once the would-deny counters are clean",
        );
    }
    for (i, r) in spec.rules.iter().enumerate() {
        if r.action != Action::Allow {
            continue;
        }
        let f = format!("spec.rules[{i}]");
        if open_to_anyone(r) && allows_writes(r) {
            push(
                "AW003",
                f.clone(),
                format!(
                    "rule {} lets unauthenticated callers write (POST/PUT/PATCH/DELETE)",
                    r.name
                ),
                "require a JWT, an API key or a service account for writes",
            );
        }
        if r.from.is_empty() && (r.to.is_empty() || r.to.iter().any(covers_everything)) {
            push(
                "AW004",
                f.clone(),
                format!("rule {} allows every caller on every path", r.name),
                "name the callers in from and the endpoints in to (least privilege)",
            );
        }
        if open_to_anyone(r) {
            let quota_covers = spec.quotas.iter().any(|q| match &q.matches {
                None => true,
                Some(m) => r.to.iter().all(|o| {
                    o.paths.iter().all(|path| {
                        m.paths.is_empty()
                            || m.paths.contains(path)
                            || m.paths.iter().any(|mp| {
                                mp.ends_with("/**") && path.starts_with(mp.trim_end_matches("**"))
                            })
                    })
                }),
            });
            if !quota_covers {
                push(
                    "AW005",
                    f.clone(),
                    format!(
                        "rule {} serves unauthenticated callers with no quota",
                        r.name
                    ),
                    "add a quota keyed by sourceIP for these endpoints",
                );
            }
        }
        // Unreachable: an earlier-or-later Deny for every caller covers all its operations
        // (deny wins), or an earlier Allow is identical.
        let denied = spec.rules.iter().any(|d| {
            d.action == Action::Deny
                && d.mode != Some(Mode::Audit)
                && d.from.is_empty()
                && (d.to.is_empty()
                    || (!r.to.is_empty()
                        && r.to
                            .iter()
                            .all(|ro| d.to.iter().any(|dop| op_covers(dop, ro)))))
        });
        if denied {
            push(
                "AW006",
                f.clone(),
                format!(
                    "rule {} can never allow anything: a Deny rule for every caller covers all its operations",
                    r.name
                ),
                "remove the rule or narrow the Deny rule",
            );
        } else if let Some(j) = spec.rules[..i].iter().position(|e| {
            e.action == Action::Allow && e.from == r.from && e.to == r.to && e.bind == r.bind
        }) {
            push(
                "AW006",
                f.clone(),
                format!(
                    "rule {} repeats rule {} and is never the one that decides",
                    r.name, spec.rules[j].name
                ),
                "remove the duplicate rule",
            );
        }
    }
    if let Some(auth) = &spec.authentication {
        for (i, j) in auth.jwt.iter().enumerate() {
            if j.audiences.is_empty() {
                push(
                    "AW007",
                    format!("spec.authentication.jwt[{i}].audiences"),
                    format!(
                        "JWT provider {} checks no audience: tokens minted for any other service are accepted",
                        j.name
                    ),
                    "list the audiences this API accepts",
                );
            }
            if j.jwks_uri
                .as_deref()
                .is_some_and(|u| u.starts_with("http://"))
            {
                push(
                    "AW008",
                    format!("spec.authentication.jwt[{i}].jwksUri"),
                    format!(
                        "JWT provider {} fetches its keys over plain HTTP: anyone on the path can forge tokens",
                        j.name
                    ),
                    "use an https:// JWKS URL",
                );
            }
        }
    }
    if let Some(api) = &spec.api {
        for (i, e) in api.endpoints.iter().enumerate() {
            let Ok(t) = PathTemplate::parse(&e.path) else {
                continue;
            };
            let path = sample_path(&t);
            let allowed = spec.rules.iter().any(|r| {
                r.action == Action::Allow
                    && (r.to.is_empty()
                        || r.to.iter().any(|o| op_matches(o, e.method.as_str(), &path)))
            });
            if !allowed {
                push(
                    "AW009",
                    format!("spec.api.endpoints[{i}]"),
                    format!(
                        "declared endpoint {} {} is allowed by no rule: every call to it is denied",
                        e.method.as_str(),
                        e.path
                    ),
                    "add an Allow rule for it, or remove it from the declared API",
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> ApiPolicy {
        let p: ApiPolicy = serde_norway::from_str(&format!(
            "apiVersion: apiward.io/v1alpha1\nkind: ApiPolicy\nmetadata: {{name: t, namespace: shop}}\nspec:\n  targetRef: {{selector: {{matchLabels: {{app: x}}}}}}\n{yaml}"
        ))
        .unwrap();
        assert!(
            apiward_crds::validate(&p.spec).is_empty(),
            "{:?}",
            apiward_crds::validate(&p.spec)
        );
        p
    }

    fn codes(p: &ApiPolicy) -> Vec<&'static str> {
        lint(p).into_iter().map(|l| l.code).collect()
    }

    #[test]
    fn each_lint_fires_on_its_misconfiguration() {
        assert_eq!(codes(&policy("  mtls: Permissive\n")), ["AW001"]);
        assert_eq!(codes(&policy("  mode: Audit\n")), ["AW002"]);
        let open_write = policy(
            "  rules:\n    - {name: w, from: [{unauthenticated: true}], to: [{methods: [POST], paths: [/orders]}]}\n  quotas:\n    - {name: q, key: {sourceIP: true}, limit: {requests: 5, per: 1m}}\n",
        );
        assert_eq!(codes(&open_write), ["AW003"]);
        let everything = policy(
            "  rules:\n    - {name: all, to: [{methods: [GET], paths: [/**]}]}\n  quotas:\n    - {name: q, key: {sourceIP: true}, limit: {requests: 5, per: 1m}}\n",
        );
        assert_eq!(codes(&everything), ["AW004"]);
        let no_quota = policy(
            "  rules:\n    - {name: r, from: [{unauthenticated: true}], to: [{methods: [GET], paths: [/products]}]}\n",
        );
        assert_eq!(codes(&no_quota), ["AW005"]);
        let shadowed = policy(
            "  rules:\n    - {name: a, from: [{namespaces: [shop]}], to: [{methods: [GET], paths: [/admin]}]}\n    - {name: d, action: Deny, to: [{paths: [/admin]}]}\n",
        );
        assert_eq!(codes(&shadowed), ["AW006"]);
        let dup = policy(
            "  rules:\n    - {name: a, from: [{namespaces: [shop]}], to: [{methods: [GET]}]}\n    - {name: b, from: [{namespaces: [shop]}], to: [{methods: [GET]}]}\n",
        );
        assert_eq!(codes(&dup), ["AW006"]);
        let jwt = policy(
            "  authentication:\n    jwt: [{name: c, issuer: c, jwksUri: 'http://idp/jwks'}]\n",
        );
        assert_eq!(codes(&jwt), ["AW007", "AW008"]);
        let unused = policy(
            "  api:\n    endpoints: [{method: GET, path: '/a/{id}'}, {method: DELETE, path: '/a/{id}'}]\n  rules:\n    - {name: r, from: [{namespaces: [shop]}], to: [{methods: [GET], paths: [/a/*]}]}\n",
        );
        let l = lint(&unused);
        assert_eq!(l.iter().map(|l| l.code).collect::<Vec<_>>(), ["AW009"]);
        assert_eq!(l[0].field, "spec.api.endpoints[1]");
    }

    #[test]
    fn a_least_privilege_policy_is_clean() {
        let p = policy(
            "  authentication:\n    jwt: [{name: c, issuer: c, jwksUri: 'https://idp/jwks', audiences: [a]}]\n  api:\n    endpoints: [{method: GET, path: '/u/{id}'}]\n  rules:\n    - {name: own, from: [{jwt: {provider: c}}], to: [{methods: [GET], paths: ['/u/{id}']}], bind: [{pathParam: id, claim: sub}]}\n",
        );
        assert!(lint(&p).is_empty(), "{:?}", lint(&p));
    }
}
