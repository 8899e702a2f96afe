//! The request pipeline end to end on loopback: real TLS, real tokens, a real app.
//! Each test is one OWASP API Top 10 behaviour a user would notice.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::env::*;
use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn api1_bola_own_id_allowed_other_id_and_tricks_refused() {
    let e = env("bola", |_| {}).await;
    let c = e.anon();
    let auth = e.bearer(json!({"sub": "42", "scope": "profile email"}));
    let r = e.get(&c, "/users/42", Some(&auth)).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], "42");
    assert_eq!(body["headers"]["x-user-id"], "42", "forwarded claim");
    assert_eq!(
        body["headers"]["x-apiward-principal"],
        "jwt:shop/users-api/corp|42"
    );
    for path in [
        "/users/43",
        "/users/42/../43",
        "/users/%34%33",
        "/users//43",
    ] {
        let (status, code) = error_code(e.get(&c, path, Some(&auth)).await).await;
        assert_eq!((status, code.as_str()), (403, "binding_failed"), "{path}");
    }
    let (status, code) = error_code(e.get(&c, "/users/42%2F..%2F43", Some(&auth)).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_path"));
}

#[tokio::test]
async fn api1_spoofed_identity_headers_never_reach_the_app() {
    let e = env("spoof", |_| {}).await;
    let c = e.anon();
    let auth = e.bearer(json!({"sub": "42", "scope": "profile"}));
    let r = c
        .get(format!("{}/users/42", e.base))
        .header("authorization", &auth)
        .header("x-user-id", "1")
        .header(
            "x-apiward-principal",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-user-id"], "42");
    assert_eq!(
        body["headers"]["x-apiward-principal"],
        "jwt:shop/users-api/corp|42"
    );
}

#[tokio::test]
async fn api2_broken_tokens_are_refused_with_401() {
    let e = env("authn", |_| {}).await;
    let c = e.anon();
    let good = claims(json!({"sub": "42", "scope": "profile"}));
    // alg: none
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(good.to_string().as_bytes())
    );
    // HMAC with the public key as the secret (alg confusion)
    let jwk_x = e.signer.jwk["x"].as_str().unwrap().to_owned();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(jwk_x.as_bytes()),
    )
    .unwrap();
    let expired = e.signer.token(claims(
        json!({"sub": "42", "scope": "profile", "exp": now() - 60}),
    ));
    let wrong_aud = e.signer.token(claims(
        json!({"sub": "42", "scope": "profile", "aud": "orders"}),
    ));
    let unknown_kid = Signer::new("k2").token(good.clone());
    let mut forged = e.signer.token(good.clone());
    forged.replace_range(forged.len() - 4.., "AAAA");
    let other_key_same_kid = Signer::new("k1").token(good.clone());
    for (name, token, want) in [
        ("alg none", none, "token_malformed"),
        ("HS256 confusion", hs, "token_algorithm_not_allowed"),
        ("expired", expired, "token_expired"),
        ("wrong audience", wrong_aud, "token_wrong_audience"),
        ("unknown kid", unknown_kid, "token_unknown_key"),
        ("forged signature", forged, "token_bad_signature"),
        (
            "signed by another key with the same kid",
            other_key_same_kid,
            "token_bad_signature",
        ),
    ] {
        let r = e
            .get(&c, "/users/42", Some(&format!("Bearer {token}")))
            .await;
        assert_eq!(r.status(), 401, "{name}");
        let www = r
            .headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            www.starts_with("Bearer error=\"invalid_token\""),
            "{name}: {www}"
        );
        let (_, code) = error_code(r).await;
        assert_eq!(code, want, "{name}");
    }
    // No token at all: 401 with a plain challenge.
    let r = e.get(&c, "/users/42", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        e.app_hits.load(Ordering::SeqCst),
        0,
        "nothing reached the app"
    );
}

