//! Local mode's sources: policies from a directory of YAML files and workloads from a mesh
//! file, instead of the Kubernetes API. The same compiler, config server and status logic
//! as in a cluster; status is written next to each policy file (`orders.yaml` →
//! `orders.status.yaml`). Files are re-read when they change (a GitOps loop without a
//! cluster).
//!
//! A file that does not parse or validate changes nothing: the policies it held last time
//! it was good stay in force, and its status file says what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use apiward_crds::{ApiPolicy, ApiPolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::compile::{Compiler, Inputs, Workload};
use crate::load::{self, Finding, Loaded, Object, Severity};
use crate::serve::config::ConfigHub;

/// The mesh file: the workloads of the local mesh.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    /// Pods, as the compiler sees them.
    pub workloads: Vec<Workload>,
}

impl MeshFile {
    /// Reads a mesh file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[derive(Debug, Default)]
struct FileState {
    modified: Option<SystemTime>,
    /// The objects of the last version of the file that had no error.
    good: Vec<Loaded>,
    /// Errors of the current version (empty when it is good).
    errors: Vec<Finding>,
}

/// What local mode reads, and what it last published.
#[derive(Debug)]
pub struct LocalSources {
    policies: PathBuf,
    mesh: PathBuf,
    trust_domain: String,
    files: BTreeMap<PathBuf, FileState>,
    mesh_modified: Option<SystemTime>,
    workloads: Vec<Workload>,
    mesh_error: Option<String>,
    compiler: Compiler,
    generations: BTreeMap<String, (i64, serde_json::Value)>,
    statuses: BTreeMap<String, ApiPolicyStatus>,
    written: BTreeMap<PathBuf, String>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn policy_key(p: &ApiPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// `orders.yaml` → `orders.status.yaml`.
pub fn status_path(policy_file: &Path) -> PathBuf {
    let stem = policy_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("policy");
    policy_file.with_file_name(format!("{stem}.status.yaml"))
}

/// A status file: the file's own errors, and the status of each policy it holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusFile {
    /// Why the current version of the file is not used (the last good one is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// `namespace/name` → status.
    #[serde(default)]
    pub policies: BTreeMap<String, ApiPolicyStatus>,
}

impl LocalSources {
    /// Sources reading `policies` (a directory or file) and `mesh`.
    pub fn new(policies: &Path, mesh: &Path, trust_domain: &str) -> Self {
        Self {
            policies: policies.to_owned(),
            mesh: mesh.to_owned(),
            trust_domain: trust_domain.to_owned(),
            files: BTreeMap::new(),
            mesh_modified: None,
            workloads: Vec::new(),
            mesh_error: None,
            compiler: Compiler::new(trust_domain),
            generations: BTreeMap::new(),
            statuses: BTreeMap::new(),
            written: BTreeMap::new(),
        }
    }

    /// Re-reads what changed. Returns true if the inputs changed.
    pub fn scan(&mut self) -> bool {
        let mut changed = false;
        let m = modified(&self.mesh);
        if m != self.mesh_modified || self.mesh_modified.is_none() {
            self.mesh_modified = m;
            match MeshFile::read(&self.mesh) {
                Ok(f) => {
                    changed |= f.workloads != self.workloads;
                    self.workloads = f.workloads;
                    self.mesh_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "mesh file refused; the previous workloads stay");
                    self.mesh_error = Some(e);
                }
            }
        }
        let files = load::yaml_files(std::slice::from_ref(&self.policies)).unwrap_or_default();
        let present: BTreeSet<PathBuf> = files
            .iter()
            .filter(|f| {
                let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !n.ends_with(".status.yaml") && !load::is_test_file(f)
            })
            .cloned()
            .collect();
        let before = self.files.len();
        self.files.retain(|f, _| present.contains(f));
        changed |= self.files.len() != before;
        for file in present {
            let m = modified(&file);
            let state = self.files.entry(file.clone()).or_default();
            if state.modified == m && m.is_some() {
                continue;
            }
            state.modified = m;
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let mut input = load::Input::default();
            load::read_str(&mut input, &file, &text);
            let errors: Vec<Finding> = input
                .findings
                .into_iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            if errors.is_empty() {
                state.good = input.objects;
                state.errors.clear();
                changed = true;
            } else {
                for e in &errors {
                    tracing::error!(finding = %e, "policy file refused; its last good version stays");
                }
                state.errors = errors;
            }
        }
        if changed {
            self.recompile();
        }
        changed
    }

