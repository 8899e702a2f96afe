//! The sidecar under test: a policy for `shop/users-api`, a settings file, a real PKI and
//! app, and the raw-stream helpers the HTTP/1.1 tests share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

pub const POLICY: &str = "shop/users-api";

pub fn policy(app_port: u16, jwks: &Value, extra: impl FnOnce(&mut Value)) -> Value {
    let mut p = json!({
        "apiVersion": "apiward.io/sidecar/v1alpha1",
        "version": "test-1",
        "workload": {"namespace": "shop", "name": "users-0", "serviceAccount": "users"},
        "trustDomain": "cluster.local",
        "ports": [{
            "port": app_port,
            "policies": [POLICY],
            "mtls": "Permissive",
            "mode": "Enforce",
            "jwtProviders": ["shop/users-api/corp"],
            "apiKeyProviders": ["shop/users-api/partners"],
            "rules": [
                {"policy": POLICY, "name": "own-profile", "action": "Allow",
                 "from": [{"jwt": {"provider": "shop/users-api/corp", "claims": {"scope": "profile"}}}],
                 "to": [{"methods": ["GET"], "paths": ["/users/{userId}"]}],
                 "bind": [{"source": {"pathParam": "userId"}, "claim": "sub"}]},
                {"policy": POLICY, "name": "checkout-writes", "action": "Allow",
                 "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"]}],
                 "to": [{"methods": ["GET", "POST"], "paths": ["/orders", "/upload", "/boom", "/users/{userId}"]}]},
                {"policy": POLICY, "name": "partners-read", "action": "Allow",
                 "from": [{"apiKeys": ["shop/users-api/partners"]}],
                 "to": [{"methods": ["GET"], "paths": ["/catalog/**"]}]}
            ],
            "quotas": [{"policy": POLICY, "name": "partner-rate", "key": {"apiKey": "shop/users-api/partners"},
                        "requests": 3, "periodMs": 60000, "window": "rolling",
                        "matches": [{"paths": ["/catalog/**"]}]}],
            "limits": {"maxBodyBytes": 1024, "contentTypes": ["application/json"], "maxJsonDepth": 8},
            "response": {"removeFields": ["/passwordHash"], "removeHeaders": ["server", "x-powered-by"], "maskServerErrors": true}
        }],
        "jwtProviders": [{
            "id": "shop/users-api/corp", "issuer": "https://login.test/", "audiences": ["users"],
            "jwks": jwks, "algorithms": ["ES256", "RS256"], "clockSkewSeconds": 5,
            "forwardClaims": {"sub": "x-user-id"}
        }],
        "apiKeyProviders": [partner_keys()]
    });
    extra(&mut p);
    p
}

/// The operator's hashing, repeated here: HMAC-SHA256(key, api key), hex.
pub fn partner_keys() -> Value {
    use hmac::{Hmac, Mac};
    let hk = [7u8; 32];
    let hash = |k: &str| {
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&hk).unwrap();
        m.update(k.as_bytes());
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    json!({"id": "shop/users-api/partners", "header": "x-api-key",
           "hmacKey": hk.iter().map(|b| format!("{b:02x}")).collect::<String>(),
           "keys": [{"client": "acme", "hash": hash("key-acme-123")}, {"client": "globex", "hash": hash("key-globex-456")}]})
}

pub struct Env {
    pub dir: std::path::PathBuf,
    pub pki: Pki,
    pub signer: Signer,
    pub base: String,
    pub admin: String,
    pub app_hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub app_port: u16,
    pub settings: std::path::PathBuf,
    pub shared: Arc<apiward_sidecar::state::Shared>,
}

pub fn write_settings(path: &Path, dir: &Path, app: std::net::SocketAddr, policy: &Value) {
    write_settings_with(path, dir, app, policy, |_| {});
}

pub fn write_settings_with(
    path: &Path,
    dir: &Path,
    app: std::net::SocketAddr,
    policy: &Value,
    extra: impl FnOnce(&mut Value),
) {
    let mut s = json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {"certFile": dir.join("server.crt"), "keyFile": dir.join("server.key"), "clientCaFile": dir.join("ca.crt")},
        "policy": policy,
    });
    extra(&mut s);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&s).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

pub async fn env(name: &str, extra: impl FnOnce(&mut Value)) -> Env {
    env_with(name, extra, |_| {}).await
}

