//! `ApiPolicy` spec: what users write.
//!
//! Schema bounds (lengths, list sizes, enums, patterns) and CEL rules live on the types, so
//! the API server refuses bad objects at admission; [`crate::validate`] repeats every rule
//! and adds the ones CEL cannot express (template and duration syntax, CIDRs, URLs).
//!
//! # What runs where at admission
//!
//! - **Schema** (types, enums, patterns, lengths, list sizes): the API server.
//! - **CEL**: only rules that are cheap and local to one object: `has()` tests, scalar and
//!   enum comparisons, `size()`, and at most one macro over a short list of the same
//!   object. Rules that relate one part of the spec to another (a rule's `bind` to its
//!   paths, `from[].jwt.provider` and `apiKeys` to `authentication`) are checked by the
//!   operator's validating webhook, which runs [`crate::validate`] — exactly what
//!   `apiward check` runs.
//!
//! # The CEL budget
//!
//! The API server estimates each rule's worst case when the CRD is created: the cost of
//! one evaluation (a field read costs 1, `==` on strings 0.1 per byte of the shorter side,
//! a macro its list's `maxItems` times its body, strings sized `maxLength` x 4 bytes)
//! times the rule's cardinality (the product of the `maxItems` of the lists around it),
//! and refuses the CRD above 10,000,000 for one rule or 100,000,000 for all of them.
//! Every field a rule reads is bounded (`maxLength` on the enums compared, too). Today's
//! figures, from `crds/tests/cel_cost.rs`, which fails when a rule or the total exceeds a
//! tenth of those budgets:
//!
//! | rules on | one evaluation | x cardinality | = estimate |
//! |---|---|---|---|
//! | `rules[].from[]` (2 rules) | 16 | 256 x 16 | 65,536 each |
//! | `rules[]` bind needs JWTs (`from.all`, 16 items) | 96 | 256 | 24,576 |
//! | `rules[].bind[]` | 9 | 256 x 8 | 18,432 |
//! | `api.endpoints[]` sunset | 7 | 1,024 | 7,168 |
//! | `quotas[]`, `.key`, `.limit` (8 rules) | 8-24 | 64 | 512-1,536 |
//! | the whole schema | | | 191,216 (0.19 % of 100,000,000) |
//!
//! Before this split one rule (`bind` against every path) was estimated at 22 billion and
//! the `apiKeys` reference rule at 188 million; a real kube-apiserver refused the CRD.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ApiPolicyStatus;

/// Pattern of a name users give to rules, quotas and providers (a DNS label).
pub const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Pattern of policy durations (see `apiward_policy::duration`), plus `1mo` for calendar months.
pub const PERIOD_PATTERN: &str = "^(([0-9]{1,9}(ms|s|m|h|d))+|1mo)$";
/// Pattern of `namespace/serviceaccount`.
pub const SERVICE_ACCOUNT_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// Pattern of an HTTP header name, lower case.
pub const HEADER_PATTERN: &str = "^[a-z0-9!#$%&'*+.^_`|~-]+$";

/// An API-security policy for the workloads it selects: who may call which endpoint,
/// how callers authenticate, how much they may call, and what the API is.
#[allow(
    clippy::duplicated_attributes,
    reason = "kube printcolumn(...) entries repeat type_ by design"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apiward.io",
    version = "v1alpha1",
    kind = "ApiPolicy",
    plural = "apipolicies",
    shortname = "apol",
    category = "apiward",
    namespaced,
    status = "ApiPolicyStatus",
    cel,
    doc = "ApiPolicy declares authentication, authorization, quotas, limits and the API surface for the pods it selects; the apiward operator compiles it into sidecar configs and reports enforcement and the observed API inventory in status.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "mTLS", type_ = "string", json_path = ".spec.mtls"),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.inventory.summary.endpoints"
    ),
    printcolumn(
        name = "Shadow",
        type_ = "integer",
        json_path = ".status.inventory.summary.shadow"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ApiPolicySpec {
    /// The pods (and their ports) this policy applies to.
    pub target_ref: TargetRef,
    /// `Enforce` (default) or `Audit`: decide, log and count, but let requests through.
    #[serde(default)]
    pub mode: Mode,
    /// How inbound connections must be secured. `Strict` (default) accepts only mTLS from the mesh.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// How callers prove who they are, beyond mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// The declared API: the baseline the inventory is compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiSurface>,
    /// Authorization rules. A policy that selects a workload makes it default-deny: requests
    /// no Allow rule matches are refused. Deny rules win over Allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 256))]
    pub rules: Vec<AccessRule>,
    /// Rate and volume limits; every matching quota applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 64))]
    pub quotas: Vec<Quota>,
    /// Limits on requests (body, headers, content types, JSON depth, time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_limits: Option<RequestLimits>,
    /// What is removed from responses before they reach the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_filter: Option<ResponseFilter>,
    /// Where the selected pods may connect outside the mesh. Absent: anywhere except
    /// link-local and cloud-metadata addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// Which pods and ports a policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Pods in the policy's namespace whose labels match.
    pub selector: LabelSelector,
    /// Container ports the policy applies to; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(range(min = 1, max = 65535)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<u16>,
}

/// Enforcement mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Decisions are enforced.
    #[default]
    Enforce,
    /// Decisions are computed, logged and counted, never enforced.
    Audit,
}

