//! `SidecarConfig`: everything one sidecar needs to enforce the policies that select its pod,
//! as the operator compiled it. Operator → sidecar, JSON, versioned by `apiVersion`.
//!
//! The operator resolves every reference before it writes a config: service accounts become
//! SPIFFE IDs, Secrets become hashes or key sets, ConfigMaps become endpoint lists, durations
//! become milliseconds. A sidecar never reads the Kubernetes API and never sees a raw API key.
//! Names of policies and rules are kept so every decision can say which one decided.
//!
//! # Version skew
//!
//! Within `apiward.io/sidecar/v1alpha1` the operator may be one minor release ahead of its
//! sidecars (it is upgraded first), and a sidecar reads what a newer operator writes by this
//! rule ([`SidecarConfig::from_wire`]):
//!
//! - An **unknown field** of an object is ignored, and reported: logged, counted and
//!   named in the sidecar's next [`Report`](crate::report::Report) (`ignoredFields`). New
//!   fields are optional and only *add* to what an older sidecar enforces (a header to
//!   strip, a metric label), or they are listed in `requires`.
//! - A field whose absence would **loosen** security (a new refusal, a stricter mode) is
//!   named in [`SidecarConfig::requires`] whenever the config uses it. A sidecar that does
//!   not implement every feature listed there ([`FEATURES`]) refuses the whole config and
//!   keeps enforcing the last one it accepted; the refusal names the feature.
//! - An **unknown enum value** (a new quota key kind, a new mode) is always refused: an
//!   older sidecar cannot enforce what it cannot name.
//! - Another `apiVersion` is refused.
//!
//! Hand-written configs (the settings file's inline `policy`) are read strictly instead:
//! an unknown field there is a typo, and an error ([`SidecarConfig::from_json`]).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `apiVersion` of this contract. A sidecar refuses any other.
pub const SIDECAR_CONFIG_API_VERSION: &str = "apiward.io/sidecar/v1alpha1";

/// The features of `v1alpha1` added after its first release that this sidecar implements,
/// by the name a config's `requires` lists them under (see the module docs).
pub const FEATURES: &[&str] = &[
    // `ports[].response.onUnfilterable: Refuse`: a response the filter cannot read is
    // refused (an older sidecar would pass it unfiltered).
    "responseFilter.onUnfilterable",
];

/// The compiled policy for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Always `apiward.io/sidecar/v1alpha1`.
    pub api_version: String,
    /// Content hash of the rest of the config: the same inputs always give the same version.
    /// Sidecars acknowledge configs by this value.
    pub version: String,
    /// The pod this config was compiled for.
    pub workload: Workload,
    /// The SPIFFE trust domain; peer identities are `spiffe://<trustDomain>/ns/<ns>/sa/<sa>`.
    pub trust_domain: String,
    /// mTLS mode for inbound ports that no policy selects.
    #[serde(default)]
    pub default_mtls: MtlsMode,
    /// One entry per inbound port selected by at least one policy. Other ports pass
    /// through with `defaultMtls` only: a port becomes default-deny once a policy selects it.
    #[serde(default)]
    pub ports: Vec<PortPolicy>,
    /// JWT issuers referenced by any port, by `id`.
    #[serde(default)]
    pub jwt_providers: Vec<JwtProvider>,
    /// API-key sets referenced by any port, by `id`. Keys appear only as HMAC-SHA256 hashes.
    #[serde(default)]
    pub api_key_providers: Vec<ApiKeyProvider>,
    /// What the app may connect to outside the mesh.
    #[serde(default)]
    pub egress: EgressPolicy,
    /// Features (from [`FEATURES`]) this config uses whose absence would loosen what is
    /// enforced: a sidecar that does not implement one refuses the config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
}

/// Which pod a config belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Workload {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// ServiceAccount the pod runs as.
    pub service_account: String,
}

/// Whole-policy or per-rule enforcement mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// Decisions are enforced.
    #[default]
    Enforce,
    /// Decisions are computed, logged and counted, never enforced.
    Audit,
}

/// How inbound connections must be secured.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum MtlsMode {
    /// Plaintext only (ordered first: the weakest).
    Disabled,
    /// mTLS and plaintext; plaintext callers have no peer identity.
    Permissive,
    /// Only mTLS from the mesh.
    #[default]
    Strict,
}

