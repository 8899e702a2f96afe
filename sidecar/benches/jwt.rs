//! JWT verification: a cached token (budget ≤ 2 µs) and an uncached ES256 verify.

use std::hint::black_box;

use apiward_policy::config::{JwksSource, JwtProvider};
use apiward_sidecar::authn::JwtVerifier;
use criterion::{Criterion, criterion_group, criterion_main};

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])}]});
    let key = jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der());
    let v = JwtVerifier::new(JwtProvider {
        id: "ns/p/corp".into(),
        issuer: "https://login.test/".into(),
        audiences: vec!["users".into()],
        jwks: JwksSource::Inline(jwks.to_string()),
        algorithms: vec!["ES256".into()],
        clock_skew_seconds: 30,
        forward_claims: Default::default(),
        token_header: "authorization".into(),
    })
    .unwrap();
    let now = 1_800_000_000u64;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = |jti: u64| -> String {
        let claims = serde_json::json!({"iss": "https://login.test/", "aud": "users", "sub": "42", "exp": now + 3600, "iat": now, "jti": jti, "scope": "profile email"});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cached = token(0);
    rt.block_on(v.verify(&cached, now)).unwrap();
    c.bench_function("jwt_verify_cached", |b| {
        b.iter(|| rt.block_on(v.verify(black_box(&cached), now)).unwrap())
    });
    // Uncached: the cache is emptied before every verify, so each one checks the ES256
    // signature and the claims in full.
    c.bench_function("jwt_verify_uncached_es256", |b| {
        b.iter(|| {
            v.clear_cache();
            rt.block_on(v.verify(black_box(&cached), now)).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
