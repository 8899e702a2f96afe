//! The operator's 15012 server (TLS, client certificates optional): the identity endpoint
//! (`POST /v1/certificates`, authenticated by a token) and the config endpoints
//! (`GET /v1/config`, `POST /v1/reports`, authenticated by the workload certificate).

pub mod config;
pub mod identity;
pub mod validating;
pub mod webhook;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};

use crate::identity::{Issuance, Refusal, SpiffeId};
use config::ConfigHub;
use identity::IdentityCounters;

/// Largest report accepted.
const MAX_REPORT: usize = 4 << 20;

/// What the server answers.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Signs workload certificates.
    pub issuance: Arc<Issuance>,
    /// Issuance counters.
    pub counters: Arc<IdentityCounters>,
    /// Configs and reports; without it the config endpoints answer 404.
    pub hub: Option<Arc<ConfigHub>>,
}

/// The SPIFFE ID of the caller's client certificate, if it presented one.
#[derive(Debug, Clone)]
struct Peer(Option<SpiffeId>);

/// A response body: whole, or a stream of config snapshots.
pub type Body = BoxBody<Bytes, Infallible>;

fn whole(r: Response<Full<Bytes>>) -> Response<Body> {
    r.map(|b| b.boxed())
}

fn refused(r: &Refusal) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(
            serde_json::json!({"error": r.code, "message": r.message}).to_string(),
        ))
        .boxed(),
    );
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` → its parts.
pub fn parse_spiffe(uri: &str) -> Option<SpiffeId> {
    let (td, ns, sa) = apiward_policy::engine::spiffe_parts(uri)?;
    Some(SpiffeId {
        trust_domain: td.to_owned(),
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

/// The SPIFFE ID (URI SAN) of a DER certificate.
fn spiffe_of(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => parse_spiffe(u),
        _ => None,
    })
}

/// Handles one request.
pub async fn handle(req: Request<Incoming>, e: &Endpoints) -> Response<Body> {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    match req.uri().path() {
        "/v1/certificates" => whole(identity::handle(req, &e.issuance, &e.counters).await),
        "/v1/config" | "/v1/reports" => {
            let Some(hub) = &e.hub else {
                return refused(&Refusal {
                    status: 404,
                    code: "not_found",
                    message: "this server has no config endpoints".into(),
                });
            };
            let Some(caller) = peer else {
                return refused(&Refusal {
                    status: 401,
                    code: "client_certificate_required",
                    message: "present the workload certificate issued by /v1/certificates".into(),
                });
            };
            if req.uri().path() == "/v1/config" {
                config_stream(&req, hub, &caller)
            } else {
                report(req, hub, &caller).await
            }
        }
        _ => refused(&Refusal {
            status: 404,
            code: "not_found",
            message: "endpoints: POST /v1/certificates, GET /v1/config?pod=NAME, POST /v1/reports"
                .into(),
        }),
    }
}

fn config_stream(req: &Request<Incoming>, hub: &ConfigHub, caller: &SpiffeId) -> Response<Body> {
    let pod = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("pod="))
            .map(str::to_owned)
    });
    let Some(pod) = pod.filter(|p| !p.is_empty()) else {
        return refused(&Refusal {
            status: 400,
            code: "pod_required",
            message: "GET /v1/config?pod=<this pod's name>".into(),
        });
    };
    let rx = match hub.subscribe(caller, &pod) {
        Ok(rx) => rx,
        Err(r) => {
            tracing::warn!(caller = %caller, pod, code = r.code, reason = %r.message, "config stream refused");
            return refused(&r);
        }
    };
    tracing::info!(caller = %caller, pod, "config stream opened");
    // The current config and mesh table at once, then every new one of either; the
    // stream ends when the pod goes.
    let mesh = hub.mesh();
    let frames =
        futures::stream::unfold((rx, mesh, true), |(mut rx, mut mesh, first)| async move {
            let line = if first {
                let config = rx.borrow_and_update().clone().map(|s| s.line);
                let table = mesh.borrow_and_update().clone().map(|s| s.line);
                // No config yet: the mesh table alone (or nothing), and wait for one.
                [config, table]
                    .into_iter()
                    .flatten()
                    .fold(Vec::new(), |mut b, l| {
                        b.extend_from_slice(&l);
                        b
                    })
                    .into()
            } else {
                tokio::select! {
                    changed = rx.changed() => {
                        changed.ok()?;
                        rx.borrow_and_update().clone()?.line
                    }
                    changed = mesh.changed() => {
                        changed.ok()?;
                        mesh.borrow_and_update().clone().map(|s| s.line).unwrap_or_default()
                    }
                }
            };
            Some((Ok::<_, Infallible>(Frame::data(line)), (rx, mesh, false)))
        });
    let mut resp = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

async fn report(req: Request<Incoming>, hub: &ConfigHub, caller: &SpiffeId) -> Response<Body> {
    if req.method() != http::Method::POST {
        return refused(&Refusal {
            status: 405,
            code: "method_not_allowed",
            message: "use POST".into(),
        });
    }
    let body = match Limited::new(req.into_body(), MAX_REPORT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return refused(&Refusal {
                status: 413,
                code: "body_too_large",
                message: "a report is at most 4 MiB".into(),
            });
        }
    };
    let parsed = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refused(&Refusal {
                status: 400,
                code: "bad_report",
                message: format!("not a Report: {e}"),
            });
        }
    };
    match hub.report(caller, parsed) {
        Ok(()) => {
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(r) => {
            tracing::warn!(caller = %caller, code = r.code, reason = %r.message, "report refused");
            refused(&r)
        }
    }
}

/// Serves until the listener fails. HTTP/2 keep-alive pings keep idle config streams
/// open through middleboxes and notice dead peers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    endpoints: Endpoints,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let endpoints = Arc::new(endpoints);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, endpoints) = (acceptor.clone(), endpoints.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(stream)) = handshake.await else {
                return;
            };
            let peer = Peer(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| spiffe_of(c)),
            );
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let endpoints = endpoints.clone();
                req.extensions_mut().insert(addr);
                req.extensions_mut().insert(peer.clone());
                async move { Ok::<_, Infallible>(handle(req, &endpoints).await) }
            });
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(20)))
                .keep_alive_timeout(Duration::from_secs(20));
            let _ = b
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A TLS server config from a PEM chain and key (TLS 1.3, and 1.2 with AEAD suites).
/// Client certificates are optional; when `client_roots` (PEM) is given, one presented is
/// verified against them.
pub fn server_tls(
    chain_pem: &str,
    key_pem: &str,
    client_roots: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots
                    .add(c.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_only_in_the_workload_shape() {
        let id = parse_spiffe("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(
            (
                id.trust_domain.as_str(),
                id.namespace.as_str(),
                id.service_account.as_str()
            ),
            ("cluster.local", "shop", "orders")
        );
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/orders/extra",
            "spiffe:///ns/shop/sa/orders",
            "https://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/ns//sa/orders",
        ] {
            assert!(parse_spiffe(bad).is_none(), "{bad}");
        }
    }
}
