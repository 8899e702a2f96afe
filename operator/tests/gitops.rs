//! GitOps health: the Argo CD health check shipped in examples/gitops/argocd/health.lua,
//! run in a real Lua interpreter (the PyPI package `lupa`, as Argo CD runs Lua) on the
//! statuses the operator's own status code writes, reads each state as Argo CD should.
//! Needs python3 with lupa: `./scripts/test` installs it into `target/helm-venv` (or set
//! `APIWARD_HELM_PYTHON`).

use std::collections::BTreeMap;
use std::process::Command;

use apiward::compile::{PolicyCondition, PolicyResult};
use apiward_policy::Report;
use serde_json::{Value, json};

mod common;
use common::{python, repo};

/// Argo CD's verdict on an ApiPolicy at `generation` with `status`.
fn argocd_health(generation: i64, status: &Value) -> (String, String) {
    let obj = json!({"apiVersion": "apiward.io/v1alpha1", "kind": "ApiPolicy",
                     "metadata": {"name": "inventory-api", "namespace": "store", "generation": generation},
                     "status": status});
    let out = Command::new(python())
        .arg(repo().join("charts/tests/argocd_health.py"))
        .arg(repo().join("examples/gitops/argocd/health.lua"))
        .arg(obj.to_string())
        .output()
        .expect("python3 (./scripts/test installs it with lupa)");
    assert!(
        out.status.success(),
        "argocd_health.py failed: {}\nThese tests need the PyPI package lupa: ./scripts/test installs it into target/helm-venv",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["status"].as_str().unwrap().to_owned(),
        v["message"].as_str().unwrap_or("").to_owned(),
    )
}

fn report(pod: &str, version: &str) -> Report {
    serde_json::from_value(json!({
        "apiVersion": apiward_policy::report::REPORT_API_VERSION,
        "workload": {"namespace": "store", "name": pod, "serviceAccount": "inventory"},
        "configVersion": version,
    }))
    .unwrap()
}

/// The status the operator writes for generation 7 with `conditions` from the compiler and
/// the sidecars' `reports`.
fn status(conditions: Vec<PolicyCondition>, reports: &BTreeMap<String, Report>) -> Value {
    let result = PolicyResult {
        conditions,
        pods: vec!["store/inventory-0".into(), "store/inventory-1".into()],
        warnings: vec![],
    };
    let s = apiward::status::policy_status(
        &result,
        Some(7),
        &|_| Some("v7".into()),
        reports,
        false,
        None,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
        None,
    );
    serde_json::to_value(s).unwrap()
}

#[test]
fn argo_cd_reads_the_operators_status_as_degraded_progressing_or_healthy() {
    let accepted = PolicyCondition {
        type_: apiward_crds::conditions::ACCEPTED,
        status: true,
        reason: apiward_crds::conditions::reasons::ACCEPTED,
        message: String::new(),
    };
    let invalid = PolicyCondition {
        status: false,
        reason: apiward_crds::conditions::reasons::INVALID,
        message: "spec.rules[1].to[0].paths[0]: not a path template".into(),
        ..accepted.clone()
    };
    let both: BTreeMap<String, Report> = ["inventory-0", "inventory-1"]
        .map(|p| (format!("store/{p}"), report(p, "v7")))
        .into();
    let one: BTreeMap<String, Report> =
        [("store/inventory-0".to_owned(), report("inventory-0", "v7"))].into();

    let (health, message) = argocd_health(7, &status(vec![invalid], &both));
    assert_eq!(health, "Degraded");
    assert!(
        message.contains("spec.rules[1]"),
        "the field reaches Argo CD: {message}"
    );

    let (health, message) = argocd_health(7, &status(vec![accepted.clone()], &one));
    assert_eq!(health, "Progressing");
    assert!(message.contains("1 of 2"), "{message}");

    let (health, message) = argocd_health(7, &status(vec![accepted.clone()], &both));
    assert_eq!(health, "Healthy", "{message}");
    assert!(message.contains("2 of 2"), "{message}");

    // A status for an older generation is never taken for the current spec's.
    let (health, _) = argocd_health(8, &status(vec![accepted], &both));
    assert_eq!(health, "Progressing");
    // No status yet (the operator has not seen it).
    let (health, _) = argocd_health(1, &Value::Null);
    assert_eq!(health, "Progressing");
}
