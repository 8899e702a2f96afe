//! The Helm chart, through a real Helm engine (Helm's Go SDK, embedded by the PyPI package
//! `helm-python-sdk`; `charts/tests/helm.py` drives it): strict lint, render with default
//! and varied values, every manifest deserialized into its k8s-openapi type with unknown
//! fields refused, RBAC exactly as the chart's README documents it, the webhook never
//! sending the operator's namespace or kube-system, the chart's CRD equal to the
//! generated one, and bad values refused by `values.schema.json`.
//!
//! Needs python3 with helm-python-sdk: `./scripts/test` installs it into
//! `target/helm-venv` (or set `APIWARD_HELM_PYTHON`). Without it these tests fail, loudly.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::core::labels::{Selector, SelectorExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

mod common;
use common::{python, repo};

fn chart() -> String {
    repo().join("charts/apiward").display().to_string()
}

/// Runs one job of `charts/tests/helm.py`; its JSON answer.
fn helm(args: &[&str]) -> Value {
    let py = python();
    let out = Command::new(&py)
        .arg(repo().join("charts/tests/helm.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (./scripts/test installs python3 with helm-python-sdk)",
                py.display()
            )
        });
    assert!(
        out.status.success(),
        "helm.py {} failed ({}): {}\nThese tests need the PyPI package helm-python-sdk: ./scripts/test installs it into target/helm-venv, or set APIWARD_HELM_PYTHON",
        args[0],
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("helm.py prints JSON")
}

