//! Request checks: what the connection and the head must be (`admit`: the port's mTLS mode,
//! header size), what the head says of the body (`stage`: content type, declared size),
//! and the body itself (`body`: streamed under its size limit, or read once when a check
//! must see it, as the JSON-depth check does).

use std::sync::atomic::Ordering;

use apiward_policy::config::MtlsMode;
use http::header::{self, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::pipeline::RequestCtx;
use crate::body::{LimitedBody, ProxyBody, full, json_depth};
use crate::refusal::Refusal;

/// The connection is still of a kind the port accepts (a reload may have made it
/// unacceptable), and the head is within the size limit.
pub fn admit(ctx: &RequestCtx<'_>, head: &http::request::Parts) -> Result<(), Refusal> {
    let mode = ctx.decision.mtls;
    if (mode == MtlsMode::Strict && ctx.info.peer.is_none())
        || (mode == MtlsMode::Disabled && ctx.info.tls)
    {
        return Err(Refusal::MTLS_REQUIRED.closing());
    }
    let header_bytes: usize = head
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let max_header = ctx
        .limits
        .max_header_bytes
        .map_or(ctx.active.settings.limits.max_header_bytes, |m| m as usize);
    if header_bytes > max_header {
        return Err(Refusal::HEADERS_TOO_LARGE);
    }
    Ok(())
}

/// Content type and declared body size.
pub fn stage(
    ctx: &RequestCtx<'_>,
    head: &http::request::Parts,
    body: &Incoming,
) -> Result<(), Refusal> {
    let limits = ctx.limits;
    let h = &head.headers;
    // HTTP/2 carries a body without `content-length` or `transfer-encoding`: a request has
    // one unless its headers ended the stream (the same test holds for HTTP/1.1).
    let has_body = !http_body::Body::is_end_stream(body)
        || h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "0");
    if let Some(max) = limits.max_body_bytes {
        let declared = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(Refusal::BODY_TOO_LARGE);
        }
    }
    if has_body && !limits.content_types.is_empty() {
        let ct = media_type(h).unwrap_or_default();
        let ok = limits.content_types.iter().any(|allowed| {
            allowed == &ct
                || allowed
                    .strip_suffix("/*")
                    .is_some_and(|prefix| ct.split('/').next() == Some(prefix))
        });
        if !ok {
            return Err(Refusal::UNSUPPORTED_CONTENT_TYPE);
        }
    }
    Ok(())
}

/// The body the app gets: streamed under `maxBodyBytes` (a body that goes over it trips
/// `ctx.body_tripped`, and the request ends as 413), or, when a check must read it, read
/// once up to the limit, checked, and passed on as bytes.
pub async fn body(
    ctx: &mut RequestCtx<'_>,
    head: &http::request::Parts,
    body: Incoming,
) -> Result<ProxyBody, Refusal> {
    let limits = ctx.limits;
    let max_body = limits.max_body_bytes.unwrap_or(u64::MAX);
    let tripped = ctx.body_tripped.clone();
    let Some(depth) = limits.max_json_depth.filter(|_| is_json(&head.headers)) else {
        return Ok(LimitedBody::new(body, max_body, tripped).boxed());
    };
    // A body check must read the body: a compressed one cannot be read here, and passing
    // it unread would skip the check.
    if head
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(Refusal::COMPRESSED_BODY_UNSUPPORTED);
    }
    let cap = max_body.min(ctx.active.settings.limits.max_filtered_response_bytes as u64);
    match LimitedBody::new(body, cap, tripped.clone()).collect().await {
        Ok(c) => {
            let bytes = c.to_bytes();
            if json_depth(&bytes) > depth as usize {
                return Err(Refusal::JSON_TOO_DEEP);
            }
            Ok(full(bytes))
        }
        Err(_) if tripped.load(Ordering::Acquire) => Err(Refusal::BODY_TOO_LARGE),
        Err(_) => Err(Refusal::BODY_READ_FAILED),
    }
}

/// The media type of `Content-Type`, lower-cased, without parameters.
fn media_type(h: &HeaderMap) -> Option<String> {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// `application/json` or any `+json` type.
pub fn is_json(h: &HeaderMap) -> bool {
    media_type(h).is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}