async fn serve_jwks(pki: &Pki, jwks: String) -> (u16, tokio::task::JoinHandle<()>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let id = pki.issue(&["localhost"], None, true);
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let jwks = jwks.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(jwks)),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, task)
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn api2_jwks_over_https_and_last_good_keys_when_the_issuer_is_down() {
    let dir = tempdir("jwks");
    let pki = Pki::new(&dir);
    let signer = Signer::new("k1");
    let (jwks_port, jwks_task) = serve_jwks(&pki, Signer::jwks(&[&signer])).await;
    let (app, _) = start_app().await;
    let jwks = json!({"uri": format!("https://localhost:{jwks_port}/jwks.json")});
    let settings = dir.join("sidecar.json");
    let mut pol = policy(app.port(), &jwks, |_| {});
    pol["version"] = json!("jwks-uri");
    write_settings(&settings, &dir, app, &pol);
    let mut s: Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    s["jwksCaFile"] = json!(dir.join("ca.crt"));
    std::fs::write(&settings, s.to_string()).unwrap();
    let (_shared, bound) = apiward_sidecar::start(&settings).await.unwrap();
    let base = format!("https://localhost:{}", bound.inbound.port());
    let c = client(&pki, None, false);
    let auth = format!(
        "Bearer {}",
        signer.token(claims(json!({"sub": "7", "scope": "profile"})))
    );
    let ok = |r: reqwest::Response| r.status().as_u16();
    // The first request may arrive before the first fetch: the unknown kid triggers it.
    assert_eq!(
        ok(c.get(format!("{base}/users/7"))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()),
        200
    );
    jwks_task.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Issuer down: a new token signed with the known key still verifies (no cache hit).
    let fresh = format!(
        "Bearer {}",
        signer.token(claims(
            json!({"sub": "7", "scope": "profile", "jti": "second"})
        ))
    );
    assert_eq!(
        ok(c.get(format!("{base}/users/7"))
            .header("authorization", &fresh)
            .send()
            .await
            .unwrap()),
        200
    );
    // A token with an unknown kid is refused after one (failed) refresh.
    let unknown = format!(
        "Bearer {}",
        Signer::new("k9").token(claims(json!({"sub": "7", "scope": "profile"})))
    );
    let r = c
        .get(format!("{base}/users/7"))
        .header("authorization", &unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn api3_response_filter_removes_fields_and_masks_errors() {
    let e = env("filter", |_| {}).await;
    let c = e.checkout(false);
    let r = e.get(&c, "/users/9", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("server").is_none() && r.headers().get("x-powered-by").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["name"], "Ada");
    assert!(body.get("passwordHash").is_none(), "{body}");
    // API8: an app 500 with a stack trace reaches the client as a generic problem+json.
    let r = e.get(&c, "/boom", None).await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let text = r.text().await.unwrap();
    assert!(!text.contains("stack") && !text.contains("db.rs"), "{text}");
}

#[tokio::test]
async fn api4_oversized_bodies_are_refused_without_reading_them() {
    let e = env("body", |_| {}).await;
    let c = e.checkout(false);
    let url = format!("{}/upload", e.base);
    let ok = c
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let hits = e.app_hits.load(Ordering::SeqCst);
    // Declared too large: refused before the body is read.
    let big = vec![b' '; 1025];
    let (status, code) = error_code(
        c.post(&url)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (413, "body_too_large"));
    assert_eq!(
        e.app_hits.load(Ordering::SeqCst),
        hits,
        "the app never saw it"
    );
    // Streamed (chunked, no length) past the limit: cut off, 413.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 512])).collect();
    let stream = reqwest::Body::wrap_stream(futures_util_stream(chunks));
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(stream)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Wrong content type: 415. Too deep: 400.
    let (s, _) = error_code(
        c.post(&url)
            .header("content-type", "text/plain")
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 415);
    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    let (s, code) = error_code(
        c.post(&url)
            .header("content-type", "application/json")
            .body(deep)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, code.as_str()), (400, "json_too_deep"));
}

#[tokio::test]
async fn api4_quota_per_key_with_headers_and_other_keys_unaffected() {
    let e = env("quota", |_| {}).await;
    let c = e.anon();
    let call = |key: &'static str| {
        let c = c.clone();
        let url = format!("{}/catalog/sku-1", e.base);
        async move { c.get(url).header("x-api-key", key).send().await.unwrap() }
    };
    for i in 0..3 {
        let r = call("key-acme-123").await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"],
            (2 - i).to_string().as_str()
        );
        assert!(r.headers().contains_key("ratelimit-policy"));
    }
    let r = call("key-acme-123").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(r.headers()["ratelimit"].to_str().unwrap().contains("r=0"));
    assert_eq!(r.headers()["x-ratelimit-limit"], "3");
    assert_eq!(
        call("key-globex-456").await.status(),
        200,
        "another key is unaffected"
    );
    let (s, code) = error_code(call("not-a-key").await).await;
    assert_eq!((s, code.as_str()), (401, "api_key_invalid"));
}

