//! OpenTelemetry export: with an OTLP endpoint the operator's spans reach a real OTLP/HTTP
//! receiver (here a small one on loopback, decoding the protobuf with the OTLP schema) as
//! service `apiward-operator`. One test per process: the subscriber is global.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// Accepts OTLP/HTTP posts; sends (path, content type, body) of each.
fn receiver() -> (String, mpsc::Receiver<(String, String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let (mut len, mut ctype) = (0usize, String::new());
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap_or((h, ""));
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "content-type" => ctype = v.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let _ = tx.send((path, ctype, body));
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                    .unwrap();
            }
        }
    });
    (url, rx)
}

#[test]
fn the_operators_spans_are_exported_over_otlp() {
    assert_eq!(
        apiward::telemetry::traces_url("http://collector:4318/"),
        "http://collector:4318/v1/traces"
    );
    let (url, posts) = receiver();
    let telemetry = apiward::telemetry::init("apiward-operator", Some(&url)).unwrap();

    // A real code path with a span: the injection webhook deciding a review.
    let opts = apiward::serve::webhook::WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: "apiward-system".into(),
        service: "apiward-webhook".into(),
        configuration: None,
        validating_configuration: None,
        sidecar: serde_json::from_value(serde_json::json!({
            "image": "sidecar:1", "controlUrl": "https://apiward:15012", "trustDomain": "cluster.local"})).unwrap(),
        cert_dir: None,
        injected: None,
    };
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "shop", "operation": "CREATE", "userInfo": {},
                    "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
                               "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}}}
    });
    let (_, result) = apiward::serve::webhook::review(review.to_string().as_bytes(), &opts);
    assert_eq!(result, "injected");
    drop(telemetry); // flushes the batch

    let (path, ctype, body) = posts
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("an OTLP export");
    assert_eq!(path, "/v1/traces");
    assert_eq!(ctype, "application/x-protobuf");
    let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
    let rs = &req.resource_spans[0];
    let service = rs
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|a| a.key == "service.name")
        .unwrap();
    assert_eq!(
        format!("{:?}", service.value.as_ref().unwrap().value),
        format!(
            "{:?}",
            Some(
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                    "apiward-operator".into()
                )
            )
        )
    );
    let span = rs
        .scope_spans
        .iter()
        .flat_map(|s| &s.spans)
        .find(|s| s.name == "admission_review")
        .expect("the webhook's span");
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == k)
            .map(|a| format!("{:?}", a.value.as_ref().unwrap().value))
    };
    assert!(
        attr("namespace").unwrap().contains("shop"),
        "{:?}",
        span.attributes
    );
    assert!(
        attr("result").unwrap().contains("injected"),
        "{:?}",
        span.attributes
    );
}
