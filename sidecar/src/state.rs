//! The sidecar's live state: the active config (swapped atomically on reload), metrics,
//! quota counters and the JWKS client. With no active config every request is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apiward_policy::SidecarConfig;
use apiward_policy::engine::Engine;
use apiward_policy::quota::LocalQuotas;
use arc_swap::ArcSwapOption;

use crate::authn::{ApiKeySet, JwtVerifier};
use crate::metrics::Metrics;
use crate::settings::{Settings, Timeouts};

/// How often JWKS are refreshed when nothing asks sooner.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// TLS handshakes in progress at once; more wait (within the handshake timeout).
pub const MAX_HANDSHAKES: usize = 32;
/// Most keys held in memory for one Local quota (a full quota gives up its least-spent
/// key for a new one; see `LocalQuotas`).
pub const MAX_QUOTA_KEYS: usize = 16_384;

/// One loaded, validated config and everything derived from it.
pub struct Active {
    /// The settings file as loaded.
    pub settings: Settings,
    /// The policy (an empty one refuses everything).
    pub config: Option<SidecarConfig>,
    /// The compiled decision engine (shared with the next `Active` while the policy is the
    /// same).
    pub engine: Option<Arc<Engine>>,
    /// Inbound TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// JWT verifiers by provider id.
    pub jwt: HashMap<String, Arc<JwtVerifier>>,
    /// API-key sets by provider id.
    pub api_keys: HashMap<String, ApiKeySet>,
    /// Parsed limit durations.
    pub timeouts: Timeouts,
    /// `identityHeader`, parsed once.
    pub identity_header: http::HeaderName,
    /// Outbound routes (meshed peers and the egress policy), when configured.
    pub outbound: Option<Arc<crate::outbound::Routes>>,
    /// The Global quota store, when configured (kept across reloads that do not change it).
    pub global_quotas: Option<Arc<crate::quota_store::GlobalQuotas>>,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Active")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Active {
    /// The quota store the engine asks: local counters, and Global quotas' leases.
    pub fn quotas<'a>(&'a self, shared: &'a Shared) -> crate::quota_store::Quotas<'a> {
        crate::quota_store::Quotas {
            local: &shared.quotas,
            global: self.global_quotas.as_deref(),
            errors: &shared.metrics.quota_store.errors,
        }
    }

    /// Counts the Global quotas a decision left pending (see [`crate::quota_store`]).
    pub async fn settle_quotas<'e>(
        &self,
        shared: &Shared,
        engine: &'e Engine,
        d: &mut apiward_policy::engine::Decision<'e>,
    ) {
        if !d.pending.is_empty() {
            crate::quota_store::settle_pending(
                engine,
                d,
                &shared.quotas,
                self.global_quotas.as_deref(),
                &shared.metrics.quota_store.errors,
            )
            .await;
        }
    }

    /// The enforced config version, or `none`.
    pub fn version(&self) -> &str {
        self.config.as_ref().map_or("none", |c| c.version.as_str())
    }
}

/// Shared by every connection.
pub struct Shared {
    /// The active config; `None` until one loads.
    pub active: ArcSwapOption<Active>,
    /// Metrics.
    pub metrics: Metrics,
    /// Local quota counters (kept across reloads).
    pub quotas: LocalQuotas,
    /// TLS client config for JWKS fetches.
    pub jwks_client: Arc<rustls::ClientConfig>,
    /// The settings file.
    pub config_path: PathBuf,
    /// Requests seen (for sampling the decision log and request ids).
    pub counter: std::sync::atomic::AtomicU64,
    /// The issued mesh identity, when the settings ask for one.
    pub identity: Option<Arc<crate::identity::WorkloadIdentity>>,
    /// TLS handshakes allowed at once ([`MAX_HANDSHAKES`]).
    pub handshakes: tokio::sync::Semaphore,
    /// Connections that have not sent a request yet (reclaimed first at the connection
    /// limit).
    pub fresh: Arc<crate::deadline::Fresh>,
    /// Endpoints served since the last report.
    pub inventory: crate::inventory::Inventory,
    /// The last config pushed by the operator that validated (see [`crate::control`]).
    pub pushed: ArcSwapOption<SidecarConfig>,
    /// The last mesh table pushed by the operator (meshed Services for outbound).
    pub mesh: ArcSwapOption<apiward_policy::mesh::MeshTable>,
    /// The last pushed config refused, and why (for the next report).
    pub rejected: std::sync::Mutex<Option<apiward_policy::report::RejectedConfig>>,
    /// Fields of the pushed config this sidecar does not know and ignored (version skew;
    /// see `apiward_policy::config`), for the next report.
    pub ignored_fields: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Shared state for a settings file (nothing loaded yet).
    pub fn new(config_path: &Path, jwks_client: Arc<rustls::ClientConfig>) -> Self {
        Self {
            active: ArcSwapOption::empty(),
            metrics: Metrics::new(),
            quotas: LocalQuotas::new(MAX_QUOTA_KEYS),
            jwks_client,
            config_path: config_path.to_owned(),
            counter: Default::default(),
            identity: None,
            handshakes: tokio::sync::Semaphore::new(MAX_HANDSHAKES),
            fresh: Default::default(),
            pushed: ArcSwapOption::empty(),
            mesh: ArcSwapOption::empty(),
            inventory: Default::default(),
            rejected: Default::default(),
            ignored_fields: Default::default(),
        }
    }

