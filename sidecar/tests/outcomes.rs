//! Every request's outcome is recorded once, whichever stage ended it: refusals made after
//! the engine allowed a request (while its body streams, by the JSON-depth check, by the
//! app's absence or slowness, by the response filter) are denials with their own reason in
//! the metric, the decision log and the inventory, never "allowed".

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::env::*;
use serde_json::{Value, json};

/// The decision log, captured from the `apiward::decision` target.
fn decision_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("apiward::decision=info"))
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("one subscriber per test process");
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The decision-log line of request `rid`.
fn logged(rid: &str) -> Value {
    let log = decision_log().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["request_id"] == rid)
        .unwrap_or_else(|| panic!("no decision-log line for {rid}"))["fields"]
        .clone()
}

/// Asserts one request refused with `status` and `code` is a denial everywhere.
async fn assert_denial(e: &Env, rid: &str, path: &str, status: u16, code: &str) {
    let line = logged(rid);
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], code, "{line}");
    assert_eq!(line["status"], status, "{line}");
    let m = e.metrics().await;
    let counted = m.lines().find(|l| {
        l.starts_with("apiward_sidecar_requests_total{")
            && l.contains(&format!("reason=\"{code}\""))
    });
    let counted = counted.unwrap_or_else(|| panic!("{code} not counted:\n{m}"));
    assert!(counted.contains("decision=\"deny\""), "{counted}");
    assert!(
        counted.contains(&format!("status=\"{status}\"")),
        "{counted}"
    );
    let (entries, _) = e.shared.inventory.take();
    let row = entries
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("{path} not in the inventory: {entries:#?}"));
    assert_eq!((row.requests, row.denied), (1, 1), "{row:#?}");
    assert_eq!(
        row.unauthenticated, 0,
        "a refused request was not served: {row:#?}"
    );
}

fn rid(name: &str) -> String {
    format!("outcome-{name}")
}

#[tokio::test]
async fn refusals_after_the_decision_are_denials_in_metric_log_and_inventory() {
    decision_log();
    let e = env("outcomes", |p| {
        let rules = p["ports"][0]["rules"].as_array_mut().unwrap();
        rules.push(
            json!({"policy": POLICY, "name": "checkout-more", "action": "Allow",
            "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"]}],
            "to": [{"methods": ["GET", "POST"], "paths": ["/records/**", "/slow", "/stream"]}]}),
        );
        p["ports"][0]["limits"]["timeoutMs"] = json!(120);
        p["ports"][0]["response"]["onUnfilterable"] = json!("Refuse");
    })
    .await;
    let c = e.checkout(false);

    // The JSON-depth check (the body stage).
    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    let r = c
        .post(format!("{}/upload", e.base))
        .header("x-request-id", rid("deep"))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, "json_too_deep".into()));
    assert_denial(&e, &rid("deep"), "/upload", 400, "json_too_deep").await;

    // The app too slow for `requestLimits.timeout`.
    let r = c
        .get(format!("{}/slow", e.base))
        .header("x-request-id", rid("slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (504, "upstream_timeout".into()));
    assert_denial(&e, &rid("slow"), "/slow", 504, "upstream_timeout").await;

    // The response filter cannot read what it must filter.
    let r = c
        .get(format!("{}/records/xml", e.base))
        .header("x-request-id", rid("xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "response_not_filterable".into()));
    assert_denial(
        &e,
        &rid("xml"),
        "/records/xml",
        502,
        "response_not_filterable",
    )
    .await;
}

#[tokio::test]
async fn a_body_cut_off_while_streaming_is_a_denial() {
    decision_log();
    // No JSON-depth check: the body streams to the app and is cut off at the limit.
    let e = env("outcomes-stream", |p| {
        p["ports"][0]["limits"]
            .as_object_mut()
            .unwrap()
            .remove("maxJsonDepth");
    })
    .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 512])).collect();
    let r = e
        .checkout(false)
        .post(format!("{}/upload", e.base))
        .header("x-request-id", rid("stream"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util_stream(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (413, "body_too_large".into()));
    assert_denial(&e, &rid("stream"), "/upload", 413, "body_too_large").await;
}

#[tokio::test]
async fn an_app_that_is_not_there_is_a_denial() {
    decision_log();
    // The upstream is a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let e = env_with(
        "outcomes-unavailable",
        |_| {},
        move |s| s["inbound"]["upstream"] = json!(dead.to_string()),
    )
    .await;
    let r = e
        .checkout(false)
        .get(format!("{}/orders", e.base))
        .header("x-request-id", rid("gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (502, "upstream_unavailable".into()));
    assert_denial(&e, &rid("gone"), "/orders", 502, "upstream_unavailable").await;
}

#[tokio::test]
async fn an_authentication_refusal_is_recorded_once_with_its_reason() {
    decision_log();
    let e = env("outcomes-authn", |_| {}).await;
    let r = e
        .anon()
        .get(format!("{}/users/42", e.base))
        .header("x-request-id", rid("authn"))
        .header("authorization", "Bearer not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "token_malformed".into()));
    let line = logged(&rid("authn"));
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str()),
        (Some("deny"), Some("token_malformed"))
    );
    let m = e.metrics().await;
    let n: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("apiward_sidecar_requests_total{")
                && l.contains("reason=\"token_malformed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(n, 1.0, "counted once:\n{m}");
    let (entries, _) = e.shared.inventory.take();
    let row = entries
        .iter()
        .find(|r| r.path.starts_with("/users/"))
        .expect("in the inventory");
    assert_eq!(row.denied, 1);
}
