//! Authentication: JWTs verified against their issuer's JWKS, and API keys compared as
//! HMAC-SHA256 hashes in constant time. Runs before the decision engine; its output is
//! the verified [`apiward_policy::engine::Identity`] facts.
//!
//! JWT checks: `alg` must be on the provider's allow-list (never `none`, never HMAC, so a
//! public key can never be used as an HMAC secret); the key is chosen by `kid`; `exp` is
//! and `iss` are required (and `aud` when the provider lists audiences), `exp`/`nbf`/`iat`
//! are checked with the configured skew, `iss` must match, `aud` must contain one of the
//! provider's audiences, and a header with `crit` extensions is refused (none is
//! understood). Two credentials of one kind are refused (400), never "first wins". Verified tokens are cached by their
//! SHA-256 until `exp`. Tokens and keys never appear in logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiward_policy::config::{ApiKeyProvider, JwksSource, JwtProvider};
use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

/// Why a credential was refused (a reason code; never the credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthnError {
    /// Not a JWT.
    Malformed,
    /// `alg` not allowed for this provider.
    Algorithm,
    /// No key with this `kid`, even after a refresh.
    UnknownKey,
    /// Signature check failed.
    Signature,
    /// Expired.
    Expired,
    /// Not yet valid (`nbf`, or `iat` in the future).
    NotYetValid,
    /// Wrong issuer.
    Issuer,
    /// Wrong audience.
    Audience,
    /// Missing `exp` or another required claim.
    MissingClaim,
    /// No provider accepts tokens from this issuer here.
    UnknownIssuer,
    /// The API key is not one of the provider's.
    InvalidApiKey,
    /// The issuer's keys have never been fetched.
    KeysUnavailable,
    /// The token's header lists `crit` extensions (RFC 7515 §4.1.11): none is understood.
    CriticalHeader,
    /// More than one credential of a kind (two `Authorization` headers, two values of an
    /// API-key header or query parameter): refused (400), never "first wins".
    Ambiguous,
}

impl AuthnError {
    /// Every failure, for tables and tests.
    pub const ALL: [AuthnError; 14] = [
        AuthnError::Malformed,
        AuthnError::Algorithm,
        AuthnError::UnknownKey,
        AuthnError::Signature,
        AuthnError::Expired,
        AuthnError::NotYetValid,
        AuthnError::Issuer,
        AuthnError::Audience,
        AuthnError::MissingClaim,
        AuthnError::UnknownIssuer,
        AuthnError::InvalidApiKey,
        AuthnError::KeysUnavailable,
        AuthnError::CriticalHeader,
        AuthnError::Ambiguous,
    ];

    /// Stable reason code.
    pub fn code(self) -> &'static str {
        match self {
            AuthnError::Malformed => "token_malformed",
            AuthnError::Algorithm => "token_algorithm_not_allowed",
            AuthnError::UnknownKey => "token_unknown_key",
            AuthnError::Signature => "token_bad_signature",
            AuthnError::Expired => "token_expired",
            AuthnError::NotYetValid => "token_not_yet_valid",
            AuthnError::Issuer => "token_wrong_issuer",
            AuthnError::Audience => "token_wrong_audience",
            AuthnError::MissingClaim => "token_missing_claim",
            AuthnError::UnknownIssuer => "token_unknown_issuer",
            AuthnError::InvalidApiKey => "api_key_invalid",
            AuthnError::KeysUnavailable => "token_keys_unavailable",
            AuthnError::CriticalHeader => "token_crit_unsupported",
            AuthnError::Ambiguous => "credentials_ambiguous",
        }
    }

    /// The status a client gets: 400 for an ambiguous request, else 401.
    pub fn status(self) -> u16 {
        match self {
            AuthnError::Ambiguous => 400,
            _ => 401,
        }
    }
}

fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None, // `none` and every HMAC algorithm
    })
}

/// Keys of one issuer, by `kid`.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    without_kid: Vec<DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document, skipping symmetric and unusable keys.
    pub fn parse(doc: &str) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(doc).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut ks = KeySet::default();
        for jwk in &set.keys {
            if matches!(
                jwk.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            ) {
                continue; // never accept HMAC keys
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    ks.by_kid.insert(kid.clone(), key);
                }
                None => ks.without_kid.push(key),
            }
        }
        if ks.by_kid.is_empty() && ks.without_kid.is_empty() {
            return Err("the JWKS has no usable public key".into());
        }
        Ok(ks)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct CachedToken {
    claims: Arc<Map<String, Value>>,
    exp: u64,
}

