//! `Report`: what a sidecar tells the operator. Sidecar → operator, JSON, versioned.
//!
//! Reports carry the config version the sidecar is enforcing (its acknowledgement), decision
//! counters per policy, and inventory deltas: the endpoints it served since the last report.
//! They never carry tokens, keys, header values or raw paths beyond the templated ones.
//!
//! Version skew: the operator ignores fields it does not know (a newer sidecar's); a report
//! is status, never policy, so nothing is loosened by ignoring one.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::Workload;

/// The `apiVersion` of this contract.
pub const REPORT_API_VERSION: &str = "apiward.io/report/v1alpha1";

/// One report from one sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Always `apiward.io/report/v1alpha1`.
    pub api_version: String,
    /// The reporting pod.
    pub workload: Workload,
    /// `version` of the config being enforced (the acknowledgement); none before the first.
    #[serde(default)]
    pub config_version: Option<String>,
    /// The last config the sidecar refused, with why (it keeps enforcing `configVersion`).
    #[serde(default)]
    pub rejected_config: Option<RejectedConfig>,
    /// Decision counts since the last report, per policy.
    #[serde(default)]
    pub decisions: Vec<PolicyDecisions>,
    /// Endpoints served since the last report.
    #[serde(default)]
    pub inventory: Vec<InventoryEntry>,
    /// Entries dropped because the sidecar's inventory table was full.
    #[serde(default)]
    pub inventory_overflow: u64,
    /// The sidecar's current workload certificate, if it has one.
    #[serde(default)]
    pub certificate: Option<CertificateInfo>,
    /// The Global quota store, when the sidecar has Global quotas.
    #[serde(default)]
    pub quota_store: Option<QuotaStoreHealth>,
    /// Fields of the enforced config this sidecar does not know and ignored (the config
    /// came from a newer operator; see the version-skew rule in [`crate::config`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_fields: Vec<String>,
}

/// Whether the Global quota store (Redis) answers this sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaStoreHealth {
    /// Redis answers (the circuit breaker is closed).
    pub available: bool,
    /// Requests whose Global quota took `onStoreError` since the last report.
    pub errors: u64,
}

/// A config the sidecar refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedConfig {
    /// Its version.
    pub version: String,
    /// Why.
    pub reason: String,
}

/// Decision counters for one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDecisions {
    /// `namespace/name`.
    pub policy: String,
    /// Requests allowed.
    pub allowed: u64,
    /// Requests refused.
    pub denied: u64,
    /// Requests that would have been refused, let through by Audit mode.
    pub would_deny: u64,
}

/// How a caller was authenticated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum AuthKind {
    /// No identity at all.
    None,
    /// mTLS peer identity.
    Mtls,
    /// A verified JWT.
    Jwt,
    /// A valid API key.
    ApiKey,
}

/// Traffic seen on one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    /// The inbound port.
    pub port: u16,
    /// HTTP method.
    pub method: String,
    /// The declared template it matched, or the inferred one.
    pub path: String,
    /// Whether `path` is a declared endpoint.
    pub declared: bool,
    /// Requests counted.
    pub requests: u64,
    /// Responses by class, index 0 = 1xx … 4 = 5xx.
    pub responses: [u64; 5],
    /// Requests served (not refused) to callers with no identity.
    pub unauthenticated: u64,
    /// Requests refused.
    pub denied: u64,
    /// Requests Audit mode would have refused.
    pub would_deny: u64,
    /// First request in this interval (Unix seconds).
    pub first_seen: i64,
    /// Last request in this interval (Unix seconds).
    pub last_seen: i64,
    /// The busiest callers in this interval, at most a few.
    #[serde(default)]
    pub top_principals: Vec<PrincipalCount>,
    /// Sum of latencies, in microseconds (mean = sum / requests).
    #[serde(default)]
    pub latency_sum_micros: u64,
}

/// Callers kept per endpoint (the busiest).
pub const TOP_PRINCIPALS: usize = 4;

impl InventoryEntry {
    /// Adds another interval's (or another pod's) counts for the same endpoint.
    pub fn merge(&mut self, from: &InventoryEntry) {
        self.requests += from.requests;
        for (a, b) in self.responses.iter_mut().zip(from.responses) {
            *a += b;
        }
        self.unauthenticated += from.unauthenticated;
        self.denied += from.denied;
        self.would_deny += from.would_deny;
        self.first_seen = self.first_seen.min(from.first_seen);
        self.last_seen = self.last_seen.max(from.last_seen);
        self.latency_sum_micros += from.latency_sum_micros;
        for p in &from.top_principals {
            self.count_principal(&p.principal, p.requests);
        }
    }

    /// Counts `n` requests from `principal`, keeping the [`TOP_PRINCIPALS`] busiest
    /// (space-saving: a newcomer busier than the least busy replaces it).
    pub fn count_principal(&mut self, principal: &str, n: u64) {
        if let Some(p) = self
            .top_principals
            .iter_mut()
            .find(|p| p.principal == principal)
        {
            p.requests += n;
        } else if self.top_principals.len() < TOP_PRINCIPALS {
            self.top_principals.push(PrincipalCount {
                principal: principal.to_owned(),
                requests: n,
            });
        } else if let Some(min) = self.top_principals.iter_mut().min_by_key(|p| p.requests)
            && min.requests < n
        {
            *min = PrincipalCount {
                principal: principal.to_owned(),
                requests: n,
            };
        }
    }
}

/// A caller and its request count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrincipalCount {
    /// The principal.
    pub principal: String,
    /// Requests.
    pub requests: u64,
}

/// A workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    /// Serial number, hex.
    pub serial: String,
    /// Expiry (Unix seconds).
    pub not_after: i64,
}
