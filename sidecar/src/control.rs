//! The pushed config: the sidecar holds one long-lived HTTP/2 request open to the operator
//! (`GET /v1/config?pod=NAME`, mTLS with the workload certificate) and applies every
//! `SidecarConfig` written into it, one JSON line each. It posts a `Report` (the version it
//! enforces, the last config it refused, the quota store's health) every `reportInterval`
//! and whenever the version changes.
//!
//! A config that does not validate is refused and reported; the last good one keeps
//! serving. When the operator is away the sidecar keeps enforcing what it has, and
//! reconnects with backoff (1 s doubling to 30 s, with jitter); on reconnect the operator
//! sends the current config at once, so an operator restart re-syncs every sidecar. Before
//! the first config arrives every request is refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apiward_policy::SidecarConfig;
use apiward_policy::report::{
    CertificateInfo, QuotaStoreHealth, REPORT_API_VERSION, RejectedConfig, Report,
};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use crate::state::Shared;

/// Largest config accepted (one line).
const MAX_CONFIG: usize = 16 << 20;

/// `control` in the settings file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlSettings {
    /// The operator's config server, e.g. `https://apiward-operator.apiward-system.svc:15012`
    /// (default: `identity.url`).
    #[serde(default)]
    pub url: Option<String>,
    /// This pod's name (default: the `POD_NAME` environment variable).
    #[serde(default)]
    pub pod: Option<String>,
    /// How often a report is sent, e.g. `5s`.
    #[serde(default = "default_report_interval")]
    pub report_interval: String,
}

fn default_report_interval() -> String {
    "5s".into()
}

impl ControlSettings {
    /// The pod name, from the settings or `POD_NAME`.
    pub fn pod_name(&self) -> Option<String> {
        self.pod
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .filter(|p| !p.is_empty())
    }
}

/// Where the control plane is and how to reach it, resolved from the settings.
#[derive(Debug, Clone)]
pub struct Control {
    /// Base URL.
    pub url: String,
    /// This pod.
    pub pod: String,
    /// The CA file that verifies the operator (the identity's).
    pub ca_file: PathBuf,
    /// Report period.
    pub report_interval: Duration,
}

/// Checks a pushed config before it may replace the active one, and returns the engine it
/// built (the config is not compiled twice).
pub fn validate(cfg: &SidecarConfig) -> Result<apiward_policy::engine::Engine, String> {
    cfg.check_version().map_err(|e| e.to_string())?;
    apiward_policy::engine::Engine::new(cfg).map_err(|e| format!("{}: {}", e.field, e.message))
}

/// Applies a pushed mesh table: the outbound routes are rebuilt with its Services. A table
/// that does not parse or load is ignored (logged); the previous one stays.
fn apply_mesh(shared: &Arc<Shared>, line: &[u8]) {
    let table: apiward_policy::mesh::MeshTable = match serde_json::from_slice(line) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "pushed mesh table unreadable; the previous one stays");
            return;
        }
    };
    let (version, services) = (table.version.clone(), table.destinations.len());
    let previous = shared.mesh.swap(Some(Arc::new(table)));
    if shared.active.load().is_none() {
        return; // applied with the first config
    }
    match shared.rebuild(crate::state::Change::Mesh) {
        Ok(_) => tracing::info!(version, services, "mesh table applied"),
        Err(e) => {
            shared.mesh.store(previous);
            tracing::error!(version, error = %e, "mesh table refused; the previous one stays");
        }
    }
}

/// Is this pushed line a mesh table (rather than a `SidecarConfig`)?
fn is_mesh_line(line: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kind {
        api_version: Option<String>,
    }
    serde_json::from_slice::<Kind>(line)
        .ok()
        .and_then(|k| k.api_version)
        .is_some_and(|v| v == apiward_policy::mesh::MESH_API_VERSION)
}