    fn recompile(&mut self) {
        let mut inputs = Inputs {
            trust_domain: self.trust_domain.clone(),
            workloads: self.workloads.clone(),
            ..Default::default()
        };
        for state in self.files.values() {
            for o in &state.good {
                match &o.object {
                    Object::Policy(p) => {
                        let p = (**p).clone();
                        let spec = serde_json::to_value(&p.spec).unwrap_or_default();
                        let entry = self
                            .generations
                            .entry(policy_key(&p))
                            .or_insert((0, serde_json::Value::Null));
                        if entry.1 != spec {
                            *entry = (entry.0 + 1, spec);
                        }
                        inputs.policies.push(p);
                    }
                    Object::Secret(s) => inputs.secrets.push((**s).clone()),
                    Object::ConfigMap(c) => inputs.config_maps.push((**c).clone()),
                }
            }
        }
        self.compiler = Compiler::from_inputs(&inputs);
    }

    /// Publishes the compiled configs into the hub.
    pub fn publish(&self, hub: &ConfigHub) -> usize {
        let workloads: Vec<apiward_policy::config::Workload> = self
            .workloads
            .iter()
            .map(|w| apiward_policy::config::Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
            })
            .collect();
        hub.publish(&workloads, self.compiler.configs())
    }

    /// Writes every status file whose content changed. Returns how many were written.
    pub fn write_statuses(&mut self, hub: &ConfigHub) -> usize {
        let results = self.compiler.policy_results();
        let reports = hub.reports();
        let inventory = hub.inventory();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut by_file: BTreeMap<PathBuf, StatusFile> = BTreeMap::new();
        for (file, state) in &self.files {
            let entry = by_file.entry(status_path(file)).or_default();
            entry.errors = state.errors.iter().map(ToString::to_string).collect();
            for o in &state.good {
                let Object::Policy(p) = &o.object else {
                    continue;
                };
                let pk = policy_key(p);
                let Some(result) = results.get(&pk) else {
                    continue;
                };
                let seen = crate::status::inventory(p, &result.pods, &inventory);
                let global = p
                    .spec
                    .quotas
                    .iter()
                    .any(|q| q.scope == apiward_crds::QuotaScope::Global);
                let status = crate::status::policy_status(
                    result,
                    self.generations.get(&pk).map(|g| g.0),
                    &|pod: &str| hub.version(pod),
                    &reports,
                    global,
                    self.statuses.get(&pk),
                    now.clone(),
                    Some(seen),
                );
                self.statuses.insert(pk.clone(), status.clone());
                entry.policies.insert(pk, status);
            }
        }
        let mut written = 0;
        for (path, status) in by_file {
            if status.errors.is_empty() && status.policies.is_empty() {
                continue;
            }
            let body = format!(
                "# Written by apiward local (do not edit): the status of the policies in the\n# file of the same name without .status.\n{}",
                serde_norway::to_string(&status).unwrap_or_default()
            );
            // Compare without transition times' churn: only rewrite on a real change.
            if self.written.get(&path) == Some(&body) {
                continue;
            }
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, &body)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_ok()
            {
                self.written.insert(path, body);
                written += 1;
            }
        }
        written
    }
}

/// Keeps the hub and the status files current until the process ends: files are checked
/// every 500 ms, and status is recomputed only when the sources changed or a report arrived.
pub async fn run(mut sources: LocalSources, hub: Arc<ConfigHub>) {
    let mut reported = hub.reported();
    let mut dirty = true;
    loop {
        if sources.scan() {
            let n = sources.publish(&hub);
            tracing::info!(pods_changed = n, "local sources changed: configs published");
            dirty = true;
        }
        if std::mem::take(&mut dirty) {
            sources.write_statuses(&hub);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            r = reported.changed() => dirty = r.is_ok(),
        }
    }
}
