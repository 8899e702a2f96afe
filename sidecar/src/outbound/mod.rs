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

mod routes;
mod settings;
mod tls;

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

pub use routes::*;
pub use settings::*;
pub use tls::*;
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
