//! Outbound: the app's TCP connections, sent to the outbound listener (15001) by the rules
//! `apiward-sidecar init` installs. The original destination (`SO_ORIGINAL_DST`) decides
//! the route:
//! - a **meshed** destination gets mutual TLS originated to it, with this workload's
//!   certificate, and the peer must present the SPIFFE ID the config expects;
//! - anything else passes the **egress policy**: allowed CIDRs, hosts and ports, TLS
//!   originated (and the server certificate checked) where configured; link-local and
//!   cloud metadata addresses are refused unless explicitly allowed (SSRF, OWASP API7/API10).
//!
//! Bytes are copied unchanged in both directions, so any TCP protocol works. A refused
//! connection is closed at once, counted, and logged with its destination and reason.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::state::Shared;

/// The `outbound` block of the settings file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundSettings {
    /// Listen address for redirected connections (default `127.0.0.1:15001`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Connecting to the destination, TLS handshake included (default `5s`).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// Destinations inside the mesh: mTLS is originated to them.
    #[serde(default)]
    pub meshed: Vec<MeshedDestination>,
    /// Everything else.
    #[serde(default)]
    pub egress: Egress,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}
fn default_connect_timeout() -> String {
    "5s".into()
}

/// Workloads reached over mTLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshedDestination {
    /// Addresses (CIDRs or single IPs) of the destination's pods.
    pub cidrs: Vec<IpNet>,
    /// Ports (empty: all).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// The SPIFFE ID the destination must present, e.g. `spiffe://cluster.local/ns/shop/sa/orders`.
    pub identity: String,
    /// What the app speaks to it (default `Http`). `Opaque`: any TCP protocol; the peer's
    /// sidecar authorizes the connection by identity and passes the bytes through.
    #[serde(default)]
    pub protocol: Protocol,
}

/// The application protocol to a meshed destination.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP: the peer's sidecar applies the HTTP policy to every request.
    #[default]
    Http,
    /// Any TCP protocol, tunnelled as is.
    Opaque,
}

/// The egress policy for destinations outside the mesh.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    /// What happens to a destination no rule allows (default `Deny`).
    #[serde(default)]
    pub default: EgressDefault,
    /// Allowed destinations.
    #[serde(default)]
    pub allow: Vec<EgressRule>,
    /// Allow link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10,
    /// fd00:ec2::254) when a rule names them. Off by default: they are refused even when a
    /// broad rule or `default: Allow` would let them through.
    #[serde(default)]
    pub allow_metadata: bool,
}

/// The egress default.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum EgressDefault {
    /// Refuse destinations no rule allows.
    #[default]
    Deny,
    /// Let them through (metadata addresses stay refused).
    Allow,
}

/// One allowed destination.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// A name for logs and metrics.
    pub name: String,
    /// Allowed addresses.
    #[serde(default)]
    pub cidrs: Vec<IpNet>,
    /// Allowed host names: a destination address one of them resolves to (system resolver,
    /// cached 30 s) matches.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Ports (empty: all).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Originate TLS to the destination and check its certificate (the app speaks plaintext).
    #[serde(default)]
    pub tls: Option<EgressTls>,
}

/// TLS originated by the sidecar for an egress destination.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressTls {
    /// The name the server certificate must carry (also sent as SNI).
    pub server_name: String,
    /// Extra CA bundle (PEM) besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connect to this port instead of the original one (e.g. the app calls port 80, the
    /// sidecar speaks TLS to 443).
    #[serde(default)]
    pub port: Option<u16>,
}

