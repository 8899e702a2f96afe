//! The cluster's sources as facts for the compiler (STYLE: watches only feed the index).
//!
//! In: watch events for `ApiPolicy`, `Pod`, `Secret` and `ConfigMap` objects. Out: the
//! incremental [`Compiler`]'s per-pod configs and per-policy results, plus what the
//! index knows only itself: which generation of each policy is in force and which current
//! generations were refused by validation.
//!
//! Pure: no client, no clock. The kube-facing loop (`crate::operator`) turns watch streams
//! into calls here and publishes the results.
//!
//! - A policy whose current generation fails [`apiward_crds::validate`] changes nothing:
//!   the compiler keeps its last accepted generation (or none) and the status says
//!   `Accepted=False` with the field and the reason.
//! - Secrets and ConfigMaps are kept only while a policy in their namespace references
//!   them, so the operator does not hold every Secret of the cluster in memory;
//!   [`ClusterIndex::missing_refs`] lists the referenced ones it has not seen, for the loop
//!   to fetch.
//! - Pods are workloads while they run (not `Succeeded`/`Failed`).

pub mod mesh;

use std::collections::{BTreeMap, BTreeSet};

use apiward_crds::{ApiPolicy, FieldError};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};

use crate::compile::{Changed, Compiler, PolicyCondition, PolicyResult, Workload};

/// `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// `(namespace, name)` of an object (`default` when it names no namespace).
pub fn ns_name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    key(
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or(""),
    )
}

/// A kind of referenced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    /// `v1/Secret` (API keys, JWKS documents).
    Secret,
    /// `v1/ConfigMap` (OpenAPI documents).
    ConfigMap,
}

/// A policy's generation as the index last saw it.
#[derive(Debug, Clone, Default)]
struct PolicyState {
    /// `metadata.generation` of the object in the cluster.
    generation: Option<i64>,
    /// The generation the compiler holds (the last one that validated).
    in_force: Option<i64>,
    /// Why the current generation was refused (empty when it is in force).
    errors: Vec<FieldError>,
    /// `metadata.uid`, for Events about the object.
    uid: Option<String>,
}

/// The facts the operator knows, and the compiler over them.
#[derive(Debug)]
pub struct ClusterIndex {
    compiler: Compiler,
    policies: BTreeMap<String, PolicyState>,
    /// Names of the Secrets and ConfigMaps policies reference, per kind and namespace.
    referenced: BTreeMap<(RefKind, String), BTreeSet<String>>,
    /// Referenced objects present in the compiler.
    present: BTreeSet<(RefKind, String)>,
    /// Pods seen since the last `Init` of the pod watch (for relists).
    relist_pods: Option<BTreeSet<String>>,
    relist_policies: Option<BTreeSet<String>>,
    pods: BTreeSet<String>,
    /// Services and injected pods, for the mesh table.
    mesh: mesh::MeshIndex,
    /// The mesh table's inputs changed since [`ClusterIndex::take_mesh_table`].
    mesh_dirty: bool,
    relist_services: Option<BTreeSet<(String, String)>>,
    trust_domain: String,
}

/// What an event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Pods whose config changed.
    pub pods: Changed,
    /// True when a policy's status inputs changed (a new generation, valid or not).
    pub policies: bool,
}

impl ClusterIndex {
    /// An empty index for a trust domain.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            compiler: Compiler::new(trust_domain),
            policies: BTreeMap::new(),
            referenced: BTreeMap::new(),
            present: BTreeSet::new(),
            relist_pods: None,
            relist_policies: None,
            pods: BTreeSet::new(),
            mesh: mesh::MeshIndex::default(),
            mesh_dirty: true,
            relist_services: None,
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// The mesh table, when its inputs changed since the last call.
    pub fn take_mesh_table(&mut self) -> Option<apiward_policy::mesh::MeshTable> {
        std::mem::take(&mut self.mesh_dirty).then(|| self.mesh.table(&self.trust_domain))
    }

    /// Adds or replaces a Service (for the mesh table).
    pub fn apply_service(&mut self, s: &Service) {
        if let Some(seen) = self.relist_services.as_mut() {
            seen.insert(ns_name(&s.metadata));
        }
        self.mesh_dirty |= self.mesh.apply_service(s);
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        self.mesh_dirty |= self.mesh.delete_service(namespace, name);
    }

    /// The Service watch restarted.
    pub fn services_relisting(&mut self) {
        self.relist_services = Some(BTreeSet::new());
    }

    /// The Service relist is complete: Services it did not contain are deleted.
    pub fn services_listed(&mut self) {
        let Some(seen) = self.relist_services.take() else {
            return;
        };
        for (ns, name) in self.mesh.service_keys() {
            if !seen.contains(&(ns.clone(), name.clone())) {
                self.delete_service(&ns, &name);
            }
        }
    }

