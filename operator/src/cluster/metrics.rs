//! The operator's Prometheus metrics (`/metrics` on 8080), named
//! `apiward_operator_<what>_<unit>`, and the health endpoints `/healthz` (the process
//! runs) and `/readyz` (the watches have listed once and the servers are up).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a webhook call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `inject` (the sidecar injector) or `validate` (the policy validator).
    pub webhook: &'static str,
    /// `injected`, `skipped`, `allowed`, `denied` or `error`.
    pub result: &'static str,
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    /// Watch events applied to the index.
    pub events: Counter,
    /// Time to apply a batch of events and compile (seconds).
    pub compile_seconds: Histogram,
    /// Pod configs pushed (new versions published to sidecar streams).
    pub pushes: Counter,
    /// Sidecars holding a config stream open.
    pub connected_sidecars: Gauge,
    /// Status writes, and failed ones.
    pub status_writes: Counter,
    /// Failed status writes.
    pub status_write_failures: Counter,
    /// Admission reviews by result.
    pub webhook: Family<WebhookLabels, Counter>,
    /// Workload certificates issued.
    pub certificates_issued: Gauge,
    /// 1 on the leader.
    pub leader: Gauge,
    /// Set once the watches have delivered their first lists.
    pub ready: AtomicBool,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("apiward_operator");
        let m = Self {
            events: Counter::default(),
            compile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            pushes: Counter::default(),
            connected_sidecars: Gauge::default(),
            status_writes: Counter::default(),
            status_write_failures: Counter::default(),
            webhook: Family::default(),
            certificates_issued: Gauge::default(),
            leader: Gauge::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "watch_events",
            "Watch events applied to the index",
            m.events.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to apply a batch of watch events and recompile",
            m.compile_seconds.clone(),
        );
        registry.register(
            "config_pushes",
            "Pod configs pushed to sidecar streams",
            m.pushes.clone(),
        );
        registry.register(
            "connected_sidecars",
            "Sidecars holding a config stream open",
            m.connected_sidecars.clone(),
        );
        registry.register(
            "status_writes",
            "ApiPolicy status writes",
            m.status_writes.clone(),
        );
        registry.register(
            "status_write_failures",
            "ApiPolicy status writes that failed",
            m.status_write_failures.clone(),
        );
        registry.register(
            "webhook_requests",
            "Admission reviews by result",
            m.webhook.clone(),
        );
        registry.register(
            "certificates_issued",
            "Workload certificates issued since start",
            m.certificates_issued.clone(),
        );
        registry.register("leader", "1 while this replica leads", m.leader.clone());
        Self { registry, ..m }
    }
}

impl OperatorMetrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Answers `/metrics`, `/healthz` and `/readyz`.
pub fn handle(req: &Request<hyper::body::Incoming>, m: &OperatorMetrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if m.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the watches have not listed yet\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "/metrics /healthz /readyz\n".into(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

/// Serves the metrics and health endpoints (plain HTTP).
pub async fn serve(listener: tokio::net::TcpListener, m: Arc<OperatorMetrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let m = m.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(handle(&req, &m)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
