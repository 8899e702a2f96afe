//! The examples and the invalid examples, through the loader `apiward check` uses, and the
//! invalid ones also through what admission runs: the CRD's OpenAPI schema, its list-map
//! keys, strict field validation, and its CEL rules evaluated client-side by kube-cel.

use std::path::{Path, PathBuf};

use apiward::load::{self, Object};
use apiward_crds::ApiPolicy;
use kube::CustomResourceExt;
use serde_json::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn every_example_parses_and_validates() {
    let input = load::read(&[repo("examples")]).unwrap();
    assert!(input.findings.is_empty(), "{:#?}", input.findings);
    let policies: Vec<&ApiPolicy> = input
        .objects
        .iter()
        .filter_map(|o| match &o.object {
            Object::Policy(p) => Some(&**p),
            _ => None,
        })
        .collect();
    assert!(
        policies.len() >= 5,
        "expected the shop's policies, got {}",
        policies.len()
    );
    for p in policies {
        assert!(apiward_crds::validate(&p.spec).is_empty());
        // What the API server would run must accept them too.
        let problems = admission(&serde_json::to_value(p).unwrap());
        assert!(problems.is_empty(), "{:?}: {problems:#?}", p.metadata.name);
    }
}

/// One refusal by (emulated) admission.
#[derive(Debug)]
#[expect(dead_code, reason = "read through Debug in assertion messages")]
struct Refusal {
    by: &'static str,
    field: String,
    message: String,
}

fn crd_schema() -> Value {
    let crd = serde_json::to_value(ApiPolicy::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// `/spec/rules/0/bind` → `spec.rules[0].bind`
fn pointer_to_path(p: &str) -> String {
    let mut out = String::new();
    for tok in p.split('/').skip(1) {
        if tok.chars().all(|c| c.is_ascii_digit()) && !tok.is_empty() {
            out.push_str(&format!("[{tok}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(tok);
        }
    }
    out
}

/// Strict field validation and list-map key uniqueness, as the API server applies them.
fn structural(schema: &Value, value: &Value, path: &str, out: &mut Vec<Refusal>) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let open = schema
                .get("additionalProperties")
                .is_some_and(Value::is_object)
                || schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match props.and_then(|p| p.get(k)) {
                    Some(s) => structural(s, v, &child, out),
                    None if open => {
                        if let Some(ap) =
                            schema.get("additionalProperties").filter(|a| a.is_object())
                        {
                            structural(ap, v, &child, out);
                        }
                    }
                    None if path.is_empty()
                        && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                    None => out.push(Refusal {
                        by: "schema",
                        field: child,
                        message: "unknown field".into(),
                    }),
                }
            }
        }
        Value::Array(items) => {
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<Value> = keys.iter().map(|k| item[*k].clone()).collect();
                    if seen.contains(&key) {
                        out.push(Refusal {
                            by: "schema",
                            field: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {key:?}"),
                        });
                    }
                    seen.push(key);
                }
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    structural(s, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// What the API server would refuse, in the order it checks: schema, then CEL.
fn admission(obj: &Value) -> Vec<Refusal> {
    let schema = crd_schema();
    let mut out = Vec::new();
    structural(&schema, obj, "", &mut out);
    let validator = jsonschema::validator_for(&schema).unwrap();
    for e in validator.iter_errors(obj) {
        out.push(Refusal {
            by: "schema",
            field: pointer_to_path(&e.instance_path().to_string()),
            message: e.to_string(),
        });
    }
    if !out.is_empty() {
        return out; // CEL runs only on objects that pass the schema.
    }
    if let Err(errors) =
        kube::core::cel::Validator::new().validate_with_defaults(&schema, obj, None)
    {
        for e in errors.into_vec() {
            out.push(Refusal {
                by: "cel",
                field: e.field_path.clone(),
                message: e.message.clone(),
            });
        }
    }
    out
}

struct Expectation {
    file: PathBuf,
    field: String,
    message: String,
    admission: Option<(String, String)>,
}

fn expectations() -> Vec<Expectation> {
    let mut out = Vec::new();
    for file in load::yaml_files(&[repo("examples-invalid")]).unwrap() {
        let text = std::fs::read_to_string(&file).unwrap();
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{}: missing '# {key}:' header", file.display()))
                .to_owned()
        };
        let expect = header("expect");
        let (field, message) = expect.split_once(": ").expect("expect: <field>: <message>");
        let admission = header("admission");
        let admission = match admission.as_str() {
            "none" => None,
            other => {
                let (by, field) = other
                    .split_once(' ')
                    .expect("admission: <schema|cel|webhook> <field>");
                Some((by.to_owned(), field.to_owned()))
            }
        };
        out.push(Expectation {
            file,
            field: field.into(),
            message: message.into(),
            admission,
        });
    }
    out
}

#[test]
fn every_invalid_example_fails_with_its_field_and_message() {
    let cases = expectations();
    assert!(
        cases.len() >= 12,
        "need at least 12 invalid examples, have {}",
        cases.len()
    );
    for case in cases {
        let input = load::read(std::slice::from_ref(&case.file)).unwrap();
        assert!(
            input.objects.is_empty(),
            "{}: was accepted",
            case.file.display()
        );
        let hit = input.findings.iter().any(|f| {
            f.field.as_deref() == Some(case.field.as_str()) && f.message.contains(&case.message)
        });
        assert!(
            hit,
            "{}: expected `{}: {}`, got {:#?}",
            case.file.display(),
            case.field,
            case.message,
            input.findings
        );
        assert!(
            input
                .findings
                .iter()
                .all(|f| f.object.as_deref() == Some("ApiPolicy shop/bad"))
        );
    }
}

/// Each invalid example says which part of admission refuses it: the CRD's schema, its
/// CEL rules, or (what relates one part of a spec to another, and what CEL cannot express)
/// the operator's validating webhook, which runs the loader `apiward check` runs
/// (tests/admission.rs sends each one to it over HTTPS).
#[test]
fn every_invalid_example_is_refused_at_admission_by_the_part_it_names() {
    let mut caught_by = std::collections::BTreeMap::<String, usize>::new();
    for case in expectations() {
        let text = std::fs::read_to_string(&case.file).unwrap();
        let obj: Value = serde_norway::from_str(&text).unwrap();
        let refusals = admission(&obj);
        let Some((by, field)) = &case.admission else {
            panic!(
                "{}: every invalid example must be refused at admission (schema, cel or webhook)",
                case.file.display()
            );
        };
        *caught_by.entry(by.clone()).or_default() += 1;
        match by.as_str() {
            "webhook" => {
                assert!(
                    refusals.is_empty(),
                    "{}: marked as the webhook's, but the schema or CEL refuses it: {refusals:#?}",
                    case.file.display()
                );
                let input = load::read(std::slice::from_ref(&case.file)).unwrap();
                assert!(
                    input
                        .findings
                        .iter()
                        .any(|f| f.field.as_deref() == Some(field.as_str())),
                    "{}: the webhook's loader does not refuse {field}: {:#?}",
                    case.file.display(),
                    input.findings
                );
            }
            "schema" | "cel" => assert!(
                refusals.iter().any(|r| r.by == by && &r.field == field),
                "{}: expected {by} to refuse {field}, got {refusals:#?}",
                case.file.display()
            ),
            other => panic!("{}: unknown admission part {other}", case.file.display()),
        }
    }
    assert!(
        caught_by.get("cel").copied().unwrap_or(0) >= 8,
        "only {caught_by:?} cases exercise the CEL rules"
    );
    assert!(
        caught_by.get("webhook").copied().unwrap_or(0) >= 2,
        "{caught_by:?}"
    );
}