#[tokio::test]
async fn api6_delay_mode_waits_instead_of_refusing() {
    let e = env("delay", |p| {
        p["ports"][0]["quotas"][0]["onExceed"] = json!({"delay": {"maxDelayMs": 2000}});
        p["ports"][0]["quotas"][0]["requests"] = json!(1);
        p["ports"][0]["quotas"][0]["periodMs"] = json!(1000);
    })
    .await;
    let c = e.anon();
    let url = format!("{}/catalog/a", e.base);
    let t = Instant::now();
    assert_eq!(
        c.get(&url)
            .header("x-api-key", "key-acme-123")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(&url)
            .header("x-api-key", "key-acme-123")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "the second request waited ~1s, took {waited:?}"
    );
    // Three more at once would need 3 s of waiting: the last is refused.
    let send = || {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            c.get(&url)
                .header("x-api-key", "key-acme-123")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let tasks = [send(), send(), send()];
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 200, 429],
        "two wait (1 s and 2 s), the third would wait 3 s > maxDelay"
    );
}

#[tokio::test]
async fn api5_function_level_authorization_and_method_tricks() {
    let e = env("bfla", |_| {}).await;
    let c = e.anon();
    let auth = e.bearer(json!({"sub": "42", "scope": "profile"}));
    assert_eq!(e.get(&c, "/users/42", Some(&auth)).await.status(), 200);
    let put = c
        .put(format!("{}/users/42", e.base))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 403);
    let ov = c
        .post(format!("{}/users/42", e.base))
        .header("authorization", &auth)
        .header("x-http-method-override", "GET")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (s, code) = error_code(ov).await;
    assert_eq!((s, code.as_str()), (400, "method_override"));
    let trace = c
        .request(reqwest::Method::TRACE, format!("{}/users/42", e.base))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(trace.status(), 405);
}

#[tokio::test]
async fn mtls_identity_is_the_principal_and_http2_works() {
    let e = env("mtls", |_| {}).await;
    for h2 in [false, true] {
        let c = e.checkout(h2);
        let r = e.get(&c, "/orders", None).await;
        assert_eq!(r.status(), 200, "h2={h2}");
        assert_eq!(
            r.version(),
            if h2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["headers"]["x-apiward-principal"],
            "spiffe://cluster.local/ns/shop/sa/checkout"
        );
    }
    // Another service account is not allowed; no client certificate means no identity.
    let other = client(
        &e.pki,
        Some(&e.pki.client("shop", "recommendations")),
        false,
    );
    assert_eq!(e.get(&other, "/orders", None).await.status(), 403);
    assert_eq!(e.get(&e.anon(), "/orders", None).await.status(), 401);
    // A certificate from another CA fails the handshake.
    let rogue_dir = tempdir("rogue");
    let rogue = Pki::new(&rogue_dir).client("shop", "checkout");
    let c = client(&e.pki, Some(&rogue), false);
    assert!(c.get(format!("{}/orders", e.base)).send().await.is_err());
}

#[tokio::test]
async fn strict_mode_refuses_plaintext_and_callers_without_certificates() {
    let e = env("strict", |p| p["ports"][0]["mtls"] = json!("Strict")).await;
    let plain = format!(
        "http://127.0.0.1:{}/orders",
        e.base.rsplit(':').next().unwrap()
    );
    assert!(
        reqwest::Client::new().get(plain).send().await.is_err(),
        "plaintext is refused"
    );
    assert!(
        e.get_result(&e.anon(), "/orders").await.is_err(),
        "TLS without a client certificate is refused"
    );
    assert_eq!(
        e.get(&e.checkout(false), "/orders", None).await.status(),
        200
    );
}

