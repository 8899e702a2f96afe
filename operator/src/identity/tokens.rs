//! Who is asking: a projected ServiceAccount token, checked by a [`TokenReviewer`].
//!
//! In a cluster the API server checks it (TokenReview). In local mode ([`LocalTokens`])
//! tokens in the same format are signed and checked with a local ES256 key, so the
//! issuance path after the check is the same.

use std::future::Future;
use std::pin::Pin;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AUDIENCE;

/// What a checked token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedToken {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub service_account: String,
    /// The pod the token is bound to, when it is bound to one.
    pub pod: Option<String>,
}

/// Why a token was refused. Messages never contain the token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT at all.
    #[error("the token is not a JWT")]
    Malformed,
    /// Past its expiry.
    #[error("the token has expired")]
    Expired,
    /// Not issued for audience `apiward`.
    #[error("the token is not for audience `apiward` (mount a projected token with that audience)")]
    WrongAudience,
    /// Signature, issuer or subject wrong.
    #[error("the token is not valid: {0}")]
    Invalid(String),
    /// The reviewer could not be asked (API server down).
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

/// A future returned by a reviewer.
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ReviewedToken, TokenError>> + Send + 'a>>;

/// Checks a token and says which ServiceAccount it proves.
pub trait TokenReviewer: Send + Sync {
    /// Reviews `token` for audience `apiward` at `now_unix` (reviewers with their own
    /// clock, like the API server, use theirs).
    fn review<'a>(&'a self, token: &'a str, now_unix: i64) -> ReviewFuture<'a>;
}

/// `kubernetes.io` claim of a projected token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubeClaim {
    namespace: String,
    serviceaccount: Named,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Named>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Named {
    name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubeClaim,
}

/// The issuer of local-mode tokens.
pub const LOCAL_ISSUER: &str = "apiward-local";

/// Local mode: tokens in the projected-token format, signed with a local ES256 key.
pub struct LocalTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    key_pem: String,
}

impl std::fmt::Debug for LocalTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalTokens { .. }")
    }
}

impl LocalTokens {
    /// A new signing key.
    pub fn generate() -> Result<Self, TokenError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Self::from_pem(&key.serialize_pem())
    }

    /// From a PKCS#8 PEM ES256 key (as [`Self::key_pem`] writes it).
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        let key = rcgen::KeyPair::from_pem(pem).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(TokenError::Invalid(
                "the signing key must be ECDSA P-256".into(),
            ));
        }
        let encoding = EncodingKey::from_ec_der(&key.serialize_der());
        // The uncompressed point, as jsonwebtoken's aws-lc-rs backend expects.
        let decoding = DecodingKey::from_ec_der(key.public_key_raw());
        Ok(Self {
            encoding,
            decoding,
            key_pem: pem.to_owned(),
        })
    }

    /// The signing key, PEM (to keep it across restarts; it is a secret).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A token for `namespace/service_account`, like the kubelet's projected token.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        audience: &str,
        now_unix: i64,
        ttl_seconds: i64,
    ) -> Result<String, TokenError> {
        let claims = Claims {
            iss: LOCAL_ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![audience.into()],
            exp: now_unix + ttl_seconds,
            iat: now_unix,
            nbf: now_unix,
            kubernetes: KubeClaim {
                namespace: namespace.into(),
                serviceaccount: Named {
                    name: service_account.into(),
                },
                pod: pod.map(|p| Named { name: p.into() }),
            },
        };
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(format!("signing the token failed: {e}")))
    }

    /// Checks a token at `now_unix` (no clock inside, for tests and for [`TokenReviewer`]).
    pub fn check(&self, token: &str, now_unix: i64) -> Result<ReviewedToken, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[LOCAL_ISSUER]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        v.validate_exp = false; // checked below against the injected clock
        v.validate_nbf = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) => {
                    TokenError::Malformed
                }
                _ => TokenError::Invalid(e.to_string()),
            }
        })?;
        let c = data.claims;
        const LEEWAY: i64 = 30;
        if c.exp + LEEWAY <= now_unix {
            return Err(TokenError::Expired);
        }
        if c.nbf - LEEWAY > now_unix {
            return Err(TokenError::Invalid("the token is not valid yet".into()));
        }
        let expected_sub = format!(
            "system:serviceaccount:{}:{}",
            c.kubernetes.namespace, c.kubernetes.serviceaccount.name
        );
        if c.sub != expected_sub {
            return Err(TokenError::Invalid(
                "subject and kubernetes.io claims disagree".into(),
            ));
        }
        Ok(ReviewedToken {
            namespace: c.kubernetes.namespace,
            service_account: c.kubernetes.serviceaccount.name,
            pod: c.kubernetes.pod.map(|p| p.name),
        })
    }
}

impl TokenReviewer for LocalTokens {
    fn review<'a>(&'a self, token: &'a str, now_unix: i64) -> ReviewFuture<'a> {
        Box::pin(std::future::ready(self.check(token, now_unix)))
    }
}
