//! Header names the pipeline sets or reads, and the header rewrites shared by its stages:
//! hop-by-hop removal, rate-limit headers, HTTP dates.

use apiward_policy::engine::{Decision, Headers};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Header names the pipeline sets or reads, parsed once: inserting a custom name given as
/// a string allocates a copy of it on every request.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub(crate) const X_RATELIMIT_REMAINING: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining");
pub(crate) const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub(crate) const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
pub(crate) const SUNSET: HeaderName = HeaderName::from_static("sunset");
pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Connection-specific headers (with `HTTP2-Settings`, RFC 9113 §3.2's h2c upgrade).
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HTTP2_SETTINGS,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a lookup per name.
    let any = h
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || (!keep_upgrade && k == header::UPGRADE));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

/// RFC 9110 IMF-fixdate.
pub(crate) fn http_date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = apiward_policy::time::civil_from_days(days);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `RateLimit-Policy`, `RateLimit` (IETF draft) and the legacy `X-RateLimit-*`, plus
/// `Retry-After` on refusals.
pub(crate) fn rate_limit_headers(h: &mut HeaderMap, d: &Decision<'_>) {
    let Some(q) = &d.quota else { return };
    let v = &q.verdict;
    let reset = v.reset_ms.div_ceil(1000);
    let name = &q.quota.name;
    let mut set = |n: HeaderName, value: Option<HeaderValue>| {
        if let Some(val) = value {
            h.insert(n, val);
        }
    };
    set(
        RATELIMIT_POLICY,
        formatted(format_args!(
            "\"{name}\";q={};w={}",
            v.limit, q.window_seconds
        )),
    );
    set(
        RATELIMIT,
        formatted(format_args!("\"{name}\";r={};t={reset}", v.remaining)),
    );
    set(X_RATELIMIT_LIMIT, Some(HeaderValue::from(v.limit)));
    set(X_RATELIMIT_REMAINING, Some(HeaderValue::from(v.remaining)));
    set(X_RATELIMIT_RESET, Some(HeaderValue::from(reset)));
    if !v.allowed {
        set(
            header::RETRY_AFTER,
            Some(HeaderValue::from(v.retry_after_ms.div_ceil(1000).max(1))),
        );
    }
}

/// A header value formatted on the stack (a heap string only when it is long).
fn formatted(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    let mut buf = [0u8; 160];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    match std::io::Write::write_fmt(&mut cur, args) {
        Ok(()) => {
            let n = cur.position() as usize;
            HeaderValue::from_bytes(&buf[..n]).ok()
        }
        Err(_) => HeaderValue::from_str(&args.to_string()).ok(),
    }
}

pub(crate) struct HeaderView<'a>(pub(crate) &'a HeaderMap);

impl Headers for HeaderView<'_> {
    fn get_one(&self, name: &str) -> Option<&str> {
        let mut it = self.0.get_all(name).iter();
        match (it.next(), it.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn contains_any(&self, names: &[&str]) -> bool {
        self.0.keys().any(|k| names.contains(&k.as_str()))
    }
}
