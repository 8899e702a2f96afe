#!/usr/bin/env bash
# The full pipeline (mTLS + JWT + 100 rules + quota + response filter) against the peers
# bench policy alone, and RSS with 1,000 open keep-alive connections. Loopback only.
# Needs ../shared/bench/peers set up (./setup.sh: certs, nginx upstream config, oha).
# Run from the repository root:  sidecar/benches/full-pipeline.sh
set -euo pipefail
ROOT=$(pwd); PEERS=$ROOT/../shared/bench/peers; OUT=${OUT:-/tmp/apiward-full-pipeline}; mkdir -p "$OUT"
BIN=$ROOT/target/dist/apiward-sidecar
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
DUR=${DUR:-15s}; RATE=${RATE:-2000}
mkdir -p "$PEERS/run" "$PEERS/logs"
[ -x "$BIN" ] || cargo build --profile dist -p apiward-sidecar
python3 "$ROOT/sidecar/benches/full_pipeline_config.py" "$ROOT" "$OUT"   # writes $OUT/full.yaml and $OUT/token
TOKEN=$(cat "$OUT/token")
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
sed "s#\${BENCH}#$PEERS#g; s#\${UPSTREAM_PORT}#18080#g; s#\${BODY}#$BODY#g; s#\${BODY_BYTES}#1024#g; s#\${THREADS}#1#g" \
  "$PEERS/conf/upstream-nginx.conf.tmpl" > "$OUT/upstream.conf"
taskset -c 1 nginx -p "$PEERS" -c "$OUT/upstream.conf" -e "$OUT/upstream.err"
trap 'kill $(cat "$PEERS/run/upstream.pid") 2>/dev/null || true; kill $SC 2>/dev/null || true' EXIT
sleep 0.5
TLS=(--cacert "$PEERS/certs/ca.crt" --cert "$PEERS/certs/client-a.crt" --key "$PEERS/certs/client-a.key")
run() { # name config extra-oha-args...
  local name=$1 cfg=$2; shift 2
  taskset -c 0 "$BIN" run --config "$cfg" --log-format text --log warn > "$OUT/$name.log" 2>&1 & SC=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/15006) 2>/dev/null && break; sleep 0.1; done
  taskset -c 1 "$OHA" -z 3s -c 16 -q "$RATE" --no-tui --output-format quiet "${TLS[@]}" "$@" https://localhost:15006/api/ping >/dev/null 2>&1 || true
  taskset -c 1 "$OHA" -z "$DUR" -c 16 -q "$RATE" --latency-correction --no-tui --output-format json "${TLS[@]}" "$@" https://localhost:15006/api/ping > "$OUT/$name-fixed.json"
  taskset -c 1 "$OHA" -z "$DUR" -c 16 --no-tui --output-format json "${TLS[@]}" "$@" https://localhost:15006/api/ping > "$OUT/$name-max.json"
  local idle; idle=$(awk '/VmRSS/{print $2}' /proc/$SC/status)
  taskset -c 1 "$OHA" -z 10s -c 1000 -q 2000 --no-tui --output-format json "${TLS[@]}" "$@" https://localhost:15006/api/ping > "$OUT/$name-1000conns.json"
  echo "$name rss_kb_before_1000=$idle hwm_kb=$(awk '/VmHWM/{print $2}' /proc/$SC/status)" | tee "$OUT/$name-rss.txt"
  kill $SC; wait $SC 2>/dev/null || true
}
run bench-policy "$ROOT/sidecar/benches/peers.yaml"
run full-pipeline "$OUT/full.yaml" -H "authorization: Bearer $TOKEN"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def row(name, mode):
    d = json.load(open(f"{out}/{name}-{mode}.json"))
    s, p = d["summary"], d.get("latencyPercentiles", {})
    codes = d.get("statusCodeDistribution", {})
    return f"| {name} | {mode} | {s['requestsPerSec']:.0f} | {p.get('p50', 0)*1000:.3f} | {p.get('p99', 0)*1000:.3f} | {codes} |"
print("| config | mode | req/s | p50 ms | p99 ms | statuses |\n|---|---|---|---|---|---|")
for n in ["bench-policy", "full-pipeline"]:
    for m in ["fixed", "max", "1000conns"]:
        print(row(n, m))
for n in ["bench-policy", "full-pipeline"]:
    print(open(f"{out}/{n}-rss.txt").read().strip())
PY