    /// The compiler's output.
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    /// The pods, as the config server must know them (for its authorization).
    pub fn workloads(&self) -> Vec<apiward_policy::config::Workload> {
        self.compiler.workload_identities()
    }

    /// Adds or replaces a policy. An invalid generation is recorded, not compiled.
    pub fn apply_policy(&mut self, mut p: ApiPolicy) -> Applied {
        p.metadata.namespace.get_or_insert_with(|| "default".into());
        let pk = meta_key(&p.metadata);
        if let Some(seen) = self.relist_policies.as_mut() {
            seen.insert(pk.clone());
        }
        let errors = apiward_crds::validate(&p.spec);
        let state = self.policies.entry(pk.clone()).or_default();
        state.generation = p.metadata.generation;
        state.uid = p.metadata.uid.clone();
        if !errors.is_empty() {
            state.errors = errors;
            return Applied {
                pods: Vec::new(),
                policies: true,
            };
        }
        state.errors.clear();
        state.in_force = p.metadata.generation;
        self.index_refs(&pk, Some(&p));
        let pods = self.compiler.upsert_policy(p);
        Applied {
            pods,
            policies: true,
        }
    }

    /// Removes a policy.
    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Applied {
        let pk = key(namespace, name);
        let existed = self.policies.remove(&pk).is_some();
        self.index_refs(&pk, None);
        Applied {
            pods: self.compiler.remove_policy(namespace, name),
            policies: existed,
        }
    }

    /// The policy watch restarted: the objects applied until [`Self::policies_listed`]
    /// are all there are.
    pub fn policies_relisting(&mut self) {
        self.relist_policies = Some(BTreeSet::new());
    }

    /// The policy relist is complete: policies it did not contain are deleted.
    pub fn policies_listed(&mut self) -> Applied {
        let Some(seen) = self.relist_policies.take() else {
            return Applied::default();
        };
        let gone: Vec<String> = self
            .policies
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        let mut out = Applied::default();
        for pk in gone {
            let (ns, name) = pk.split_once('/').unwrap_or(("default", &pk));
            let a = self.delete_policy(ns, name);
            out.pods.extend(a.pods);
            out.policies |= a.policies;
        }
        out
    }

