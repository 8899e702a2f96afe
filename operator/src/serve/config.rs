//! The config endpoints on the operator's 15012 server (mTLS: the caller is the SPIFFE ID
//! of its workload certificate).
//!
//! - `GET /v1/config?pod=NAME` holds one long-lived response open and writes the pod's
//!   whole `SidecarConfig` into it as one line of JSON: at once, then again on every change
//!   of that pod's config. The pod must exist in the certificate's namespace and run as its
//!   ServiceAccount, so a sidecar can never read another workload's config (secrets such as
//!   API-key HMAC keys are in it).
//!   The same stream carries the cluster's mesh table
//!   ([`apiward_policy::mesh::MeshTable`], its own `apiVersion`) at once and on every
//!   change: the meshed Services a sidecar originates mTLS to.
//! - `POST /v1/reports` takes a [`Report`] from a sidecar, about its own pod only.
//!
//! The [`ConfigHub`] holds the latest compiled config of every pod (a watch channel each)
//! and the latest report of every pod. Whatever the source (the Kubernetes API or local
//! files), the compiler's output is [`ConfigHub::publish`]ed into it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use apiward_policy::SidecarConfig;
use apiward_policy::config::Workload;
use apiward_policy::report::{InventoryEntry, REPORT_API_VERSION, Report};
use bytes::Bytes;
use tokio::sync::watch;

use crate::identity::{Refusal, SpiffeId};

/// One pod's config as the stream sends it: a JSON line, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `version` of the config.
    pub version: String,
    /// The config, JSON, with a trailing newline.
    pub line: Bytes,
}

#[derive(Debug)]
struct Pod {
    service_account: String,
    tx: watch::Sender<Option<Snapshot>>,
}

/// Endpoints kept per pod; reports about further endpoints only add to `overflow`.
pub const MAX_POD_ENDPOINTS: usize = 10_000;

/// A pod's inventory since the hub started: the sum of its reports' deltas.
#[derive(Debug, Clone, Default)]
pub struct PodInventory {
    /// (port, method, path) → counts.
    pub endpoints: BTreeMap<(u16, String, String), InventoryEntry>,
    /// Requests to endpoints that did not fit (here or in the sidecar's table).
    pub overflow: u64,
}

#[derive(Debug, Default)]
struct State {
    pods: HashMap<String, Pod>,
    reports: BTreeMap<String, Report>,
    inventory: BTreeMap<String, PodInventory>,
}

/// The latest config and report of every pod.
#[derive(Debug)]
pub struct ConfigHub {
    trust_domain: String,
    state: Mutex<State>,
    reported: watch::Sender<u64>,
    /// The mesh table, serialized once for every stream.
    mesh: watch::Sender<Option<Snapshot>>,
}

