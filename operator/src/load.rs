//! Reading policies and the objects they reference from files: the local-mode source.
//!
//! Files and directories (recursively, `*.yaml`/`*.yml`, sorted) are split into YAML
//! documents; each document becomes an [`Object`] or a [`Finding`] that says exactly which
//! file, document, object and field is wrong. Unknown fields are errors, as with
//! `kubectl apply` (strict field validation): a typo must never silently drop a rule.

use std::fmt;
use std::path::{Path, PathBuf};

use apiward_crds::{ApiPolicy, FieldError};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(
                f,
                "{} (document {})",
                self.file.display(),
                self.document + 1
            )
        }
    }
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The object is refused.
    Error,
    /// The object works but is probably not what was meant.
    Warning,
}

/// One problem found in the input.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// File and document.
    #[serde(flatten)]
    pub origin: Origin,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// Field path, when known (`spec.rules[0].bind`).
    pub field: Option<String>,
    /// Stable code (`invalid`, `parse`, `AW001`…).
    pub code: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {sev}[{}]", self.origin, self.code)?;
        if let Some(o) = &self.object {
            write!(f, " {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, " {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A document that parsed into a known kind.
#[derive(Debug, Clone)]
pub enum Object {
    /// An `apiward.io/v1alpha1` `ApiPolicy`.
    Policy(Box<ApiPolicy>),
    /// A Secret (API keys, JWKS).
    Secret(Box<Secret>),
    /// A ConfigMap (OpenAPI documents).
    ConfigMap(Box<ConfigMap>),
}

/// A parsed document with its origin.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Where it came from.
    pub origin: Origin,
    /// What it is.
    pub object: Object,
}

/// Everything read from a set of paths.
#[derive(Debug, Default)]
pub struct Input {
    /// Documents that parsed.
    pub objects: Vec<Loaded>,
    /// Problems, including documents that did not parse.
    pub findings: Vec<Finding>,
    /// Files read.
    pub files: usize,
    /// Policy test files found (`*.test.yaml`), not parsed here.
    pub test_files: Vec<PathBuf>,
}

/// Error reading the paths themselves (a usage error, not a policy error).
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    /// The path.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Is this a policy test file?
pub fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

fn is_status_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".status.yaml"))
}

/// Lists the YAML files under the given paths, sorted, directories recursively.
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReadError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| ReadError {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| ReadError {
                    path: p.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let files: Vec<PathBuf> = entries
                .into_iter()
                .filter(|e| e.is_dir() || e.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            out.extend(yaml_files(&files)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads every document under the given paths; `-` is standard input (e.g. the output
/// of `kustomize build`), named `<stdin>` in findings.
pub fn read(paths: &[PathBuf]) -> Result<Input, ReadError> {
    let mut input = Input::default();
    let (stdin, paths): (Vec<PathBuf>, Vec<PathBuf>) =
        paths.iter().cloned().partition(|p| p.as_os_str() == "-");
    if !stdin.is_empty() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
            ReadError {
                path: "-".into(),
                source,
            }
        })?;
        input.files += 1;
        read_str(&mut input, Path::new("<stdin>"), &text);
    }
    for file in yaml_files(&paths)? {
        if is_status_file(&file) {
            continue;
        }
        if is_test_file(&file) {
            input.test_files.push(file);
            continue;
        }
        let text = std::fs::read_to_string(&file).map_err(|source| ReadError {
            path: file.clone(),
            source,
        })?;
        input.files += 1;
        read_str(&mut input, &file, &text);
    }
    Ok(input)
}

/// Splits YAML text into documents and parses each one.
pub fn read_str(input: &mut Input, file: &Path, text: &str) {
    for (document, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document,
        };
        let value = match Value::deserialize(de) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                input
                    .findings
                    .push(finding(&origin, None, None, "parse", e.to_string()));
                // After a syntax error the rest of the stream cannot be trusted.
                break;
            }
        };
        match parse_document(&origin, value) {
            Ok(Some(object)) => input.objects.push(Loaded { origin, object }),
            Ok(None) => {}
            Err(f) => input.findings.extend(f),
        }
    }
}

fn finding(
    origin: &Origin,
    object: Option<String>,
    field: Option<String>,
    code: &str,
    message: String,
) -> Finding {
    Finding {
        severity: Severity::Error,
        origin: origin.clone(),
        object,
        field,
        code: code.into(),
        message,
    }
}

