//! `apiward check`: read, validate and report, for people or for CI.

use std::process::ExitCode;

use serde::{Deserialize, Serialize};

use super::{CheckArgs, EXIT_FAILED, EXIT_USAGE, Output, scenario};
use crate::load::{self, Finding, Object, Severity};

#[derive(Debug, Serialize)]
struct Summary {
    files: usize,
    policies: usize,
    tests: usize,
    tests_failed: usize,
    errors: usize,
    warnings: usize,
    ok: bool,
    findings: Vec<Finding>,
}

pub(super) fn run(args: &CheckArgs) -> ExitCode {
    let mut input = match load::read(&args.paths) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("apiward check: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.cluster {
        let ns = args.namespace.clone();
        match super::cluster::with_client(async move |c| {
            super::cluster::read(&c, ns.as_deref()).await
        }) {
            Ok(live) => {
                input.files += live.files;
                input.objects.extend(live.objects);
            }
            Err(e) => {
                eprintln!("apiward check --cluster: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let policies = input
        .objects
        .iter()
        .filter(|o| matches!(o.object, Object::Policy(_)))
        .count();
    let mut findings = input.findings.clone();
    for o in &input.objects {
        if let Object::Policy(p) = &o.object {
            let name = format!(
                "ApiPolicy {}/{}",
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.metadata.name.as_deref().unwrap_or("")
            );
            for l in crate::compile::lint::lint(p) {
                findings.push(Finding {
                    severity: Severity::Warning,
                    origin: o.origin.clone(),
                    object: Some(name.clone()),
                    field: Some(l.field),
                    code: l.code.into(),
                    message: format!("{} (fix: {})", l.message, l.fix),
                });
            }
        }
    }
    let (tests, tests_failed) = run_tests(&input, &mut findings);
    findings.sort();
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    let ok = errors == 0 && tests_failed == 0 && (!args.strict || warnings == 0);
    let summary = Summary {
        files: input.files,
        policies,
        tests,
        tests_failed,
        errors,
        warnings,
        ok,
        findings,
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("findings always serialize")
        ),
        Output::Text => {
            for f in &summary.findings {
                println!("{f}");
            }
            println!(
                "checked {} policies in {} files, ran {} policy tests ({} failed): {} errors, {} warnings{}",
                summary.policies,
                summary.files,
                summary.tests,
                summary.tests_failed,
                summary.errors,
                summary.warnings,
                if ok { "" } else { " — FAILED" }
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// A policy test file (`*.test.yaml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    workload: scenario::TestWorkload,
    request: scenario::TestRequest,
    #[serde(default)]
    caller: scenario::Caller,
    /// RFC 3339 instant the request happens at (default: now).
    #[serde(default)]
    now: Option<String>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    allowed: Option<bool>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    /// `rule-name` or `policy/rule-name`.
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    #[serde(rename = "wouldDeny")]
    would_deny: Option<bool>,
}

fn test_finding(file: &std::path::Path, name: &str, message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        origin: load::Origin {
            file: file.to_owned(),
            document: 0,
        },
        object: Some(format!("test {name:?}")),
        field: None,
        code: "test-failed".into(),
        message,
    }
}

/// Runs every policy test; returns (tests run, tests failed).
fn run_tests(input: &load::Input, findings: &mut Vec<Finding>) -> (usize, usize) {
    let (mut ran, mut failed) = (0, 0);
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for file in &input.test_files {
        let parsed: Result<TestFile, String> = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_norway::from_str(&t).map_err(|e| e.to_string()));
        let tf = match parsed {
            Ok(tf) => tf,
            Err(e) => {
                findings.push(test_finding(
                    file,
                    "<file>",
                    format!("cannot read policy tests: {e}"),
                ));
                failed += 1;
                continue;
            }
        };
        for case in tf.tests {
            ran += 1;
            let now = match case.now.as_deref().map(apiward_policy::time::parse_rfc3339) {
                Some(Some(s)) => s as u64 * 1000,
                Some(None) => {
                    findings.push(test_finding(
                        file,
                        &case.name,
                        "now is not an RFC 3339 instant".into(),
                    ));
                    failed += 1;
                    continue;
                }
                None => wall_now,
            };
            let got = match scenario::run(
                input,
                &case.workload,
                &case.request,
                &case.caller,
                "cluster.local",
                now,
            ) {
                Ok(o) => o,
                Err(e) => {
                    findings.push(test_finding(file, &case.name, e));
                    failed += 1;
                    continue;
                }
            };
            let mut wrong = Vec::new();
            let e = &case.expect;
            if e.allowed.is_some_and(|a| a != got.allowed) {
                wrong.push(format!(
                    "allowed: expected {}, got {}",
                    e.allowed.unwrap_or_default(),
                    got.allowed
                ));
            }
            if e.status.is_some_and(|s| s != got.status) {
                wrong.push(format!(
                    "status: expected {}, got {}",
                    e.status.unwrap_or_default(),
                    got.status
                ));
            }
            if e.reason.as_deref().is_some_and(|r| r != got.reason) {
                wrong.push(format!(
                    "reason: expected {}, got {}",
                    e.reason.as_deref().unwrap_or(""),
                    got.reason
                ));
            }
            if e.would_deny.is_some_and(|w| w != got.would_deny) {
                wrong.push(format!(
                    "wouldDeny: expected {}, got {}",
                    e.would_deny.unwrap_or_default(),
                    got.would_deny
                ));
            }
            if let Some(want) = &e.rule {
                let ok = got
                    .rule
                    .as_deref()
                    .is_some_and(|r| r == want || r.ends_with(&format!("/{want}")));
                if !ok {
                    wrong.push(format!(
                        "rule: expected {want}, got {}",
                        got.rule.as_deref().unwrap_or("none")
                    ));
                }
            }
            if !wrong.is_empty() {
                failed += 1;
                let detail = got.detail.map(|d| format!(" ({d})")).unwrap_or_default();
                findings.push(test_finding(
                    file,
                    &case.name,
                    format!("{}{detail}", wrong.join("; ")),
                ));
            }
        }
    }
    (ran, failed)
}
