//! Mesh identity end to end: the operator's identity endpoint (local CA, local tokens) and
//! real sidecars that get their certificates from it, on loopback.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiward::identity::{AUDIENCE, Ca, LocalTokens};
use apiward_e2e::mesh::serve_app_conn;
use apiward_e2e::{Operator, now, start_operator, tempdir};
use common::mesh_client;
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator's identity endpoint on `port`, issuing certificates of `lifetime`.
async fn operator_on(ca: Ca, tokens: LocalTokens, port: u16, lifetime: Duration) -> Operator {
    start_operator(
        ca,
        tokens,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &["localhost"],
        lifetime,
    )
    .await
}

/// An app that answers with the principal the sidecar forwarded, counting requests.
async fn start_app() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_app_conn(tcp, h.clone()));
        }
    });
    (addr, hits)
}

/// Settings for a sidecar in front of `app` whose identity comes from the operator on
/// `operator_port`; only `shop/checkout` may call it, in Strict mode.
fn write_settings(
    dir: &Path,
    app: std::net::SocketAddr,
    operator_port: u16,
    ca_file: &Path,
) -> PathBuf {
    let s = json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "identity": {"url": format!("https://localhost:{operator_port}"), "tokenFile": dir.join("token"), "caFile": ca_file},
        "policy": {
            "apiVersion": "apiward.io/sidecar/v1alpha1",
            "version": "e2e-1",
            "workload": {"namespace": "shop", "name": "users-0", "serviceAccount": "users"},
            "trustDomain": "cluster.local",
            "ports": [{
                "port": app.port(), "policies": ["shop/users"], "mtls": "Strict", "mode": "Enforce",
                "rules": [{"policy": "shop/users", "name": "checkout-reads", "action": "Allow",
                           "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"]}],
                           "to": [{"methods": ["GET"], "paths": ["/**"]}]}]
            }]
        }
    });
    let path = dir.join("sidecar.json");
    std::fs::write(&path, s.to_string()).unwrap();
    path
}

/// The serial and SPIFFE ID of the certificate the sidecar presents to a new handshake.
async fn presented(port: u16, ca: &Ca) -> (String, String) {
    let r = mesh_client(ca, "checkout")
        .get(format!("https://127.0.0.1:{port}/orders"))
        .send()
        .await
        .unwrap();
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("the server's certificate")
        .to_vec();
    let spiffe = apiward_sidecar::tls::spiffe_id(&der.clone().into()).expect("a SPIFFE ID");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    (cert.raw_serial_as_string(), spiffe)
}

#[tokio::test]
async fn a_sidecar_gets_its_identity_and_serves_mtls_with_it() {
    let dir = tempdir("identity");
    let ca = Ca::generate("cluster.local", now()).unwrap();
    let tokens = LocalTokens::generate().unwrap();
    std::fs::write(
        dir.join("token"),
        tokens
            .mint("shop", "users", Some("users-0"), AUDIENCE, now(), 3600)
            .unwrap(),
    )
    .unwrap();
    let ca_file = dir.join("trust-bundle.pem");
    std::fs::write(&ca_file, ca.trust_bundle_pem()).unwrap();
    let (app, hits) = start_app().await;
    let operator_port = free_port();
    let settings = write_settings(&dir, app, operator_port, &ca_file);
    // The sidecar starts before the operator is reachable: not ready, no TLS.
    let (_shared, bound) = apiward_sidecar::start(&settings).await.unwrap();
    let ready = format!("http://{}/ready", bound.admin);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 503);
    let op = operator_on(ca, tokens, operator_port, Duration::from_secs(3600)).await;
    let client = mesh_client(&op.ca, "checkout");
    let url = format!("https://127.0.0.1:{}/orders", bound.inbound.port());
    assert!(
        client.get(&url).send().await.is_err(),
        "no certificate yet: no TLS"
    );
    let mut became_ready = false;
    for _ in 0..100 {
        if reqwest::get(&ready).await.unwrap().status() == 200 {
            became_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(became_ready, "the sidecar never became ready");
    assert_eq!(op.counters.issued.load(Ordering::Relaxed), 1);
    // The certificate it presents is its own SPIFFE ID, issued by the mesh CA.
    let (serial, spiffe) = presented(bound.inbound.port(), &op.ca).await;
    assert_eq!(spiffe, "spiffe://cluster.local/ns/shop/sa/users");
    // The sidecar reports the certificate it serves: serial and expiry.
    let dump: serde_json::Value = reqwest::get(format!("http://{}/config_dump", bound.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let strip = |s: &str| s.replace(':', "").trim_start_matches('0').to_lowercase();
    assert_eq!(
        strip(dump["identity"]["serial"].as_str().unwrap()),
        strip(&serial)
    );
    assert_eq!(dump["identity"]["spiffeId"], spiffe);
    assert!(dump["identity"]["notAfterUnix"].as_i64().unwrap() > now() + 3000);
    // checkout is allowed by SPIFFE ID; another service account is not.
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["principal"],
        "spiffe://cluster.local/ns/shop/sa/checkout"
    );
    let r = mesh_client(&op.ca, "recommendations")
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Only the two allowed requests (the certificate check above and this one) reached it.
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // A token for audience other than apiward would have been refused: the operator saw
    // exactly one good request.
    assert_eq!(op.counters.refused.load(Ordering::Relaxed), 0);
    let _ = op.tokens;
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let dir = tempdir("rotation");
    let ca = Ca::generate("cluster.local", now()).unwrap();
    let tokens = LocalTokens::generate().unwrap();
    std::fs::write(
        dir.join("token"),
        tokens
            .mint("shop", "users", None, AUDIENCE, now(), 3600)
            .unwrap(),
    )
    .unwrap();
    let ca_file = dir.join("trust-bundle.pem");
    std::fs::write(&ca_file, ca.trust_bundle_pem()).unwrap();
    let (app, _) = start_app().await;
    let operator_port = free_port();
    // Four-second certificates: renewed about every three seconds.
    let op = operator_on(ca, tokens, operator_port, Duration::from_secs(4)).await;
    let settings = write_settings(&dir, app, operator_port, &ca_file);
    let (_shared, bound) = apiward_sidecar::start(&settings).await.unwrap();
    let ready = format!("http://{}/ready", bound.admin);
    for _ in 0..100 {
        if reqwest::get(&ready).await.unwrap().status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("https://127.0.0.1:{}/orders", bound.inbound.port());
    let client = mesh_client(&op.ca, "checkout");
    let mut serials = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0, Vec::new());
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut i = 0u32;
    while std::time::Instant::now() < until {
        // Kept-alive connections and, every tenth request, a new connection.
        let c = if i.is_multiple_of(10) {
            mesh_client(&op.ca, "checkout")
        } else {
            client.clone()
        };
        match c.get(&url).send().await {
            Ok(r) if r.status() == 200 => ok += 1,
            Ok(r) => failed.push(format!("status {}", r.status())),
            Err(e) => failed.push(e.to_string()),
        }
        if i.is_multiple_of(25) {
            serials.insert(presented(bound.inbound.port(), &op.ca).await.0);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 200, "only {ok} requests ran");
    assert!(
        serials.len() >= 3,
        "the sidecar presented {} certificate(s) over 10 s of 4 s certificates",
        serials.len()
    );
    assert!(op.counters.issued.load(Ordering::Relaxed) >= 3);
}
