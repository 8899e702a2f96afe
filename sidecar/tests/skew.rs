//! The version-skew rule, on a running sidecar: a pushed config from a newer operator is
//! applied with the fields it does not know ignored and reported; one that requires a
//! feature it lacks is refused, reported, and the previous config keeps being enforced.

mod common;

use apiward_sidecar::control;
use common::env::*;
use serde_json::{Value, json};

/// A sidecar whose settings carry no policy: it enforces what is pushed.
async fn pushed_env(name: &str) -> (Env, Value) {
    let e = env_with(
        name,
        |_| {},
        |s| {
            s.as_object_mut().unwrap().remove("policy");
        },
    )
    .await;
    let jwks = json!({"inline": common::Signer::jwks(&[&e.signer])});
    let cfg = policy(e.app_port, &jwks, |_| {});
    (e, cfg)
}

fn push(e: &Env, cfg: &Value) {
    control::apply(&e.shared, cfg.to_string().as_bytes());
}

fn enforced(e: &Env) -> Option<String> {
    e.shared
        .active
        .load()
        .as_ref()
        .and_then(|a| a.config.as_ref().map(|c| c.version.clone()))
}

#[tokio::test]
async fn a_newer_operators_optional_field_is_ignored_reported_and_the_config_enforced() {
    let (e, mut cfg) = pushed_env("skew-ignored").await;
    // Nothing pushed yet: fail closed.
    let r = e
        .checkout(false)
        .get(format!("{}/orders", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (503, "no_config".into()));
    cfg["version"] = json!("newer-1");
    cfg["ports"][0]["response"]["addHeaders"] = json!({"x-frame-options": "DENY"});
    push(&e, &cfg);
    assert_eq!(enforced(&e).as_deref(), Some("newer-1"));
    let report = control::report(&e.shared, "users-0");
    assert_eq!(report.ignored_fields, ["ports.0.response.addHeaders"]);
    assert!(report.rejected_config.is_none());
    assert_eq!(
        sample(
            &e.metrics().await,
            "apiward_sidecar_config_fields_ignored_total"
        ),
        1.0
    );
    // Enforced as written: the checkout may read orders, an anonymous caller may not.
    let r = e
        .checkout(false)
        .get(format!("{}/orders", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = e
        .anon()
        .get(format!("{}/orders", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test]
async fn a_config_requiring_a_feature_this_sidecar_lacks_is_refused_and_the_last_one_stays() {
    let (e, mut cfg) = pushed_env("skew-required").await;
    cfg["version"] = json!("v1");
    push(&e, &cfg);
    assert_eq!(enforced(&e).as_deref(), Some("v1"));
    // A newer operator tightens something this sidecar cannot enforce: refused, never
    // applied without it.
    let mut newer = cfg.clone();
    newer["version"] = json!("v2");
    newer["requires"] = json!(["requestSchemaValidation"]);
    newer["ports"][0]["requestSchema"] = json!({"onInvalid": "Refuse"});
    push(&e, &newer);
    assert_eq!(
        enforced(&e).as_deref(),
        Some("v1"),
        "the previous config stays"
    );
    let rejected = control::report(&e.shared, "users-0")
        .rejected_config
        .expect("reported");
    assert_eq!(rejected.version, "v2");
    assert!(
        rejected.reason.contains("requestSchemaValidation"),
        "{}",
        rejected.reason
    );
    // A value it cannot name is refused the same way.
    let mut unknown = cfg.clone();
    unknown["version"] = json!("v3");
    unknown["ports"][0]["mtls"] = json!("Opportunistic");
    push(&e, &unknown);
    assert_eq!(enforced(&e).as_deref(), Some("v1"));
    let rejected = control::report(&e.shared, "users-0")
        .rejected_config
        .unwrap();
    assert_eq!(rejected.version, "v3");
}

#[tokio::test]
async fn each_input_replaces_only_its_part_and_the_engine_is_reused_while_the_policy_is_the_same() {
    use apiward_sidecar::state::Change;
    use std::sync::Arc;
    let (e, mut cfg) = pushed_env("state-inputs").await;
    cfg["version"] = json!("v1");
    push(&e, &cfg);
    let engine = |e: &Env| e.shared.active.load_full().unwrap().engine.clone().unwrap();
    let first = engine(&e);
    // A mesh table or a renewed certificate rebuilds the derived state, not the engine.
    e.shared.rebuild(Change::Mesh).unwrap();
    assert!(
        Arc::ptr_eq(&first, &engine(&e)),
        "the engine was rebuilt for a mesh change"
    );
    e.shared.rebuild(Change::Identity).unwrap();
    assert!(Arc::ptr_eq(&first, &engine(&e)));
    // A pushed config is not read back from the settings file: a settings file broken since
    // does not stop it (the last good settings stay in force).
    std::fs::write(&e.settings, "{not settings").unwrap();
    cfg["version"] = json!("v2");
    push(&e, &cfg);
    assert_eq!(enforced(&e).as_deref(), Some("v2"));
    assert!(
        !Arc::ptr_eq(&first, &engine(&e)),
        "a new policy gets a new engine"
    );
    // Reading the broken file itself is refused, and v2 keeps serving.
    assert!(e.shared.reload().is_err());
    assert_eq!(enforced(&e).as_deref(), Some("v2"));
}