/// How this workload authenticates to meshed peers and verifies them.
pub struct MeshTls {
    /// Client certificate source.
    pub client_auth: Arc<dyn rustls::client::ResolvesClientCert>,
    /// The mesh trust bundle.
    pub roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

struct Meshed {
    cidrs: Vec<IpNet>,
    ports: Vec<u16>,
    identity: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

struct Allowed {
    name: String,
    cidrs: Vec<IpNet>,
    hosts: Vec<String>,
    ports: Vec<u16>,
    tls: Option<(ServerName<'static>, Option<u16>, Arc<rustls::ClientConfig>)>,
}

/// The compiled outbound config.
pub struct Routes {
    /// Connect (and TLS) timeout.
    pub connect_timeout: Duration,
    meshed: Vec<Meshed>,
    allowed: Vec<Allowed>,
    default_allow: bool,
    allow_metadata: bool,
    resolved: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("meshed", &self.meshed.len())
            .field("allowed", &self.allowed.len())
            .field("default_allow", &self.default_allow)
            .finish_non_exhaustive()
    }
}

/// Where a connection goes.
pub enum Route {
    /// mTLS to a meshed peer that must present `identity`.
    Meshed {
        /// The expected SPIFFE ID.
        identity: String,
        /// Client config verifying it (absent: this sidecar has no certificate yet).
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    /// Allowed egress.
    Egress {
        /// The rule that allowed it (`default` for the default).
        rule: String,
        /// TLS originated to it: server name, port override, config.
        tls: Option<(ServerName<'static>, Option<u16>, Arc<rustls::ClientConfig>)>,
    },
    /// Refused, with the reason logged and counted.
    Refused(&'static str),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Meshed { identity, .. } => write!(f, "Meshed({identity})"),
            Route::Egress { rule, tls } => write!(f, "Egress({rule}, tls: {})", tls.is_some()),
            Route::Refused(why) => write!(f, "Refused({why})"),
        }
    }
}

/// The AWS instance metadata service's IPv6 address (`fd00:ec2::254`).
const AWS_METADATA_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// True for link-local and cloud metadata addresses.
pub fn is_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == AWS_METADATA_V6
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

fn port_ok(ports: &[u16], port: u16) -> bool {
    ports.is_empty() || ports.contains(&port)
}

impl Routes {
    /// Compiles the settings; `mesh` is absent until this workload has a certificate.
    pub fn build(s: &OutboundSettings, mesh: Option<&MeshTls>) -> Result<Self, String> {
        Self::build_with(s, mesh, None)
    }

    /// Compiles the settings and the mesh table the operator pushed (its Services come
    /// after the settings' own `meshed` entries, which win on overlap).
    pub fn build_with(
        s: &OutboundSettings,
        mesh: Option<&MeshTls>,
        table: Option<&apiward_policy::mesh::MeshTable>,
    ) -> Result<Self, String> {
        let connect_timeout = apiward_policy::duration::parse_duration(&s.connect_timeout)
            .map_err(|e| format!("outbound.connectTimeout: {e}"))?;
        let mut meshed = Vec::new();
        for (i, m) in s.meshed.iter().enumerate() {
            if !m.identity.starts_with("spiffe://") {
                return Err(format!(
                    "outbound.meshed[{i}].identity: must be a SPIFFE ID (spiffe://...)"
                ));
            }
            let alpn = match m.protocol {
                Protocol::Http => vec![],
                Protocol::Opaque => vec![crate::tcp::ALPN.to_vec()],
            };
            let tls = mesh
                .map(|mt| mesh_client_config(mt, &m.identity, alpn))
                .transpose()
                .map_err(|e| format!("outbound.meshed[{i}]: {e}"))?;
            meshed.push(Meshed {
                cidrs: m.cidrs.clone(),
                ports: m.ports.clone(),
                identity: m.identity.clone(),
                tls,
            });
        }
        for d in table.map(|t| t.destinations.as_slice()).unwrap_or_default() {
            // A bad entry is skipped, not fatal: the rest of the mesh keeps working.
            let cidrs: Vec<IpNet> = d.cidrs.iter().filter_map(|c| c.parse().ok()).collect();
            if cidrs.is_empty() || d.identities.iter().any(|i| !i.starts_with("spiffe://")) {
                tracing::warn!(
                    service = d.service,
                    "mesh table: unusable destination skipped"
                );
                continue;
            }
            let alpn = if d.opaque {
                vec![crate::tcp::ALPN.to_vec()]
            } else {
                vec![]
            };
            let tls = mesh
                .map(|mt| mesh_client_config_any(mt, &d.identities, alpn))
                .transpose()
                .map_err(|e| format!("mesh table {}: {e}", d.service))?;
            meshed.push(Meshed {
                cidrs,
                ports: d.ports.clone(),
                identity: d.identities.join(" or "),
                tls,
            });
        }
        let mut allowed = Vec::new();
        for (i, r) in s.egress.allow.iter().enumerate() {
            if r.cidrs.is_empty() && r.hosts.is_empty() {
                return Err(format!(
                    "outbound.egress.allow[{i}]: give cidrs or hosts (an empty rule would allow nothing)"
                ));
            }
            let tls = match &r.tls {
                None => None,
                Some(t) => {
                    let name = ServerName::try_from(t.server_name.clone())
                        .map_err(|e| format!("outbound.egress.allow[{i}].tls.serverName: {e}"))?;
                    let cfg = crate::tls::client_config(t.ca_file.as_deref())
                        .map_err(|e| format!("outbound.egress.allow[{i}].tls.caFile: {e}"))?;
                    Some((name, t.port, cfg))
                }
            };
            allowed.push(Allowed {
                name: r.name.clone(),
                cidrs: r.cidrs.clone(),
                hosts: r.hosts.clone(),
                ports: r.ports.clone(),
                tls,
            });
        }
        Ok(Routes {
            connect_timeout,
            meshed,
            allowed,
            default_allow: s.egress.default == EgressDefault::Allow,
            allow_metadata: s.egress.allow_metadata,
            resolved: Mutex::new(HashMap::new()),
        })
    }