/// The compiled, merged policy for one inbound port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct PortPolicy {
    /// The app's container port.
    pub port: u16,
    /// `namespace/name` of every policy merged into this port, sorted.
    pub policies: Vec<String>,
    /// Strictest mTLS mode of the merged policies.
    pub mtls: MtlsMode,
    /// `Audit` only when every merged policy is in Audit mode; then the default deny
    /// (no rule allowed the request) is a would-deny.
    pub mode: Mode,
    /// JWT providers (ids) that authenticate requests on this port.
    #[serde(default)]
    pub jwt_providers: Vec<String>,
    /// API-key providers (ids) that authenticate requests on this port.
    #[serde(default)]
    pub api_key_providers: Vec<String>,
    /// Authorization rules of every merged policy. Deny rules win; otherwise at least one
    /// Allow rule must match; otherwise the request is denied.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Every quota of every merged policy applies.
    #[serde(default)]
    pub quotas: Vec<QuotaConfig>,
    /// The strictest of the merged request limits.
    #[serde(default)]
    pub limits: RequestLimits,
    /// The union of the merged response filters.
    #[serde(default)]
    pub response: ResponseFilter,
    /// The declared API surface (inventory baseline).
    #[serde(default)]
    pub api: ApiSurface,
}

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    /// Let matching requests through (if no Deny rule matches).
    Allow,
    /// Refuse matching requests; wins over every Allow.
    Deny,
}

/// One authorization rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct RuleConfig {
    /// `namespace/name` of the policy the rule came from.
    pub policy: String,
    /// The rule's name, unique within its policy.
    pub name: String,
    /// What a match does.
    pub action: Action,
    /// The rule only audits: its Deny (or the binding failure of its Allow) is a would-deny.
    #[serde(default)]
    pub audit: bool,
    /// Callers the rule applies to (any one must match). Empty: every caller.
    #[serde(default)]
    pub from: Vec<Source>,
    /// Operations the rule applies to (any one must match). Empty: every operation.
    #[serde(default)]
    pub to: Vec<Operation>,
    /// Object-level checks: each request value must equal the named claim of a verified JWT.
    #[serde(default)]
    pub bind: Vec<Binding>,
}

/// A set of callers: every field given must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Source {
    /// Exact peer SPIFFE IDs (service accounts are compiled into these).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// A verified JWT from this provider, with these claims.
    #[serde(default)]
    pub jwt: Option<JwtMatch>,
    /// A valid API key from one of these providers (`<providerId>`) or clients
    /// (`<providerId>#<client>`).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Source IP in one of these CIDR blocks.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Matches callers with no identity at all (no mTLS peer, no JWT, no API key).
    #[serde(default)]
    pub unauthenticated: bool,
}

/// A JWT requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct JwtMatch {
    /// Provider id.
    pub provider: String,
    /// Claim → required value. A claim that is a list matches if it contains the value;
    /// a space-separated `scope` claim matches if one of its words is the value.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

/// A set of operations: every field given must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods, upper case. Empty: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path templates (see `template`). Empty: any.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Request headers that must be present (and equal `value`, when given).
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// A header requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, lower case.
    pub name: String,
    /// Exact value; absent means "present with any value".
    #[serde(default)]
    pub value: Option<String>,
}

/// Binds a request value to a verified claim (object-level authorization, OWASP API1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Binding {
    /// Where the request value comes from.
    pub source: BindSource,
    /// The claim it must equal, exactly.
    pub claim: String,
}

/// The request side of a binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub enum BindSource {
    /// A `{param}` of the matched path template.
    PathParam(String),
    /// A query parameter (its only occurrence; repeated parameters fail the binding).
    QueryParam(String),
    /// A request header, lower case (its only occurrence).
    Header(String),
}

/// A rate or volume limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct QuotaConfig {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Quota name, unique within its policy.
    pub name: String,
    /// Requests it counts. Empty: all.
    #[serde(default)]
    pub matches: Vec<Operation>,
    /// What requests are counted by.
    pub key: QuotaKey,
    /// Requests allowed per period.
    pub requests: u64,
    /// The period, in milliseconds (for Calendar windows: the calendar unit's nominal length).
    pub period_ms: u64,
    /// Extra requests allowed at once above the steady rate (Rolling windows).
    #[serde(default)]
    pub burst: u64,
    /// How the period is laid out.
    pub window: Window,
    /// Counted in this sidecar or shared by every sidecar of the workload.
    #[serde(default)]
    pub scope: QuotaScope,
    /// What happens when the quota is spent.
    #[serde(default)]
    pub on_exceed: OnExceed,
    /// Global quotas: what happens when the shared store (Redis) cannot answer.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The quota's policy is in Audit mode: exceeding it is a would-deny.
    #[serde(default)]
    pub audit: bool,
}

