//! The operator against kube's tower-test mock API server: the real watchers list and
//! watch, the index compiles, the hub publishes, the status writer patches. Each test
//! says which calls it expects; any other call fails it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiward_policy::report::{REPORT_API_VERSION, Report};
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::metrics::OperatorMetrics;
use super::status::StatusWriter;
use crate::identity::SpiffeId;
use crate::index::ClusterIndex;
use crate::serve::config::ConfigHub;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

const VALID: &str = r#"{
  "apiVersion": "apiward.io/v1alpha1", "kind": "ApiPolicy",
  "metadata": {"name": "payments", "namespace": "shop", "generation": 1, "uid": "u-1", "resourceVersion": "10"},
  "spec": {
    "targetRef": {"selector": {"matchLabels": {"app": "payments"}}, "ports": [8443]},
    "rules": [{"name": "checkout-charges", "from": [{"serviceAccounts": ["shop/checkout"]}],
               "to": [{"methods": ["POST"], "paths": ["/charges"]}]}]
  }
}"#;

fn policy(generation: i64, path: &str) -> Value {
    let mut p: Value = serde_json::from_str(VALID).unwrap();
    p["metadata"]["generation"] = generation.into();
    p["spec"]["rules"][0]["to"][0]["paths"][0] = path.into();
    p
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "payments"}, "resourceVersion": "5"},
        "spec": {"serviceAccountName": "payments", "containers": [{"name": "app", "ports": [{"containerPort": 8443}]}]},
        "status": {"phase": "Running"}
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items})
}

fn respond(send: Send, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap(),
    );
}

/// What the mock API server saw that the test asserts on.
#[derive(Debug)]
enum Seen {
    /// A status patch: its query and body.
    StatusPatch(String, Value),
    /// An Event.
    Event(Value),
}

/// Serves the calls an operator makes at start: one list and then watches (held open,
/// or answered once with `policy_watch` events) per kind; status patches and Events are
/// answered and passed on to the test. Anything else fails the test.
fn api_server(
    mut handle: Handle,
    policies: Vec<Value>,
    policy_watch: Vec<Value>,
) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut policy_watch = Some(policy_watch);
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or("").to_owned();
            let watching = query.contains("watch=true");
            match (req.method().clone(), path.as_str()) {
                (Method::GET, "/apis/apiward.io/v1alpha1/apipolicies") if watching => {
                    match policy_watch.take().filter(|w| !w.is_empty()) {
                        Some(events) => {
                            let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
                            send.send_response(
                                Response::builder()
                                    .body(Body::from(lines.into_bytes()))
                                    .unwrap(),
                            );
                        }
                        None => held.push(send),
                    }
                }
                (Method::GET, "/apis/apiward.io/v1alpha1/apipolicies") => {
                    respond(send, 200, &list("ApiPolicyList", policies.clone()))
                }
                (
                    Method::GET,
                    "/api/v1/pods" | "/api/v1/secrets" | "/api/v1/configmaps" | "/api/v1/services",
                ) if watching => held.push(send),
                (Method::GET, "/api/v1/pods") => respond(
                    send,
                    200,
                    &list("PodList", vec![pod("payments-0"), pod("payments-1")]),
                ),
                (Method::GET, "/api/v1/secrets") => respond(send, 200, &list("SecretList", vec![])),
                (Method::GET, "/api/v1/configmaps") => {
                    respond(send, 200, &list("ConfigMapList", vec![]))
                }
                (Method::GET, "/api/v1/services") => {
                    respond(send, 200, &list("ServiceList", vec![]))
                }
                (
                    Method::PATCH,
                    "/apis/apiward.io/v1alpha1/namespaces/shop/apipolicies/payments/status",
                ) => {
                    let body: Value =
                        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                            .unwrap();
                    let mut answer: Value = serde_json::from_str(VALID).unwrap();
                    answer["status"] = body["status"].clone();
                    respond(send, 200, &answer);
                    let _ = tx.send(Seen::StatusPatch(query, body));
                }
                (Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events") => {
                    let body: Value =
                        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                            .unwrap();
                    respond(send, 201, &body);
                    let _ = tx.send(Seen::Event(body));
                }
                (m, p) => panic!("unexpected API call {m} {p}?{query}"),
            }
        }
        drop(held);
    });
    rx
}

struct Operator {
    index: Arc<Mutex<ClusterIndex>>,
    hub: Arc<ConfigHub>,
    metrics: Arc<OperatorMetrics>,
    writer: StatusWriter,
    changed: watch::Receiver<u64>,
}

fn start(client: kube::Client) -> Operator {
    let index = Arc::new(Mutex::new(ClusterIndex::new("cluster.local")));
    let hub = Arc::new(ConfigHub::new("cluster.local"));
    let metrics = Arc::new(OperatorMetrics::default());
    let (tx, changed) = watch::channel(0);
    tokio::spawn(super::sources::run(
        client.clone(),
        super::sources::watches(&client),
        index.clone(),
        hub.clone(),
        tx,
        metrics.clone(),
    ));
    Operator {
        index,
        hub,
        metrics,
        writer: StatusWriter::new(client, Duration::ZERO, true),
        changed,
    }
}

impl Operator {
    async fn listed(&self) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !self
                .metrics
                .ready
                .load(std::sync::atomic::Ordering::Acquire)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the watches list within 10 s");
    }
}

