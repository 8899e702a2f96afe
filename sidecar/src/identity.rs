//! The workload's mesh identity: a key generated in memory (never written anywhere), a
//! certificate for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` requested from the operator
//! with the pod's projected ServiceAccount token, renewed at about 70 % of its life (with
//! jitter, retried with backoff), and served to TLS handshakes through a resolver so a
//! renewal swaps it in without touching open connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;

use crate::state::Shared;

/// Where the certificate comes from (the `identity` block of the settings file).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySettings {
    /// The operator's identity endpoint, e.g. `https://apiward-operator.apiward-system.svc:15012`.
    pub url: String,
    /// The projected ServiceAccount token (audience `apiward`), re-read at every request.
    pub token_file: PathBuf,
    /// Roots that verify the operator's server certificate (the mesh trust bundle).
    pub ca_file: PathBuf,
    /// Trust domain of the SPIFFE ID asked for (default: the policy's, else `cluster.local`).
    #[serde(default)]
    pub trust_domain: Option<String>,
}

/// A certificate in force.
pub struct Issued {
    /// What handshakes present.
    pub key: Arc<CertifiedKey>,
    /// Roots peers are verified against.
    pub roots: Arc<RootCertStore>,
    /// The same roots, PEM (to notice a changed bundle).
    pub bundle_pem: String,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// Not after, Unix seconds.
    pub expires_unix: i64,
    /// When it was received, Unix seconds.
    pub issued_unix: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

/// The sidecar's identity: the certificate in force, if any yet.
#[derive(Debug, Default)]
pub struct WorkloadIdentity {
    current: ArcSwapOption<Issued>,
}

impl WorkloadIdentity {
    /// The certificate in force.
    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }
}

impl rustls::server::ResolvesServerCert for WorkloadIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|i| i.key.clone())
    }
}