    /// The route for a destination.
    pub async fn route(&self, dst: SocketAddr) -> Route {
        let ip = dst.ip().to_canonical();
        if let Some(m) = self
            .meshed
            .iter()
            .find(|m| port_ok(&m.ports, dst.port()) && m.cidrs.iter().any(|c| c.contains(&ip)))
        {
            return Route::Meshed {
                identity: m.identity.clone(),
                tls: m.tls.clone(),
            };
        }
        if is_metadata(ip) && !self.allow_metadata {
            return Route::Refused("metadata_address");
        }
        for a in &self.allowed {
            if !port_ok(&a.ports, dst.port()) {
                continue;
            }
            let hit =
                a.cidrs.iter().any(|c| c.contains(&ip)) || self.host_matches(&a.hosts, ip).await;
            if hit {
                return Route::Egress {
                    rule: a.name.clone(),
                    tls: a.tls.clone(),
                };
            }
        }
        if self.default_allow && !is_metadata(ip) {
            return Route::Egress {
                rule: "default".into(),
                tls: None,
            };
        }
        Route::Refused("not_allowed")
    }

    async fn host_matches(&self, hosts: &[String], ip: IpAddr) -> bool {
        for h in hosts {
            let cached = self.resolved.lock().ok().and_then(|m| {
                m.get(h)
                    .filter(|(t, _)| t.elapsed() < HOST_TTL)
                    .map(|(_, a)| a.clone())
            });
            let addrs = match cached {
                Some(a) => a,
                None => {
                    let found: Vec<IpAddr> = tokio::net::lookup_host((h.as_str(), 0))
                        .await
                        .map(|it| it.map(|a| a.ip().to_canonical()).collect())
                        .unwrap_or_default();
                    if let Ok(mut m) = self.resolved.lock() {
                        m.insert(h.clone(), (Instant::now(), found.clone()));
                    }
                    found
                }
            };
            if addrs.contains(&ip) {
                return true;
            }
        }
        false
    }
}

const HOST_TTL: Duration = Duration::from_secs(30);

/// Verifies a meshed peer: its chain against the mesh trust bundle, and its SPIFFE ID
/// against the one expected for the destination (not a DNS name).
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    /// Any of these (a Service may be backed by several ServiceAccounts).
    expected: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match crate::tls::spiffe_id(end_entity) {
            Some(id) if self.expected.contains(&id) => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "peer is {}, expected {}",
                other.as_deref().unwrap_or("no SPIFFE ID"),
                self.expected.join(" or ")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Resumption tickets shared by every meshed client config, so a reconnect to a peer
/// resumes instead of doing a full handshake.
fn resumption() -> rustls::client::Resumption {
    static STORE: std::sync::OnceLock<Arc<rustls::client::ClientSessionMemoryCache>> =
        std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| Arc::new(rustls::client::ClientSessionMemoryCache::new(1024)));
    rustls::client::Resumption::store(store.clone())
}

/// The client config for one meshed destination, offering `alpn` (empty: none).
pub fn mesh_client_config(
    mesh: &MeshTls,
    expected: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    mesh_client_config_any(mesh, &[expected.to_owned()], alpn)
}

/// The client config for a meshed destination whose peer may present any of `expected`.
pub fn mesh_client_config_any(
    mesh: &MeshTls,
    expected: &[String],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = crate::tls::provider();
    let verifier = SpiffeVerifier {
        roots: mesh.roots.clone(),
        expected: expected.to_vec(),
        provider: provider.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(mesh.client_auth.clone());
    cfg.resumption = resumption();
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

/// The destination the app asked for, before the redirect.
pub(crate) fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Accepts redirected connections until the process ends.
pub async fn serve_outbound(listener: TcpListener, shared: Arc<Shared>) {
    let local = listener.local_addr().ok();
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.metrics.outbound_open.inc();
            handle(tcp, source, local, &shared).await;
            shared.metrics.outbound_open.dec();
        });
    }
}

async fn handle(tcp: TcpStream, source: SocketAddr, local: Option<SocketAddr>, shared: &Shared) {
    let _ = tcp.set_nodelay(true);
    let count = |route: &'static str, result: &'static str| {
        shared
            .metrics
            .outbound
            .get_or_create(&crate::metrics::OutboundLabels { route, result })
            .inc();
    };
    let dst = match original_dst(&tcp) {
        Ok(d) if Some(d) != local => d,
        // Connected to the listener itself, not redirected to it: nothing to forward to.
        _ => {
            tracing::warn!(%source, "outbound connection refused: no original destination (not redirected by iptables)");
            return count("none", "not_redirected");
        }
    };
    let routes = shared
        .active
        .load()
        .as_ref()
        .and_then(|a| a.outbound.clone());
    let Some(routes) = routes else {
        tracing::warn!(%source, %dst, reason = "no_config", "outbound connection refused");
        return count("none", "no_config");
    };
    let timeout = routes.connect_timeout;
    match routes.route(dst).await {
        Route::Refused(reason) => {
            tracing::warn!(%source, %dst, reason, "outbound connection refused");
            count("egress", reason);
        }
        Route::Meshed {
            identity,
            tls: None,
        } => {
            tracing::warn!(%dst, %identity, reason = "no_identity", "outbound connection refused");
            count("meshed", "no_identity");
        }
        Route::Meshed {
            identity,
            tls: Some(cfg),
        } => {
            let name = ServerName::IpAddress(dst.ip().into());
            let up = connect_tls(dst, name, cfg, timeout).await;
            relay(tcp, up, dst, ("meshed", "connect_failed", &identity), count).await;
        }
        Route::Egress { rule, tls: None } => {
            let up = connect(dst, timeout).await;
            relay(tcp, up, dst, ("egress", "connect_failed", &rule), count).await;
        }
        Route::Egress {
            rule,
            tls: Some((name, port, cfg)),
        } => {
            let to = SocketAddr::new(dst.ip(), port.unwrap_or(dst.port()));
            let up = connect_tls(to, name, cfg, timeout).await;
            relay(tcp, up, to, ("egress", "tls_failed", &rule), count).await;
        }
    }
}

/// Pipes the app's connection to `up` once connected, or logs and counts why not.
/// `(route, failure, via)`: the route label, the result label on failure, and the peer's
/// expected identity or the egress rule that allowed it.
async fn relay<U>(
    app: TcpStream,
    up: std::io::Result<U>,
    dst: SocketAddr,
    (route, failure, via): (&'static str, &'static str, &str),
    count: impl Fn(&'static str, &'static str),
) where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match up {
        Ok(up) => {
            tracing::debug!(%dst, route, via, "outbound connection established");
            count(route, "connected");
            pipe(app, up).await;
        }
        Err(e) => {
            tracing::warn!(%dst, route, via, result = failure, error = %e, "outbound connection failed");
            count(route, failure);
        }
    }
}

async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn connect_tls(
    dst: SocketAddr,
    name: ServerName<'static>,
    cfg: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let started = Instant::now();
    let tcp = connect(dst, timeout).await?;
    let left = timeout.saturating_sub(started.elapsed());
    tokio::time::timeout(
        left,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Copies both ways until both sides are done.
async fn pipe<U>(mut app: TcpStream, mut up: U)
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut up).await {
        tracing::debug!(error = %e, "outbound connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(yaml: &str) -> Routes {
        let s: OutboundSettings = serde_norway::from_str(yaml).unwrap();
        Routes::build(&s, None).unwrap()
    }

    fn refused(r: &Route) -> Option<&'static str> {
        match r {
            Route::Refused(why) => Some(why),
            _ => None,
        }
    }

    #[tokio::test]
    async fn metadata_addresses_are_refused_even_when_a_rule_covers_them() {
        let r = routes(
            "egress: {default: Allow, allow: [{name: everything, cidrs: [0.0.0.0/0, '::/0']}]}",
        );
        for dst in [
            "169.254.169.254:80",
            "[fd00:ec2::254]:80",
            "[fe80::1]:443",
            "[::ffff:169.254.169.254]:80",
        ] {
            let route = r.route(dst.parse().unwrap()).await;
            assert_eq!(refused(&route), Some("metadata_address"), "{dst}");
        }
        assert!(refused(&r.route("93.184.216.34:443".parse().unwrap()).await).is_none());
    }

    #[tokio::test]
    async fn egress_is_default_deny_with_cidr_and_port_rules() {
        let r = routes("egress: {allow: [{name: payments, cidrs: [10.9.0.0/16], ports: [443]}]}");
        assert!(refused(&r.route("10.9.1.2:443".parse().unwrap()).await).is_none());
        assert_eq!(
            refused(&r.route("10.9.1.2:80".parse().unwrap()).await),
            Some("not_allowed")
        );
        assert_eq!(
            refused(&r.route("10.8.1.2:443".parse().unwrap()).await),
            Some("not_allowed")
        );
    }

    #[tokio::test]
    async fn meshed_destinations_win_and_need_a_certificate() {
        let r = routes(
            "meshed: [{cidrs: [10.77.0.3/32], ports: [8080], identity: 'spiffe://cluster.local/ns/shop/sa/orders'}]",
        );
        match r.route("10.77.0.3:8080".parse().unwrap()).await {
            Route::Meshed { identity, tls } => {
                assert_eq!(identity, "spiffe://cluster.local/ns/shop/sa/orders");
                assert!(
                    tls.is_none(),
                    "no certificate yet: nothing to originate with"
                );
            }
            _ => panic!("expected the meshed route"),
        }
        // Another port of the same pod is not meshed, and egress denies it.
        assert_eq!(
            refused(&r.route("10.77.0.3:9090".parse().unwrap()).await),
            Some("not_allowed")
        );
    }

    #[test]
    fn bad_outbound_settings_name_the_field() {
        let bad: OutboundSettings =
            serde_norway::from_str("meshed: [{cidrs: [10.0.0.0/8], identity: orders}]").unwrap();
        let e = Routes::build(&bad, None).err().unwrap();
        assert!(e.starts_with("outbound.meshed[0].identity"), "{e}");
        let empty: OutboundSettings =
            serde_norway::from_str("egress: {allow: [{name: x, ports: [443]}]}").unwrap();
        let e = Routes::build(&empty, None).err().unwrap();
        assert!(e.starts_with("outbound.egress.allow[0]"), "{e}");
        assert!(
            serde_norway::from_str::<OutboundSettings>(
                "meshed: [{cidrs: [10.0.0/8], identity: x}]"
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn a_pushed_mesh_table_meshes_its_services_after_the_settings_own_entries() {
        let s: OutboundSettings = serde_norway::from_str(
            "{meshed: [{cidrs: [10.96.0.0/24], ports: [80], identity: 'spiffe://cluster.local/ns/shop/sa/static'}], egress: {default: Allow}}",
        )
        .unwrap();
        let table: apiward_policy::mesh::MeshTable = serde_json::from_value(serde_json::json!({
            "apiVersion": apiward_policy::mesh::MESH_API_VERSION, "version": "mesh-1",
            "destinations": [
                {"service": "shop/orders", "cidrs": ["10.96.0.20/32", "10.96.1.20/32"], "ports": [80, 8080],
                 "identities": ["spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/orders-v2"]},
                {"service": "shop/broken", "cidrs": ["not-a-cidr"], "ports": [80],
                 "identities": ["spiffe://cluster.local/ns/shop/sa/x"]},
            ]
        }))
        .unwrap();
        let r = Routes::build_with(&s, None, Some(&table)).unwrap();
        let identity = |route: Route| match route {
            Route::Meshed { identity, .. } => Some(identity),
            _ => None,
        };
        // The settings' entry wins where both cover the address.
        assert_eq!(
            identity(r.route("10.96.0.20:80".parse().unwrap()).await).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/static")
        );
        // Elsewhere the table's Service, with every ServiceAccount behind it accepted.
        assert_eq!(
            identity(r.route("10.96.1.20:8080".parse().unwrap()).await).as_deref(),
            Some(
                "spiffe://cluster.local/ns/shop/sa/orders or spiffe://cluster.local/ns/shop/sa/orders-v2"
            )
        );
        // Another port of the Service address is not meshed (it passes the egress policy).
        assert!(identity(r.route("10.96.1.20:9090".parse().unwrap()).await).is_none());
        // Without a table, the address is plain egress.
        let bare = Routes::build(&s, None).unwrap();
        assert!(identity(bare.route("10.96.1.20:8080".parse().unwrap()).await).is_none());
    }
}