async fn next_patch(seen: &mut mpsc::UnboundedReceiver<Seen>) -> (String, Value) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("a status patch")
        {
            Some(Seen::StatusPatch(q, b)) => return (q, b),
            Some(Seen::Event(_)) => continue,
            None => panic!("the mock API server stopped"),
        }
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn mock() -> (kube::Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "apiward-system"), handle)
}

fn ack(hub: &ConfigHub, pod: &str) {
    let caller = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: "payments".into(),
    };
    let report = Report {
        api_version: REPORT_API_VERSION.into(),
        workload: apiward_policy::config::Workload {
            namespace: "shop".into(),
            name: pod.into(),
            service_account: "payments".into(),
        },
        config_version: hub.version(&format!("shop/{pod}")),
        rejected_config: None,
        decisions: vec![],
        inventory: vec![],
        inventory_overflow: 0,
        certificate: None,
        quota_store: None,
        ignored_fields: vec![],
    };
    hub.report(&caller, report).unwrap();
}

#[tokio::test]
async fn a_new_policy_is_patched_accepted_and_acks_move_programmed_to_2_of_2() {
    let (client, handle) = mock();
    let mut seen = api_server(handle, vec![serde_json::from_str(VALID).unwrap()], vec![]);
    let mut op = start(client);
    op.listed().await;
    // Both pods have a config to stream.
    assert!(op.hub.version("shop/payments-0").is_some());
    assert!(op.hub.version("shop/payments-1").is_some());

    assert_eq!(op.writer.round(&op.index, &op.hub).await, 1);
    let (query, body) = next_patch(&mut seen).await;
    assert!(
        query.contains("fieldManager=apiward-operator") && query.contains("force=true"),
        "server-side apply: {query}"
    );
    assert_eq!(
        (body["apiVersion"].as_str(), body["kind"].as_str()),
        (Some("apiward.io/v1alpha1"), Some("ApiPolicy"))
    );
    let status = &body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(condition(status, "Accepted")["status"], "True");
    assert_eq!(condition(status, "Accepted")["observedGeneration"], 1);
    let programmed = condition(status, "Programmed");
    assert_eq!(
        (programmed["status"].as_str(), programmed["reason"].as_str()),
        (Some("False"), Some("Pending"))
    );
    assert!(
        programmed["message"].as_str().unwrap().contains("0 of 2"),
        "{programmed}"
    );
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(
        (
            status["targets"]["pods"].as_u64(),
            status["targets"]["acked"].as_u64()
        ),
        (Some(2), Some(0))
    );

    // Nothing changed: no second write.
    assert_eq!(op.writer.round(&op.index, &op.hub).await, 0);

    ack(&op.hub, "payments-0");
    op.writer.round(&op.index, &op.hub).await;
    let (_, body) = next_patch(&mut seen).await;
    assert!(
        condition(&body["status"], "Programmed")["message"]
            .as_str()
            .unwrap()
            .contains("1 of 2")
    );

    ack(&op.hub, "payments-1");
    op.writer.round(&op.index, &op.hub).await;
    let (_, body) = next_patch(&mut seen).await;
    let programmed = condition(&body["status"], "Programmed");
    assert_eq!(
        (programmed["status"].as_str(), programmed["reason"].as_str()),
        (Some("True"), Some("AllSidecarsAcked"))
    );
    assert!(programmed["message"].as_str().unwrap().contains("2 of 2"));
    assert_eq!(condition(&body["status"], "Ready")["status"], "True");
    assert_eq!(body["status"]["targets"]["acked"], 2);
}

#[tokio::test]
async fn an_invalid_generation_is_patched_accepted_false_with_the_field_and_changes_no_config() {
    let (client, handle) = mock();
    // The list has generation 1 (valid); the watch then delivers generation 2 with a
    // path template the engine refuses.
    let modified = json!({"type": "MODIFIED", "object": policy(2, "/charges/{id")});
    let mut seen = api_server(handle, vec![policy(1, "/charges")], vec![modified]);
    let mut op = start(client);
    op.listed().await;
    let versions = |hub: &ConfigHub| {
        [
            hub.version("shop/payments-0"),
            hub.version("shop/payments-1"),
        ]
    };
    let before = versions(&op.hub);
    assert!(
        before.iter().all(Option::is_some),
        "generation 1 compiled: {before:?}"
    );
    // Wait for generation 2 to arrive through the watch.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let results = op.index.lock().unwrap().policy_results();
            if results["shop/payments"].0 == Some(2) {
                break;
            }
            drop(results);
            let _ = op.changed.changed().await;
        }
    })
    .await
    .expect("generation 2 is seen");

    op.writer.round(&op.index, &op.hub).await;
    let (_, body) = next_patch(&mut seen).await;
    let status = &body["status"];
    assert_eq!(status["observedGeneration"], 2);
    let accepted = condition(status, "Accepted");
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0].to[0].paths[0]"),
        "names the field: {message}"
    );
    assert!(message.contains("generation 1 stays in force"), "{message}");
    assert_eq!(condition(status, "Ready")["status"], "False");
    // Nothing half-applied: the sidecars keep generation 1's config.
    assert_eq!(versions(&op.hub), before);

    // The rejection is also an Event on the policy.
    let event = loop {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("an Event")
        {
            Some(Seen::Event(e)) => break e,
            Some(Seen::StatusPatch(..)) => continue,
            None => panic!("the mock API server stopped"),
        }
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "Invalid");
    assert_eq!(event["regarding"]["name"], "payments");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].to[0].paths[0]")
    );
}
