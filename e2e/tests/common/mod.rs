//! Helpers shared by the e2e test files.
#![allow(dead_code)]

use std::time::Duration;

use apiward::identity::{Ca, SpiffeId};
use apiward_e2e::now;

/// A client presenting a certificate the CA issued for `shop/<sa>` (HTTP/1.1).
pub fn mesh_client(ca: &Ca, sa: &str) -> reqwest::Client {
    mesh_client_builder(ca, sa).http1_only().build().unwrap()
}

/// A client builder with a certificate the CA issued for `shop/<sa>`, verifying servers
/// against the mesh trust bundle.
pub fn mesh_client_builder(ca: &Ca, sa: &str) -> reqwest::ClientBuilder {
    let id = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca
        .sign(&csr, &id, Duration::from_secs(3600), now())
        .unwrap();
    let pem = format!("{}{}", issued.chain_pem, key.serialize_pem());
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap()])
        .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
        // The sidecar's certificate names only its SPIFFE ID: verify the chain, not a host name.
        .danger_accept_invalid_hostnames(true)
        .tls_info(true)
}
