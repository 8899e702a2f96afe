//! The compiler: `(policies, workloads, secrets, configmaps) → per-pod SidecarConfig +
//! per-policy conditions`. Pure: no client, no clock, no I/O; the same input always gives
//! the same output and the same version hashes.
//!
//! Merge rules when several policies select one pod and port:
//! - rules and quotas of every policy apply (deny wins over allow, allows are a union);
//! - mTLS is the strictest mode; the port is Audit only if every policy is Audit
//!   (rules and quotas of Audit policies are marked `audit` individually);
//! - request limits take the smallest of each limit; content types must agree or the
//!   later policy (by name) gets `Accepted=False, reason Conflicted` and is left out;
//! - response filters are a union; declared APIs are a union; the undeclared action is
//!   the strictest (Deny > Audit > Allow).
//!
//! API keys are turned into HMAC-SHA256 hashes here; raw keys never enter a config.
//!
//! An update that cannot be used (invalid, or a reference missing) never reaches a
//! sidecar: the policy's last good version stays in force and its conditions say why.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apiward_crds::{self as crds, ApiPolicy};
use apiward_policy::config::{self as wire, SidecarConfig};
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sha2::{Digest, Sha256};

/// A pod as the compiler sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// ServiceAccount.
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// Container ports.
    #[serde(default)]
    pub ports: Vec<u16>,
}

fn default_sa() -> String {
    "default".into()
}

/// Everything the compiler reads.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// Policies (already validated).
    pub policies: Vec<ApiPolicy>,
    /// Pods.
    pub workloads: Vec<Workload>,
    /// Secrets referenced by policies.
    pub secrets: Vec<Secret>,
    /// ConfigMaps referenced by policies.
    pub config_maps: Vec<ConfigMap>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
}

/// A condition the compiler sets on a policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyCondition {
    /// `Accepted` or `ResolvedRefs`.
    pub type_: &'static str,
    /// True/False.
    pub status: bool,
    /// Reason constant.
    pub reason: &'static str,
    /// Message naming the field.
    pub message: String,
}

/// Compiler output for one policy.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PolicyResult {
    /// Conditions.
    pub conditions: Vec<PolicyCondition>,
    /// Pods it selects (`namespace/name`).
    pub pods: Vec<String>,
    /// Lint findings, one line each (`AW001 spec.mtls: …`).
    pub warnings: Vec<String>,
}

/// Everything the compiler produces.
#[derive(Debug, Default)]
pub struct Output {
    /// Per pod (`namespace/name`), its config.
    pub configs: BTreeMap<String, SidecarConfig>,
    /// Per policy (`namespace/name`).
    pub policies: BTreeMap<String, PolicyResult>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn policy_key(p: &ApiPolicy) -> String {
    key(
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or(""),
    )
}

/// Does a label selector select these labels?
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    ml && sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.as_deref().unwrap_or(&[]);
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    })
}

/// The Secrets and ConfigMaps a policy may reference, by `namespace/name`.
struct Refs<'a> {
    secrets: &'a BTreeMap<String, Secret>,
    config_maps: &'a BTreeMap<String, ConfigMap>,
}

fn secret_value(
    secrets: &BTreeMap<String, Secret>,
    ns: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let s = secrets.get(&key(ns, name))?;
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.as_bytes().to_vec());
    }
    Some(out)
}

/// The HMAC key for one API-key provider: derived from its identity, so compiles are
/// deterministic; hashes are salted per provider (no cross-policy table lookups).
fn hmac_key(policy: &str, provider: &str, secret: &str) -> Vec<u8> {
    Sha256::digest(format!("apiward/apikey/v1\n{policy}\n{provider}\n{secret}")).to_vec()
}

