//! [`KubeCluster`]: the scenarios' [`Environment`] on a real cluster, selected when
//! `KUBECONFIG` is set (see [`crate::env::environment`]). It drives the cluster with
//! `kubectl`, as a user would:
//!
//! - the sample workloads are Pods `<name>-0` in namespace `shop` (labelled
//!   `apiward.io/inject=enabled`, so the chart's webhook injects them), each running as
//!   ServiceAccount `<name>` with an app answering 200 on every path (`traefik/whoami` on
//!   8080) and a `client` container (curl) that sends the scenario's requests from inside
//!   the pod, through its sidecar, to `http://<to>` — a Service on port 80, so the call is
//!   meshed by the operator's mesh table;
//! - policies are applied with `kubectl apply` (the API server's schema and CEL refuse a
//!   malformed one: that refusal is the "source error");
//! - status is read from the ApiPolicy, the enforced version from the sidecar's
//!   `/config_dump` (the pods share a process namespace, so the client container also
//!   reaches the sidecar's process to restart it or read its memory);
//! - the control plane is stopped and started by scaling the operator's Deployment.
//!
//! The operator is expected installed by the chart (`helm install apiward charts/apiward
//! -n apiward-system`); `APIWARD_E2E_NAMESPACE` and `APIWARD_E2E_RELEASE` name another
//! install. Scenarios share namespace `shop`: run them one at a time (`-j 1`).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use apiward_crds::ApiPolicyStatus;
use serde_json::{Value, json};

use crate::env::{Environment, WorkloadName, wait_for};

/// The scenarios' namespace.
const NS: &str = "shop";

/// A real cluster reached with `kubectl` (its `KUBECONFIG`).
#[derive(Debug)]
pub struct KubeCluster {
    operator_ns: String,
    release: String,
    replicas: u32,
    /// The last `kubectl apply` refusal per policy.
    refusals: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// Runs kubectl with `args` (and `stdin`); its stdout, or its stderr as the error.
fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): cluster mode needs kubectl on PATH"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("kubectl stdin");
    }
    let out = child.wait_with_output().expect("kubectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn must(args: &[&str], stdin: Option<&str>) -> String {
    kubectl(args, stdin).unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
}

/// The manifests of one sample workload.
fn workload(w: &str) -> String {
    let objects = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": w, "namespace": NS}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": w, "namespace": NS},
               "spec": {"selector": {"app": w}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{w}-0"), "namespace": NS, "labels": {"app": w},
                     "annotations": {"apiward.io/port": "8080"}},
        "spec": {
            "serviceAccountName": w,
            "shareProcessNamespace": true,
            "containers": [
                {"name": "app", "image": "traefik/whoami:v1.10", "args": ["--port", "8080"],
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}}},
                // Root (not the sidecar's UID 1337, whose traffic is not
                // intercepted), so it may signal the sidecar's process.
                {"name": "client", "image": "curlimages/curl:8.10.1",
                 "command": ["sleep", "infinity"],
                 "securityContext": {"runAsUser": 0}},
            ]}}),
    ];
    objects.iter().map(|o| format!("---\n{o}\n")).collect()
}

impl KubeCluster {
    /// Deploys the sample workloads (reused when they exist) and removes the scenario's
    /// policy left by an earlier run; returns once every pod is ready with its sidecar.
    pub fn start(workloads: &[WorkloadName]) -> Self {
        let operator_ns =
            std::env::var("APIWARD_E2E_NAMESPACE").unwrap_or_else(|_| "apiward-system".into());
        let release = std::env::var("APIWARD_E2E_RELEASE").unwrap_or_else(|_| "apiward".into());
        println!(
            "e2e: cluster mode (KUBECONFIG is set): operator {operator_ns}/{release}, namespace {NS}"
        );
        let deploy = format!("deploy/{release}");
        let replicas: u32 = must(
            &[
                "-n",
                &operator_ns,
                "get",
                &deploy,
                "-o",
                "jsonpath={.spec.replicas}",
            ],
            None,
        )
        .trim()
        .parse()
        .unwrap_or(1)
        .max(1);
        let me = Self {
            operator_ns,
            release,
            replicas,
            refusals: Default::default(),
        };
        me.scale(replicas);
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": NS, "labels": {"apiward.io/inject": "enabled"}}});
        must(&["apply", "-f", "-"], Some(&ns.to_string()));
        let _ = kubectl(
            &["-n", NS, "delete", "apipolicy", "--all", "--wait=true"],
            None,
        );
        let manifests: String = workloads.iter().map(|w| workload(w)).collect();
        must(&["apply", "-f", "-"], Some(&manifests));
        for w in workloads {
            must(
                &[
                    "-n",
                    NS,
                    "wait",
                    "--for=condition=Ready",
                    "--timeout=180s",
                    &format!("pod/{w}-0"),
                ],
                None,
            );
            let injected = must(
                &[
                    "-n",
                    NS,
                    "get",
                    "pod",
                    &format!("{w}-0"),
                    "-o",
                    "jsonpath={.metadata.annotations.apiward\\.io/status}",
                ],
                None,
            );
            assert_eq!(
                injected.trim(),
                "injected",
                "pod {w}-0 was not injected: is the chart's webhook installed?"
            );
        }
        me
    }

