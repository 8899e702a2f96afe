//! The operator at scale (issue 6's budget: ≤ 300 MiB, ≤ 1 s from a policy change to
//! every affected config pushed): 10,000 pods and 1,000 policies fed to the cluster index
//! as the watches would (Pod and ApiPolicy objects), published into the config hub with a
//! stream open for every pod (what 10,000 connected sidecars hold), then policy changes
//! timed from the watch event to the last affected stream holding its new config.
//!
//! `cargo bench -p apiward --bench scale`; prints the figures.

use std::sync::Arc;
use std::time::Instant;

use apiward::index::ClusterIndex;
use apiward::serve::config::ConfigHub;
use k8s_openapi::api::core::v1::Pod;

mod common;
use common::{inputs, peak_rss_mib, status_mib};

fn rss_mib() -> f64 {
    status_mib("VmRSS")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("scale: benchmark");
        return;
    }
    let before = rss_mib();
    let inputs = inputs();
    let pods: Vec<Pod> = inputs
        .workloads
        .iter()
        .map(|w| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": w.name, "namespace": w.namespace, "labels": w.labels,
                             "annotations": {"apiward.io/status": "injected"}},
                "spec": {"serviceAccountName": w.service_account, "containers": [{"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 9090}]}]},
                "status": {"phase": "Running"},
            }))
            .unwrap()
        })
        .collect();
    let policies: Vec<_> = inputs
        .policies
        .iter()
        .cloned()
        .map(|mut p| {
            p.metadata.generation = Some(1);
            p
        })
        .collect();
    drop(inputs);

    let hub = Arc::new(ConfigHub::new("cluster.local"));
    let mut index = ClusterIndex::new("cluster.local");
    let t = Instant::now();
    index.pods_relisting();
    for p in &pods {
        index.apply_pod(p);
    }
    index.pods_listed();
    index.policies_relisting();
    for p in &policies {
        index.apply_policy(p.clone());
    }
    index.policies_listed();
    // A Service per app (1,000), as the Service watch would list them.
    index.services_relisting();
    for (i, p) in policies.iter().enumerate() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": p.metadata.name, "namespace": p.metadata.namespace},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                     "selector": p.spec.target_ref.selector.match_labels,
                     "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
        index.apply_service(&svc);
    }
    index.services_listed();
    let listed = t.elapsed();
    let t = Instant::now();
    let table = index.take_mesh_table().unwrap();
    let first_table = t.elapsed();
    assert_eq!(table.destinations.len(), 1_000);
    let table_bytes = serde_json::to_vec(&table).unwrap().len();
    let t = Instant::now();
    let pushed = hub.publish(&index.workloads(), index.compiler().configs());
    let first_publish = t.elapsed();
    assert_eq!(pushed, 10_000);
    // One open stream per pod, as connected sidecars hold.
    let caller = |ns: &str, sa: &str| apiward::identity::SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: ns.into(),
        service_account: sa.into(),
    };
    let mut streams: Vec<_> = pods
        .iter()
        .map(|p| {
            let ns = p.metadata.namespace.clone().unwrap();
            let sa = p
                .spec
                .as_ref()
                .unwrap()
                .service_account_name
                .clone()
                .unwrap();
            let name = p.metadata.name.clone().unwrap();
            let mut rx = hub.subscribe(&caller(&ns, &sa), &name).unwrap();
            rx.borrow_and_update();
            (format!("{ns}/{name}"), rx)
        })
        .collect();
    // One pod restarting (a new pod, the old one gone): the mesh table recomputed.
    let mut tables = Vec::new();
    for round in 0..10 {
        let mut p = pods[round * 997].clone();
        p.metadata.name = Some(format!("{}-r{round}", p.metadata.name.clone().unwrap()));
        let t = Instant::now();
        index.apply_pod(&p);
        let table = index.take_mesh_table().unwrap();
        hub.publish_mesh(&table);
        tables.push(t.elapsed());
        let (ns, name) = (p.metadata.namespace.unwrap(), p.metadata.name.unwrap());
        index.delete_pod(&ns, &name);
    }
    tables.sort();
    drop(pods);
    let steady = rss_mib();

    // A change of one policy (10 pods), then of every policy in a namespace (1,000 pods).
    let mut one = Vec::new();
    for round in 0..20u64 {
        let mut p = policies[342].clone();
        p.spec.quotas[0].limit.requests = 1000 + round;
        p.metadata.generation = Some(2 + round as i64);
        let t = Instant::now();
        let changed = index.apply_policy(p).pods;
        hub.publish(&index.workloads(), index.compiler().configs());
        let updated = streams
            .iter_mut()
            .filter(|(k, _)| changed.contains(k))
            .filter(|(_, rx)| rx.has_changed().unwrap_or(false))
            .count();
        one.push(t.elapsed());
        assert_eq!((changed.len(), updated), (10, 10));
        for (_, rx) in streams.iter_mut() {
            rx.borrow_and_update();
        }
    }
    let t = Instant::now();
    let mut changed = Vec::new();
    for p in policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some("ns-3"))
    {
        let mut p = p.clone();
        p.spec.request_limits.as_mut().unwrap().max_body_bytes = Some(1 << 20);
        p.metadata.generation = Some(100);
        changed.extend(index.apply_policy(p).pods);
    }
    hub.publish(&index.workloads(), index.compiler().configs());
    let updated = streams
        .iter()
        .filter(|(_, rx)| rx.has_changed().unwrap_or(false))
        .count();
    let namespace_wide = t.elapsed();
    assert_eq!((changed.len(), updated), (1_000, 1_000));

    one.sort();
    println!("scale: 10,000 pods, 1,000 policies, 1,000 Services, 10,000 open config streams");
    println!(
        "  initial list → compiled index:        {:>8.1} ms",
        listed.as_secs_f64() * 1e3
    );
    println!(
        "  first publish (10,000 configs):       {:>8.1} ms",
        first_publish.as_secs_f64() * 1e3
    );
    println!(
        "  one policy changed → its 10 streams:  {:>8.2} ms median, {:.2} ms max (20 rounds)",
        one[one.len() / 2].as_secs_f64() * 1e3,
        one[one.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "  100 policies changed → 1,000 streams: {:>8.1} ms",
        namespace_wide.as_secs_f64() * 1e3
    );
    println!(
        "  mesh table (1,000 Services): first {:.1} ms, {} KiB; after a pod change {:.1} ms median (10 rounds)",
        first_table.as_secs_f64() * 1e3,
        table_bytes / 1024,
        tables[tables.len() / 2].as_secs_f64() * 1e3
    );
    println!(
        "  RSS: {before:.1} MiB at start, {steady:.1} MiB with the index, hub and streams; peak {:.1} MiB",
        peak_rss_mib()
    );
}
