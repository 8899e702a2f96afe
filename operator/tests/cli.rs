//! The `apiward` binary as users and CI run it: exit codes, output, policy tests, explain.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn apiward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_examples_passes_and_runs_the_policy_tests() {
    let o = apiward(&["check", "examples", "--output", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--output json is JSON");
    assert_eq!(v["ok"], true);
    assert!(v["tests"].as_u64().unwrap() >= 25, "{v}");
    assert_eq!(v["tests_failed"], 0);
}

#[test]
fn check_invalid_exits_1_naming_file_object_and_field() {
    let o = apiward(&["check", "examples-invalid"]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("examples-invalid/01-bind-param-not-in-path.yaml: error[invalid] ApiPolicy shop/bad spec.rules[0].bind:"), "{out}");
    let o = apiward(&["check", "examples-invalid", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["errors"].as_u64(), Some(22));
}

#[test]
fn a_failing_policy_test_fails_the_check() {
    let dir = std::env::temp_dir().join(format!("apiward-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(repo("examples/shop/users.yaml"), dir.join("users.yaml")).unwrap();
    std::fs::copy(
        repo("examples/shop/corp-jwks.yaml"),
        dir.join("corp-jwks.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.join("wrong.test.yaml"),
        "tests:\n  - name: claims BOLA is allowed\n    workload: {namespace: shop, labels: {app: users}}\n    request: {method: GET, path: /users/43}\n    caller: {jwt: {provider: corp, claims: {sub: \"42\", scope: profile}}}\n    expect: {allowed: true}\n",
    )
    .unwrap();
    let o = apiward(&["check", dir.to_str().unwrap()]);
    let out = stdout(&o);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("claims BOLA is allowed") && out.contains("allowed: expected true, got false"),
        "{out}"
    );
}

#[test]
fn strict_fails_on_lint_warnings() {
    let o = apiward(&["check", "examples"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        out.contains("warning[AW001] ApiPolicy shop/catalog spec.mtls"),
        "{out}"
    );
    assert!(
        out.contains("warning[AW002] ApiPolicy shop/catalog spec.mode"),
        "{out}"
    );
    assert_eq!(
        apiward(&["check", "--strict", "examples"]).status.code(),
        Some(1)
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(apiward(&["check", "no/such/dir"]).status.code(), Some(2));
    assert_eq!(apiward(&["check"]).status.code(), Some(2));
}

#[test]
fn explain_shows_the_failed_binding_for_bola() {
    for path in ["/users/43", "/users/42/../43", "/users/%34%33"] {
        let o = apiward(&[
            "explain",
            "-f",
            "examples",
            "--workload",
            "shop/app=users",
            &format!("GET {path}"),
            "--claim",
            "sub=42",
            "--claim",
            "scope=profile",
        ]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains(
                "decision: DENY 403 — reason binding_failed, by shop/users-api/own-profile"
            ),
            "{out}"
        );
        assert!(
            out.contains("path parameter {userId} is \"43\" but claim sub is \"42\""),
            "{out}"
        );
    }
    let o = apiward(&[
        "explain",
        "-f",
        "examples",
        "--workload",
        "shop/app=users",
        "GET /users/42",
        "--claim",
        "sub=42",
        "--claim",
        "scope=profile",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("decision: ALLOW"));
}

/// `apiward check -` with `text` on standard input.
fn check_stdin(args: &[&str], text: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_apiward"))
        .arg("check")
        .args(args)
        .arg("-")
        .current_dir(repo(""))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn check_reads_a_rendered_overlay_from_stdin() {
    // What `kustomize build examples/gitops/policies/overlays/staging` prints: the base
    // policy in another namespace, in Audit mode.
    let base =
        std::fs::read_to_string(repo("examples/gitops/policies/base/inventory-api.yaml")).unwrap();
    let staging = base
        .replace("namespace: store", "namespace: store-staging")
        .replace("mode: Enforce", "mode: Audit");
    let o = check_stdin(&[], &staging);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // --strict refuses Audit mode (AW002), naming standard input.
    let o = check_stdin(&["--strict"], &staging);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o)
            .contains("<stdin>: warning[AW002] ApiPolicy store-staging/inventory-api spec.mode"),
        "{}",
        stdout(&o)
    );
    // A broken document is an error with the field.
    let broken = base.replace("ports: [8080]", "ports: [80800]");
    let o = check_stdin(&[], &broken);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("<stdin>: error"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("spec.targetRef.ports"),
        "{}",
        stdout(&o)
    );
}

/// A stand-in API server on loopback (plain HTTP) that answers `GET` by path from
/// `routes` (404 otherwise), and a kubeconfig pointing at it; returns the kubeconfig.
fn fake_api_server(routes: Vec<(&'static str, serde_json::Value)>) -> PathBuf {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let path = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .split('?')
                .next()
                .unwrap_or("")
                .to_owned();
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, b)) => ("200 OK", b.to_string()),
                None => ("404 Not Found", serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = std::env::temp_dir().join(format!(
        "apiward-kubeconfig-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: me, user: {{token: not-a-secret}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    path
}

fn apiward_with_kubeconfig(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apiward"))
        .args(args)
        .current_dir(repo(""))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[test]
fn check_explain_and_inventory_read_the_live_cluster() {
    let mut policy: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("examples/shop/catalog-audit.yaml")).unwrap(),
    )
    .unwrap();
    policy["status"] = serde_json::json!({
        "observedGeneration": 1,
        "conditions": [],
        "inventory": {"endpoints": [{"method": "GET", "path": "/debug/vars", "declared": false, "shadow": true,
                                     "requests": 3, "responses": {"2xx": 3}}],
                      "summary": {"endpoints": 1, "shadow": 1, "zombie": 0, "unauthenticated": 0}},
    });
    let list = serde_json::json!({"apiVersion": "apiward.io/v1alpha1", "kind": "ApiPolicyList", "metadata": {}, "items": [policy]});
    let kubeconfig = fake_api_server(vec![
        (
            "/apis/apiward.io/v1alpha1/namespaces/shop/apipolicies",
            list.clone(),
        ),
        ("/apis/apiward.io/v1alpha1/apipolicies", list),
    ]);

    // check: the live policy is validated and linted (it is in Audit mode: AW002).
    let o = apiward_with_kubeconfig(
        &kubeconfig,
        &["check", "--cluster", "-n", "shop", "--strict"],
    );
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("cluster/apipolicies/shop/catalog: warning[AW002]"),
        "{out}"
    );
    let o = apiward_with_kubeconfig(&kubeconfig, &["check", "--cluster", "-n", "shop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // explain: decided by the policy in force.
    let o = apiward_with_kubeconfig(
        &kubeconfig,
        &[
            "explain",
            "--cluster",
            "--workload",
            "shop/app=catalog",
            "GET /products",
        ],
    );
    assert!(
        stdout(&o).contains("policies: shop/catalog"),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );

    // inventory: from the ApiPolicy's status.
    let o = apiward_with_kubeconfig(&kubeconfig, &["inventory"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout(&o).contains("/debug/vars") && stdout(&o).contains("shadow"),
        "{}",
        stdout(&o)
    );

    // No cluster: a usage error that says so.
    let o = apiward_with_kubeconfig(
        Path::new("/nonexistent/kubeconfig"),
        &["check", "--cluster"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no cluster"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
