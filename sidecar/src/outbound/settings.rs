//! The `outbound` block of the settings file: meshed destinations and the egress policy.

#[allow(unused_imports)]
use super::*;

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

pub(super) fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}
pub(super) fn default_connect_timeout() -> String {
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
