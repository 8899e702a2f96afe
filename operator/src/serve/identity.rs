//! The identity endpoint on the operator's 15012 server: `POST /v1/certificates` with a
//! JSON [`CertificateRequest`] → 200 [`CertificateResponse`], or a 4xx/5xx
//! `{"error": code, "message": ...}`. Every answer is logged and counted; tokens never are.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::identity::{CertificateRequest, Issuance};

/// Largest request body accepted (a CSR and a token are a few KiB).
const MAX_BODY: usize = 64 * 1024;

/// Issuance outcomes, for `/metrics`.
#[derive(Debug, Default)]
pub struct IdentityCounters {
    /// Certificates issued.
    pub issued: std::sync::atomic::AtomicU64,
    /// Requests refused (any reason).
    pub refused: std::sync::atomic::AtomicU64,
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        serde_json::json!({"error": code, "message": message}).to_string(),
    )
}

/// Handles one request to the identity endpoint.
pub async fn handle(
    req: Request<Incoming>,
    issuance: &Issuance,
    counters: &IdentityCounters,
) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    if req.uri().path() != "/v1/certificates" {
        return error(
            404,
            "not_found",
            "the identity endpoint is POST /v1/certificates",
        );
    }
    if req.method() != Method::POST {
        return error(405, "method_not_allowed", "use POST");
    }
    let peer = req
        .extensions()
        .get::<std::net::SocketAddr>()
        .map(ToString::to_string)
        .unwrap_or_default();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            counters.refused.fetch_add(1, Relaxed);
            return error(413, "body_too_large", "the request body is over 64 KiB");
        }
    };
    let parsed: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            counters.refused.fetch_add(1, Relaxed);
            return error(
                400,
                "bad_request",
                &format!("expected {{\"csr\": PEM, \"token\": JWT}}: {e}"),
            );
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match issuance.issue(&parsed, now).await {
        Ok(out) => {
            counters.issued.fetch_add(1, Relaxed);
            tracing::info!(%peer, spiffe_id = %out.spiffe_id, serial = %out.serial, expires_at = out.expires_at, "certificate issued");
            json(
                StatusCode::OK,
                serde_json::to_string(&out).unwrap_or_default(),
            )
        }
        Err(r) => {
            counters.refused.fetch_add(1, Relaxed);
            tracing::warn!(%peer, code = r.code, status = r.status, reason = %r.message, "certificate refused");
            error(r.status, r.code, &r.message)
        }
    }
}

/// Serves the identity endpoint over TLS until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    issuance: Arc<Issuance>,
    counters: Arc<IdentityCounters>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, issuance, counters) = (acceptor.clone(), issuance.clone(), counters.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(stream)) = handshake.await else {
                return;
            };
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (issuance, counters) = (issuance.clone(), counters.clone());
                req.extensions_mut().insert(peer);
                async move { Ok::<_, std::convert::Infallible>(handle(req, &issuance, &counters).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

/// A TLS server config from a PEM chain and key (TLS 1.3, and 1.2 with AEAD suites).
pub fn server_tls(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
