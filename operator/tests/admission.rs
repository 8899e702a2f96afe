//! Admission and `apiward check` give the same verdict: the policy validator (`POST
//! /validate` on the operator's 9443 server) over real HTTPS, its certificate signed by the
//! mesh CA and verified as the API server verifies `caBundle`, sent AdmissionReview bodies
//! shaped as kube-apiserver sends them (server-set metadata, defaults applied, `dryRun`),
//! against the `apiward` binary run on the same files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apiward::cluster::metrics::OperatorMetrics;
use apiward::identity::Ca;
use apiward::serve::webhook::{self, WebhookOptions};
use serde_json::{Value, json};

const NS: &str = "apiward-system";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

struct Validator {
    client: reqwest::Client,
    url: String,
}

async fn validator() -> Validator {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = Arc::new(Ca::generate("cluster.local", now).unwrap());
    let names = webhook::names("apiward-webhook", NS);
    let tls = webhook::tls(ca.clone(), names.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = WebhookOptions {
        listen: addr,
        namespace: NS.into(),
        service: "apiward-webhook".into(),
        configuration: None,
        validating_configuration: None,
        sidecar: serde_json::from_value(json!({
            "image": "sidecar:1", "controlUrl": "https://apiward:15012", "trustDomain": "cluster.local"}))
        .unwrap(),
        cert_dir: None,
        injected: None,
    };
    tokio::spawn(webhook::serve(
        listener,
        tls,
        Arc::new(opts),
        Arc::new(OperatorMetrics::default()),
    ));
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap(),
        )
        .resolve(&names[0], addr)
        .build()
        .unwrap();
    Validator {
        client,
        url: format!("https://{}:{}/validate", names[0], addr.port()),
    }
}

/// What kube-apiserver adds to an object before admission: server-set metadata and the
/// CRD's defaults (the ones that matter here).
fn as_stored(mut object: Value, generation: i64) -> Value {
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.entry("namespace").or_insert(json!("default"));
    meta.insert("uid".into(), json!("9f1c6e0a-1d2b-4c3d-8e4f-5a6b7c8d9e0f"));
    meta.insert("generation".into(), json!(generation));
    meta.insert("creationTimestamp".into(), json!("2026-12-02T12:00:00Z"));
    meta.insert(
        "managedFields".into(),
        json!([{"manager": "kubectl-client-side-apply", "operation": "Update",
                "apiVersion": "apiward.io/v1alpha1", "time": "2026-12-02T12:00:00Z",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {".": {}}}}]),
    );
    let spec = object["spec"].as_object_mut().unwrap();
    spec.entry("mode").or_insert(json!("Enforce"));
    spec.entry("mtls").or_insert(json!("Strict"));
    object
}

fn review(object: &Value, operation: &str, dry_run: bool) -> Value {
    let ns = object["metadata"]["namespace"].clone();
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "3c2a9a8e-54c7-4a8e-9a1b-2f3d4e5f6a7b",
            "kind": {"group": "apiward.io", "version": "v1alpha1", "kind": "ApiPolicy"},
            "resource": {"group": "apiward.io", "version": "v1alpha1", "resource": "apipolicies"},
            "requestKind": {"group": "apiward.io", "version": "v1alpha1", "kind": "ApiPolicy"},
            "requestResource": {"group": "apiward.io", "version": "v1alpha1", "resource": "apipolicies"},
            "name": object["metadata"]["name"], "namespace": ns, "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters", "system:authenticated"]},
            "object": object,
            "oldObject": if operation == "UPDATE" { object.clone() } else { Value::Null },
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1",
                        "kind": if operation == "UPDATE" { "UpdateOptions" } else { "CreateOptions" },
                        "fieldManager": "kubectl-client-side-apply", "fieldValidation": "Strict"},
        }
    })
}

impl Validator {
    /// The review's `response`.
    async fn send(&self, body: &Value) -> Value {
        let resp = self
            .client
            .post(&self.url)
            .json(body)
            .send()
            .await
            .expect("HTTPS to the validator, its certificate verified against the CA");
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        let r = answer["response"].clone();
        assert_eq!(r["uid"], "3c2a9a8e-54c7-4a8e-9a1b-2f3d4e5f6a7b");
        r
    }
}

/// The ApiPolicy documents of a file.
fn policies_in(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).ok()?;
            (v["kind"] == "ApiPolicy").then_some(v)
        })
        .collect()
}

