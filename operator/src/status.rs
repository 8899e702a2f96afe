//! A policy's status: the compiler's conditions (`Accepted`, `ResolvedRefs`) plus what
//! only the sidecars can tell, from their `Report`s: `Programmed` (how many of the selected
//! pods enforce the config published for them), `Ready`, `QuotaStoreUnavailable`, and the
//! target counts. The same code writes status in a cluster and in local mode.

use std::collections::BTreeMap;

use apiward_crds::{self as crds, ApiPolicyStatus, Targets};
use apiward_policy::report::Report;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::compile::{PolicyCondition, PolicyResult};

/// Most warnings kept in a status.
const MAX_WARNINGS: usize = 32;

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

/// The whole status of a policy. `previous` keeps each condition's transition time while
/// its status does not change.
pub fn policy_status(
    result: &PolicyResult,
    generation: Option<i64>,
    published: &dyn Fn(&str) -> Option<String>,
    reports: &BTreeMap<String, Report>,
    has_global_quotas: bool,
    previous: Option<&ApiPolicyStatus>,
    now: Time,
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
        inventory: None,
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
        }
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
}
