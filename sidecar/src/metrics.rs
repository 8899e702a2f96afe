//! Prometheus metrics (`/metrics` on the admin port). Names follow
//! `apiward_sidecar_<what>_<unit>`. Labels never carry tokens, keys or raw paths.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// allow | deny | would_deny
    pub decision: &'static str,
    /// Reason code.
    pub reason: &'static str,
    /// `namespace/name` of the deciding policy, or empty.
    pub policy: String,
    /// Deciding rule, or empty.
    pub rule: String,
    /// Response status.
    pub status: u16,
}

/// Labels with just a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Reason code.
    pub reason: &'static str,
}

/// Labels naming a JWT provider.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider id.
    pub provider: String,
}

/// Labels of an outbound connection's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    /// `meshed`, `egress` or `none`.
    pub route: &'static str,
    /// `connected`, or why not.
    pub result: &'static str,
}

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    /// The registry behind `/metrics`.
    pub registry: Registry,
    /// Outbound connections by route and result.
    pub outbound: Family<OutboundLabels, Counter>,
    /// Outbound connections open now.
    pub outbound_open: Gauge,
    /// Requests by decision, reason, policy, rule and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from request head to response head, seconds.
    pub request_duration: Histogram,
    /// Time spent deciding (authn + engine), seconds.
    pub decision_duration: Histogram,
    /// Refused credentials by reason.
    pub authn_failures: Family<ReasonLabels, Counter>,
    /// Config loads: applied.
    pub config_applied: Counter,
    /// Config loads: refused (the previous config keeps serving).
    pub config_rejected: Counter,
    /// Fields of pushed configs this sidecar did not know and ignored (version skew).
    pub config_fields_ignored: Counter,
    /// 1 while a config is loaded.
    pub config_loaded: Gauge,
    /// Open inbound connections.
    pub connections: Gauge,
    /// Connections closed before their first request to make room at the connection limit.
    pub connections_reclaimed: Counter,
    /// Inbound HTTP/1.1 connections waiting for their next request with no HTTP buffers.
    pub parked_connections: Gauge,
    /// Expiry of the mesh certificate in force, Unix seconds.
    pub identity_expiry: Gauge,
    /// Mesh certificates received.
    pub identity_renewals: Counter,
    /// Failed certificate requests.
    pub identity_failures: Counter,
    /// Requests waiting for a free connection to the app (`limits.maxUpstreamConnections`).
    pub upstream_waiting: Gauge,
    /// Inbound connections refused at the TLS or mTLS-mode check.
    pub handshake_failures: Family<ReasonLabels, Counter>,
    /// JWKS keys held per provider.
    pub jwks_keys: Family<ProviderLabels, Gauge>,
    /// Quota keys held.
    pub quota_keys: Gauge,
    /// Local quota keys given up to make room for new ones (set at scrape).
    pub quota_evictions: Gauge,
    /// Global quota store: commands, errors, up, leased keys.
    pub quota_store: crate::quota_store::StoreMetrics,
    /// Keys with a Global quota lease held now.
    pub quota_leases: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("apiward_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by decision, reason, policy, rule and status",
            requests.clone(),
        );
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let request_duration = Histogram::new(buckets);
        registry.register(
            "request_duration_seconds",
            "Request head to response head",
            request_duration.clone(),
        );
        let decision_duration = Histogram::new([
            0.000001, 0.000005, 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.01,
        ]);
        registry.register(
            "decision_duration_seconds",
            "Authentication and decision time",
            decision_duration.clone(),
        );
        let authn_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "authn_failures",
            "Refused credentials by reason",
            authn_failures.clone(),
        );
        let config_applied = Counter::default();
        registry.register("config_applied", "Configs applied", config_applied.clone());
        let config_rejected = Counter::default();
        registry.register(
            "config_rejected",
            "Configs refused (the previous one keeps serving)",
            config_rejected.clone(),
        );
        let config_fields_ignored = Counter::default();
        registry.register(
            "config_fields_ignored",
            "Fields of pushed configs this sidecar does not know, ignored (a newer operator)",
            config_fields_ignored.clone(),
        );
        let config_loaded = Gauge::default();
        registry.register(
            "config_loaded",
            "1 while a valid config is loaded",
            config_loaded.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open inbound connections",
            connections.clone(),
        );
        let connections_reclaimed = Counter::default();
        registry.register(
            "connections_reclaimed",
            "Inbound connections closed before their first request to make room at limits.maxConnections",
            connections_reclaimed.clone(),
        );
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_certificate_expiry_seconds",
            "Expiry of the mesh certificate in force (Unix time)",
            identity_expiry.clone(),
        );
        let identity_renewals = Counter::default();
        registry.register(
            "identity_certificates",
            "Mesh certificates received",
            identity_renewals.clone(),
        );
        let identity_failures = Counter::default();
        registry.register(
            "identity_failures",
            "Failed mesh certificate requests",
            identity_failures.clone(),
        );
        let parked_connections = Gauge::default();
        registry.register(
            "parked_connections",
            "Inbound HTTP/1.1 connections waiting for their next request with no HTTP buffers (parked)",
            parked_connections.clone(),
        );
        let upstream_waiting = Gauge::default();
        registry.register(
            "upstream_waiting",
            "Requests waiting for a free connection to the app",
            upstream_waiting.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "handshake_failures",
            "Inbound connections refused before HTTP",
            handshake_failures.clone(),
        );
        let jwks_keys = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "jwks_keys",
            "JWKS keys held per provider",
            jwks_keys.clone(),
        );
        let quota_keys = Gauge::default();
        registry.register("quota_keys", "Local quota keys held", quota_keys.clone());
        let quota_evictions = Gauge::default();
        registry.register(
            "quota_evictions",
            "Local quota keys given up (the least-spent of a full quota's table) to make room for new keys, since start",
            quota_evictions.clone(),
        );
        let quota_store = crate::quota_store::StoreMetrics::default();
        registry.register(
            "quota_store_commands",
            "Commands sent to the Global quota store (Redis)",
            quota_store.commands.clone(),
        );
        registry.register(
            "quota_store_errors",
            "Requests whose Global quota took onStoreError, by reason",
            quota_store.errors.clone(),
        );
        registry.register(
            "quota_store_up",
            "1 while the Global quota store answers, 0 while its circuit breaker is open",
            quota_store.up.clone(),
        );
        let quota_leases = Gauge::default();
        registry.register(
            "quota_leases",
            "Keys with a Global quota lease held",
            quota_leases.clone(),
        );
        let outbound = Family::<OutboundLabels, Counter>::default();
        registry.register(
            "outbound_connections",
            "Outbound connections by route (meshed, egress) and result (connected or the refusal reason)",
            outbound.clone(),
        );
        let outbound_open = Gauge::default();
        registry.register(
            "outbound_open",
            "Outbound connections open now",
            outbound_open.clone(),
        );
        Self {
            registry,
            outbound,
            outbound_open,
            requests,
            request_duration,
            decision_duration,
            authn_failures,
            config_applied,
            config_rejected,
            config_fields_ignored,
            config_loaded,
            connections,
            connections_reclaimed,
            parked_connections,
            upstream_waiting,
            identity_expiry,
            identity_renewals,
            identity_failures,
            handshake_failures,
            jwks_keys,
            quota_keys,
            quota_evictions,
            quota_store,
            quota_leases,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