/// One rendered object, with the template it came from.
#[derive(Debug, Clone)]
struct Object {
    template: String,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Renders the chart as `helm install apiward -n <namespace>` would; the objects, or
/// Helm's error.
fn try_render(namespace: &str, values: &Value) -> Result<Vec<Object>, String> {
    let out = helm(&["render", &chart(), namespace, &values.to_string()]);
    if let Some(e) = out["error"].as_str() {
        return Err(e.to_owned());
    }
    let mut objects = vec![];
    for (template, text) in out["manifests"].as_object().expect("manifests") {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        for doc in serde_norway::Deserializer::from_str(text.as_str().unwrap()) {
            let doc: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{template}: not YAML: {e}"));
            if !doc.is_null() {
                objects.push(Object {
                    template: template.clone(),
                    doc,
                });
            }
        }
    }
    Ok(objects)
}

fn render(namespace: &str, values: &Value) -> Vec<Object> {
    try_render(namespace, values).unwrap_or_else(|e| panic!("render failed: {e}"))
}

/// Deserializes `v` as `T`, refusing fields `T` does not have (a cluster would silently
/// drop them: a typo'd `securityContext` key is a hole).
fn strict<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    let mut unknown = vec![];
    let t = serde_ignored::deserialize(v.clone(), |path| unknown.push(path.to_string()))
        .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(t)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// The kinds without a k8s-openapi type: their fields as the CRDs (cert-manager v1,
/// Prometheus Operator v1) define them, as far as the chart uses them; unknown ones refused.
mod foreign {
    // Fields exist to be checked on deserialization; tests read only some.
    #![allow(dead_code)]
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Meta {
        pub name: String,
        pub namespace: String,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        #[serde(default)]
        pub annotations: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Object<S> {
        pub api_version: String,
        pub kind: String,
        pub metadata: Meta,
        pub spec: S,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CertificateSpec {
        pub secret_name: String,
        pub duration: Option<String>,
        pub renew_before: Option<String>,
        pub dns_names: Vec<String>,
        pub private_key: Option<PrivateKey>,
        pub issuer_ref: IssuerRef,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrivateKey {
        pub algorithm: String,
        pub size: u32,
        pub rotation_policy: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerRef {
        pub name: String,
        pub kind: Option<String>,
        pub group: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerSpec {
        pub self_signed: BTreeMap<String, serde_json::Value>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
        pub namespace_selector: NamespaceSelector,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct NamespaceSelector {
        pub match_names: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: String,
        pub path: String,
        pub interval: String,
    }
}

/// Deserializes every object strictly into its type; the problems, each naming the
/// template and object.
fn strict_problems(objects: &[Object]) -> Vec<String> {
    let mut problems = vec![];
    for o in objects {
        let api = o.doc["apiVersion"].as_str().unwrap_or_default();
        let got = match (api, o.kind()) {
            ("apps/v1", "Deployment") => strict::<Deployment>(&o.doc).map(drop),
            ("v1", "Service") => strict::<Service>(&o.doc).map(drop),
            ("v1", "ServiceAccount") => strict::<ServiceAccount>(&o.doc).map(drop),
            ("v1", "Pod") => strict::<Pod>(&o.doc).map(drop),
            ("policy/v1", "PodDisruptionBudget") => strict::<PodDisruptionBudget>(&o.doc).map(drop),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                strict::<ClusterRole>(&o.doc).map(drop)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                strict::<ClusterRoleBinding>(&o.doc).map(drop)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(&o.doc).map(drop),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                strict::<RoleBinding>(&o.doc).map(drop)
            }
            ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                strict::<MutatingWebhookConfiguration>(&o.doc).map(drop)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
                strict::<ValidatingWebhookConfiguration>(&o.doc).map(drop)
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => strict::<NetworkPolicy>(&o.doc).map(drop),
            ("cert-manager.io/v1", "Certificate") => {
                strict::<foreign::Object<foreign::CertificateSpec>>(&o.doc).map(drop)
            }
            ("cert-manager.io/v1", "Issuer") => {
                strict::<foreign::Object<foreign::IssuerSpec>>(&o.doc).map(drop)
            }
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                strict::<foreign::Object<foreign::ServiceMonitorSpec>>(&o.doc).map(drop)
            }
            (api, kind) => Err(format!("{api} {kind}: no type to check it against")),
        };
        if let Err(e) = got {
            problems.push(format!("{} ({} {}): {e}", o.template, o.kind(), o.name()));
        }
    }
    problems
}

fn one<T: DeserializeOwned>(objects: &[Object], kind: &str, name: &str) -> T {
    let o = objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"));
    strict(&o.doc).unwrap()
}

fn kinds(objects: &[Object]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| format!("{} {}", o.kind(), o.name()))
        .collect()
}

fn varied() -> Value {
    json!({"certManager": {"enabled": true}, "replicas": 3, "metrics": {"serviceMonitor": {"enabled": true}}})
}

const NS: &str = "apiward-system";

#[test]
fn the_chart_lints_clean_in_strict_mode() {
    for values in [
        json!({}),
        varied(),
        json!({"webhook": {"enabled": false}, "replicas": 1, "networkPolicy": {"enabled": true}}),
    ] {
        let report = helm(&["lint", &chart(), NS, &values.to_string()]);
        assert_eq!(report["errors"], json!([]), "lint with {values}: {report}");
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap_or(3) >= 2)
            .collect();
        assert!(serious.is_empty(), "lint with {values}: {serious:?}");
    }
}

#[test]
fn the_strict_check_catches_a_typo_a_cluster_would_ignore() {
    let mut objects = render(NS, &json!({}));
    let d = objects
        .iter_mut()
        .find(|o| o.kind() == "Deployment")
        .unwrap();
    d.doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] =
        json!(true);
    let problems = strict_problems(&objects);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("readOnlyRootFileSystem"),
        "{problems:?}"
    );
}

#[test]
fn default_values_render_strict_manifests_for_a_working_operator() {
    let objects = render(NS, &json!({}));
    assert_eq!(strict_problems(&objects), Vec::<String>::new());
    let want: BTreeSet<String> = [
        "ClusterRole apiward-operator",
        "ClusterRoleBinding apiward-operator",
        "Deployment apiward",
        "MutatingWebhookConfiguration apiward-sidecar-injector",
        "Pod apiward-test-ready",
        "PodDisruptionBudget apiward",
        "Role apiward-operator",
        "RoleBinding apiward-operator",
        "Service apiward",
        "Service apiward-metrics",
        "Service apiward-webhook",
        "ServiceAccount apiward",
        "ValidatingWebhookConfiguration apiward-policy-validator",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds(&objects), want);

    let d: Deployment = one(&objects, "Deployment", "apiward");
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert!(
        pod.topology_spread_constraints
            .is_some_and(|t| t[0].topology_key == "kubernetes.io/hostname")
    );
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".into()]));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    assert!(
        c.resources
            .as_ref()
            .is_some_and(|r| r.limits.is_some() && r.requests.is_some())
    );