/// HMAC-SHA256 of an API key, hex.
pub fn hash_api_key(hmac_key: &[u8], key: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(hmac_key).expect("HMAC takes any key length");
    mac.update(key);
    hex(&mac.finalize().into_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A policy turned into its wire pieces, before merging into ports.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    key: String,
    ports: Vec<u16>,
    mode: wire::Mode,
    mtls: wire::MtlsMode,
    jwt: Vec<wire::JwtProvider>,
    api_keys: Vec<wire::ApiKeyProvider>,
    rules: Vec<wire::RuleConfig>,
    quotas: Vec<wire::QuotaConfig>,
    limits: wire::RequestLimits,
    response: wire::ResponseFilter,
    api: Option<wire::ApiSurface>,
    egress: Option<Vec<wire::EgressRule>>,
}

fn compile_policy(
    p: &ApiPolicy,
    refs: &Refs<'_>,
    trust_domain: &str,
    conds: &mut Vec<PolicyCondition>,
) -> Option<Compiled> {
    match translate::policy(p, refs, trust_domain) {
        Ok(c) => {
            conds.push(PolicyCondition {
                type_: crds::conditions::RESOLVED_REFS,
                status: true,
                reason: crds::conditions::reasons::RESOLVED_REFS,
                message: "all references resolved".into(),
            });
            Some(c)
        }
        Err(e) => {
            conds.push(e.condition());
            None
        }
    }
}

/// Link-local and cloud-metadata addresses, blocked for egress by default (OWASP API7).
pub const DEFAULT_BLOCKED_CIDRS: [&str; 2] = ["169.254.0.0/16", "fd00:ec2::254/128"];

/// Compiles everything at once. Deterministic: the same inputs give the same configs and
/// versions, whatever their order.
pub fn compile(inputs: &Inputs) -> Output {
    let c = Compiler::from_inputs(inputs);
    Output {
        configs: c.configs.clone(),
        policies: c.policy_results(),
    }
}

/// Pods whose config changed (or was removed) after an update, `namespace/name`, sorted.
pub type Changed = Vec<String>;

/// The incremental compiler: holds the facts and the compiled results, and after each
/// change recompiles only the pods that change can affect. Pure: no I/O, no clock.
#[derive(Debug, Default)]
pub struct Compiler {
    trust_domain: String,
    policies: BTreeMap<String, ApiPolicy>,
    policies_by_ns: BTreeMap<String, BTreeSet<String>>,
    compiled: BTreeMap<String, Option<Compiled>>,
    conditions: BTreeMap<String, Vec<PolicyCondition>>,
    conflicts: BTreeMap<String, String>,
    selected: BTreeMap<String, BTreeSet<String>>,
    workloads: BTreeMap<String, Workload>,
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    pods_by_label: HashMap<(String, String, String), BTreeSet<String>>,
    pod_policies: HashMap<String, BTreeSet<String>>,
    secrets: BTreeMap<String, Secret>,
    config_maps: BTreeMap<String, ConfigMap>,
    configs: BTreeMap<String, SidecarConfig>,
}

fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    key(
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or(""),
    )
}