    /// Loads the settings file; on success swaps it in and returns its version. On failure
    /// the previous config keeps serving and the error says why.
    pub fn reload(self: &Arc<Self>) -> Result<String, String> {
        self.rebuild(Change::Settings)
    }

    /// Derives a new [`Active`] from the inputs, `change` replacing only its own: the
    /// settings file is read only when it changed, and the engine is built only when the
    /// policy did (a pushed one arrives built by [`crate::control::validate`]). On failure
    /// the previous config keeps serving.
    pub fn rebuild(self: &Arc<Self>, change: Change) -> Result<String, String> {
        let previous = self.active.load_full();
        let (settings, engine) = match (change, previous.as_deref()) {
            (Change::Pushed(engine), Some(p)) => (p.settings.clone(), Some(engine)),
            (Change::Mesh | Change::Identity, Some(p)) => (p.settings.clone(), None),
            (Change::Pushed(engine), None) => (self.read_settings()?, Some(engine)),
            (Change::Settings | Change::Mesh | Change::Identity, _) => {
                (self.read_settings()?, None)
            }
        };
        match build(
            Inputs {
                settings,
                engine,
                identity: self.identity.as_ref(),
                pushed: self.pushed.load().as_deref(),
                mesh: self.mesh.load().as_deref(),
            },
            previous.as_deref(),
            &self.metrics.quota_store,
        ) {
            Ok(active) => {
                let version = active.version().to_owned();
                for v in active.jwt.values() {
                    tokio::spawn(v.clone().keep_fresh(self.jwks_client.clone(), JWKS_REFRESH));
                }
                self.metrics
                    .config_loaded
                    .set(i64::from(active.engine.is_some()));
                self.active.store(Some(Arc::new(active)));
                self.metrics.config_applied.inc();
                Ok(version)
            }
            Err(e) => {
                self.metrics.config_rejected.inc();
                Err(e)
            }
        }
    }

    fn read_settings(&self) -> Result<Settings, String> {
        Settings::load(&self.config_path).map_err(|e| {
            self.metrics.config_rejected.inc();
            e.to_string()
        })
    }
}

/// What changed, and so which input a rebuild replaces.
#[derive(Debug)]
pub enum Change {
    /// The settings file (read again).
    Settings,
    /// A pushed config, validated into its engine.
    Pushed(Engine),
    /// The pushed mesh table.
    Mesh,
    /// The issued workload certificate.
    Identity,
}

/// The sources an [`Active`] is derived from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The settings file, as loaded.
    pub settings: Settings,
    /// The engine of the policy, when it was built already (a validated pushed config).
    pub engine: Option<Engine>,
    /// The issued identity, when the settings ask for one.
    pub identity: Option<&'a Arc<crate::identity::WorkloadIdentity>>,
    /// The last config the operator pushed.
    pub pushed: Option<&'a SidecarConfig>,
    /// The last mesh table the operator pushed.
    pub mesh: Option<&'a apiward_policy::mesh::MeshTable>,
}

/// The outbound settings tightened by the pushed policy's egress: when a policy restricts
/// egress, only its destinations (and the settings' own rules) are allowed.
fn with_policy_egress(
    o: &crate::outbound::OutboundSettings,
    egress: Option<&apiward_policy::config::EgressPolicy>,
) -> crate::outbound::OutboundSettings {
    let mut o = o.clone();
    let Some(e) = egress.filter(|e| e.restricted) else {
        return o;
    };
    o.egress.default = crate::outbound::EgressDefault::Deny;
    for (i, r) in e.allow.iter().enumerate() {
        o.egress.allow.push(crate::outbound::EgressRule {
            name: format!("policy[{i}]"),
            cidrs: r.cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            hosts: r.hosts.clone(),
            ports: r.ports.clone(),
            // The app's own TLS passes through; the sidecar does not originate it here.
            tls: None,
        });
    }
    o
}