    // The arguments are ones `apiward operator` takes, and the sidecar template the
    // webhook will use parses, pointing sidecars at the config Service.
    let mut argv = vec!["apiward".to_owned()];
    argv.extend(c.args.clone().unwrap());
    apiward::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(argv.contains(&"--webhook-configuration=apiward-sidecar-injector".to_owned()));
    assert!(
        argv.contains(&"--validating-webhook-configuration=apiward-policy-validator".to_owned())
    );
    assert!(
        !argv.iter().any(|a| a == "--no-leader-election"),
        "2 replicas elect a leader"
    );
    let env: BTreeMap<String, String> = c
        .env
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    let template: apiward::serve::webhook::SidecarTemplate =
        serde_json::from_str(&env["APIWARD_SIDECAR_TEMPLATE"]).unwrap();
    assert_eq!(
        template.control_url,
        "https://apiward.apiward-system.svc:15012"
    );
    assert_eq!(template.image, "ghcr.io/apiward/apiward-sidecar:0.1.0");
    assert_eq!(
        template.init_image.as_deref(),
        Some("ghcr.io/apiward/apiward-init:0.1.0")
    );
    assert!(template.quota_store.is_none());

    // Each Service selects the operator's pods and targets a port the container has.
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    let port_names: BTreeSet<String> = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    for (name, port) in [
        ("apiward", 15012),
        ("apiward-webhook", 443),
        ("apiward-metrics", 8080),
    ] {
        let s: Service = one(&objects, "Service", name);
        let s = s.spec.unwrap();
        let selector: Selector = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: s.selector.clone(),
            match_expressions: None,
        }
        .try_into()
        .unwrap();
        assert!(
            selector.matches(&pod_labels),
            "Service {name} selects the operator"
        );
        let p = &s.ports.unwrap()[0];
        assert_eq!(p.port, port, "Service {name}");
        match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                assert!(port_names.contains(n), "Service {name} targets {n}")
            }
            other => panic!("Service {name}: target port {other:?}"),
        }
    }

    // The helm test hook asks the operator's /readyz.
    let t: Pod = one(&objects, "Pod", "apiward-test-ready");
    assert_eq!(t.metadata.annotations.unwrap()["helm.sh/hook"], "test");
    let cmd = t.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap()
        .join(" ");
    assert!(
        cmd.contains("http://apiward-metrics.apiward-system.svc:8080/readyz"),
        "{cmd}"
    );
}

