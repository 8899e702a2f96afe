use super::*;
use apiward_crds::conditions as c;

pub(crate) fn policy(yaml: &str) -> ApiPolicy {
    serde_norway::from_str(yaml).unwrap()
}

pub(crate) const PAYMENTS: &str = r#"
apiVersion: apiward.io/v1alpha1
kind: ApiPolicy
metadata: {name: payments, namespace: shop, generation: 1, uid: u-1}
spec:
  targetRef: {selector: {matchLabels: {app: payments}}, ports: [8443]}
  rules:
    - name: checkout-charges
      from: [{serviceAccounts: ["shop/checkout"]}]
      to: [{methods: [POST], paths: ["/charges"]}]
"#;

pub(crate) fn pod(name: &str, app: &str, sa: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "ports": [{"containerPort": 8443}]}]},
        "status": {"phase": "Running"}
    }))
    .unwrap()
}

fn accepted(index: &ClusterIndex, pk: &str) -> (Option<i64>, bool, String) {
    let (generation, result) = index.policy_results().remove(pk).unwrap();
    let a = result
        .conditions
        .iter()
        .find(|x| x.type_ == c::ACCEPTED)
        .unwrap();
    (generation, a.status, a.message.clone())
}

#[test]
fn an_invalid_generation_changes_no_config_and_says_which_field() {
    let mut index = ClusterIndex::new("cluster.local");
    index.apply_pod(&pod("payments-0", "payments", "payments"));
    let applied = index.apply_policy(policy(PAYMENTS));
    assert_eq!(applied.pods, vec!["shop/payments-0".to_string()]);
    let before = index.compiler().configs()["shop/payments-0"]
        .version
        .clone();

    // Generation 2 has a path template the engine cannot use.
    let mut bad = policy(&PAYMENTS.replace("\"/charges\"", "\"/charges/{id\""));
    bad.metadata.generation = Some(2);
    let applied = index.apply_policy(bad);
    assert!(applied.pods.is_empty(), "no pod's config changes");
    assert!(applied.policies);
    assert_eq!(
        index.compiler().configs()["shop/payments-0"].version,
        before
    );
    let (generation, ok, message) = accepted(&index, "shop/payments");
    assert_eq!(generation, Some(2));
    assert!(!ok);
    assert!(
        message.contains("spec.rules[0].to[0].paths[0]") && message.contains("generation 1 stays"),
        "{message}"
    );

    // Fixed in generation 3: accepted again.
    let mut fixed = policy(PAYMENTS);
    fixed.metadata.generation = Some(3);
    index.apply_policy(fixed);
    let (generation, ok, _) = accepted(&index, "shop/payments");
    assert_eq!((generation, ok), (Some(3), true));
}

#[test]
fn a_policy_invalid_from_the_start_enforces_nothing() {
    let mut index = ClusterIndex::new("cluster.local");
    index.apply_pod(&pod("payments-0", "payments", "payments"));
    let unselected = index.compiler().configs()["shop/payments-0"]
        .version
        .clone();
    let applied = index.apply_policy(policy(
        &PAYMENTS.replace("\"/charges\"", "\"/charges/{id\""),
    ));
    assert!(applied.pods.is_empty());
    assert_eq!(
        index.compiler().configs()["shop/payments-0"].version,
        unselected,
        "the pod's config is the one of a pod no policy selects"
    );
    let (_, ok, message) = accepted(&index, "shop/payments");
    assert!(
        !ok && message.contains("nothing of it is in force"),
        "{message}"
    );
}

#[test]
fn only_referenced_secrets_are_kept_and_missing_ones_are_listed() {
    let mut index = ClusterIndex::new("cluster.local");
    let keys = |name: &str| -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "stringData": {"acme": "ak_live_acme_0123456789abcdef"}
        }))
        .unwrap()
    };
    // Before any policy references it, a Secret is dropped.
    assert_eq!(index.apply_secret(keys("partner-keys")), Applied::default());
    let with_keys = PAYMENTS.replace(
        "  rules:",
        "  authentication:\n    apiKeys:\n      - {name: partners, secretRef: {name: partner-keys}, header: x-api-key}\n  rules:",
    );
    index.apply_policy(policy(&with_keys));
    assert_eq!(
        index.missing_refs(),
        vec![(RefKind::Secret, "shop".into(), "partner-keys".into())]
    );
    assert!(index.apply_secret(keys("partner-keys")).policies);
    assert!(index.missing_refs().is_empty());
    // Unrelated Secrets stay out.
    assert_eq!(index.apply_secret(keys("other")), Applied::default());
    // The policy stops referencing it: forgotten.
    index.apply_policy(policy(PAYMENTS));
    assert!(index.missing_refs().is_empty());
    assert_eq!(
        index.delete_secret("shop", "partner-keys"),
        Applied::default()
    );
}

#[test]
fn a_relist_deletes_what_it_no_longer_contains() {
    let mut index = ClusterIndex::new("cluster.local");
    index.apply_policy(policy(PAYMENTS));
    index.apply_pod(&pod("payments-0", "payments", "payments"));
    index.apply_pod(&pod("payments-1", "payments", "payments"));
    index.pods_relisting();
    index.apply_pod(&pod("payments-1", "payments", "payments"));
    let gone = index.pods_listed();
    assert_eq!(gone.pods, vec!["shop/payments-0".to_string()]);
    assert_eq!(index.workloads().len(), 1);

    index.policies_relisting();
    let gone = index.policies_listed();
    assert!(gone.policies);
    assert_eq!(
        gone.pods,
        vec!["shop/payments-1".to_string()],
        "its pod is recompiled"
    );
    assert!(index.policy_results().is_empty());
}

#[test]
fn finished_pods_are_not_workloads() {
    let mut index = ClusterIndex::new("cluster.local");
    let mut p = pod("job-0", "payments", "payments");
    index.apply_pod(&p);
    assert_eq!(index.workloads().len(), 1);
    p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    index.apply_pod(&p);
    assert!(index.workloads().is_empty());
}