/// `apiward check PATH -o json`: the error fields per file.
fn check(path: &str) -> (bool, BTreeMap<String, BTreeSet<String>>) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(["check", path, "-o", "json"])
        .current_dir(repo(""))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).expect("--output json is JSON");
    let mut fields: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in v["findings"].as_array().unwrap() {
        if f["severity"] == "error" {
            fields
                .entry(f["file"].as_str().unwrap().to_owned())
                .or_default()
                .insert(f["field"].as_str().unwrap_or_default().to_owned());
        }
    }
    (v["ok"] == true, fields)
}

#[tokio::test]
async fn admission_and_check_refuse_exactly_the_same_invalid_policies_naming_the_same_fields() {
    let v = validator().await;
    let (ok, by_file) = check("examples-invalid");
    assert!(!ok);
    let files = apiward::load::yaml_files(&[repo("examples-invalid")]).unwrap();
    assert!(files.len() >= 21, "{files:?}");
    for file in files {
        let rel = file
            .strip_prefix(repo(""))
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('/')
            .to_owned();
        let want = by_file
            .get(&rel)
            .unwrap_or_else(|| panic!("apiward check found nothing in {rel}"));
        let [policy] = policies_in(&file).try_into().unwrap();
        for (operation, dry_run) in [("CREATE", false), ("CREATE", true), ("UPDATE", false)] {
            let r = v
                .send(&review(&as_stored(policy.clone(), 2), operation, dry_run))
                .await;
            assert_eq!(r["allowed"], false, "{rel} ({operation}) was admitted");
            let status = &r["status"];
            assert_eq!(status["code"], 422, "{rel}");
            assert_eq!(status["reason"], "Invalid", "{rel}");
            assert_eq!(status["details"]["kind"], "apipolicies");
            assert_eq!(status["details"]["name"], "bad");
            let got: BTreeSet<String> = status["details"]["causes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["field"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(
                &got, want,
                "{rel}: admission and check name different fields"
            );
            // The message the API server passes on names each field and why.
            let message = status["message"].as_str().unwrap();
            assert!(
                message.starts_with("ApiPolicy shop/bad is invalid: "),
                "{message}"
            );
            for c in status["details"]["causes"].as_array().unwrap() {
                let line = format!(
                    "{}: {}",
                    c["field"].as_str().unwrap(),
                    c["message"].as_str().unwrap()
                );
                assert!(message.contains(&line), "{rel}: {message} lacks {line}");
            }
        }
    }
}

#[tokio::test]
async fn admission_admits_every_example_policy_that_check_accepts_with_its_lints_as_warnings() {
    let v = validator().await;
    let (ok, by_file) = check("examples");
    assert!(ok && by_file.is_empty(), "{by_file:?}");
    let mut admitted = 0;
    let mut warned = 0;
    for file in apiward::load::yaml_files(&[repo("examples")]).unwrap() {
        for policy in policies_in(&file) {
            for (operation, dry_run) in [("CREATE", true), ("CREATE", false), ("UPDATE", false)] {
                let r = v
                    .send(&review(&as_stored(policy.clone(), 1), operation, dry_run))
                    .await;
                assert_eq!(r["allowed"], true, "{}: {r}", file.display());
                admitted += 1;
                if let Some(w) = r["warnings"].as_array() {
                    warned += 1;
                    for w in w {
                        let w = w.as_str().unwrap();
                        assert!(w.starts_with("AW0"), "{w}");
                        assert!(
                            w.len() <= 256,
                            "the API server truncates longer warnings: {w}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        admitted >= 3 * 6,
        "the shop's and the GitOps policies: {admitted}"
    );
    // The shop's Audit/Permissive policy is linted, at admission as by check.
    assert!(warned >= 3, "{warned}");
}

#[tokio::test]
async fn the_validator_lets_through_what_it_does_not_judge_and_refuses_what_is_not_a_review() {
    let v = validator().await;
    let policy = policies_in(&repo("examples-invalid/01-bind-param-not-in-path.yaml")).remove(0);
    // A DELETE (never registered, but harmless if a rule says so).
    let mut r = review(&as_stored(policy.clone(), 2), "DELETE", false);
    r["request"]["oldObject"] = r["request"]["object"].take();
    assert_eq!(v.send(&r).await["allowed"], true);
    // Another kind sent by a misconfigured rule.
    let mut r = review(&as_stored(policy, 2), "CREATE", false);
    r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    assert_eq!(v.send(&r).await["allowed"], true);
    // Not a review: 400, not a verdict.
    let resp = v.client.post(&v.url).body("{").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = v.client.get(&v.url).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}