/// Inbound mTLS mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MtlsMode {
    /// Only mTLS from the mesh.
    #[default]
    Strict,
    /// mTLS or plaintext; plaintext callers have no peer identity.
    Permissive,
    /// Plaintext only.
    Disabled,
}

/// Authentication providers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// JWT/OIDC issuers whose tokens are accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub jwt: Vec<JwtProvider>,
    /// API-key sets whose keys are accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub api_keys: Vec<ApiKeyProvider>,
}

/// A JWT issuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("(has(self.jwksUri) ? 1 : 0) + (has(self.jwksSecretRef) ? 1 : 0) + (has(self.jwks) ? 1 : 0) == 1").message("exactly one of jwksUri, jwksSecretRef or jwks must be set")
)]
#[serde(rename_all = "camelCase")]
pub struct JwtProvider {
    /// Name rules refer to (`from[].jwt.provider`).
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Required `iss` claim.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// HTTPS URL of the issuer's JWKS, fetched and refreshed by the sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = "^https?://"))]
    pub jwks_uri: Option<String>,
    /// A Secret key holding the JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<SecretKeyRef>,
    /// The JWKS document inline (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub jwks: Option<String>,
    /// `aud` must contain one of these. Leaving it empty is linted: any audience passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 512)))]
    pub audiences: Vec<String>,
    /// Accepted signature algorithms; default RS256 and ES256. `none` and HMAC are never accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Claims forwarded to the app: claim name → request header (incoming copies are removed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub forward_claims: BTreeMap<String, String>,
    /// Allowed clock skew for `exp`, `nbf` and `iat` (default 30s, at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = apiward_policy::duration::DURATION_PATTERN))]
    pub clock_skew: Option<String>,
    /// Header that carries the token (default `authorization`, with a `Bearer ` prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), regex(pattern = HEADER_PATTERN))]
    pub header: Option<String>,
}

/// JWT signature algorithms apiward verifies.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

/// A key of a Secret in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A set of API keys: each data entry of the Secret is one client (`<client>: <key>`).
/// Only HMAC-SHA256 hashes of the keys leave the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!(has(self.header) && has(self.query))").message("set header or query, not both")
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyProvider {
    /// Name rules and quotas refer to.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// The Secret holding the keys.
    pub secret_ref: SecretRef,
    /// Request header carrying the key (default `x-api-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), regex(pattern = HEADER_PATTERN))]
    pub header: Option<String>,
    /// Query parameter carrying the key (discouraged: URLs end up in logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub query: Option<String>,
}

/// The declared API surface.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSurface {
    /// An OpenAPI 3 document in a ConfigMap; its operations are declared endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openapi_ref: Option<OpenApiRef>,
    /// Endpoints declared here (in addition to the OpenAPI document's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub endpoints: Vec<Endpoint>,
    /// What to do with requests to endpoints nobody declared: `Allow` (default; reported as
    /// shadow), `Audit` (counted as would-deny) or `Deny` (404).
    #[serde(default)]
    pub undeclared: UndeclaredAction,
}

