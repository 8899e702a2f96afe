//! Mesh mTLS handshakes, client and server in one thread over memory (both sides' CPU):
//! a full handshake (ECDSA P-256, TLS 1.3, client certificate, SPIFFE ID verified) and a
//! resumed one (TLS 1.3 ticket).

use std::hint::black_box;
use std::sync::Arc;

use apiward_policy::config::MtlsMode;
use apiward_sidecar::outbound::{MeshTls, mesh_client_config};
use apiward_sidecar::tls::{StaticClientCert, provider, server_config_with};
use criterion::{Criterion, criterion_group, criterion_main};
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;

fn leaf(issuer: &Issuer<'_, KeyPair>, sa: &str) -> Arc<CertifiedKey> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    let uri = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(der).unwrap();
    Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// Drives both sides until the handshake is done.
fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        server.process_new_packets().unwrap();
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
        }
        client.process_new_packets().unwrap();
    }
}

/// Lets the client take the server's new session tickets (for the next connection).
fn take_tickets(sv: &mut rustls::ServerConnection, cl: &mut rustls::ClientConnection) {
    let mut buf = Vec::new();
    while sv.wants_write() {
        sv.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        cl.read_tls(&mut rd).unwrap();
    }
    cl.process_new_packets().unwrap();
}

fn bench(c: &mut Criterion) {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_cert.der().to_vec()))
        .unwrap();
    let roots = Arc::new(roots);
    let server_key = leaf(&issuer, "orders");
    let server = server_config_with(
        Arc::new(rustls::sign::SingleCertAndKey::from(Arc::unwrap_or_clone(
            server_key,
        ))),
        roots.clone(),
        MtlsMode::Strict,
    )
    .unwrap();
    let mesh = MeshTls {
        client_auth: Arc::new(StaticClientCert(leaf(&issuer, "checkout"))),
        roots,
    };
    let resuming =
        mesh_client_config(&mesh, "spiffe://cluster.local/ns/shop/sa/orders", vec![]).unwrap();
    let mut full = (*resuming).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);
    let name = ServerName::try_from("10.0.0.3").unwrap();

    // The "resumed" case really resumes (the first connection leaves a ticket behind).
    for round in 0..2 {
        let mut cl = rustls::ClientConnection::new(resuming.clone(), name.clone()).unwrap();
        let mut sv = rustls::ServerConnection::new(server.clone()).unwrap();
        handshake(&mut cl, &mut sv);
        take_tickets(&mut sv, &mut cl);
        let want = if round == 0 {
            rustls::HandshakeKind::Full
        } else {
            rustls::HandshakeKind::Resumed
        };
        assert_eq!(cl.handshake_kind(), Some(want));
    }

    let mut g = c.benchmark_group("mesh_handshake");
    g.bench_function("full", |b| {
        b.iter(|| {
            let mut cl = rustls::ClientConnection::new(full.clone(), name.clone()).unwrap();
            let mut sv = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut cl, &mut sv);
            black_box(sv.peer_certificates().is_some())
        })
    });
    g.bench_function("resumed", |b| {
        b.iter(|| {
            let mut cl = rustls::ClientConnection::new(resuming.clone(), name.clone()).unwrap();
            let mut sv = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut cl, &mut sv);
            take_tickets(&mut sv, &mut cl);
            black_box(cl.handshake_kind())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
