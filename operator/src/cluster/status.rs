//! The status writer: every policy's status ([`crate::status::policy_status`], the same
//! logic as local mode) server-side applied to its `status` subresource by the leader.
//!
//! Writes are batched and bounded: a policy's status is written only when it changed, at
//! most once per [`StatusWriter::min_interval`] (the first write of a policy is at once),
//! and its size is bounded by the status logic (100 endpoints, 32 warnings). A policy that
//! is gone (404) is forgotten. Rejections (`Accepted=False`) are also published as Warning
//! Events on the policy, once per distinct message.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apiward_crds::{ApiPolicy, ApiPolicyStatus, conditions};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};

use crate::index::ClusterIndex;
use crate::serve::config::ConfigHub;

/// The field manager of the operator's writes.
pub const FIELD_MANAGER: &str = crate::identity::kube::FIELD_MANAGER;

/// What was written for a policy, and when.
#[derive(Debug)]
struct Written {
    status: ApiPolicyStatus,
    at: Instant,
    /// The `Accepted=False` message an Event was published for.
    rejection: Option<String>,
}

/// Writes policies' status, batched.
pub struct StatusWriter {
    client: kube::Client,
    /// Least time between two writes of one policy's status.
    pub min_interval: Duration,
    written: BTreeMap<String, Written>,
    /// The newest computed status per policy (transition times are kept from it).
    computed: BTreeMap<String, ApiPolicyStatus>,
    recorder: Option<Recorder>,
    /// Status writes done (`apiward_operator_status_writes_total`).
    pub writes: u64,
    /// Status writes that failed.
    pub failures: u64,
}

/// A policy's status, ready to write.
#[derive(Debug, Clone)]
pub struct Pending {
    /// `namespace/name`.
    pub key: String,
    /// Its status.
    pub status: ApiPolicyStatus,
    /// `metadata.uid`, for Events.
    pub uid: Option<String>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("min_interval", &self.min_interval)
            .field("policies", &self.written.len())
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    /// A writer; `events` publishes Warning Events for rejections.
    pub fn new(client: kube::Client, min_interval: Duration, events: bool) -> Self {
        let recorder = events.then(|| {
            Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "apiward-operator".into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            )
        });
        Self {
            client,
            min_interval,
            written: BTreeMap::new(),
            computed: BTreeMap::new(),
            recorder,
            writes: 0,
            failures: 0,
        }
    }

    /// Computes every policy's status from the index and the sidecars' reports. Pure but
    /// for `now`.
    pub fn compute(&mut self, index: &ClusterIndex, hub: &ConfigHub, now: Time) -> Vec<Pending> {
        let reports = hub.reports();
        let seen = hub.inventory();
        let mut out = Vec::new();
        let results = index.policy_results();
        self.computed.retain(|k, _| results.contains_key(k));
        self.written.retain(|k, _| results.contains_key(k));
        for (pk, (generation, result)) in results {
            let policy = index.compiler().policy(&pk);
            let global = policy.is_some_and(|p| {
                p.spec
                    .quotas
                    .iter()
                    .any(|q| q.scope == apiward_crds::QuotaScope::Global)
            });
            let inventory = policy.map(|p| crate::status::inventory(p, &result.pods, &seen));
            let status = crate::status::policy_status(
                &result,
                generation,
                &|pod: &str| hub.version(pod),
                &reports,
                global,
                self.computed.get(&pk),
                now.clone(),
                inventory,
            );
            self.computed.insert(pk.clone(), status.clone());
            out.push(Pending {
                uid: index.policy_uid(&pk).map(str::to_owned),
                key: pk,
                status,
            });
        }
        out
    }

    /// The statuses that changed and whose policy was not written within `min_interval`.
    pub fn due(&self, pending: Vec<Pending>, now: Instant) -> Vec<Pending> {
        pending
            .into_iter()
            .filter(|p| match self.written.get(&p.key) {
                None => true,
                Some(w) => w.status != p.status && now.duration_since(w.at) >= self.min_interval,
            })
            .collect()
    }

    /// Writes one status (server-side apply of the status subresource).
    #[tracing::instrument(name = "write_status", skip_all, fields(policy = %p.key))]
    pub async fn write(&mut self, p: Pending) {
        let (ns, name) = p.key.split_once('/').unwrap_or(("default", &p.key));
        let api: Api<ApiPolicy> = Api::namespaced(self.client.clone(), ns);
        let body = serde_json::json!({
            "apiVersion": "apiward.io/v1alpha1",
            "kind": "ApiPolicy",
            "status": p.status,
        });
        let result = api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await;
        match result {
            Ok(_) => {
                self.writes += 1;
                let rejection = rejection(&p.status);
                let before = self.written.get(&p.key).and_then(|w| w.rejection.clone());
                if let (Some(msg), Some(rec)) = (&rejection, &self.recorder)
                    && before.as_ref() != Some(msg)
                {
                    let reference = ObjectReference {
                        api_version: Some("apiward.io/v1alpha1".into()),
                        kind: Some("ApiPolicy".into()),
                        name: Some(name.into()),
                        namespace: Some(ns.into()),
                        uid: p.uid.clone(),
                        ..Default::default()
                    };
                    let ev = Event {
                        type_: EventType::Warning,
                        reason: conditions::reasons::INVALID.into(),
                        note: Some(truncate(msg, 1000)),
                        action: "Validate".into(),
                        secondary: None,
                    };
                    if let Err(e) = rec.publish(&ev, &reference).await {
                        tracing::debug!(error = %e, policy = %p.key, "event not published");
                    }
                }
                self.written.insert(
                    p.key,
                    Written {
                        status: p.status,
                        at: Instant::now(),
                        rejection,
                    },
                );
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.written.remove(&p.key);
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!(policy = %p.key, error = %e, "status write failed; retried on the next round");
            }
        }
    }

    /// Computes, then writes what is due. Returns how many were written.
    pub async fn round(
        &mut self,
        index: &std::sync::Mutex<ClusterIndex>,
        hub: &ConfigHub,
    ) -> usize {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let pending = {
            let index = index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.compute(&index, hub, now)
        };
        let due = self.due(pending, Instant::now());
        let before = self.writes;
        for p in due {
            self.write(p).await;
        }
        (self.writes - before) as usize
    }
}

fn rejection(s: &ApiPolicyStatus) -> Option<String> {
    s.conditions
        .iter()
        .find(|c| c.type_ == conditions::ACCEPTED && c.status == "False")
        .map(|c| c.message.clone())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
