//! Every refusal the sidecar answers with, in one catalog: status, reason code, the
//! challenge a client needs and the one-line message of the JSON body. Engine reasons,
//! authentication failures, pipeline checks and upstream failures all become a
//! [`Refusal`]; docs/troubleshooting.md's table is this catalog (a test holds them equal).

use apiward_policy::engine::Reason;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::authn::AuthnError;
use crate::body::{ProxyBody, full};

/// What a 401 asks the client for (`WWW-Authenticate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// No challenge (not a 401).
    None,
    /// `Bearer`: a token is needed.
    Bearer,
    /// `Bearer error="invalid_token"`: the token presented was refused.
    InvalidToken,
    /// `ApiKey`: the API key presented was refused.
    ApiKey,
}

/// A refusal: status, code, challenge and message. No internal detail ever goes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Stable reason code (body, metrics, decision log).
    pub code: &'static str,
    /// `WWW-Authenticate`, for 401s.
    pub challenge: Challenge,
    /// The body's message.
    pub message: &'static str,
    /// Close the connection after answering (the rest of the request was not read, or the
    /// connection's kind is no longer acceptable).
    pub close: bool,
}

const fn r(
    status: u16,
    code: &'static str,
    challenge: Challenge,
    message: &'static str,
) -> Refusal {
    Refusal {
        status,
        code,
        challenge,
        message,
        close: false,
    }
}

const MALFORMED: &str = "the request is malformed or ambiguous";
const AUTHN: &str = "authentication is required";
const FORBIDDEN: &str = "the caller is not allowed to perform this request";
const UNPROCESSABLE: &str = "the upstream response could not be processed";
const TOKEN: Challenge = Challenge::InvalidToken;
const NONE: Challenge = Challenge::None;

impl Refusal {
    /// No config loaded: fail closed.
    pub const NO_CONFIG: Refusal = r(503, "no_config", NONE, "the service is not ready");
    /// The connection's kind is not what the port's mTLS mode accepts.
    pub const MTLS_REQUIRED: Refusal = r(403, "mtls_required", NONE, FORBIDDEN);
    /// The request head is larger than the limit.
    pub const HEADERS_TOO_LARGE: Refusal =
        r(431, "headers_too_large", NONE, "request headers too large");
    /// No Allow rule matches (default deny).
    pub const NO_MATCHING_RULE: Refusal = r(403, "no_matching_rule", NONE, FORBIDDEN);
    /// Only an identified caller could be allowed, and this one has none.
    pub const UNAUTHENTICATED: Refusal = r(401, "unauthenticated", Challenge::Bearer, AUTHN);
    /// The path is malformed or ambiguous (or cannot be written back for the app).
    pub const INVALID_PATH: Refusal = r(400, "invalid_path", NONE, MALFORMED);
    /// The body is larger than `requestLimits.maxBodySize`.
    pub const BODY_TOO_LARGE: Refusal =
        r(413, "body_too_large", NONE, "the request body is too large");
    /// The content type is not one `requestLimits.contentTypes` allows.
    pub const UNSUPPORTED_CONTENT_TYPE: Refusal = r(
        415,
        "unsupported_content_type",
        NONE,
        "unsupported content type",
    );
    /// A body check must read a body that is compressed.
    pub const COMPRESSED_BODY_UNSUPPORTED: Refusal = r(
        415,
        "compressed_body_unsupported",
        NONE,
        "unsupported content type",
    );
    /// The JSON body nests deeper than `requestLimits.maxJsonDepth`.
    pub const JSON_TOO_DEEP: Refusal = r(400, "json_too_deep", NONE, MALFORMED);
    /// The body could not be read.
    pub const BODY_READ_FAILED: Refusal = r(400, "body_read_failed", NONE, MALFORMED);
    /// The app did not answer within `requestLimits.timeout`.
    pub const UPSTREAM_TIMEOUT: Refusal = r(
        504,
        "upstream_timeout",
        NONE,
        "the upstream did not answer in time",
    );
    /// The app could not be reached.
    pub const UPSTREAM_UNAVAILABLE: Refusal = r(502, "upstream_unavailable", NONE, UNPROCESSABLE);
    /// The app switched protocols without a WebSocket handshake asking for it.
    pub const UPSTREAM_PROTOCOL_SWITCH: Refusal =
        r(502, "upstream_protocol_switch", NONE, UNPROCESSABLE);
    /// The response filter cannot read a response it must filter.
    pub const RESPONSE_NOT_FILTERABLE: Refusal =
        r(502, "response_not_filterable", NONE, UNPROCESSABLE);

