//! The inbound side: callers' connections to the app.
//!
//! [`accept`] (connection limit, mTLS by mode, ALPN) → [`http`] (HTTP/1.1 or HTTP/2, the
//! connection deadlines) → [`pipeline`] (one request through its named stages:
//! [`checks::admit`] → [`authenticate`] → [`authorize`] → [`checks`] → [`forward`] →
//! [`response`], the outcome written by [`record`] once).

pub mod accept;
pub mod authenticate;
pub mod authorize;
pub mod checks;
pub mod forward;
pub(crate) mod headers;
pub mod http;
pub mod pipeline;
pub mod record;
pub mod response;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use ::http::header::HeaderMap;

pub use accept::serve_inbound;
pub use authenticate::Caller;
pub(crate) use headers::X_REQUEST_ID;
pub use pipeline::{RequestCtx, handle};
pub use upstream::Upstream;

use crate::state::Shared;

/// What is known about a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The verified mTLS peer identity.
    pub peer: Option<Arc<str>>,
    /// The caller's address.
    pub source: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn request_id(headers: &HeaderMap, shared: &Shared) -> String {
    if let Some(id) = headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok())
        && !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return id.to_owned();
    }
    new_request_id(shared)
}

/// A request id made here: `<pid>-<counter>`, both hex.
pub(crate) fn new_request_id(shared: &Shared) -> String {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    // The process id once (glibc does not cache it: a syscall per request otherwise).
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!("{:x}-{n:x}", PID.get_or_init(std::process::id))
}
