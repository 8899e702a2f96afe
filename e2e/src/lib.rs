//! apiward end-to-end tests live in `tests/`; see `README.md` for why each exists. This
//! library holds what they share: the operator's identity endpoint, temporary directories,
//! and (in [`netns`]) network-namespace "pods" wired to a bridge.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod env;
pub mod mesh;
pub mod netns;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiward::identity::{Ca, Issuance, LocalTokens};
use apiward::serve::config::ConfigHub;
use apiward::serve::identity::IdentityCounters;
use apiward::serve::{Endpoints, serve, server_tls};

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A fresh directory under the system temp dir (readable by other users, so a sidecar
/// running under its own UID can read its settings).
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "apiward-e2e-{name}-{}-{}",
        std::process::id(),
        now()
    ));
    std::fs::create_dir_all(&d).expect("create the temp dir");
    d
}

/// Removes a file when dropped (the large binaries tests copy into their temp dirs), even
/// when the test fails.
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The operator's identity endpoint, running in this process.
pub struct Operator {
    /// The mesh CA.
    pub ca: Arc<Ca>,
    /// The local token signer (stands in for the API server's TokenReview).
    pub tokens: Arc<LocalTokens>,
    /// Issued and refused counts.
    pub counters: Arc<IdentityCounters>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The pods it knows and their configs (publish into it), and their reports.
    pub hub: Arc<ConfigHub>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts the identity and config endpoints on `bind`, with a server certificate for `names` (DNS names
/// or IP addresses), issuing workload certificates of `lifetime` for trust domain
/// `cluster.local`.
pub async fn start_operator(
    ca: Ca,
    tokens: LocalTokens,
    bind: SocketAddr,
    names: &[&str],
    lifetime: Duration,
) -> Operator {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let (chain, key) = ca
        .server_certificate(&names, Duration::from_secs(3600), now())
        .expect("server certificate");
    let ca = Arc::new(ca);
    let tokens = Arc::new(tokens);
    let counters = Arc::new(IdentityCounters::default());
    let issuance = Arc::new(Issuance {
        ca: ca.clone(),
        reviewer: tokens.clone(),
        trust_domain: "cluster.local".into(),
        lifetime,
    });
    let hub = Arc::new(ConfigHub::new("cluster.local"));
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .expect("bind the identity endpoint");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(serve(
        listener,
        server_tls(&chain, &key, Some(ca.trust_bundle_pem())).expect("server TLS"),
        Endpoints {
            issuance,
            counters: counters.clone(),
            hub: Some(hub.clone()),
        },
    ));
    Operator {
        ca,
        tokens,
        counters,
        addr,
        hub,
    }
}