fn refusal(status: u16, code: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

impl ConfigHub {
    /// An empty hub for identities of `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(State::default()),
            reported: watch::Sender::new(0),
            mesh: watch::Sender::new(None),
        }
    }

    /// Replaces the mesh table every stream carries; whether its version changed (then
    /// every connected sidecar gets it, serialized once).
    pub fn publish_mesh(&self, table: &apiward_policy::mesh::MeshTable) -> bool {
        if self.mesh.borrow().as_ref().map(|s| s.version.as_str()) == Some(table.version.as_str()) {
            return false;
        }
        let Ok(mut line) = serde_json::to_vec(table) else {
            return false;
        };
        line.push(b'\n');
        self.mesh.send_replace(Some(Snapshot {
            version: table.version.clone(),
            line: line.into(),
        }));
        true
    }

    /// The mesh table stream (`None` until the first table).
    pub fn mesh(&self) -> watch::Receiver<Option<Snapshot>> {
        self.mesh.subscribe()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the known pods and their configs with the compiler's output. Streams are
    /// written to only for pods whose config version changed; streams of pods that are
    /// gone end. Returns how many pods got a new config.
    pub fn publish(
        &self,
        workloads: &[Workload],
        configs: &BTreeMap<String, SidecarConfig>,
    ) -> usize {
        let mut state = self.state();
        let mut changed = 0;
        let mut seen = std::collections::HashSet::new();
        for w in workloads {
            let key = format!("{}/{}", w.namespace, w.name);
            let config = configs.get(&key);
            let pod = state.pods.entry(key.clone()).or_insert_with(|| Pod {
                service_account: w.service_account.clone(),
                tx: watch::Sender::new(None),
            });
            pod.service_account = w.service_account.clone();
            let new_version = config.map(|c| c.version.as_str());
            let same = pod.tx.borrow().as_ref().map(|s| s.version.as_str()) == new_version;
            if !same {
                // Serialized only when the version changed: publishing stays cheap for
                // the thousands of pods a change does not touch.
                let snapshot = config.and_then(|c| {
                    let mut line = serde_json::to_vec(c).ok()?;
                    line.push(b'\n');
                    Some(Snapshot {
                        version: c.version.clone(),
                        line: line.into(),
                    })
                });
                pod.tx.send_replace(snapshot);
                changed += 1;
            }
            seen.insert(key);
        }
        state.pods.retain(|k, _| seen.contains(k));
        state.reports.retain(|k, _| seen.contains(k));
        state.inventory.retain(|k, _| seen.contains(k));
        changed
    }

    /// Checks that `caller` may read `namespace/pod`'s config.
    fn authorize(&self, state: &State, caller: &SpiffeId, pod: &str) -> Result<String, Refusal> {
        if caller.trust_domain != self.trust_domain {
            return Err(refusal(
                403,
                "wrong_trust_domain",
                format!(
                    "the certificate is for trust domain {}, not {}",
                    caller.trust_domain, self.trust_domain
                ),
            ));
        }
        let key = format!("{}/{pod}", caller.namespace);
        match state.pods.get(&key) {
            None => Err(refusal(
                404,
                "pod_not_found",
                format!("no pod {key} is known"),
            )),
            Some(p) if p.service_account != caller.service_account => Err(refusal(
                403,
                "not_your_pod",
                format!(
                    "pod {key} runs as ServiceAccount {}, the certificate is for {}",
                    p.service_account, caller.service_account
                ),
            )),
            Some(_) => Ok(key),
        }
    }

    /// The config stream of a pod, for a caller allowed to read it.
    pub fn subscribe(
        &self,
        caller: &SpiffeId,
        pod: &str,
    ) -> Result<watch::Receiver<Option<Snapshot>>, Refusal> {
        let state = self.state();
        let key = self.authorize(&state, caller, pod)?;
        Ok(state.pods[&key].tx.subscribe())
    }

    /// Stores a pod's report, if it is the caller's own.
    pub fn report(&self, caller: &SpiffeId, report: Report) -> Result<(), Refusal> {
        if report.api_version != REPORT_API_VERSION {
            return Err(refusal(
                400,
                "bad_report",
                format!("apiVersion must be {REPORT_API_VERSION}"),
            ));
        }
        if report.workload.namespace != caller.namespace
            || report.workload.service_account != caller.service_account
        {
            return Err(refusal(
                403,
                "not_your_pod",
                "the report is about another workload than the certificate's".into(),
            ));
        }
        let mut state = self.state();
        let key = self.authorize(&state, caller, &report.workload.name)?;
        let mut report = report;
        let changed = state
            .reports
            .get(&key)
            .is_none_or(|r| r.ignored_fields != report.ignored_fields);
        if changed && !report.ignored_fields.is_empty() {
            // Version skew: this operator is newer than the sidecar (see
            // `apiward_policy::config`). Nothing was loosened: such fields are optional.
            tracing::warn!(pod = key, fields = ?report.ignored_fields, "the sidecar ignores config fields it does not know: upgrade it");
        }
        let inv = state.inventory.entry(key.clone()).or_default();
        inv.overflow += report.inventory_overflow;
        for e in std::mem::take(&mut report.inventory) {
            let k = (e.port, e.method.clone(), e.path.clone());
            let room = inv.endpoints.len() < MAX_POD_ENDPOINTS;
            match inv.endpoints.get_mut(&k) {
                Some(have) => have.merge(&e),
                None if room => {
                    inv.endpoints.insert(k, e);
                }
                None => inv.overflow += e.requests,
            }
        }
        state.reports.insert(key, report);
        drop(state);
        self.reported.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The latest report of every pod that sent one (`namespace/name` →).
    pub fn reports(&self) -> BTreeMap<String, Report> {
        self.state().reports.clone()
    }

    /// The accumulated inventory of every pod that reported one.
    pub fn inventory(&self) -> BTreeMap<String, PodInventory> {
        self.state().inventory.clone()
    }

    /// Changes every time a report arrives.
    pub fn reported(&self) -> watch::Receiver<u64> {
        self.reported.subscribe()
    }

    /// How many config streams are open (sidecars connected).
    pub fn connected(&self) -> usize {
        self.state()
            .pods
            .values()
            .map(|p| p.tx.receiver_count())
            .sum()
    }

    /// The version published for a pod, if any.
    pub fn version(&self, pod: &str) -> Option<String> {
        self.state()
            .pods
            .get(pod)
            .and_then(|p| p.tx.borrow().as_ref().map(|s| s.version.clone()))
    }
}
