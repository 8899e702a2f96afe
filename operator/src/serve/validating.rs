//! The policy validator: a validating admission webhook on 9443 (`POST /validate`).
//!
//! In: `AdmissionReview` (`admission.k8s.io/v1`) for CREATE and UPDATE of `apipolicies`
//! (the chart's `ValidatingWebhookConfiguration`; not `apipolicies/status`, which only the
//! operator writes). Out: allowed, or denied with every problem `apiward check` finds —
//! the same [`crate::load::parse_document`]: strict fields, the CRD's schema,
//! [`apiward_crds::validate`] — so admission refuses exactly what `check` refuses. The CRD's
//! CEL rules are kept cheap and local; the rules that relate one part of a spec to another
//! (a rule's `bind` to its paths, `from[].jwt.provider` to `authentication.jwt`) are
//! refused here.
//!
//! A denial is what the API server's own validation answers: code 422, reason `Invalid`,
//! the message `ApiPolicy ns/name is invalid: <field>: <why>; ...` and one
//! `details.causes` entry per field. Lints (AW001...) come back as admission warnings,
//! which `kubectl` prints. The webhook has no side effects (`sideEffects: None`), so
//! `kubectl apply --dry-run=server` runs it too.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::load::{self, Object, Origin, Severity};

/// What one review decided, for the metric.
pub const ALLOWED: &str = "allowed";
/// The policy was refused.
pub const DENIED: &str = "denied";

/// The API server truncates longer admission warnings.
const MAX_WARNING: usize = 256;

/// Answers one AdmissionReview for an `ApiPolicy` (JSON in, JSON out) and says how it
/// ended (`allowed`, `denied`, or `error` for a body that is not a review).
#[tracing::instrument(name = "policy_review", skip_all, fields(policy, result))]
pub fn review(body: &[u8]) -> (Value, &'static str) {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                json!({"error": format!("not an AdmissionReview: {e}")}),
                "error",
            );
        }
    };
    let req = &review["request"];
    let Some(uid) = req["uid"].as_str() else {
        return (json!({"error": "no request.uid in the review"}), "error");
    };
    let api_version = review["apiVersion"]
        .as_str()
        .unwrap_or("admission.k8s.io/v1");
    let answer = |response: Value| json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response});
    let operation = req["operation"].as_str().unwrap_or_default();
    let ours = req["kind"]["group"] == "apiward.io" && req["kind"]["kind"] == "ApiPolicy";
    if !ours || !matches!(operation, "CREATE" | "UPDATE") || req["object"].is_null() {
        // Not something this webhook judges (a misconfigured rule, a DELETE): let it be.
        return (answer(json!({"uid": uid, "allowed": true})), ALLOWED);
    }
    let origin = Origin {
        file: PathBuf::from("<admission>"),
        document: 0,
    };
    let object = &req["object"];
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .or(req["namespace"].as_str())
        .unwrap_or("default");
    tracing::Span::current().record("policy", format!("{namespace}/{name}"));
    let result = match load::parse_document(&origin, object.clone()) {
        Ok(Some(Object::Policy(p))) => {
            let warnings: Vec<String> = crate::compile::lint::lint(&p)
                .into_iter()
                .map(|l| {
                    truncate(format!(
                        "{} {}: {} (fix: {})",
                        l.code, l.field, l.message, l.fix
                    ))
                })
                .collect();
            let mut r = json!({"uid": uid, "allowed": true});
            if !warnings.is_empty() {
                r["warnings"] = json!(warnings);
            }
            (answer(r), ALLOWED)
        }
        Ok(_) => (answer(json!({"uid": uid, "allowed": true})), ALLOWED),
        Err(findings) => {
            let errors: Vec<_> = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            let what: Vec<String> = errors
                .iter()
                .map(|f| match &f.field {
                    Some(field) => format!("{field}: {}", f.message),
                    None => f.message.clone(),
                })
                .collect();
            let causes: Vec<Value> = errors
                .iter()
                .map(|f| {
                    let reason = if f.code == "parse" {
                        "FieldValueNotSupported"
                    } else {
                        "FieldValueInvalid"
                    };
                    json!({"reason": reason, "field": f.field.clone().unwrap_or_default(), "message": f.message})
                })
                .collect();
            let status = json!({
                "status": "Failure",
                "code": 422,
                "reason": "Invalid",
                "message": format!("ApiPolicy {namespace}/{name} is invalid: {}", what.join("; ")),
                "details": {"name": name, "group": "apiward.io", "kind": "apipolicies", "causes": causes},
            });
            (
                answer(json!({"uid": uid, "allowed": false, "status": status})),
                DENIED,
            )
        }
    };
    tracing::Span::current().record("result", result.1);
    result
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_WARNING {
        let mut end = MAX_WARNING - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}