/// What a Global quota does when its store cannot answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum OnStoreError {
    /// Refuse the request (429): the quota cannot be confirmed.
    #[default]
    FailClosed,
    /// Count the quota in this sidecar alone, with the same limit, until the store is back.
    FailOpen,
}

/// What a quota counts requests by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub enum QuotaKey {
    /// The authenticated principal (SPIFFE ID, JWT `iss`+`sub`, or API-key client).
    Principal,
    /// A claim of the verified JWT.
    Claim(String),
    /// The API-key client of this provider id.
    ApiKey(String),
    /// A request header, lower case.
    Header(String),
    /// The caller's IP address.
    SourceIp,
}

/// Window shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub enum Window {
    /// A sliding window (GCRA): `requests` per `periodMs`, plus `burst`.
    Rolling,
    /// Fixed UTC calendar windows that reset on the boundary.
    Calendar(CalendarUnit),
}

/// Calendar window units (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum CalendarUnit {
    /// Resets every UTC second.
    Second,
    /// Resets every UTC minute.
    Minute,
    /// Resets every UTC hour.
    Hour,
    /// Resets at 00:00 UTC.
    Day,
    /// Resets at 00:00 UTC on the first of the month.
    Month,
}

/// Where quota counters live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum QuotaScope {
    /// In this sidecar's memory.
    #[default]
    Local,
    /// Shared by every sidecar, in Redis.
    Global,
}

/// What happens to a request over quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub enum OnExceed {
    /// 429 with `Retry-After`.
    #[default]
    Reject,
    /// Hold the request until it fits, up to `maxDelayMs`; then 429.
    Delay {
        /// Longest wait, in milliseconds.
        #[serde(rename = "maxDelayMs")]
        max_delay_ms: u64,
    },
}

/// Request limits (all optional; absent means no limit beyond the sidecar's own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct RequestLimits {
    /// Largest request body, in bytes (413 above it).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Largest total size of request headers, in bytes (431 above it).
    #[serde(default)]
    pub max_header_bytes: Option<u64>,
    /// Accepted request content types (media type only, lower case). Empty: any.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// Deepest JSON nesting accepted in a request body (400 above it).
    #[serde(default)]
    pub max_json_depth: Option<u32>,
    /// Longest time for the whole request, in milliseconds (504 after it).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Response rewriting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ResponseFilter {
    /// JSON pointers (RFC 6901) removed from JSON response bodies; `-` is not allowed, a
    /// `*` token matches every array element or object member, and `**` any depth.
    #[serde(default)]
    pub remove_fields: Vec<String>,
    /// Response headers removed, lower case.
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// Replace upstream 5xx bodies with a generic `application/problem+json`.
    #[serde(default)]
    pub mask_server_errors: bool,
    /// With `removeFields`: what to do with a response the filter cannot read (not JSON,
    /// compressed, too large). Absent: `Pass`, as sidecars did before it existed.
    #[serde(default)]
    pub on_unfilterable: OnUnfilterable,
}

/// What happens to a response the field filter cannot read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnUnfilterable {
    /// Sent as it is.
    #[default]
    Pass,
    /// Refused with 502 `response_not_filterable`.
    Refuse,
}

/// The declared API surface of a port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ApiSurface {
    /// Whether any policy declared an API (otherwise nothing is shadow).
    #[serde(default)]
    pub declared: bool,
    /// Declared endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// What happens to requests that match no declared endpoint.
    #[serde(default)]
    pub undeclared: UndeclaredAction,
}

/// One declared endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Endpoint {
    /// HTTP method, upper case.
    pub method: String,
    /// Path template.
    pub path: String,
    /// Declared deprecated (`Deprecation` header; calls are zombie traffic).
    #[serde(default)]
    pub deprecated: bool,
    /// After this instant (Unix seconds) the endpoint answers 410.
    #[serde(default)]
    pub sunset_unix: Option<i64>,
}

/// Treatment of undeclared endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum UndeclaredAction {
    /// Served (and reported as shadow).
    #[default]
    Allow,
    /// Served, and counted as would-deny.
    Audit,
    /// Answered 404.
    Deny,
}

/// A JWT issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct JwtProvider {
    /// `namespace/policy/name`.
    pub id: String,
    /// Required `iss`.
    pub issuer: String,
    /// `aud` must contain one of these (empty: `aud` not checked — linted).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the keys come from.
    pub jwks: JwksSource,
    /// Accepted signature algorithms (never `none`, never HMAC).
    pub algorithms: Vec<String>,
    /// Allowed clock skew for `exp`, `nbf` and `iat`, in seconds.
    pub clock_skew_seconds: u64,
    /// Claim → request header the app receives it in.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Header the token is read from (`authorization` with a `Bearer ` prefix by default).
    #[serde(default = "default_token_header")]
    pub token_header: String,
}