const TOKEN_CACHE_MAX: usize = 10_000;
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// One JWT issuer: its keys (refreshed in the background for `jwksUri`) and a cache of
/// verified tokens.
pub struct JwtVerifier {
    /// The provider's config.
    pub provider: JwtProvider,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<Option<KeySet>>,
    refresh: Arc<Notify>,
    refreshed: Notify,
    last_refresh_request: Mutex<Option<Instant>>,
    cache: Mutex<HashMap<[u8; 32], CachedToken>>,
    /// JWKS fetch failures since start.
    pub fetch_failures: std::sync::atomic::AtomicU64,
    fetching: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("provider", &self.provider.id)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier; inline JWKS are parsed now, URIs are fetched by [`Self::keep_fresh`].
    pub fn new(provider: JwtProvider) -> Result<Self, String> {
        let algorithms: Vec<Algorithm> = provider
            .algorithms
            .iter()
            .filter_map(|a| algorithm(a))
            .collect();
        if algorithms.is_empty() {
            return Err(format!("JWT provider {}: no usable algorithm", provider.id));
        }
        let keys = match &provider.jwks {
            JwksSource::Inline(doc) => {
                Some(KeySet::parse(doc).map_err(|e| format!("JWT provider {}: {e}", provider.id))?)
            }
            JwksSource::Uri(_) => None,
        };
        Ok(Self {
            provider,
            algorithms,
            keys: ArcSwap::from_pointee(keys),
            refresh: Arc::new(Notify::new()),
            refreshed: Notify::new(),
            last_refresh_request: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            fetch_failures: Default::default(),
            fetching: Default::default(),
        })
    }

    /// Keys currently held (for metrics).
    pub fn key_count(&self) -> usize {
        self.keys.load().as_ref().as_ref().map_or(0, KeySet::len)
    }

    /// Forgets every cached verification (the next use of each token is checked in full).
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    /// Installs a freshly fetched key set.
    pub fn install_keys(&self, ks: KeySet) {
        self.keys.store(Arc::new(Some(ks)));
        self.refreshed.notify_waiters();
    }

    /// Same provider settings (so a config reload can keep the fetched keys and cache).
    pub fn same_provider(&self, p: &JwtProvider) -> bool {
        &self.provider == p
    }