impl Env {
    async fn get_result(
        &self,
        c: &reqwest::Client,
        path: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        c.get(format!("{}{path}", self.base)).send().await
    }
}

#[tokio::test]
async fn audit_mode_lets_would_be_denials_through_and_counts_them() {
    let e = env("audit", |p| p["ports"][0]["mode"] = json!("Audit")).await;
    let c = e.anon();
    let auth = e.bearer(json!({"sub": "42", "scope": "profile"}));
    let r = e.get(&c, "/users/43", Some(&auth)).await;
    assert_eq!(r.status(), 200, "Audit enforces nothing");
    let r = e.get(&c, "/users/42", Some("Bearer not-a-token")).await;
    assert_eq!(r.status(), 200);
    let m = e.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("apiward_sidecar_requests_total{")
                && l.contains("decision=\"would_deny\"")
                && l.contains("reason=\"binding_failed\"")),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.contains("decision=\"would_deny\"")
                && l.contains("reason=\"token_malformed\"")),
        "{m}"
    );
}

#[tokio::test]
async fn admin_endpoints_report_readiness_metrics_and_a_redacted_dump() {
    let e = env("admin", |_| {}).await;
    assert_eq!(
        reqwest::get(format!("{}/live", e.admin))
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = reqwest::get(format!("{}/ready", e.admin)).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(ready.text().await.unwrap().contains("test-1"));
    let dump = reqwest::get(format!("{}/config_dump", e.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dump.contains("own-profile"));
    assert!(dump.contains("<redacted>"));
    assert!(!dump.contains(&"07".repeat(32)), "HMAC key leaked");
    let m = e.metrics().await;
    assert!(m.contains("apiward_sidecar_config_loaded 1"), "{m}");
    assert!(
        m.contains("apiward_sidecar_jwks_keys{provider=\"shop/users-api/corp\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn reload_under_load_drops_nothing_and_a_bad_config_is_refused() {
    let e = env("reload", |_| {}).await;
    let c = e.checkout(false);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, url, stop) = (c.clone(), format!("{}/orders", e.base), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => bad.push(r.status().as_u16()),
                    Err(err) => bad.push(if err.is_connect() { 1 } else { 0 }),
                }
            }
            (ok, bad)
        }));
    }
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], e.app_port));
    let jwks = json!({"inline": Signer::jwks(&[&e.signer])});
    for v in 2..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut p = policy(app.port(), &jwks, |_| {});
        p["version"] = json!(format!("test-{v}"));
        write_settings(&e.settings, &e.dir, app, &p);
    }
    let ready = wait_for(&format!("{}/ready", e.admin), "test-5").await;
    assert!(ready.contains("test-5"), "{ready}");
    // A malformed config is refused on reload; the last good one keeps serving.
    std::fs::write(&e.settings, "{ this is not: [valid").unwrap();
    let m = wait_for(
        &format!("{}/metrics", e.admin),
        "apiward_sidecar_config_rejected_total 1",
    )
    .await;
    assert!(m.contains("apiward_sidecar_config_rejected_total 1"), "{m}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut bad) = (0, Vec::new());
    for w in workers {
        let (o, b) = w.await.unwrap();
        ok += o;
        bad.extend(b);
    }
    assert!(ok > 100, "only {ok} requests");
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {bad:?}",
        bad.len(),
        ok as usize + bad.len()
    );
    let ready = reqwest::get(format!("{}/ready", e.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ready.contains("test-5"), "{ready}");
    let m = e.metrics().await;
    assert!(m.contains("apiward_sidecar_config_rejected_total 1"), "{m}");
}

