//! The admin listener (15020): `/live`, `/ready` (only with a valid config), `/metrics`
//! (Prometheus text), `/config_dump` (the active settings and policy, secrets redacted).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::body::{ProxyBody, full};
use crate::state::Shared;

/// Serves the admin endpoints until the process ends.
pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    if req.uri().path().starts_with("/app-health/") {
                        return Ok::<_, Infallible>(app_health(req.uri().path(), &shared).await);
                    }
                    Ok::<_, Infallible>(route(req, &shared))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Asks the app for one of its kubelet probes (`appProbes` in the settings).
async fn app_health(path: &str, shared: &Shared) -> Response<ProxyBody> {
    use crate::settings::AppProbe;
    let probe = shared
        .active
        .load()
        .as_deref()
        .and_then(|a| a.settings.app_probes.get(path).cloned());
    let Some(probe) = probe else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such probe\n".into(),
        );
    };
    let timeout = std::time::Duration::from_secs(1);
    let connects = |port: u16| async move {
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
            .is_ok_and(|c| c.is_ok())
    };
    let ok = match probe {
        AppProbe::Http { port, path, scheme } if !scheme.eq_ignore_ascii_case("https") => {
            let ask = async {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .ok()?;
                tokio::spawn(conn);
                let req = Request::get(path.as_str())
                    .header(header::HOST, format!("127.0.0.1:{port}"))
                    .header(header::USER_AGENT, "kube-probe (via apiward-sidecar)")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .ok()?;
                let resp = send.send_request(req).await.ok()?;
                Some(resp.status().is_success() || resp.status().is_redirection())
            };
            tokio::time::timeout(timeout, ask)
                .await
                .ok()
                .flatten()
                .unwrap_or(false)
        }
        // HTTPS is checked as a TCP connect (kubelet does not verify the app's certificate).
        AppProbe::Http { port, .. } | AppProbe::Tcp { port } => connects(port).await,
    };
    if ok {
        text(StatusCode::OK, "text/plain", "ok\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the app's probe failed\n".into(),
        )
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<ProxyBody> {
    let active = shared.active.load_full();
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match active.as_deref() {
            _ if shared
                .identity
                .as_ref()
                .is_some_and(|i| i.current().is_none()) =>
            {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no mesh certificate yet\n".into(),
                )
            }
            Some(a) if a.engine.is_some() => text(
                StatusCode::OK,
                "text/plain",
                format!("ready: config {}\n", a.version()),
            ),
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no valid config\n".into(),
            ),
        },
        "/metrics" => {
            if let Some(a) = active.as_deref() {
                for (id, v) in &a.jwt {
                    shared
                        .metrics
                        .jwks_keys
                        .get_or_create(&crate::metrics::ProviderLabels {
                            provider: id.clone(),
                        })
                        .set(v.key_count() as i64);
                }
            }
            shared.metrics.quota_keys.set(shared.quotas.len() as i64);
            shared
                .metrics
                .quota_evictions
                .set(shared.quotas.evictions() as i64);
            if let Some(g) = active.as_deref().and_then(|a| a.global_quotas.as_deref()) {
                shared.metrics.quota_leases.set(g.leased_keys() as i64);
            }
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.encode(),
            )
        }
        "/config_dump" => {
            let dump = active.as_deref().map_or(Value::Null, |a| {
                let mut policy = serde_json::to_value(&a.config).unwrap_or(Value::Null);
                redact(&mut policy);
                let identity = shared.identity.as_ref().and_then(|id| id.current()).map(|i| {
                    serde_json::json!({"spiffeId": i.spiffe_id, "serial": i.serial, "notAfterUnix": i.expires_unix, "receivedUnix": i.issued_unix})
                });
                serde_json::json!({
                    "version": a.version(),
                    "identity": identity,
                    "outbound": a.settings.outbound,
                    "mesh": shared.mesh.load().as_deref().map(|t| serde_json::json!({
                        "version": t.version,
                        "services": t.destinations.iter().map(|d| &d.service).collect::<Vec<_>>(),
                    })),
                    "quotaStore": a.global_quotas.as_deref().map(|g| serde_json::json!({
                        "url": g.settings().display_url(),
                        "available": g.available(crate::quota_store::unix_ms()),
                        "leasedKeys": g.leased_keys(),
                    })),
                    "inbound": {"listen": a.settings.inbound.listen.to_string(), "port": a.settings.inbound.port, "upstream": a.settings.inbound.upstream().to_string()},
                    "policy": policy,
                })
            });
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Replaces secret material (API-key hashes and HMAC keys) with a marker.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if k == "hmacKey" || k == "hash" || k == "password" {
                    *val = Value::String("<redacted>".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}
