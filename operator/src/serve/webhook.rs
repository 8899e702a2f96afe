//! The admission webhooks on 9443 (TLS): the sidecar injector (`POST /inject`, below) and
//! the policy validator (`POST /validate`, [`super::validating`]).
//!
//! The sidecar injector is a mutating admission webhook.
//!
//! In: `AdmissionReview` (`admission.k8s.io/v1`) for pod creation, sent by the API server
//! for pods in namespaces labelled `apiward.io/inject=enabled` and pods labelled the same
//! (the chart's `MutatingWebhookConfiguration` selects them). Out: a JSON patch that adds
//! - the `apiward-init` init container (`apiward-sidecar init`: the iptables rules; the
//!   only container with `NET_ADMIN`/`NET_RAW`, which it needs for them),
//! - the `apiward-sidecar` native sidecar (an init container with `restartPolicy:
//!   Always`): non-root UID 1337, no capabilities, read-only root filesystem, its settings
//!   in `APIWARD_SIDECAR_SETTINGS` (`/tmp` is an in-memory emptyDir), resources from the
//!   chart,
//! - the projected ServiceAccount token (audience `apiward`) and the trust bundle,
//! - kubelet probes rewritten to the sidecar's admin port (`/app-health/...`), which asks
//!   the app itself, so probes keep working under default deny,
//! - the `apiward.io/status: injected` annotation.
//!
//! Never injects twice; honours `apiward.io/inject: disabled` (label or annotation);
//! skips `kube-system` and the operator's own namespace whatever the selectors say; a pod
//! it cannot patch is admitted unchanged (with a warning), never refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use kube::Api;
use kube::api::PostParams;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::cluster::metrics::{OperatorMetrics, WebhookLabels};
use crate::identity::Ca;

/// Marks an injected pod.
pub const STATUS_ANNOTATION: &str = "apiward.io/status";
/// `enabled` / `disabled`, as a pod label or annotation (`disabled` opts out).
pub const INJECT: &str = "apiward.io/inject";
/// The app port the sidecar fronts, when the pod has several (annotation).
pub const PORT_ANNOTATION: &str = "apiward.io/port";
/// The sidecar's UID (the iptables rules skip its traffic).
pub const SIDECAR_UID: i64 = 1337;
/// The sidecar container's name.
pub const SIDECAR_NAME: &str = "apiward-sidecar";
/// The init container's name.
pub const INIT_NAME: &str = "apiward-init";

/// What the injected containers look like (chart values).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarTemplate {
    /// The sidecar image.
    pub image: String,
    /// The image of the init step (`apiward-sidecar init`, which needs iptables); the
    /// sidecar image when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// `IfNotPresent`, `Always`, `Never`.
    #[serde(default = "default_pull")]
    pub image_pull_policy: String,
    /// Container resources (`requests`/`limits`), as Kubernetes spells them.
    #[serde(default = "default_resources")]
    pub resources: Value,
    /// `APIWARD_LOG` filter.
    #[serde(default = "default_log")]
    pub log_level: String,
    /// The operator's 15012 address, as sidecars reach it.
    pub control_url: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Where `scope: Global` quotas keep their counters (the sidecar's `quotaStore`
    /// settings, e.g. `{"url": "redis://redis.apiward-system:6379"}`); none: Global quotas
    /// count per sidecar as `onStoreError` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_store: Option<Value>,
}

fn default_pull() -> String {
    "IfNotPresent".into()
}
fn default_log() -> String {
    "info".into()
}
fn default_resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
}

/// The webhook server's settings.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Listen address (`0.0.0.0:9443`).
    pub listen: SocketAddr,
    /// The operator's namespace (never injected).
    pub namespace: String,
    /// The webhook's Service name (its DNS names go in the serving certificate).
    pub service: String,
    /// The `MutatingWebhookConfiguration` whose `caBundle` the leader keeps current;
    /// `None` when cert-manager's CA injector does it (or sidecars are not injected).
    pub configuration: Option<String>,
    /// The `ValidatingWebhookConfiguration` of the policy validator, kept the same way.
    pub validating_configuration: Option<String>,
    /// The injected containers.
    pub sidecar: SidecarTemplate,
    /// A directory with `tls.crt` and `tls.key` (a mounted cert-manager Secret) to serve
    /// instead of a certificate from the mesh CA; re-read when the files change.
    pub cert_dir: Option<std::path::PathBuf>,
    /// Told the namespace of every pod injected (the trust bundle must be there before
    /// the kubelet mounts it).
    pub injected: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// Why a pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// `apiward.io/inject: disabled`.
    OptedOut,
    /// Already has the sidecar.
    AlreadyInjected,
    /// `kube-system` or the operator's namespace.
    ExcludedNamespace,
    /// Host network: interception would capture the node's traffic.
    HostNetwork,
}

