//! The mesh table: which destinations inside the mesh a sidecar originates mTLS to, and
//! the identities they must present. The operator computes it from Services and the
//! injected pods behind them and streams it to every sidecar on the config stream (one
//! line, sent at once and again on every change); the sidecar merges it into its outbound
//! routes. Services only: their cluster IPs are stable, so pods coming and going do not
//! churn every sidecar's table.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `apiVersion` of a [`MeshTable`] line.
pub const MESH_API_VERSION: &str = "apiward.io/mesh/v1alpha1";

/// Every meshed Service of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshTable {
    /// [`MESH_API_VERSION`].
    pub api_version: String,
    /// Content hash: equal tables have equal versions.
    pub version: String,
    /// The destinations, sorted.
    #[serde(default)]
    pub destinations: Vec<MeshDestination>,
}

/// One Service whose every selected pod runs a sidecar.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshDestination {
    /// `namespace/name` of the Service (for logs and metrics).
    pub service: String,
    /// Its cluster IPs, as CIDRs (`10.96.3.7/32`).
    pub cidrs: Vec<String>,
    /// The Service ports that reach the pods' sidecars.
    pub ports: Vec<u16>,
    /// SPIFFE IDs the peer may present: the ServiceAccounts of the selected pods.
    pub identities: Vec<String>,
    /// Any TCP protocol tunnelled as is (`appProtocol: tcp`), instead of HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque: bool,
}
