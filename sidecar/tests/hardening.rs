//! The classes of bypass an adversarial suite found in the data plane, each with variants of
//! our own: raw bytes where the class is about framing, HTTP/1.1 and HTTP/2 where both
//! apply. A real sidecar on loopback, real TLS, a real app that echoes what it received.

mod common;

use std::time::{Duration, Instant};

use common::env::*;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

/// The test policy plus: checkout may GET/POST `/records/**`, `/echo/**` and `/ws`; anonymous callers
/// may GET/POST `/public/**`; any workload of namespace `shop` may GET `/ns-only`.
fn more_rules(p: &mut Value) {
    let rules = p["ports"][0]["rules"].as_array_mut().unwrap();
    rules.push(
        json!({"policy": "shop/users-api", "name": "checkout-records", "action": "Allow",
        "from": [{"principals": [CHECKOUT]}],
        "to": [{"methods": ["GET", "POST"], "paths": ["/records/**", "/echo/**", "/ws"]}]}),
    );
    rules.push(
        json!({"policy": "shop/users-api", "name": "public", "action": "Allow",
        "from": [{"unauthenticated": true}],
        "to": [{"methods": ["GET", "POST"], "paths": ["/public/**", "/ws"]}]}),
    );
    rules.push(
        json!({"policy": "shop/users-api", "name": "shop-namespace", "action": "Allow",
        "from": [{"namespaces": ["shop"]}],
        "to": [{"methods": ["GET"], "paths": ["/ns-only"]}]}),
    );
}

fn port_of(e: &Env) -> String {
    format!("127.0.0.1:{}", e.base.rsplit(':').next().unwrap())
}

/// One response read from a raw stream: status, head (lower case) and body.
async fn read_one(s: &mut (impl AsyncRead + Unpin)) -> Option<(u16, String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if len > 0 {
        s.read_exact(&mut body).await.ok()?;
    }
    Some((status, head, body))
}

async fn send(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    req: &str,
) -> Option<(u16, String, Vec<u8>)> {
    s.write_all(req.as_bytes()).await.ok()?;
    read_one(s).await
}

fn code_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).unwrap_or(Value::Null)["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Whether the peer closes the stream (EOF or reset) within `within`.
async fn closes_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut b = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a GOAWAY or an error frame: keep reading
            Err(_) => return false,
        }
    }
}

// ---- 1. protocol upgrades ------------------------------------------------------------

