//! A policy's status: the compiler's conditions (`Accepted`, `ResolvedRefs`) plus what
//! only the sidecars can tell, from their `Report`s: `Programmed` (how many of the selected
//! pods enforce the config published for them), `Ready`, `QuotaStoreUnavailable`, and the
//! target counts. The same code writes status in a cluster and in local mode.

use std::collections::BTreeMap;

use apiward_crds::{self as crds, ApiPolicyStatus, Targets};
use apiward_policy::report::Report;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::compile::{PolicyCondition, PolicyResult};
use crate::serve::config::PodInventory;

/// Most warnings kept in a status.
const MAX_WARNINGS: usize = 32;
/// Most endpoints listed in a policy's status: the flagged ones first, then the busiest;
/// the rest are only counted (`summary.omitted`), so status stays small.
pub const MAX_STATUS_ENDPOINTS: usize = 100;

fn rfc3339(unix: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .ok()
        .map(|t| t.to_string())
}

/// The inventory of a policy: what its pods served, merged across pods, with flags.
/// - `shadow`: served (not only refused) but not declared, when the policy declares an API;
/// - `zombie`: declared deprecated (or with a sunset), yet called;
/// - `unauthenticated`: served to callers with no identity (counted in `summary`);
/// - `unused`: declared but not seen since the control plane started.
pub fn inventory(
    policy: &apiward_crds::ApiPolicy,
    pods: &[String],
    seen: &BTreeMap<String, PodInventory>,
) -> apiward_crds::Inventory {
    use apiward_crds::{InventoryEndpoint, InventorySummary};
    let mut merged: BTreeMap<(String, String), apiward_policy::report::InventoryEntry> =
        BTreeMap::new();
    for pod in pods {
        for e in seen.get(pod).iter().flat_map(|i| i.endpoints.values()) {
            match merged.get_mut(&(e.method.clone(), e.path.clone())) {
                Some(have) => have.merge(e),
                None => {
                    merged.insert((e.method.clone(), e.path.clone()), e.clone());
                }
            }
        }
    }
    let api = policy.spec.api.as_ref();
    let declares = api.is_some_and(|a| !a.endpoints.is_empty() || a.openapi_ref.is_some());
    let declared: BTreeMap<(String, String), &apiward_crds::Endpoint> = api
        .map(|a| {
            a.endpoints
                .iter()
                .map(|e| ((e.method.as_str().to_owned(), e.path.clone()), e))
                .collect()
        })
        .unwrap_or_default();
    let mut endpoints: Vec<InventoryEndpoint> = Vec::new();
    for ((method, path), e) in &merged {
        let mut reasons = Vec::new();
        // Shadow means served: requests refused before reaching the app do not make one.
        let shadow = !e.declared && declares && e.requests > e.denied;
        if shadow {
            reasons.push("shadow: served but not declared in the policy's API".to_string());
        }
        let spec = declared.get(&(method.clone(), path.clone()));
        let zombie = e.declared && spec.is_some_and(|d| d.deprecated || d.sunset.is_some());
        if zombie {
            reasons.push(format!(
                "zombie: declared deprecated{}, still called",
                spec.and_then(|d| d.sunset.as_deref())
                    .map(|s| format!(" (sunset {s})"))
                    .unwrap_or_default()
            ));
        }
        if e.unauthenticated > 0 {
            reasons.push(format!(
                "unauthenticated: {} requests from callers with no identity",
                e.unauthenticated
            ));
        }
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let mut top = e.top_principals.clone();
        top.sort_by_key(|p| std::cmp::Reverse(p.requests));
        endpoints.push(InventoryEndpoint {
            method: method.clone(),
            path: path.clone(),
            declared: e.declared,
            requests: e.requests,
            responses: classes
                .iter()
                .zip(e.responses)
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| ((*c).to_owned(), n))
                .collect(),
            unauthenticated: e.unauthenticated,
            denied: e.denied,
            would_deny: e.would_deny,
            first_seen: rfc3339(e.first_seen),
            last_seen: rfc3339(e.last_seen),
            shadow,
            zombie,
            unused: false,
            reasons,
            top_callers: top.into_iter().map(|p| p.principal).collect(),
        });
    }
    for ((method, path), _) in declared.iter().filter(|(k, _)| !merged.contains_key(*k)) {
        endpoints.push(InventoryEndpoint {
            method: method.clone(),
            path: path.clone(),
            declared: true,
            unused: true,
            reasons: vec!["unused: declared but not called since the control plane started".into()],
            ..Default::default()
        });
    }
    let summary = InventorySummary {
        endpoints: merged.len() as u32,
        shadow: endpoints.iter().filter(|e| e.shadow).count() as u32,
        zombie: endpoints.iter().filter(|e| e.zombie).count() as u32,
        unauthenticated: endpoints.iter().filter(|e| e.unauthenticated > 0).count() as u32,
        unused: endpoints.iter().filter(|e| e.unused).count() as u32,
        omitted: endpoints.len().saturating_sub(MAX_STATUS_ENDPOINTS) as u32,
    };
    // Flagged first, then the busiest.
    endpoints.sort_by(|a, b| {
        let flagged = |e: &InventoryEndpoint| e.shadow || e.zombie || e.unauthenticated > 0;
        flagged(b)
            .cmp(&flagged(a))
            .then(b.requests.cmp(&a.requests))
            .then(a.path.cmp(&b.path))
    });
    endpoints.truncate(MAX_STATUS_ENDPOINTS);
    apiward_crds::Inventory { endpoints, summary }
}