fn flag<'a>(m: &'a Option<BTreeMap<String, String>>, k: &str) -> Option<&'a str> {
    m.as_ref().and_then(|m| m.get(k)).map(String::as_str)
}

/// The app port the sidecar fronts: the annotation, else the first container port.
/// The app port the sidecar fronts (and the init step intercepts): the `apiward.io/port`
/// annotation, else the first TCP container port.
pub fn app_port(pod: &Pod) -> Option<u16> {
    if let Some(p) = flag(&pod.metadata.annotations, PORT_ANNOTATION) {
        return p.parse().ok();
    }
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// The sidecar's settings for a pod fronting `port`, with the app's rewritten probes.
fn settings(t: &SidecarTemplate, port: u16, probes: BTreeMap<String, Value>) -> Value {
    let mut s = json!({
        "appProbes": probes,
        "inbound": {"listen": "0.0.0.0:15006", "port": port},
        "admin": {"listen": "0.0.0.0:15020"},
        // The app's outbound TCP (redirected by the init step): mTLS to the meshed Services
        // of the mesh table the operator pushes; elsewhere allowed unless a policy
        // restricts egress (metadata addresses always refused).
        "outbound": {"listen": "127.0.0.1:15001", "egress": {"default": "Allow"}},
        "identity": {
            "url": t.control_url,
            "tokenFile": "/var/run/secrets/apiward.io/token/token",
            "caFile": "/var/run/secrets/apiward.io/trust/ca.crt",
            "trustDomain": t.trust_domain,
        },
        "control": {},
    });
    if let Some(q) = &t.quota_store {
        s["quotaStore"] = q.clone();
    }
    s
}

/// Rewrites an httpGet/tcpSocket probe of an app container to the sidecar's admin port:
/// `/app-health/<container>/<kind>`; returns how the sidecar asks the app instead (its
/// `appProbes` entry). A named probe port is taken as the app port.
fn rewrite_probe(probe: &mut Probe, container: &str, kind: &str, port: u16) -> Option<Value> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let number = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(_) => i32::from(port),
    };
    let target = if let Some(h) = &probe.http_get {
        json!({"http": {"port": number(&h.port), "path": h.path.clone().unwrap_or_else(|| "/".into()),
                        "scheme": h.scheme.clone().unwrap_or_else(|| "HTTP".into())}})
    } else if let Some(t) = &probe.tcp_socket {
        json!({"tcp": {"port": number(&t.port)}})
    } else {
        return None; // exec and grpc probes do not cross the network stack of the pod
    };
    probe.tcp_socket = None;
    probe.http_get = Some(k8s_openapi::api::core::v1::HTTPGetAction {
        path: Some(format!("/app-health/{container}/{kind}")),
        port: IntOrString::Int(15020),
        scheme: Some("HTTP".into()),
        ..Default::default()
    });
    Some(target)
}

