//! `apiward demo`: the whole product on one laptop, as an ordinary user (no root, no
//! cluster, loopback ports only). It starts a small shop (five tiny HTTP services), a real
//! sidecar in front of each, and the local control plane (CA, config server, the example
//! policies), then drives normal traffic and one attack per OWASP API Top 10 item a mesh
//! can stop, and prints what happened: each attack blocked or detected, with the status and
//! reason code; the policies' status; the latency through a sidecar.
//!
//! The sidecars are started in this process, each with its own listeners, identity
//! (issued by the local CA over the identity endpoint) and pushed config, exactly as they
//! run alone. Callers are mesh workloads with their own certificates (`shop/frontend`
//! forwarding user tokens, `shop/checkout`, `shop/ingress` for partners) and an outsider
//! with none.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::identity::{AUDIENCE, Ca, Issuance, LocalTokens, SpiffeId};
use crate::serve::config::ConfigHub;
use crate::serve::identity::IdentityCounters;
use crate::serve::{Endpoints, serve, server_tls};

use super::EXIT_USAGE;

/// `apiward demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The policies to enforce (a directory of ApiPolicy YAML and the Secrets they use).
    #[arg(long, default_value = "examples/shop")]
    policies: PathBuf,
    /// Keep everything running after the report, to try requests with curl.
    #[arg(long)]
    serve: bool,
    /// Requests sent through a sidecar (and directly) for the latency figures.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
}

/// The demo's issuer: `examples/demo/corp-signing-key.pem` signs the `corp` tokens.
const SIGNING_KEY: &str = include_str!("../../../examples/demo/corp-signing-key.pem");
const ISSUER: &str = "https://login.shop.example/";
const KID: &str = "corp-2026-11";