/// Where an OpenAPI document lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenApiRef {
    /// A ConfigMap key in the policy's namespace.
    pub config_map_ref: ConfigMapKeyRef,
}

/// A key of a ConfigMap in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// One declared endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.sunset) || (has(self.deprecated) && self.deprecated)").message("an endpoint with a sunset date must be deprecated").field_path(".sunset")
)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// HTTP method.
    pub method: Method,
    /// Path template, e.g. `/orders/{orderId}`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path: String,
    /// Still served but on its way out: responses carry a `Deprecation` header and calls are
    /// reported as zombie traffic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deprecated: bool,
    /// RFC 3339 instant after which the endpoint answers 410 Gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("format" = "date-time"))]
    pub sunset: Option<String>,
}

/// HTTP methods a policy can name. `TRACE`, `TRACK` and `CONNECT` are always refused.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum Method {
    /// GET
    GET,
    /// HEAD
    HEAD,
    /// POST
    POST,
    /// PUT
    PUT,
    /// PATCH
    PATCH,
    /// DELETE
    DELETE,
    /// OPTIONS
    OPTIONS,
}

impl Method {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
        }
    }
}

/// Treatment of undeclared endpoints.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UndeclaredAction {
    /// Served, reported as shadow.
    #[default]
    Allow,
    /// Served, counted as would-deny.
    Audit,
    /// Answered 404.
    Deny,
}

/// An authorization rule: `action` for requests from any of `from` to any of `to`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.bind) || size(self.bind) == 0 || (has(self.from) && size(self.from) > 0 && self.from.all(f, has(f.jwt)))").message("a rule with bind needs every from entry to require a JWT (claims come from verified tokens)").field_path(".bind"),
    validation = Rule::new("!has(self.bind) || size(self.bind) == 0 || !has(self.action) || self.action == 'Allow'").message("bind applies to Allow rules only").field_path(".bind")
)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// Unique within the policy; decisions and logs name it.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// `Allow` (default) or `Deny`.
    #[serde(default)]
    pub action: Action,
    /// Callers; any entry may match. Empty: every caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<Source>,
    /// Operations; any entry may match. Empty: every operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to: Vec<Operation>,
    /// Object-level authorization: each bound request value must equal a verified claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub bind: Vec<Binding>,
    /// `Audit` makes this one rule decide without enforcing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// Allow or Deny.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum Action {
    /// Let matching requests through (unless a Deny rule matches).
    #[default]
    Allow,
    /// Refuse matching requests.
    Deny,
}

/// A set of callers; every field given must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.serviceAccounts) || has(self.namespaces) || has(self.identities) || has(self.jwt) || has(self.apiKeys) || has(self.ipBlocks) || (has(self.unauthenticated) && self.unauthenticated)").message("a from entry must name at least one kind of caller"),
    validation = Rule::new("!(has(self.unauthenticated) && self.unauthenticated) || !(has(self.serviceAccounts) || has(self.namespaces) || has(self.identities) || has(self.jwt) || has(self.apiKeys))").message("unauthenticated cannot be combined with identities, JWTs or API keys").field_path(".unauthenticated")
)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// mTLS callers running as these service accounts (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = SERVICE_ACCOUNT_PATTERN)))]
    pub service_accounts: Vec<String>,
    /// mTLS callers from these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = NAME_PATTERN)))]
    pub namespaces: Vec<String>,
    /// mTLS callers with exactly these SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(max = 512), regex(pattern = "^spiffe://[^/]+/.+"))
    )]
    pub identities: Vec<String>,
    /// Callers with a verified JWT from this provider, carrying these claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSource>,
    /// Callers with a valid key from these providers (`partners`) or clients (`partners#acme`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub api_keys: Vec<String>,
    /// Callers whose source address is in one of these CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub ip_blocks: Vec<String>,
    /// Callers with no identity at all. Allowing them is linted on writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A JWT requirement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtSource {
    /// Name of an `authentication.jwt` entry.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub provider: String,
    /// Required claims: name → value. List claims must contain the value; the `scope`
    /// claim must contain it as one of its space-separated words.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub claims: BTreeMap<String, String>,
}

