//! The whole system, end to end, through the [`Environment`] trait: the local lab
//! (network namespaces, real iptables interception, real sidecars under their own UID, the
//! `apiward local serve` control plane as a process; needs root), or — when `KUBECONFIG`
//! is set — a real cluster with the chart installed (run with `-j 1`: the scenarios share
//! namespace `shop`). See e2e/README.md for why each scenario exists.

use std::time::{Duration, Instant};

use apiward_e2e::env::{Environment, environment, wait_for};
use apiward_e2e::tempdir;

/// `shop/checkout` may GET `paths` on users and orders; `mode` Enforce or Audit.
fn policy(version_note: &str, mode: &str, paths: &[&str]) -> String {
    format!(
        "# {version_note}\n\
         apiVersion: apiward.io/v1alpha1\n\
         kind: ApiPolicy\n\
         metadata: {{name: backend, namespace: shop}}\n\
         spec:\n\
         \x20 targetRef:\n\
         \x20   selector: {{matchExpressions: [{{key: app, operator: In, values: [users, orders]}}]}}\n\
         \x20 mode: {mode}\n\
         \x20 rules:\n\
         \x20   - name: checkout-reads\n\
         \x20     from: [{{serviceAccounts: [shop/checkout]}}]\n\
         \x20     to: [{{methods: [GET], paths: {paths:?}}}]\n"
    )
}

fn condition(env: &dyn Environment, type_: &str) -> Option<(String, String)> {
    let s = env.status("backend")?;
    let c = s.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.message.clone()))
}

/// The versions the backends enforce (each pod's config has its own version).
type Versions = Vec<Option<String>>;

fn versions(env: &dyn Environment) -> Versions {
    ["users", "orders"]
        .map(|w| env.enforced_version(w))
        .to_vec()
}

/// Waits until both backends enforce a config other than `not` and the status says every
/// sidecar acknowledged it.
fn wait_programmed(env: &dyn Environment, not: Option<&Versions>) -> Versions {
    wait_for(Duration::from_secs(20), "Programmed=True", || {
        let now = versions(env);
        condition(env, "Programmed").is_some_and(|(s, _)| s == "True")
            && now.iter().all(Option::is_some)
            && not.is_none_or(|old| now.iter().zip(old).all(|(a, b)| a != b))
    });
    versions(env)
}

/// The local lab, or the cluster when `KUBECONFIG` is set.
fn lab(name: &str) -> Box<dyn Environment> {
    environment(&tempdir(name), &["checkout", "users", "orders"])
}

#[test]
fn a_policy_change_reaches_every_sidecar() {
    let mut env = lab("scenario-change");
    env.apply_policy("backend", &policy("v1", "Enforce", &["/a"]));
    let v1 = wait_programmed(&*env, None);
    assert_eq!(env.get("checkout", "users", "/a"), 200);
    assert_eq!(env.get("checkout", "users", "/b"), 403);
    assert_eq!(env.get("users", "orders", "/a"), 403, "only checkout may");

    let changed = Instant::now();
    env.apply_policy("backend", &policy("v2", "Enforce", &["/a", "/b"]));
    let mut reached = Vec::new();
    for (i, w) in ["users", "orders"].into_iter().enumerate() {
        wait_for(Duration::from_secs(20), "the new version", || {
            env.enforced_version(w).is_some_and(|v| Some(v) != v1[i])
        });
        reached.push((w, changed.elapsed()));
    }
    // The figure (budget ≤ 1 s; asserted only with a generous timeout above). The control
    // plane checks files every 500 ms, so half a second of it is the file watch.
    println!("policy change → every sidecar: {reached:?}");
    assert_eq!(env.get("checkout", "orders", "/b"), 200);
    let took = wait_for(
        Duration::from_secs(20),
        "acknowledged in the status",
        || condition(&*env, "Programmed").is_some_and(|(s, _)| s == "True"),
    );
    println!(
        "status: {} ({took:?} later)",
        condition(&*env, "Programmed").unwrap().1
    );
}