/// `Programmed` from the pods a policy selects, the version published for each, and the
/// latest report of each.
pub fn programmed(
    pods: &[String],
    published: &dyn Fn(&str) -> Option<String>,
    reports: &BTreeMap<String, Report>,
) -> (PolicyCondition, Targets) {
    let mut acked = 0;
    let mut rejected = Vec::new();
    let mut versions = std::collections::BTreeSet::new();
    for pod in pods {
        let want = published(pod);
        if let Some(v) = &want {
            versions.insert(v.clone());
        }
        let report = reports.get(pod);
        if want.is_some() && report.and_then(|r| r.config_version.clone()) == want {
            acked += 1;
        } else if let Some(r) = report.and_then(|r| r.rejected_config.as_ref())
            && Some(&r.version) == want.as_ref()
        {
            rejected.push(format!("{pod}: {}", r.reason));
        }
    }
    let total = pods.len();
    let targets = Targets {
        pods: total as u32,
        acked: acked as u32,
        config_version: (versions.len() == 1)
            .then(|| versions.into_iter().next().unwrap_or_default()),
    };
    let c = |status, reason, message| PolicyCondition {
        type_: crds::conditions::PROGRAMMED,
        status,
        reason,
        message,
    };
    let cond = if total == 0 {
        c(
            true,
            crds::conditions::reasons::NO_TARGETS,
            "the policy selects no pod".into(),
        )
    } else if !rejected.is_empty() {
        c(
            false,
            crds::conditions::reasons::SIDECAR_REJECTED,
            format!(
                "{} of {total} sidecars refused the config: {}",
                rejected.len(),
                rejected.join("; ")
            ),
        )
    } else if acked < total {
        c(
            false,
            crds::conditions::reasons::PENDING,
            format!("{acked} of {total} sidecars enforce the current config"),
        )
    } else {
        c(
            true,
            crds::conditions::reasons::ALL_SIDECARS_ACKED,
            format!("{total} of {total} sidecars enforce the current config"),
        )
    };
    (cond, targets)
}