/// An `Upgrade` other than a WebSocket handshake is removed, so the request is served as
/// plain HTTP/1.1; an app that switches protocols anyway gets no tunnel (502, closed), and
/// the connection never carries unchecked requests. The app's `/ws` answers 101 to anything.
#[tokio::test]
async fn only_websocket_handshakes_are_tunnelled_every_other_upgrade_is_stripped() {
    let e = env("hard-upgrade", more_rules).await;
    let variants = [
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n",
        "Upgrade: h2c\r\nConnection: Upgrade\r\n",
        "Upgrade: websocket\r\nConnection: Upgrade\r\n", // no key, no version
        "Upgrade: websocket, h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Upgrade: TLS/1.2\r\nConnection: Upgrade\r\n",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ];
    for (i, extra) in variants.iter().enumerate() {
        for tls in [false, true] {
            let req = format!("GET /ws HTTP/1.1\r\nHost: users\r\n{extra}\r\n");
            let (status, head, body) = if tls {
                let mut s = tls_connect(&e).await;
                let r = send(&mut s, &req).await.expect("an answer");
                // The connection is closed: nothing after it can reach the app.
                assert!(
                    closes_within(&mut s, Duration::from_secs(3)).await,
                    "variant {i} (tls)"
                );
                r
            } else {
                let mut s = tokio::net::TcpStream::connect(port_of(&e)).await.unwrap();
                let r = send(&mut s, &req).await.expect("an answer");
                assert!(
                    closes_within(&mut s, Duration::from_secs(3)).await,
                    "variant {i}"
                );
                r
            };
            assert_eq!(status, 502, "variant {i} (tls {tls}): {head}");
            assert_eq!(code_of(&body), "upstream_protocol_switch", "variant {i}");
        }
    }
    // A request with a stripped Upgrade to an ordinary endpoint is served normally, and
    // the app never sees the Upgrade or HTTP2-Settings headers.
    let mut s = tokio::net::TcpStream::connect(port_of(&e)).await.unwrap();
    let (status, _, body) = send(
        &mut s,
        "GET /public/a HTTP/1.1\r\nHost: users\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&body).unwrap();
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(
            seen["headers"].get(h).is_none(),
            "{h} reached the app: {seen}"
        );
    }
    // The same connection's next request is decided by the policy (no tunnel).
    let (status, _, _) = send(&mut s, "GET /admin HTTP/1.1\r\nHost: users\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status, 403);
    // A real WebSocket handshake is still tunnelled.
    let mut s = tokio::net::TcpStream::connect(port_of(&e)).await.unwrap();
    s.write_all(ws_handshake(None).as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    echo_frames(&mut s, Duration::ZERO).await;
}

// ---- 2. tokens and duplicate credentials ------------------------------------------------

#[tokio::test]
async fn tokens_need_iss_and_aud_no_crit_and_one_credential_of_each_kind() {
    let e = env("hard-jwt", |_| {}).await;
    let own = json!({"sub": "42", "scope": "profile"});
    let without = |keys: &[&str]| {
        let mut c = claims(own.clone());
        for k in keys {
            c.as_object_mut().unwrap().remove(*k);
        }
        format!("Bearer {}", e.signer.token(c))
    };
    let crit = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let t = e
            .signer
            .token_with(claims(own.clone()), |h| h.crit = Some(names));
        format!("Bearer {t}")
    };
    let wrong_aud = format!(
        "Bearer {}",
        e.signer.token(claims(
            json!({"sub": "42", "scope": "profile", "aud": ["orders"]})
        ))
    );
    let cases = [
        (without(&["iss"]), 401, "token_missing_claim"),
        (without(&["aud"]), 401, "token_missing_claim"),
        (without(&["iss", "aud"]), 401, "token_missing_claim"),
        (crit(&["exp"]), 401, "token_crit_unsupported"),
        (crit(&["b64"]), 401, "token_crit_unsupported"),
        (wrong_aud, 401, "token_wrong_audience"),
        (e.bearer(own.clone()), 200, ""),
    ];
    for h2 in [false, true] {
        let c = client(&e.pki, None, h2);
        for (auth, status, code) in &cases {
            let r = e.get(&c, "/users/42", Some(auth)).await;
            let (s, got) = error_code(r).await;
            assert_eq!((s, got.as_str()), (*status, *code), "h2 {h2}");
        }
        // Two Authorization headers, both valid or one not: 400, never "first wins".
        let good = e.bearer(own.clone());
        let other = e.bearer(json!({"sub": "43", "scope": "profile"}));
        for pair in [[&good, &other], [&good, &good], [&other, &good]] {
            let r = c
                .get(format!("{}/users/42", e.base))
                .header("authorization", pair[0].as_str())
                .header("authorization", pair[1].as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(error_code(r).await, (400, "credentials_ambiguous".into()));
        }
        // Two values of the API-key header.
        let r = c
            .get(format!("{}/catalog/items", e.base))
            .header("x-api-key", "key-acme-123")
            .header("x-api-key", "key-globex-456")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, (400, "credentials_ambiguous".into()));
    }
    // Raw HTTP/1.1: the same, split over two header lines with different casing.
    let mut s = tls_connect(&e).await;
    let good = e.bearer(own.clone());
    let req = format!(
        "GET /users/42 HTTP/1.1\r\nHost: users\r\nAuthorization: {good}\r\nauthorization: {good}\r\n\r\n"
    );
    let (status, _, body) = send(&mut s, &req).await.unwrap();
    assert_eq!(
        (status, code_of(&body).as_str()),
        (400, "credentials_ambiguous")
    );
}

// ---- 4. connection phases with deadlines --------------------------------------------------

fn short_deadlines(s: &mut Value) {
    s["limits"] =
        json!({"firstRequestTimeout": "300ms", "idleTimeout": "400ms", "handshakeTimeout": "2s"});
}

#[tokio::test]
async fn every_connection_phase_has_a_deadline() {
    let e = env_with("hard-deadlines", more_rules, short_deadlines).await;
    let within = Duration::from_secs(2);
    // Plaintext: a lone byte, the preface without SETTINGS, half a request line.
    for stall in [
        &b"P"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"PRI * HTTP/2.0",
        b"GET /pub",
    ] {
        let mut s = tokio::net::TcpStream::connect(port_of(&e)).await.unwrap();
        s.write_all(stall).await.unwrap();
        let t = Instant::now();
        assert!(
            closes_within(&mut s, within).await,
            "{:?} stayed open",
            String::from_utf8_lossy(stall)
        );
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "closed too early"
        );
    }
    // TLS with ALPN h2 that never sends the preface; and h2 that sends it but no request.
    let id = e.pki.client("shop", "checkout");
    let mut s = tls_connect_as(&e, &id, b"h2").await.unwrap();
    assert!(
        closes_within(&mut s, within).await,
        "h2 without a preface stayed open"
    );
    let mut s = tls_connect_as(&e, &id, b"h2").await.unwrap();
    s.write_all(common::env::H2_PREFACE_AND_SETTINGS)
        .await
        .unwrap();
    assert!(
        closes_within(&mut s, within).await,
        "h2 without a request stayed open"
    );
    // TLS HTTP/1.1 that never sends a head.
    let mut s = tls_connect(&e).await;
    assert!(
        closes_within(&mut s, within).await,
        "h1 without a request stayed open"
    );
    // An HTTP/2 connection that served a request and then idles gets GOAWAY and closes.
    let tls = tls_connect_as(&e, &id, b"h2").await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("https://localhost/records/a")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "closed before idleTimeout"
    );
    let m = e.metrics().await;
    assert!(
        m.contains("first_request_timeout"),
        "counted by reason:\n{m}"
    );
}

