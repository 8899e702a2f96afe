//! The identity endpoint on the operator's 15012 server: `POST /v1/certificates` with a
//! JSON [`CertificateRequest`] → 200 [`CertificateResponse`], or a 4xx/5xx
//! `{"error": code, "message": ...}`. Every answer is logged and counted; tokens never are.

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