impl Compiler {
    /// An empty compiler for a trust domain.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            ..Default::default()
        }
    }

    /// Loads everything, then compiles every pod once.
    pub fn from_inputs(inputs: &Inputs) -> Self {
        let mut c = Self::new(&inputs.trust_domain);
        for s in &inputs.secrets {
            c.secrets.insert(meta_key(&s.metadata), s.clone());
        }
        for m in &inputs.config_maps {
            c.config_maps.insert(meta_key(&m.metadata), m.clone());
        }
        for w in &inputs.workloads {
            c.index_workload(w.clone());
        }
        let mut keys = Vec::new();
        for p in &inputs.policies {
            let pk = policy_key(p);
            c.policies_by_ns
                .entry(
                    p.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                )
                .or_default()
                .insert(pk.clone());
            c.policies.insert(pk.clone(), p.clone());
            keys.push(pk);
        }
        for pk in &keys {
            c.recompile_policy(pk);
        }
        let pods: Vec<String> = c.workloads.keys().cloned().collect();
        c.rebuild(pods.into_iter().collect());
        c
    }

    /// The current config of every pod that has one.
    pub fn configs(&self) -> &BTreeMap<String, SidecarConfig> {
        &self.configs
    }

    /// Conditions and selected pods of every policy.
    pub fn policy_results(&self) -> BTreeMap<String, PolicyResult> {
        self.policies
            .keys()
            .map(|pk| {
                let mut conditions = self.conditions.get(pk).cloned().unwrap_or_default();
                if let Some(msg) = self.conflicts.get(pk) {
                    conditions.push(PolicyCondition {
                        type_: crds::conditions::ACCEPTED,
                        status: false,
                        reason: crds::conditions::reasons::CONFLICTED,
                        message: msg.clone(),
                    });
                }
                let warnings: Vec<String> = lint::lint(&self.policies[pk])
                    .into_iter()
                    .map(|l| format!("{} {}: {} (fix: {})", l.code, l.field, l.message, l.fix))
                    .collect();
                if !self.conflicts.contains_key(pk) && conditions.iter().all(|c| c.status) {
                    let (reason, message) = if warnings.is_empty() {
                        (
                            crds::conditions::reasons::ACCEPTED,
                            "the policy is valid".to_string(),
                        )
                    } else {
                        (
                            crds::conditions::reasons::ACCEPTED_WITH_WARNINGS,
                            format!(
                                "the policy is valid; {} warning(s) in status.warnings",
                                warnings.len()
                            ),
                        )
                    };
                    conditions.insert(
                        0,
                        PolicyCondition {
                            type_: crds::conditions::ACCEPTED,
                            status: true,
                            reason,
                            message,
                        },
                    );
                }
                let pods = self
                    .selected
                    .get(pk)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                (
                    pk.clone(),
                    PolicyResult {
                        conditions,
                        pods,
                        warnings,
                    },
                )
            })
            .collect()
    }

    /// Adds or replaces a policy.
    pub fn upsert_policy(&mut self, p: ApiPolicy) -> Changed {
        let pk = policy_key(&p);
        if self
            .policies
            .get(&pk)
            .is_some_and(|old| old.spec == p.spec && old.metadata.labels == p.metadata.labels)
        {
            return Vec::new();
        }
        self.policies_by_ns
            .entry(
                p.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            )
            .or_default()
            .insert(pk.clone());
        self.policies.insert(pk.clone(), p);
        self.conflicts.remove(&pk);
        let mut affected = self.selected.get(&pk).cloned().unwrap_or_default();
        affected.extend(self.recompile_policy(&pk));
        self.rebuild(affected)
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> Changed {
        let pk = key(namespace, name);
        let Some(_) = self.policies.remove(&pk) else {
            return Vec::new();
        };
        if let Some(s) = self.policies_by_ns.get_mut(namespace) {
            s.remove(&pk);
        }
        self.compiled.remove(&pk);
        self.conditions.remove(&pk);
        self.conflicts.remove(&pk);
        let affected = self.selected.remove(&pk).unwrap_or_default();
        for pod in &affected {
            if let Some(s) = self.pod_policies.get_mut(pod) {
                s.remove(&pk);
            }
        }
        self.rebuild(affected)
    }

    /// Adds or replaces a pod.
    pub fn upsert_workload(&mut self, w: Workload) -> Changed {
        let wk = key(&w.namespace, &w.name);
        if self.workloads.get(&wk) == Some(&w) {
            return Vec::new();
        }
        self.unindex_workload(&wk);
        self.index_workload(w.clone());
        let mut selecting = BTreeSet::new();
        for pk in self.policies_by_ns.get(&w.namespace).into_iter().flatten() {
            if self.compiled.get(pk).is_some_and(Option::is_some)
                && selects(&self.policies[pk].spec.target_ref.selector, &w.labels)
            {
                selecting.insert(pk.clone());
            }
        }
        for pk in &selecting {
            self.selected
                .entry(pk.clone())
                .or_default()
                .insert(wk.clone());
        }
        self.pod_policies.insert(wk.clone(), selecting);
        self.rebuild([wk].into())
    }

    /// Removes a pod.
    pub fn remove_workload(&mut self, namespace: &str, name: &str) -> Changed {
        let wk = key(namespace, name);
        if !self.workloads.contains_key(&wk) {
            return Vec::new();
        }
        self.unindex_workload(&wk);
        for pk in self.pod_policies.remove(&wk).unwrap_or_default() {
            if let Some(s) = self.selected.get_mut(&pk) {
                s.remove(&wk);
            }
        }
        self.configs.remove(&wk);
        vec![wk]
    }

    /// Adds or replaces a Secret; recompiles the policies of its namespace that use it.
    pub fn upsert_secret(&mut self, s: Secret) -> Changed {
        let k = meta_key(&s.metadata);
        if self.secrets.get(&k) == Some(&s) {
            return Vec::new();
        }
        let (ns, name) = (
            s.metadata.namespace.clone().unwrap_or_default(),
            s.metadata.name.clone().unwrap_or_default(),
        );
        self.secrets.insert(k, s);
        self.refs_changed(&ns, |p| references_secret(p, &name))
    }

    /// Adds or replaces a ConfigMap; recompiles the policies of its namespace that use it.
    pub fn upsert_config_map(&mut self, m: ConfigMap) -> Changed {
        let k = meta_key(&m.metadata);
        if self.config_maps.get(&k) == Some(&m) {
            return Vec::new();
        }
        let (ns, name) = (
            m.metadata.namespace.clone().unwrap_or_default(),
            m.metadata.name.clone().unwrap_or_default(),
        );
        self.config_maps.insert(k, m);
        self.refs_changed(&ns, |p| references_config_map(p, &name))
    }

    /// Removes a Secret; recompiles the policies of its namespace that used it.
    pub fn remove_secret(&mut self, namespace: &str, name: &str) -> Changed {
        if self.secrets.remove(&key(namespace, name)).is_none() {
            return Vec::new();
        }
        self.refs_changed(namespace, |p| references_secret(p, name))
    }

    /// Removes a ConfigMap; recompiles the policies of its namespace that used it.
    pub fn remove_config_map(&mut self, namespace: &str, name: &str) -> Changed {
        if self.config_maps.remove(&key(namespace, name)).is_none() {
            return Vec::new();
        }
        self.refs_changed(namespace, |p| references_config_map(p, name))
    }

    /// A policy the compiler holds (`namespace/name`).
    pub fn policy(&self, key: &str) -> Option<&ApiPolicy> {
        self.policies.get(key)
    }

    /// The policies of a namespace the compiler holds.
    pub fn policies_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a ApiPolicy> {
        self.policies_by_ns
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|pk| self.policies.get(pk))
    }

    /// Every pod's identity (namespace, name, ServiceAccount), for the config server.
    pub fn workload_identities(&self) -> Vec<wire::Workload> {
        self.workloads
            .values()
            .map(|w| wire::Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
            })
            .collect()
    }

    fn refs_changed(&mut self, ns: &str, uses: impl Fn(&ApiPolicy) -> bool) -> Changed {
        let users: Vec<String> = self
            .policies_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter(|pk| uses(&self.policies[*pk]))
            .cloned()
            .collect();
        let mut affected = BTreeSet::new();
        for pk in users {
            affected.extend(self.selected.get(&pk).cloned().unwrap_or_default());
            affected.extend(self.recompile_policy(&pk));
        }
        self.rebuild(affected)
    }

    fn index_workload(&mut self, w: Workload) {
        let wk = key(&w.namespace, &w.name);
        self.pods_by_ns
            .entry(w.namespace.clone())
            .or_default()
            .insert(wk.clone());
        for (k, v) in &w.labels {
            self.pods_by_label
                .entry((w.namespace.clone(), k.clone(), v.clone()))
                .or_default()
                .insert(wk.clone());
        }
        self.workloads.insert(wk, w);
    }

    fn unindex_workload(&mut self, wk: &str) {
        let Some(w) = self.workloads.remove(wk) else {
            return;
        };
        if let Some(s) = self.pods_by_ns.get_mut(&w.namespace) {
            s.remove(wk);
        }
        for (k, v) in &w.labels {
            if let Some(s) =
                self.pods_by_label
                    .get_mut(&(w.namespace.clone(), k.clone(), v.clone()))
            {
                s.remove(wk);
            }
        }
    }

    /// Pods a policy selects, using the label index when it has matchLabels.
    fn select(&self, p: &ApiPolicy) -> BTreeSet<String> {
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let sel = &p.spec.target_ref.selector;
        let empty = BTreeSet::new();
        let candidates = sel
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| {
                self.pods_by_label
                    .get(&(ns.clone(), k.clone(), v.clone()))
                    .unwrap_or(&empty)
            })
            .min_by_key(|s| s.len())
            .unwrap_or_else(|| self.pods_by_ns.get(&ns).unwrap_or(&empty));
        candidates
            .iter()
            .filter(|wk| selects(sel, &self.workloads[*wk].labels))
            .cloned()
            .collect()
    }

    /// Recompiles one policy and its selection; returns the pods it selects now.
    fn recompile_policy(&mut self, pk: &str) -> BTreeSet<String> {
        let p = &self.policies[pk];
        let mut conds = Vec::new();
        let refs = Refs {
            secrets: &self.secrets,
            config_maps: &self.config_maps,
        };
        let compiled = compile_policy(p, &refs, &self.trust_domain, &mut conds);
        if compiled.is_none() && self.compiled.get(pk).is_some_and(Option::is_some) {
            // Nothing is half-applied: an update that cannot be used leaves the last good
            // version in force (its conditions say why), rather than dropping the policy
            // and with it the pods' default deny.
            self.conditions.insert(pk.to_owned(), conds);
            return self.selected.get(pk).cloned().unwrap_or_default();
        }
        let now = if compiled.is_some() {
            self.select(p)
        } else {
            BTreeSet::new()
        };
        let before = self
            .selected
            .insert(pk.to_owned(), now.clone())
            .unwrap_or_default();
        for pod in before.difference(&now) {
            if let Some(s) = self.pod_policies.get_mut(pod) {
                s.remove(pk);
            }
        }
        for pod in &now {
            self.pod_policies
                .entry(pod.clone())
                .or_default()
                .insert(pk.to_owned());
        }
        self.compiled.insert(pk.to_owned(), compiled);
        self.conditions.insert(pk.to_owned(), conds);
        now
    }

    /// Rebuilds the given pods' configs; returns those whose config changed. A policy
    /// that conflicts with another on some pod is excluded from every pod (never half-applied).
    fn rebuild(&mut self, mut pods: BTreeSet<String>) -> Changed {
        let mut changed = BTreeSet::new();
        // Policies conflicted on these pods get another chance: their partner may have changed.
        let retry: Vec<String> = pods
            .iter()
            .flat_map(|p| self.pod_policies.get(p).into_iter().flatten())
            .filter(|pk| self.conflicts.contains_key(*pk))
            .cloned()
            .collect();
        for pk in retry {
            self.conflicts.remove(&pk);
            pods.extend(self.selected.get(&pk).cloned().unwrap_or_default());
        }
        while let Some(wk) = pods.pop_first() {
            match self.build_pod(&wk) {
                Ok(Some(cfg)) => {
                    if self.configs.get(&wk).map(|c| &c.version) != Some(&cfg.version) {
                        changed.insert(wk.clone());
                    }
                    self.configs.insert(wk, cfg);
                }
                Ok(None) => {
                    if self.configs.remove(&wk).is_some() {
                        changed.insert(wk);
                    }
                }
                Err((pk, msg)) => {
                    self.conflicts.insert(pk.clone(), msg);
                    pods.insert(wk);
                    pods.extend(self.selected.get(&pk).cloned().unwrap_or_default());
                }
            }
        }
        changed.into_iter().collect()
    }

    fn build_pod(&self, wk: &str) -> Result<Option<SidecarConfig>, (String, String)> {
        let Some(w) = self.workloads.get(wk) else {
            return Ok(None);
        };
        let selecting: Vec<&Compiled> = self
            .pod_policies
            .get(wk)
            .into_iter()
            .flatten()
            .filter(|pk| !self.conflicts.contains_key(*pk))
            .filter_map(|pk| self.compiled.get(pk).and_then(Option::as_ref))
            .collect();
        let mut ports: BTreeSet<u16> = w.ports.iter().copied().collect();
        for c in &selecting {
            ports.extend(c.ports.iter().copied());
        }
        let mut port_policies = Vec::new();
        for port in ports {
            let parts: Vec<&Compiled> = selecting
                .iter()
                .filter(|c| c.ports.is_empty() || c.ports.contains(&port))
                .copied()
                .collect();
            if parts.is_empty() {
                continue;
            }
            match merge::port(port, &parts) {
                Ok(pp) => port_policies.push(pp),
                Err(msg) => {
                    let last = parts.last().map(|c| c.key.clone()).unwrap_or_default();
                    return Err((last, msg.to_string()));
                }
            }
        }
        let mut jwt_providers: Vec<wire::JwtProvider> = selecting
            .iter()
            .flat_map(|c| c.jwt.iter().cloned())
            .collect();
        jwt_providers.sort_by(|a, b| a.id.cmp(&b.id));
        let mut api_key_providers: Vec<wire::ApiKeyProvider> = selecting
            .iter()
            .flat_map(|c| c.api_keys.iter().cloned())
            .collect();
        api_key_providers.sort_by(|a, b| a.id.cmp(&b.id));
        let restricted: Vec<&Vec<wire::EgressRule>> =
            selecting.iter().filter_map(|c| c.egress.as_ref()).collect();
        let egress = wire::EgressPolicy {
            restricted: !restricted.is_empty(),
            allow: restricted.into_iter().flatten().cloned().collect(),
            blocked_cidrs: DEFAULT_BLOCKED_CIDRS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let requires = required_features(&port_policies);
        let mut cfg = SidecarConfig {
            api_version: wire::SIDECAR_CONFIG_API_VERSION.into(),
            version: String::new(),
            workload: wire::Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
            },
            trust_domain: self.trust_domain.clone(),
            default_mtls: wire::MtlsMode::Strict,
            ports: port_policies,
            jwt_providers,
            api_key_providers,
            egress,
            requires,
        };
        cfg.version = version_of(&cfg);
        Ok(Some(cfg))
    }
}

