//! Config push to 100 connected sidecar clients over real mTLS (issue 6's budget: a
//! policy change reaches every one in ≤ 1 s). The operator's config server runs
//! in-process on loopback with its CA; 100 clients, each with its own workload
//! certificate (10 ServiceAccounts), hold an HTTP/2 config stream for their own pod as
//! sidecars do. A policy selecting all 100 pods changes in the cluster index (as its watch
//! event would), is compiled and published; the time until the last client has read its
//! new config line is the figure, over 30 changes.
//!
//! `cargo bench -p apiward-e2e --bench push`; prints the figures.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiward::identity::{Ca, LocalTokens};
use apiward::index::ClusterIndex;
use apiward_crds::ApiPolicy;
use apiward_e2e::{now, start_operator};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;

const CLIENTS: usize = 100;
const ROUNDS: u64 = 30;

fn policy(generation: i64, limit: u64) -> ApiPolicy {
    let mut p: ApiPolicy = serde_norway::from_str(&format!(
        r#"apiVersion: apiward.io/v1alpha1
kind: ApiPolicy
metadata: {{name: orders-api, namespace: shop, uid: 0f6c2a52-1111-4e5e-9d4e-000000000001}}
spec:
  targetRef: {{selector: {{matchLabels: {{app: orders}}}}, ports: [8080]}}
  rules:
    - name: checkout-creates-orders
      from: [{{serviceAccounts: ["shop/checkout"]}}]
      to: [{{methods: [POST], paths: ["/orders"]}}]
    - name: read
      from: [{{namespaces: [shop]}}]
      to: [{{methods: [GET], paths: ["/orders/{{orderId}}"]}}]
  quotas:
    - name: per-caller
      key: {{principal: true}}
      limit: {{requests: {limit}, per: 1m}}
"#
    ))
    .unwrap();
    p.metadata.generation = Some(generation);
    p
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("orders-{i}"), "namespace": "shop", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": format!("orders-{}", i % 10),
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": format!("10.0.{}.{}", i / 200, i % 200 + 1)},
    }))
    .unwrap()
}

/// Holds pod `i`'s config stream; sends the version of every config line it reads.
async fn sidecar_client(
    ca: Arc<Ca>,
    addr: SocketAddr,
    i: usize,
    seen: mpsc::UnboundedSender<(usize, String)>,
) {
    let client = common::mesh_client_builder(&ca, &format!("orders-{}", i % 10))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/v1/config?pod=orders-{i}", addr.port());
    let mut r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "pod {i}");
    assert_eq!(
        r.version(),
        http::Version::HTTP_2,
        "sidecars stream over HTTP/2"
    );
    let mut buf = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let _ = seen.send((i, v["version"].as_str().unwrap().to_owned()));
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("push: benchmark");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = Ca::generate("cluster.local", now()).unwrap();
        let op = start_operator(
            ca,
            LocalTokens::generate().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &["localhost"],
            Duration::from_secs(3600),
        )
        .await;
        let mut index = ClusterIndex::new("cluster.local");
        index.pods_relisting();
        for i in 0..CLIENTS {
            index.apply_pod(&pod(i));
        }
        index.pods_listed();
        index.policies_relisting();
        index.apply_policy(policy(1, 100));
        index.policies_listed();
        op.hub.publish(&index.workloads(), index.compiler().configs());

        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        for i in 0..CLIENTS {
            tokio::spawn(sidecar_client(op.ca.clone(), op.addr, i, tx.clone()));
        }
        let mut first = vec![None; CLIENTS];
        while first.iter().any(Option::is_none) {
            let (i, v) = rx.recv().await.unwrap();
            first[i] = Some(v);
        }
        let connected = t.elapsed();

        let mut times = Vec::new();
        for round in 0..ROUNDS {
            let before = first.clone();
            let t = Instant::now();
            let changed = index.apply_policy(policy(2 + round as i64, 200 + round)).pods;
            op.hub.publish(&index.workloads(), index.compiler().configs());
            assert_eq!(changed.len(), CLIENTS);
            let mut got = 0;
            while got < CLIENTS {
                let (i, v) = rx.recv().await.unwrap();
                if Some(&v) != before[i].as_ref() && first[i] == before[i] {
                    first[i] = Some(v);
                    got += 1;
                }
            }
            times.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("config push to {CLIENTS} sidecar clients over mTLS (HTTP/2 streams), {ROUNDS} policy changes:");
        println!("  {CLIENTS} clients connected and holding their first config: {:>7.1} ms", ms(connected));
        println!("  policy change → all {CLIENTS} clients have the new config:    median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            ms(times[times.len() / 2]), ms(times[times.len() * 9 / 10]), ms(times[times.len() - 1]));
    });
}