    fn scale(&self, replicas: u32) {
        let deploy = format!("deploy/{}", self.release);
        must(
            &[
                "-n",
                &self.operator_ns,
                "scale",
                &deploy,
                &format!("--replicas={replicas}"),
            ],
            None,
        );
        if replicas > 0 {
            must(
                &[
                    "-n",
                    &self.operator_ns,
                    "rollout",
                    "status",
                    &deploy,
                    "--timeout=180s",
                ],
                None,
            );
        } else {
            wait_for(Duration::from_secs(120), "the operator's pods gone", || {
                kubectl(
                    &[
                        "-n",
                        &self.operator_ns,
                        "get",
                        "pods",
                        "-l",
                        "app.kubernetes.io/component=operator",
                        "-o",
                        "name",
                    ],
                    None,
                )
                .is_ok_and(|o| o.trim().is_empty())
            });
        }
    }

    /// Runs `script` in `w`'s client container (`sh -c`), with `stdin`.
    fn client(&self, w: WorkloadName, script: &str, stdin: Option<&str>) -> Result<String, String> {
        let pod = format!("{w}-0");
        let mut args = vec!["-n", NS, "exec"];
        if stdin.is_some() {
            args.push("-i");
        }
        args.extend([pod.as_str(), "-c", "client", "--", "sh", "-c", script]);
        kubectl(&args, stdin)
    }

    fn config_dump(&self, w: WorkloadName) -> Option<Value> {
        let out = self
            .client(w, "curl -s -m 5 http://127.0.0.1:15020/config_dump", None)
            .ok()?;
        serde_json::from_str(&out).ok()
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        let _ = kubectl(&["-n", NS, "delete", "apipolicy", "--all"], None);
        // A scenario that failed with the control plane stopped leaves it running.
        let deploy = format!("deploy/{}", self.release);
        let _ = kubectl(
            &[
                "-n",
                &self.operator_ns,
                "scale",
                &deploy,
                &format!("--replicas={}", self.replicas),
            ],
            None,
        );
    }
}

/// `curl` printing only the status (`000` when no answer: 0).
const CURL: &str = "curl -s -o /dev/null -m 10 -w '%{http_code}\\n'";

impl Environment for KubeCluster {
    fn apply_policy(&mut self, name: &str, yaml: &str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        match kubectl(&["apply", "-f", "-"], Some(yaml)) {
            Ok(_) => refusals.remove(name),
            Err(e) => refusals.insert(name.to_owned(), e),
        };
    }

    fn get(&self, from: WorkloadName, to: WorkloadName, path: &str) -> u16 {
        let script = format!("{CURL} 'http://{to}{path}'");
        self.client(from, &script, None)
            .ok()
            .and_then(|o| o.trim().parse().ok())
            .unwrap_or(0)
    }

    fn status(&self, name: &str) -> Option<ApiPolicyStatus> {
        let out = kubectl(&["-n", NS, "get", "apipolicy", name, "-o", "json"], None).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        serde_json::from_value(v.get("status")?.clone()).ok()
    }

    fn source_errors(&self, name: &str) -> Vec<String> {
        let refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.get(name).cloned().into_iter().collect()
    }

    fn enforced_version(&self, w: WorkloadName) -> Option<String> {
        let v = self.config_dump(w)?;
        v["version"].as_str().map(str::to_owned)
    }

    fn stop_control_plane(&mut self) {
        self.scale(0);
    }