/// The features of `v1alpha1` a config uses whose absence would loosen what a sidecar
/// enforces (the version-skew rule in `apiward_policy::config`): a sidecar that does not
/// implement one refuses the config instead of ignoring the field.
pub fn required_features(ports: &[wire::PortPolicy]) -> Vec<String> {
    let mut out = Vec::new();
    if ports.iter().any(|p| {
        !p.response.remove_fields.is_empty()
            && p.response.on_unfilterable == wire::OnUnfilterable::Refuse
    }) {
        out.push("responseFilter.onUnfilterable".to_owned());
    }
    out
}

/// The Secrets (API keys, JWKS documents) a policy references, by name in its namespace.
pub fn referenced_secrets(p: &ApiPolicy) -> impl Iterator<Item = &str> {
    p.spec.authentication.iter().flat_map(|a| {
        a.api_keys.iter().map(|k| k.secret_ref.name.as_str()).chain(
            a.jwt
                .iter()
                .filter_map(|j| j.jwks_secret_ref.as_ref().map(|r| r.name.as_str())),
        )
    })
}

/// The ConfigMap (an OpenAPI document) a policy references, by name in its namespace.
pub fn referenced_config_map(p: &ApiPolicy) -> Option<&str> {
    p.spec
        .api
        .as_ref()
        .and_then(|a| a.openapi_ref.as_ref())
        .map(|r| r.config_map_ref.name.as_str())
}

fn references_secret(p: &ApiPolicy, name: &str) -> bool {
    referenced_secrets(p).any(|s| s == name)
}

fn references_config_map(p: &ApiPolicy, name: &str) -> bool {
    referenced_config_map(p) == Some(name)
}

/// Content hash of a config (its `version` field excluded).
pub fn version_of(cfg: &SidecarConfig) -> String {
    let mut c = cfg.clone();
    c.version = String::new();
    let bytes = serde_json::to_vec(&c).expect("configs always serialize");
    hex(&Sha256::digest(&bytes)[..8])
}

mod error;
pub mod lint;
mod merge;
mod translate;

pub use error::CompileError;
#[cfg(test)]
mod tests;
