//! Test harness: a real PKI (rcgen), real ES256 tokens, a small app on loopback, a real
//! sidecar started from a settings file, and real HTTP/1.1 and HTTP/2 clients (reqwest).
#![allow(dead_code)]

pub mod env;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    ca: Issuer<'static, KeyPair>,
}

pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "apiward test CA");
        let ca_cert = p.self_signed(&key).unwrap();
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        let ca = Issuer::new(p, key);
        let pki = Self {
            dir: dir.to_owned(),
            ca_pem,
            ca,
        };
        let server = pki.issue(
            &["localhost"],
            Some("spiffe://cluster.local/ns/shop/sa/users"),
            true,
        );
        std::fs::write(dir.join("server.crt"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
        pki
    }

    /// A leaf certificate with DNS names and an optional SPIFFE URI SAN.
    pub fn issue(&self, dns: &[&str], spiffe: Option<&str>, server: bool) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        if server {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        if let Some(u) = spiffe {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
        p.distinguished_name
            .push(DnType::CommonName, dns.first().copied().unwrap_or("client"));
        let cert = p.signed_by(&key, &self.ca).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate with exactly these URI SANs (none, one or several).
    pub fn client_with_uris(&self, uris: &[&str]) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI((*u).try_into().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, "client");
        let cert = p.signed_by(&key, &self.ca).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client for `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn client(&self, ns: &str, sa: &str) -> Identity {
        self.issue(
            &[],
            Some(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")),
            false,
        )
    }
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An ES256 signing key with its JWKS entry.
pub struct Signer {
    pub kid: String,
    key: jsonwebtoken::EncodingKey,
    pub jwk: serde_json::Value,
}

impl Signer {
    pub fn new(kid: &str) -> Self {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])});
        let key = jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der());
        Self {
            kid: kid.into(),
            key,
            jwk,
        }
    }

    pub fn jwks(signers: &[&Signer]) -> String {
        serde_json::json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
    }

    pub fn token(&self, claims: serde_json::Value) -> String {
        self.token_with(claims, |_| {})
    }

    /// A token whose header `edit` changes (e.g. `crit`).
    pub fn token_with(
        &self,
        claims: serde_json::Value,
        edit: impl FnOnce(&mut jsonwebtoken::Header),
    ) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        edit(&mut h);
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard claims for the test issuer, merged with `extra`.
pub fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"iss": "https://login.test/", "aud": "users", "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// A small app: echoes what it received as JSON, with a few special paths.
pub async fn start_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let in_flight = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (h, in_flight) = (h.clone(), in_flight.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (h, in_flight) = (h.clone(), in_flight.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            if req.uri().path() == "/slow" {
                                // Reports how many requests the app had in flight at once.
                                let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                                in_flight.fetch_sub(1, Ordering::SeqCst);
                                let body = serde_json::json!({"inFlight": n}).to_string();
                                return Ok(http::Response::new(
                                    Full::new(Bytes::from(body)).boxed(),
                                ));
                            }
                            if req.uri().path() == "/ws" {
                                return Ok(websocket_echo(req));
                            }
                            if req.uri().path().starts_with("/grpc.") {
                                return Ok(grpc_echo(req).await);
                            }
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let path = parts.uri.path().to_owned();
                            let headers: serde_json::Map<String, serde_json::Value> = parts
                                .headers
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.to_string(),
                                        serde_json::Value::String(v.to_str().unwrap_or("").into()),
                                    )
                                })
                                .collect();
                            let record = serde_json::json!({"id": 1, "passwordHash": "$argon2id$secret",
                                "profile": {"name": "Ada", "passwordHash": "$argon2id$secret", "history": [{"passwordHash": "$argon2id$old"}]}});
                            let (status, ct, out) = if let Some(kind) =
                                path.strip_prefix("/records/")
                            {
                                // The same record in the forms a filter may be asked to read.
                                match kind {
                                    "text" => (200, "text/plain", record.to_string()),
                                    "untyped" => (200, "", record.to_string()),
                                    "xml" => (200, "application/xml", "<user><passwordHash>$argon2id$secret</passwordHash></user>".to_string()),
                                    "gzip" => (200, "application/json", record.to_string()),
                                    _ => (200, "application/json", record.to_string()),
                                }
                            } else if path == "/boom" {
                                (500, "text/plain", "panic at src/db.rs:42: connection refused\nstack backtrace:\n 0: app::db::connect".to_string())
                            } else if path.starts_with("/users/") {
                                let id = path.trim_start_matches("/users/");
                                (200, "application/json", serde_json::json!({"id": id, "name": "Ada", "passwordHash": "$argon2id$v=19$secret", "headers": headers}).to_string())
                            } else {
                                (200, "application/json", serde_json::json!({"path": path, "method": parts.method.as_str(), "bodyBytes": body.len(), "headers": headers}).to_string())
                            };
                            let mut r = http::Response::new(Full::new(Bytes::from(out)).boxed());
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            if !ct.is_empty() {
                                r.headers_mut().insert("content-type", ct.parse().unwrap());
                            }
                            if path == "/records/gzip" {
                                // Labelled compressed (the filter cannot read it either way).
                                r.headers_mut()
                                    .insert("content-encoding", "gzip".parse().unwrap());
                            }
                            r.headers_mut().insert("server", "app/1.0".parse().unwrap());
                            r.headers_mut()
                                .insert("x-powered-by", "Express".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// `GET /ws` with `Upgrade: websocket`: 101, then every byte received is echoed back.
fn websocket_echo(mut req: http::Request<hyper::body::Incoming>) -> http::Response<AppBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = http::Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert("upgrade", "websocket".parse().unwrap());
    r.headers_mut()
        .insert("connection", "upgrade".parse().unwrap());
    r
}

/// `POST /grpc.*`: a unary gRPC echo. The body comes back as it was sent, followed by the
/// trailers `grpc-status: 0` and `grpc-message: echoed <n> bytes`.
async fn grpc_echo(req: http::Request<hyper::body::Incoming>) -> http::Response<AppBody> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert(
        "grpc-message",
        format!("echoed {} bytes", body.len()).parse().unwrap(),
    );
    let body = Full::new(body)
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut r = http::Response::new(body);
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    r
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("apiward-{name}-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A reqwest client trusting the test CA, optionally presenting a client certificate.
pub fn client(pki: &Pki, id: Option<&Identity>, http2: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap()])
        .pool_max_idle_per_host(4);
    if let Some(id) = id {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    if http2 {
        b = b.http2_prior_knowledge();
    } else {
        b = b.http1_only();
    }
    b.build().unwrap()
}