#[test]
fn cert_manager_three_replicas_and_a_service_monitor_render_strict_manifests() {
    let objects = render(NS, &varied());
    assert_eq!(strict_problems(&objects), Vec::<String>::new());
    let have = kinds(&objects);
    for k in [
        "Certificate apiward-webhook",
        "Issuer apiward-selfsigned",
        "ServiceMonitor apiward",
        "PodDisruptionBudget apiward",
    ] {
        assert!(have.contains(k), "{k} missing from {have:?}");
    }

    let d: Deployment = one(&objects, "Deployment", "apiward");
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    assert!(
        args.contains(&"--webhook-configuration=".to_owned())
            && args.contains(&"--validating-webhook-configuration=".to_owned()),
        "cert-manager owns caBundle: {args:?}"
    );
    assert!(
        args.contains(&"--webhook-cert-dir=/etc/apiward/webhook".to_owned()),
        "{args:?}"
    );
    let mount = &c.volume_mounts.clone().unwrap()[0];
    assert_eq!(mount.mount_path, "/etc/apiward/webhook");
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount.name)
        .unwrap();

    // The mounted Secret is the Certificate's, for the webhook Service's names, and the
    // CA injector is pointed at that Certificate.
    let cert: foreign::Object<foreign::CertificateSpec> = strict(
        &objects
            .iter()
            .find(|o| o.kind() == "Certificate")
            .unwrap()
            .doc,
    )
    .unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name,
        Some(cert.spec.secret_name.clone())
    );
    assert!(
        cert.spec
            .dns_names
            .contains(&"apiward-webhook.apiward-system.svc".to_owned())
    );
    assert_eq!(cert.spec.issuer_ref.name, "apiward-selfsigned");
    let w: MutatingWebhookConfiguration = one(
        &objects,
        "MutatingWebhookConfiguration",
        "apiward-sidecar-injector",
    );
    assert_eq!(
        w.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"],
        format!("{NS}/{}", cert.metadata.name)
    );
    let v: ValidatingWebhookConfiguration = one(
        &objects,
        "ValidatingWebhookConfiguration",
        "apiward-policy-validator",
    );
    assert_eq!(
        v.metadata.annotations.unwrap()["cert-manager.io/inject-ca-from"],
        format!("{NS}/{}", cert.metadata.name)
    );

    // The ServiceMonitor selects the metrics Service and names its port.
    let sm: foreign::Object<foreign::ServiceMonitorSpec> = strict(
        &objects
            .iter()
            .find(|o| o.kind() == "ServiceMonitor")
            .unwrap()
            .doc,
    )
    .unwrap();
    let metrics: Service = one(&objects, "Service", "apiward-metrics");
    let selector: Selector = sm.spec.selector.try_into().unwrap();
    assert!(selector.matches(&metrics.metadata.labels.unwrap()));
    assert_eq!(
        Some(sm.spec.endpoints[0].port.clone()),
        metrics.spec.unwrap().ports.unwrap()[0].name
    );

    // An Issuer of the user's own replaces the self-signed one.
    let mut v = varied();
    v["certManager"]["issuerRef"] = json!({"name": "corp-ca", "kind": "ClusterIssuer"});
    let objects = render(NS, &v);
    assert_eq!(strict_problems(&objects), Vec::<String>::new());
    assert!(!kinds(&objects).contains("Issuer apiward-selfsigned"));
}

#[test]
fn an_otlp_endpoint_turns_on_trace_export() {
    let env = |values: Value| {
        let objects = render(NS, &values);
        let d: Deployment = one(&objects, "Deployment", "apiward");
        let c = d.spec.unwrap().template.spec.unwrap().containers[0].clone();
        c.env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
            .and_then(|e| e.value)
    };
    assert_eq!(env(json!({})), None);
    assert_eq!(
        env(json!({"otlpEndpoint": "http://otel-collector.observability:4318"})).as_deref(),
        Some("http://otel-collector.observability:4318")
    );
    let out = helm(&[
        "validate",
        &chart(),
        &json!({"otlpEndpoint": "collector:4318"}).to_string(),
    ]);
    assert!(
        out["error"]
            .as_str()
            .is_some_and(|e| e.contains("otlpEndpoint")),
        "{out}"
    );
}

#[test]
fn redis_for_global_quotas_reaches_the_injected_sidecars_settings() {
    let objects = render(
        NS,
        &json!({"globalQuotas": {"redis": {"url": "redis://redis.apiward-system:6379/0"}}}),
    );
    let d: Deployment = one(&objects, "Deployment", "apiward");
    let c = d.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let env = c
        .env
        .unwrap()
        .into_iter()
        .find(|e| e.name == "APIWARD_SIDECAR_TEMPLATE")
        .unwrap();
    let template: apiward::serve::webhook::SidecarTemplate =
        serde_json::from_str(&env.value.unwrap()).unwrap();
    assert_eq!(
        template.quota_store,
        Some(json!({"url": "redis://redis.apiward-system:6379/0", "timeout": "100ms"}))
    );
}

