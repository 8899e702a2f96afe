//! Routes: where each original destination goes (meshed with mTLS, egress allowed with or
//! without TLS, or refused), built once per config.

#[allow(unused_imports)]
use super::*;

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

pub(super) struct Meshed {
    cidrs: Vec<IpNet>,
    ports: Vec<u16>,
    identity: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

pub(super) struct Allowed {
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
pub(super) const AWS_METADATA_V6: std::net::Ipv6Addr =
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

pub(super) fn port_ok(ports: &[u16], port: u16) -> bool {
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

pub(super) const HOST_TTL: Duration = Duration::from_secs(30);
