//! `apiward operator`: the control plane on a Kubernetes cluster.
//!
//! In: the cluster's `ApiPolicy`, `Pod`, `Secret` and `ConfigMap` objects (kube watches →
//! [`crate::index::ClusterIndex`] → the incremental compiler), the sidecars' tokens,
//! CSRs and reports, and admission reviews of new pods. Out: per-pod configs streamed to
//! sidecars on 15012 (with certificates), `ApiPolicy.status` (leader only, batched
//! server-side apply), Events for rejected policies, the trust bundle ConfigMap in
//! injected namespaces, the injection webhook on 9443, metrics and health on 8080.
//!
//! Every replica watches, compiles and serves; one (elected with a Lease) writes.

pub mod lease;
pub mod metrics;
pub mod sources;
pub mod status;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::ListParams;
use tokio::sync::watch;

use crate::identity::Issuance;
use crate::identity::kube::{KubeTokenReviewer, load_or_create_ca, publish_trust_bundle};
use crate::index::ClusterIndex;
use crate::serve::config::ConfigHub;
use crate::serve::identity::IdentityCounters;
use crate::serve::{Endpoints, serve, server_tls};
use metrics::OperatorMetrics;

/// The namespace label (and pod annotation) that turns injection on.
pub const INJECT_LABEL: &str = "apiward.io/inject";

/// How the operator runs (from flags and the environment, read once in the CLI).
#[derive(Debug, Clone)]
pub struct Options {
    /// The operator's own namespace (CA Secret, Lease).
    pub namespace: String,
    /// This replica's name (Lease holder identity).
    pub identity: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Config + identity server (mTLS).
    pub config_listen: SocketAddr,
    /// Metrics and health.
    pub metrics_listen: SocketAddr,
    /// Workload certificate lifetime.
    pub cert_lifetime: Duration,
    /// Least time between two status writes of one policy.
    pub status_interval: Duration,
    /// Names in the 15012 server certificate besides the Service's.
    pub server_names: Vec<String>,
    /// The Service in front of the operator (its DNS names go in the certificate).
    pub service: String,
    /// Elect a leader with a Lease (off: this replica always writes).
    pub leader_election: bool,
    /// The injection webhook, if served.
    pub webhook: Option<crate::serve::webhook::WebhookOptions>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs the operator until the process ends or a server cannot start.
pub async fn run(client: kube::Client, o: Options) -> Result<(), String> {
    let metrics = Arc::new(OperatorMetrics::default());
    let ca = load_or_create_ca(client.clone(), &o.namespace, &o.trust_domain, now_unix())
        .await
        .map_err(|e| e.to_string())?;
    let bundle = ca.trust_bundle_pem().to_owned();
    let mut names = vec![
        o.service.clone(),
        format!("{}.{}", o.service, o.namespace),
        format!("{}.{}.svc", o.service, o.namespace),
        format!("{}.{}.svc.cluster.local", o.service, o.namespace),
    ];
    names.extend(o.server_names.iter().cloned());
    let (chain, key) = ca
        .server_certificate(&names, Duration::from_secs(365 * 24 * 3600), now_unix())
        .map_err(|e| e.to_string())?;
    let tls = server_tls(&chain, &key, Some(&bundle))?;
    let ca = Arc::new(ca);
    let counters = Arc::new(IdentityCounters::default());
    let issuance = Arc::new(Issuance {
        ca: ca.clone(),
        reviewer: Arc::new(KubeTokenReviewer::new(client.clone())),
        trust_domain: o.trust_domain.clone(),
        lifetime: o.cert_lifetime,
    });
    let hub = Arc::new(ConfigHub::new(&o.trust_domain));

    let listener = tokio::net::TcpListener::bind(o.config_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.config_listen))?;
    tracing::info!(listen = %o.config_listen, "config and identity server (mTLS) serving");
    tokio::spawn(serve(
        listener,
        tls,
        Endpoints {
            issuance,
            counters: counters.clone(),
            hub: Some(hub.clone()),
        },
    ));
    let listener = tokio::net::TcpListener::bind(o.metrics_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.metrics_listen))?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));

    let (leader_tx, leader) = watch::channel(!o.leader_election);
    if o.leader_election {
        let cfg = lease::LeaseConfig::new(&o.namespace, &o.identity);
        let api: Api<Lease> = Api::namespaced(client.clone(), &o.namespace);
        tokio::spawn(lease::run(api, cfg, leader_tx));
    }
    if let Some(w) = o.webhook.clone() {
        crate::serve::webhook::start(
            client.clone(),
            w,
            ca.clone(),
            metrics.clone(),
            leader.clone(),
        )
        .await?;
    }

    let index = Arc::new(Mutex::new(ClusterIndex::new(&o.trust_domain)));
    let (changed_tx, changed) = watch::channel(0u64);
    tokio::spawn(sources::run(
        client.clone(),
        sources::watches(&client),
        index.clone(),
        hub.clone(),
        changed_tx,
        metrics.clone(),
    ));
    tokio::spawn(publish_bundles(client.clone(), bundle, leader.clone()));
    status_loop(
        client,
        o.status_interval,
        index,
        hub,
        changed,
        leader,
        metrics,
        counters,
    )
    .await;
    Ok(())
}

/// Writes status while leading: after sources or reports change, at most once per
/// interval per policy.
#[allow(clippy::too_many_arguments)]
async fn status_loop(
    client: kube::Client,
    interval: Duration,
    index: Arc<Mutex<ClusterIndex>>,
    hub: Arc<ConfigHub>,
    mut changed: watch::Receiver<u64>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<OperatorMetrics>,
    counters: Arc<IdentityCounters>,
) {
    let mut writer = status::StatusWriter::new(client, interval, true);
    let mut reported = hub.reported();
    loop {
        let leading = *leader.borrow_and_update();
        metrics.leader.set(i64::from(leading));
        metrics.connected_sidecars.set(hub.connected() as i64);
        metrics
            .certificates_issued
            .set(counters.issued.load(std::sync::atomic::Ordering::Relaxed) as i64);
        if leading && metrics.ready.load(std::sync::atomic::Ordering::Acquire) {
            let (w, f) = (writer.writes, writer.failures);
            writer.round(&index, &hub).await;
            metrics.status_writes.inc_by(writer.writes - w);
            metrics.status_write_failures.inc_by(writer.failures - f);
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = reported.changed() => {}
            _ = leader.changed() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        // Batch: let more changes arrive before computing again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader keeps the trust bundle in every namespace labelled for injection.
async fn publish_bundles(client: kube::Client, bundle: String, mut leader: watch::Receiver<bool>) {
    let api: Api<Namespace> = Api::all(client.clone());
    loop {
        if *leader.borrow_and_update() {
            let lp = ListParams::default().labels(&format!("{INJECT_LABEL}=enabled"));
            match api.list(&lp).await {
                Ok(list) => {
                    for ns in list.items {
                        let Some(name) = ns.metadata.name else {
                            continue;
                        };
                        if let Err(e) = publish_trust_bundle(client.clone(), &name, &bundle).await {
                            tracing::warn!(namespace = name, error = %e, "cannot publish the trust bundle");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list namespaces for the trust bundle"),
            }
        }
        tokio::select! {
            _ = leader.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

#[cfg(test)]
mod tests;