/// A shop service: name (also its label `app` and ServiceAccount) and the port its policy
/// names.
const SERVICES: [(&str, u16); 5] = [
    ("users", 8080),
    ("orders", 8080),
    ("payments", 8443),
    ("partner-gateway", 8080),
    ("catalog", 8080),
];

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs `apiward demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if !args.policies.is_dir() {
        eprintln!(
            "apiward demo: {} is not a directory of policies (run from the repository root, or pass --policies)",
            args.policies.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apiward demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(super::EXIT_FAILED),
        Err(e) => {
            eprintln!("apiward demo: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shop: five tiny services.

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn reply(status: u16, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert("x-powered-by", http::HeaderValue::from_static("Express"));
    r
}

/// What each service answers. They trust whatever reaches them, as services often do:
/// the protections in the report are the sidecars'.
fn shop(service: &str, method: &Method, path: &str) -> Response<Body> {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (service, method.as_str(), seg.as_slice()) {
        ("users", _, ["users", "500"]) => {
            let mut r = Response::new(
                Full::new(Bytes::from_static(
                    b"panic at src/db.rs:42: connection refused (postgres://app:s3cret@db:5432)\nstack backtrace:\n 0: users::db::connect",
                ))
                .boxed(),
            );
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
        ("users", _, ["users", id]) => reply(
            200,
            json!({"id": id, "name": format!("Customer {id}"), "email": format!("c{id}@example.com"),
                   "passwordHash": "$argon2id$v=19$m=65536$c2FsdA$aGFzaA", "mfaSecret": "JBSWY3DPEHPK3PXP"}),
        ),
        ("orders", "GET", ["orders" | "v1", ..]) => {
            let id = seg.last().copied().unwrap_or("1");
            reply(
                200,
                json!({"id": id, "status": "shipped", "internalNotes": "customer is a reseller; margin 41%",
                       "items": [{"sku": "sku-1", "price": 20.0, "costPrice": 11.8}]}),
            )
        }
        ("orders", "POST", _) => reply(201, json!({"id": "o-1001"})),
        ("payments", "POST", ["charges"]) => {
            reply(201, json!({"id": "ch_1", "status": "succeeded"}))
        }
        ("payments", _, ["charges", id]) => reply(200, json!({"id": id, "amount": 2000})),
        ("partner-gateway", "POST", ["bulk-orders"]) => reply(201, json!({"accepted": 100})),
        ("partner-gateway", _, [kind, sku]) => {
            reply(200, json!({kind.to_string(): sku, "available": 12}))
        }
        ("catalog", _, _) => reply(200, json!({"path": path, "products": ["sku-1", "sku-2"]})),
        (_, _, ["admin", ..]) => reply(200, json!({"admin": true, "users": 1234})),
        _ => reply(404, json!({"error": "not found"})),
    }
}

async fn start_service(name: &'static str) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    let _ = body.collect().await;
                    Ok::<_, std::convert::Infallible>(shop(name, &parts.method, parts.uri.path()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// Callers.

/// A caller: its mesh workload certificate, or none.
#[derive(Clone)]
struct Caller {
    key: Option<Arc<rustls::sign::CertifiedKey>>,
}

struct Env {
    roots: Arc<rustls::RootCertStore>,
    /// Sidecar inbound address per service.
    sidecars: BTreeMap<&'static str, SocketAddr>,
    /// Sidecar admin address per service.
    admins: BTreeMap<&'static str, SocketAddr>,
    /// App address per service (for the direct baseline).
    apps: BTreeMap<&'static str, SocketAddr>,
}

/// What came back.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn code(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens an HTTP/1.1 connection to a service's sidecar (mTLS with the caller's
/// certificate, the sidecar's SPIFFE ID checked) or, without a certificate, plaintext.
async fn connect(env: &Env, to: &str, caller: &Caller, direct: bool) -> Result<Conn, String> {
    let addr = if direct {
        env.apps[to]
    } else {
        env.sidecars[to]
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let send = match (&caller.key, direct) {
        (Some(key), false) => {
            let mesh = apiward_sidecar::outbound::MeshTls {
                client_auth: Arc::new(apiward_sidecar::tls::StaticClientCert(key.clone())),
                roots: env.roots.clone(),
            };
            let expected = format!("spiffe://cluster.local/ns/shop/sa/{to}");
            let cfg = apiward_sidecar::outbound::mesh_client_config(
                &mesh,
                &expected,
                vec![b"http/1.1".to_vec()],
            )
            .map_err(|e| e.to_string())?;
            let name = rustls_pki_types::ServerName::try_from("sidecar.mesh")
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send
        }
        _ => {
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send
        }
    };
    Ok(send)
}

async fn send(conn: &mut Conn, req: Request<Full<Bytes>>) -> Result<Answer, String> {
    conn.ready().await.map_err(|e| e.to_string())?;
    let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a fresh connection. A refused connection is status 0.
async fn call(
    env: &Env,
    to: &str,
    caller: &Caller,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> Answer {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, to);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    if body.is_some() {
        b = b.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("a valid request");
    let out = async {
        let mut conn = connect(env, to, caller, false).await?;
        send(&mut conn, req).await
    };
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => Answer {
            status: 0,
            headers: Default::default(),
            body: e,
        },
        Err(_) => Answer {
            status: 0,
            headers: Default::default(),
            body: "timed out".into(),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Tokens.

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// An ES256 signing key from a PKCS#8 PEM.
fn es256_key(pem: &str) -> jsonwebtoken::EncodingKey {
    let kp = rcgen::KeyPair::from_pem(pem).expect("a P-256 PKCS#8 PEM");
    jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der())
}

fn token(claims: Value) -> String {
    let key = es256_key(SIGNING_KEY);
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(KID.into());
    jsonwebtoken::encode(&h, &claims, &key).expect("ES256 signs")
}

fn claims(aud: &str, sub: &str, extra: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "aud": aud, "sub": sub, "iat": now(), "exp": now() + 3600});
    if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
        m.extend(e);
    }
    c
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

fn forged(aud: &str, sub: &str, extra: Value) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("a P-256 key")
        .serialize_pem();
    let key = es256_key(&key);
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(KID.into());
    jsonwebtoken::encode(&h, &claims(aud, sub, extra), &key).expect("ES256 signs")
}

fn alg_none(aud: &str, sub: &str, extra: Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(aud, sub, extra).to_string().as_bytes())
    )
}

// ---------------------------------------------------------------------------------------
// Setup: the control plane, the sidecars, the callers.

fn write(path: &Path, data: &str) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))
}

/// A workload certificate for `shop/<sa>`, issued by the local CA.
fn workload_key(ca: &Ca, dir: &Path, sa: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let id = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
    };
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let csr = p
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let issued = ca
        .sign(&csr, &id, Duration::from_secs(3600), now())
        .map_err(|e| e.to_string())?;
    let files = apiward_sidecar::settings::TlsFiles {
        cert_file: dir.join(format!("{sa}.crt")),
        key_file: dir.join(format!("{sa}.key")),
        client_ca_file: dir.join("trust-bundle.pem"),
    };
    write(&files.cert_file, &issued.chain_pem)?;
    write(&files.key_file, &key.serialize_pem())?;
    let (key, _) = apiward_sidecar::tls::load_files(&files).map_err(|e| e.to_string())?;
    Ok(key)
}

async fn wait_ready(admin: SocketAddr, service: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_call(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
        if Instant::now() > deadline {
            return Err(format!(
                "the {service} sidecar did not become ready in 20 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `GET path` on a sidecar's admin port: status and body, or `None` if it did not answer.
async fn admin_call(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut s, c) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(c);
    let r = s
        .send_request(Request::get(path).body(Full::default()).ok()?)
        .await
        .ok()?;
    let status = r.status().as_u16();
    let b = r.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&b).into_owned()))
}

/// Starts the control plane, the shop and its sidecars.
async fn setup(
    args: &DemoArgs,
    dir: &Path,
) -> Result<(Env, Arc<ConfigHub>, BTreeMap<&'static str, Caller>), String> {
    let ca = Ca::generate("cluster.local", now()).map_err(|e| e.to_string())?;
    let tokens = Arc::new(LocalTokens::generate().map_err(|e| e.to_string())?);
    let bundle = dir.join("trust-bundle.pem");
    write(&bundle, ca.trust_bundle_pem())?;
    // The mesh: one pod per service.
    let workloads: Vec<Value> = SERVICES
        .iter()
        .map(|(s, port)| {
            json!({"namespace": "shop", "name": format!("{s}-0"), "labels": {"app": s},
                   "serviceAccount": s, "ports": [port]})
        })
        .collect();
    let mesh = dir.join("mesh.yaml");
    write(
        &mesh,
        &serde_norway::to_string(&json!({ "workloads": workloads })).map_err(|e| e.to_string())?,
    )?;
    // The control plane: identity and config on one TLS port.
    let hub = Arc::new(ConfigHub::new("cluster.local"));
    let sources = crate::local::LocalSources::new(&args.policies, &mesh, "cluster.local");
    tokio::spawn(crate::local::run(sources, hub.clone()));
    let (chain, key) = ca
        .server_certificate(
            &["127.0.0.1".to_string()],
            Duration::from_secs(86_400),
            now(),
        )
        .map_err(|e| e.to_string())?;
    let tls = server_tls(&chain, &key, Some(ca.trust_bundle_pem()))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let control = listener.local_addr().map_err(|e| e.to_string())?;
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject as _;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes())
        {
            r.add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        Arc::new(r)
    };
    let ca = Arc::new(ca);
    let issuance = Arc::new(Issuance {
        ca: ca.clone(),
        reviewer: tokens.clone(),
        trust_domain: "cluster.local".into(),
        lifetime: Duration::from_secs(86_400),
    });
    tokio::spawn(serve(
        listener,
        tls,
        Endpoints {
            issuance,
            counters: Arc::new(IdentityCounters::default()),
            hub: Some(hub.clone()),
        },
    ));
    // The shop and a sidecar in front of each service.
    let mut env = Env {
        roots,
        sidecars: BTreeMap::new(),
        admins: BTreeMap::new(),
        apps: BTreeMap::new(),
    };
    for (service, port) in SERVICES {
        let app = start_service(service).await?;
        let token = tokens
            .mint(
                "shop",
                service,
                Some(&format!("{service}-0")),
                AUDIENCE,
                now(),
                86_400,
            )
            .map_err(|e| e.to_string())?;
        let token_file = dir.join(format!("{service}.token"));
        write(&token_file, &token)?;
        let settings = json!({
            "inbound": {"listen": "127.0.0.1:0", "port": port, "upstream": app.to_string()},
            "admin": {"listen": "127.0.0.1:0"},
            "identity": {"url": format!("https://127.0.0.1:{}", control.port()), "tokenFile": token_file, "caFile": bundle},
            "control": {"pod": format!("{service}-0"), "reportInterval": "1s"},
            "logAllowedFraction": 0.0,
        });
        let path = dir.join(format!("{service}-sidecar.json"));
        write(&path, &settings.to_string())?;
        let (_, bound) = apiward_sidecar::start(&path)
            .await
            .map_err(|e| format!("the {service} sidecar: {e:#}"))?;
        env.sidecars.insert(service, bound.inbound);
        env.admins.insert(service, bound.admin);
        env.apps.insert(service, app);
    }
    for (service, _) in SERVICES {
        wait_ready(env.admins[service], service).await?;
    }
    // The callers: mesh workloads with certificates, and an outsider with none.
    let mut callers = BTreeMap::new();
    for sa in ["frontend", "checkout", "ingress", "orders"] {
        let key = workload_key(&ca, dir, sa)?;
        callers.insert(sa, Caller { key: Some(key) });
    }
    callers.insert("outsider", Caller { key: None });
    Ok((env, hub, callers))
}

// ---------------------------------------------------------------------------------------
// The attacks.

/// How an attack ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Refused before reaching the app.
    Blocked(String),
    /// Let through but changed or flagged (data removed, masked, counted, headers added).
    Detected(String),
    /// Served: the protection did not hold.
    Missed(String),
}

struct Row {
    owasp: &'static str,
    attack: String,
    outcome: Outcome,
}

fn status_text(a: &Answer) -> String {
    match (a.status, a.code()) {
        (0, _) => format!("no HTTP answer ({})", a.body),
        (s, c) if c.is_empty() => format!("{s}"),
        (s, c) => format!("{s} {c}"),
    }
}

/// One request of the report: to which service, as whom, what.
struct Req<'a> {
    to: &'static str,
    caller: &'a Caller,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

impl Req<'_> {
    async fn send(&self, env: &Env) -> Answer {
        call(
            env,
            self.to,
            self.caller,
            self.method,
            self.path,
            &self.headers,
            self.body.clone(),
        )
        .await
    }
}

fn req<'a>(
    to: &'static str,
    caller: &'a Caller,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
) -> Req<'a> {
    Req {
        to,
        caller,
        method,
        path,
        headers,
        body: None,
    }
}

/// Detected if the answer is `status` and its body has none of `absent`.
fn filtered(a: &Answer, status: u16, absent: &[&str], what: &str) -> Outcome {
    if a.status == status && !absent.iter().any(|f| a.body.contains(f)) {
        Outcome::Detected(format!("{status}, {what}"))
    } else {
        Outcome::Missed(status_text(a))
    }
}

async fn attacks(env: &Env, callers: &BTreeMap<&'static str, Caller>) -> (Vec<Row>, usize) {
    let (front, checkout, ingress, orders, outsider) = (
        &callers["frontend"],
        &callers["checkout"],
        &callers["ingress"],
        &callers["orders"],
        &callers["outsider"],
    );
    let user = |sub: &str| bearer(&token(claims("users", sub, json!({"scope": "profile"}))));
    let reader = bearer(&token(claims(
        "orders",
        "42",
        json!({"scope": "orders:read"}),
    )));
    let acme = ("x-api-key", "ak_live_acme_4f9c2e71d8b34a06".to_string());
    let globex = ("x-api-key", "ak_live_globex_91b7e3c05a2d4f88".to_string());
    let profile = json!({"scope": "profile"});

    // Normal traffic first: it must pass.
    let mut normal = 0;
    let mut rows = Vec::new();
    let mut charge = req("payments", checkout, "POST", "/charges", vec![]);
    charge.body = Some("{\"amount\": 2000}".into());
    for (r, want) in [
        (
            req("users", front, "GET", "/users/42", vec![user("42")]),
            200,
        ),
        (
            req("orders", front, "GET", "/orders/7", vec![reader.clone()]),
            200,
        ),
        (charge, 201),
        (
            req(
                "partner-gateway",
                ingress,
                "GET",
                "/catalog/sku-1",
                vec![acme.clone()],
            ),
            200,
        ),
        (req("catalog", outsider, "GET", "/products", vec![]), 200),
    ] {
        let a = r.send(env).await;
        if a.status == want {
            normal += 1;
        } else {
            rows.push(Row {
                owasp: "—",
                attack: format!("normal traffic {} {}{} failed", r.method, r.to, r.path),
                outcome: Outcome::Missed(status_text(&a)),
            });
        }
    }

    // Attacks refused by status code.
    let mut big = req("orders", checkout, "POST", "/orders", vec![]);
    big.body = Some(format!("{{\"items\": \"{}\"}}", "x".repeat(100 * 1024)));
    let mut bulk = req(
        "partner-gateway",
        ingress,
        "POST",
        "/bulk-orders",
        vec![globex.clone()],
    );
    bulk.body = Some("{}".into());
    let mut stolen_charge = req("payments", orders, "POST", "/charges", vec![]);
    stolen_charge.body = Some("{\"amount\": 1}".into());
    let expired = json!({"iss": ISSUER, "aud": "users", "sub": "42", "scope": "profile",
                         "iat": now() - 7200, "exp": now() - 3600});
    let refused: Vec<(&str, &str, Req<'_>, &[u16])> = vec![
        (
            "API1",
            "user 42 reads user 43's profile (GET /users/43)",
            req("users", front, "GET", "/users/43", vec![user("42")]),
            &[403],
        ),
        (
            "API1",
            "the same, percent-encoded (GET /users/%34%33)",
            req("users", front, "GET", "/users/%34%33", vec![user("42")]),
            &[400, 403],
        ),
        (
            "API1",
            "the same, with a dot segment (GET /users/42/../43)",
            req("users", front, "GET", "/users/42/../43", vec![user("42")]),
            &[400, 403],
        ),
        (
            "API2",
            "a token with alg: none",
            req(
                "users",
                front,
                "GET",
                "/users/42",
                vec![bearer(&alg_none("users", "42", profile.clone()))],
            ),
            &[401],
        ),
        (
            "API2",
            "a token signed by an unknown key",
            req(
                "users",
                front,
                "GET",
                "/users/42",
                vec![bearer(&forged("users", "42", profile.clone()))],
            ),
            &[401],
        ),
        (
            "API2",
            "an expired token",
            req(
                "users",
                front,
                "GET",
                "/users/42",
                vec![bearer(&token(expired))],
            ),
            &[401],
        ),
        (
            "API2",
            "a token for another audience (orders)",
            req(
                "users",
                front,
                "GET",
                "/users/42",
                vec![bearer(&token(claims("orders", "42", profile.clone())))],
            ),
            &[401],
        ),
        (
            "API2",
            "a caller outside the mesh, with a stolen token (orders, Strict mTLS)",
            req("orders", outsider, "GET", "/orders/7", vec![reader.clone()]),
            &[0],
        ),
        ("API4", "a 100 KiB order body (limit 64 KiB)", big, &[413]),
        (
            "API5",
            "partner globex places a bulk order (only acme may)",
            bulk,
            &[403],
        ),
        (
            "API5",
            "GET with X-HTTP-Method-Override: DELETE",
            req(
                "users",
                front,
                "GET",
                "/users/42",
                vec![user("42"), ("x-http-method-override", "DELETE".into())],
            ),
            &[400, 403, 405],
        ),
        (
            "API5",
            "the orders service creates a charge (only checkout may)",
            stolen_charge,
            &[403],
        ),
        (
            "API5",
            "a customer opens the admin API (GET /admin/users)",
            req("users", front, "GET", "/admin/users", vec![user("42")]),
            &[403],
        ),
        (
            "API8",
            "TRACE (cross-site tracing)",
            req("users", front, "TRACE", "/users/42", vec![user("42")]),
            &[405],
        ),
        (
            "API9",
            "a shadow endpoint nobody declared (GET /orders/export/all)",
            req(
                "orders",
                front,
                "GET",
                "/orders/export/all",
                vec![reader.clone()],
            ),
            &[403, 404],
        ),
    ];
    for (owasp, attack, r, codes) in refused {
        let a = r.send(env).await;
        let outcome = if codes.contains(&a.status) {
            Outcome::Blocked(match a.status {
                0 => "connection refused by mTLS (no client certificate)".into(),
                _ => status_text(&a),
            })
        } else {
            Outcome::Missed(status_text(&a))
        };
        rows.push(Row {
            owasp,
            attack: attack.into(),
            outcome,
        });
    }

    // Attacks let through, but with the harm removed or flagged.
    let a = req("users", front, "GET", "/users/42", vec![user("42")])
        .send(env)
        .await;
    let o = filtered(
        &a,
        200,
        &["passwordHash", "mfaSecret"],
        "passwordHash and mfaSecret removed from the body",
    );
    rows.push(Row {
        owasp: "API3",
        attack: "the app returns passwordHash and mfaSecret (GET /users/42)".into(),
        outcome: o,
    });
    let a = req("orders", front, "GET", "/orders/7", vec![reader.clone()])
        .send(env)
        .await;
    let o = filtered(
        &a,
        200,
        &["internalNotes", "costPrice"],
        "internalNotes and items[*].costPrice removed",
    );
    rows.push(Row {
        owasp: "API3",
        attack: "internal notes and cost prices in an order (GET /orders/7)".into(),
        outcome: o,
    });
    let a = req("users", front, "GET", "/users/500", vec![user("500")])
        .send(env)
        .await;
    let o = filtered(
        &a,
        500,
        &["stack backtrace", "s3cret"],
        "a generic problem+json body, no stack trace",
    );
    rows.push(Row {
        owasp: "API8",
        attack: "the app crashes with a stack trace and a DB password (GET /users/500)".into(),
        outcome: o,
    });
    let a = req("orders", front, "GET", "/v1/orders/7", vec![reader.clone()])
        .send(env)
        .await;
    let o = match (a.status, a.headers.get("sunset")) {
        (200, Some(s)) => Outcome::Detected(format!(
            "200 with Deprecation and Sunset: {}",
            s.to_str().unwrap_or("")
        )),
        (410, _) => Outcome::Blocked("410 gone (past its sunset)".into()),
        _ => Outcome::Missed(status_text(&a)),
    };
    rows.push(Row {
        owasp: "API9",
        attack: "a deprecated (zombie) endpoint (GET /v1/orders/7)".into(),
        outcome: o,
    });
    let before = would_deny(env).await;
    let a = req("catalog", outsider, "GET", "/internal/metrics", vec![])
        .send(env)
        .await;
    let o = if would_deny(env).await > before {
        Outcome::Detected(format!(
            "{} (Audit): counted as would-deny, not refused",
            a.status
        ))
    } else {
        Outcome::Missed(status_text(&a))
    };
    rows.push(Row {
        owasp: "API9",
        attack: "an undeclared endpoint of a policy in Audit mode (catalog)".into(),
        outcome: o,
    });
    rows.push(Row {
        owasp: "API4",
        attack: "a partner bursts 100 requests at once (quota 20/s, burst 40)".into(),
        outcome: burst(env, ingress, &globex).await,
    });
    rows.sort_by_key(|r| r.owasp);
    (rows, normal)
}

/// 100 requests at once on one connection from a partner: the burst quota answers 429.
async fn burst(env: &Env, ingress: &Caller, key: &(&'static str, String)) -> Outcome {
    let Ok(mut conn) = connect(env, "partner-gateway", ingress, false).await else {
        return Outcome::Missed("cannot connect".into());
    };
    let mut refused = 0;
    let mut retry = None;
    for _ in 0..100 {
        let r = Request::get("/stock/sku-1")
            .header("host", "partner-gateway")
            .header(key.0, key.1.as_str())
            .body(Full::default())
            .expect("a valid request");
        if let Ok(a) = send(&mut conn, r).await
            && a.status == 429
        {
            refused += 1;
            retry.get_or_insert(
                a.headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned(),
            );
        }
    }
    match retry {
        Some(r) => Outcome::Blocked(format!("{refused} of 100 got 429, Retry-After {r}s")),
        None => Outcome::Missed("no 429".into()),
    }
}

/// Would-deny decisions counted by the catalog sidecar.
async fn would_deny(env: &Env) -> f64 {
    admin_call(env.admins["catalog"], "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("apiward_sidecar_requests_total{")
                && l.contains("decision=\"would_deny\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Numbers, status and the report.

/// Latency of `n` sequential keep-alive requests: (p50, p99) in ms, and how many were 200.
async fn latency(
    env: &Env,
    caller: &Caller,
    direct: bool,
    n: usize,
    auth: &str,
) -> Result<(f64, f64, usize), String> {
    let mut conn = connect(env, "users", caller, direct).await?;
    let mut times = Vec::with_capacity(n);
    let mut ok = 0;
    for _ in 0..n {
        let req = Request::get("/users/42")
            .header("host", "users")
            .header("authorization", format!("Bearer {auth}"))
            .body(Full::default())
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        let a = send(&mut conn, req).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        ok += usize::from(a.status == 200);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok((at(0.50), at(0.99), ok))
}

fn print_report(rows: &[Row]) -> bool {
    println!("\nAttacks (each one a real request through a real sidecar):\n");
    println!("{:<5} {:<70} result", "OWASP", "attack");
    let mut all = true;
    for r in rows {
        let (word, detail) = match &r.outcome {
            Outcome::Blocked(d) => ("BLOCKED ", d.as_str()),
            Outcome::Detected(d) => ("DETECTED", d.as_str()),
            Outcome::Missed(d) => {
                all = false;
                ("MISSED  ", d.as_str())
            }
        };
        println!("{:<5} {:<70} {word} {detail}", r.owasp, r.attack);
    }
    all
}

fn print_status(statuses: &[(String, apiward_crds::ApiPolicyStatus)]) {
    println!("\nPolicies (status written by the control plane next to each file):\n");
    for (name, st) in statuses {
        let cond = |t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map_or("?".to_string(), |c| format!("{}={}", t, c.status))
        };
        let programmed = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Programmed")
            .map_or(String::new(), |c| c.message.clone());
        println!(
            "  {name:<22} {} {} {}  ({programmed})",
            cond("Accepted"),
            cond("Programmed"),
            cond("Ready")
        );
    }
}

async fn demo(args: DemoArgs) -> Result<bool, String> {
    let dir = std::env::temp_dir().join(format!("apiward-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The demo writes status files next to the policies: work on a copy.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).map_err(|e| e.to_string())?;
    for f in
        crate::load::yaml_files(std::slice::from_ref(&args.policies)).map_err(|e| e.to_string())?
    {
        let name = f.file_name().map(|n| n.to_owned()).unwrap_or_default();
        if !f.to_string_lossy().ends_with(".status.yaml") {
            std::fs::copy(&f, policies.join(name)).map_err(|e| e.to_string())?;
        }
    }
    println!(
        "apiward demo: a small shop (users, orders, payments, partner-gateway, catalog) with a sidecar in"
    );
    println!(
        "front of each, the local control plane, and the policies in {}.",
        args.policies.display()
    );
    let started = Instant::now();
    let run_args = DemoArgs {
        policies: policies.clone(),
        serve: args.serve,
        requests: args.requests,
    };
    let (env, hub, callers) = setup(&run_args, &dir).await?;
    println!(
        "Started in {:.1} s: every sidecar has its certificate and its pushed config.",
        started.elapsed().as_secs_f64()
    );
    let (rows, normal) = attacks(&env, &callers).await;
    println!(
        "\nNormal traffic: {normal} of 5 requests served (users, orders, payments, partner-gateway, catalog)."
    );
    let all = print_report(&rows) && normal == 5;
    let user42 = token(claims("users", "42", json!({"scope": "profile"})));
    let n = args.requests.max(1);
    let (sp50, sp99, sok) = latency(&env, &callers["frontend"], false, n, &user42).await?;
    let (dp50, dp99, _) = latency(&env, &callers["outsider"], true, n, &user42).await?;
    println!("\nLatency, {n} sequential keep-alive requests (GET /users/42):");
    println!(
        "  through the sidecar (mTLS + JWT + binding + response filter): p50 {sp50:.3} ms, p99 {sp99:.3} ms ({sok} of {n} served)"
    );
    println!(
        "  directly to the app (plaintext, no checks):                   p50 {dp50:.3} ms, p99 {dp99:.3} ms"
    );
    // Let the sidecars report, then show the policies' status.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = super::inventory::statuses(&policies);
    print_status(&st);
    println!("\nInventory (the endpoints the sidecars saw, templated, with flags):\n");
    super::inventory::print_table(&st);
    let blocked = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Blocked(_)))
        .count();
    let detected = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Detected(_)))
        .count();
    println!(
        "\n{} attacks: {blocked} blocked, {detected} detected, {} missed. SSRF through egress (API7) needs",
        rows.len(),
        rows.len() - blocked - detected
    );
    println!("traffic interception (root): the e2e suite shows it (e2e/tests/mesh.rs).");
    if args.serve {
        println!(
            "\nServing until Ctrl-C. Try (the sidecars need a mesh certificate; these are in {}):",
            dir.display()
        );
        let users = env.sidecars["users"];
        println!(
            "  curl -sk --cert {0}/frontend.crt --key {0}/frontend.key -H 'authorization: Bearer {1}' https://{users}/users/42",
            dir.display(),
            user42
        );
        println!(
            "  curl -sk --cert {0}/frontend.crt --key {0}/frontend.key -H 'authorization: Bearer {1}' https://{users}/users/43",
            dir.display(),
            user42
        );
        println!(
            "  curl -s http://{}/products    # catalog is Permissive: plaintext works",
            env.sidecars["catalog"]
        );
        println!(
            "  apiward inventory --local {}   # what the sidecars saw",
            policies.display()
        );
        for (s, a) in &env.admins {
            println!("  curl -s http://{a}/config_dump   # {s} sidecar");
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(all)
}
