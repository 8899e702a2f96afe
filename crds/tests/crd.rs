//! The generated CRD: committed copy in step with the types, and acceptable to an API server
//! (structural schema rules of apiextensions.k8s.io/v1).

use apiward_crds::{ApiPolicy, CRD_FILE, crd_yaml};
use kube::CustomResourceExt;
use serde_json::Value;

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

#[test]
fn committed_crd_matches_the_types() {
    let committed = std::fs::read_to_string(repo_file(CRD_FILE)).expect("committed CRD exists");
    assert!(
        committed == crd_yaml(),
        "{CRD_FILE} is out of date: run `cargo run -p apiward -- crds > {CRD_FILE}`"
    );
}

fn schema() -> Value {
    let crd = serde_json::to_value(ApiPolicy::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Walks every schema node and collects violations of the structural-schema rules
/// (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema).
fn structural_violations(node: &Value, path: &str, in_logic: bool, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: schema node is not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "const",
        "dependencies",
    ] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: forbidden keyword {forbidden}"));
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if in_logic {
        for k in [
            "type",
            "default",
            "nullable",
            "additionalProperties",
            "description",
        ] {
            if obj.contains_key(k) && k != "description" {
                out.push(format!(
                    "{path}: {k} not allowed inside allOf/anyOf/oneOf/not"
                ));
            }
        }
    } else if !obj.contains_key("type") && !int_or_string && !preserve {
        out.push(format!("{path}: node has no type"));
    }
    if obj.contains_key("properties")
        && obj
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false))
    {
        out.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    if let Some(t) = obj.get("type").and_then(Value::as_str) {
        if !["object", "array", "string", "integer", "number", "boolean"].contains(&t) {
            out.push(format!("{path}: unknown type {t}"));
        }
        if t == "array" && !obj.contains_key("items") {
            out.push(format!("{path}: array without items"));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural_violations(v, &format!("{path}.{k}"), in_logic, out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}[]"), in_logic, out);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        structural_violations(ap, &format!("{path}{{}}"), in_logic, out);
    }
    for k in ["allOf", "anyOf", "oneOf"] {
        for (i, b) in obj
            .get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            structural_violations(b, &format!("{path}.{k}[{i}]"), true, out);
        }
    }
    if let Some(n) = obj.get("not") {
        structural_violations(n, &format!("{path}.not"), true, out);
    }
    // list-map keys must be required or defaulted scalar properties of the items.
    if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let items = &obj["items"];
        let required: Vec<&str> = items["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for key in obj["x-kubernetes-list-map-keys"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = key.as_str().unwrap_or_default();
            let prop = &items["properties"][key];
            if prop.is_null() {
                out.push(format!(
                    "{path}: list-map key {key} is not a property of the items"
                ));
            } else if !required.contains(&key) && prop.get("default").is_none() {
                out.push(format!(
                    "{path}: list-map key {key} is neither required nor defaulted"
                ));
            }
        }
    }
}

#[test]
fn schema_is_structural() {
    let mut out = Vec::new();
    structural_violations(&schema(), "", false, &mut out);
    assert!(
        out.is_empty(),
        "structural-schema violations:\n{}",
        out.join("\n")
    );
}

/// Every `default` in the schema must itself be valid against the node it sits on.
fn check_defaults(node: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(d) = node.get("default") {
        let mut sub = node.clone();
        sub.as_object_mut().unwrap().remove("default");
        match jsonschema::validator_for(&sub) {
            Ok(v) => {
                for e in v.iter_errors(d) {
                    out.push(format!("{path}: default {d} invalid: {e}"));
                }
            }
            Err(e) => out.push(format!("{path}: schema does not compile: {e}")),
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_defaults(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = node.get("items") {
        check_defaults(items, &format!("{path}[]"), out);
    }
}

#[test]
fn defaults_are_valid_against_their_own_schema() {
    let mut out = Vec::new();
    check_defaults(&schema(), "", &mut out);
    assert!(out.is_empty(), "{}", out.join("\n"));
    // And the defaults that matter are there.
    let s = schema();
    assert_eq!(
        s["properties"]["spec"]["properties"]["mode"]["default"],
        "Enforce"
    );
    assert_eq!(
        s["properties"]["spec"]["properties"]["mtls"]["default"],
        "Strict"
    );
}

#[test]
fn crd_names_scope_and_columns() {
    let crd = ApiPolicy::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("apipolicies.apiward.io"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["apol".to_string()]));
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["Mode", "mTLS", "Programmed", "Endpoints", "Shadow", "Age"]
    );
}