/// At `maxConnections`, a connection that has sent nothing gives way to a new caller: a
/// client holding every slot with silent sockets cannot starve one that sends requests.
#[tokio::test]
async fn silent_connections_make_room_for_callers_at_the_connection_limit() {
    let e = env_with("hard-reclaim", more_rules, |s| {
        s["limits"] = json!({"maxConnections": 8, "firstRequestTimeout": "30s"});
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(port_of(&e)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Each caller keeps its connection: each needs a silent one to give way.
    let mut callers = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(port_of(&e)).await.unwrap();
        let (status, _, _) = send(&mut s, "GET /public/a HTTP/1.1\r\nHost: users\r\n\r\n")
            .await
            .unwrap_or_else(|| panic!("round {round}: starved"));
        assert_eq!(status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round {round}: {:?}",
            t.elapsed()
        );
        callers.push(s);
    }
    // The callers' connections were not reclaimed for one another: they still serve.
    for s in &mut callers {
        let (status, _, _) = send(s, "GET /public/b HTTP/1.1\r\nHost: users\r\n\r\n")
            .await
            .expect("a caller's connection survived");
        assert_eq!(status, 200);
    }
    let m = e.metrics().await;
    let reclaimed = sample(&m, "apiward_sidecar_connections_reclaimed_total");
    assert!(reclaimed >= 3.0, "reclaimed {reclaimed}:\n{m}");
}

// ---- 5. request checks mean the same on HTTP/1.1 and HTTP/2 -------------------------------

#[tokio::test]
async fn request_checks_are_the_same_on_both_protocols_with_and_without_length() {
    let e = env("hard-checks", |_| {}).await;
    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    for h2 in [false, true] {
        let c = e.checkout(h2);
        let url = format!("{}/upload", e.base);
        let stream = |b: &str| {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b.as_bytes().to_vec())];
            reqwest::Body::wrap_stream(futures_util_stream(chunks))
        };
        // Content type: with a length, and streamed (no content-length on HTTP/2).
        for body in [reqwest::Body::from("a=1"), stream("a=1")] {
            let r = c
                .post(&url)
                .header("content-type", "text/plain")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_code(r).await,
                (415, "unsupported_content_type".into()),
                "h2 {h2}"
            );
        }
        // A body with no content type at all is refused too.
        let r = c.post(&url).body(stream("a=1")).send().await.unwrap();
        assert_eq!(error_code(r).await.0, 415, "h2 {h2}");
        // JSON depth and body size, streamed.
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(stream(&deep))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(r).await,
            (400, "json_too_deep".into()),
            "h2 {h2}"
        );
        let big = "x".repeat(5_000);
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(stream(&format!("\"{big}\"")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "h2 {h2}");
        // A compressed body cannot be checked: refused.
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(stream("{}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(r).await,
            (415, "compressed_body_unsupported".into()),
            "h2 {h2}"
        );
        // And a good one passes on both.
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(stream("{\"a\":1}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "h2 {h2}");
    }
}

// ---- 6. the app sees the path the policy decided on ----------------------------------------

#[tokio::test]
async fn the_app_gets_the_normalized_path_and_ambiguous_forms_are_refused() {
    let e = env("hard-paths", more_rules).await;
    // Path parameters around dot segments: decided on (and forwarded as) the resolved path.
    for (raw, status, app_path) in [
        ("/records/..;/admin/users", 403, None),
        ("/records/..;x=1/admin", 403, None),
        ("/records/x/..;/..;/admin", 403, None),
        // Resolved to a path checkout may call: decided on it and forwarded as it.
        ("/records/..;/echo/42", 200, Some("/echo/42")),
        ("/echo/a;jsessionid=1/b", 200, Some("/echo/a/b")),
        ("/echo/a/./b//c", 200, Some("/echo/a/b/c")),
        ("/echo/x/..;/%61", 200, Some("/echo/a")),
    ] {
        for tls in [true] {
            let _ = tls;
            let mut s = tls_connect(&e).await;
            let (got, _, body) = send(
                &mut s,
                &format!("GET {raw} HTTP/1.1\r\nHost: users\r\n\r\n"),
            )
            .await
            .unwrap();
            assert_eq!(got, status, "{raw}");
            if let Some(p) = app_path {
                let seen: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(seen["path"], p, "{raw}: the app saw another path");
            }
        }
    }
    // Forms backends read differently are refused, on both protocols.
    let refused = [
        "/records/%c0%ae%c0%ae/users/42",
        "/records/a%c0%afb",
        "/records/%ef%bc%8f..%ef%bc%8fusers",
        "/records/%ef%bc%8e%ef%bc%8e/x",
        "/records/admin.",
        "/records/admin%20",
        "/records/x%e2%88%95y",
    ];
    for raw in refused {
        let mut s = tls_connect(&e).await;
        let (got, _, body) = send(
            &mut s,
            &format!("GET {raw} HTTP/1.1\r\nHost: users\r\n\r\n"),
        )
        .await
        .unwrap();
        assert_eq!(
            (got, code_of(&body).as_str()),
            (400, "invalid_path"),
            "{raw}"
        );
        let r = e.get(&e.checkout(true), raw, None).await;
        assert_eq!(
            error_code(r).await,
            (400, "invalid_path".into()),
            "{raw} over HTTP/2"
        );
    }
}

// ---- 7. identities keep their trust domain ------------------------------------------------

#[tokio::test]
async fn identities_of_another_trust_domain_or_with_several_uris_match_nothing() {
    let e = env("hard-identity", more_rules).await;
    let as_id = |id: Identity| client(&e.pki, Some(&id), false);
    // The same namespace in another trust domain, signed by the trusted CA.
    let evil = as_id(
        e.pki
            .client_with_uris(&["spiffe://evil.example/ns/shop/sa/checkout"]),
    );
    let r = e.get(&evil, "/ns-only", None).await;
    assert_eq!(
        error_code(r).await.0,
        403,
        "a foreign trust domain matched namespaces: [shop]"
    );
    let r = e.get(&evil, "/records/a", None).await;
    assert_eq!(r.status(), 403);
    // Trailing path parts or a different shape are not an identity of namespace shop.
    let odd = as_id(
        e.pki
            .client_with_uris(&["spiffe://cluster.local/ns/shop/sa/x/extra"]),
    );
    assert_eq!(e.get(&odd, "/ns-only", None).await.status(), 403);
    // Ours matches.
    let ours = as_id(e.pki.client("shop", "reports"));
    assert_eq!(e.get(&ours, "/ns-only", None).await.status(), 200);
    // Two URI SANs (an X.509-SVID has exactly one), or a non-SPIFFE one: refused at the
    // connection, before any request.
    for uris in [
        &[CHECKOUT, "spiffe://evil.example/ns/ops/sa/x"][..],
        &["spiffe://evil.example/ns/ops/sa/x", CHECKOUT][..],
        &["https://checkout.shop/"][..],
    ] {
        let c = as_id(e.pki.client_with_uris(uris));
        let r = c.get(format!("{}/records/a", e.base)).send().await;
        assert!(
            r.is_err() || r.unwrap().status() != 200,
            "{uris:?} was served"
        );
    }
    let m = e.metrics().await;
    assert!(m.contains("peer_identity_invalid"), "{m}");
}

// ---- 8. headers frameworks read as a path, a method or an identity ------------------------

#[tokio::test]
async fn path_method_and_identity_smuggling_headers_never_reach_the_app() {
    let e = env("hard-headers", more_rules).await;
    for h2 in [false, true] {
        let c = e.checkout(h2);
        for (name, value) in [
            ("x-original-url", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("x-original-uri", "/admin"),
        ] {
            let r = c
                .get(format!("{}/echo/a", e.base))
                .header(name, value)
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_code(r).await,
                (400, "path_override".into()),
                "{name} h2 {h2}"
            );
        }
        for q in [
            "_method=DELETE",
            "a=1&_METHOD=PUT",
            "%5Fmethod=DELETE",
            "x-http-method-override=DELETE",
        ] {
            let r = c
                .get(format!("{}/echo/a?{q}", e.base))
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_code(r).await,
                (400, "method_override".into()),
                "{q} h2 {h2}"
            );
        }
        // Underscore spellings of what the sidecar sets are removed; others pass.
        let r = c
            .get(format!("{}/echo/a", e.base))
            .header("x_user_id", "admin")
            .header("x_forwarded_for", "10.0.0.1")
            .header("x_http_method_override", "DELETE")
            .header("x_custom", "kept")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen: Value = r.json().await.unwrap();
        for h in ["x_user_id", "x_forwarded_for", "x_http_method_override"] {
            assert!(
                seen["headers"].get(h).is_none(),
                "{h} reached the app (h2 {h2}): {seen}"
            );
        }
        assert_eq!(seen["headers"]["x_custom"], "kept", "h2 {h2}: {seen}");
    }
}

// ---- 9. response filtering without side doors ----------------------------------------------

fn filtering(on_unfilterable: &'static str) -> impl FnOnce(&mut Value) {
    move |p: &mut Value| {
        more_rules(p);
        p["ports"][0]["response"]["removeFields"] = json!(["/passwordHash", "/**/passwordHash"]);
        p["ports"][0]["response"]["onUnfilterable"] = json!(on_unfilterable);
    }
}

#[tokio::test]
async fn secrets_are_removed_at_any_depth_and_in_any_form_or_the_response_is_refused() {
    let e = env("hard-filter", filtering("Refuse")).await;
    for h2 in [false, true] {
        let c = e.checkout(h2);
        // JSON, text/plain and untyped bodies holding the same record: filtered at every depth.
        for kind in ["nested", "text", "untyped"] {
            let r = c
                .get(format!("{}/records/{kind}", e.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{kind}");
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("argon2id"),
                "{kind} leaked (h2 {h2}): {body}"
            );
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["profile"]["name"], "Ada");
        }
        // XML and a compressed body cannot be read: refused.
        for kind in ["xml", "gzip"] {
            let r = c
                .get(format!("{}/records/{kind}", e.base))
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_code(r).await,
                (502, "response_not_filterable".into()),
                "{kind}"
            );
        }
    }
    // With Pass, what cannot be read goes through as it is (the user's choice).
    let e = env("hard-filter-pass", filtering("Pass")).await;
    let r = e
        .checkout(false)
        .get(format!("{}/records/xml", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<user>"));
    let r = e
        .checkout(false)
        .get(format!("{}/records/text", e.base))
        .send()
        .await
        .unwrap();
    assert!(
        !r.text().await.unwrap().contains("argon2id"),
        "text that is JSON is filtered with Pass too"
    );
}

// ---- refusals made while forwarding are denials -----------------------------------------

/// A request refused after the decision (while its body streams, by the JSON-depth check, by
/// the response filter) is counted as a denial with its own reason, not as `allowed`.
#[tokio::test]
async fn refusals_made_while_forwarding_are_counted_as_denials_with_their_reason() {
    let e = env("hard-forward-refusals", filtering("Refuse")).await;
    let c = e.checkout(false);
    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    let r = c
        .post(format!("{}/upload", e.base))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(format!("{}/records/xml", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let m = e.metrics().await;
    for reason in ["json_too_deep", "response_not_filterable"] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("apiward_sidecar_requests_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("{reason} not counted:\n{m}"));
        assert!(line.contains("decision=\"deny\""), "{line}");
    }
    assert!(
        !m.lines()
            .any(|l| l.starts_with("apiward_sidecar_requests_total")
                && l.contains("decision=\"allow\"")
                && (l.contains("status=\"400\"") || l.contains("status=\"502\""))),
        "a refusal was counted as allowed:\n{m}"
    );
}
