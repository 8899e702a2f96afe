//! Originated TLS: the verifier that checks a meshed peer's SPIFFE ID, and the client
//! configs for meshed and egress connections.

#[allow(unused_imports)]
use super::*;

/// Verifies a meshed peer: its chain against the mesh trust bundle, and its SPIFFE ID
/// against the one expected for the destination (not a DNS name).
#[derive(Debug)]
pub(super) struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    /// Any of these (a Service may be backed by several ServiceAccounts).
    expected: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match crate::tls::spiffe_id(end_entity) {
            Some(id) if self.expected.contains(&id) => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "peer is {}, expected {}",
                other.as_deref().unwrap_or("no SPIFFE ID"),
                self.expected.join(" or ")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Resumption tickets shared by every meshed client config, so a reconnect to a peer
/// resumes instead of doing a full handshake.
pub(super) fn resumption() -> rustls::client::Resumption {
    static STORE: std::sync::OnceLock<Arc<rustls::client::ClientSessionMemoryCache>> =
        std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| Arc::new(rustls::client::ClientSessionMemoryCache::new(1024)));
    rustls::client::Resumption::store(store.clone())
}

/// The client config for one meshed destination, offering `alpn` (empty: none).
pub fn mesh_client_config(
    mesh: &MeshTls,
    expected: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    mesh_client_config_any(mesh, &[expected.to_owned()], alpn)
}

/// The client config for a meshed destination whose peer may present any of `expected`.
pub fn mesh_client_config_any(
    mesh: &MeshTls,
    expected: &[String],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = crate::tls::provider();
    let verifier = SpiffeVerifier {
        roots: mesh.roots.clone(),
        expected: expected.to_vec(),
        provider: provider.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(mesh.client_auth.clone());
    cfg.resumption = resumption();
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}
