//! The sidecar's own settings file (`apiward-sidecar run --config FILE`, YAML or JSON):
//! where to listen, where the app is, TLS material, limits, and — in standalone mode —
//! the policy itself as a `SidecarConfig`. Read once at start and again on every reload;
//! a file that fails to parse or validate is refused whole.
//!
//! Relative paths are resolved against the working directory the sidecar was started in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apiward_policy::SidecarConfig;
use apiward_policy::config::SIDECAR_CONFIG_API_VERSION;
use serde::Deserialize;

/// The whole settings file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// The inbound listener and the app behind it.
    pub inbound: Inbound,
    /// TLS for the inbound listener. Required unless every port's mTLS mode is Disabled.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// A mesh identity issued by the operator instead of (or before) certificate files.
    #[serde(default)]
    pub identity: Option<crate::identity::IdentitySettings>,
    /// The outbound listener: the app's connections, redirected by `apiward-sidecar init`.
    #[serde(default)]
    pub outbound: Option<crate::outbound::OutboundSettings>,
    /// The admin listener (`/live`, `/ready`, `/metrics`, `/config_dump`).
    #[serde(default)]
    pub admin: Admin,
    /// Protections against abusive clients.
    #[serde(default)]
    pub limits: Limits,
    /// Header carrying the caller's principal to the app (incoming copies are removed).
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
    /// Extra CA bundle (PEM) trusted when fetching JWKS over HTTPS, besides the public roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Get the policy from the operator instead of `policy` (needs `identity`).
    #[serde(default)]
    pub control: Option<crate::control::ControlSettings>,
    /// The app's kubelet probes, which the injector points at the admin port:
    /// `/app-health/<container>/<kind>` → how to ask the app (the sidecar's own traffic to
    /// the app is not intercepted, so probes work under default deny).
    #[serde(default)]
    pub app_probes: std::collections::BTreeMap<String, AppProbe>,
    /// Where Global quotas are counted (Redis). Without it, Global quotas follow their
    /// `onStoreError`.
    #[serde(default)]
    pub quota_store: Option<crate::quota_store::QuotaStoreSettings>,
    /// Count served endpoints for the API inventory (reported to the operator). On by
    /// default; off only saves the one short lock per request the counting takes.
    #[serde(default = "default_true")]
    pub record_inventory: bool,
    /// Fraction of allowed requests written to the decision log (denies are always logged).
    #[serde(default)]
    pub log_allowed_fraction: f64,
    /// The policy (standalone mode). Without one the sidecar refuses every request.
    #[serde(default)]
    pub policy: Option<SidecarConfig>,
}

fn default_true() -> bool {
    true
}

fn default_identity_header() -> String {
    "x-apiward-principal".into()
}

/// Inbound listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inbound {
    /// Listen address (default `0.0.0.0:15006`).
    #[serde(default = "default_inbound")]
    pub listen: SocketAddr,
    /// The app port the policy's `ports[].port` refers to.
    pub port: u16,
    /// Where the app listens (default `127.0.0.1:<port>`).
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
}

fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15006))
}

impl Inbound {
    /// The app's address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.port)))
    }
}

/// PEM files for the inbound listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert_file: PathBuf,
    /// Private key.
    pub key_file: PathBuf,
    /// CA bundle client certificates are verified against (the mesh trust bundle).
    pub client_ca_file: PathBuf,
}

/// Admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Admin {
    /// Listen address (default `127.0.0.1:15020`).
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}