/// The same certificate, presented when this sidecar originates mTLS to a meshed peer.
impl rustls::client::ResolvesClientCert for WorkloadIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|i| i.key.clone())
    }
    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Namespace and ServiceAccount named by a projected token (read, not verified: the
/// operator verifies it; this only decides what to ask for).
fn token_subject(token: &str) -> Result<(String, String), String> {
    let v: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| "the token file does not hold a JWT")?;
    let k = &v["kubernetes.io"];
    if let (Some(ns), Some(sa)) = (
        k["namespace"].as_str(),
        k["serviceaccount"]["name"].as_str(),
    ) {
        return Ok((ns.to_owned(), sa.to_owned()));
    }
    let sub = v["sub"].as_str().unwrap_or_default();
    match sub
        .strip_prefix("system:serviceaccount:")
        .map(|r| r.split(':').collect::<Vec<_>>())
    {
        Some(parts) if parts.len() == 2 => Ok((parts[0].to_owned(), parts[1].to_owned())),
        _ => Err("the token names no ServiceAccount".into()),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertificateResponse {
    certificate_chain: String,
    trust_bundle: String,
    serial: String,
    expires_at: i64,
    spiffe_id: String,
}

/// Asks the operator for a certificate: a fresh in-memory key, a CSR for exactly this
/// workload's SPIFFE ID, and the token that proves it.
pub async fn request(
    s: &IdentitySettings,
    trust_domain: &str,
    client: &Arc<rustls::ClientConfig>,
) -> Result<Issued, String> {
    let token = std::fs::read_to_string(&s.token_file)
        .map_err(|e| format!("{}: {e}", s.token_file.display()))?;
    let token = token.trim();
    let (ns, sa) = token_subject(token)?;
    let want = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        want.clone()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let body = serde_json::json!({"csr": csr, "token": token}).to_string();
    let url = format!("{}/v1/certificates", s.url.trim_end_matches('/'));
    let (status, resp) = crate::client::call(
        &url,
        Some(body.into()),
        client,
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap_or_default();
        return Err(format!(
            "{url} answered {status}: {} ({})",
            v["message"].as_str().unwrap_or("no message"),
            v["error"].as_str().unwrap_or("no code")
        ));
    }
    let r: CertificateResponse =
        serde_json::from_slice(&resp).map_err(|e| format!("{url}: unexpected answer: {e}"))?;
    if r.spiffe_id != want {
        return Err(format!("asked for {want}, was given {}", r.spiffe_id));
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(r.certificate_chain.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    if crate::tls::spiffe_id(leaf).as_deref() != Some(want.as_str()) {
        return Err("the certificate does not carry the SPIFFE ID asked for".into());
    }
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(r.trust_bundle.as_bytes()) {
        roots
            .add(c.map_err(|e| format!("trust bundle: {e}"))?)
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    let der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        roots: Arc::new(roots),
        bundle_pem: r.trust_bundle,
        spiffe_id: r.spiffe_id,
        serial: r.serial,
        expires_unix: r.expires_at,
        issued_unix: now(),
    })
}

/// When to renew: at 70 % of the lifetime, moved by up to ±5 % of it.
pub fn renew_at(issued_unix: i64, expires_unix: i64, jitter: f64) -> i64 {
    if expires_unix <= issued_unix {
        return issued_unix; // already expired: renew now
    }
    let life = (expires_unix - issued_unix) as f64;
    issued_unix + (life * (0.70 + 0.05 * jitter.clamp(-1.0, 1.0))).round() as i64
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = crate::tls::provider().secure_random.fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 2.0 - 1.0
}

/// Requests the certificate, then keeps it renewed until the process ends. Failures are
/// retried with backoff (1 s doubling to 30 s); the certificate in force keeps serving.
pub async fn keep_renewed(
    shared: Arc<Shared>,
    identity: Arc<WorkloadIdentity>,
    s: IdentitySettings,
) {
    let client = match crate::tls::client_config(Some(&s.ca_file)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "identity: cannot read identity.caFile; no certificate");
            return;
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let trust_domain = s.trust_domain.clone().unwrap_or_else(|| {
            shared
                .active
                .load()
                .as_ref()
                .and_then(|a| a.config.as_ref().map(|c| c.trust_domain.clone()))
                .unwrap_or_else(|| "cluster.local".into())
        });
        match request(&s, &trust_domain, &client).await {
            Ok(issued) => {
                backoff = Duration::from_secs(1);
                let next = renew_at(issued.issued_unix, issued.expires_unix, jitter());
                let bundle_changed = identity
                    .current()
                    .is_none_or(|old| old.bundle_pem != issued.bundle_pem);
                tracing::info!(spiffe_id = %issued.spiffe_id, serial = %issued.serial, expires_at = issued.expires_unix, renew_at = next, "identity: certificate in force");
                shared.metrics.identity_expiry.set(issued.expires_unix);
                shared.metrics.identity_renewals.inc();
                identity.current.store(Some(Arc::new(issued)));
                if bundle_changed {
                    // The verifier's roots are part of the TLS config: rebuild it.
                    if let Err(e) = shared.rebuild(crate::state::Change::Identity) {
                        tracing::warn!(error = %e, "identity: new trust bundle not applied");
                    }
                }
                let wait = (next - now()).max(1) as u64;
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            Err(e) => {
                shared.metrics.identity_failures.inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "identity: certificate request failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_seventy_percent_give_or_take_five() {
        assert_eq!(renew_at(0, 1000, 0.0), 700);
        assert_eq!(renew_at(0, 1000, 1.0), 750);
        assert_eq!(renew_at(0, 1000, -1.0), 650);
        assert_eq!(renew_at(100, 100, 0.0), 100);
        for _ in 0..100 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
    }

    #[test]
    fn the_subject_comes_from_the_projected_token() {
        let claims = serde_json::json!({"sub": "system:serviceaccount:shop:checkout",
            "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"}}});
        let jwt = |c: &serde_json::Value| {
            let key = jsonwebtoken::EncodingKey::from_secret(b"test only");
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), c, &key).unwrap()
        };
        let token = jwt(&claims);
        assert_eq!(
            token_subject(&token).unwrap(),
            ("shop".into(), "checkout".into())
        );
        let token = jwt(&serde_json::json!({"sub": "system:serviceaccount:a:b"}));
        assert_eq!(token_subject(&token).unwrap(), ("a".into(), "b".into()));
        assert!(token_subject("not-a-token").is_err());
    }
}