#[tokio::test]
async fn a_malformed_config_is_refused_at_start_with_the_field() {
    let dir = tempdir("badstart");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "inbound: {port: 8080}\nlimits: {headerReadTimeout: 10 seconds}\n",
    )
    .unwrap();
    let err = apiward_sidecar::start(&bad).await.unwrap_err().to_string();
    assert!(
        err.contains("limits.headerReadTimeout") && err.contains("invalid duration"),
        "{err}"
    );
    std::fs::write(&bad, "inbound: {port: 8080}\nidentityHeader: \"x user\"\n").unwrap();
    let err = apiward_sidecar::start(&bad).await.unwrap_err().to_string();
    assert!(
        err.contains("identityHeader") && err.contains("not a valid header name"),
        "{err}"
    );
    std::fs::write(&bad, "inbound: {port: 8080, listn: 1}\n").unwrap();
    let err = apiward_sidecar::start(&bad).await.unwrap_err().to_string();
    assert!(err.contains("unknown field `listn`"), "{err}");
    // A typo in the inline policy is an error too (only pushed configs ignore unknown fields).
    let with_typo = "inbound: {port: 8080}\npolicy: {apiVersion: apiward.io/sidecar/v1alpha1, version: t, trustDomain: td, workload: {namespace: a, name: b, serviceAccount: c}, defaultMtl: Strict}\n";
    let path = bad.with_extension("typo.yaml");
    std::fs::write(&path, with_typo).unwrap();
    let err = apiward_sidecar::start(&path).await.unwrap_err().to_string();
    assert!(
        err.contains("policy.defaultMtl") && err.contains("unknown field"),
        "{err}"
    );
    // And through the binary: exit code 1 with the message on stderr.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apiward-sidecar"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listn`"));
}

#[tokio::test]
async fn no_policy_means_every_request_is_refused() {
    let dir = tempdir("failclosed");
    let pki = Pki::new(&dir);
    let (app, hits) = start_app().await;
    let settings = dir.join("s.json");
    let s = json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {"certFile": dir.join("server.crt"), "keyFile": dir.join("server.key"), "clientCaFile": dir.join("ca.crt")},
    });
    std::fs::write(&settings, s.to_string()).unwrap();
    let (_shared, bound) = apiward_sidecar::start(&settings).await.unwrap();
    let c = client(&pki, Some(&pki.client("shop", "checkout")), false);
    let r = c
        .get(format!("https://localhost:{}/orders", bound.inbound.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(
        reqwest::get(format!("http://{}/ready", bound.admin))
            .await
            .unwrap()
            .status(),
        503
    );
}

/// Polls an admin URL until its body contains `needle` (at most 10 s); returns the last body.
async fn wait_for(url: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = reqwest::get(url).await.unwrap().text().await.unwrap();
        if body.contains(needle) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn websocket_upgrade_is_decided_first_then_tunnelled() {
    use tokio::io::AsyncWriteExt;
    let e = env("websocket", streaming_rule).await;
    let addr = format!("127.0.0.1:{}", e.base.rsplit(':').next().unwrap());
    let handshake = ws_handshake;
    // No credentials: refused before the app sees it, and nothing is tunnelled.
    let before = e.app_hits.load(Ordering::SeqCst);
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(handshake(None).as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(e.app_hits.load(Ordering::SeqCst), before);
    // A token without the stream scope: 403.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let wrong = e.bearer(json!({"sub": "42", "scope": "profile"}));
    s.write_all(handshake(Some(wrong)).as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 403"));
    // Allowed: 101, then bytes flow both ways through the sidecar.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let ok = e.bearer(json!({"sub": "42", "scope": "stream"}));
    s.write_all(handshake(Some(ok)).as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    echo_frames(&mut s, Duration::ZERO).await;
}

#[tokio::test]
async fn grpc_passes_through_over_http2_with_its_trailers() {
    use http_body_util::{BodyExt, Full};
    let e = env("grpc", streaming_rule).await;
    let port = e.base.rsplit(':').next().unwrap().to_owned();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let call = |auth: String| {
        // One length-prefixed gRPC message: uncompressed, 5 bytes.
        let msg = bytes::Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
        let req = http::Request::post(format!("http://127.0.0.1:{port}/grpc.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", auth)
            .body(Full::new(msg))
            .unwrap();
        client.request(req)
    };
    let r = call(e.bearer(json!({"sub": "42", "scope": "stream"})))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.headers()["content-type"], "application/grpc");
    let collected = r.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echoed 10 bytes");
    assert_eq!(&collected.to_bytes()[..], b"\x00\x00\x00\x00\x05hello");
    // The wrong scope is refused by the sidecar, not by the app.
    let before = e.app_hits.load(Ordering::SeqCst);
    let r = call(e.bearer(json!({"sub": "42", "scope": "profile"})))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(e.app_hits.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn slowloris_connections_are_closed_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env_with(
        "slowloris",
        |_| {},
        |s| s["limits"] = json!({"headerReadTimeout": "1s", "handshakeTimeout": "1s"}),
    )
    .await;
    let addr = format!("127.0.0.1:{}", e.base.rsplit(':').next().unwrap());
    let before = e.app_hits.load(Ordering::SeqCst);
    // 20 connections trickle a request head one byte every 100 ms; 5 more send nothing.
    let mut slow = Vec::new();
    for i in 0..25 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            if i < 20 {
                s.write_all(b"GET /orders HTTP/1.1\r\nHost: users\r\n")
                    .await
                    .unwrap();
                for b in b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // The sidecar ends the connection: EOF or a reset, perhaps after a 408.
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut buf)).await;
            let text = String::from_utf8_lossy(&buf).into_owned();
            (start.elapsed(), text)
        }));
    }
    // Meanwhile a well-behaved caller is served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        e.get(&e.checkout(false), "/orders", None).await.status(),
        200
    );
    for h in slow {
        let (took, text) = h.await.unwrap();
        assert!(
            took < Duration::from_secs(5),
            "a slow connection was held for {took:?} (timeout 1s)"
        );
        assert!(!text.contains(" 200 "), "a slow request was served: {text}");
    }
    assert_eq!(
        e.app_hits.load(Ordering::SeqCst),
        before + 1,
        "only the well-behaved request reached the app"
    );
}