/// Applies one pushed line: a mesh table, or a config. A config that does not validate
/// (or does not load with these settings) is refused and remembered for the next report;
/// the active one stays.
pub fn apply(shared: &Arc<Shared>, line: &[u8]) {
    if is_mesh_line(line) {
        return apply_mesh(shared, line);
    }
    // The version-skew rule (`apiward_policy::config`): unknown fields are ignored and
    // reported; a required feature this sidecar lacks, or an unknown value, refuses it.
    let parsed = SidecarConfig::from_wire(line).map_err(|e| match e {
        apiward_policy::config::ConfigError::Parse(e) => format!("not a SidecarConfig: {e}"),
        other => other.to_string(),
    });
    let v = match &parsed {
        Ok(w) => w.config.version.clone(),
        Err(_) => serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|c| c.get("version")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into()),
    };
    let outcome = parsed.and_then(|w| {
        let engine = validate(&w.config)?;
        let previous = shared.pushed.swap(Some(Arc::new(w.config)));
        shared
            .rebuild(crate::state::Change::Pushed(engine))
            .inspect_err(|_| {
                shared.pushed.store(previous);
            })
            .map(|version| (version, w.ignored))
    });
    match outcome {
        Ok((version, ignored)) => {
            if !ignored.is_empty() {
                tracing::warn!(version, fields = ?ignored, "pushed config has fields this sidecar does not know: ignored (a newer operator; see the version-skew rule)");
                shared
                    .metrics
                    .config_fields_ignored
                    .inc_by(ignored.len() as u64);
            }
            tracing::info!(version, "pushed config applied");
            *shared.rejected.lock().unwrap_or_else(|p| p.into_inner()) = None;
            *shared
                .ignored_fields
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = ignored;
        }
        Err(reason) => {
            tracing::error!(version = v, error = %reason, "pushed config refused; the previous config keeps serving");
            shared.metrics.config_rejected.inc();
            *shared.rejected.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(RejectedConfig { version: v, reason });
        }
    }
}

/// TLS to the operator: its certificate checked against `ca_file`, the workload
/// certificate presented, `alpn` offered.
fn tls_client(
    shared: &Shared,
    ca_file: &std::path::Path,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let identity = shared
        .identity
        .clone()
        .ok_or("control needs identity (the workload certificate authenticates the sidecar)")?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("{}: {e}", ca_file.display()))?
    {
        roots
            .add(c.map_err(|e| format!("{}: {e}", ca_file.display()))?)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// Connects to `url` over TLS and HTTP/2.
async fn connect(
    url: &http::Uri,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let host = url.host().ok_or("the control URL has no host")?.to_owned();
    let port = url.port_u16().unwrap_or(443);
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Reads one config stream until it ends, and says why it ended; `received` tells whether
/// any config arrived on it.
async fn stream_once(shared: &Arc<Shared>, c: &Control, received: &mut bool) -> String {
    match read_stream(shared, c, received).await {
        Ok(()) => "the config stream ended".into(),
        Err(e) => e,
    }
}

async fn read_stream(shared: &Arc<Shared>, c: &Control, received: &mut bool) -> Result<(), String> {
    let tls = tls_client(shared, &c.ca_file, b"h2")?;
    let base: http::Uri = c.url.parse().map_err(|e| format!("control.url: {e}"))?;
    let mut send = connect(&base, &tls).await?;
    let uri = format!("{}/v1/config?pod={}", c.url.trim_end_matches('/'), c.pod);
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(format!(
            "the config server answered {status}: {} ({})",
            v["message"].as_str().unwrap_or("no message"),
            v["error"].as_str().unwrap_or("no code")
        ));
    }
    tracing::info!(url = %c.url, pod = %c.pod, "config stream open");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("config stream: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(end + 1);
            let line = &line[..end];
            if !line.is_empty() {
                apply(shared, line);
                *received = true;
            }
        }
        if buf.len() > MAX_CONFIG {
            return Err(format!("a config over {MAX_CONFIG} bytes"));
        }
    }
    Ok(())
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 1];
    let _ = crate::tls::provider().secure_random.fill(&mut b);
    d + d * u32::from(b[0]) / 1024
}

