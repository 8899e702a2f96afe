//! The mesh CA: a root (or an intermediate the user provides) that signs short-lived
//! workload certificates whose only name is the workload's SPIFFE ID.
//!
//! Pure: the clock is passed in; no I/O. The Secret format is cert-manager's (`tls.crt`,
//! `tls.key`, `ca.crt`), so a user-provided CA drops in.

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates are valid from a little before they are issued (clock skew).
const BACKDATE: Duration = Duration::from_secs(300);

/// Why a CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A key of the Secret is missing.
    #[error("the CA Secret has no `{0}`")]
    Missing(&'static str),
    /// The material does not parse or does not match.
    #[error("the CA Secret's `{key}` is unusable: {reason}")]
    Invalid {
        /// Which key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// Why a certificate was not issued. Each maps to a 4xx at the edge.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IssueError {
    /// The CSR does not parse or its signature is wrong.
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    BadCsr(String),
    /// The CSR's key is not ECDSA P-256.
    #[error("the CSR's key must be ECDSA P-256 (got {0})")]
    KeyType(String),
    /// The CSR asks for names other than exactly the caller's SPIFFE ID.
    #[error("the CSR must ask for exactly {expected} and nothing else (asked for: {asked})")]
    WrongIdentity {
        /// The SPIFFE ID the token proves.
        expected: String,
        /// What the CSR asked for.
        asked: String,
    },
    /// Signing failed (an internal error).
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then any intermediate: what the workload presents.
    pub chain_pem: String,
    /// The roots the workload should trust.
    pub trust_bundle_pem: String,
    /// Serial number, hex.
    pub serial: String,
    /// Not after, Unix seconds.
    pub expires_unix: i64,
}

/// The mesh CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate (the root itself, or an intermediate).
    cert_pem: String,
    key_pem: String,
    /// The roots: the one generated, or `ca.crt` of a provided Secret (may hold several
    /// during a root rotation).
    bundle_pem: String,
    /// The intermediate's chain to append after the leaf (empty when signing with a root).
    intermediates_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn datetime(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Ca {
    /// A new self-signed root for `trust_domain` (ECDSA P-256, ten years).
    pub fn generate(trust_domain: &str, now_unix: i64) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            CaError::Invalid {
                key: "tls.key",
                reason: e.to_string(),
            }
        })?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(
            DnType::CommonName,
            format!("apiward root CA ({trust_domain})"),
        );
        p.distinguished_name
            .push(DnType::OrganizationName, "apiward");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = datetime(now_unix - BACKDATE.as_secs() as i64);
        p.not_after = datetime(now_unix + ROOT_LIFETIME.as_secs() as i64);
        p.serial_number = Some(random_serial().map_err(|e| CaError::Invalid {
            key: "tls.crt",
            reason: e.to_string(),
        })?);
        let cert = p.self_signed(&key).map_err(|e| CaError::Invalid {
            key: "tls.crt",
            reason: e.to_string(),
        })?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: Issuer::new(p, key),
            bundle_pem: cert_pem.clone(),
            cert_pem,
            key_pem,
            intermediates_pem: String::new(),
        })
    }

    /// Loads a CA from Secret data in cert-manager's format: `tls.crt` (the signing
    /// certificate, optionally followed by its chain), `tls.key`, and `ca.crt` (the roots;
    /// optional when `tls.crt` is itself a root).
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, CaError> {
        let text = |k: &'static str| -> Result<Option<String>, CaError> {
            data.get(k)
                .map(|b| {
                    String::from_utf8(b.clone()).map_err(|_| CaError::Invalid {
                        key: k,
                        reason: "not UTF-8 PEM".into(),
                    })
                })
                .transpose()
        };
        let crt = text("tls.crt")?.ok_or(CaError::Missing("tls.crt"))?;
        let key_pem = text("tls.key")?.ok_or(CaError::Missing("tls.key"))?;
        let roots = text("ca.crt")?.filter(|s| !s.trim().is_empty());
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            key: "tls.key",
            reason: e.to_string(),
        })?;
        let pems = pem_blocks(&crt);
        let first = pems.first().ok_or(CaError::Invalid {
            key: "tls.crt",
            reason: "no certificate".into(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(first, key).map_err(|e| CaError::Invalid {
            key: "tls.crt",
            reason: e.to_string(),
        })?;
        // The key must belong to the certificate.
        let (_, parsed) =
            x509_parser::pem::parse_x509_pem(first.as_bytes()).map_err(|e| CaError::Invalid {
                key: "tls.crt",
                reason: e.to_string(),
            })?;
        let x509 = parsed.parse_x509().map_err(|e| CaError::Invalid {
            key: "tls.crt",
            reason: e.to_string(),
        })?;
        if x509.public_key().subject_public_key.data.as_ref() != issuer.key().der_bytes() {
            return Err(CaError::Invalid {
                key: "tls.key",
                reason: "the key does not match tls.crt".into(),
            });
        }
        if !x509.is_ca() {
            return Err(CaError::Invalid {
                key: "tls.crt",
                reason: "not a CA certificate (basicConstraints CA:FALSE)".into(),
            });
        }
        let self_signed = x509.subject() == x509.issuer();
        let bundle_pem = match (roots, self_signed) {
            (Some(r), _) => r,
            (None, true) => first.clone(),
            (None, false) => return Err(CaError::Missing("ca.crt")),
        };
        let intermediates_pem = if self_signed {
            String::new()
        } else {
            // The intermediate itself plus whatever chain followed it in tls.crt.
            pems.concat()
        };
        Ok(Self {
            issuer,
            cert_pem: first.clone(),
            key_pem,
            bundle_pem,
            intermediates_pem,
        })
    }

    /// Secret data in cert-manager's format, to store a generated CA.
    pub fn to_secret_data(&self) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            ("tls.crt".to_owned(), self.cert_pem.clone().into_bytes()),
            ("tls.key".to_owned(), self.key_pem.clone().into_bytes()),
            ("ca.crt".to_owned(), self.bundle_pem.clone().into_bytes()),
        ])
    }

    /// The trust bundle published to injected namespaces.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs `csr_pem` for `id` if the CSR asks for exactly that SPIFFE ID and nothing
    /// else, with an ECDSA P-256 key. Whatever else the CSR asks for (CA bit, key usages,
    /// subject) is ignored: the certificate's contents are decided here.
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
        now_unix: i64,
    ) -> Result<Issued, IssueError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssueError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(IssueError::KeyType(format!(
                "{:?}",
                csr.public_key.algorithm()
            )));
        }
        let expected = id.to_string();
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_owned(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        if asked.len() != 1 || asked[0] != expected {
            return Err(IssueError::WrongIdentity {
                expected,
                asked: if asked.is_empty() {
                    "no names".into()
                } else {
                    asked.join(", ")
                },
            });
        }
        let mut p = CertificateParams::default();
        p.subject_alt_names =
            vec![SanType::URI(expected.clone().try_into().map_err(
                |e: rcgen::Error| IssueError::Signing(e.to_string()),
            )?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_hex = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        p.serial_number = Some(serial);
        let expires_unix = now_unix + lifetime.as_secs() as i64;
        p.not_before = datetime(now_unix - BACKDATE.as_secs() as i64);
        p.not_after = datetime(expires_unix);
        let cert = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.intermediates_pem),
            trust_bundle_pem: self.bundle_pem.clone(),
            serial: serial_hex,
            expires_unix,
        })
    }
}

impl Ca {
    /// A serving certificate for the operator's own TLS servers (DNS names and IP
    /// addresses), with a fresh key. Returns the chain and the key, PEM.
    pub fn server_certificate(
        &self,
        names: &[String],
        lifetime: Duration,
        now_unix: i64,
    ) -> Result<(String, String), IssueError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        let mut p = CertificateParams::new(names.to_vec())
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        if let Some(first) = names.first() {
            p.distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial()?);
        p.not_before = datetime(now_unix - BACKDATE.as_secs() as i64);
        p.not_after = datetime(now_unix + lifetime.as_secs() as i64);
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok((
            format!("{}{}", cert.pem(), self.intermediates_pem),
            key.serialize_pem(),
        ))
    }
}

/// A positive 128-bit random serial (RFC 5280: at most 20 octets, positive).
fn random_serial() -> Result<SerialNumber, IssueError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| IssueError::Signing("no randomness".into()))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// The PEM blocks of a bundle, each with its armour.
fn pem_blocks(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN ") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}
