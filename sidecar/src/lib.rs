//! apiward-sidecar — the data plane.
//!
//! Stage: between callers and one app. In: connections on the inbound port and a config
//! (a settings file in standalone mode; pushed by the operator later). Out: requests the
//! policy allows, forwarded to the app on loopback; refusals with a reason; metrics and a
//! JSON decision log. Configs swap atomically; a bad one is refused and the last good one
//! keeps serving; with none, every request is refused (fail closed).
//!
//! - [`settings`]: the settings file. [`state`]: the active config and shared state.
//! - [`inbound`]: listener, TLS by mode, the request pipeline as named stages (authenticate,
//!   authorize, checks, forward, response filter) and the one place outcomes are recorded.
//! - [`refusal`]: every refusal the sidecar answers with, in one catalog.
//! - [`authn`]: JWT/JWKS and API keys. [`tls`]: rustls configs and SPIFFE IDs.
//! - [`outbound`]: the app's redirected connections: mTLS to meshed peers, the egress policy.
//! - [`quota_store`]: Global quotas in Redis, spent from local leases.
//! - [`control`]: the config pushed by the operator, and reports back to it.
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/config_dump`. [`metrics`]: the registry.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authn;
pub mod body;
pub mod client;
pub mod control;
pub mod deadline;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod inventory;
pub mod linger;
pub mod metrics;
pub mod outbound;
pub mod park;
pub mod quota_store;
pub mod refusal;
pub mod settings;
pub mod state;
pub mod tcp;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A running sidecar's addresses (useful when binding port 0 in tests).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Inbound listener.
    pub inbound: std::net::SocketAddr,
    /// Admin listener.
    pub admin: std::net::SocketAddr,
    /// Outbound listener, when configured.
    pub outbound: Option<std::net::SocketAddr>,
}

/// Loads the settings file, binds the listeners and starts serving in the background.
/// Fails (with a message naming the file and field) if the first load fails.
pub async fn start(config: &Path) -> anyhow::Result<(Arc<state::Shared>, Bound)> {
    let first = settings::Settings::load(config)?;
    let jwks_client = tls::client_config(first.jwks_ca_file.as_deref())?;
    let mut shared = state::Shared::new(config, jwks_client);
    if first.identity.is_some() {
        shared.identity = Some(Arc::new(identity::WorkloadIdentity::default()));
    }
    let shared = Arc::new(shared);
    let version = shared.reload().map_err(|e| anyhow::anyhow!(e))?;
    let timeouts = first
        .timeouts()
        .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
    let inbound = tokio::net::TcpListener::bind(first.inbound.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", first.inbound.listen))?;
    let admin = tokio::net::TcpListener::bind(first.admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", first.admin.listen))?;
    let outbound = match &first.outbound {
        Some(o) => Some(
            tokio::net::TcpListener::bind(o.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", o.listen))?,
        ),
        None => None,
    };
    let bound = Bound {
        inbound: inbound.local_addr()?,
        admin: admin.local_addr()?,
        outbound: outbound.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    tracing::info!(config = %config.display(), version, inbound = %bound.inbound, admin = %bound.admin, upstream = %first.inbound.upstream(), "apiward-sidecar serving");
    let upstream = inbound::Upstream::new(
        first.inbound.upstream(),
        timeouts.upstream_idle,
        first.limits.max_upstream_connections,
        shared.metrics.upstream_waiting.clone(),
    );
    tokio::spawn(inbound::serve_inbound(inbound, shared.clone(), upstream));
    tokio::spawn(admin::serve_admin(admin, shared.clone()));
    if let Some(l) = outbound {
        tokio::spawn(outbound::serve_outbound(l, shared.clone()));
    }
    tokio::spawn(watch(shared.clone(), config.to_owned()));
    if let (Some(id), Some(s)) = (&shared.identity, first.identity.clone()) {
        if let Some(c) = &first.control {
            let control = control::Control {
                url: c.url.clone().unwrap_or_else(|| s.url.clone()),
                pod: c.pod_name().unwrap_or_default(),
                ca_file: s.ca_file.clone(),
                report_interval: apiward_policy::duration::parse_duration(&c.report_interval)
                    .unwrap_or(Duration::from_secs(5)),
            };
            tokio::spawn(control::keep_synced(shared.clone(), control.clone()));
            tokio::spawn(control::keep_reporting(shared.clone(), control));
        }
        tokio::spawn(identity::keep_renewed(shared.clone(), id.clone(), s));
    }
    Ok((shared, bound))
}

/// What a stopping sidecar does before exiting: gives back what is left of its Global
/// quota leases (within a second), so other sidecars can spend it.
pub async fn shutdown(shared: &state::Shared) {
    let global = shared
        .active
        .load()
        .as_ref()
        .and_then(|a| a.global_quotas.clone());
    if let Some(g) = global {
        match tokio::time::timeout(Duration::from_secs(1), g.give_back_expired(u64::MAX)).await {
            Ok(n) => tracing::info!(requests = n, "gave back unspent quota leases"),
            Err(_) => tracing::warn!("quota store too slow: unspent leases expire on their own"),
        }
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reloads on SIGHUP and when the file changes (checked every 500 ms).
async fn watch(shared: Arc<state::Shared>, path: PathBuf) {
    let mut last = modified(&path);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let signalled = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let by_signal = tokio::select! {
            _ = signalled => true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        };
        let now = modified(&path);
        if !by_signal && now == last {
            continue;
        }
        last = now;
        match shared.reload() {
            Ok(v) => tracing::info!(version = v, "config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "config refused; the previous config keeps serving")
            }
        }
    }
}
