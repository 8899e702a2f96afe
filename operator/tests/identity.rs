//! `apiward local serve` and `apiward local token` as a user runs them: the binary, a real
//! TLS listener, real HTTP, real CSRs.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn apiward(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(args)
        .output()
        .unwrap()
}

fn csr_for(uri: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn the_local_identity_endpoint_issues_and_refuses_over_https() {
    let dir = std::env::temp_dir().join(format!("apiward-local-id-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_apiward"))
            .args(["local", "serve", "--state-dir", state, "--listen", &listen])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let bundle = dir.join("trust-bundle.pem");
    let mut ready = false;
    for _ in 0..100 {
        if bundle.exists() && std::net::TcpStream::connect(&listen).is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "apiward local serve did not start");
    // Keys are private to their owner.
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca/tls.key", "token-signing.key"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }
    let token = |sa: &str, aud: &str| {
        let out = apiward(&[
            "local",
            "token",
            "--state-dir",
            state,
            "-n",
            "shop",
            "--service-account",
            sa,
            "--audience",
            aud,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    // The server's certificate is checked against the published bundle.
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&bundle).unwrap()).unwrap()])
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/v1/certificates");
    let post = |csr: String, token: String| {
        client
            .post(&url)
            .json(&serde_json::json!({"csr": csr, "token": token}))
            .send()
    };
    let me = "spiffe://cluster.local/ns/shop/sa/checkout";
    let r = post(csr_for(me), token("checkout", "apiward"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["spiffeId"], me);
    assert!(
        body["certificateChain"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert_eq!(
        body["trustBundle"].as_str().unwrap(),
        std::fs::read_to_string(&bundle).unwrap()
    );
    // Refusals: status and a reason code, never the token.
    let cases = [
        (
            csr_for(me),
            token("payments", "apiward"),
            403,
            "csr_identity_mismatch",
        ),
        (
            csr_for(me),
            token("checkout", "vault"),
            401,
            "token_wrong_audience",
        ),
        (
            "garbage".to_owned(),
            token("checkout", "apiward"),
            400,
            "csr_invalid",
        ),
    ];
    for (csr, tok, status, code) in cases {
        let r = post(csr, tok.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let text = r.text().await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], code, "{text}");
        assert!(!text.contains(&tok));
    }
    let r = client.post(&url).body("{\"csr\": 1}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // A restart keeps the same CA (the bundle sidecars already trust).
    let before = std::fs::read_to_string(&bundle).unwrap();
    drop(_server);
    let _again = Server(
        Command::new(env!("CARGO_BIN_EXE_apiward"))
            .args(["local", "serve", "--state-dir", state, "--listen", &listen])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read_to_string(&bundle).unwrap(), before);
}
