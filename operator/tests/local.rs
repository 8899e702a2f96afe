//! Local mode's sources: policy files and a mesh file compiled into the config hub, with
//! status written next to each policy file, as reports arrive and as files change.

use std::path::{Path, PathBuf};

use apiward::local::{LocalSources, StatusFile, status_path};
use apiward::serve::config::ConfigHub;
use apiward::serve::parse_spiffe;
use apiward_policy::report::Report;

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "apiward-local-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The shop's users policy and the Secret it references, and two users pods.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let shop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for f in ["users.yaml", "corp-jwks.yaml"] {
        std::fs::copy(shop.join(f), policies.join(f)).unwrap();
    }
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        "workloads:\n\
         - {namespace: shop, name: users-0, labels: {app: users}, serviceAccount: users, ports: [8080]}\n\
         - {namespace: shop, name: users-1, labels: {app: users}, serviceAccount: users, ports: [8080]}\n\
         - {namespace: shop, name: orders-0, labels: {app: orders}, serviceAccount: orders, ports: [8080]}\n",
    )
    .unwrap();
    (policies, mesh)
}

fn status(policies: &Path) -> StatusFile {
    let text = std::fs::read_to_string(status_path(&policies.join("users.yaml"))).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn condition(s: &StatusFile, type_: &str) -> (String, String, String) {
    let c = s.policies["shop/users-api"]
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn ack(hub: &ConfigHub, pod: &str) {
    let version = hub.version(&format!("shop/{pod}")).unwrap();
    let report: Report = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiward.io/report/v1alpha1",
        "workload": {"namespace": "shop", "name": pod, "serviceAccount": "users"},
        "configVersion": version,
    }))
    .unwrap();
    let caller = parse_spiffe("spiffe://cluster.local/ns/shop/sa/users").unwrap();
    hub.report(&caller, report).unwrap();
}

#[test]
fn policy_files_become_configs_and_acks_become_status() {
    let dir = tempdir("status");
    let (policies, mesh) = setup(&dir);
    let hub = ConfigHub::new("cluster.local");
    let mut sources = LocalSources::new(&policies, &mesh, "cluster.local");
    assert!(sources.scan());
    assert_eq!(sources.publish(&hub), 3, "every pod gets a config");
    let v1 = hub.version("shop/users-0").unwrap();
    sources.write_statuses(&hub);
    let s = status(&policies);
    assert_eq!(condition(&s, "Accepted").0, "True");
    let (st, reason, message) = condition(&s, "Programmed");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "Pending"));
    assert_eq!(message, "0 of 2 sidecars enforce the current config");
    assert_eq!(condition(&s, "Ready").0, "False");
    let targets = s.policies["shop/users-api"].targets.clone().unwrap();
    assert_eq!((targets.pods, targets.acked), (2, 0));

    ack(&hub, "users-0");
    sources.write_statuses(&hub);
    assert_eq!(
        condition(&status(&policies), "Programmed").2,
        "1 of 2 sidecars enforce the current config"
    );
    ack(&hub, "users-1");
    sources.write_statuses(&hub);
    let s = status(&policies);
    assert_eq!(condition(&s, "Programmed").0, "True");
    assert_eq!(condition(&s, "Ready").0, "True");
    assert_eq!(s.policies["shop/users-api"].observed_generation, Some(1));

    // A malformed edit changes nothing and is reported in the status file.
    let file = policies.join("users.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(
        &file,
        good.replace("  targetRef:\n", "  mode: Sometimes\n  targetRef:\n"),
    )
    .unwrap();
    sources.scan();
    sources.publish(&hub);
    sources.write_statuses(&hub);
    assert_eq!(
        hub.version("shop/users-0").unwrap(),
        v1,
        "no sidecar's config changed"
    );
    let s = status(&policies);
    assert!(
        s.errors.iter().any(|e| e.contains("Sometimes")),
        "{:?}",
        s.errors
    );
    assert_eq!(
        condition(&s, "Ready").0,
        "True",
        "the last good version is still enforced"
    );

    // A valid change is published: a new version, pending until acknowledged again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(
        &file,
        good.replace("audiences: [users]", "audiences: [users, users-v2]"),
    )
    .unwrap();
    assert!(sources.scan());
    sources.publish(&hub);
    sources.write_statuses(&hub);
    assert_ne!(hub.version("shop/users-0").unwrap(), v1);
    let s = status(&policies);
    assert!(s.errors.is_empty());
    assert_eq!(condition(&s, "Programmed").1, "Pending");
    assert_eq!(s.policies["shop/users-api"].observed_generation, Some(2));
}

#[test]
fn reported_inventory_is_in_the_status_and_apiward_inventory_shows_it() {
    let dir = tempdir("inventory");
    let (policies, mesh) = setup(&dir);
    let hub = ConfigHub::new("cluster.local");
    let mut sources = LocalSources::new(&policies, &mesh, "cluster.local");
    sources.scan();
    sources.publish(&hub);
    let entry = |path: &str, declared: bool, unauthenticated: u64| {
        serde_json::json!({"port": 8080, "method": "GET", "path": path, "declared": declared,
            "requests": 5, "responses": [0, 5, 0, 0, 0], "unauthenticated": unauthenticated,
            "denied": 0, "wouldDeny": 0, "firstSeen": 1_800_000_000, "lastSeen": 1_800_000_060})
    };
    for pod in ["users-0", "users-1"] {
        let report: Report = serde_json::from_value(serde_json::json!({
            "apiVersion": "apiward.io/report/v1alpha1",
            "workload": {"namespace": "shop", "name": pod, "serviceAccount": "users"},
            "inventory": [entry("/users/{userId}", true, 0), entry("/debug/vars", false, 5)],
        }))
        .unwrap();
        let caller = parse_spiffe("spiffe://cluster.local/ns/shop/sa/users").unwrap();
        hub.report(&caller, report).unwrap();
    }
    sources.write_statuses(&hub);
    let s = status(&policies);
    let inv = s.policies["shop/users-api"].inventory.clone().unwrap();
    let debug = inv
        .endpoints
        .iter()
        .find(|e| e.path == "/debug/vars")
        .unwrap();
    assert!(debug.shadow && debug.unauthenticated == 10, "{debug:?}");
    assert_eq!(debug.requests, 10, "summed over both pods");
    let users = inv
        .endpoints
        .iter()
        .find(|e| e.path == "/users/{userId}")
        .unwrap();
    assert!(users.declared && !users.shadow);
    assert_eq!(inv.summary.shadow, 1);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(["inventory", "--local"])
        .arg(&policies)
        .arg("users-api")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.contains("/debug/vars")
            && l.contains("shadow")
            && l.contains("unauthenticated")),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(["inventory", "--local"])
        .arg(&policies)
        .args(["-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shop/users-api"]["summary"]["shadow"], 1);
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(["inventory"])
        .output()
        .unwrap();
    assert_eq!(
        none.status.code(),
        Some(2),
        "a cluster is not readable yet: a usage error"
    );
}