/// `Stalled` or `Reconciling` (kstatus' abnormal-true conditions) from the others, when
/// either is true: the first blocking cause, or the first that is still settling.
fn kstatus_condition(conds: &[PolicyCondition]) -> Option<PolicyCondition> {
    use crds::conditions::{ACCEPTED, READY, RECONCILING, STALLED, reasons};
    let not_true = || conds.iter().filter(|c| !c.status && c.type_ != READY);
    let settling =
        |c: &&PolicyCondition| matches!(c.reason, reasons::PENDING | reasons::REF_NOT_FOUND);
    let (type_, cause) = if let Some(c) = not_true().find(|c| c.type_ == ACCEPTED || !settling(c)) {
        (STALLED, c)
    } else {
        (RECONCILING, not_true().next()?)
    };
    Some(PolicyCondition {
        type_,
        status: true,
        reason: cause.reason,
        message: format!("{}: {}", cause.type_, cause.message),
    })
}

/// The whole status of a policy. `previous` keeps each condition's transition time while
/// its status does not change.
#[allow(clippy::too_many_arguments)]
pub fn policy_status(
    result: &PolicyResult,
    generation: Option<i64>,
    published: &dyn Fn(&str) -> Option<String>,
    reports: &BTreeMap<String, Report>,
    has_global_quotas: bool,
    previous: Option<&ApiPolicyStatus>,
    now: Time,
    inventory: Option<apiward_crds::Inventory>,
) -> ApiPolicyStatus {
    let mut conds = result.conditions.clone();
    let (prog, targets) = programmed(&result.pods, published, reports);
    conds.push(prog);
    let ready = conds.iter().all(|c| c.status);
    conds.push(PolicyCondition {
        type_: crds::conditions::READY,
        status: ready,
        reason: if ready {
            crds::conditions::reasons::READY
        } else {
            crds::conditions::reasons::NOT_READY
        },
        message: if ready {
            "the policy is enforced".into()
        } else {
            let not: Vec<&str> = conds
                .iter()
                .filter(|c| !c.status)
                .map(|c| c.type_)
                .collect();
            format!("not True: {}", not.join(", "))
        },
    });
    conds.extend(kstatus_condition(&conds));
    if has_global_quotas {
        let mine: Vec<&Report> = result.pods.iter().filter_map(|p| reports.get(p)).collect();
        conds.extend(quota_store_condition(&mine));
    }
    let conditions = conds
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
                .filter(|o| o.status == status)
                .map_or_else(|| now.clone(), |o| o.last_transition_time.clone());
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.into(),
                message: c.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect();
    ApiPolicyStatus {
        observed_generation: generation,
        conditions,
        warnings: result.warnings.iter().take(MAX_WARNINGS).cloned().collect(),
        targets: Some(targets),
        decisions: None,
        inventory,
    }
}