fn default_token_header() -> String {
    "authorization".into()
}

/// A JWKS location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub enum JwksSource {
    /// Fetched over HTTPS and refreshed in the background.
    Uri(String),
    /// A JWKS document (JSON), resolved by the operator from the policy or a Secret.
    Inline(String),
}

/// A set of API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ApiKeyProvider {
    /// `namespace/policy/name`.
    pub id: String,
    /// Request header that carries the key (lower case), if any.
    #[serde(default)]
    pub header: Option<String>,
    /// Query parameter that carries the key, if any.
    #[serde(default)]
    pub query: Option<String>,
    /// HMAC-SHA256 key (hex) the hashes were made with.
    pub hmac_key: String,
    /// The accepted keys, as hashes.
    pub keys: Vec<ApiKeyHash>,
}

/// One accepted API key, hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ApiKeyHash {
    /// Client name (the Secret's data key); becomes the principal.
    pub client: String,
    /// Lower-case hex HMAC-SHA256 of the key under `hmacKey`.
    pub hash: String,
}

/// Egress policy for the app's outbound connections outside the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct EgressPolicy {
    /// Whether any policy restricts egress. When false, everything except blocked
    /// addresses is allowed.
    #[serde(default)]
    pub restricted: bool,
    /// Allowed destinations.
    #[serde(default)]
    pub allow: Vec<EgressRule>,
    /// Destinations refused even if allowed above (link-local and cloud metadata by default).
    #[serde(default)]
    pub blocked_cidrs: Vec<String>,
}

/// One allowed egress destination set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct EgressRule {
    /// Host names (`*.example.com` allowed as a leading label wildcard).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// CIDR blocks.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Ports; empty means any.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// TLS must be used, and the server certificate is checked.
    #[serde(default)]
    pub tls_required: bool,
}

/// Error reading a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the right shape.
    #[error("config is not a valid SidecarConfig: {0}")]
    Parse(#[from] serde_json::Error),
    /// Wrong contract version.
    #[error("config apiVersion is {found:?}; this sidecar reads {SIDECAR_CONFIG_API_VERSION:?}")]
    ApiVersion {
        /// What the config said.
        found: String,
    },
    /// The config needs a feature this sidecar does not implement.
    #[error(
        "config requires {feature:?}, which this sidecar does not implement (upgrade the sidecar); the previous config stays"
    )]
    Unsupported {
        /// The feature.
        feature: String,
    },
    /// A field this sidecar does not know, in a config read strictly.
    #[error("unknown field {path}")]
    UnknownField {
        /// Its path (`ports.0.foo`).
        path: String,
    },
}

/// A config read off the wire, with the fields this sidecar ignored (see the module docs).
#[derive(Debug, Clone)]
pub struct WireConfig {
    /// The config.
    pub config: SidecarConfig,
    /// Paths of unknown fields that were ignored (`ports.0.response.newField`).
    pub ignored: Vec<String>,
}

impl SidecarConfig {
    /// Parses a config the operator pushed, by the version-skew rule: unknown fields are
    /// ignored and returned, an unknown `requires` feature or enum value refuses it.
    pub fn from_wire(bytes: &[u8]) -> Result<WireConfig, ConfigError> {
        let mut ignored = Vec::new();
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: Self = serde_ignored::deserialize(&mut de, |p| ignored.push(p.to_string()))?;
        de.end()?;
        config.check_version()?;
        Ok(WireConfig { config, ignored })
    }

    /// Parses a hand-written config strictly: an unknown field is an error too.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let w = Self::from_wire(bytes)?;
        match w.ignored.into_iter().next() {
            Some(path) => Err(ConfigError::UnknownField { path }),
            None => Ok(w.config),
        }
    }

    /// Checks the contract version and that every required feature is implemented.
    pub fn check_version(&self) -> Result<(), ConfigError> {
        if self.api_version != SIDECAR_CONFIG_API_VERSION {
            return Err(ConfigError::ApiVersion {
                found: self.api_version.clone(),
            });
        }
        match self
            .requires
            .iter()
            .find(|f| !FEATURES.contains(&f.as_str()))
        {
            Some(f) => Err(ConfigError::Unsupported { feature: f.clone() }),
            None => Ok(()),
        }
    }

    /// The JSON Schema of this contract (committed as `schema/sidecar-config.schema.json`).
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(SidecarConfig))
            .expect("a JSON Schema always serializes")
    }
}
