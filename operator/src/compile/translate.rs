//! One translation per spec section: an `ApiPolicy` section in, its wire form out, or a
//! [`CompileError`] naming the field. No fallbacks: what cannot be translated is an error,
//! never a default (a bad duration is not 0, an unknown calendar unit is not a day).

use apiward_crds::{self as crds, ApiPolicy};
use apiward_policy::config as wire;
use apiward_policy::duration::parse_duration;
use apiward_policy::time::parse_rfc3339;

use super::{
    CompileError, Compiled, Refs, hash_api_key, hex, hmac_key, key, policy_key, secret_value,
};

/// A whole policy: validated, its references resolved, each section translated.
pub(super) fn policy(
    p: &ApiPolicy,
    refs: &Refs<'_>,
    trust_domain: &str,
) -> Result<Compiled, CompileError> {
    let pk = policy_key(p);
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let errors = crds::validate(&p.spec);
    if !errors.is_empty() {
        return Err(CompileError::Invalid(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    let audit = p.spec.mode == crds::Mode::Audit;
    let mut missing: Vec<String> = Vec::new();
    let authn = p.spec.authentication.clone().unwrap_or_default();
    let mut jwt = Vec::new();
    for (i, j) in authn.jwt.iter().enumerate() {
        jwt.extend(jwt_provider(&pk, ns, i, j, refs, &mut missing)?);
    }
    let api_keys = authn
        .api_keys
        .iter()
        .filter_map(|k| api_key_provider(&pk, ns, k, refs, &mut missing))
        .collect();
    let api = match &p.spec.api {
        Some(a) => Some(api_surface(ns, a, refs, &mut missing)?),
        None => None,
    };
    if !missing.is_empty() {
        return Err(CompileError::MissingRefs(missing));
    }
    let rules = p
        .spec
        .rules
        .iter()
        .map(|r| rule(&pk, trust_domain, audit, r))
        .collect();
    let quotas = p
        .spec
        .quotas
        .iter()
        .enumerate()
        .map(|(i, q)| quota(&pk, audit, i, q))
        .collect::<Result<_, _>>()?;
    Ok(Compiled {
        key: pk,
        ports: p.spec.target_ref.ports.clone(),
        mode: if audit {
            wire::Mode::Audit
        } else {
            wire::Mode::Enforce
        },
        mtls: mtls(p.spec.mtls),
        jwt,
        api_keys,
        rules,
        quotas,
        limits: request_limits(p.spec.request_limits.as_ref())?,
        response: response_filter(p.spec.response_filter.clone().unwrap_or_default()),
        api,
        egress: p.spec.egress.as_ref().map(egress),
    })
}

/// A duration in milliseconds; `field` names it in the error.
fn ms(field: impl FnOnce() -> String, s: &str) -> Result<u64, CompileError> {
    parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| CompileError::Duration {
            field: field(),
            value: s.to_owned(),
        })
}

/// `mtls`.
pub(super) fn mtls(m: crds::MtlsMode) -> wire::MtlsMode {
    match m {
        crds::MtlsMode::Strict => wire::MtlsMode::Strict,
        crds::MtlsMode::Permissive => wire::MtlsMode::Permissive,
        crds::MtlsMode::Disabled => wire::MtlsMode::Disabled,
    }
}

/// One `authentication.jwt[]` entry; `None` when its Secret is missing (added to
/// `missing`) or it has no key source (admission refuses those).
fn jwt_provider(
    pk: &str,
    ns: &str,
    i: usize,
    j: &crds::JwtProvider,
    refs: &Refs<'_>,
    missing: &mut Vec<String>,
) -> Result<Option<wire::JwtProvider>, CompileError> {
    let jwks = if let Some(u) = &j.jwks_uri {
        wire::JwksSource::Uri(u.clone())
    } else if let Some(doc) = &j.jwks {
        wire::JwksSource::Inline(doc.clone())
    } else if let Some(r) = &j.jwks_secret_ref {
        match secret_value(refs.secrets, ns, &r.name).and_then(|d| d.get(&r.key).cloned()) {
            Some(b) => wire::JwksSource::Inline(String::from_utf8_lossy(&b).into_owned()),
            None => {
                missing.push(format!(
                    "Secret {ns}/{} key {} (authentication.jwt {})",
                    r.name, r.key, j.name
                ));
                return Ok(None);
            }
        }
    } else {
        return Ok(None);
    };
    let mut algorithms: Vec<String> = j.algorithms.iter().map(|a| format!("{a:?}")).collect();
    if algorithms.is_empty() {
        algorithms = vec!["RS256".into(), "ES256".into()];
    }
    let clock_skew_seconds = match j.clock_skew.as_deref() {
        Some(s) => ms(|| format!("spec.authentication.jwt[{i}].clockSkew"), s)? / 1000,
        None => 30,
    };
    Ok(Some(wire::JwtProvider {
        id: format!("{pk}/{}", j.name),
        issuer: j.issuer.clone(),
        audiences: j.audiences.clone(),
        jwks,
        algorithms,
        clock_skew_seconds,
        forward_claims: j.forward_claims.clone(),
        token_header: j.header.clone().unwrap_or_else(|| "authorization".into()),
    }))
}

/// One `authentication.apiKeys[]` entry: its Secret's keys as HMAC-SHA256 hashes; `None`
/// when the Secret is missing (added to `missing`).
fn api_key_provider(
    pk: &str,
    ns: &str,
    k: &crds::ApiKeyProvider,
    refs: &Refs<'_>,
    missing: &mut Vec<String>,
) -> Option<wire::ApiKeyProvider> {
    let Some(data) = secret_value(refs.secrets, ns, &k.secret_ref.name) else {
        missing.push(format!(
            "Secret {ns}/{} (authentication.apiKeys {})",
            k.secret_ref.name, k.name
        ));
        return None;
    };
    let hk = hmac_key(pk, &k.name, &k.secret_ref.name);
    Some(wire::ApiKeyProvider {
        id: format!("{pk}/{}", k.name),
        header: if k.query.is_some() {
            k.header.clone()
        } else {
            Some(k.header.clone().unwrap_or_else(|| "x-api-key".into()))
        },
        query: k.query.clone(),
        keys: data
            .iter()
            .map(|(client, key)| wire::ApiKeyHash {
                client: client.clone(),
                hash: hash_api_key(&hk, key.trim_ascii()),
            })
            .collect(),
        hmac_key: hex(&hk),
    })
}

/// `api`: the declared endpoints, with those of the OpenAPI document it references. A
/// missing ConfigMap is added to `missing`; one that is not a usable document is an error.
fn api_surface(
    ns: &str,
    a: &crds::ApiSurface,
    refs: &Refs<'_>,
    missing: &mut Vec<String>,
) -> Result<wire::ApiSurface, CompileError> {
    let mut endpoints: Vec<wire::Endpoint> = a
        .endpoints
        .iter()
        .map(|e| wire::Endpoint {
            method: e.method.as_str().to_owned(),
            path: e.path.clone(),
            deprecated: e.deprecated,
            sunset_unix: e.sunset.as_deref().and_then(parse_rfc3339),
        })
        .collect();
    if let Some(r) = &a.openapi_ref {
        let (name, k) = (&r.config_map_ref.name, &r.config_map_ref.key);
        let cm = refs.config_maps.get(&key(ns, name));
        match cm.and_then(|c| c.data.as_ref()).and_then(|d| d.get(k)) {
            None => missing.push(format!("ConfigMap {ns}/{name} key {k} (api.openapiRef)")),
            Some(doc) => {
                let eps = openapi_endpoints(doc).map_err(|message| CompileError::InvalidRef {
                    what: format!("ConfigMap {ns}/{name} key {k}"),
                    message,
                })?;
                for e in eps {
                    if !endpoints
                        .iter()
                        .any(|x| x.method == e.method && x.path == e.path)
                    {
                        endpoints.push(e);
                    }
                }
            }
        }
    }
    Ok(wire::ApiSurface {
        declared: true,
        endpoints,
        undeclared: match a.undeclared {
            crds::UndeclaredAction::Allow => wire::UndeclaredAction::Allow,
            crds::UndeclaredAction::Audit => wire::UndeclaredAction::Audit,
            crds::UndeclaredAction::Deny => wire::UndeclaredAction::Deny,
        },
    })
}

/// OpenAPI `paths` → declared endpoints (methods in upper case).
pub(super) fn openapi_endpoints(doc: &str) -> Result<Vec<wire::Endpoint>, String> {
    let v: serde_json::Value =
        serde_norway::from_str(doc).map_err(|e| format!("not YAML/JSON: {e}"))?;
    let paths = v
        .get("paths")
        .and_then(|p| p.as_object())
        .ok_or("no paths object")?;
    let mut out = Vec::new();
    for (path, item) in paths {
        apiward_policy::template::PathTemplate::parse(path).map_err(|e| e.to_string())?;
        for m in ["get", "head", "post", "put", "patch", "delete", "options"] {
            if let Some(opn) = item.get(m) {
                out.push(wire::Endpoint {
                    method: m.to_uppercase(),
                    path: path.clone(),
                    deprecated: opn
                        .get("deprecated")
                        .and_then(|d| d.as_bool())
                        .unwrap_or(false),
                    sunset_unix: None,
                });
            }
        }
    }
    Ok(out)
}

/// An operation (`to[]`, `matches[]`).
fn op(o: &crds::Operation) -> wire::Operation {
    wire::Operation {
        methods: o.methods.iter().map(|m| m.as_str().to_owned()).collect(),
        paths: o.paths.clone(),
        headers: o
            .headers
            .iter()
            .map(|h| wire::HeaderMatch {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
    }
}

/// One `rules[]` entry: service accounts become SPIFFE IDs of the trust domain, provider
/// names become provider ids.
fn rule(pk: &str, td: &str, audit: bool, r: &crds::AccessRule) -> wire::RuleConfig {
    wire::RuleConfig {
        policy: pk.to_owned(),
        name: r.name.clone(),
        action: match r.action {
            crds::Action::Allow => wire::Action::Allow,
            crds::Action::Deny => wire::Action::Deny,
        },
        audit: audit || r.mode == Some(crds::Mode::Audit),
        from: r
            .from
            .iter()
            .map(|s| wire::Source {
                principals: s
                    .service_accounts
                    .iter()
                    .map(|sa| {
                        let (n, a) = sa.split_once('/').unwrap_or(("default", sa));
                        format!("spiffe://{td}/ns/{n}/sa/{a}")
                    })
                    .chain(s.identities.iter().cloned())
                    .collect(),
                namespaces: s.namespaces.clone(),
                jwt: s.jwt.as_ref().map(|j| wire::JwtMatch {
                    provider: format!("{pk}/{}", j.provider),
                    claims: j.claims.clone(),
                }),
                api_keys: s.api_keys.iter().map(|k| format!("{pk}/{k}")).collect(),
                ip_blocks: s.ip_blocks.clone(),
                unauthenticated: s.unauthenticated,
            })
            .collect(),
        to: r.to.iter().map(op).collect(),
        bind: r
            .bind
            .iter()
            .filter_map(|b| {
                let source = if let Some(p) = &b.path_param {
                    wire::BindSource::PathParam(p.clone())
                } else if let Some(q) = &b.query_param {
                    wire::BindSource::QueryParam(q.clone())
                } else {
                    wire::BindSource::Header(b.header.clone()?)
                };
                Some(wire::Binding {
                    source,
                    claim: b.claim.clone(),
                })
            })
            .collect(),
    }
}

/// The calendar unit of a Calendar window's `per`, and its nominal length (the engine
/// counts real calendar windows: a month is the month's own length).
pub(super) fn calendar_unit(
    field: &str,
    per: &str,
) -> Result<(wire::CalendarUnit, u64), CompileError> {
    Ok(match per {
        "1s" => (wire::CalendarUnit::Second, 1_000),
        "1m" => (wire::CalendarUnit::Minute, 60_000),
        "1h" => (wire::CalendarUnit::Hour, 3_600_000),
        "1d" | "24h" => (wire::CalendarUnit::Day, 86_400_000),
        "1mo" => (wire::CalendarUnit::Month, 30 * 86_400_000),
        _ => {
            return Err(CompileError::CalendarUnit {
                field: field.to_owned(),
                value: per.to_owned(),
            });
        }
    })
}

/// One `quotas[]` entry.
fn quota(
    pk: &str,
    audit: bool,
    i: usize,
    q: &crds::Quota,
) -> Result<wire::QuotaConfig, CompileError> {
    let field = |f: &str| format!("spec.quotas[{i}].{f}");
    let (window, period_ms) = match q.limit.window {
        crds::Window::Rolling => (
            wire::Window::Rolling,
            ms(|| field("limit.per"), &q.limit.per)?,
        ),
        crds::Window::Calendar => {
            let (unit, nominal) = calendar_unit(&field("limit.per"), &q.limit.per)?;
            (wire::Window::Calendar(unit), nominal)
        }
    };
    Ok(wire::QuotaConfig {
        policy: pk.to_owned(),
        name: q.name.clone(),
        matches: q.matches.iter().map(op).collect(),
        key: if q.key.principal {
            wire::QuotaKey::Principal
        } else if let Some(c) = &q.key.claim {
            wire::QuotaKey::Claim(c.clone())
        } else if let Some(k) = &q.key.api_key {
            wire::QuotaKey::ApiKey(format!("{pk}/{k}"))
        } else if let Some(h) = &q.key.header {
            wire::QuotaKey::Header(h.clone())
        } else {
            wire::QuotaKey::SourceIp
        },
        requests: q.limit.requests,
        period_ms,
        burst: q.limit.burst.unwrap_or(0),
        window,
        scope: match q.scope {
            crds::QuotaScope::Local => wire::QuotaScope::Local,
            crds::QuotaScope::Global => wire::QuotaScope::Global,
        },
        on_exceed: match (q.on_exceed, &q.max_delay) {
            (crds::OnExceed::Delay, Some(d)) => wire::OnExceed::Delay {
                max_delay_ms: ms(|| field("maxDelay"), d)?,
            },
            _ => wire::OnExceed::Reject,
        },
        on_store_error: match (q.on_store_error, q.critical) {
            (Some(crds::OnStoreError::FailOpen), _) | (None, false) => wire::OnStoreError::FailOpen,
            (Some(crds::OnStoreError::FailClosed), _) | (None, true) => {
                wire::OnStoreError::FailClosed
            }
        },
        audit,
    })
}

/// `requestLimits`.
fn request_limits(l: Option<&crds::RequestLimits>) -> Result<wire::RequestLimits, CompileError> {
    let Some(l) = l else {
        return Ok(wire::RequestLimits::default());
    };
    Ok(wire::RequestLimits {
        max_body_bytes: l.max_body_bytes,
        max_header_bytes: l.max_header_bytes,
        content_types: l.content_types.clone(),
        max_json_depth: l.max_json_depth,
        timeout_ms: l
            .timeout
            .as_deref()
            .map(|t| ms(|| "spec.requestLimits.timeout".into(), t))
            .transpose()?,
    })
}

/// `responseFilter`: server errors masked and unreadable responses refused unless the
/// policy says otherwise.
fn response_filter(rf: crds::ResponseFilter) -> wire::ResponseFilter {
    wire::ResponseFilter {
        remove_fields: rf.remove_fields,
        remove_headers: rf.remove_headers,
        mask_server_errors: rf.mask_server_errors.unwrap_or(true),
        on_unfilterable: match rf.on_unfilterable {
            Some(crds::OnUnfilterable::Pass) => wire::OnUnfilterable::Pass,
            Some(crds::OnUnfilterable::Refuse) | None => wire::OnUnfilterable::Refuse,
        },
    }
}

/// `egress.allow`.
fn egress(e: &crds::Egress) -> Vec<wire::EgressRule> {
    e.allow
        .iter()
        .map(|r| wire::EgressRule {
            hosts: r.hosts.clone(),
            cidrs: r.cidrs.clone(),
            ports: r.ports.clone(),
            tls_required: r.tls == crds::EgressTls::Required,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_units_are_the_documented_ones_and_nothing_else() {
        let f = "spec.quotas[0].limit.per";
        assert_eq!(calendar_unit(f, "1d").unwrap().0, wire::CalendarUnit::Day);
        assert_eq!(calendar_unit(f, "24h").unwrap().0, wire::CalendarUnit::Day);
        assert_eq!(
            calendar_unit(f, "1mo").unwrap().0,
            wire::CalendarUnit::Month
        );
        for bad in ["2d", "1w", "1y", "30d", ""] {
            let err = calendar_unit(f, bad).unwrap_err();
            assert!(err.to_string().contains(f), "{err}");
            assert_eq!(err.condition().reason, crds::conditions::reasons::INVALID);
        }
    }

    #[test]
    fn a_duration_that_does_not_parse_is_an_error_naming_its_field_not_zero() {
        let err = ms(|| "spec.requestLimits.timeout".into(), "soon").unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.requestLimits.timeout: \"soon\" is not a duration (like 30s, 5m, 1h)"
        );
        assert_eq!(ms(|| unreachable!(), "1500ms").unwrap(), 1500);
    }
}