/// One rule of the README's RBAC table, normalized for comparison.
type Rule = (String, String, String, String, String);

fn rules_of(scope: &str, rules: Vec<PolicyRule>) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.unwrap_or_default() {
            for res in r.resources.clone().unwrap_or_default() {
                let group = if g.is_empty() {
                    "core".to_owned()
                } else {
                    g.clone()
                };
                out.insert((
                    scope.to_owned(),
                    group,
                    res,
                    r.resource_names.clone().unwrap_or_default().join(", "),
                    r.verbs.join(", "),
                ));
            }
        }
    }
    out
}

/// The RBAC table of `charts/apiward/README.md`.
fn documented_rules() -> BTreeSet<Rule> {
    let readme = std::fs::read_to_string(repo().join("charts/apiward/README.md")).unwrap();
    let table = readme
        .split("## RBAC")
        .nth(1)
        .expect("the README has an RBAC section");
    table
        .lines()
        .filter(|l| l.starts_with("| cluster") || l.starts_with("| namespace"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].into(),
                cells[2].into(),
                cells[3].into(),
                cells[4].into(),
                cells[5].into(),
            )
        })
        .collect()
}

fn rendered_rules(objects: &[Object]) -> BTreeSet<Rule> {
    let cr: ClusterRole = one(objects, "ClusterRole", "apiward-operator");
    let r: Role = one(objects, "Role", "apiward-operator");
    let mut all = rules_of("cluster", cr.rules.unwrap());
    all.extend(rules_of("namespace", r.rules.unwrap()));
    all
}

#[test]
fn rbac_is_exactly_the_documented_rules_and_has_no_wildcards() {
    let documented = documented_rules();
    assert!(
        documented.len() >= 10,
        "the README's table was read: {documented:?}"
    );
    let rendered = rendered_rules(&render(NS, &json!({})));
    assert_eq!(
        rendered
            .symmetric_difference(&documented)
            .collect::<Vec<_>>(),
        Vec::<&Rule>::new(),
        "rendered RBAC and charts/apiward/README.md differ"
    );

    // With cert-manager the caBundle rules are not granted; nothing else changes.
    let with_cm = rendered_rules(&render(NS, &varied()));
    let gone: BTreeSet<&str> = documented
        .difference(&with_cm)
        .map(|r| r.2.as_str())
        .collect();
    assert_eq!(
        gone,
        BTreeSet::from([
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations"
        ])
    );
    assert!(with_cm.is_subset(&documented));

    for values in [json!({}), varied()] {
        for o in render(NS, &values) {
            let text = o.doc.to_string();
            assert!(
                !text.contains("\"*\""),
                "{} {} has a wildcard",
                o.kind(),
                o.name()
            );
        }
    }

    // The bindings give those rules to the operator's ServiceAccount, in its namespace.
    let objects = render(NS, &json!({}));
    let crb: ClusterRoleBinding = one(&objects, "ClusterRoleBinding", "apiward-operator");
    let s = &crb.subjects.unwrap()[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        ("ServiceAccount", "apiward", Some(NS))
    );
    let d: Deployment = one(&objects, "Deployment", "apiward");
    assert_eq!(
        d.spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("apiward")
    );
}