/// Decides one pod: the JSON patch that injects it, or why not.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    operator_namespace: &str,
    t: &SidecarTemplate,
) -> Result<Value, Skip> {
    if namespace == "kube-system" || namespace == operator_namespace {
        return Err(Skip::ExcludedNamespace);
    }
    if flag(&pod.metadata.labels, INJECT) == Some("disabled")
        || flag(&pod.metadata.annotations, INJECT) == Some("disabled")
    {
        return Err(Skip::OptedOut);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let injected = flag(&pod.metadata.annotations, STATUS_ANNOTATION) == Some("injected")
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == SIDECAR_NAME || c.name == INIT_NAME);
    if injected {
        return Err(Skip::AlreadyInjected);
    }
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let port = app_port(pod).unwrap_or(8080);
    let mut ops = Vec::new();

    // Probes: to the sidecar's admin port, which asks the app.
    let mut probes = BTreeMap::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let mut c: Container = c.clone();
        let mut changed = false;
        for (kind, probe) in [
            ("livez", c.liveness_probe.as_mut()),
            ("readyz", c.readiness_probe.as_mut()),
            ("startupz", c.startup_probe.as_mut()),
        ] {
            if let Some(p) = probe
                && let Some(target) = rewrite_probe(p, &c.name, kind, port)
            {
                probes.insert(format!("/app-health/{}/{kind}", c.name), target);
                changed = true;
            }
        }
        if changed {
            ops.push(json!({"op": "replace", "path": format!("/spec/containers/{i}"), "value": c}));
        }
    }

    let init = json!({
        "name": INIT_NAME,
        "image": t.init_image.as_deref().unwrap_or(&t.image),
        "imagePullPolicy": t.image_pull_policy,
        "args": ["init", "--inbound-ports", port.to_string(), "--proxy-uid", SIDECAR_UID.to_string()],
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
    });
    let sidecar = json!({
        "name": SIDECAR_NAME,
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "restartPolicy": "Always",
        "args": ["run"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APIWARD_LOG", "value": t.log_level},
            {"name": "APIWARD_SIDECAR_SETTINGS", "value": settings(t, port, probes).to_string()},
        ],
        "ports": [
            {"name": "apiward-in", "containerPort": 15006},
            {"name": "apiward-admin", "containerPort": 15020},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 15020}, "periodSeconds": 10},
        "startupProbe": {"httpGet": {"path": "/live", "port": 15020}, "periodSeconds": 1, "failureThreshold": 60},
        "resources": t.resources,
        "securityContext": {
            "runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "apiward-token", "mountPath": "/var/run/secrets/apiward.io/token", "readOnly": true},
            {"name": "apiward-trust", "mountPath": "/var/run/secrets/apiward.io/trust", "readOnly": true},
            {"name": "apiward-tmp", "mountPath": "/tmp"},
        ],
    });
    // The init step first, then the sidecar, then the pod's own init containers (which
    // then run with the interception and the sidecar in place).
    match &spec.init_containers {
        Some(list) if !list.is_empty() => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": sidecar}));
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
        }
        _ => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, sidecar]}))
        }
    }
    let volumes = [
        json!({"name": "apiward-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": crate::identity::AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}),
        json!({"name": "apiward-trust", "configMap": {"name": crate::identity::kube::TRUST_BUNDLE_CONFIGMAP}}),
        json!({"name": "apiward-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}),
    ];
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    if pod.metadata.annotations.is_some() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations/apiward.io~1status", "value": "injected"}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {STATUS_ANNOTATION: "injected"}}));
    }
    Ok(Value::Array(ops))
}

/// Answers one AdmissionReview (JSON in, JSON out).
#[tracing::instrument(name = "admission_review", skip_all, fields(namespace, result))]
pub fn review(body: &[u8], opts: &WebhookOptions) -> (Value, &'static str) {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                json!({"error": format!("not an AdmissionReview: {e}")}),
                "error",
            );
        }
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return (
                json!({"error": format!("no request in the review: {e}")}),
                "error",
            );
        }
    };
    let mut resp = AdmissionResponse::from(&req);
    let namespace = req.namespace.clone().unwrap_or_default();
    tracing::Span::current().record("namespace", namespace.as_str());
    let patched = req.object.as_ref().map(|pod| {
        inject(pod, &namespace, &opts.namespace, &opts.sidecar).map(|patch| {
            serde_json::from_value::<json_patch::Patch>(patch)
                .map_err(|e| e.to_string())
                .and_then(|p| resp.clone().with_patch(p).map_err(|e| e.to_string()))
        })
    });
    let result = match patched {
        Some(Ok(Ok(r))) => {
            resp = r;
            "injected"
        }
        Some(Ok(Err(e))) => {
            tracing::error!(error = %e, "cannot build the injection patch");
            "error"
        }
        Some(Err(_)) | None => "skipped",
    };
    tracing::Span::current().record("result", result);
    if result == "injected"
        && let Some(tx) = &opts.injected
    {
        let _ = tx.send(namespace.clone());
    }
    if result == "error" {
        resp.warnings = Some(vec![
            "apiward could not build the injection patch; the pod is admitted without a sidecar"
                .into(),
        ]);
    }
    let mut out = serde_json::to_value(resp.into_review()).unwrap_or(Value::Null);
    // kube-core serializes the patch bytes as an array of numbers; the API server's
    // canonical form of `[]byte` is base64.
    if let Some(bytes) = out["response"]["patch"].as_array() {
        use base64::Engine as _;
        let raw: Vec<u8> = bytes
            .iter()
            .filter_map(|b| b.as_u64().map(|b| b as u8))
            .collect();
        out["response"]["patch"] = base64::engine::general_purpose::STANDARD.encode(raw).into();
    }
    (out, result)
}

