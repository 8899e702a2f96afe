//! Stage: authenticate. The credentials the port accepts (a JWT, an API key) are verified;
//! the mTLS peer comes with the connection. A credential presented but invalid refuses the
//! request (401), never silently ignored; on an Audit port it is a would-deny and the
//! request goes on as anonymous (an ambiguous one is refused in Audit too).

use std::sync::Arc;

use apiward_policy::config::{Mode, PortPolicy};
use apiward_policy::engine::{ApiKeyIdentity, Identity, JwtIdentity};
use http::header::HeaderMap;
use serde_json::{Map, Value};

use super::ConnInfo;
use super::pipeline::RequestCtx;
use crate::authn::AuthnError;
use crate::refusal::Refusal;
use crate::state::Active;

/// Authenticates the caller into `ctx.caller`.
pub async fn stage(ctx: &mut RequestCtx<'_>, head: &http::request::Parts) -> Result<(), Refusal> {
    let Some(port) = ctx.port else {
        return Ok(());
    };
    match authenticate(ctx.active, port, &head.headers, head.uri.query()).await {
        Ok(c) => {
            ctx.caller = c;
            Ok(())
        }
        Err(e) => {
            ctx.shared
                .metrics
                .authn_failures
                .get_or_create(&crate::metrics::ReasonLabels { reason: e.code() })
                .inc();
            if port.mode == Mode::Audit && e != AuthnError::Ambiguous {
                ctx.authn_would_deny = Some(e.code());
                Ok(())
            } else {
                Err(Refusal::from(e))
            }
        }
    }
}

/// Who the caller is: the mTLS peer plus a verified JWT and/or API key.
#[derive(Debug, Default)]
pub struct Caller {
    /// Provider id and claims of a verified JWT.
    pub jwt: Option<(String, Arc<Map<String, Value>>)>,
    /// Provider id and client of a valid API key.
    pub api_key: Option<(String, String)>,
}

/// Authenticates the credentials the port accepts. A credential that is presented but
/// invalid is an error (401), never silently ignored.
pub async fn authenticate(
    active: &Active,
    port: &PortPolicy,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Caller, AuthnError> {
    let mut caller = Caller::default();
    let now = super::now_ms() / 1000;
    // JWT: the provider whose issuer matches the token.
    let mut token_seen = false;
    for id in &port.jwt_providers {
        let Some(v) = active.jwt.get(id) else {
            continue;
        };
        let mut values = headers.get_all(v.provider.token_header.as_str()).iter();
        let Some(raw) = values.next() else {
            continue;
        };
        if values.next().is_some() {
            return Err(AuthnError::Ambiguous);
        }
        let Ok(raw) = raw.to_str() else {
            return Err(AuthnError::Malformed);
        };
        let token = if v.provider.token_header == "authorization" {
            match raw.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
                _ => continue,
            }
        } else {
            raw.trim()
        };
        token_seen = true;
        // With several issuers on the port, the unverified `iss` picks the one to verify
        // with; with one, verification checks `iss` itself and the token is decoded once.
        if port.jwt_providers.len() > 1 {
            match crate::authn::unverified_issuer(token) {
                None => return Err(AuthnError::Malformed),
                Some(iss) if iss != v.provider.issuer => continue,
                Some(_) => {}
            }
        }
        let claims = v.verify(token, now).await?;
        caller.jwt = Some((id.clone(), claims));
        break;
    }
    if token_seen && caller.jwt.is_none() {
        return Err(AuthnError::UnknownIssuer);
    }
    // API keys.
    for id in &port.api_key_providers {
        let Some(set) = active.api_keys.get(id) else {
            continue;
        };
        let presented = match (&set.provider.header, &set.provider.query) {
            (Some(h), _) if headers.contains_key(h.as_str()) => {
                let mut values = headers.get_all(h.as_str()).iter();
                let first = values.next().and_then(|v| v.to_str().ok());
                if values.next().is_some() {
                    return Err(AuthnError::Ambiguous);
                }
                first.map(str::to_owned)
            }
            (_, Some(q)) => {
                let mut values = query
                    .into_iter()
                    .flat_map(|qs| qs.split('&'))
                    .filter_map(|kv| {
                        kv.strip_prefix(q.as_str())
                            .and_then(|r| r.strip_prefix('='))
                    });
                let first = values.next();
                if values.next().is_some() {
                    return Err(AuthnError::Ambiguous);
                }
                first.map(str::to_owned)
            }
            _ => None,
        };
        let Some(presented) = presented else { continue };
        match set.client_of(&presented) {
            Some(client) => {
                caller.api_key = Some((id.clone(), client.to_owned()));
                break;
            }
            None => return Err(AuthnError::InvalidApiKey),
        }
    }
    Ok(caller)
}

impl Caller {
    /// The verified facts the engine decides on.
    pub(crate) fn identity<'a>(&'a self, info: &'a ConnInfo) -> Identity<'a> {
        Identity {
            peer: info.peer.as_deref(),
            jwt: self.jwt.as_ref().map(|(p, c)| JwtIdentity {
                provider: p,
                claims: c,
            }),
            api_key: self.api_key.as_ref().map(|(p, c)| ApiKeyIdentity {
                provider: p,
                client: c,
            }),
        }
    }
}