/// Which of the configuration's webhooks the API server would call for a pod with
/// `pod` labels in a namespace `ns` with `ns_labels` (plus its name label, as the API
/// server sets it).
fn called(
    w: &MutatingWebhookConfiguration,
    ns: &str,
    ns_labels: &[(&str, &str)],
    pod: &[(&str, &str)],
) -> Vec<String> {
    let mut ns_labels: BTreeMap<String, String> = ns_labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ns_labels.insert("kubernetes.io/metadata.name".into(), ns.into());
    let pod: BTreeMap<String, String> = pod
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let matches = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
                   labels| {
        let sel: Selector = s.clone().unwrap_or_default().try_into().unwrap();
        sel.matches(labels)
    };
    w.webhooks
        .iter()
        .flatten()
        .filter(|h| matches(&h.namespace_selector, &ns_labels) && matches(&h.object_selector, &pod))
        .map(|h| h.name.clone())
        .collect()
}

#[test]
fn the_webhook_never_sends_the_operator_namespace_or_kube_system() {
    const ON: (&str, &str) = ("apiward.io/inject", "enabled");
    const OFF: (&str, &str) = ("apiward.io/inject", "disabled");
    for release_ns in [NS, "security"] {
        let objects = render(
            release_ns,
            &json!({"webhook": {"excludeNamespaces": ["legacy"]}}),
        );
        let w: MutatingWebhookConfiguration = one(
            &objects,
            "MutatingWebhookConfiguration",
            "apiward-sidecar-injector",
        );
        let n = |v: &[String]| v.len();
        // Exactly one webhook for a pod that should get a sidecar (never two patches).
        assert_eq!(n(&called(&w, "shop", &[ON], &[])), 1);
        assert_eq!(n(&called(&w, "shop", &[], &[ON])), 1);
        assert_eq!(n(&called(&w, "shop", &[ON], &[ON])), 1);
        // Opt-outs and unlabelled pods are not sent.
        assert_eq!(n(&called(&w, "shop", &[ON], &[OFF])), 0);
        assert_eq!(n(&called(&w, "shop", &[OFF], &[ON])), 0);
        assert_eq!(n(&called(&w, "shop", &[], &[])), 0);
        // Never the release's namespace, kube-system or an excluded one, labels or not.
        for ns in [release_ns, "kube-system", "legacy"] {
            assert_eq!(
                called(&w, ns, &[ON], &[ON]),
                Vec::<String>::new(),
                "{ns} is sent"
            );
            assert_eq!(
                called(&w, ns, &[], &[ON]),
                Vec::<String>::new(),
                "{ns} is sent"
            );
        }
        for h in w.webhooks.unwrap() {
            let svc = h.client_config.service.unwrap();
            assert_eq!(
                (
                    svc.name.as_str(),
                    svc.namespace.as_str(),
                    svc.path.as_deref(),
                    svc.port
                ),
                ("apiward-webhook", release_ns, Some("/inject"), Some(443))
            );
            assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
            assert_eq!(h.side_effects, "None");
            let rule = &h.rules.unwrap()[0];
            assert_eq!(rule.operations, Some(vec!["CREATE".into()]));
            assert_eq!(rule.resources, Some(vec!["pods".into()]));
        }
    }
}

