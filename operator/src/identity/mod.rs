//! Mesh identity: the CA ([`ca`]), proof of who a caller is ([`tokens`]), and the
//! issuance decision that joins them ([`Issuance`]). The HTTP edge is in
//! `serve::identity`.
//!
//! In: a CSR and a projected ServiceAccount token. Out: a certificate whose only name is
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>` of that token, or a
//! refusal with a reason.

pub mod ca;
pub mod kube;
pub mod tokens;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use ca::{Ca, CaError, IssueError, Issued};
pub use tokens::{LocalTokens, ReviewedToken, TokenError, TokenReviewer};

/// The audience a sidecar's projected token must carry.
pub const AUDIENCE: &str = "apiward";
/// Default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount.
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// `POST /v1/certificates` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRequest {
    /// PKCS#10 CSR, PEM.
    pub csr: String,
    /// The projected ServiceAccount token (audience `apiward`).
    pub token: String,
}

/// `POST /v1/certificates` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// Leaf first, then any intermediates, PEM.
    pub certificate_chain: String,
    /// Roots to trust, PEM.
    pub trust_bundle: String,
    /// The leaf's serial, hex.
    pub serial: String,
    /// Not after, Unix seconds.
    pub expires_at: i64,
    /// The SPIFFE ID issued.
    pub spiffe_id: String,
}

/// A refusal: HTTP status, a stable code and a message the caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 401, 403 or 503.
    pub status: u16,
    /// Stable machine-readable reason.
    pub code: &'static str,
    /// For humans; never contains the token.
    pub message: String,
}

/// Checks tokens and signs CSRs. The same code path whatever checked the token.
pub struct Issuance {
    /// The CA.
    pub ca: Arc<Ca>,
    /// Who checks tokens (TokenReview in a cluster, a local key otherwise).
    pub reviewer: Arc<dyn TokenReviewer>,
    /// Trust domain of issued identities.
    pub trust_domain: String,
    /// Lifetime of issued certificates.
    pub lifetime: Duration,
}

impl fmt::Debug for Issuance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuance")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Issuance {
    /// Decides one request.
    #[tracing::instrument(name = "issue_certificate", skip_all)]
    pub async fn issue(
        &self,
        req: &CertificateRequest,
        now_unix: i64,
    ) -> Result<CertificateResponse, Refusal> {
        let reviewed = self
            .reviewer
            .review(&req.token, now_unix)
            .await
            .map_err(|e| {
                let (status, code) = match &e {
                    TokenError::Unavailable(_) => (503, "token_review_unavailable"),
                    TokenError::Expired => (401, "token_expired"),
                    TokenError::WrongAudience => (401, "token_wrong_audience"),
                    TokenError::Malformed | TokenError::Invalid(_) => (401, "token_invalid"),
                };
                Refusal {
                    status,
                    code,
                    message: e.to_string(),
                }
            })?;
        let id = SpiffeId {
            trust_domain: self.trust_domain.clone(),
            namespace: reviewed.namespace,
            service_account: reviewed.service_account,
        };
        let issued = self
            .ca
            .sign(&req.csr, &id, self.lifetime, now_unix)
            .map_err(|e| {
                let (status, code) = match &e {
                    IssueError::BadCsr(_) => (400, "csr_invalid"),
                    IssueError::KeyType(_) => (400, "csr_key_type"),
                    IssueError::WrongIdentity { .. } => (403, "csr_identity_mismatch"),
                    IssueError::Signing(_) => (500, "signing_failed"),
                };
                Refusal {
                    status,
                    code,
                    message: e.to_string(),
                }
            })?;
        Ok(CertificateResponse {
            certificate_chain: issued.chain_pem,
            trust_bundle: issued.trust_bundle_pem,
            serial: issued.serial,
            expires_at: issued.expires_unix,
            spiffe_id: id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
