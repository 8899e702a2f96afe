//! Decision latency against a config with 1,000 rules (budget: ≤ 2 µs median).

use std::hint::black_box;
use std::net::IpAddr;

use apiward_policy::config::*;
use apiward_policy::engine::{Engine, Identity, JwtIdentity, NoTrace, Request};
use apiward_policy::quota::LocalQuotas;
use criterion::{Criterion, criterion_group, criterion_main};

fn config(rules: usize) -> SidecarConfig {
    let mut rs = Vec::with_capacity(rules);
    for i in 0..rules {
        let (from, bind) = if i % 2 == 0 {
            (
                vec![Source {
                    jwt: Some(JwtMatch {
                        provider: "ns/p/corp".into(),
                        claims: [("scope".into(), format!("svc{i}"))].into(),
                    }),
                    ..Default::default()
                }],
                vec![Binding {
                    source: BindSource::PathParam("userId".into()),
                    claim: "sub".into(),
                }],
            )
        } else {
            (
                vec![Source {
                    principals: vec![format!("spiffe://cluster.local/ns/shop/sa/svc{i}")],
                    ..Default::default()
                }],
                vec![],
            )
        };
        rs.push(RuleConfig {
            policy: "shop/p".into(),
            name: format!("rule-{i}"),
            action: if i % 50 == 49 {
                Action::Deny
            } else {
                Action::Allow
            },
            audit: false,
            from,
            to: vec![Operation {
                methods: vec!["GET".into(), "PUT".into()],
                paths: vec![
                    format!("/svc{i}/users/{{userId}}"),
                    format!("/svc{i}/items/*/meta"),
                ],
                headers: vec![],
            }],
            bind,
        });
    }
    SidecarConfig {
        api_version: SIDECAR_CONFIG_API_VERSION.into(),
        version: "bench".into(),
        workload: Workload {
            namespace: "shop".into(),
            name: "p-0".into(),
            service_account: "p".into(),
        },
        trust_domain: "cluster.local".into(),
        default_mtls: MtlsMode::Strict,
        ports: vec![PortPolicy {
            port: 8080,
            policies: vec!["shop/p".into()],
            mtls: MtlsMode::Strict,
            mode: Mode::Enforce,
            jwt_providers: vec!["ns/p/corp".into()],
            api_key_providers: vec![],
            rules: rs,
            quotas: vec![QuotaConfig {
                policy: "shop/p".into(),
                name: "per-user".into(),
                matches: vec![],
                key: QuotaKey::Claim("sub".into()),
                requests: u64::MAX / 4,
                period_ms: 60_000,
                burst: 0,
                window: Window::Rolling,
                scope: QuotaScope::Local,
                on_exceed: OnExceed::Reject,
                on_store_error: Default::default(),
                audit: false,
            }],
            limits: RequestLimits::default(),
            response: ResponseFilter::default(),
            api: ApiSurface::default(),
        }],
        jwt_providers: vec![],
        api_key_providers: vec![],
        egress: EgressPolicy::default(),
        requires: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let cfg = config(1_000);
    let engine = Engine::new(&cfg).unwrap();
    let quotas = LocalQuotas::new(100_000);
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"sub":"42","scope":"svc500 email"}"#).unwrap();
    let headers: Vec<(&str, &str)> = vec![("accept", "application/json"), ("user-agent", "bench")];
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let req = |path: &'static str, peer: Option<&'static str>, jwt: bool| Request {
        port: 8080,
        method: "GET",
        path,
        query: None,
        headers: &headers,
        identity: Identity {
            peer,
            jwt: jwt.then_some(JwtIdentity {
                provider: "ns/p/corp",
                claims: &claims,
            }),
            api_key: None,
        },
        source_ip: ip,
        now_ms: 1_800_000_000_000,
    };
    let mut g = c.benchmark_group("decide_1000_rules");
    let allow = req("/svc500/users/42", None, true);
    assert!(engine.decide(&allow, &quotas, &mut NoTrace).allowed());
    g.bench_function("jwt_bind_allow_with_quota", |b| {
        b.iter(|| black_box(engine.decide(black_box(&allow), &quotas, &mut NoTrace)).allowed())
    });
    let bola = req("/svc500/users/43", None, true);
    assert!(!engine.decide(&bola, &quotas, &mut NoTrace).allowed());
    g.bench_function("jwt_bind_deny_bola", |b| {
        b.iter(|| black_box(engine.decide(black_box(&bola), &quotas, &mut NoTrace)).allowed())
    });
    let mtls = req(
        "/svc501/items/abc/meta",
        Some("spiffe://cluster.local/ns/shop/sa/svc501"),
        false,
    );
    assert!(engine.decide(&mtls, &quotas, &mut NoTrace).allowed());
    g.bench_function("mtls_allow_glob", |b| {
        b.iter(|| black_box(engine.decide(black_box(&mtls), &quotas, &mut NoTrace)).allowed())
    });
    let miss = req(
        "/nowhere/at/all",
        Some("spiffe://cluster.local/ns/shop/sa/x"),
        false,
    );
    g.bench_function("default_deny", |b| {
        b.iter(|| black_box(engine.decide(black_box(&miss), &quotas, &mut NoTrace)).allowed())
    });
    let encoded = req("/svc500/users/%34%32/../43", None, true);
    g.bench_function("normalize_then_deny", |b| {
        b.iter(|| black_box(engine.decide(black_box(&encoded), &quotas, &mut NoTrace)).allowed())
    });
    g.finish();
    c.bench_function("engine_build_1000_rules", |b| {
        b.iter(|| Engine::new(black_box(&cfg)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