/// Keeps the config stream open for as long as the process runs.
pub async fn keep_synced(shared: Arc<Shared>, c: Control) {
    let mut backoff = Duration::from_secs(1);
    loop {
        // The workload certificate authenticates the stream: wait for it.
        while shared
            .identity
            .as_ref()
            .is_some_and(|i| i.current().is_none())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut received = false;
        let why = stream_once(&shared, &c, &mut received).await;
        if received {
            backoff = Duration::from_secs(1); // it worked for a while: retry soon
        }
        let enforcing = shared.pushed.load().as_ref().map(|p| p.version.clone());
        tracing::warn!(error = %why, retry_in = ?backoff, enforcing = enforcing.as_deref().unwrap_or("nothing (refusing all)"), "config stream lost");
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// The report this sidecar would send now.
pub fn report(shared: &Shared, pod: &str) -> Report {
    let active = shared.active.load();
    let config = active.as_ref().and_then(|a| a.config.as_ref());
    let workload = config.map(|c| c.workload.clone()).unwrap_or_else(|| {
        let (namespace, service_account) = shared
            .identity
            .as_ref()
            .and_then(|i| i.current())
            .and_then(|i| {
                let rest = i.spiffe_id.split_once("/ns/")?.1;
                let (ns, sa) = rest.split_once("/sa/")?;
                Some((ns.to_owned(), sa.to_owned()))
            })
            .unwrap_or_default();
        apiward_policy::config::Workload {
            namespace,
            name: pod.to_owned(),
            service_account,
        }
    });
    let quota_store = active
        .as_ref()
        .and_then(|a| a.global_quotas.as_ref())
        .map(|g| QuotaStoreHealth {
            available: g.available(crate::quota_store::unix_ms()),
            errors: 0,
        });
    Report {
        api_version: REPORT_API_VERSION.into(),
        workload,
        config_version: config.map(|c| c.version.clone()),
        rejected_config: shared
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        decisions: vec![],
        inventory: vec![],
        inventory_overflow: 0,
        certificate: shared
            .identity
            .as_ref()
            .and_then(|i| i.current())
            .map(|i| CertificateInfo {
                serial: i.serial.clone(),
                not_after: i.expires_unix,
            }),
        quota_store,
        ignored_fields: shared
            .ignored_fields
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }
}

/// Posts a report every `reportInterval`, and soon after the enforced version changes.
pub async fn keep_reporting(shared: Arc<Shared>, c: Control) {
    let mut last_version: Option<String> = None;
    let mut last_rejected: Option<String> = None;
    let mut last_sent = tokio::time::Instant::now() - c.report_interval;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let version = shared
            .active
            .load()
            .as_ref()
            .and_then(|a| a.config.as_ref().map(|c| c.version.clone()));
        let rejected = shared
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.version.clone());
        let due = last_sent.elapsed() >= c.report_interval;
        let changed = version != last_version || rejected != last_rejected;
        if !due && !changed {
            continue;
        }
        if shared
            .identity
            .as_ref()
            .is_some_and(|i| i.current().is_none())
        {
            continue; // no certificate yet to authenticate with
        }
        let mut r = report(&shared, &c.pod);
        (r.inventory, r.inventory_overflow) = shared.inventory.take();
        let body = match serde_json::to_vec(&r) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let tls = match tls_client(&shared, &c.ca_file, b"http/1.1") {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "report not sent");
                last_sent = tokio::time::Instant::now();
                continue;
            }
        };
        let url = format!("{}/v1/reports", c.url.trim_end_matches('/'));
        match crate::client::call(
            &url,
            Some(body.into()),
            &tls,
            64 << 10,
            Duration::from_secs(5),
        )
        .await
        {
            Ok((status, _)) if status.is_success() => {
                last_version = version;
                last_rejected = rejected;
            }
            Ok((status, body)) => {
                tracing::warn!(%status, body = %String::from_utf8_lossy(&body), "report refused");
                shared.inventory.restore(r.inventory, r.inventory_overflow);
            }
            Err(e) => {
                tracing::debug!(error = %e, "report not sent");
                shared.inventory.restore(r.inventory, r.inventory_overflow);
            }
        }
        last_sent = tokio::time::Instant::now();
    }
}