/// A set of operations; every field given must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Methods; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub methods: Vec<Method>,
    /// Path templates: `{param}` for one segment, `*` within a segment, `**` as the last
    /// segment for any tail. Empty means any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 1024), regex(pattern = "^/"))
    )]
    pub paths: Vec<String>,
    /// Request headers that must be present (with `value`, when given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// A header requirement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, lower case.
    #[schemars(length(min = 1, max = 128), regex(pattern = HEADER_PATTERN))]
    pub name: String,
    /// Exact value; absent means any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub value: Option<String>,
}

/// Binds a request value to a verified JWT claim: the request is allowed only if they are equal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("(has(self.pathParam) ? 1 : 0) + (has(self.queryParam) ? 1 : 0) + (has(self.header) ? 1 : 0) == 1").message("exactly one of pathParam, queryParam or header must be set")
)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// A `{param}` of the rule's paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub path_param: Option<String>,
    /// A query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub query_param: Option<String>,
    /// A request header, lower case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = HEADER_PATTERN))]
    pub header: Option<String>,
    /// The claim the value must equal.
    #[schemars(length(min = 1, max = 128))]
    pub claim: String,
}

/// A quota: at most `limit` matching requests per key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.onExceed) || self.onExceed != 'Delay' || has(self.maxDelay)").message("onExceed: Delay needs maxDelay").field_path(".maxDelay"),
    validation = Rule::new("!has(self.maxDelay) || (has(self.onExceed) && self.onExceed == 'Delay')").message("maxDelay applies only with onExceed: Delay").field_path(".maxDelay"),
    validation = Rule::new("!has(self.onStoreError) || (has(self.scope) && self.scope == 'Global')").message("onStoreError applies only to scope: Global").field_path(".onStoreError"),
    validation = Rule::new("!has(self.critical) || !self.critical || (has(self.scope) && self.scope == 'Global')").message("critical applies only to scope: Global").field_path(".critical")
)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// Unique within the policy.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Requests counted; absent means all.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Operation>,
    /// What requests are counted by.
    pub key: QuotaKey,
    /// How many, per how long.
    pub limit: Limit,
    /// `Local` (each sidecar counts alone; default) or `Global` (shared, in Redis).
    #[serde(default)]
    pub scope: QuotaScope,
    /// `Reject` (429, default) or `Delay` (wait up to `maxDelay`, then 429).
    #[serde(default)]
    pub on_exceed: OnExceed,
    /// Longest a request waits with `onExceed: Delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = apiward_policy::duration::DURATION_PATTERN))]
    pub max_delay: Option<String>,
    /// A Global quota that must never be exceeded, even when Redis is down: the default
    /// `onStoreError` becomes `FailClosed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
    /// Global quotas: what to do when Redis cannot answer in time. `FailOpen` counts the
    /// quota in each sidecar alone (same limit) until Redis is back; `FailClosed` refuses
    /// with 429. Default: `FailClosed` when `critical`, else `FailOpen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_error: Option<OnStoreError>,
}

/// What a Global quota does when Redis cannot answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum OnStoreError {
    /// Count locally, per sidecar, with the same limit.
    FailOpen,
    /// Refuse with 429.
    FailClosed,
}

/// What a quota counts by: set exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("((has(self.principal) && self.principal) ? 1 : 0) + (has(self.claim) ? 1 : 0) + (has(self.apiKey) ? 1 : 0) + (has(self.header) ? 1 : 0) + ((has(self.sourceIP) && self.sourceIP) ? 1 : 0) == 1").message("set exactly one of principal: true, claim, apiKey, header or sourceIP: true")
)]
#[serde(rename_all = "camelCase")]
pub struct QuotaKey {
    /// The authenticated principal (mTLS identity, JWT subject or API-key client).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub principal: bool,
    /// A claim of the verified JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub claim: Option<String>,
    /// The client of this API-key provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub api_key: Option<String>,
    /// A request header, lower case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = HEADER_PATTERN))]
    pub header: Option<String>,
    /// The caller's IP address.
    #[serde(
        default,
        rename = "sourceIP",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub source_ip: bool,
}

