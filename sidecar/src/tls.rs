//! TLS for the inbound listener: rustls with the aws-lc-rs provider, TLS 1.3 and TLS 1.2
//! with ECDHE + AEAD suites only, client certificates verified against the trust bundle,
//! and the peer's SPIFFE ID read from its certificate's URI SAN.

use std::sync::Arc;

use apiward_policy::config::MtlsMode;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::TlsFiles;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// The certificate, key and trust roots of a [`TlsFiles`], checked to belong together.
pub fn load_files(
    files: &TlsFiles,
) -> Result<(Arc<rustls::sign::CertifiedKey>, Arc<RootCertStore>), TlsError> {
    let certs = read_certs(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| TlsError(format!("{}: {e}", files.key_file.display())))?;
    let mut roots = RootCertStore::empty();
    for c in read_certs(&files.client_ca_file)? {
        roots
            .add(c)
            .map_err(|e| TlsError(format!("{}: {e}", files.client_ca_file.display())))?;
    }
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError(format!("{}: {e}", files.key_file.display())))?;
    let certified = rustls::sign::CertifiedKey::new(certs, key);
    certified.keys_match().map_err(|e| {
        TlsError(format!(
            "{} does not belong to {}: {e}",
            files.key_file.display(),
            files.cert_file.display()
        ))
    })?;
    Ok((Arc::new(certified), Arc::new(roots)))
}

/// A client certificate that never changes (from [`TlsFiles`]), for originating mTLS.
#[derive(Debug)]
pub struct StaticClientCert(pub Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for StaticClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound server config around a certificate resolver (certificate files, or the
/// operator-issued identity, whose handshakes present the certificate in force at that
/// moment, so renewals need no new config). In Strict mode a client certificate is
/// required; in Permissive mode it is optional (callers without one are unauthenticated).
pub fn server_config_with(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    roots: Arc<RootCertStore>,
    mode: MtlsMode,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = match mode {
        MtlsMode::Strict => builder.build(),
        _ => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| TlsError(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::tcp::ALPN.to_vec(),
    ];
    Ok(Arc::new(cfg))
}

/// The SPIFFE ID of a verified peer certificate: its URI SAN, which must be the only one
/// (an X.509-SVID has exactly one) and start with `spiffe://`. `None` otherwise.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) if u.starts_with("spiffe://") => Some(u.to_owned()),
        _ => None,
    }
}

/// A client config trusting the public web roots plus an optional extra CA file
/// (for fetching JWKS over HTTPS).
pub fn client_config(
    extra_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(p) = extra_ca {
        for c in read_certs(p)? {
            roots
                .add(c)
                .map_err(|e| TlsError(format!("{}: {e}", p.display())))?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("apiward-tls-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        let files = TlsFiles {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: dir.join("ca.crt"),
        };
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        assert!(load_files(&files).is_ok());
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&files.key_file, other.serialize_pem()).unwrap();
        let err = load_files(&files).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }
}