#[tokio::test]
async fn requests_beyond_the_upstream_connection_limit_wait_instead_of_failing() {
    let e = env_with(
        "upstream-cap",
        |p| {
            p["ports"][0]["rules"][1]["to"][0]["paths"]
                .as_array_mut()
                .unwrap()
                .push(json!("/slow"))
        },
        |s| s["limits"] = json!({"maxUpstreamConnections": 2}),
    )
    .await;
    let c = e.checkout(false);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{}/slow", e.base));
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut most = 0;
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        most = most.max(body["inFlight"].as_u64().unwrap());
    }
    assert!(most <= 2, "the app saw {most} requests at once (limit 2)");
}

/// The injector points kubelet probes at the admin port; the sidecar asks the app itself,
/// so probes work while every request through the inbound port is refused.
#[tokio::test]
async fn kubelet_probes_reach_the_app_through_the_admin_port_under_default_deny() {
    let dir = tempdir("probes");
    let pki = Pki::new(&dir);
    let (app, hits) = start_app().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let settings = dir.join("s.json");
    let s = json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {"certFile": dir.join("server.crt"), "keyFile": dir.join("server.key"), "clientCaFile": dir.join("ca.crt")},
        "appProbes": {
            "/app-health/app/readyz": {"http": {"port": app.port(), "path": "/healthz"}},
            "/app-health/app/livez": {"tcp": {"port": app.port()}},
            "/app-health/app/startupz": {"tcp": {"port": closed_port}},
        },
    });
    std::fs::write(&settings, s.to_string()).unwrap();
    let (_shared, bound) = apiward_sidecar::start(&settings).await.unwrap();
    let c = client(&pki, Some(&pki.client("shop", "checkout")), false);
    let r = c
        .get(format!(
            "https://localhost:{}/healthz",
            bound.inbound.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "no policy: the inbound port refuses");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let status = |p: &'static str| {
        let url = format!("http://{}{p}", bound.admin);
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/app-health/app/readyz").await, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the probe reached the app");
    assert_eq!(status("/app-health/app/livez").await, 200);
    assert_eq!(
        status("/app-health/app/startupz").await,
        503,
        "a closed port fails"
    );
    assert_eq!(status("/app-health/other/readyz").await, 404);
}

