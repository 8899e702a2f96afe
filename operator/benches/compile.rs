//! Compiling 10,000 pods × 1,000 policies (budget ≤ 2 s) and recompiling after one policy
//! changes (budget ≤ 50 ms). Peak RSS is printed at the end (VmHWM).

use std::collections::BTreeMap;
use std::hint::black_box;

use apiward::compile::{Compiler, Inputs, Workload, compile};
use apiward_crds::ApiPolicy;
use criterion::{Criterion, criterion_group, criterion_main};

const NAMESPACES: usize = 10;
const POLICIES_PER_NS: usize = 100;
const PODS_PER_POLICY: usize = 10;

fn policy(ns: usize, i: usize) -> ApiPolicy {
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

fn inputs() -> Inputs {
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

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();
    assert_eq!(inputs.workloads.len(), 10_000);
    assert_eq!(inputs.policies.len(), 1_000);
    let out = compile(&inputs);
    assert_eq!(out.configs.len(), 10_000);
    assert!(
        out.configs
            .values()
            .all(|c| c.ports.iter().any(|p| p.port == 8080 && p.rules.len() == 5))
    );

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("full_10000_pods_1000_policies", |b| {
        b.iter(|| black_box(compile(black_box(&inputs))).configs.len())
    });

    let mut compiler = Compiler::from_inputs(&inputs);
    let mut n = 0u64;
    g.bench_function("incremental_one_policy_change", |b| {
        b.iter(|| {
            n += 1;
            let mut p = policy(3, 42);
            p.spec.quotas[0].limit.requests = 100 + n;
            let changed = compiler.upsert_policy(p);
            assert_eq!(changed.len(), PODS_PER_POLICY);
            changed
        })
    });
    g.finish();
    eprintln!(
        "peak RSS (VmHWM) after building 10,000 configs several times: {:.1} MiB",
        peak_rss_mib()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
