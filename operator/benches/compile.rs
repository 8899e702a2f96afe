//! Compiling 10,000 pods × 1,000 policies (budget ≤ 2 s) and recompiling after one policy
//! changes (budget ≤ 50 ms). Peak RSS is printed at the end (VmHWM).

use std::hint::black_box;

use apiward::compile::{Compiler, compile};
use criterion::{Criterion, criterion_group, criterion_main};

mod common;
use common::{PODS_PER_POLICY, inputs, peak_rss_mib, policy};

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
