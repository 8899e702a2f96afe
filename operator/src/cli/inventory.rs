//! `apiward inventory`: the endpoints the sidecars actually served, as the policies'
//! status holds them (`status.inventory`), kubectl-style. `--local DIR` reads the status
//! files `apiward local serve` writes next to each policy file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{EXIT_USAGE, Output};

/// `apiward inventory`.
#[derive(Debug, clap::Args)]
pub struct InventoryArgs {
    /// Only this policy (`name` or `namespace/name`).
    policy: Option<String>,
    /// Only policies in this namespace.
    #[arg(long, short)]
    namespace: Option<String>,
    /// Read the status files of local mode under this directory (the `--policies` of
    /// `apiward local serve`) instead of the cluster's ApiPolicies.
    #[arg(long, value_name = "DIR")]
    local: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

/// The policies' status files, as the control plane wrote them.
pub fn statuses(policies: &Path) -> Vec<(String, apiward_crds::ApiPolicyStatus)> {
    let files = crate::load::yaml_files(&[policies.to_owned()]).unwrap_or_default();
    files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".status.yaml"))
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|t| serde_norway::from_str::<crate::local::StatusFile>(&t).ok())
        .flat_map(|s| s.policies)
        .collect()
}

/// The inventory the sidecars reported, as the policies' status holds it.
pub fn print_table(statuses: &[(String, apiward_crds::ApiPolicyStatus)]) {
    println!(
        "  {:<14} {:<6} {:<30} {:>5} {:>5} {:>5} {:>5}  flags",
        "policy", "method", "path", "reqs", "2xx", "4xx", "5xx"
    );
    for (name, st) in statuses {
        let Some(inv) = &st.inventory else { continue };
        for e in &inv.endpoints {
            let n = |c: &str| e.responses.get(c).copied().unwrap_or(0);
            let flags: Vec<&str> = [
                (e.shadow, "shadow"),
                (e.zombie, "zombie"),
                (e.unauthenticated > 0, "unauthenticated"),
                (e.unused, "unused"),
                (
                    !e.declared && !e.shadow && e.denied == e.requests,
                    "undeclared, refused",
                ),
                (
                    !e.declared && !e.shadow && e.denied < e.requests,
                    "inferred",
                ),
            ]
            .into_iter()
            .filter_map(|(on, f)| on.then_some(f))
            .collect();
            println!(
                "  {:<14} {:<6} {:<30} {:>5} {:>5} {:>5} {:>5}  {}",
                name.trim_start_matches("shop/"),
                e.method,
                e.path,
                e.requests,
                n("2xx"),
                n("4xx"),
                n("5xx"),
                flags.join(", ")
            );
        }
    }
}

/// Runs `apiward inventory`.
/// The statuses of the cluster's ApiPolicies (in `namespace`, or all).
fn cluster_statuses(
    namespace: Option<&str>,
) -> Result<Vec<(String, apiward_crds::ApiPolicyStatus)>, String> {
    let ns = namespace.map(str::to_owned);
    let policies = super::cluster::with_client(async move |c| {
        super::cluster::policies(&c, ns.as_deref()).await
    })?;
    Ok(policies
        .into_iter()
        .filter_map(|p| {
            let name = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or("default"),
                p.metadata.name.as_deref().unwrap_or("")
            );
            Some((name, p.status?))
        })
        .collect())
}

pub fn run(args: &InventoryArgs) -> ExitCode {
    let (all, source) = match &args.local {
        Some(dir) if !dir.is_dir() => {
            eprintln!("apiward inventory: {} is not a directory", dir.display());
            return ExitCode::from(EXIT_USAGE);
        }
        Some(dir) => (
            statuses(dir),
            format!(
                "under {} (is `apiward local serve` running on it?)",
                dir.display()
            ),
        ),
        None => match cluster_statuses(args.namespace.as_deref()) {
            Ok(s) => (
                s,
                "in the cluster (has the operator written status yet?)".to_owned(),
            ),
            Err(e) => {
                eprintln!("apiward inventory: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let wanted = |name: &str| {
        let ns_ok = args
            .namespace
            .as_deref()
            .is_none_or(|ns| name.split('/').next() == Some(ns));
        let name_ok = args
            .policy
            .as_deref()
            .is_none_or(|p| name == p || name.split('/').nth(1) == Some(p));
        ns_ok && name_ok
    };
    let found: Vec<_> = all.into_iter().filter(|(n, _)| wanted(n)).collect();
    if found.is_empty() {
        eprintln!("apiward inventory: no status for a matching policy {source}");
        return ExitCode::from(super::EXIT_FAILED);
    }
    let as_map = || -> std::collections::BTreeMap<&str, Option<&apiward_crds::Inventory>> {
        found
            .iter()
            .map(|(n, s)| (n.as_str(), s.inventory.as_ref()))
            .collect()
    };
    match args.output {
        Output::Text => print_table(&found),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&as_map()).unwrap_or_default()
        ),
    }
    ExitCode::SUCCESS
}