#[test]
fn sidecars_keep_enforcing_without_the_control_plane_and_catch_up() {
    let mut env = lab("scenario-down");
    env.apply_policy("backend", &policy("v1", "Enforce", &["/a"]));
    let v1 = wait_programmed(&*env, None);
    env.stop_control_plane();
    // The last config keeps being enforced, both ways.
    for _ in 0..3 {
        assert_eq!(env.get("checkout", "users", "/a"), 200);
        assert_eq!(env.get("checkout", "users", "/b"), 403);
        std::thread::sleep(Duration::from_millis(300));
    }
    // A change made while it is down arrives once it is back.
    env.apply_policy("backend", &policy("v2", "Enforce", &["/a", "/b"]));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(versions(&*env), v1, "nothing changes while it is down");
    let back = Instant::now();
    env.start_control_plane();
    wait_programmed(&*env, Some(&v1));
    println!(
        "caught up {:?} after the control plane returned",
        back.elapsed()
    );
    assert_eq!(env.get("checkout", "users", "/b"), 200);
}

#[test]
fn a_sidecar_restarted_without_a_control_plane_refuses_until_configured() {
    let mut env = lab("scenario-restart");
    env.apply_policy("backend", &policy("v1", "Enforce", &["/a"]));
    wait_programmed(&*env, None);
    env.stop_control_plane();
    env.restart_sidecar("users");
    // No certificate and no config: nothing gets through (fail closed).
    for _ in 0..3 {
        assert_ne!(env.get("checkout", "users", "/a"), 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        env.get("checkout", "orders", "/a"),
        200,
        "the others still serve"
    );
    env.start_control_plane();
    let took = wait_for(Duration::from_secs(40), "served again", || {
        env.get("checkout", "users", "/a") == 200
    });
    println!("the restarted sidecar served {took:?} after the control plane returned");
    assert_eq!(env.get("checkout", "users", "/b"), 403);
}

#[test]
fn a_malformed_policy_file_changes_nothing_and_is_reported() {
    let mut env = lab("scenario-malformed");
    env.apply_policy("backend", &policy("v1", "Enforce", &["/a"]));
    let v1 = wait_programmed(&*env, None);
    env.apply_policy(
        "backend",
        &policy("v2", "Enforce", &["/a", "/b"]).replace("mode: Enforce", "mode: Sometimes"),
    );
    wait_for(
        Duration::from_secs(20),
        "the error in the status file",
        || {
            env.source_errors("backend")
                .iter()
                .any(|e| e.contains("Sometimes"))
        },
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(versions(&*env), v1, "no sidecar's config changed");
    assert_eq!(
        env.get("checkout", "users", "/b"),
        403,
        "the bad change did not apply"
    );
    assert_eq!(
        condition(&*env, "Ready").unwrap().0,
        "True",
        "v1 is still enforced"
    );
}

/// A mistake only a check across the spec finds (a bound `{id}` missing from the rule's
/// path): on a cluster the operator's validating webhook refuses the `kubectl apply`
/// (the CRD's CEL cannot afford that rule); locally `apiward local serve` refuses the
/// file. Either way the error names the field and nothing changes.
#[test]
fn a_cross_field_mistake_is_refused_naming_the_field_and_changes_nothing() {
    let mut env = lab("scenario-cross-field");
    env.apply_policy("backend", &policy("v1", "Enforce", &["/a"]));
    let v1 = wait_programmed(&*env, None);
    let bad = policy("v2", "Enforce", &["/a", "/b"]).replace(
        "      to: [{methods: [GET], paths: [\"/a\", \"/b\"]}]\n",
        "      to: [{methods: [GET], paths: [\"/a\", \"/b\"]}]\n      bind: [{pathParam: id, claim: sub}]\n",
    ).replace(
        "from: [{serviceAccounts: [shop/checkout]}]",
        "from: [{jwt: {provider: corp}}]",
    ).replace(
        "  rules:\n",
        "  authentication:\n    jwt: [{name: corp, issuer: \"https://login.example/\", jwksUri: \"https://login.example/jwks.json\", audiences: [shop]}]\n  rules:\n",
    );
    assert!(bad.contains("bind: [{pathParam: id"), "{bad}");
    env.apply_policy("backend", &bad);
    wait_for(
        Duration::from_secs(20),
        "the refusal naming the field",
        || {
            env.source_errors("backend")
                .iter()
                .any(|e| e.contains("spec.rules[0].bind") && e.contains("{pathParam}"))
        },
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(versions(&*env), v1, "no sidecar's config changed");
    assert_eq!(
        env.get("checkout", "users", "/b"),
        403,
        "v1 is still enforced"
    );
}

#[test]
fn audit_then_enforce_rollout() {
    let mut env = lab("scenario-rollout");
    env.apply_policy("backend", &policy("audit", "Audit", &["/a"]));
    let audit = wait_programmed(&*env, None);
    // In Audit mode a request the rules would refuse is let through (and counted).
    assert_eq!(
        env.get("users", "orders", "/a"),
        200,
        "Audit lets it through"
    );
    env.apply_policy("backend", &policy("enforce", "Enforce", &["/a"]));
    wait_programmed(&*env, Some(&audit));
    assert_eq!(env.get("users", "orders", "/a"), 403, "Enforce refuses it");
    assert_eq!(
        env.get("checkout", "orders", "/a"),
        200,
        "the allowed caller is unaffected"
    );
}

/// users declares `/a` and a deprecated `/old/{id}`; undeclared endpoints are audited
/// (served, counted), so the inventory sees them.
const INVENTORY_POLICY: &str = "apiVersion: apiward.io/v1alpha1
kind: ApiPolicy
metadata: {name: backend, namespace: shop}
spec:
  targetRef: {selector: {matchLabels: {app: users}}}
  api:
    endpoints:
      - {method: GET, path: /a}
      - {method: GET, path: \"/old/{id}\", deprecated: true, sunset: \"2099-01-01T00:00:00Z\"}
    undeclared: Audit
  rules:
    - name: checkout-reads
      from: [{serviceAccounts: [shop/checkout]}]
      to: [{methods: [GET], paths: [\"/**\"]}]
";

#[test]
fn the_inventory_shows_declared_shadow_and_zombie_endpoints_and_survives_a_spray() {
    let mut env = lab("scenario-inventory");
    env.apply_policy("backend", INVENTORY_POLICY);
    wait_for(Duration::from_secs(20), "Programmed=True", || {
        condition(&*env, "Programmed").is_some_and(|(s, _)| s == "True")
    });
    let sent = Instant::now();
    assert_eq!(env.get("checkout", "users", "/a"), 200);
    assert_eq!(env.get("checkout", "users", "/old/7"), 200);
    assert_eq!(
        env.get("checkout", "users", "/internal/debug"),
        200,
        "Audit serves it"
    );
    let things: Vec<String> = (1..=20).map(|i| format!("/things/{i}")).collect();
    assert!(
        env.get_many("checkout", "users", things, 4)
            .iter()
            .all(|s| *s == 200)
    );
    let endpoint = |path: &str| {
        env.status("backend")
            .and_then(|s| s.inventory)
            .and_then(|i| i.endpoints.into_iter().find(|e| e.path == path))
    };
    let took = wait_for(
        Duration::from_secs(30),
        "the inventory in the status",
        || endpoint("/things/{id}").is_some_and(|e| e.requests == 20),
    );
    println!(
        "inventory in the status {took:?} after the traffic (sent {:?} before)",
        sent.elapsed()
    );
    let a = endpoint("/a").unwrap();
    assert!(a.declared && !a.shadow && !a.zombie, "{a:?}");
    let old = endpoint("/old/{id}").unwrap();
    assert!(old.zombie, "a deprecated endpoint still called: {old:?}");
    let debug = endpoint("/internal/debug").unwrap();
    assert!(debug.shadow && !debug.declared, "{debug:?}");
    assert!(endpoint("/things/{id}").unwrap().shadow);
    assert!(
        endpoint("/things/1").is_none(),
        "/things/1, /things/2, … collapse"
    );

    // A scanner sprays 100,000 random paths: the sidecar's memory stays flat.
    let before = env.sidecar_rss_kib("users");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let spray: Vec<String> = (0..100_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            format!("/s{:x}/{:x}/{}", seed % 977, seed >> 40, seed % 13)
        })
        .collect();
    let started = Instant::now();
    let statuses = env.get_many("checkout", "users", spray, 16);
    let after = env.sidecar_rss_kib("users");
    println!(
        "spray: {} requests in {:?}; sidecar RSS {before} → {after} KiB",
        statuses.len(),
        started.elapsed()
    );
    assert_eq!(statuses.len(), 100_000);
    assert!(
        statuses.iter().filter(|s| **s == 200).count() > 99_000,
        "the spray was served (Audit)"
    );
    assert!(
        after < before + 10 * 1024,
        "RSS grew by more than 10 MiB: {before} → {after} KiB"
    );
    let summary = wait_for(Duration::from_secs(30), "the spray in the status", || {
        env.status("backend")
            .and_then(|s| s.inventory)
            .is_some_and(|i| i.summary.endpoints > 4)
    });
    let inv = env.status("backend").and_then(|s| s.inventory).unwrap();
    println!("inventory after the spray ({summary:?}): {:?}", inv.summary);
    assert!(inv.endpoints.len() <= 100, "the status stays bounded");
}
