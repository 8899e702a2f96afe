//! Serving HTTP on an accepted connection: hyper's HTTP/1.1 (parked while idle) or HTTP/2
//! server with the sidecar's limits, the first-request deadline and HTTP/2's idle GOAWAY.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::accept::fail_conn;
use super::{ConnInfo, Upstream, handle, now_ms};
use crate::deadline::ConnState;
use crate::park::{Parking, Track, Tracked};
use crate::state::Shared;

/// A connection's HTTP version: by ALPN over TLS, by its first bytes in plaintext.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

/// Serves HTTP on a connection. The common case, HTTP/1.1, runs inline; HTTP/2 is boxed
/// so that every HTTP/1.1 connection task stays small (its state machine is several
/// kilobytes larger). A first request head must arrive by `first_request`; an HTTP/2
/// connection without open streams for `limits.idleTimeout` is sent GOAWAY.
pub(crate) async fn serve_http<IO>(
    io: IO,
    proto: Proto,
    info: ConnInfo,
    shared: &Arc<Shared>,
    upstream: Arc<Upstream>,
    conn: &Arc<ConnState>,
    first_request: tokio::time::Instant,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, park_after, idle, streams, max_header) =
        shared.active.load().as_ref().map_or(
            (
                Duration::from_secs(10),
                Duration::ZERO,
                Duration::from_secs(60),
                256,
                65536,
            ),
            |a| {
                (
                    a.timeouts.header_read,
                    a.timeouts.park_idle_after,
                    a.timeouts.idle,
                    a.settings.limits.max_concurrent_streams,
                    a.settings.limits.max_header_bytes,
                )
            },
        );
    let info = Arc::new(info);
    // HTTP/1.1 over TLS is served in generations that park while idle (see `park`).
    let track = matches!(proto, Proto::Http1).then(Track::new);
    let shared2 = shared.clone();
    let track2 = track.clone();
    let conn2 = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let guard = track2.as_ref().map(|t| t.begin(&req));
        let in_flight = conn2.begin();
        let (info, shared, upstream) = (info.clone(), shared2.clone(), upstream.clone());
        // Boxed: hyper keeps the service future inline in every connection's state, so an
        // idle keep-alive connection would carry the whole request pipeline's state machine.
        Box::pin(async move {
            let resp = handle(req, &info, &shared, &upstream).await;
            drop(in_flight);
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, guard)))
        })
    });
    // The same limits on hyper's builders and hyper-util's (their types differ).
    macro_rules! h2_limits {
        ($b:expr) => {
            $b.timer(TokioTimer::new())
                .max_concurrent_streams(streams)
                .max_header_list_size(max_header as u32)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                // Rapid-reset floods (CVE-2023-44487): cap resets the peer and we cause.
                .max_pending_accept_reset_streams(Some(20))
                .max_local_error_reset_streams(Some(1024))
        };
    }
    macro_rules! h1_limits {
        ($b:expr) => {
            $b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_header.max(8192))
        };
    }
    // Closing drains what the client still sends, so a refusal sent before its body was
    // read reaches it instead of a reset.
    let io = crate::linger::Lingering::new(io);
    let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match (proto, track) {
        (Proto::Http1, Some(track)) => {
            let mut b = hyper::server::conn::http1::Builder::new();
            h1_limits!(b);
            let parking = Parking {
                after: park_after,
                header_timeout,
                parked: shared.metrics.parked_connections.clone(),
            };
            let serve = crate::park::serve_http1(io, svc, track, &b, parking);
            match conn.first_request_by(first_request, serve).await {
                Some(r) => r.map_err(Into::into),
                None => {
                    fail_conn(shared, "first_request_timeout");
                    Ok(())
                }
            }
        }
        _ => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            h2_limits!(b);
            let c = Box::pin(b.serve_connection(TokioIo::new(io), svc));
            Box::pin(serve_h2_with_deadlines(
                c,
                conn,
                first_request,
                idle,
                shared,
            ))
            .await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Drives an HTTP/2 connection with its deadlines: closed if no request has arrived by
/// `first_request` (a caller that never sends the preface, SETTINGS or a HEADERS frame),
/// sent GOAWAY when no stream has been open for `idle` (open streams finish first), and
/// dropped if it still has not ended a while after that.
async fn serve_h2_with_deadlines<C>(
    mut c: Pin<Box<C>>,
    conn: &ConnState,
    first_request: tokio::time::Instant,
    idle: Duration,
    shared: &Shared,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulH2,
{
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut goaway_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = c.as_mut() => return r.map_err(Into::into),
            _ = tokio::time::sleep_until(first_request), if !conn.requested() => {
                if !conn.requested() {
                    fail_conn(shared, "first_request_timeout");
                    return Ok(());
                }
            }
            _ = ticker.tick() => {
                let now = tokio::time::Instant::now();
                match goaway_at {
                    None if conn.requested() && conn.idle_ms(now_ms()) >= idle.as_millis() as u64 => {
                        c.as_mut().graceful();
                        goaway_at = Some(now);
                    }
                    Some(at) if now.duration_since(at) > idle.max(Duration::from_secs(1)) => {
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// hyper's HTTP/2 server connection, whose graceful shutdown sends GOAWAY.
trait GracefulH2 {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulH2 for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
