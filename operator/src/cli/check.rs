//! `apiward check`: read, validate and report, for people or for CI.

use std::process::ExitCode;

use serde::Serialize;

use super::{CheckArgs, EXIT_FAILED, EXIT_USAGE, Output};
use crate::load::{self, Finding, Object, Severity};

#[derive(Debug, Serialize)]
struct Summary {
    files: usize,
    policies: usize,
    errors: usize,
    warnings: usize,
    ok: bool,
    findings: Vec<Finding>,
}

pub(super) fn run(args: &CheckArgs) -> ExitCode {
    let input = match load::read(&args.paths) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("apiward check: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let policies = input
        .objects
        .iter()
        .filter(|o| matches!(o.object, Object::Policy(_)))
        .count();
    let mut findings = input.findings;
    findings.sort();
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    let ok = errors == 0 && (!args.strict || warnings == 0);
    let summary = Summary {
        files: input.files,
        policies,
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
                "checked {} policies in {} files: {} errors, {} warnings{}",
                summary.policies,
                summary.files,
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