    /// Adds or replaces a pod (a finished pod is removed).
    pub fn apply_pod(&mut self, pod: &Pod) -> Applied {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pk = key(&ns, &name);
        if let Some(seen) = self.relist_pods.as_mut() {
            seen.insert(pk.clone());
        }
        self.mesh_dirty |= self.mesh.apply_pod(pod);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return self.delete_pod(&ns, &name);
        }
        let spec = pod.spec.as_ref();
        let w = Workload {
            namespace: ns,
            name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            ports: spec
                .map(|s| {
                    let mut ports: Vec<u16> = s
                        .containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .filter_map(|p| u16::try_from(p.container_port).ok())
                        .collect();
                    ports.sort_unstable();
                    ports.dedup();
                    ports
                })
                .unwrap_or_default(),
        };
        self.pods.insert(pk);
        Applied {
            pods: self.compiler.upsert_workload(w),
            policies: false,
        }
    }

    /// Removes a pod.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Applied {
        self.pods.remove(&key(namespace, name));
        self.mesh_dirty |= self.mesh.delete_pod(namespace, name);
        Applied {
            pods: self.compiler.remove_workload(namespace, name),
            policies: false,
        }
    }

    /// The pod watch restarted.
    pub fn pods_relisting(&mut self) {
        self.relist_pods = Some(BTreeSet::new());
    }

    /// The pod relist is complete: pods it did not contain are deleted.
    pub fn pods_listed(&mut self) -> Applied {
        let Some(seen) = self.relist_pods.take() else {
            return Applied::default();
        };
        let gone: Vec<String> = self.pods.difference(&seen).cloned().collect();
        let mut out = Applied::default();
        for pk in gone {
            let (ns, name) = pk.split_once('/').unwrap_or(("default", &pk));
            out.pods.extend(self.delete_pod(ns, name).pods);
        }
        out
    }

    fn is_referenced(&self, kind: RefKind, ns: &str, name: &str) -> bool {
        self.referenced
            .get(&(kind, ns.to_owned()))
            .is_some_and(|s| s.contains(name))
    }

    /// Adds or replaces a Secret, if a policy references it (others are not kept).
    pub fn apply_secret(&mut self, s: Secret) -> Applied {
        let (ns, name) = ns_name(&s.metadata);
        if !self.is_referenced(RefKind::Secret, &ns, &name) {
            return Applied::default();
        }
        self.present.insert((RefKind::Secret, key(&ns, &name)));
        Applied {
            pods: self.compiler.upsert_secret(s),
            policies: true,
        }
    }

    /// Removes a Secret.
    pub fn delete_secret(&mut self, namespace: &str, name: &str) -> Applied {
        if !self
            .present
            .remove(&(RefKind::Secret, key(namespace, name)))
        {
            return Applied::default();
        }
        Applied {
            pods: self.compiler.remove_secret(namespace, name),
            policies: true,
        }
    }

    /// Adds or replaces a ConfigMap, if a policy references it.
    pub fn apply_config_map(&mut self, m: ConfigMap) -> Applied {
        let (ns, name) = ns_name(&m.metadata);
        if !self.is_referenced(RefKind::ConfigMap, &ns, &name) {
            return Applied::default();
        }
        self.present.insert((RefKind::ConfigMap, key(&ns, &name)));
        Applied {
            pods: self.compiler.upsert_config_map(m),
            policies: true,
        }
    }

    /// Removes a ConfigMap.
    pub fn delete_config_map(&mut self, namespace: &str, name: &str) -> Applied {
        if !self
            .present
            .remove(&(RefKind::ConfigMap, key(namespace, name)))
        {
            return Applied::default();
        }
        Applied {
            pods: self.compiler.remove_config_map(namespace, name),
            policies: true,
        }
    }

    /// Referenced Secrets and ConfigMaps not seen yet: `(kind, namespace, name)`.
    pub fn missing_refs(&self) -> Vec<(RefKind, String, String)> {
        let mut out = Vec::new();
        for ((kind, ns), names) in &self.referenced {
            for name in names {
                if !self.present.contains(&(*kind, key(ns, name))) {
                    out.push((*kind, ns.clone(), name.clone()));
                }
            }
        }
        out
    }

    /// Records what policy `pk` references (`None`: nothing any more) and forgets objects
    /// no policy references now.
    fn index_refs(&mut self, pk: &str, p: Option<&ApiPolicy>) {
        let ns = pk.split_once('/').map_or("default", |(n, _)| n).to_owned();
        // Rebuild this namespace's references from the policies the compiler holds, with
        // `p` in place of the old version of `pk`.
        let mut secrets = BTreeSet::new();
        let mut maps = BTreeSet::new();
        let mut add = |p: &ApiPolicy| {
            secrets.extend(crate::compile::referenced_secrets(p).map(str::to_owned));
            maps.extend(crate::compile::referenced_config_map(p).map(str::to_owned));
        };
        for other in self.compiler.policies_in(&ns) {
            if meta_key(&other.metadata) != pk {
                add(other);
            }
        }
        if let Some(p) = p {
            add(p);
        }
        for (kind, names) in [(RefKind::Secret, secrets), (RefKind::ConfigMap, maps)] {
            let unused: Vec<String> = self
                .present
                .iter()
                .filter(|(k, full)| {
                    *k == kind
                        && full
                            .split_once('/')
                            .is_some_and(|(n, name)| n == ns && !names.contains(name))
                })
                .map(|(_, full)| full.clone())
                .collect();
            for full in unused {
                self.present.remove(&(kind, full.clone()));
                let (_, name) = full.split_once('/').unwrap_or_default();
                match kind {
                    RefKind::Secret => self.compiler.remove_secret(&ns, name),
                    RefKind::ConfigMap => self.compiler.remove_config_map(&ns, name),
                };
            }
            if names.is_empty() {
                self.referenced.remove(&(kind, ns.clone()));
            } else {
                self.referenced.insert((kind, ns.clone()), names);
            }
        }
    }

    /// Every policy's result for its status: the compiler's, with the index's own
    /// `Accepted=False` for a refused current generation. Keys are `namespace/name`; the
    /// value holds the generation the conditions describe.
    pub fn policy_results(&self) -> BTreeMap<String, (Option<i64>, PolicyResult)> {
        let mut compiled = self.compiler.policy_results();
        self.policies
            .iter()
            .map(|(pk, st)| {
                let mut result = compiled.remove(pk).unwrap_or_default();
                if !st.errors.is_empty() {
                    let kept = match st.in_force {
                        Some(g) => format!("; generation {g} stays in force"),
                        None => "; nothing of it is in force".into(),
                    };
                    let fields: Vec<String> = st.errors.iter().map(ToString::to_string).collect();
                    result
                        .conditions
                        .retain(|c| c.type_ != apiward_crds::conditions::ACCEPTED);
                    result.conditions.insert(
                        0,
                        PolicyCondition {
                            type_: apiward_crds::conditions::ACCEPTED,
                            status: false,
                            reason: apiward_crds::conditions::reasons::INVALID,
                            message: format!("{}{kept}", fields.join("; ")),
                        },
                    );
                }
                (pk.clone(), (st.generation, result))
            })
            .collect()
    }

    /// The `metadata.uid` of a policy, if known.
    pub fn policy_uid(&self, pk: &str) -> Option<&str> {
        self.policies.get(pk).and_then(|s| s.uid.as_deref())
    }
}

#[cfg(test)]
mod tests;
