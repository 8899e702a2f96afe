//! The injection webhook over real HTTPS (its certificate signed by the mesh CA, verified
//! by the client as the API server would with `caBundle`), with AdmissionReview JSON.

use super::*;

const NS: &str = "apiward-system";

fn template() -> SidecarTemplate {
    serde_json::from_value(json!({
        "image": "ghcr.io/apiward/apiward-sidecar:test",
        "initImage": "ghcr.io/apiward/apiward-init:test",
        "controlUrl": "https://apiward.apiward-system.svc:15012",
        "trustDomain": "cluster.local",
    }))
    .unwrap()
}

fn app_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "orders-7d9f-", "namespace": "shop", "labels": {"app": "orders"}},
        "spec": {
            "serviceAccountName": "orders",
            "containers": [{
                "name": "app", "image": "shop/orders:1",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }
    })
}

fn review_of(pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

struct Server {
    client: reqwest::Client,
    url: String,
    metrics: Arc<OperatorMetrics>,
    addr: std::net::SocketAddr,
}

async fn server() -> Server {
    let ca = Arc::new(Ca::generate("cluster.local", now_unix()).unwrap());
    let tls = tls(ca.clone(), names("apiward-webhook", NS)).unwrap();
    server_with(tls, ca.trust_bundle_pem()).await
}

/// The webhook on loopback with `tls`; the client trusts `ca_pem`, as the API server
/// trusts `caBundle`.
async fn server_with(tls: Arc<rustls::ServerConfig>, ca_pem: &str) -> Server {
    let names = names("apiward-webhook", NS);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(OperatorMetrics::default());
    let opts = WebhookOptions {
        listen: addr,
        namespace: NS.into(),
        service: "apiward-webhook".into(),
        configuration: None,
        validating_configuration: None,
        sidecar: template(),
        cert_dir: None,
        injected: None,
    };
    tokio::spawn(serve(listener, tls, Arc::new(opts), metrics.clone()));
    Server {
        client: client_trusting(ca_pem, addr),
        url: format!("https://{}:{}/inject", names[0], addr.port()),
        metrics,
        addr,
    }
}

/// An HTTPS client that trusts `ca_pem` and finds the webhook's Service name at `addr`.
fn client_trusting(ca_pem: &str, addr: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve(&names("apiward-webhook", NS)[0], addr)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

impl Server {
    /// Sends a review; returns the response and the pod after its patch (if any).
    async fn review(&self, pod: &Value, namespace: &str) -> (Value, Option<Value>) {
        let resp = self
            .client
            .post(&self.url)
            .json(&review_of(pod, namespace))
            .send()
            .await
            .expect("HTTPS to the webhook, its certificate verified against the CA");
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        let r = &answer["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true, "the webhook never refuses a pod");
        let patched = r["patch"].as_str().map(|p| {
            use base64::Engine as _;
            assert_eq!(r["patchType"], "JSONPatch");
            let ops: json_patch::Patch = serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD.decode(p).unwrap(),
            )
            .unwrap();
            let mut doc = pod.clone();
            json_patch::patch(&mut doc, &ops).expect("the patch applies to the pod");
            doc
        });
        (answer, patched)
    }
}

fn strict_pod(v: &Value) -> Pod {
    // Unknown fields refused: a typo in the patch would otherwise be dropped silently.
    let mut unknown = Vec::new();
    let pod: Pod =
        serde_ignored::deserialize(v.clone(), |path| unknown.push(path.to_string())).unwrap();
    assert!(
        unknown.is_empty(),
        "fields k8s-openapi does not know: {unknown:?}"
    );
    pod
}

#[tokio::test]
async fn a_pod_gets_the_init_step_the_native_sidecar_and_its_volumes() {
    let s = server().await;
    let (_, patched) = s.review(&app_pod(), "shop").await;
    let pod = strict_pod(&patched.expect("a patch"));
    let spec = pod.spec.unwrap();
    let init = spec.init_containers.unwrap();
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        [INIT_NAME, SIDECAR_NAME]
    );

    // The init step (its own image, which has iptables): the only container with
    // network capabilities.
    assert_eq!(
        init[0].image.as_deref(),
        Some("ghcr.io/apiward/apiward-init:test")
    );
    assert_eq!(
        init[1].image.as_deref(),
        Some("ghcr.io/apiward/apiward-sidecar:test")
    );
    let caps = init[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    assert!(
        init[0]
            .args
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("--inbound-ports 8080")
    );

    // The sidecar: native (restartPolicy Always), locked down.
    let sc = &init[1];
    assert_eq!(sc.restart_policy.as_deref(), Some("Always"));
    let sec = sc.security_context.as_ref().unwrap();
    assert_eq!(sec.run_as_user, Some(SIDECAR_UID));
    assert_eq!(sec.run_as_non_root, Some(true));
    assert_eq!(sec.read_only_root_filesystem, Some(true));
    assert_eq!(sec.allow_privilege_escalation, Some(false));
    assert_eq!(
        sec.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert!(sec.capabilities.as_ref().unwrap().add.is_none());
    assert!(
        sc.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
    let env: BTreeMap<String, String> = sc
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect();
    let settings: Value = serde_json::from_str(&env["APIWARD_SIDECAR_SETTINGS"]).unwrap();
    assert_eq!(settings["inbound"]["port"], 8080);
    // The sidecar itself accepts them (its settings refuse unknown fields); in the pod
    // POD_NAME (from the downward API) names the pod.
    #[cfg(feature = "demo")]
    {
        let mut in_pod = settings.clone();
        in_pod["control"]["pod"] = json!("orders-7d9f-x2x4q");
        apiward_sidecar::settings::Settings::parse(
            std::path::Path::new("APIWARD_SIDECAR_SETTINGS"),
            &in_pod.to_string(),
        )
        .unwrap();
    }
    // Outbound is intercepted: the app's connections reach the sidecar's outbound
    // listener, which originates mTLS to meshed Services.
    assert_eq!(settings["outbound"]["listen"], "127.0.0.1:15001");
    assert!(
        !init[0]
            .args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.contains("exclude-outbound")),
        "{:?}",
        init[0].args
    );
    assert_eq!(
        settings["identity"]["url"],
        "https://apiward.apiward-system.svc:15012"
    );

    // The projected token has the apiward audience; the trust bundle is mounted.
    let volumes = spec.volumes.unwrap();
    assert_eq!(volumes[0].name, "data", "the pod's own volumes stay");
    let token = volumes.iter().find(|v| v.name == "apiward-token").unwrap();
    let projected = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert_eq!(
        projected[0]
            .service_account_token
            .as_ref()
            .unwrap()
            .audience
            .as_deref(),
        Some("apiward")
    );
    assert!(volumes.iter().any(|v| {
        v.config_map
            .as_ref()
            .is_some_and(|c| c.name == "apiward-trust-bundle")
    }));

    // Probes go to the sidecar's admin port, which asks the app.
    let app = &spec.containers[0];
    let ready = app
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/app-health/app/readyz"));
    assert_eq!(
        ready.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)
    );
    assert!(app.liveness_probe.as_ref().unwrap().tcp_socket.is_none());
    let probes = &settings["appProbes"];
    assert_eq!(
        probes["/app-health/app/readyz"],
        json!({"http": {"port": 8080, "path": "/healthz", "scheme": "HTTP"}})
    );
    assert_eq!(
        probes["/app-health/app/livez"],
        json!({"tcp": {"port": 8080}})
    );

    assert_eq!(
        pod.metadata.annotations.unwrap()[STATUS_ANNOTATION],
        "injected"
    );
    assert_eq!(
        s.metrics
            .webhook
            .get_or_create(&WebhookLabels {
                webhook: "inject",
                result: "injected"
            })
            .get(),
        1
    );
}

#[tokio::test]
async fn injection_is_idempotent_honours_opt_out_and_skips_excluded_namespaces() {
    let s = server().await;
    let (_, once) = s.review(&app_pod(), "shop").await;
    let (_, twice) = s.review(&once.unwrap(), "shop").await;
    assert!(twice.is_none(), "an injected pod is never injected again");

    let mut opted_out = app_pod();
    opted_out["metadata"]["annotations"] = json!({"apiward.io/inject": "disabled"});
    assert!(s.review(&opted_out, "shop").await.1.is_none());

    for ns in ["kube-system", NS] {
        assert!(
            s.review(&app_pod(), ns).await.1.is_none(),
            "{ns} is never injected"
        );
    }
    assert_eq!(
        s.metrics
            .webhook
            .get_or_create(&WebhookLabels {
                webhook: "inject",
                result: "skipped"
            })
            .get(),
        4
    );
}

#[tokio::test]
async fn a_pod_with_init_containers_and_no_volumes_gets_ours_first() {
    let s = server().await;
    let mut pod = app_pod();
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "shop/migrate:1"}]);
    pod["spec"].as_object_mut().unwrap().remove("volumes");
    let (_, patched) = s.review(&pod, "shop").await;
    let spec = strict_pod(&patched.unwrap()).spec.unwrap();
    let names: Vec<String> = spec
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [INIT_NAME, SIDECAR_NAME, "migrate"]);
    assert_eq!(spec.volumes.unwrap().len(), 3);
}