    /// Verifies a token at `now` (Unix seconds).
    pub async fn verify(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Arc<Map<String, Value>>, AuthnError> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&hash).map(|t| (t.claims.clone(), t.exp)))
            && c.1 + self.provider.clock_skew_seconds > now
        {
            return Ok(c.0);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthnError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthnError::Algorithm);
        }
        if header.crit.is_some() {
            return Err(AuthnError::CriticalHeader);
        }
        let claims = match self.verify_with_keys(token, &header, now) {
            Err(AuthnError::UnknownKey) | Err(AuthnError::KeysUnavailable)
                if self.request_refresh() =>
            {
                // One rate-limited refresh for an unknown kid, then a second try.
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), self.refreshed.notified()).await;
                self.verify_with_keys(token, &header, now)?
            }
            other => other?,
        };
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let claims = Arc::new(claims);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= TOKEN_CACHE_MAX {
                cache.retain(|_, t| t.exp + self.provider.clock_skew_seconds > now);
                if cache.len() >= TOKEN_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(
                hash,
                CachedToken {
                    claims: claims.clone(),
                    exp,
                },
            );
        }
        Ok(claims)
    }

    /// Returns true when a refresh was triggered (at most one per interval).
    fn request_refresh(&self) -> bool {
        if !matches!(self.provider.jwks, JwksSource::Uri(_)) {
            return false;
        }
        let Ok(mut last) = self.last_refresh_request.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < REFRESH_MIN_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        self.refresh.notify_one();
        true
    }

    fn verify_with_keys(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        now: u64,
    ) -> Result<Map<String, Value>, AuthnError> {
        let keys = self.keys.load();
        let Some(keys) = keys.as_ref() else {
            return Err(AuthnError::KeysUnavailable);
        };
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => keys.by_kid.get(kid).into_iter().collect(),
            None => keys
                .without_kid
                .iter()
                .chain(keys.by_kid.values())
                .collect(),
        };
        if candidates.is_empty() {
            return Err(AuthnError::UnknownKey);
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = self.provider.clock_skew_seconds;
        v.validate_exp = true;
        v.validate_nbf = true;
        // `iss` is always required and must match; `aud` whenever audiences are set
        // (jsonwebtoken checks a claim's value only when it is present, unless required).
        v.set_issuer(&[&self.provider.issuer]);
        if self.provider.audiences.is_empty() {
            v.set_required_spec_claims(&["exp", "iss"]);
            v.validate_aud = false;
        } else {
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.set_audience(&self.provider.audiences);
        }
        let mut last = AuthnError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &v) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims
                        .get("iat")
                        .and_then(Value::as_u64)
                        .is_some_and(|iat| iat > now + self.provider.clock_skew_seconds)
                    {
                        return Err(AuthnError::NotYetValid);
                    }
                    return Ok(claims);
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature => return Err(AuthnError::Expired),
                        K::ImmatureSignature => return Err(AuthnError::NotYetValid),
                        K::InvalidIssuer => return Err(AuthnError::Issuer),
                        K::InvalidAudience => return Err(AuthnError::Audience),
                        K::MissingRequiredClaim(_) => return Err(AuthnError::MissingClaim),
                        K::InvalidAlgorithm => AuthnError::Algorithm,
                        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                            return Err(AuthnError::Malformed);
                        }
                        _ => AuthnError::Signature,
                    };
                }
            }
        }
        Err(last)
    }

    /// Fetches the JWKS now and then: at start, every `interval`, when asked (unknown
    /// `kid`), and with backoff after failures. The last good keys are kept when the issuer
    /// is down. Runs until the verifier is dropped by a config change.
    pub async fn keep_fresh(
        self: Arc<Self>,
        client: Arc<rustls::ClientConfig>,
        interval: Duration,
    ) {
        let JwksSource::Uri(uri) = self.provider.jwks.clone() else {
            return;
        };
        if self
            .fetching
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return; // already kept fresh by an earlier task
        }
        let weak = Arc::downgrade(&self);
        let refresh = self.refresh.clone();
        drop(self);
        let mut backoff = Duration::from_millis(500);
        loop {
            let Some(me) = weak.upgrade() else { return };
            let wait = match fetch(&uri, &client)
                .await
                .and_then(|doc| KeySet::parse(&doc))
            {
                Ok(ks) => {
                    tracing::info!(provider = %me.provider.id, keys = ks.len(), "JWKS refreshed");
                    me.install_keys(ks);
                    backoff = Duration::from_millis(500);
                    interval
                }
                Err(e) => {
                    me.fetch_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    me.refreshed.notify_waiters();
                    tracing::warn!(provider = %me.provider.id, error = %e, retry_in_ms = backoff.as_millis() as u64, "JWKS fetch failed; keeping the last good keys");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    w
                }
            };
            drop(me);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = refresh.notified() => {}
            }
        }
    }
}

/// GETs a JWKS document over HTTPS (or HTTP for `http://` URLs), at most 1 MiB, 5 s.
pub async fn fetch(uri: &str, tls: &Arc<rustls::ClientConfig>) -> Result<String, String> {
    let (status, body) = crate::client::call(uri, None, tls, 1 << 20, Duration::from_secs(5))
        .await
        .map_err(|e| format!("JWKS fetch: {e}"))?;
    if !status.is_success() {
        return Err(format!("JWKS endpoint answered {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
}

/// One API-key provider, ready to check presented keys.
#[derive(Debug)]
pub struct ApiKeySet {
    /// Provider config (hashes only).
    pub provider: ApiKeyProvider,
    mac_key: Vec<u8>,
    hashes: Vec<(String, [u8; 32])>,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl ApiKeySet {
    /// Parses the provider's hex material.
    pub fn new(provider: ApiKeyProvider) -> Result<Self, String> {
        let mac_key = unhex(&provider.hmac_key)
            .ok_or_else(|| format!("API-key provider {}: hmacKey is not hex", provider.id))?;
        let mut hashes = Vec::new();
        for k in &provider.keys {
            let h: [u8; 32] = unhex(&k.hash)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| {
                    format!(
                        "API-key provider {}: hash of {} is not 32 bytes of hex",
                        provider.id, k.client
                    )
                })?;
            hashes.push((k.client.clone(), h));
        }
        Ok(Self {
            provider,
            mac_key,
            hashes,
        })
    }

    /// The client a presented key belongs to. Every stored hash is compared, in constant time.
    pub fn client_of(&self, presented: &str) -> Option<&str> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key).ok()?;
        mac.update(presented.trim().as_bytes());
        let h: [u8; 32] = mac.finalize().into_bytes().into();
        let mut found = None;
        for (client, stored) in &self.hashes {
            if bool::from(stored.ct_eq(&h)) {
                found = Some(client.as_str());
            }
        }
        found
    }
}

/// The `iss` claim of an unverified token, to pick the provider that should verify it.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let claims: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    claims.get("iss").and_then(Value::as_str).map(str::to_owned)
}
