//! Opaque TCP inside mesh mTLS. A sidecar originating mTLS for a destination marked
//! `protocol: Opaque` offers the ALPN protocol [`ALPN`]; the receiving sidecar then treats
//! the connection as one request with method `TCP` and path `/`: the port's rules decide by the
//! caller's identity (a rule with HTTP conditions cannot match it, so default deny holds),
//! and an allowed connection is piped, byte for byte, to the app on the port the caller
//! asked for.

use std::sync::Arc;
use std::time::Instant;

use apiward_policy::engine::{Headers, NoTrace, Request as Facts};
use tokio::net::TcpStream;

use crate::inbound::record::{log_decision, record_simple};
use crate::inbound::{Caller, ConnInfo, new_request_id, now_ms};
use crate::state::{Active, Shared};

/// The ALPN protocol of an opaque TCP tunnel between sidecars.
pub const ALPN: &[u8] = b"apiward/tcp";

struct NoHeaders;

impl Headers for NoHeaders {
    fn get_one(&self, _name: &str) -> Option<&str> {
        None
    }
    fn contains(&self, _name: &str) -> bool {
        false
    }
}

/// Authorizes an opaque connection and, if allowed, pipes it to the app's `port`.
pub async fn serve_opaque<S>(
    mut stream: S,
    port: u16,
    info: ConnInfo,
    active: &Arc<Active>,
    shared: &Shared,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = Instant::now();
    let rid = new_request_id(shared);
    let Some(engine) = active.engine.as_ref() else {
        record_simple(shared, "deny", "no_config", 0);
        return;
    };
    let caller = Caller::default();
    let mut d = {
        let facts = Facts {
            port,
            method: "TCP",
            path: "/",
            query: None,
            headers: &NoHeaders,
            identity: caller.identity(&info),
            source_ip: info.source.ip().to_canonical(),
            now_ms: now_ms(),
        };
        engine.decide(&facts, &active.quotas(shared), &mut NoTrace)
    };
    active.settle_quotas(shared, engine, &mut d).await;
    let code = d.reason().code();
    let decided = |verdict: &'static str| {
        log_decision(
            shared,
            active,
            &rid,
            "TCP",
            "/",
            &info,
            Some(&d),
            verdict,
            code,
            0,
            start,
        );
        record_simple(shared, verdict, code, 0);
    };
    if !d.allowed() {
        return decided("deny");
    }
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut up = match TcpStream::connect(app).await {
        Ok(up) => up,
        Err(e) => {
            tracing::warn!(%app, error = %e, "opaque TCP: the app refused the connection");
            record_simple(shared, "error", "upstream_unavailable", 0);
            return;
        }
    };
    let _ = up.set_nodelay(true);
    decided("allow");
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut up).await {
        tracing::debug!(error = %e, "opaque TCP connection ended with an error");
    }
}
