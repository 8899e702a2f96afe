//! Merging the policies that select one pod and port into one `PortPolicy`. The rules,
//! each with a table test below (and in docs/policies.md, "Several policies on one pod"):
//!
//! | what | merged |
//! |---|---|
//! | `rules`, `quotas` | all of every policy apply (a Deny of any wins; Allows are a union) |
//! | `mtls` | the strictest: Strict > Permissive > Disabled |
//! | `mode` | Audit only if every policy is Audit (an Audit policy's rules and quotas stay audit) |
//! | `requestLimits` sizes, depth, timeout | the smallest of each |
//! | `requestLimits.contentTypes` | must be equal where set; otherwise the later policy is `Conflicted` |
//! | `responseFilter.removeFields`, `removeHeaders` | union (plus `server`, `x-powered-by`) |
//! | `responseFilter.maskServerErrors` | on if any policy has it on |
//! | `responseFilter.onUnfilterable` | Refuse if any policy refuses |
//! | `api` | declared if any declares; endpoints a union; `undeclared` the strictest: Deny > Audit > Allow |

use std::collections::BTreeSet;

use apiward_policy::config as wire;

use super::{CompileError, Compiled};

fn min_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Merges the policies selecting one port of a pod (in policy-name order) by the rules in
/// the module docs.
pub(super) fn port(port: u16, parts: &[&Compiled]) -> Result<wire::PortPolicy, CompileError> {
    let mut p = wire::PortPolicy {
        port,
        policies: parts.iter().map(|c| c.key.clone()).collect(),
        mtls: parts.iter().map(|c| c.mtls).max().unwrap_or_default(),
        mode: if parts.iter().all(|c| c.mode == wire::Mode::Audit) {
            wire::Mode::Audit
        } else {
            wire::Mode::Enforce
        },
        jwt_providers: parts
            .iter()
            .flat_map(|c| c.jwt.iter().map(|j| j.id.clone()))
            .collect(),
        api_key_providers: parts
            .iter()
            .flat_map(|c| c.api_keys.iter().map(|j| j.id.clone()))
            .collect(),
        rules: parts.iter().flat_map(|c| c.rules.iter().cloned()).collect(),
        quotas: parts
            .iter()
            .flat_map(|c| c.quotas.iter().cloned())
            .collect(),
        limits: Default::default(),
        response: Default::default(),
        api: Default::default(),
    };
    let mut remove_headers: BTreeSet<String> =
        ["server".to_string(), "x-powered-by".to_string()].into();
    let mut remove_fields = BTreeSet::new();
    for c in parts {
        let l = &c.limits;
        p.limits.max_body_bytes = min_opt(p.limits.max_body_bytes, l.max_body_bytes);
        p.limits.max_header_bytes = min_opt(p.limits.max_header_bytes, l.max_header_bytes);
        p.limits.max_json_depth = min_opt(p.limits.max_json_depth, l.max_json_depth);
        p.limits.timeout_ms = min_opt(p.limits.timeout_ms, l.timeout_ms);
        if !l.content_types.is_empty() {
            if !p.limits.content_types.is_empty() && p.limits.content_types != l.content_types {
                return Err(CompileError::Conflict(format!(
                    "{} sets requestLimits.contentTypes {:?} on port {port}, but another policy selecting the same pods sets {:?}",
                    c.key, l.content_types, p.limits.content_types
                )));
            }
            p.limits.content_types = l.content_types.clone();
        }
        remove_headers.extend(c.response.remove_headers.iter().cloned());
        remove_fields.extend(c.response.remove_fields.iter().cloned());
        p.response.mask_server_errors |= c.response.mask_server_errors;
        // Merged, the stricter wins: one policy refusing unreadable responses is enough.
        if c.response.on_unfilterable == wire::OnUnfilterable::Refuse {
            p.response.on_unfilterable = wire::OnUnfilterable::Refuse;
        }
        if let Some(a) = &c.api {
            p.api.declared = true;
            p.api.undeclared = match (p.api.undeclared, a.undeclared) {
                (wire::UndeclaredAction::Deny, _) | (_, wire::UndeclaredAction::Deny) => {
                    wire::UndeclaredAction::Deny
                }
                (wire::UndeclaredAction::Audit, _) | (_, wire::UndeclaredAction::Audit) => {
                    wire::UndeclaredAction::Audit
                }
                _ => wire::UndeclaredAction::Allow,
            };
            p.api.endpoints.extend(a.endpoints.iter().cloned());
        }
    }
    p.response.remove_headers = remove_headers.into_iter().collect();
    p.response.remove_fields = remove_fields.into_iter().collect();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(key: &str) -> Compiled {
        Compiled {
            key: key.into(),
            ports: vec![],
            mode: wire::Mode::Enforce,
            mtls: wire::MtlsMode::Strict,
            jwt: vec![],
            api_keys: vec![],
            rules: vec![],
            quotas: vec![],
            limits: Default::default(),
            response: Default::default(),
            api: None,
            egress: None,
        }
    }

    fn merged(parts: &[Compiled]) -> wire::PortPolicy {
        port(8080, &parts.iter().collect::<Vec<_>>()).expect("merges")
    }

    fn rule(name: &str, action: wire::Action) -> wire::RuleConfig {
        wire::RuleConfig {
            policy: "p".into(),
            name: name.into(),
            action,
            audit: false,
            from: vec![],
            to: vec![],
            bind: vec![],
        }
    }

    #[test]
    fn rules_and_quotas_of_every_policy_apply_in_policy_order() {
        let mut a = compiled("ns/a");
        a.rules = vec![rule("a-allow", wire::Action::Allow)];
        let mut b = compiled("ns/b");
        b.rules = vec![rule("b-deny", wire::Action::Deny)];
        let p = merged(&[a, b]);
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a-allow", "b-deny"]);
        assert_eq!(p.policies, ["ns/a", "ns/b"]);
    }

    #[test]
    fn mtls_is_the_strictest_mode() {
        use wire::MtlsMode::*;
        for (modes, want) in [
            (vec![Disabled, Permissive], Permissive),
            (vec![Permissive, Strict], Strict),
            (vec![Disabled, Disabled], Disabled),
            (vec![Strict, Disabled], Strict),
        ] {
            let parts: Vec<Compiled> = modes
                .iter()
                .map(|&m| Compiled {
                    mtls: m,
                    ..compiled("ns/x")
                })
                .collect();
            assert_eq!(merged(&parts).mtls, want, "{modes:?}");
        }
    }

    #[test]
    fn the_port_is_audit_only_if_every_policy_is() {
        use wire::Mode::*;
        for (modes, want) in [
            (vec![Audit, Audit], Audit),
            (vec![Audit, Enforce], Enforce),
            (vec![Enforce], Enforce),
        ] {
            let parts: Vec<Compiled> = modes
                .iter()
                .map(|&m| Compiled {
                    mode: m,
                    ..compiled("ns/x")
                })
                .collect();
            assert_eq!(merged(&parts).mode, want, "{modes:?}");
        }
    }

    #[test]
    fn limits_take_the_smallest_of_each() {
        let lim = |body, header, depth, timeout| wire::RequestLimits {
            max_body_bytes: body,
            max_header_bytes: header,
            max_json_depth: depth,
            timeout_ms: timeout,
            content_types: vec![],
        };
        let a = Compiled {
            limits: lim(Some(1000), None, Some(8), Some(5000)),
            ..compiled("ns/a")
        };
        let b = Compiled {
            limits: lim(Some(500), Some(4096), None, Some(9000)),
            ..compiled("ns/b")
        };
        let l = merged(&[a, b]).limits;
        assert_eq!(
            (
                l.max_body_bytes,
                l.max_header_bytes,
                l.max_json_depth,
                l.timeout_ms
            ),
            (Some(500), Some(4096), Some(8), Some(5000))
        );
    }

    #[test]
    fn content_types_must_agree_where_set() {
        let ct = |key: &str, types: &[&str]| Compiled {
            limits: wire::RequestLimits {
                content_types: types.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            },
            ..compiled(key)
        };
        let same = merged(&[
            ct("ns/a", &["application/json"]),
            ct("ns/b", &["application/json"]),
            ct("ns/c", &[]),
        ]);
        assert_eq!(same.limits.content_types, ["application/json"]);
        let a = ct("ns/a", &["application/json"]);
        let b = ct("ns/b", &["text/plain"]);
        let err = port(8080, &[&a, &b]).unwrap_err();
        assert!(matches!(err, CompileError::Conflict(_)));
        assert!(
            err.to_string()
                .starts_with("ns/b sets requestLimits.contentTypes"),
            "{err}"
        );
        assert_eq!(
            err.condition().reason,
            apiward_crds::conditions::reasons::CONFLICTED
        );
    }

    #[test]
    fn response_filters_are_a_union_and_the_stricter_choice_wins() {
        let rf = |fields: &[&str], mask, refuse| wire::ResponseFilter {
            remove_fields: fields.iter().map(|f| f.to_string()).collect(),
            remove_headers: vec!["x-debug".into()],
            mask_server_errors: mask,
            on_unfilterable: if refuse {
                wire::OnUnfilterable::Refuse
            } else {
                wire::OnUnfilterable::Pass
            },
        };
        let a = Compiled {
            response: rf(&["/password"], false, false),
            ..compiled("ns/a")
        };
        let b = Compiled {
            response: rf(&["/ssn", "/password"], true, true),
            ..compiled("ns/b")
        };
        let r = merged(&[a.clone(), b]).response;
        assert_eq!(r.remove_fields, ["/password", "/ssn"]);
        assert_eq!(r.remove_headers, ["server", "x-debug", "x-powered-by"]);
        assert!(r.mask_server_errors);
        assert_eq!(r.on_unfilterable, wire::OnUnfilterable::Refuse);
        let alone = merged(&[a]).response;
        assert!(!alone.mask_server_errors);
        assert_eq!(alone.on_unfilterable, wire::OnUnfilterable::Pass);
    }

    #[test]
    fn declared_apis_are_a_union_with_the_strictest_undeclared_action() {
        use wire::UndeclaredAction::*;
        let api = |path: &str, u| wire::ApiSurface {
            declared: true,
            endpoints: vec![wire::Endpoint {
                method: "GET".into(),
                path: path.into(),
                deprecated: false,
                sunset_unix: None,
            }],
            undeclared: u,
        };
        for (a, b, want) in [
            (Allow, Audit, Audit),
            (Audit, Deny, Deny),
            (Allow, Allow, Allow),
            (Deny, Allow, Deny),
        ] {
            let x = Compiled {
                api: Some(api("/a", a)),
                ..compiled("ns/a")
            };
            let y = Compiled {
                api: Some(api("/b", b)),
                ..compiled("ns/b")
            };
            let m = merged(&[x, y]).api;
            assert_eq!(m.undeclared, want, "{a:?} + {b:?}");
            assert_eq!(m.endpoints.len(), 2);
        }
        // One policy declaring is enough to declare the port.
        let x = Compiled {
            api: Some(api("/a", Allow)),
            ..compiled("ns/a")
        };
        assert!(merged(&[x, compiled("ns/b")]).api.declared);
        assert!(!merged(&[compiled("ns/b")]).api.declared);
    }
}
