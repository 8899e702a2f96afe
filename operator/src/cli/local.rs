//! `apiward local`: the control plane without a cluster. `serve` runs the identity endpoint
//! with a local CA and, with `--policies` and `--mesh`, the config server: policies and
//! workloads come from files, are compiled and pushed to the sidecars, and status is
//! written next to each policy file. `token` mints tokens in the projected-token format,
//! signed by a local key (what the kubelet and TokenReview do in a cluster). Both keys
//! live in `--state-dir`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::identity::{AUDIENCE, Ca, Issuance, LocalTokens};
use crate::serve::config::ConfigHub;
use crate::serve::identity::IdentityCounters;
use crate::serve::{Endpoints, serve, server_tls};

use super::EXIT_USAGE;

/// `apiward local`.
#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    command: LocalCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LocalCommand {
    /// Serve the identity endpoint (POST /v1/certificates) over TLS with a local CA.
    Serve(ServeArgs),
    /// Print a token for a workload, as the kubelet would project it (local mode only).
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the CA and the token-signing key are kept (created on first start).
    #[arg(long, default_value = ".apiward")]
    state_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: std::net::SocketAddr,
    /// Trust domain of issued SPIFFE IDs.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of issued workload certificates (e.g. 24h, 90s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Names in the server's own certificate (DNS names or IP addresses).
    #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    server_names: Vec<String>,
    /// Policies (a directory of YAML files, or one file): compiled and pushed to the
    /// sidecars on every change; status is written next to each file.
    #[arg(long, requires = "mesh")]
    policies: Option<PathBuf>,
    /// The mesh file: the workloads (name, namespace, labels, serviceAccount, ports).
    #[arg(long, requires = "policies")]
    mesh: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// Where the token-signing key is kept (as for `serve`).
    #[arg(long, default_value = ".apiward")]
    state_dir: PathBuf,
    /// The workload's namespace.
    #[arg(long, short)]
    namespace: String,
    /// The workload's ServiceAccount.
    #[arg(long)]
    service_account: String,
    /// The pod the token is bound to.
    #[arg(long)]
    pod: Option<String>,
    /// Audience (sidecars use `apiward`).
    #[arg(long, default_value = AUDIENCE)]
    audience: String,
    /// Lifetime.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    apiward_policy::duration::parse_duration(s).map_err(|e| e.to_string())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Writes a file readable only by its owner.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The local CA: loaded from `<dir>/ca/`, or created there.
fn load_or_create_ca(dir: &Path, trust_domain: &str) -> Result<Ca, String> {
    let ca_dir = dir.join("ca");
    let files = ["tls.crt", "tls.key", "ca.crt"];
    if ca_dir.join("tls.key").exists() {
        let mut data = std::collections::BTreeMap::new();
        for f in files {
            if let Ok(b) = std::fs::read(ca_dir.join(f)) {
                data.insert(f.to_owned(), b);
            }
        }
        return Ca::from_secret_data(&data).map_err(|e| format!("{}: {e}", ca_dir.display()));
    }
    let ca = Ca::generate(trust_domain, now()).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&ca_dir).map_err(|e| format!("{}: {e}", ca_dir.display()))?;
    for (k, v) in ca.to_secret_data() {
        write_private(&ca_dir.join(&k), &v).map_err(|e| format!("{k}: {e}"))?;
    }
    Ok(ca)
}

fn load_or_create_tokens(dir: &Path) -> Result<LocalTokens, String> {
    let path = dir.join("token-signing.key");
    if let Ok(pem) = std::fs::read_to_string(&path) {
        return LocalTokens::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()));
    }
    let t = LocalTokens::generate().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_private(&path, t.key_pem().as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(t)
}

/// Runs `apiward local`.
pub fn run(args: LocalArgs) -> ExitCode {
    let result = match args.command {
        LocalCommand::Serve(a) => serve_local(a),
        LocalCommand::Token(a) => load_or_create_tokens(&a.state_dir).and_then(|t| {
            let token = t
                .mint(
                    &a.namespace,
                    &a.service_account,
                    a.pod.as_deref(),
                    &a.audience,
                    now(),
                    a.ttl.as_secs() as i64,
                )
                .map_err(|e| e.to_string())?;
            println!("{token}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apiward local: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn serve_local(a: ServeArgs) -> Result<(), String> {
    super::json_logs();
    let ca = load_or_create_ca(&a.state_dir, &a.trust_domain)?;
    let tokens = load_or_create_tokens(&a.state_dir)?;
    let bundle = a.state_dir.join("trust-bundle.pem");
    std::fs::write(&bundle, ca.trust_bundle_pem())
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    let sources = match (&a.policies, &a.mesh) {
        (Some(p), Some(m)) => {
            crate::local::MeshFile::read(m)?;
            Some(crate::local::LocalSources::new(p, m, &a.trust_domain))
        }
        _ => None,
    };
    let (chain, key) = ca
        .server_certificate(&a.server_names, Duration::from_secs(365 * 24 * 3600), now())
        .map_err(|e| e.to_string())?;
    let tls = server_tls(&chain, &key, Some(ca.trust_bundle_pem()))?;
    let issuance = Arc::new(Issuance {
        ca: Arc::new(ca),
        reviewer: Arc::new(tokens),
        trust_domain: a.trust_domain.clone(),
        lifetime: a.cert_lifetime,
    });
    let rt = super::runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(listen = %addr, trust_domain = %a.trust_domain, trust_bundle = %bundle.display(), "apiward local: identity endpoint serving");
        let hub = sources.map(|s| {
            let hub = Arc::new(ConfigHub::new(&a.trust_domain));
            tokio::spawn(crate::local::run(s, hub.clone()));
            hub
        });
        let endpoints = Endpoints {
            issuance,
            counters: Arc::new(IdentityCounters::default()),
            hub,
        };
        serve(listener, tls, endpoints).await;
        Ok(())
    })
}