/// `QuotaStoreUnavailable` for a policy with Global quotas, from the latest report of each
/// pod it selects: True (naming up to three pods) while any of them cannot reach Redis,
/// False once all that report on the store can. `None` when no report mentions the store.
pub fn quota_store_condition(reports: &[&Report]) -> Option<PolicyCondition> {
    let with_store: Vec<_> = reports
        .iter()
        .filter_map(|r| r.quota_store.as_ref().map(|s| (r, s)))
        .collect();
    if with_store.is_empty() {
        return None;
    }
    let down: Vec<String> = with_store
        .iter()
        .filter(|(_, s)| !s.available)
        .map(|(r, _)| format!("{}/{}", r.workload.namespace, r.workload.name))
        .collect();
    let errors: u64 = with_store.iter().map(|(_, s)| s.errors).sum();
    Some(if down.is_empty() {
        PolicyCondition {
            type_: crds::conditions::QUOTA_STORE_UNAVAILABLE,
            status: false,
            reason: crds::conditions::reasons::STORE_AVAILABLE,
            message: format!("{} sidecars reach the quota store", with_store.len()),
        }
    } else {
        let mut named = down.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        if down.len() > 3 {
            named.push_str(&format!(" and {} more", down.len() - 3));
        }
        PolicyCondition {
            type_: crds::conditions::QUOTA_STORE_UNAVAILABLE,
            status: true,
            reason: crds::conditions::reasons::STORE_UNREACHABLE,
            message: format!(
                "{} of {} sidecars cannot reach the quota store ({named}); Global quotas follow onStoreError ({errors} requests since the last reports)",
                down.len(),
                with_store.len()
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiward_policy::config::Workload;
    use apiward_policy::report::{QuotaStoreHealth, REPORT_API_VERSION};

    fn report(name: &str, store: Option<(bool, u64)>) -> Report {
        Report {
            api_version: REPORT_API_VERSION.into(),
            workload: Workload {
                namespace: "shop".into(),
                name: name.into(),
                service_account: "orders".into(),
            },
            config_version: Some("v1".into()),
            rejected_config: None,
            decisions: vec![],
            inventory: vec![],
            inventory_overflow: 0,
            certificate: None,
            quota_store: store.map(|(available, errors)| QuotaStoreHealth { available, errors }),
            ignored_fields: vec![],
        }
    }

    #[test]
    fn a_policy_whose_pods_saw_ten_thousand_endpoints_has_a_small_status() {
        use apiward_policy::report::InventoryEntry;
        let policy: apiward_crds::ApiPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "apiward.io/v1alpha1", "kind": "ApiPolicy",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"targetRef": {"selector": {"matchLabels": {"app": "orders"}}},
                     "api": {"endpoints": [{"method": "GET", "path": "/v1/orders/{id}", "deprecated": true}]}}
        }))
        .unwrap();
        let mut pods = std::collections::BTreeMap::new();
        for pod in ["shop/orders-0", "shop/orders-1"] {
            let mut inv = PodInventory::default();
            for i in 0..10_000u64 {
                let path = format!("/scan/{i}/{}", "x".repeat(40));
                inv.endpoints.insert(
                    (8080, "GET".into(), path.clone()),
                    InventoryEntry {
                        port: 8080,
                        method: "GET".into(),
                        path,
                        declared: false,
                        requests: i % 7 + 1,
                        responses: [0, i % 7 + 1, 0, 0, 0],
                        unauthenticated: i % 2,
                        denied: 0,
                        would_deny: 0,
                        first_seen: 1_800_000_000,
                        last_seen: 1_800_000_100,
                        top_principals: vec![],
                        latency_sum_micros: 100,
                    },
                );
            }
            pods.insert(pod.to_string(), inv);
        }
        let names: Vec<String> = pods.keys().cloned().collect();
        let inv = inventory(&policy, &names, &pods);
        assert_eq!(inv.summary.endpoints, 10_000);
        assert_eq!(inv.summary.shadow, 10_000);
        assert_eq!(
            inv.summary.unused, 1,
            "the declared endpoint was never called"
        );
        assert_eq!(inv.endpoints.len(), MAX_STATUS_ENDPOINTS);
        assert!(inv.summary.omitted > 0);
        let size = serde_json::to_vec(&inv).unwrap().len();
        assert!(size < 256 * 1024, "status inventory is {size} bytes");
    }

    #[test]
    fn one_sidecar_without_redis_makes_the_condition_true() {
        let (a, b, c) = (
            report("orders-0", Some((true, 0))),
            report("orders-1", Some((false, 12))),
            report("orders-2", None),
        );
        let cond = quota_store_condition(&[&a, &b, &c]).unwrap();
        assert!(cond.status);
        assert_eq!(cond.reason, "StoreUnreachable");
        assert!(
            cond.message.starts_with("1 of 2 sidecars"),
            "{}",
            cond.message
        );
        assert!(cond.message.contains("shop/orders-1") && cond.message.contains("12 requests"));
        let healthy = report("orders-1", Some((true, 0)));
        let cond = quota_store_condition(&[&a, &healthy]).unwrap();
        assert!(!cond.status);
        assert!(
            quota_store_condition(&[&c]).is_none(),
            "no Global quota, no condition"
        );
    }

    /// kstatus' generic rules (sigs.k8s.io/cli-utils/pkg/kstatus, what Flux's health
    /// checks use) for a resource with conditions: Stalled → Failed; Reconciling or
    /// Ready=False or a stale observedGeneration → InProgress; else Current.
    fn kstatus(s: &ApiPolicyStatus, generation: i64) -> &'static str {
        let is_true = |t: &str| {
            s.conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True")
        };
        let is_false = |t: &str| {
            s.conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "False")
        };
        if s.observed_generation != Some(generation) {
            "InProgress"
        } else if is_true("Stalled") {
            "Failed"
        } else if is_true("Reconciling") || is_false("Ready") {
            "InProgress"
        } else {
            "Current"
        }
    }

    #[test]
    fn flux_and_kstatus_read_the_status_as_failed_in_progress_or_current() {
        let accepted = PolicyCondition {
            type_: crds::conditions::ACCEPTED,
            status: true,
            reason: crds::conditions::reasons::ACCEPTED,
            message: String::new(),
        };
        let invalid = PolicyCondition {
            status: false,
            reason: crds::conditions::reasons::INVALID,
            message: "spec.rules[0].to[0].paths[0]: not a path template".into(),
            ..accepted.clone()
        };
        let missing_secret = PolicyCondition {
            type_: crds::conditions::RESOLVED_REFS,
            status: false,
            reason: crds::conditions::reasons::REF_NOT_FOUND,
            message: "Secret shop/partner-keys not found".into(),
        };
        let pods = vec!["shop/orders-0".to_owned(), "shop/orders-1".to_owned()];
        let acked: BTreeMap<String, Report> = pods
            .iter()
            .map(|p| (p.clone(), report(p.trim_start_matches("shop/"), None)))
            .collect();
        let mut half = acked.clone();
        half.remove("shop/orders-1");
        let mut refused = acked.clone();
        if let Some(r) = refused.get_mut("shop/orders-1") {
            r.config_version = Some("v0".into());
            r.rejected_config = Some(apiward_policy::report::RejectedConfig {
                version: "v1".into(),
                reason: "unknown field".into(),
            });
        }
        let at = |conds: Vec<PolicyCondition>, reports: &BTreeMap<String, Report>, observed| {
            let result = PolicyResult {
                conditions: conds,
                pods: pods.clone(),
                warnings: vec![],
            };
            let s = policy_status(
                &result,
                Some(observed),
                &|_| Some("v1".into()),
                reports,
                false,
                None,
                Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                None,
            );
            (kstatus(&s, 7), s)
        };
        let reason = |s: &ApiPolicyStatus, t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| c.reason.clone())
        };

        let (health, s) = at(vec![invalid], &acked, 7);
        assert_eq!(health, "Failed", "an invalid spec fails at once: {s:?}");
        assert_eq!(reason(&s, "Stalled").as_deref(), Some("Invalid"));
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.message.contains("spec.rules[0]"))
        );
        let (health, s) = at(vec![accepted.clone()], &refused, 7);
        assert_eq!(health, "Failed", "a config sidecars refuse fails: {s:?}");
        assert_eq!(reason(&s, "Stalled").as_deref(), Some("SidecarRejected"));

        let (health, s) = at(vec![accepted.clone()], &half, 7);
        assert_eq!(health, "InProgress", "1 of 2 sidecars acked: {s:?}");
        assert_eq!(reason(&s, "Reconciling").as_deref(), Some("Pending"));
        let (health, _) = at(vec![accepted.clone(), missing_secret], &acked, 7);
        assert_eq!(health, "InProgress", "a Secret that may still be created");
        let (health, _) = at(vec![accepted.clone()], &acked, 6);
        assert_eq!(health, "InProgress", "status of an older generation");

        let (health, s) = at(vec![accepted], &acked, 7);
        assert_eq!(health, "Current", "{s:?}");
        assert!(
            !s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" || c.type_ == "Reconciling"),
            "both are present only while true"
        );
    }
}