#[tokio::test]
async fn garbage_is_a_400_not_a_crash() {
    let s = server().await;
    let resp = s
        .client
        .post(&s.url)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = s.client.get(&s.url).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// Writes a serving certificate for the webhook's names into `dir` as cert-manager's
/// Secret volume would (`tls.crt`, `tls.key`); returns the CA that signed it.
fn write_cert_manager_secret(dir: &std::path::Path) -> Ca {
    let ca = Ca::generate("cluster.local", now_unix()).unwrap();
    let (chain, key) = ca
        .server_certificate(
            &names("apiward-webhook", NS),
            Duration::from_secs(3600),
            now_unix(),
        )
        .unwrap();
    std::fs::write(dir.join("tls.crt"), chain).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    ca
}

#[tokio::test]
async fn a_mounted_certificate_is_served_and_its_renewal_picked_up() {
    let dir = std::env::temp_dir().join(format!("apiward-webhook-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = write_cert_manager_secret(&dir);
    let tls = tls_from_dir(dir.clone(), Duration::from_millis(50)).unwrap();
    let s = server_with(tls, first.trust_bundle_pem()).await;
    let (resp, _) = s.review(&app_pod(), "shop").await;
    assert_eq!(resp["response"]["allowed"], true, "{resp}");

    // cert-manager renews with another key (here: another CA): the new pair is served.
    let second = write_cert_manager_secret(&dir);
    let renewed = client_trusting(second.trust_bundle_pem(), s.addr);
    let mut served = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if renewed.post(&s.url).body("{}").send().await.is_ok() {
            served = true;
            break;
        }
    }
    assert!(served, "the renewed certificate was never served");
    // (A new client: one that has talked to the server may resume its TLS session.)
    let old = client_trusting(first.trust_bundle_pem(), s.addr);
    assert!(
        old.post(&s.url).body("{}").send().await.is_err(),
        "the first certificate is no longer served"
    );

    // A broken file (half-written Secret) keeps the last good pair serving.
    std::fs::write(dir.join("tls.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = client_trusting(second.trust_bundle_pem(), s.addr);
    assert!(fresh.post(&s.url).body("{}").send().await.is_ok());
    std::fs::remove_dir_all(&dir).unwrap();

    // A directory without the pair is refused at start, with the file named.
    let err = tls_from_dir(dir.clone(), CERT_DIR_POLL).unwrap_err();
    assert!(err.contains("tls.crt"), "{err}");
}

#[tokio::test]
async fn an_injected_pods_namespace_gets_the_trust_bundle_once() {
    // The review tells the namespace of each pod it injects, and only those.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: NS.into(),
        service: "apiward-webhook".into(),
        configuration: None,
        validating_configuration: None,
        sidecar: template(),
        cert_dir: None,
        injected: Some(tx),
    };
    let body = |pod: &Value, ns: &str| review_of(pod, ns).to_string();
    assert_eq!(
        review(body(&app_pod(), "shop").as_bytes(), &opts).1,
        "injected"
    );
    let mut out = app_pod();
    out["metadata"]["annotations"] = json!({INJECT: "disabled"});
    assert_eq!(review(body(&out, "billing").as_bytes(), &opts).1, "skipped");
    assert_eq!(
        review(body(&app_pod(), "shop").as_bytes(), &opts).1,
        "injected"
    );
    drop(opts);

    // The publisher applies the bundle ConfigMap in `shop` once: exactly one call.
    let (mock, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(mock, "default");
    let publisher = tokio::spawn(bundle_where_injected(client, "BUNDLE".into(), {
        let (ptx, prx) = tokio::sync::mpsc::unbounded_channel();
        while let Ok(ns) = rx.try_recv() {
            ptx.send(ns).unwrap();
        }
        prx
    }));
    let (req, send) = handle.next_request().await.expect("one apply");
    assert_eq!(req.method(), http::Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/shop/configmaps/apiward-trust-bundle"
    );
    assert!(req.uri().query().unwrap_or("").contains("fieldManager="));
    send.send_response(
        http::Response::builder()
            .body(kube::client::Body::from(
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "apiward-trust-bundle", "namespace": "shop"}})
                .to_string()
                .into_bytes(),
            ))
            .unwrap(),
    );
    publisher.await.unwrap();
    assert!(
        handle.next_request().await.is_none(),
        "the second pod in shop did not apply it again, and billing (opted out) never"
    );
}

/// The leader keeps the policy validator's `caBundle` current, against kube's tower-test
/// mock API server: a stale bundle is replaced on every webhook (GET then PUT), a current
/// one costs only the GET.
#[tokio::test]
async fn the_validating_configurations_ca_bundle_is_kept_current() {
    use http::{Method, Request as HttpRequest, Response as HttpResponse};
    use kube::client::Body;
    let (svc, mut handle) = tower_test::mock::pair::<HttpRequest<Body>, HttpResponse<Body>>();
    let client = kube::Client::new(svc, "apiward-system");
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client);
    let bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let config = |ca: &str| {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "apiward-policy-validator", "resourceVersion": "7"},
            "webhooks": [{
                "name": "validate.apiward.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"caBundle": ca, "service": {"name": "apiward-webhook", "namespace": NS, "path": "/validate"}},
            }]
        })
    };
    let path = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/apiward-policy-validator";
    let server = tokio::spawn(async move {
        // First call: stale, so GET then PUT with the new bundle.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, path));
        send.send_response(HttpResponse::new(Body::from(
            config("old").to_string().into_bytes(),
        )));
        let (req, send) = handle.next_request().await.expect("PUT");
        assert_eq!((req.method(), req.uri().path()), (&Method::PUT, path));
        let body = req.into_body().collect_bytes().await.unwrap();
        let put: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(put, config(bundle), "only caBundle changes");
        send.send_response(HttpResponse::new(Body::from(body.to_vec())));
        // Second call: current, so only the GET.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!(req.method(), Method::GET);
        send.send_response(HttpResponse::new(Body::from(
            config(bundle).to_string().into_bytes(),
        )));
        handle
    });
    assert!(
        ensure_ca_bundle(&api, "apiward-policy-validator", bundle)
            .await
            .unwrap()
    );
    assert!(
        !ensure_ca_bundle(&api, "apiward-policy-validator", bundle)
            .await
            .unwrap()
    );
    let mut handle = server.await.unwrap();
    drop(api);
    assert!(handle.next_request().await.is_none(), "no other call");
}