/// A certificate resolver whose key can be swapped (webhook certificate rotation).
#[derive(Debug)]
struct Rotating(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for Rotating {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Webhook serving certificates last this long, and are renewed at two thirds of it.
const CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A certificate and key in PEM, as one `CertifiedKey`.
fn certified_pem(chain: &[u8], key: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signing)))
}

fn certified(ca: &Ca, names: &[String]) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let (chain, key) = ca
        .server_certificate(names, CERT_LIFETIME, now_unix())
        .map_err(|e| e.to_string())?;
    certified_pem(chain.as_bytes(), key.as_bytes())
}

/// `tls.crt` and `tls.key` from `dir`, with the bytes read (to notice a renewal).
fn certified_dir(
    dir: &std::path::Path,
) -> Result<(Arc<rustls::sign::CertifiedKey>, Vec<u8>), String> {
    let read =
        |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
    let (chain, key) = (read("tls.crt")?, read("tls.key")?);
    let k = certified_pem(&chain, &key).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok((k, [chain, key].concat()))
}

fn server_config(resolver: Arc<Rotating>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl Rotating {
    fn set(&self, k: Arc<rustls::sign::CertifiedKey>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = k;
    }
}

/// How often a mounted certificate is looked at for a renewal (kubelet updates a mounted
/// Secret within about a minute of cert-manager renewing it).
pub const CERT_DIR_POLL: Duration = Duration::from_secs(30);

/// The webhook's TLS config from a mounted certificate (`tls.crt`, `tls.key`), re-read
/// when the files change; a broken new pair keeps the old one serving.
pub fn tls_from_dir(
    dir: std::path::PathBuf,
    poll: Duration,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (key, mut seen) = certified_dir(&dir)?;
    let resolver = Arc::new(Rotating(RwLock::new(key)));
    let cfg = server_config(resolver.clone())?;
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                match certified_dir(&dir) {
                    Ok((_, bytes)) if bytes == seen => {}
                    Ok((k, bytes)) => {
                        resolver.set(k);
                        seen = bytes;
                        tracing::info!(dir = %dir.display(), "webhook serving certificate reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reload the webhook certificate; the old one keeps serving")
                    }
                }
            }
        });
    }
    Ok(cfg)
}

/// The webhook's TLS config, with a certificate signed by the mesh CA for the Service's
/// names, renewed in the background.
pub fn tls(ca: Arc<Ca>, names: Vec<String>) -> Result<Arc<rustls::ServerConfig>, String> {
    let resolver = Arc::new(Rotating(RwLock::new(certified(&ca, &names)?)));
    let cfg = server_config(resolver.clone())?;
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CERT_LIFETIME * 2 / 3).await;
                match certified(&ca, &names) {
                    Ok(k) => {
                        resolver.set(k);
                        tracing::info!("webhook serving certificate renewed");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot renew the webhook certificate"),
                }
            }
        });
    }
    Ok(cfg)
}

/// Largest AdmissionReview accepted.
const MAX_REVIEW: usize = 3 << 20;

async fn handle(
    req: Request<hyper::body::Incoming>,
    opts: &WebhookOptions,
    metrics: &OperatorMetrics,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    };
    let webhook = match req.uri().path() {
        "/inject" => "inject",
        "/validate" => "validate",
        _ => "",
    };
    if req.method() != http::Method::POST || webhook.is_empty() {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "POST /inject or POST /validate"}).to_string(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "review too large"}).to_string(),
            );
        }
    };
    let (answer, result) = if webhook == "validate" {
        super::validating::review(&body)
    } else {
        review(&body, opts)
    };
    metrics
        .webhook
        .get_or_create(&WebhookLabels { webhook, result })
        .inc();
    if answer.get("error").is_some() {
        return reply(StatusCode::BAD_REQUEST, answer.to_string());
    }
    reply(StatusCode::OK, answer.to_string())
}