/// An idle keep-alive connection gives back its HTTP buffers (it is counted as parked) and
/// serves its next request on the same TLS session, whatever arrives: a whole request, a
/// request split around an idle gap (the bytes read before it are kept), or two pipelined
/// requests. Past the header-read timeout it is closed, as an unparked one would be.
#[tokio::test]
async fn idle_keep_alive_connections_park_and_serve_their_next_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env_with(
        "park",
        |_| {},
        |s| s["limits"] = json!({"parkIdleAfter": "20ms", "headerReadTimeout": "2s"}),
    )
    .await;
    let metrics = format!("{}/metrics", e.admin);
    let parked = || async {
        sample(
            &reqwest::get(&metrics).await.unwrap().text().await.unwrap(),
            "apiward_sidecar_parked_connections",
        )
    };
    let mut s = tls_connect(&e).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: users\r\nX-Test: park\r\n\r\n");
    let before = e.app_hits.load(Ordering::SeqCst);

    s.write_all(get("/users/1").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("\"id\":\"1\""),
        "{}",
        String::from_utf8_lossy(&body)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(parked().await, 1.0, "the idle connection is parked");

    // A request, then the first part of the next head, then an idle gap longer than
    // parkIdleAfter: the part read before parking is kept.
    let req = get("/users/2");
    let (a, b) = req.split_at(20);
    s.write_all(format!("{}{a}", get("/users/5")).as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("\"id\":\"5\""));
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("\"id\":\"2\""));

    // Two pipelined requests in one write: two answers, in order.
    s.write_all(format!("{}{}", get("/users/3"), get("/users/4")).as_bytes())
        .await
        .unwrap();
    for n in ["\"id\":\"3\"", "\"id\":\"4\""] {
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains(n), "{n}");
    }
    assert_eq!(e.app_hits.load(Ordering::SeqCst), before + 5);

    // A body-carrying request, then a GET, on the same connection.
    let post = "POST /orders HTTP/1.1\r\nHost: users\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n";
    s.write_all(post.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("\"bodyBytes\":9"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(get("/users/6").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));

    // Idle past headerReadTimeout: closed with a TLS close_notify, and no longer counted.
    let idle = Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the sidecar closes an idle connection")
        .unwrap();
    assert_eq!(n, 0, "nothing more was sent");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    assert_eq!(parked().await, 0.0);
}

/// A WebSocket over mTLS (where idle HTTP/1.1 connections park): the upgraded stream is
/// tunnelled, and a pause longer than the park delay does not end it.
#[tokio::test]
async fn websocket_over_tls_is_tunnelled_and_never_parked() {
    use tokio::io::AsyncWriteExt;
    let e = env_with("websocket-tls", streaming_rule, |s| {
        s["limits"] = json!({"parkIdleAfter": "10ms"})
    })
    .await;
    let mut s = tls_connect(&e).await;
    let ok = e.bearer(json!({"sub": "42", "scope": "stream"}));
    s.write_all(ws_handshake(Some(ok)).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    echo_frames(&mut s, Duration::from_millis(100)).await;
}

/// Over TLS (where connections park), the header-read timeout counts from when a
/// connection went idle, for a parked connection as for one that is not: a head trickled
/// after an idle pause is cut off on time, and a connection that waited before its first
/// request still gets the whole timeout for the next one.
#[tokio::test]
async fn header_read_timeout_counts_from_idle_over_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: users\r\n\r\n");
    let e = env_with(
        "park-timeouts",
        |_| {},
        |s| s["limits"] = json!({"headerReadTimeout": "1s"}),
    )
    .await;
    // Served, then idle 700 ms, then a head one byte per 100 ms: closed about 1 s after
    // the response, without an answer.
    let mut s = tls_connect(&e).await;
    s.write_all(get("/users/1").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = e.app_hits.load(Ordering::SeqCst);
    for b in get("/users/2").bytes() {
        if s.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(e.app_hits.load(Ordering::SeqCst), before);
    let closed = idle.elapsed();
    assert!(
        closed < Duration::from_millis(1600),
        "the trickled head was allowed {closed:?} after idle (timeout 1s)"
    );

    // No parking after requests here: hyper's own timer governs the idle time after the
    // first request, and it is the full timeout even though the first request came late.
    let e = env_with(
        "park-timeouts-late",
        |_| {},
        |s| s["limits"] = json!({"headerReadTimeout": "1s", "parkIdleAfter": "1h"}),
    )
    .await;
    let mut s = tls_connect(&e).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(get("/users/1").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(get("/users/2").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));
}
