//! The synthetic cluster the compile and scale benchmarks share: 10 namespaces × 100
//! policies (5 rules, a quota, JWT, declared API, limits, filter), each selecting 10 pods.
#![allow(dead_code)]

use std::collections::BTreeMap;

use apiward::compile::{Inputs, Workload};
use apiward_crds::ApiPolicy;

pub const NAMESPACES: usize = 10;
pub const POLICIES_PER_NS: usize = 100;
pub const PODS_PER_POLICY: usize = 10;

pub fn policy(ns: usize, i: usize) -> ApiPolicy {
    let yaml = format!(
        r#"apiVersion: apiward.io/v1alpha1
kind: ApiPolicy
metadata: {{name: api-{i}, namespace: ns-{ns}}}
spec:
  targetRef: {{selector: {{matchLabels: {{app: app-{i}}}}}, ports: [8080]}}
  authentication:
    jwt:
      - name: corp
        issuer: https://login.example/
        jwksUri: https://login.example/jwks.json
        audiences: [app-{i}]
  api:
    endpoints:
      - {{method: GET, path: "/items/{{itemId}}"}}
      - {{method: POST, path: "/items"}}
  rules:
    - name: own-items
      from: [{{jwt: {{provider: corp, claims: {{scope: items}}}}}}]
      to: [{{methods: [GET, PUT], paths: ["/users/{{userId}}/items"]}}]
      bind: [{{pathParam: userId, claim: sub}}]
    - name: read
      from: [{{jwt: {{provider: corp}}}}]
      to: [{{methods: [GET], paths: ["/items/{{itemId}}"]}}]
    - name: writer
      from: [{{serviceAccounts: ["ns-{ns}/writer-{i}"]}}]
      to: [{{methods: [POST], paths: ["/items"]}}]
    - name: ops
      from: [{{namespaces: [ops]}}]
      to: [{{methods: [GET], paths: ["/metrics", "/debug/**"]}}]
    - name: no-admin
      action: Deny
      to: [{{paths: ["/admin/**"]}}]
  quotas:
    - name: per-user
      key: {{claim: sub}}
      limit: {{requests: 100, per: 1m, burst: 20}}
  requestLimits: {{maxBodyBytes: 65536, contentTypes: [application/json]}}
  responseFilter: {{removeFields: [/internal]}}
"#
    );
    serde_norway::from_str(&yaml).unwrap()
}

pub fn inputs() -> Inputs {
    let mut inputs = Inputs {
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    for ns in 0..NAMESPACES {
        for i in 0..POLICIES_PER_NS {
            inputs.policies.push(policy(ns, i));
            for r in 0..PODS_PER_POLICY {
                inputs.workloads.push(Workload {
                    namespace: format!("ns-{ns}"),
                    name: format!("app-{i}-{r}"),
                    labels: BTreeMap::from([
                        ("app".into(), format!("app-{i}")),
                        ("tier".into(), "web".into()),
                    ]),
                    service_account: format!("app-{i}"),
                    ports: vec![8080, 9090],
                });
            }
        }
    }
    inputs
}

/// A `/proc/self/status` memory field (`VmRSS`, `VmHWM`), MiB.
pub fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak RSS so far, MiB.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM")
}