/// Derives an [`Active`] from its inputs. What did not change is carried over from
/// `previous`: the engine while the policy is the same, JWT verifiers (their keys and token
/// cache) while their provider is, the Global quota store while its settings are.
pub fn build(
    inputs: Inputs<'_>,
    previous: Option<&Active>,
    store_metrics: &crate::quota_store::StoreMetrics,
) -> Result<Active, String> {
    let Inputs {
        settings,
        engine: built,
        identity,
        pushed,
        mesh: mesh_table,
    } = inputs;
    let timeouts = settings.timeouts().map_err(|(f, m)| format!("{f}: {m}"))?;
    let identity_header = settings
        .identity_header_name()
        .map_err(|(f, m)| format!("{f}: {m}"))?;
    // The policy: inline (standalone mode) or the last one the operator pushed (whose
    // engine may come built).
    let built = built.filter(|_| settings.policy.is_none());
    let config = settings.policy.clone().or_else(|| pushed.cloned());
    let reused = previous
        .filter(|p| p.config.is_some() && p.config == config)
        .and_then(|p| p.engine.clone());
    let engine = match (built, reused, &config) {
        (Some(e), _, _) => Some(Arc::new(e)),
        (None, Some(e), _) => Some(e),
        (None, None, Some(c)) => Some(Arc::new(Engine::new(c).map_err(|e| e.to_string())?)),
        (None, None, None) => None,
    };
    let mode = engine
        .as_ref()
        .map_or(apiward_policy::config::MtlsMode::Strict, |e| {
            e.mtls(settings.inbound.port)
        });
    // The workload's certificate and trust bundle, read once for both directions: the
    // inbound listener serves them, originated mTLS presents and verifies with them. An
    // issued identity wins over files; until it arrives, no TLS (and not ready).
    type Material = (
        Arc<dyn rustls::server::ResolvesServerCert>,
        Arc<dyn rustls::client::ResolvesClientCert>,
        Arc<rustls::RootCertStore>,
    );
    let material: Option<Material> = match (identity, &settings.tls) {
        (Some(id), _) if settings.identity.is_some() => id
            .current()
            .map(|issued| (id.clone() as _, id.clone() as _, issued.roots.clone())),
        (_, Some(f)) => {
            let (key, roots) = crate::tls::load_files(f).map_err(|e| e.to_string())?;
            let server = rustls::sign::SingleCertAndKey::from(Arc::unwrap_or_clone(key.clone()));
            Some((
                Arc::new(server) as _,
                Arc::new(crate::tls::StaticClientCert(key)) as _,
                roots,
            ))
        }
        _ => None,
    };
    let tls = material
        .as_ref()
        .map(|(server, _, roots)| {
            crate::tls::server_config_with(server.clone(), roots.clone(), mode)
        })
        .transpose()
        .map_err(|e| e.to_string())?;
    let mesh =
        material.map(|(_, client_auth, roots)| crate::outbound::MeshTls { client_auth, roots });
    let outbound = settings
        .outbound
        .as_ref()
        .map(|o| {
            let o = with_policy_egress(o, config.as_ref().map(|c| &c.egress));
            crate::outbound::Routes::build_with(&o, mesh.as_ref(), mesh_table).map(Arc::new)
        })
        .transpose()?;
    let mut jwt = HashMap::new();
    let mut api_keys = HashMap::new();
    if let Some(cfg) = &config {
        for p in &cfg.jwt_providers {
            let reuse = previous
                .and_then(|a| a.jwt.get(&p.id))
                .filter(|v| v.same_provider(p))
                .cloned();
            let v = match reuse {
                Some(v) => v,
                None => Arc::new(JwtVerifier::new(p.clone())?),
            };
            jwt.insert(p.id.clone(), v);
        }
        for p in &cfg.api_key_providers {
            api_keys.insert(p.id.clone(), ApiKeySet::new(p.clone())?);
        }
    }
    let global_quotas = match &settings.quota_store {
        None => None,
        Some(s) => match previous.and_then(|a| a.global_quotas.as_ref()) {
            Some(g) if g.settings() == s => Some(g.clone()),
            _ => Some(crate::quota_store::GlobalQuotas::new(
                s,
                store_metrics.clone(),
            )?),
        },
    };
    if global_quotas.is_none()
        && let Some(cfg) = &config
        && let Some(q) = cfg
            .ports
            .iter()
            .flat_map(|p| &p.quotas)
            .find(|q| q.scope == apiward_policy::config::QuotaScope::Global)
    {
        tracing::warn!(
            policy = q.policy,
            quota = q.name,
            "a Global quota but no quotaStore in the settings: Global quotas follow onStoreError"
        );
    }
    Ok(Active {
        settings,
        config,
        engine,
        tls,
        jwt,
        api_keys,
        timeouts,
        identity_header,
        outbound,
        global_quotas,
    })
}