/// Connection-level protections.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Most concurrent inbound connections; more wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time allowed to send the request head (slowloris), e.g. `10s`.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout: String,
    /// Time allowed for the TLS handshake (and, before it, for the first byte).
    #[serde(default = "default_header_timeout")]
    pub handshake_timeout: String,
    /// Time allowed from the end of the handshake (or the first byte, in plaintext) until a
    /// first request head has arrived: protocol detection, the HTTP/2 preface and SETTINGS,
    /// the first head. A connection that sends nothing usable is closed after it.
    #[serde(default = "default_header_timeout")]
    pub first_request_timeout: String,
    /// An HTTP/2 connection with no stream open for this long is closed gracefully (GOAWAY).
    /// HTTP/1.1 keep-alive connections are closed after `headerReadTimeout` of idleness.
    #[serde(default = "default_h2_idle")]
    pub idle_timeout: String,
    /// Idle keep-alive connections to the app are closed after this.
    #[serde(default = "default_idle")]
    pub upstream_idle_timeout: String,
    /// An inbound HTTP/1.1 keep-alive connection idle this long gives back its HTTP
    /// buffers (about 16 KiB) until the caller's next request (default `2ms`, so
    /// back-to-back requests skip it; `0s` parks at once).
    #[serde(default = "default_park")]
    pub park_idle_after: String,
    /// Most HTTP/1.1 requests in flight to the app, and so most connections to it; more
    /// requests wait for one to finish (within their timeout). Bounds the sidecar's memory
    /// when many callers arrive at once.
    #[serde(default = "default_upstream_connections")]
    pub max_upstream_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[serde(default = "default_streams")]
    pub max_concurrent_streams: u32,
    /// Largest request head, in bytes, before any policy limit (431 above it).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest JSON response body buffered to remove fields; larger ones are refused (502).
    #[serde(default = "default_filter_bytes")]
    pub max_filtered_response_bytes: usize,
}

fn default_max_connections() -> usize {
    20_000
}
fn default_upstream_connections() -> usize {
    256
}
fn default_header_timeout() -> String {
    "10s".into()
}
fn default_idle() -> String {
    "90s".into()
}
fn default_h2_idle() -> String {
    "60s".into()
}
fn default_park() -> String {
    "2ms".into()
}
fn default_streams() -> u32 {
    256
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_filter_bytes() -> usize {
    4 * 1024 * 1024
}

impl Default for Limits {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every limit has a default")
    }
}

/// Parsed durations of [`Limits`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Request head.
    pub header_read: Duration,
    /// TLS handshake.
    pub handshake: Duration,
    /// Idle upstream connections.
    pub upstream_idle: Duration,
    /// Idle inbound HTTP/1.1 connections park after this.
    pub park_idle_after: Duration,
    /// From the handshake to the first request head.
    pub first_request: Duration,
    /// HTTP/2 connections without streams.
    pub idle: Duration,
}

/// A settings file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not the right shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message with the field path.
        message: String,
    },
    /// Shaped right, but invalid.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Field path.
        field: String,
        /// Why.
        message: String,
    },
}

