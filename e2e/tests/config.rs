//! Config push end to end on loopback: the operator's config server (real TLS, HTTP/2
//! streams) and real sidecars that take their policy from it and report back.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use apiward::identity::{AUDIENCE, Ca, LocalTokens};
use apiward::serve::config::ConfigHub;
use apiward_e2e::mesh::serve_app_conn;
use apiward_e2e::{now, start_operator, tempdir};
use apiward_policy::SidecarConfig;
use apiward_policy::config::Workload;
use common::mesh_client;
use serde_json::{Value, json};

fn workload(name: &str, sa: &str) -> Workload {
    Workload {
        namespace: "shop".into(),
        name: name.into(),
        service_account: sa.into(),
    }
}

/// A config for `shop/<pod>` that lets anyone (plaintext) GET `paths` on `app_port`.
fn config(pod: &str, sa: &str, version: &str, app_port: u16, paths: &[&str]) -> SidecarConfig {
    serde_json::from_value(json!({
        "apiVersion": "apiward.io/sidecar/v1alpha1",
        "version": version,
        "workload": {"namespace": "shop", "name": pod, "serviceAccount": sa},
        "trustDomain": "cluster.local",
        "ports": [{
            "port": app_port, "policies": ["shop/orders"], "mtls": "Disabled", "mode": "Enforce",
            "rules": [{"policy": "shop/orders", "name": "reads", "action": "Allow",
                       "to": [{"methods": ["GET"], "paths": paths}]}]
        }]
    }))
    .unwrap()
}

/// Publishes configs for `orders-0` (the sidecar under test) and `users-0` (another
/// workload, whose config holds a "secret" rule name).
fn publish(hub: &ConfigHub, version: &str, app_port: u16, paths: &[&str]) {
    let mut configs = std::collections::BTreeMap::new();
    configs.insert(
        "shop/orders-0".to_string(),
        config("orders-0", "orders", version, app_port, paths),
    );
    configs.insert(
        "shop/users-0".to_string(),
        config("users-0", "users", "users-secret-v1", 1, &["/users-only"]),
    );
    hub.publish(
        &[workload("orders-0", "orders"), workload("users-0", "users")],
        &configs,
    );
}

async fn start_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_app_conn(tcp, hits.clone()));
        }
    });
    addr
}

/// Settings with no policy: identity and config come from the operator on `operator`.
fn settings(
    dir: &Path,
    app: SocketAddr,
    operator: SocketAddr,
    ca_file: &Path,
) -> std::path::PathBuf {
    let s = json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "identity": {"url": format!("https://localhost:{}", operator.port()), "tokenFile": dir.join("token"), "caFile": ca_file},
        "control": {"pod": "orders-0", "reportInterval": "200ms"},
    });
    let path = dir.join("sidecar.json");
    std::fs::write(&path, s.to_string()).unwrap();
    path
}

/// Polls `f` every 20 ms until it holds, for at most `limit`; returns how long it took.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The operator's identity and config server on a free loopback port.
async fn operator(ca: Ca, tokens: LocalTokens) -> apiward_e2e::Operator {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    start_operator(ca, tokens, any, &["localhost"], Duration::from_secs(3600)).await
}

/// An operator, the app of pod `shop/orders-0`, and that pod's token and trust bundle in
/// `dir` (what the kubelet would mount); returns the trust bundle's path.
async fn orders_pod(dir: &Path) -> (std::path::PathBuf, SocketAddr, apiward_e2e::Operator) {
    let ca = Ca::generate("cluster.local", now()).unwrap();
    let tokens = LocalTokens::generate().unwrap();
    let token = tokens
        .mint("shop", "orders", Some("orders-0"), AUDIENCE, now(), 3600)
        .unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let ca_file = dir.join("trust-bundle.pem");
    std::fs::write(&ca_file, ca.trust_bundle_pem()).unwrap();
    let app = start_app().await;
    (ca_file, app, operator(ca, tokens).await)
}

