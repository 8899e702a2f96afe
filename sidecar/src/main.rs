//! `apiward-sidecar` — see the library docs.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// apiward's sidecar: enforces API policy in front of one app.
#[derive(Debug, Parser)]
#[command(name = "apiward-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: the inbound proxy and the admin endpoints.
    Run {
        /// Settings file (YAML or JSON) with the policy (standalone mode).
        #[arg(
            long,
            env = "APIWARD_SIDECAR_CONFIG",
            required_unless_present = "settings"
        )]
        config: Option<PathBuf>,
        /// The settings themselves (JSON), as the injector passes them; written to
        /// `$TMPDIR/apiward-sidecar.json` (an in-memory emptyDir in a pod) and read from there.
        #[arg(
            long,
            env = "APIWARD_SIDECAR_SETTINGS",
            conflicts_with = "config",
            hide_env_values = true
        )]
        settings: Option<String>,
        /// Worker threads (default: the CPUs this process may run on).
        #[arg(long, env = "APIWARD_SIDECAR_THREADS")]
        threads: Option<usize>,
        /// Log format.
        #[arg(long, env = "APIWARD_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
        log_format: String,
        /// Log filter (tracing EnvFilter syntax).
        #[arg(long, env = "APIWARD_LOG", default_value = "info")]
        log: String,
    },
    /// Install the iptables (nat) rules that send the pod's inbound TCP to the inbound
    /// listener and the app's outbound TCP to the outbound listener. Idempotent.
    Init {
        /// Print the rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
        /// Remove the rules instead.
        #[arg(long, conflicts_with = "dry_run")]
        remove: bool,
        /// The iptables binary (default `iptables`, or `ip6tables` with --ipv6).
        #[arg(long)]
        iptables: Option<String>,
        #[command(flatten)]
        rules: apiward_sidecar::init::InitOptions,
    },
}

fn init(
    dry_run: bool,
    remove: bool,
    iptables: Option<&str>,
    opts: &apiward_sidecar::init::InitOptions,
) -> ExitCode {
    use apiward_sidecar::init as rules;
    let done = if dry_run {
        print!("{}", opts.script());
        Ok(())
    } else if remove {
        rules::remove(opts.ipv6, iptables)
    } else {
        rules::install(opts, iptables)
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apiward-sidecar init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let (config, threads, log_format, log) = match Cli::parse().command {
        Command::Run {
            config,
            settings,
            threads,
            log_format,
            log,
        } => {
            let config = match (config, settings) {
                (Some(c), _) => c,
                (None, Some(text)) => {
                    let path = std::env::temp_dir().join("apiward-sidecar.json");
                    if let Err(e) = std::fs::write(&path, text) {
                        eprintln!("apiward-sidecar: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                    path
                }
                (None, None) => {
                    eprintln!(
                        "apiward-sidecar run: --config FILE or APIWARD_SIDECAR_SETTINGS is required"
                    );
                    return ExitCode::from(2);
                }
            };
            (config, threads, log_format, log)
        }
        Command::Init {
            dry_run,
            remove,
            iptables,
            rules,
        } => return init(dry_run, remove, iptables.as_deref(), &rules),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One worker: a current-thread runtime (no work stealing, no cross-thread wake-ups).
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apiward-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match apiward_sidecar::start(&config).await {
            Ok((shared, _)) => {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                let terminated = async {
                    match term.as_mut() {
                        Some(t) => {
                            t.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! { _ = terminated => {}, _ = tokio::signal::ctrl_c() => {} }
                apiward_sidecar::shutdown(&shared).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("apiward-sidecar: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