    fn start_control_plane(&mut self) {
        self.scale(self.replicas);
    }

    fn restart_sidecar(&mut self, w: WorkloadName) {
        // The kubelet restarts a native sidecar that exits.
        let before = self.sidecar_pid(w);
        self.client(w, "kill $(pidof apiward-sidecar)", None)
            .unwrap_or_else(|e| panic!("cannot stop {w}'s sidecar: {e}"));
        wait_for(Duration::from_secs(60), "the sidecar restarted", || {
            self.sidecar_pid(w).is_some_and(|p| Some(p) != before)
        });
    }

    fn get_many(
        &self,
        from: WorkloadName,
        to: WorkloadName,
        paths: Vec<String>,
        concurrency: usize,
    ) -> Vec<u16> {
        // One curl for all (a process per request would take minutes for a spray): the
        // URLs as a curl config on stdin, `concurrency` transfers at once, one
        // "URL status" line each, in completion order.
        let url = |p: &str| format!("http://{to}{p}");
        let input: String = paths
            .iter()
            .map(|p| format!("url = \"{}\"\noutput = \"/dev/null\"\n", url(p)))
            .collect();
        let script = format!(
            r#"curl -s -Z --parallel-max {concurrency} -m 10 -w '%{{url}} %{{http_code}}\n' --config -"#
        );
        let out = self.client(from, &script, Some(&input)).unwrap_or_default();
        let mut slots: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (i, p) in paths.iter().enumerate() {
            slots.entry(url(p)).or_default().push(i);
        }
        let mut statuses = vec![0u16; paths.len()];
        for line in out.lines() {
            let Some((u, code)) = line.rsplit_once(' ') else {
                continue;
            };
            if let (Some(i), Ok(code)) = (slots.get_mut(u).and_then(Vec::pop), code.parse()) {
                statuses[i] = code;
            }
        }
        statuses
    }

    fn sidecar_rss_kib(&self, w: WorkloadName) -> u64 {
        let out = self
            .client(w, "grep VmRSS /proc/$(pidof apiward-sidecar)/status", None)
            .unwrap_or_default();
        out.split_whitespace()
            .nth(1)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0)
    }
}

impl KubeCluster {
    fn sidecar_pid(&self, w: WorkloadName) -> Option<u32> {
        self.client(w, "pidof apiward-sidecar", None)
            .ok()
            .and_then(|o| o.split_whitespace().next()?.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    //! What cluster mode relies on, checked without a cluster: the sample manifests are
    //! valid Kubernetes objects, the webhook injects the pod fronting the app's port, and
    //! the operator's mesh table meshes the Service the client calls.
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, Service};

    fn objects(w: &str) -> Vec<Value> {
        workload(w)
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn the_sample_workload_is_injected_and_its_service_meshed() {
        let docs = objects("users");
        let pod: Pod = serde_json::from_value(docs[2].clone()).unwrap();
        let svc: Service = serde_json::from_value(docs[1].clone()).unwrap();
        assert_eq!(apiward::serve::webhook::app_port(&pod), Some(8080));
        let template: apiward::serve::webhook::SidecarTemplate = serde_json::from_value(json!({
            "image": "ghcr.io/apiward/apiward-sidecar:0.1.0",
            "controlUrl": "https://apiward.apiward-system.svc:15012",
            "trustDomain": "cluster.local",
        }))
        .unwrap();
        let patch = apiward::serve::webhook::inject(&pod, NS, "apiward-system", &template)
            .expect("the sample pod is injected");
        let text = patch.to_string();
        assert!(
            text.contains("--inbound-ports") && text.contains("8080"),
            "{text}"
        );

        // Once injected and running, its Service is in the mesh table on port 80.
        let mut running = pod.clone();
        running
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("apiward.io/status".into(), "injected".into());
        running.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
        let mut index = apiward::index::ClusterIndex::new("cluster.local");
        index.apply_pod(&running);
        let mut svc = svc;
        svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.30".into());
        index.apply_service(&svc);
        let table = index.take_mesh_table().unwrap();
        assert_eq!(table.destinations.len(), 1);
        assert_eq!(table.destinations[0].service, "shop/users");
        assert_eq!(table.destinations[0].ports, vec![80]);
        assert_eq!(
            table.destinations[0].identities,
            vec!["spiffe://cluster.local/ns/shop/sa/users".to_owned()]
        );
    }
}
