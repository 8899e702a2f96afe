//! The committed JSON Schema of `SidecarConfig` is in step with the types and validates
//! hand-written configs the same way the sidecar's parser does.

use std::path::PathBuf;

use apiward_policy::SidecarConfig;
use serde_json::Value;

fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schema")
        .join(name)
}

const SCHEMA: &str = "sidecar-config.schema.json";

#[test]
fn committed_schema_matches_the_types() {
    let generated = serde_json::to_string_pretty(&SidecarConfig::json_schema()).unwrap() + "\n";
    if std::env::var_os("APIWARD_BLESS").is_some() {
        std::fs::write(file(SCHEMA), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(file(SCHEMA)).unwrap_or_default();
    assert!(
        committed == generated,
        "sidecar/policy/schema/{SCHEMA} is out of date: run `APIWARD_BLESS=1 cargo test -p apiward-policy --test schema`"
    );
}

fn schema() -> jsonschema::Validator {
    let s: Value = serde_json::from_str(&std::fs::read_to_string(file(SCHEMA)).unwrap()).unwrap();
    jsonschema::validator_for(&s).unwrap()
}

#[test]
fn a_hand_written_config_validates_and_parses() {
    let text = std::fs::read(file("example.json")).unwrap();
    let value: Value = serde_json::from_slice(&text).unwrap();
    let errors: Vec<String> = schema()
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let cfg = SidecarConfig::from_json(&text).unwrap();
    assert_eq!(cfg.ports[0].rules[0].name, "own-profile");
}

#[test]
fn a_typo_is_refused_by_schema_and_parser_alike() {
    let text = std::fs::read_to_string(file("example.json")).unwrap();
    let typo = text.replace("\"maskServerErrors\"", "\"maskServerError\"");
    let value: Value = serde_json::from_str(&typo).unwrap();
    assert!(!schema().is_valid(&value));
    let err = SidecarConfig::from_json(typo.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("maskServerError"), "{err}");
}

#[test]
fn another_contract_version_is_refused() {
    let text = std::fs::read_to_string(file("example.json")).unwrap();
    let other = text.replace("apiward.io/sidecar/v1alpha1", "apiward.io/sidecar/v2");
    let err = SidecarConfig::from_json(other.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("apiward.io/sidecar/v2"), "{err}");
}
