"""Writes the full-pipeline sidecar config (JWT + 100 rules + quota + response filter) and a
token for it, for sidecar/benches/full-pipeline.sh. The key is the demo key in examples/demo."""
import base64, json, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

root, out = sys.argv[1], sys.argv[2]
key = serialization.load_pem_private_key(open(f"{root}/examples/demo/corp-signing-key.pem", "rb").read(), None)
n = key.public_key().public_numbers()
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "corp-2026-11", "alg": "ES256",
                  "x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}]}
header = {"alg": "ES256", "typ": "JWT", "kid": "corp-2026-11"}
now = int(time.time())
claims = {"iss": "https://login.shop.example/", "aud": "bench", "sub": "client-a-user",
          "scope": "api:read", "iat": now, "exp": now + 86400}
signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
r, s = utils.decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
token = f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
open(f"{out}/token", "w").write(token)

P = "default/bench"
rules = [{"policy": P, "name": f"svc-{i}", "action": "Allow",
          "from": [{"principals": [f"spiffe://bench.local/ns/default/sa/svc-{i}"]}],
          "to": [{"methods": ["GET", "POST"], "paths": [f"/svc{i}/items/{{id}}", f"/svc{i}/**"]}]} for i in range(99)]
rules.append({"policy": P, "name": "client-a-reads-api", "action": "Allow",
              "from": [{"principals": ["spiffe://bench.local/ns/default/sa/client-a"],
                        "jwt": {"provider": "default/bench/corp", "claims": {"scope": "api:read"}}}],
              "to": [{"methods": ["GET", "HEAD"], "paths": ["/api/**"]}]})
cfg = {
    "inbound": {"listen": "127.0.0.1:15006", "port": 18080, "upstream": "127.0.0.1:18080"},
    "admin": {"listen": "127.0.0.1:15020"},
    "tls": {"certFile": f"{root}/../shared/bench/peers/certs/server.crt",
            "keyFile": f"{root}/../shared/bench/peers/certs/server.key",
            "clientCaFile": f"{root}/../shared/bench/peers/certs/ca.crt"},
    "policy": {
        "apiVersion": "apiward.io/sidecar/v1alpha1", "version": "full-pipeline-1",
        "workload": {"namespace": "default", "name": "upstream-0", "serviceAccount": "upstream"},
        "trustDomain": "bench.local",
        "ports": [{"port": 18080, "policies": [P], "mtls": "Strict", "mode": "Enforce",
                   "jwtProviders": ["default/bench/corp"], "rules": rules,
                   "quotas": [{"policy": P, "name": "per-user", "key": {"claim": "sub"}, "requests": 1000000,
                               "periodMs": 1000, "window": "rolling"}],
                   "limits": {"maxBodyBytes": 65536},
                   "response": {"removeFields": ["/internal"], "removeHeaders": ["server", "x-powered-by"],
                                "maskServerErrors": True}}],
        "jwtProviders": [{"id": "default/bench/corp", "issuer": "https://login.shop.example/", "audiences": ["bench"],
                          "jwks": {"inline": json.dumps(jwks)}, "algorithms": ["ES256"], "clockSkewSeconds": 30,
                          "forwardClaims": {"sub": "x-user-id"}}],
    },
}
open(f"{out}/full.yaml", "w").write(json.dumps(cfg, indent=1))