/// A rate: `requests` per `per`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.per != '1mo' || (has(self.window) && self.window == 'Calendar')").message("per: 1mo needs window: Calendar").field_path(".per"),
    validation = Rule::new("!has(self.window) || self.window != 'Calendar' || self.per in ['1s', '1m', '1h', '1d', '24h', '1mo']").message("a Calendar window's per must be one of 1s, 1m, 1h, 1d, 1mo").field_path(".per"),
    validation = Rule::new("!has(self.burst) || self.burst == 0 || !has(self.window) || self.window != 'Calendar'").message("burst applies only to Rolling windows").field_path(".burst")
)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    /// Requests allowed per period.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests: u64,
    /// The period: a duration (`1s`, `1m`, `24h`) or, for Calendar windows, `1mo`.
    #[schemars(length(min = 2, max = 32), regex(pattern = PERIOD_PATTERN))]
    pub per: String,
    /// Requests allowed at once above the steady rate (Rolling windows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub burst: Option<u64>,
    /// `Rolling` (default; sliding, smooth) or `Calendar` (fixed UTC periods that reset on
    /// the boundary, e.g. per day at 00:00 UTC).
    #[serde(default)]
    pub window: Window,
}

/// Window shape.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum Window {
    /// Sliding window.
    #[default]
    Rolling,
    /// Fixed UTC calendar periods.
    Calendar,
}

/// Where counters live.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum QuotaScope {
    /// In each sidecar.
    #[default]
    Local,
    /// Shared by every sidecar, in Redis.
    Global,
}

/// What happens over quota.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum OnExceed {
    /// 429 Too Many Requests with `Retry-After`.
    #[default]
    Reject,
    /// Wait until the request fits, up to `maxDelay`.
    Delay,
}

/// Request limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestLimits {
    /// Largest request body in bytes (413 above it, refused while streaming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_099_511_627_776_u64))]
    pub max_body_bytes: Option<u64>,
    /// Largest total request header size in bytes (431 above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 1_048_576))]
    pub max_header_bytes: Option<u64>,
    /// Accepted request media types, e.g. `application/json` (415 otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex(pattern = "^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+$"))
    )]
    pub content_types: Vec<String>,
    /// Deepest JSON nesting accepted in request bodies (400 above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_json_depth: Option<u32>,
    /// Longest a request may take end to end (504 after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = apiward_policy::duration::DURATION_PATTERN))]
    pub timeout: Option<String>,
}

/// Response rewriting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseFilter {
    /// JSON pointers (RFC 6901) removed from JSON bodies, e.g. `/internalNotes` or
    /// `/items/*/passwordHash` (`*` matches every element or member) or `/**/password`
    /// (`**` matches any depth, so a secret one level deeper does not leak).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(max = 512), regex(pattern = "^(/[^/]*)+$"))
    )]
    pub remove_fields: Vec<String>,
    /// Response headers removed (`server` and `x-powered-by` are always removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 128), regex(pattern = HEADER_PATTERN)))]
    pub remove_headers: Vec<String>,
    /// Replace upstream 5xx bodies with a generic problem+json (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_server_errors: Option<bool>,
    /// With `removeFields`: what happens to a response the filter cannot read — not JSON
    /// (XML, HTML, binary), compressed, or too large. `Refuse` (default): 502
    /// `response_not_filterable`, so nothing leaks through another format; `Pass`: sent as
    /// it is. Text and untyped bodies that parse as JSON are filtered either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unfilterable: Option<OnUnfilterable>,
}

/// What happens to a response the field filter cannot read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(extend("maxLength" = 16))]
pub enum OnUnfilterable {
    /// Sent as it is.
    Pass,
    /// Refused with 502.
    Refuse,
}

/// Egress policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    /// Allowed destinations; anything else is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allow: Vec<EgressRule>,
}

/// Allowed destinations.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.hosts) || has(self.cidrs)").message("an egress rule needs hosts or cidrs")
)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Host names; `*.example.com` matches any subdomain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 253),
            regex(
                pattern = "^(\\*\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
            )
        )
    )]
    pub hosts: Vec<String>,
    /// CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub cidrs: Vec<String>,
    /// Ports; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// `Required`: only TLS connections, with the server certificate checked.
    #[serde(default)]
    pub tls: EgressTls,
}

/// TLS requirement for egress.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EgressTls {
    /// Plaintext or TLS.
    #[default]
    Optional,
    /// TLS only, certificate verified.
    Required,
}
