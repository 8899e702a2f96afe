//! `apiward operator`: runs the control plane against a cluster — in a pod (in-cluster
//! config), or from a laptop with a kubeconfig (`KUBECONFIG`, as kubectl), binding its
//! servers on the local machine.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::cluster::Options;
use crate::serve::webhook::{SidecarTemplate, WebhookOptions};

use super::EXIT_USAGE;

/// `apiward operator`.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The operator's own namespace (its CA Secret and Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "apiward-system")]
    namespace: String,
    /// This replica's name (the Lease holder identity).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, env = "APIWARD_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The config and identity server (mTLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    config_listen: SocketAddr,
    /// The injection webhook (TLS).
    #[arg(long, default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,
    /// Metrics and health (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Workload certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Least time between two status writes of one policy.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    status_interval: Duration,
    /// The Service in front of the config server.
    #[arg(long, default_value = "apiward")]
    service: String,
    /// More names for the config server's certificate.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Do not elect a leader (a single replica; it always writes status).
    #[arg(long)]
    no_leader_election: bool,
    /// Do not serve the admission webhooks (sidecar injection and policy validation).
    #[arg(long)]
    no_webhook: bool,
    /// The webhook's Service.
    #[arg(long, default_value = "apiward-webhook")]
    webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current
    /// (empty: cert-manager does).
    #[arg(long, default_value = "apiward-sidecar-injector")]
    webhook_configuration: String,
    /// The ValidatingWebhookConfiguration of the policy validator, whose caBundle the
    /// operator keeps current (empty: cert-manager does, or validation is not registered).
    #[arg(long, default_value = "apiward-policy-validator")]
    validating_webhook_configuration: String,
    /// Serve the webhook with `tls.crt`/`tls.key` from this directory (a mounted
    /// cert-manager Secret, re-read on renewal) instead of a certificate from the mesh CA.
    /// Pair it with `--webhook-configuration ''` so cert-manager's CA injector owns
    /// `caBundle`.
    #[arg(long, env = "APIWARD_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// The injected sidecar: image, pull policy, resources, log level, as JSON
    /// (`SidecarTemplate`; the chart writes it).
    #[arg(long, env = "APIWARD_SIDECAR_TEMPLATE")]
    sidecar_template: Option<String>,
    /// Export traces over OTLP/HTTP to this endpoint (`<endpoint>/v1/traces`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The injected sidecar's image (when no template is given).
    #[arg(long, default_value = "ghcr.io/apiward/apiward-sidecar:0.1.0")]
    sidecar_image: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    apiward_policy::duration::parse_duration(s).map_err(|e| e.to_string())
}

impl OperatorArgs {
    fn options(&self) -> Result<Options, String> {
        let control_url = format!("https://{}.{}.svc:15012", self.service, self.namespace);
        let sidecar = match &self.sidecar_template {
            Some(t) => {
                let mut v: serde_json::Value = serde_json::from_str(t)
                    .map_err(|e| format!("--sidecar-template: not JSON: {e}"))?;
                if let Some(m) = v.as_object_mut() {
                    m.entry("controlUrl").or_insert(control_url.clone().into());
                    m.entry("trustDomain").or_insert(self.trust_domain.clone().into());
                }
                serde_json::from_value::<SidecarTemplate>(v)
                    .map_err(|e| format!("--sidecar-template: {e}"))?
            }
            None => serde_json::from_value(serde_json::json!({
                "image": self.sidecar_image, "controlUrl": control_url, "trustDomain": self.trust_domain,
            }))
            .map_err(|e| e.to_string())?,
        };
        let identity = self
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("apiward-{}", std::process::id()));
        Ok(Options {
            namespace: self.namespace.clone(),
            identity,
            trust_domain: self.trust_domain.clone(),
            config_listen: self.config_listen,
            metrics_listen: self.metrics_listen,
            cert_lifetime: self.cert_lifetime,
            status_interval: self.status_interval,
            server_names: self.server_names.clone(),
            service: self.service.clone(),
            leader_election: !self.no_leader_election,
            webhook: (!self.no_webhook).then(|| WebhookOptions {
                listen: self.webhook_listen,
                namespace: self.namespace.clone(),
                service: self.webhook_service.clone(),
                configuration: Some(self.webhook_configuration.clone()).filter(|c| !c.is_empty()),
                validating_configuration: Some(self.validating_webhook_configuration.clone())
                    .filter(|c| !c.is_empty()),
                sidecar,
                cert_dir: self.webhook_cert_dir.clone(),
                injected: None,
            }),
        })
    }
}

/// Runs `apiward operator`.
pub fn run(args: &OperatorArgs) -> ExitCode {
    // Before the runtime: the trace exporter's HTTP client runs its own.
    let _telemetry = match crate::telemetry::init("apiward-operator", args.otlp_endpoint.as_deref())
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("apiward operator: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let options = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("apiward operator: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apiward operator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let client = kube::Client::try_default().await.map_err(|e| {
            format!("no cluster: {e} (in a pod the service account is used; elsewhere KUBECONFIG or ~/.kube/config)")
        })?;
        crate::cluster::run(client, options).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apiward operator: {e}");
            ExitCode::FAILURE
        }
    }
}
