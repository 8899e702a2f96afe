//! Status that only the sidecars can tell: conditions derived from their `Report`s. The
//! status writer (leader) adds these to the compiler's conditions for each policy.

use apiward_crds as crds;
use apiward_policy::report::Report;

use crate::compile::PolicyCondition;

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
