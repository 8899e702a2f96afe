//! Pooled clients to the app on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;

/// Pooled clients to the app: HTTP/1.1, and HTTP/2 (prior knowledge) for gRPC.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub(crate) http1: Client<HttpConnector, ProxyBody>,
    pub(crate) http2: Client<HttpConnector, ProxyBody>,
    pub(crate) authority: http::uri::Authority,
    /// One permit per HTTP/1.1 request in flight (and so per connection to the app).
    slots: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for a slot (`apiward_sidecar_upstream_waiting`).
    waiting: prometheus_client::metrics::gauge::Gauge,
}

impl Upstream {
    /// Clients with keep-alive pools; at most `max_http1` HTTP/1.1 requests (and so
    /// connections) to the app at once.
    pub fn new(
        addr: SocketAddr,
        idle: Duration,
        max_http1: usize,
        waiting: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.enforce_http(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(max_http1)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn);
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Self {
            http1,
            http2,
            authority,
            slots: Arc::new(tokio::sync::Semaphore::new(max_http1.max(1))),
            waiting,
        }
    }

    /// A slot for one HTTP/1.1 request, waiting (and counted as waiting) when all are taken.
    pub(crate) async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        self.waiting.inc();
        let p = self.slots.clone().acquire_owned().await.ok();
        self.waiting.dec();
        p
    }
}
