//! Stage: response filter. Removes headers, masks upstream 5xx bodies, removes JSON fields
//! (a response it must filter but cannot read is refused or passed, as `onUnfilterable`
//! says), and adds deprecation and rate-limit headers.

use apiward_policy::config::OnUnfilterable;
use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use super::checks::is_json;
use super::headers::{
    DEPRECATION, SUNSET, X_POWERED_BY, X_REQUEST_ID, http_date, rate_limit_headers,
    strip_hop_by_hop,
};
use super::pipeline::RequestCtx;
use crate::body::{HeldBody, ProxyBody, full, remove_pointer};
use crate::refusal::Refusal;

/// Filters the app's response.
pub async fn stage(
    ctx: &mut RequestCtx<'_>,
    resp: Response<Incoming>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Response<ProxyBody>, Refusal> {
    let (port, decision, rid, active) = (ctx.port, &ctx.decision, ctx.rid.as_str(), ctx.active);
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(header::SERVER);
    parts.headers.remove(X_POWERED_BY);
    for h in port
        .map(|p| p.response.remove_headers.as_slice())
        .unwrap_or_default()
    {
        parts.headers.remove(h.as_str());
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    if decision.deprecated {
        parts
            .headers
            .insert(DEPRECATION, HeaderValue::from_static("true"));
        if let Some(s) = decision.sunset_unix
            && let Ok(v) = HeaderValue::from_str(&http_date(s))
        {
            parts.headers.insert(SUNSET, v);
        }
    }
    rate_limit_headers(&mut parts.headers, decision);
    let response = port.map(|p| &p.response);
    if parts.status.is_server_error() && response.is_none_or(|r| r.mask_server_errors) {
        let problem = serde_json::json!({
            "type": "about:blank",
            "title": "upstream error",
            "status": parts.status.as_u16(),
            "requestId": rid,
        });
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        return Ok(Response::from_parts(parts, full(problem.to_string())));
    }
    let fields = response
        .map(|r| r.remove_fields.as_slice())
        .unwrap_or_default();
    if fields.is_empty() || !has_body(&parts) {
        return Ok(Response::from_parts(
            parts,
            HeldBody::new(body, slot).boxed(),
        ));
    }
    let refuse_unreadable = response.is_some_and(|r| r.on_unfilterable == OnUnfilterable::Refuse);
    let unreadable = |parts: http::response::Parts, body: ProxyBody| {
        if refuse_unreadable {
            Err(Refusal::RESPONSE_NOT_FILTERABLE)
        } else {
            Ok(Response::from_parts(parts, body))
        }
    };
    let cap = active.settings.limits.max_filtered_response_bytes;
    // JSON is filtered; text and untyped bodies too when they parse as JSON (the same record
    // as `text/plain` must not slip through); anything else, or anything compressed, is
    // unreadable. Only what may be JSON is buffered (up to the cap).
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let json = is_json(&parts.headers);
    if encoded || !(json || may_be_json(&parts.headers)) || declared_len.is_some_and(|n| n > cap) {
        return unreadable(parts, HeldBody::new(body, slot).boxed());
    }
    let bytes = match http_body_util::Limited::new(body, cap).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(Refusal::RESPONSE_NOT_FILTERABLE),
    };
    drop(slot);
    if bytes.is_empty() {
        // Nothing to filter (a HEAD response, an empty body).
        return Ok(Response::from_parts(parts, full(bytes)));
    }
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) => {
            for f in fields {
                remove_pointer(&mut v, f);
            }
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        Err(_) if json => return Err(Refusal::RESPONSE_NOT_FILTERABLE),
        Err(_) => return unreadable(parts, full(bytes)),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(out)))
}

/// Whether a response has a body at all (`204`, `304` and `Content-Length: 0` do not).
fn has_body(parts: &http::response::Parts) -> bool {
    !matches!(parts.status.as_u16(), 204 | 304)
        && parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() != b"0")
}

/// Text or no content type at all: a body that may still be JSON.
fn may_be_json(h: &HeaderMap) -> bool {
    match h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(ct) => ct.trim_start().to_ascii_lowercase().starts_with("text/"),
    }
}
