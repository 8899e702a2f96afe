//! Accepting connections: the connection limit (fresh connections reclaimed first), the
//! port's mTLS mode (plaintext, TLS, or both), the handshake and the peer's SPIFFE ID, then
//! HTTP or opaque TCP by ALPN.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use apiward_policy::config::MtlsMode;
use tokio::net::{TcpListener, TcpStream};

use super::http::{Proto, serve_http};
use super::{ConnInfo, Upstream};
use crate::deadline::ConnState;
use crate::state::Shared;

/// Accepts inbound connections until the process ends.
pub async fn serve_inbound(listener: TcpListener, shared: Arc<Shared>, upstream: Upstream) {
    let max = shared
        .active
        .load()
        .as_ref()
        .map_or(20_000, |a| a.settings.limits.max_connections);
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    // Shared, not cloned: every open connection holds a pointer instead of 656 bytes.
    let upstream = Arc::new(upstream);
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the limit, a connection that has sent nothing yet makes room for this one;
        // with none, the new one waits (the accept loop with it) for a slot.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if shared.fresh.reclaim_oldest() {
                    shared.metrics.connections_reclaimed.inc();
                }
                match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let shared = shared.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let _permit = permit;
            shared.metrics.connections.inc();
            let conn = shared.fresh.register();
            let serve = handle_connection(tcp, source, &shared, upstream, &conn);
            tokio::pin!(serve);
            // Until its first request the connection may be reclaimed; after it, only the
            // connection itself is polled.
            tokio::select! {
                biased;
                _ = &mut serve => {}
                _ = conn.reclaim.notified() => {
                    if conn.requested() {
                        serve.await;
                    }
                }
            }
            shared.metrics.connections.dec();
        });
    }
}

async fn handle_connection(
    tcp: TcpStream,
    source: SocketAddr,
    shared: &Arc<Shared>,
    upstream: Arc<Upstream>,
    conn: &Arc<ConnState>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(active) = shared.active.load_full() else {
        return fail_conn(shared, "no_config"); // fail closed
    };
    // Redirected by iptables: the port the caller asked for. Connected directly: the app's.
    let port = crate::outbound::original_dst(&tcp)
        .ok()
        .filter(|d| tcp.local_addr().is_ok_and(|l| l != *d))
        .map_or(active.settings.inbound.port, |d| d.port());
    let mode = active
        .engine
        .as_ref()
        .map_or(MtlsMode::Strict, |e| e.mtls(port));
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(active.timeouts.handshake, tcp.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    let fail = |reason: &'static str| fail_conn(shared, reason);
    let is_tls = first[0] == 0x16;
    match (is_tls, mode, &active.tls) {
        (false, MtlsMode::Strict, _) => fail("plaintext_refused"),
        (true, MtlsMode::Disabled, _) | (true, _, None) => fail("tls_not_configured"),
        (true, _, Some(cfg)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            // A bounded number of handshakes at once: a burst of new connections waits in
            // the kernel's socket buffers instead of each holding handshake state here.
            let handshake = async {
                let _slot = shared.handshakes.acquire().await;
                acceptor.accept(tcp).await
            };
            // Boxed (like the HTTP state below): the connection task then holds only what the
            // current stage needs, not the largest of every stage's state machine.
            let stream =
                match tokio::time::timeout(active.timeouts.handshake, Box::pin(handshake)).await {
                    // Boxed too: the stream (1.2 KiB) then moves through the stages as a
                    // pointer; moved-from locals keep their space in a future's state.
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!(%source, error = %e, "TLS handshake failed");
                        return fail("handshake_failed");
                    }
                    Err(_) => return fail("handshake_timeout"),
                };
            let peer = match stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                Some(cert) => match crate::tls::spiffe_id(cert) {
                    Some(id) => Some(Arc::from(id)),
                    // A certificate the CA signed that is not one X.509-SVID (no URI SAN,
                    // several, or not SPIFFE): no identity is made up from it.
                    None => return fail("peer_identity_invalid"),
                },
                None => None,
            };
            let info = ConnInfo {
                peer,
                source,
                tls: true,
            };
            let proto = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Proto::Http2,
                Some(crate::tcp::ALPN) => {
                    return Box::pin(crate::tcp::serve_opaque(
                        stream, port, info, &active, shared,
                    ))
                    .await;
                }
                _ => Proto::Http1,
            };
            if port != active.settings.inbound.port {
                // HTTP is served for the app's port only; other ports are opaque TCP.
                return fail("port_not_served");
            }
            let first_request = tokio::time::Instant::now() + active.timeouts.first_request;
            drop(active);
            Box::pin(serve_http(
                stream,
                proto,
                info,
                shared,
                upstream,
                conn,
                first_request,
            ))
            .await;
        }
        (false, _, _) if port != active.settings.inbound.port => fail("port_not_served"),
        (false, _, _) => {
            // Plaintext: HTTP/1.1, or HTTP/2 with prior knowledge, told apart by the first
            // bytes, which must arrive within the first-request deadline.
            let first_request = tokio::time::Instant::now() + active.timeouts.first_request;
            drop(active);
            let info = ConnInfo {
                peer: None,
                source,
                tls: false,
            };
            let Some((detected, io)) = crate::deadline::detect(tcp, first_request).await else {
                return fail("first_request_timeout");
            };
            let proto = match detected {
                crate::deadline::Detected::Http1 => Proto::Http1,
                crate::deadline::Detected::Http2 => Proto::Http2,
            };
            Box::pin(serve_http(
                io,
                proto,
                info,
                shared,
                upstream,
                conn,
                first_request,
            ))
            .await;
        }
    }
}

/// Counts a connection closed before it served anything, by reason.
pub(crate) fn fail_conn(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .handshake_failures
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
}