impl Settings {
    /// Reads and validates a settings file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates settings text (`path` is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, SettingsError> {
        let value: serde_json::Value =
            serde_norway::from_str(text).map_err(|e| SettingsError::Parse {
                path: path.into(),
                message: e.to_string(),
            })?;
        // Hand-written: an unknown field anywhere is a typo, the inline policy's too (the
        // wire types ignore unknown fields for version skew; a file gets no such leeway).
        let mut unknown = Vec::new();
        // (`?` marks an optional value in serde_ignored's paths: not part of the field name.)
        let field = |p: serde_ignored::Path<'_>| {
            let p = p.to_string();
            p.split('.')
                .filter(|s| *s != "?")
                .collect::<Vec<_>>()
                .join(".")
        };
        let s: Settings =
            serde_ignored::deserialize(value, |p| unknown.push(field(p))).map_err(|e| {
                SettingsError::Parse {
                    path: path.into(),
                    message: e.to_string(),
                }
            })?;
        let invalid = |field: &str, message: String| SettingsError::Invalid {
            path: path.into(),
            field: field.into(),
            message,
        };
        if let Some(field) = unknown.first() {
            return Err(invalid(field, "unknown field".into()));
        }
        s.timeouts().map_err(|(f, m)| invalid(f, m))?;
        s.identity_header_name().map_err(|(f, m)| invalid(f, m))?;
        if let Some(p) = &s.policy {
            if p.api_version != SIDECAR_CONFIG_API_VERSION {
                return Err(invalid(
                    "policy.apiVersion",
                    format!("must be {SIDECAR_CONFIG_API_VERSION}"),
                ));
            }
            if let Err(e) = apiward_policy::engine::Engine::new(p) {
                return Err(invalid(&format!("policy.{}", e.field), e.message));
            }
            let needs_tls = p
                .ports
                .iter()
                .any(|pp| pp.mtls != apiward_policy::config::MtlsMode::Disabled)
                || p.ports.iter().all(|pp| pp.port != s.inbound.port)
                    && p.default_mtls != apiward_policy::config::MtlsMode::Disabled;
            if needs_tls && s.tls.is_none() && s.identity.is_none() {
                return Err(invalid("tls", "the policy requires mTLS on this port: set tls (certFile, keyFile, clientCaFile) or identity".into()));
            }
        }
        if let Some(o) = &s.outbound {
            crate::outbound::Routes::build(o, None).map_err(|m| match m.split_once(": ") {
                Some((field, why)) => invalid(field, why.to_owned()),
                None => invalid("outbound", m),
            })?;
        }
        if let Some(c) = &s.control {
            if s.policy.is_some() {
                return Err(invalid(
                    "control",
                    "policy (standalone) and control (pushed by the operator) exclude each other"
                        .into(),
                ));
            }
            if s.identity.is_none() {
                return Err(invalid(
                    "control",
                    "needs identity: the workload certificate authenticates the sidecar".into(),
                ));
            }
            if c.pod_name().is_none() {
                return Err(invalid(
                    "control.pod",
                    "set it, or the POD_NAME environment variable".into(),
                ));
            }
            apiward_policy::duration::parse_duration(&c.report_interval)
                .map_err(|e| invalid("control.reportInterval", e.to_string()))?;
        }
        if let Some(q) = &s.quota_store {
            q.validate().map_err(|(f, m)| invalid(&f, m))?;
        }
        if !(0.0..=1.0).contains(&s.log_allowed_fraction) {
            return Err(invalid(
                "logAllowedFraction",
                "must be between 0 and 1".into(),
            ));
        }
        Ok(s)
    }

    /// `identityHeader` as a header name.
    pub fn identity_header_name(&self) -> Result<http::HeaderName, (&'static str, String)> {
        http::HeaderName::from_bytes(self.identity_header.as_bytes()).map_err(|_| {
            (
                "identityHeader",
                format!("{:?} is not a valid header name", self.identity_header),
            )
        })
    }

    /// The limits' durations.
    pub fn timeouts(&self) -> Result<Timeouts, (&'static str, String)> {
        let d = |f: &'static str, v: &str| {
            apiward_policy::duration::parse_duration(v).map_err(|e| (f, e.to_string()))
        };
        Ok(Timeouts {
            header_read: d("limits.headerReadTimeout", &self.limits.header_read_timeout)?,
            handshake: d("limits.handshakeTimeout", &self.limits.handshake_timeout)?,
            upstream_idle: d(
                "limits.upstreamIdleTimeout",
                &self.limits.upstream_idle_timeout,
            )?,
            park_idle_after: d("limits.parkIdleAfter", &self.limits.park_idle_after)?,
            first_request: d(
                "limits.firstRequestTimeout",
                &self.limits.first_request_timeout,
            )?,
            idle: d("limits.idleTimeout", &self.limits.idle_timeout)?,
        })
    }
}

/// How the admin port asks the app for one probe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum AppProbe {
    /// An HTTP GET on the app's port; 2xx and 3xx are healthy. `HTTPS` is checked as a
    /// TCP connect (kubelet does not verify the app's certificate either).
    Http {
        /// The app's port.
        port: u16,
        /// Path and query.
        #[serde(default = "default_probe_path")]
        path: String,
        /// `HTTP` or `HTTPS`.
        #[serde(default = "default_probe_scheme")]
        scheme: String,
    },
    /// A TCP connect to the app's port.
    Tcp {
        /// The app's port.
        port: u16,
    },
}

fn default_probe_path() -> String {
    "/".into()
}

fn default_probe_scheme() -> String {
    "HTTP".into()
}