/// Turns one YAML document into an object, or the findings that explain why not.
/// Kinds apiward does not use are skipped (`Ok(None)`), so a directory of manifests works.
pub fn parse_document(origin: &Origin, value: Value) -> Result<Option<Object>, Vec<Finding>> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let label = Some(format!("{kind} {ns}/{name}"));
    match (api_version, kind) {
        ("apiward.io/v1alpha1", "ApiPolicy") => {
            let schema_input = value.clone();
            let mut policy: ApiPolicy = strict(origin, &label, value)?;
            if policy.metadata.name.as_deref().unwrap_or("").is_empty() {
                return Err(vec![finding(
                    origin,
                    label,
                    Some("metadata.name".into()),
                    "invalid",
                    "metadata.name is required".into(),
                )]);
            }
            policy
                .metadata
                .namespace
                .get_or_insert_with(|| "default".into());
            let errors = policy_errors(&policy, schema_input);
            if errors.is_empty() {
                Ok(Some(Object::Policy(Box::new(policy))))
            } else {
                Err(errors
                    .into_iter()
                    .map(|FieldError { field, message }| {
                        finding(origin, label.clone(), Some(field), "invalid", message)
                    })
                    .collect())
            }
        }
        (v, "ApiPolicy") if v.starts_with("apiward.io/") => Err(vec![finding(
            origin,
            label,
            Some("apiVersion".into()),
            "parse",
            format!("unsupported apiVersion {v:?}: this apiward reads apiward.io/v1alpha1"),
        )]),
        ("v1", "Secret") => {
            let mut s: Secret = strict(origin, &label, value)?;
            s.metadata.namespace.get_or_insert_with(|| "default".into());
            Ok(Some(Object::Secret(Box::new(s))))
        }
        ("v1", "ConfigMap") => {
            let mut c: ConfigMap = strict(origin, &label, value)?;
            c.metadata.namespace.get_or_insert_with(|| "default".into());
            Ok(Some(Object::ConfigMap(Box::new(c))))
        }
        ("", _) | (_, "") => Err(vec![finding(
            origin,
            None,
            None,
            "parse",
            "not a Kubernetes object: apiVersion and kind are required".into(),
        )]),
        _ => Ok(None),
    }
}

/// Every problem of a policy that parsed: [`apiward_crds::validate`], plus what the CRD's
/// OpenAPI schema refuses (lengths, list sizes, patterns), so `apiward check` refuses
/// everything the API server's schema validation would. Where both find a problem in the
/// same field, `validate`'s message (which says how to fix it) is kept.
pub fn policy_errors(policy: &ApiPolicy, document: Value) -> Vec<FieldError> {
    let mut errors = apiward_crds::validate(&policy.spec);
    let mut schema = schema_errors(document);
    schema.retain(|s| !errors.iter().any(|e| e.field == s.field));
    errors.extend(schema);
    errors.sort();
    errors.dedup();
    errors
}

/// The CRD's `openAPIV3Schema`, compiled once.
fn crd_validator() -> Option<&'static jsonschema::Validator> {
    static VALIDATOR: std::sync::OnceLock<Option<jsonschema::Validator>> =
        std::sync::OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            use kube::CustomResourceExt;
            let crd = serde_json::to_value(ApiPolicy::crd()).ok()?;
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            jsonschema::validator_for(schema)
                .map_err(|e| tracing::error!(error = %e, "the CRD's schema does not compile"))
                .ok()
        })
        .as_ref()
}

/// What the CRD's OpenAPI schema refuses in a document (`null` fields are dropped first,
/// as the API server does for fields that are not nullable).
fn schema_errors(mut doc: Value) -> Vec<FieldError> {
    fn drop_nulls(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(drop_nulls);
            }
            Value::Array(a) => a.iter_mut().for_each(drop_nulls),
            _ => {}
        }
    }
    let Some(validator) = crd_validator() else {
        return Vec::new();
    };
    drop_nulls(&mut doc);
    validator
        .iter_errors(&doc)
        .map(|e| {
            let mut message = e.to_string();
            // The schema's messages quote the value: a long one is cut to its start.
            if let Value::String(v) = e.instance().as_ref()
                && v.chars().count() > 40
                && let Ok(quoted) = serde_json::to_string(v)
            {
                let start: String = v.chars().take(32).collect();
                let short = format!("{start:?}... ({} characters)", v.chars().count());
                message = message.replace(&quoted, &short);
            }
            FieldError {
                field: pointer_to_field(&e.instance_path().to_string()),
                message,
            }
        })
        .collect()
}

/// `/spec/rules/0/bind` → `spec.rules[0].bind` (the field paths findings use).
pub fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for tok in pointer.split('/').skip(1) {
        let tok = tok.replace("~1", "/").replace("~0", "~");
        if !tok.is_empty() && tok.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{tok}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&tok);
        }
    }
    out
}

/// Deserializes with field paths in errors, and refuses fields the type does not have.
fn strict<T: DeserializeOwned + Serialize>(
    origin: &Origin,
    label: &Option<String>,
    value: Value,
) -> Result<T, Vec<Finding>> {
    let typed: T = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        vec![finding(
            origin,
            label.clone(),
            (path != ".").then_some(path),
            "parse",
            e.into_inner().to_string(),
        )]
    })?;
    let back = serde_json::to_value(&typed).unwrap_or(Value::Null);
    let mut unknown = Vec::new();
    unknown_fields(&value, &back, String::new(), &mut unknown);
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(unknown
            .into_iter()
            .map(|field| {
                finding(
                    origin,
                    label.clone(),
                    Some(field.clone()),
                    "parse",
                    format!("unknown field {field:?} (check the spelling; the API server would drop it silently)"),
                )
            })
            .collect())
    }
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Fields present in `input` that did not survive a round trip through the typed value.
/// Empty values (`[]`, `{}`, `false`, `null`) are skipped: they serialize as absent.
fn unknown_fields(input: &Value, typed: &Value, path: String, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(tv) => unknown_fields(v, tv, p, out),
                    None if is_empty_value(v) => {}
                    // Secret/ConfigMap `stringData`/`binaryData` and the like round-trip
                    // through other fields only when types are lossy; report the rest.
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}
