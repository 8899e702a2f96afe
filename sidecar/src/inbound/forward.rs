//! Stage: forward. The head is rewritten for the app (hop-by-hop and identity headers
//! removed, the verified identity, claims, request id and `X-Forwarded-For` set, the
//! normalized path the decision was made on), then sent on the pooled connections; only a
//! WebSocket handshake may switch protocols.

use std::sync::atomic::Ordering;
use std::time::Duration;

use apiward_policy::config::PortPolicy;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Upstream;
use super::headers::{X_FORWARDED_FOR, X_REQUEST_ID, strip_hop_by_hop};
use super::pipeline::RequestCtx;
use crate::body::{ProxyBody, full};
use crate::refusal::Refusal;
use crate::state::Active;

/// What the app answered.
#[derive(Debug)]
pub enum Forwarded {
    /// A WebSocket handshake the app accepted: the tunnel runs on its own.
    Switched(Response<ProxyBody>),
    /// A response for the response filter, with the HTTP/1.1 slot it holds until its body
    /// ends.
    Response(
        Response<Incoming>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
}

/// Sends the request to the app.
pub async fn stage(
    ctx: &mut RequestCtx<'_>,
    mut parts: http::request::Parts,
    body: ProxyBody,
    upstream: &Upstream,
) -> Result<Forwarded, Refusal> {
    ctx.forwarded = true;
    let (active, port, info, rid) = (ctx.active, ctx.port, ctx.info, ctx.rid.as_str());
    let (caller, decision) = (&ctx.caller, &ctx.decision);
    let grpc = parts.version == Version::HTTP_2
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    // Only a WebSocket handshake (RFC 6455) is tunnelled once the app answers 101; any other
    // `Upgrade` (h2c, TLS, unknown protocols) is removed and the request served as HTTP/1.1,
    // so no later request on the connection can pass unchecked.
    let upgrade = parts.version == Version::HTTP_11 && is_websocket_handshake(&parts);
    let client_upgrade = if upgrade {
        Some(hyper::upgrade::on(parts_to_request(&mut parts)))
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if grpc {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Identity headers: remove every incoming copy, then set what was verified.
    parts.headers.remove(&active.identity_header);
    strip_underscore_spellings(&mut parts.headers, active, port);
    let mut forwarded: Vec<(HeaderName, String)> = Vec::new();
    for id in port.map(|p| p.jwt_providers.as_slice()).unwrap_or_default() {
        if let Some(v) = active.jwt.get(id) {
            for (claim, h) in &v.provider.forward_claims {
                // A name that does not parse cannot be in the request either.
                let Ok(n) = HeaderName::from_bytes(h.as_bytes()) else {
                    continue;
                };
                parts.headers.remove(&n);
                if let Some((pid, claims)) = &caller.jwt
                    && pid == id
                    && let Some(val) = apiward_policy::engine::claim_str(claims.get(claim))
                {
                    forwarded.push((n, val.into_owned()));
                }
            }
        }
    }
    if let Some(p) = apiward_policy::engine::principal_of(&caller.identity(info)) {
        forwarded.push((active.identity_header.clone(), p));
    }
    for (n, v) in forwarded {
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    let source = info.source.ip().to_canonical().to_string();
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {source}"),
        None => source,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(upstream.authority.clone());
    // The app gets the path the decision was made on, not the raw one.
    uri.path_and_query = Some(
        if decision.path.is_empty() || decision.path == parts.uri.path() {
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
        } else {
            let pq = match parts.uri.query() {
                Some(q) => format!("{}?{q}", decision.path),
                None => decision.path.clone(),
            };
            match http::uri::PathAndQuery::try_from(pq) {
                Ok(pq) => pq,
                Err(_) => return Err(Refusal::INVALID_PATH),
            }
        },
    );
    parts.uri = http::Uri::from_parts(uri).map_err(|_| Refusal::INVALID_PATH)?;
    if let Some(a) = authority
        && let Ok(v) = HeaderValue::from_str(&a)
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.version = if grpc {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let out = Request::from_parts(parts, body);
    let client = if grpc {
        &upstream.http2
    } else {
        &upstream.http1
    };
    let call = async {
        // HTTP/2 multiplexes one connection; HTTP/1.1 takes a slot until its response ends.
        let slot = if grpc { None } else { upstream.slot().await };
        (client.request(out).await, slot)
    };
    let (result, slot) = match ctx.limits.timeout_ms {
        Some(ms) => tokio::time::timeout(Duration::from_millis(ms), call)
            .await
            .map_err(|_| Refusal::UPSTREAM_TIMEOUT)?,
        None => call.await,
    };
    let tripped = || ctx.body_tripped.load(Ordering::Acquire);
    let mut resp = match result {
        Ok(r) => r,
        Err(_) if tripped() => return Err(Refusal::BODY_TOO_LARGE.closing()),
        Err(e) => {
            tracing::warn!(request_id = rid, error = %e, "upstream request failed");
            return Err(Refusal::UPSTREAM_UNAVAILABLE);
        }
    };
    if tripped() {
        // The app answered before the body was cut off; the client still sees 413.
        return Err(Refusal::BODY_TOO_LARGE.closing());
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let to_websocket = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
        if client_upgrade.is_none() || !to_websocket {
            // A switch nobody asked for (or to another protocol): nothing is tunnelled.
            tracing::warn!(
                request_id = rid,
                "the app switched protocols unasked; refused"
            );
            return Err(Refusal::UPSTREAM_PROTOCOL_SWITCH.closing());
        }
        if let Some(client_up) = client_upgrade {
            let upstream_up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_up.await, upstream_up.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
        let (mut rp, _) = resp.into_parts();
        rp.headers.remove(header::SERVER);
        return Ok(Forwarded::Switched(Response::from_parts(
            rp,
            full(Bytes::new()),
        )));
    }
    Ok(Forwarded::Response(resp, slot))
}

/// An RFC 6455 opening handshake: `GET`, `Upgrade: websocket` (the only protocol),
/// `Connection: upgrade`, version 13 and a 16-byte base64 key.
fn is_websocket_handshake(parts: &http::request::Parts) -> bool {
    let h = &parts.headers;
    let one = |name: &HeaderName| {
        let mut it = h.get_all(name).iter();
        match (it.next(), it.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    };
    parts.method == http::Method::GET
        && one(&header::UPGRADE).is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && one(&header::SEC_WEBSOCKET_VERSION) == Some("13")
        && one(&header::SEC_WEBSOCKET_KEY).is_some_and(|k| {
            k.len() == 24
                && k.ends_with("==")
                && k.bytes()
                    .take(22)
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        })
}

/// Removes incoming headers that spell a header the sidecar sets (or refuses) with
/// underscores: CGI, WSGI and Rack turn `x_user_id` into the same variable as
/// `x-user-id`, so the app would read the caller's value as a verified one.
fn strip_underscore_spellings(h: &mut HeaderMap, active: &Active, port: Option<&PortPolicy>) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let claim_headers = port
        .map(|p| p.jwt_providers.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|id| active.jwt.get(id))
        .flat_map(|v| v.provider.forward_claims.values());
    let mut protected: Vec<&str> = vec![
        active.identity_header.as_str(),
        "x-forwarded-for",
        "x-request-id",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    protected.extend(apiward_policy::engine::PATH_OVERRIDE_HEADERS);
    protected.extend(claim_headers.map(String::as_str));
    let doomed: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.contains('_')
                && protected.iter().any(|p| {
                    p.len() == k.len()
                        && p.bytes()
                            .zip(k.bytes())
                            .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
                })
        })
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// Builds a throwaway request around the parts so hyper can register the upgrade
/// (hyper keeps the pending upgrade in the request's extensions).
fn parts_to_request(parts: &mut http::request::Parts) -> Request<()> {
    let mut r = Request::new(());
    *r.extensions_mut() = std::mem::take(&mut parts.extensions);
    r
}