/// A sidecar whose policy and settings file are changed by `policy_extra` and
/// `settings_extra`.
pub async fn env_with(
    name: &str,
    policy_extra: impl FnOnce(&mut Value),
    settings_extra: impl FnOnce(&mut Value),
) -> Env {
    let dir = tempdir(name);
    let pki = Pki::new(&dir);
    let signer = Signer::new("k1");
    let (app, app_hits) = start_app().await;
    let jwks = json!({"inline": Signer::jwks(&[&signer])});
    let settings = dir.join("sidecar.json");
    write_settings_with(
        &settings,
        &dir,
        app,
        &policy(app.port(), &jwks, policy_extra),
        settings_extra,
    );
    let (shared, bound) = apiward_sidecar::start(&settings)
        .await
        .expect("sidecar starts");
    Env {
        base: format!("https://localhost:{}", bound.inbound.port()),
        admin: format!("http://{}", bound.admin),
        dir,
        pki,
        signer,
        app_hits,
        app_port: app.port(),
        settings,
        shared,
    }
}

impl Env {
    pub fn anon(&self) -> reqwest::Client {
        client(&self.pki, None, false)
    }
    pub fn checkout(&self, h2: bool) -> reqwest::Client {
        client(&self.pki, Some(&self.pki.client("shop", "checkout")), h2)
    }
    pub fn bearer(&self, extra: Value) -> String {
        format!("Bearer {}", self.signer.token(claims(extra)))
    }
    pub async fn get(
        &self,
        c: &reqwest::Client,
        path: &str,
        auth: Option<&str>,
    ) -> reqwest::Response {
        let mut r = c.get(format!("{}{path}", self.base));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().await.unwrap()
    }
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

/// Adds a rule for corp JWT holders (scope `stream`) on the WebSocket and gRPC paths.
pub fn streaming_rule(p: &mut Value) {
    p["ports"][0]["rules"].as_array_mut().unwrap().push(json!(
        {"policy": POLICY, "name": "streams", "action": "Allow",
         "from": [{"jwt": {"provider": "shop/users-api/corp", "claims": {"scope": "stream"}}}],
         "to": [{"methods": ["GET"], "paths": ["/ws"]}, {"methods": ["POST"], "paths": ["/grpc.Echo/Say"]}]}
    ));
    p["ports"][0]["limits"]["contentTypes"] = json!(["application/json", "application/grpc"]);
}

/// Reads an HTTP/1.1 response head from a raw stream.
pub async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed mid-head"
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A WebSocket handshake for `/ws`, with an `Authorization` header when given.
pub fn ws_handshake(auth: Option<String>) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: users\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
        auth.map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default()
    )
}

/// A raw TLS connection to the sidecar as `shop/checkout`, speaking HTTP/1.1.
pub async fn tls_connect(e: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_as(e, &e.pki.client("shop", "checkout"), b"http/1.1")
        .await
        .unwrap()
}

/// A TLS connection to the sidecar as `id`, offering `alpn`; the handshake's error, if any.
pub async fn tls_connect_as(
    e: &Env,
    id: &Identity,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(e.pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp =
        tokio::net::TcpStream::connect(format!("127.0.0.1:{}", e.base.rsplit(':').next().unwrap()))
            .await
            .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status line and headers, body).
pub async fn read_response(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "keep-alive was turned off: {head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, body)
}

/// The value of an unlabelled sample in a Prometheus text exposition.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
}

/// Sends two frames on an upgraded stream, each after `pause`, and expects them echoed.
pub async fn echo_frames(
    s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    pause: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for msg in [&b"\x81\x05hello"[..], &[0x82, 3, 1, 2, 3]] {
        tokio::time::sleep(pause).await;
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo arrives")
            .unwrap();
        assert_eq!(back, msg);
    }
}

pub fn futures_util_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core_stream::Stream {
    futures_core_stream::iter(chunks)
}

pub mod futures_core_stream {
    //! A minimal `Stream` over a Vec, so the test needs no extra crate.
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub trait Stream:
        futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static
    {
    }
    impl<T: futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static>
        Stream for T
    {
    }

    pub struct Iter(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);

    pub fn iter(v: Vec<Result<Vec<u8>, std::io::Error>>) -> Iter {
        Iter(v.into_iter())
    }

    impl futures_core::Stream for Iter {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(self.0.next())
        }
    }
}

/// The HTTP/2 connection preface followed by an empty SETTINGS frame: a client that then
/// never sends a request.
pub const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
