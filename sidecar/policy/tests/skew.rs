//! The version-skew rule of `SidecarConfig` (see `apiward_policy::config`): a config from a
//! newer operator is applied with its unknown optional fields ignored and named, and refused
//! when it requires a feature this sidecar lacks or uses a value it cannot name.

use std::path::PathBuf;

use apiward_policy::SidecarConfig;
use apiward_policy::config::{ConfigError, FEATURES};
use serde_json::{Value, json};

fn example() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema/example.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn wire(v: &Value) -> Result<apiward_policy::config::WireConfig, ConfigError> {
    SidecarConfig::from_wire(v.to_string().as_bytes())
}

#[test]
fn an_unknown_optional_field_is_ignored_named_and_changes_nothing() {
    let plain = wire(&example()).unwrap();
    assert!(plain.ignored.is_empty());
    let mut newer = example();
    newer["ports"][0]["response"]["addHeaders"] = json!({"x-frame-options": "DENY"});
    newer["telemetry"] = json!({"sampling": 0.5});
    let got = wire(&newer).unwrap();
    assert_eq!(
        got.config, plain.config,
        "the fields this sidecar knows are read the same"
    );
    let mut ignored = got.ignored.clone();
    ignored.sort();
    assert_eq!(ignored, ["ports.0.response.addHeaders", "telemetry"]);
    // Read strictly (a hand-written file), the same field is a typo.
    let err = SidecarConfig::from_json(newer.to_string().as_bytes()).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownField { .. }), "{err}");
}

#[test]
fn a_required_feature_this_sidecar_lacks_refuses_the_whole_config() {
    let mut newer = example();
    newer["requires"] = json!(["responseFilter.onUnfilterable", "requestSchemaValidation"]);
    newer["ports"][0]["requestSchema"] = json!({"onInvalid": "Refuse"});
    let err = wire(&newer).unwrap_err();
    match &err {
        ConfigError::Unsupported { feature } => assert_eq!(feature, "requestSchemaValidation"),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("upgrade the sidecar"), "{err}");
}

#[test]
fn every_feature_this_sidecar_implements_may_be_required() {
    let mut cfg = example();
    cfg["requires"] = json!(FEATURES);
    let got = wire(&cfg).unwrap();
    assert_eq!(got.config.requires, FEATURES);
}

#[test]
fn an_unknown_enum_value_is_refused_never_ignored() {
    let mut newer = example();
    newer["ports"][0]["mode"] = json!("Shadow");
    assert!(matches!(wire(&newer), Err(ConfigError::Parse(_))));
    let mut newer = example();
    newer["ports"][0]["mtls"] = json!("Opportunistic");
    assert!(matches!(wire(&newer), Err(ConfigError::Parse(_))));
}

#[test]
fn another_api_version_is_refused_off_the_wire_too() {
    let mut other = example();
    other["apiVersion"] = json!("apiward.io/sidecar/v1beta1");
    assert!(matches!(wire(&other), Err(ConfigError::ApiVersion { .. })));
}