    /// Every refusal, by code (docs/troubleshooting.md lists exactly these).
    pub const ALL: &'static [Refusal] = &[
        Refusal::NO_CONFIG,
        Refusal::MTLS_REQUIRED,
        Refusal::HEADERS_TOO_LARGE,
        r(401, "token_malformed", TOKEN, AUTHN),
        r(401, "token_algorithm_not_allowed", TOKEN, AUTHN),
        r(401, "token_unknown_key", TOKEN, AUTHN),
        r(401, "token_bad_signature", TOKEN, AUTHN),
        r(401, "token_expired", TOKEN, AUTHN),
        r(401, "token_not_yet_valid", TOKEN, AUTHN),
        r(401, "token_wrong_issuer", TOKEN, AUTHN),
        r(401, "token_wrong_audience", TOKEN, AUTHN),
        r(401, "token_missing_claim", TOKEN, AUTHN),
        r(401, "token_unknown_issuer", TOKEN, AUTHN),
        r(401, "token_keys_unavailable", TOKEN, AUTHN),
        r(401, "token_crit_unsupported", TOKEN, AUTHN),
        r(401, "api_key_invalid", Challenge::ApiKey, AUTHN),
        r(400, "credentials_ambiguous", NONE, MALFORMED),
        Refusal::UNAUTHENTICATED,
        r(403, "denied_by_rule", NONE, FORBIDDEN),
        Refusal::NO_MATCHING_RULE,
        r(403, "binding_failed", NONE, FORBIDDEN),
        Refusal::INVALID_PATH,
        r(405, "method_not_allowed", NONE, "method not allowed"),
        r(400, "method_override", NONE, MALFORMED),
        r(400, "path_override", NONE, MALFORMED),
        r(404, "undeclared_endpoint", NONE, "no such endpoint"),
        r(410, "sunset", NONE, "this endpoint has been retired"),
        r(429, "quota_exceeded", NONE, "too many requests"),
        Refusal::BODY_TOO_LARGE,
        Refusal::UNSUPPORTED_CONTENT_TYPE,
        Refusal::COMPRESSED_BODY_UNSUPPORTED,
        Refusal::JSON_TOO_DEEP,
        Refusal::BODY_READ_FAILED,
        Refusal::UPSTREAM_TIMEOUT,
        Refusal::UPSTREAM_UNAVAILABLE,
        Refusal::UPSTREAM_PROTOCOL_SWITCH,
        Refusal::RESPONSE_NOT_FILTERABLE,
    ];

    /// The catalog entry for a code.
    pub fn by_code(code: &str) -> Option<Refusal> {
        Self::ALL.iter().find(|r| r.code == code).copied()
    }

    /// The same refusal, closing the connection after it.
    pub const fn closing(self) -> Refusal {
        Refusal {
            close: true,
            ..self
        }
    }

    /// The response: the status, a small JSON body with the code and the request id, and
    /// `WWW-Authenticate` for 401s.
    pub fn response(&self, request_id: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({"error": {
            "code": self.code,
            "status": self.status,
            "message": self.message,
            "requestId": request_id,
        }});
        let mut resp = Response::new(full(body.to_string()));
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::FORBIDDEN);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(crate::inbound::X_REQUEST_ID, v);
        }
        let challenge = match self.challenge {
            Challenge::None => None,
            Challenge::Bearer => Some(HeaderValue::from_static("Bearer")),
            Challenge::ApiKey => Some(HeaderValue::from_static("ApiKey")),
            Challenge::InvalidToken => HeaderValue::from_str(&format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code
            ))
            .ok(),
        };
        if let Some(v) = challenge {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<Reason> for Refusal {
    /// The refusal for an engine reason (`Allowed` and `NoPolicy` are never refused; they
    /// map to `no_matching_rule` only to keep this total).
    fn from(reason: Reason) -> Self {
        Refusal::by_code(reason.code()).unwrap_or(Refusal::NO_MATCHING_RULE)
    }
}

impl From<AuthnError> for Refusal {
    fn from(e: AuthnError) -> Self {
        Refusal::by_code(e.code()).unwrap_or(Refusal::UNAUTHENTICATED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_reason_that_refuses_has_its_entry_with_the_engines_status() {
        for reason in Reason::ALL {
            if matches!(reason, Reason::Allowed | Reason::NoPolicy) {
                continue;
            }
            let r = Refusal::by_code(reason.code())
                .unwrap_or_else(|| panic!("{} is not in the catalog", reason.code()));
            assert_eq!(r.status, reason.status(), "{}", reason.code());
        }
    }

    #[test]
    fn every_authentication_failure_has_its_entry_with_its_status_and_challenge() {
        for e in AuthnError::ALL {
            let r = Refusal::by_code(e.code())
                .unwrap_or_else(|| panic!("{} is not in the catalog", e.code()));
            assert_eq!(r.status, e.status(), "{}", e.code());
            let want = match e {
                AuthnError::Ambiguous => Challenge::None,
                AuthnError::InvalidApiKey => Challenge::ApiKey,
                _ => Challenge::InvalidToken,
            };
            assert_eq!(r.challenge, want, "{}", e.code());
        }
    }

    #[test]
    fn codes_are_unique_and_only_401s_challenge() {
        let mut codes: Vec<&str> = Refusal::ALL.iter().map(|r| r.code).collect();
        codes.sort_unstable();
        let n = codes.len();
        codes.dedup();
        assert_eq!(codes.len(), n, "a code is listed twice");
        for r in Refusal::ALL {
            assert_eq!(
                r.challenge != Challenge::None,
                r.status == 401,
                "{}",
                r.code
            );
            assert!(!r.close, "catalog entries do not close: {}", r.code);
        }
    }

    #[test]
    fn the_troubleshooting_table_lists_exactly_the_catalog() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/troubleshooting.md"
        ))
        .unwrap();
        let mut documented: Vec<(u16, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let status = cells.get(1)?.parse::<u16>().ok()?;
                let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((status, code.to_owned()))
            })
            .collect();
        let mut catalog: Vec<(u16, String)> = Refusal::ALL
            .iter()
            .map(|r| (r.status, r.code.to_owned()))
            .collect();
        documented.sort();
        catalog.sort();
        assert_eq!(
            documented, catalog,
            "docs/troubleshooting.md's table and Refusal::ALL differ"
        );
    }

    #[test]
    fn a_refusal_response_carries_the_code_the_request_id_and_the_challenge() {
        let resp = Refusal::from(AuthnError::Expired).response("abc-1");
        assert_eq!(resp.status(), 401);
        let h = resp.headers();
        assert_eq!(
            h[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\", error_description=\"token_expired\""
        );
        assert_eq!(h["x-request-id"], "abc-1");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        let closing = Refusal::BODY_TOO_LARGE.closing().response("x");
        assert_eq!(closing.headers()[header::CONNECTION], "close");
    }
}
