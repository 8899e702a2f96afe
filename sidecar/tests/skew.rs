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