/// Serves the webhook on a bound listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: Arc<WebhookOptions>,
    metrics: Arc<OperatorMetrics>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, opts, metrics) = (acceptor.clone(), opts.clone(), metrics.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let (opts, metrics) = (opts.clone(), metrics.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(req, &opts, &metrics).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

/// The webhook's DNS names.
pub fn names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Starts the webhook server and, when it manages the configuration, the `caBundle` loop.
pub async fn start(
    client: kube::Client,
    mut opts: WebhookOptions,
    ca: Arc<Ca>,
    metrics: Arc<OperatorMetrics>,
    leader: watch::Receiver<bool>,
) -> Result<(), String> {
    let tls = match &opts.cert_dir {
        Some(dir) => tls_from_dir(dir.clone(), CERT_DIR_POLL)?,
        None => tls(ca.clone(), names(&opts.service, &opts.namespace))?,
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    tracing::info!(listen = %opts.listen, "injection webhook serving");
    if let Some(name) = opts.configuration.clone() {
        let bundle = ca.trust_bundle_pem().to_owned();
        tokio::spawn(keep_ca_bundle::<MutatingWebhookConfiguration>(
            client.clone(),
            name,
            bundle,
            leader.clone(),
        ));
    }
    if let Some(name) = opts.validating_configuration.clone() {
        let bundle = ca.trust_bundle_pem().to_owned();
        tokio::spawn(keep_ca_bundle::<ValidatingWebhookConfiguration>(
            client.clone(),
            name,
            bundle,
            leader,
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    opts.injected = Some(tx);
    tokio::spawn(bundle_where_injected(
        client,
        ca.trust_bundle_pem().to_owned(),
        rx,
    ));
    tokio::spawn(serve(listener, tls, Arc::new(opts), metrics));
    Ok(())
}

/// Publishes the trust bundle in the namespace of each injected pod, once per namespace
/// (the leader also keeps it in every namespace labelled for injection). Any replica does
/// it: the webhook that injected the pod may not be the leader's, and the apply is
/// idempotent.
async fn bundle_where_injected(
    client: kube::Client,
    bundle: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut done = std::collections::HashSet::new();
    while let Some(ns) = rx.recv().await {
        if done.contains(&ns) {
            continue;
        }
        match crate::identity::kube::publish_trust_bundle(client.clone(), &ns, &bundle).await {
            Ok(()) => {
                done.insert(ns);
            }
            Err(e) => tracing::warn!(namespace = ns, error = %e, "cannot publish the trust bundle"),
        }
    }
}

/// A webhook configuration: its webhooks' client configs carry the `caBundle`.
pub trait WebhookConfiguration:
    kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + serde::Serialize
    + Send
    + Sync
    + 'static
{
    /// The kind, for logs.
    const KIND: &'static str;
    /// Every webhook's client config.
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig>;
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    const KIND: &'static str = "MutatingWebhookConfiguration";
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    const KIND: &'static str = "ValidatingWebhookConfiguration";
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

/// Sets `caBundle` on every webhook of the configuration to `bundle_pem`. Returns whether
/// it had to change anything.
pub async fn ensure_ca_bundle<K: WebhookConfiguration>(
    api: &Api<K>,
    name: &str,
    bundle_pem: &str,
) -> Result<bool, kube::Error> {
    let mut cfg = api.get(name).await?;
    let want = k8s_openapi::ByteString(bundle_pem.as_bytes().to_vec());
    let mut changed = false;
    for c in cfg.client_configs() {
        if c.ca_bundle.as_ref() != Some(&want) {
            c.ca_bundle = Some(want.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &cfg).await?;
    }
    Ok(changed)
}

/// While this replica leads, keeps the configuration's `caBundle` equal to the mesh CA's
/// (checked at once, on every change of leadership and every minute).
async fn keep_ca_bundle<K: WebhookConfiguration>(
    client: kube::Client,
    name: String,
    bundle: String,
    mut leader: watch::Receiver<bool>,
) {
    let api: Api<K> = Api::all(client);
    loop {
        if *leader.borrow_and_update() {
            match ensure_ca_bundle(&api, &name, &bundle).await {
                Ok(true) => tracing::info!(
                    kind = K::KIND,
                    configuration = name,
                    "webhook caBundle updated"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(kind = K::KIND, configuration = name, error = %e, "cannot update the webhook caBundle")
                }
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