async fn status(url: &str) -> u16 {
    reqwest::get(url).await.map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_follows_its_pushed_config_and_reports_back() {
    let dir = tempdir("config-push");
    let (ca_file, app, op) = orders_pod(&dir).await;
    let (_shared, bound) = apiward_sidecar::start(&settings(&dir, app, op.addr, &ca_file))
        .await
        .unwrap();
    let (base, admin) = (
        format!("http://{}", bound.inbound),
        format!("http://{}", bound.admin),
    );

    // No config yet: not ready, and every request is refused (fail closed: with no policy
    // the port is Strict, so a plaintext caller does not even get an HTTP answer).
    assert_eq!(status(&format!("{admin}/ready")).await, 503);
    assert_eq!(status(&format!("{base}/a")).await, 0);

    publish(&op.hub, "v1", app.port(), &["/a"]);
    let took = eventually(Duration::from_secs(10), "ready with v1", || async {
        status(&format!("{admin}/ready")).await == 200
    })
    .await;
    println!("first config applied {took:?} after it was published");
    assert_eq!(status(&format!("{base}/a")).await, 200);
    assert_eq!(status(&format!("{base}/b")).await, 403);

    // A change reaches the sidecar through the open stream.
    let published = Instant::now();
    publish(&op.hub, "v2", app.port(), &["/a", "/b"]);
    eventually(Duration::from_secs(10), "v2 applied", || async {
        status(&format!("{base}/b")).await == 200
    })
    .await;
    println!(
        "config change applied {:?} after it was published",
        published.elapsed()
    );
    eventually(Duration::from_secs(10), "v2 acknowledged", || async {
        op.hub
            .reports()
            .get("shop/orders-0")
            .and_then(|r| r.config_version.clone())
            == Some("v2".into())
    })
    .await;
    let report = &op.hub.reports()["shop/orders-0"];
    assert_eq!(report.workload.service_account, "orders");
    assert!(
        report.certificate.is_some(),
        "the report carries the certificate in force"
    );

    // An invalid config is refused and reported; v2 keeps serving.
    let mut bad = config("orders-0", "orders", "v3-bad", app.port(), &["/a"]);
    bad.ports[0].rules[0].to[0].paths = vec!["/a/{unclosed".into()];
    let mut configs = std::collections::BTreeMap::new();
    configs.insert("shop/orders-0".to_string(), bad);
    op.hub.publish(&[workload("orders-0", "orders")], &configs);
    eventually(Duration::from_secs(10), "the refusal reported", || async {
        op.hub
            .reports()
            .get("shop/orders-0")
            .and_then(|r| r.rejected_config.clone())
            .is_some_and(|r| r.version == "v3-bad")
    })
    .await;
    let report = &op.hub.reports()["shop/orders-0"];
    assert_eq!(report.config_version.as_deref(), Some("v2"));
    let reason = &report.rejected_config.as_ref().unwrap().reason;
    assert!(
        reason.contains("paths"),
        "the reason names the field: {reason}"
    );
    assert_eq!(status(&format!("{base}/b")).await, 200, "v2 still enforced");
    let dump: Value = reqwest::get(format!("{admin}/config_dump"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dump["version"], "v2");
}

#[tokio::test]
async fn a_sidecar_can_read_only_its_own_pods_config() {
    let ca = Ca::generate("cluster.local", now()).unwrap();
    let tokens = LocalTokens::generate().unwrap();
    let op = operator(ca, tokens).await;
    publish(&op.hub, "v1", 8080, &["/a"]);
    let url = |pod: &str| format!("https://localhost:{}/v1/config?pod={pod}", op.addr.port());
    let orders = mesh_client(&op.ca, "orders");
    let code = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or_default();
        (status, v["error"].as_str().unwrap_or_default().to_owned())
    };
    // Another workload's pod: refused, and its config never sent.
    let r = orders.get(url("users-0")).send().await.unwrap();
    assert_eq!(code(r).await, (403, "not_your_pod".into()));
    let r = orders.get(url("nobody-0")).send().await.unwrap();
    assert_eq!(code(r).await, (404, "pod_not_found".into()));
    // Without a client certificate: refused.
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([
            reqwest::Certificate::from_pem(op.ca.trust_bundle_pem().as_bytes()).unwrap(),
        ])
        .build()
        .unwrap();
    let r = anonymous.get(url("orders-0")).send().await.unwrap();
    assert_eq!(code(r).await, (401, "client_certificate_required".into()));
    // Its own pod: the config, as the first line of the stream.
    let mut r = orders.get(url("orders-0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut line = Vec::new();
    while !line.contains(&b'\n') {
        line.extend_from_slice(&r.chunk().await.unwrap().expect("a config line"));
    }
    let cfg: SidecarConfig = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
    assert_eq!(
        (cfg.workload.name.as_str(), cfg.version.as_str()),
        ("orders-0", "v1")
    );
    assert!(!String::from_utf8_lossy(&line).contains("users-only"));
    // A report about another pod is refused.
    let report = json!({"apiVersion": "apiward.io/report/v1alpha1",
                        "workload": {"namespace": "shop", "name": "users-0", "serviceAccount": "users"}});
    let r = orders
        .post(format!("https://localhost:{}/v1/reports", op.addr.port()))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (403, "not_your_pod".into()));
    assert!(op.hub.reports().is_empty());
}

/// The mesh table the cluster index computes for a Service `shop/<app>` on
/// `10.96.0.<octet>`, backed by injected pods `<app>-0`, `<app>-1` running as `sas`.
fn mesh_table(app: &str, octet: u8, sas: &[&str]) -> apiward_policy::mesh::MeshTable {
    let mut index = apiward::index::ClusterIndex::new("cluster.local");
    for (i, sa) in sas.iter().enumerate() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{app}-{i}"), "namespace": "shop", "labels": {"app": app},
                         "annotations": {"apiward.io/status": "injected"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        index.apply_pod(&pod);
    }
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": app, "namespace": "shop"},
        "spec": {"clusterIP": format!("10.96.0.{octet}"), "selector": {"app": app},
                 "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    index.apply_service(&svc);
    index.take_mesh_table().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_table_reaches_sidecars_on_their_config_stream() {
    let dir = tempdir("mesh-table");
    let (ca_file, app, op) = orders_pod(&dir).await;
    // Published before the sidecar connects: it arrives with the first config.
    let first = mesh_table("users", 7, &["users"]);
    assert!(op.hub.publish_mesh(&first));
    assert!(
        !op.hub.publish_mesh(&first),
        "the same table is not sent again"
    );
    publish(&op.hub, "v1", app.port(), &["/a"]);

    let path = settings(&dir, app, op.addr, &ca_file);
    let mut s: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    s["outbound"] = json!({"listen": "127.0.0.1:0", "egress": {"default": "Allow"}});
    std::fs::write(&path, s.to_string()).unwrap();
    let (_shared, bound) = apiward_sidecar::start(&path).await.unwrap();
    let admin = format!("http://{}", bound.admin);
    let dump = || async {
        let v: Value = reqwest::get(format!("{admin}/config_dump"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        (
            v["version"].as_str().unwrap_or_default().to_owned(),
            v["mesh"]["version"].as_str().unwrap_or_default().to_owned(),
            v["mesh"]["services"].clone(),
        )
    };
    eventually(
        Duration::from_secs(10),
        "v1 and the first table",
        || async {
            let (v, m, _) = dump().await;
            v == "v1" && m == first.version
        },
    )
    .await;
    assert_eq!(dump().await.2, json!(["shop/users"]));

    // A second ServiceAccount behind the Service: a new table on the open stream; the
    // config in force is untouched, and the table is not taken for a config.
    let second = mesh_table("users", 7, &["users", "users-canary"]);
    assert_ne!(second.version, first.version);
    assert!(op.hub.publish_mesh(&second));
    eventually(Duration::from_secs(10), "the second table", || async {
        dump().await.1 == second.version
    })
    .await;
    assert_eq!(dump().await.0, "v1");
    eventually(Duration::from_secs(10), "v1 acknowledged", || async {
        op.hub
            .reports()
            .get("shop/orders-0")
            .and_then(|r| r.config_version.clone())
            == Some("v1".into())
    })
    .await;
    assert!(
        op.hub.reports()["shop/orders-0"].rejected_config.is_none(),
        "a mesh line is never refused as a config"
    );
}
