//! `ApiPolicy` status: what the operator observed. Written only by the operator's leader,
//! with server-side apply, bounded in size.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of an `ApiPolicy`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiPolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs`, `Programmed`, `Ready` (see `conditions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Lint findings and other warnings, one line each (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Pods selected and pods enforcing the current config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// Decision counters since the policy was created (summed over its sidecars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionCounters>,
    /// The endpoints the sidecars actually served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Inventory>,
}

/// Target counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// Pods the policy selects.
    pub pods: u32,
    /// Of those, pods whose sidecar acknowledged the current config.
    pub acked: u32,
    /// The config version(s) being programmed, when all pods share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
}

/// Decision counters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DecisionCounters {
    /// Requests allowed.
    pub allowed: u64,
    /// Requests refused.
    pub denied: u64,
    /// Requests Audit mode let through that Enforce would have refused.
    pub would_deny: u64,
}

/// The observed API inventory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Endpoints: every flagged one, then the busiest, up to a bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<InventoryEndpoint>,
    /// Totals over all endpoints, including those not listed.
    #[serde(default)]
    pub summary: InventorySummary,
}

/// One endpoint seen (or declared and unused).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEndpoint {
    /// HTTP method.
    pub method: String,
    /// Declared or inferred path template.
    pub path: String,
    /// Declared in the policy's API.
    pub declared: bool,
    /// Requests seen.
    pub requests: u64,
    /// Responses by class (`2xx`, `4xx`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub responses: BTreeMap<String, u64>,
    /// Requests from callers with no identity.
    #[serde(default)]
    pub unauthenticated: u64,
    /// Requests refused.
    #[serde(default)]
    pub denied: u64,
    /// Requests Audit mode would have refused.
    #[serde(default)]
    pub would_deny: u64,
    /// First request (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// Last request (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Served but not declared (the policy declares an API).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// Deprecated, past sunset or removed, yet called.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zombie: bool,
    /// Declared but not seen for the configured period.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unused: bool,
    /// Why each flag is set, one short sentence each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The busiest callers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_callers: Vec<String>,
}

/// Inventory totals.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
// Tolerant: a status written by another version of the operator still reads.
#[serde(rename_all = "camelCase", default)]
pub struct InventorySummary {
    /// Distinct endpoints seen.
    pub endpoints: u32,
    /// Shadow endpoints.
    pub shadow: u32,
    /// Zombie endpoints.
    pub zombie: u32,
    /// Endpoints served to unauthenticated callers.
    pub unauthenticated: u32,
    /// Declared endpoints not seen.
    #[serde(default)]
    pub unused: u32,
    /// Endpoints counted here but not listed (status is bounded).
    #[serde(default)]
    pub omitted: u32,
}
