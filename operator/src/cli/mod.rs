//! The `apiward` command line: one subcommand per job. Exit codes: 0 ok, 1 policy errors
//! or failing tests, 2 usage errors (bad flags, unreadable paths).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod check;
mod cluster;
#[cfg(feature = "demo")]
mod demo;
mod explain;
mod inventory;
mod local;
mod operator;
pub mod scenario;

/// apiward: API security in the mesh.
#[derive(Debug, Parser)]
#[command(name = "apiward", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policies offline (files and directories of YAML), as admission would.
    Check(CheckArgs),
    /// Say why a request would be allowed or denied, rule by rule.
    Explain(explain::ExplainArgs),
    /// Print the ApiPolicy CustomResourceDefinition (YAML).
    Crds,
    /// The endpoints the sidecars served, with shadow, zombie and unauthenticated flags.
    Inventory(inventory::InventoryArgs),
    /// The control plane on a cluster (in a pod, or out of cluster with KUBECONFIG).
    Operator(Box<operator::OperatorArgs>),
    /// The control plane without a cluster (local CA and tokens).
    Local(local::LocalArgs),
    /// The whole product on this machine: a small shop, sidecars, attacks, a report.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For tools: one JSON document on stdout.
    Json,
}

/// `apiward check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Files or directories (searched recursively for *.yaml / *.yml; `-` is standard
    /// input). With `--cluster`, only their policy tests and extra objects.
    #[arg(required_unless_present = "cluster")]
    pub paths: Vec<PathBuf>,
    /// Check the ApiPolicies in force in the cluster (kubeconfig as kubectl), with the
    /// Secrets and ConfigMaps they reference.
    #[arg(long)]
    pub cluster: bool,
    /// With `--cluster`: only this namespace.
    #[arg(long, short, requires = "cluster")]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "text")]
    pub output: Output,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
}

/// Exit code for a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for policy errors or failing tests.
pub const EXIT_FAILED: u8 = 1;

/// JSON logs on stderr for the long-running commands (`RUST_LOG` filters; default info).
fn json_logs() {
    let _ = crate::telemetry::init("apiward", None);
}

/// The runtime of the long-running commands (two workers: the machines are small).
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Local(args) => local::run(args),
        Command::Operator(args) => operator::run(&args),
        Command::Inventory(args) => inventory::run(&args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args),
        Command::Crds => {
            print!("{}", apiward_crds::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}
