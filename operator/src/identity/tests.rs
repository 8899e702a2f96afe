use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;

const NOW: i64 = 1_795_000_000; // 2026-11-18

fn csr(sans: &[SanType], alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans.to_vec();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn issuance(ca: Ca, tokens: Arc<LocalTokens>) -> Issuance {
    Issuance {
        ca: Arc::new(ca),
        reviewer: tokens,
        trust_domain: "cluster.local".into(),
        lifetime: Duration::from_secs(3600),
    }
}

/// Verifies `chain_pem` as a client certificate chain against `bundle_pem` at `at`, the
/// way a sidecar's rustls verifier does, and returns the leaf's SPIFFE ID.
fn verify(chain_pem: &str, bundle_pem: &str, at: i64) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    verifier
        .verify_client_cert(
            &chain[0],
            &chain[1..],
            UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
        )
        .map_err(|e| e.to_string())?;
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
    assert!(!leaf.is_ca());
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names.len(), 1, "exactly one name: {names:?}");
    Ok(names[0].clone())
}

#[tokio::test]
async fn a_token_and_a_matching_csr_get_a_short_lived_certificate_for_that_identity() {
    let tokens = Arc::new(LocalTokens::generate().unwrap());
    let iss = issuance(Ca::generate("cluster.local", NOW).unwrap(), tokens.clone());
    let token = tokens
        .mint("shop", "checkout", Some("checkout-0"), AUDIENCE, NOW, 600)
        .unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/checkout";
    let out = iss
        .issue(
            &CertificateRequest {
                csr: csr(&[uri(id)], &rcgen::PKCS_ECDSA_P256_SHA256),
                token: token.clone(),
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out.spiffe_id, id);
    assert_eq!(out.expires_at, NOW + 3600);
    assert_eq!(
        verify(&out.certificate_chain, &out.trust_bundle, NOW + 10).unwrap(),
        id
    );
    // Short-lived: not valid after its lifetime.
    assert!(verify(&out.certificate_chain, &out.trust_bundle, NOW + 3601).is_err());
    // Another CA's bundle does not trust it.
    let other = Ca::generate("cluster.local", NOW).unwrap();
    assert!(verify(&out.certificate_chain, other.trust_bundle_pem(), NOW + 10).is_err());
}

#[tokio::test]
async fn issuance_refusals_say_why() {
    let tokens = Arc::new(LocalTokens::generate().unwrap());
    let iss = issuance(Ca::generate("cluster.local", NOW).unwrap(), tokens.clone());
    let own = "spiffe://cluster.local/ns/shop/sa/checkout";
    let good_csr = csr(&[uri(own)], &rcgen::PKCS_ECDSA_P256_SHA256);
    let good_token = tokens
        .mint("shop", "checkout", None, AUDIENCE, NOW, 600)
        .unwrap();
    let cases: Vec<(&str, CertificateRequest, u16, &str)> =
        vec![
        (
            "wrong audience",
            CertificateRequest {
                csr: good_csr.clone(),
                token: tokens.mint("shop", "checkout", None, "vault", NOW, 600).unwrap(),
            },
            401,
            "token_wrong_audience",
        ),
        (
            "token for another service account than the CSR",
            CertificateRequest {
                csr: good_csr.clone(),
                token: tokens.mint("shop", "payments", None, AUDIENCE, NOW, 600).unwrap(),
            },
            403,
            "csr_identity_mismatch",
        ),
        (
            "expired token",
            CertificateRequest {
                csr: good_csr.clone(),
                token: tokens.mint("shop", "checkout", None, AUDIENCE, NOW - 7200, 600).unwrap(),
            },
            401,
            "token_expired",
        ),
        (
            "CSR with an extra DNS name",
            CertificateRequest {
                csr: csr(
                    &[
                        uri(own),
                        SanType::DnsName("evil.example".try_into().unwrap()),
                    ],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                token: good_token.clone(),
            },
            403,
            "csr_identity_mismatch",
        ),
        (
            "CSR with a second SPIFFE ID",
            CertificateRequest {
                csr: csr(
                    &[
                        uri(own),
                        uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
                    ],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                token: good_token.clone(),
            },
            403,
            "csr_identity_mismatch",
        ),
        (
            "CSR with no name",
            CertificateRequest {
                csr: csr(&[], &rcgen::PKCS_ECDSA_P256_SHA256),
                token: good_token.clone(),
            },
            403,
            "csr_identity_mismatch",
        ),
        (
            "CSR with a P-384 key",
            CertificateRequest {
                csr: csr(&[uri(own)], &rcgen::PKCS_ECDSA_P384_SHA384),
                token: good_token.clone(),
            },
            400,
            "csr_key_type",
        ),
        (
            "not a CSR",
            CertificateRequest {
                csr:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                token: good_token.clone(),
            },
            400,
            "csr_invalid",
        ),
        (
            "token signed by another key",
            CertificateRequest {
                csr: good_csr.clone(),
                token: LocalTokens::generate()
                    .unwrap()
                    .mint("shop", "checkout", None, AUDIENCE, NOW, 600).unwrap(),
            },
            401,
            "token_invalid",
        ),
        (
            "not a token",
            CertificateRequest {
                csr: good_csr.clone(),
                token: "not-a-jwt".into(),
            },
            401,
            "token_invalid",
        ),
    ];
    for (name, req, status, code) in cases {
        let r = iss.issue(&req, NOW).await.expect_err(name);
        assert_eq!((r.status, r.code), (status, code), "{name}: {}", r.message);
        assert!(!r.message.contains(&req.token), "{name}: the token leaked");
    }
}

#[test]
fn a_generated_ca_survives_its_secret_and_a_user_intermediate_is_chained() {
    // Round trip through the Secret format.
    let ca = Ca::generate("cluster.local", NOW).unwrap();
    let data = ca.to_secret_data();
    let back = Ca::from_secret_data(&data).unwrap();
    assert_eq!(back.trust_bundle_pem(), ca.trust_bundle_pem());
    let id = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: "users".into(),
    };
    let csr_pem = csr(&[uri(&id.to_string())], &rcgen::PKCS_ECDSA_P256_SHA256);
    let issued = back
        .sign(&csr_pem, &id, Duration::from_secs(60), NOW)
        .unwrap();
    assert_eq!(
        verify(&issued.chain_pem, ca.trust_bundle_pem(), NOW).unwrap(),
        id.to_string()
    );

    // A user's root signs an intermediate; apiward signs with the intermediate.
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_cert = rp.self_signed(&root_key).unwrap();
    let root = rcgen::Issuer::new(rp, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "apiward intermediate");
    let int_cert = ip.signed_by(&int_key, &root).unwrap();
    let data = BTreeMap::from([
        ("tls.crt".to_owned(), int_cert.pem().into_bytes()),
        ("tls.key".to_owned(), int_key.serialize_pem().into_bytes()),
        ("ca.crt".to_owned(), root_cert.pem().into_bytes()),
    ]);
    let ca = Ca::from_secret_data(&data).unwrap();
    let issued = ca
        .sign(&csr_pem, &id, Duration::from_secs(60), NOW)
        .unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes()).count(),
        2,
        "leaf + intermediate"
    );
    assert_eq!(
        verify(&issued.chain_pem, &root_cert.pem(), NOW).unwrap(),
        id.to_string()
    );

    // Broken Secrets are refused with the key at fault.
    let mut bad = data.clone();
    bad.insert(
        "tls.key".into(),
        KeyPair::generate().unwrap().serialize_pem().into_bytes(),
    );
    assert!(matches!(
        Ca::from_secret_data(&bad),
        Err(CaError::Invalid { key: "tls.key", .. })
    ));
    let mut bad = data.clone();
    bad.remove("ca.crt");
    assert!(matches!(
        Ca::from_secret_data(&bad),
        Err(CaError::Missing("ca.crt"))
    ));
    let leaf_only = BTreeMap::from([
        ("tls.crt".to_owned(), issued.chain_pem.clone().into_bytes()),
        ("tls.key".to_owned(), int_key.serialize_pem().into_bytes()),
    ]);
    assert!(Ca::from_secret_data(&leaf_only).is_err());
}