#[test]
fn the_policy_validator_judges_every_written_policy_but_not_its_status() {
    for (values, policy, timeout) in [
        (json!({}), "Fail", 5),
        (
            json!({"validation": {"failurePolicy": "Ignore", "timeoutSeconds": 3}}),
            "Ignore",
            3,
        ),
    ] {
        let objects = render(NS, &values);
        let v: ValidatingWebhookConfiguration = one(
            &objects,
            "ValidatingWebhookConfiguration",
            "apiward-policy-validator",
        );
        let hooks = v.webhooks.unwrap();
        assert_eq!(hooks.len(), 1);
        let h = &hooks[0];
        assert_eq!(h.name, "validate.apiward.io");
        let svc = h.client_config.service.clone().unwrap();
        assert_eq!(
            (
                svc.name.as_str(),
                svc.namespace.as_str(),
                svc.path.as_deref(),
                svc.port
            ),
            ("apiward-webhook", NS, Some("/validate"), Some(443))
        );
        assert_eq!(h.failure_policy.as_deref(), Some(policy));
        assert_eq!(h.timeout_seconds, Some(timeout));
        // No side effects: `kubectl apply --dry-run=server` is sent to it.
        assert_eq!(h.side_effects, "None");
        assert_eq!(h.admission_review_versions, vec!["v1".to_owned()]);
        let rules = h.rules.clone().unwrap();
        assert_eq!(rules.len(), 1);
        let r = &rules[0];
        assert_eq!(r.api_groups, Some(vec!["apiward.io".into()]));
        assert_eq!(r.api_versions, Some(vec!["v1alpha1".into()]));
        assert_eq!(r.operations, Some(vec!["CREATE".into(), "UPDATE".into()]));
        // The policy itself, not `apipolicies/status` (the operator's own status writes).
        assert_eq!(r.resources, Some(vec!["apipolicies".into()]));
    }
    // Without injection the 9443 server still runs for the validator; without either, it
    // does not run at all.
    let args = |values: Value| {
        let d: Deployment = one(&render(NS, &values), "Deployment", "apiward");
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
    };
    let only_validation = args(json!({"webhook": {"enabled": false}}));
    assert!(only_validation.contains(&"--webhook-configuration=".to_owned()));
    assert!(
        only_validation
            .contains(&"--validating-webhook-configuration=apiward-policy-validator".to_owned())
    );
    assert!(!only_validation.contains(&"--no-webhook".to_owned()));
    let objects = render(NS, &json!({"webhook": {"enabled": false}}));
    assert!(kinds(&objects).contains("Service apiward-webhook"));
    assert!(!kinds(&objects).contains("MutatingWebhookConfiguration apiward-sidecar-injector"));
    let neither = args(json!({"webhook": {"enabled": false}, "validation": {"enabled": false}}));
    assert!(neither.contains(&"--no-webhook".to_owned()));
}

#[test]
fn the_charts_crd_is_the_generated_one() {
    let out = helm(&["crds", &chart()]);
    let crds = out["crds"].as_array().unwrap();
    assert_eq!(crds.len(), 1, "{out}");
    assert_eq!(
        crds[0]["data"].as_str().unwrap(),
        apiward_crds::crd_yaml(),
        "charts/apiward/crds/ is out of date: cp {} charts/apiward/crds/",
        apiward_crds::CRD_FILE
    );
}

#[test]
fn values_of_the_wrong_type_or_unknown_keys_are_refused_by_the_schema() {
    let good = helm(&["validate", &chart(), &varied().to_string()]);
    assert_eq!(good, json!({"ok": true}));
    for (values, field) in [
        (json!({"replicas": "two"}), "/replicas"),
        (json!({"replicas": 0}), "/replicas"),
        (
            json!({"webhook": {"failurePolicy": "Sometimes"}}),
            "/webhook/failurePolicy",
        ),
        (
            json!({"webhook": {"timeoutSeconds": "10s"}}),
            "/webhook/timeoutSeconds",
        ),
        (
            json!({"validation": {"failurePolicy": "Never"}}),
            "/validation/failurePolicy",
        ),
        (
            json!({"certManager": {"enabled": "yes"}}),
            "/certManager/enabled",
        ),
        (
            json!({"sidecar": {"image": {"pullPolicy": "Sometimes"}}}),
            "/sidecar/image/pullPolicy",
        ),
        (
            json!({"globalQuotas": {"redis": {"url": "redis://:secret@redis:6379"}}}),
            "/globalQuotas/redis/url",
        ),
        (json!({"replica": 3}), "replica"),
        (
            json!({"webhook": {"failurepolicy": "Fail"}}),
            "failurepolicy",
        ),
    ] {
        let out = helm(&["validate", &chart(), &values.to_string()]);
        let err = out["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(
            err.contains(field),
            "{values}: the error names {field}: {err}"
        );
        // And an install with them renders nothing.
        let install = try_render(NS, &values);
        assert!(install.is_err(), "{values} rendered");
    }
}
