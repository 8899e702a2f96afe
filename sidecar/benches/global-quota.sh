#!/usr/bin/env bash
# Added latency of a Global quota (Redis) against a Local one at a fixed 2,000 req/s, and
# the Redis commands per 1,000 requests. Loopback only: the sidecar on core 0; oha, nginx
# (upstream) and redis-server on core 1. Each config runs ROUNDS times, interleaved.
# Needs ../shared/bench/peers set up (./setup.sh: certs, nginx upstream config, oha) and
# redis-server. Run from the repository root:  sidecar/benches/global-quota.sh
set -euo pipefail
ROOT=$(pwd); PEERS=$ROOT/../shared/bench/peers; OUT=${OUT:-/tmp/apiward-global-quota}; mkdir -p "$OUT"
BIN=$ROOT/target/dist/apiward-sidecar
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
DUR=${DUR:-15s}; RATE=${RATE:-2000}; ROUNDS=${ROUNDS:-2}; REDIS_PORT=${REDIS_PORT:-16379}
mkdir -p "$PEERS/run" "$PEERS/logs"
[ -x "$BIN" ] || cargo build --profile dist -p apiward-sidecar
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
sed "s#\${BENCH}#$PEERS#g; s#\${UPSTREAM_PORT}#18080#g; s#\${BODY}#$BODY#g; s#\${BODY_BYTES}#1024#g; s#\${THREADS}#1#g" \
  "$PEERS/conf/upstream-nginx.conf.tmpl" > "$OUT/upstream.conf"
taskset -c 1 nginx -p "$PEERS" -c "$OUT/upstream.conf" -e "$OUT/upstream.err"
taskset -c 1 redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no > "$OUT/redis.log" 2>&1 & REDIS=$!
SC=
trap 'kill $(cat "$PEERS/run/upstream.pid") 2>/dev/null || true; kill $SC $REDIS 2>/dev/null || true' EXIT
sleep 0.5

# The peers bench config (a per-client quota that never trips, on every request), with the
# quota Local as committed, Global rolling, Global per UTC day, and Global without leases.
cp sidecar/benches/peers.yaml "$OUT/local.yaml"
store="quotaStore: {url: \"redis://127.0.0.1:$REDIS_PORT/0\"}"
sed "s#^policy:#$store\npolicy:#; s#          window: rolling#          window: rolling\n          scope: Global#" \
  sidecar/benches/peers.yaml > "$OUT/global-rolling.yaml"
sed "s#^policy:#$store\npolicy:#; s#          periodMs: 1000#          periodMs: 86400000#; s#          window: rolling#          window: {calendar: Day}\n          scope: Global#" \
  sidecar/benches/peers.yaml > "$OUT/global-day.yaml"
# Without leases (maxLease: 1): every request waits for Redis, for comparison.
sed "s#^quotaStore: {#quotaStore: {maxLease: 1, #" "$OUT/global-rolling.yaml" > "$OUT/global-no-lease.yaml"

TLS=(--cacert "$PEERS/certs/ca.crt" --cert "$PEERS/certs/client-a.crt" --key "$PEERS/certs/client-a.key")
evals() { redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/cmdstat_(evalsha|eval):/{n+=$3} END{print n+0}'; }
run() { # name round
  local name=$1 round=$2
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  taskset -c 0 "$BIN" run --config "$OUT/$name.yaml" --log-format text --log warn > "$OUT/$name.log" 2>&1 & SC=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/15006) 2>/dev/null && break; sleep 0.1; done
  taskset -c 1 "$OHA" -z 3s -c 16 -q "$RATE" --no-tui --output-format quiet "${TLS[@]}" https://localhost:15006/api/ping >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  taskset -c 1 "$OHA" -z "$DUR" -c 16 -q "$RATE" --latency-correction --no-tui --output-format json "${TLS[@]}" https://localhost:15006/api/ping > "$OUT/$name-$round.json"
  echo "$(evals)" > "$OUT/$name-$round.redis"
  kill $SC; wait $SC 2>/dev/null || true
}
for r in $(seq "$ROUNDS"); do
  for n in local global-rolling global-day global-no-lease; do run "$n" "$r"; done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print("| quota | round | req/s | p50 ms | p99 ms | Redis commands per 1,000 requests | statuses |\n|---|---|---|---|---|---|---|")
for n in ["local", "global-rolling", "global-day", "global-no-lease"]:
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/{n}-{r}.json"))
        s, p = d["summary"], d.get("latencyPercentiles", {})
        codes = d.get("statusCodeDistribution", {})
        total = sum(codes.values()) or 1
        cmds = int(open(f"{out}/{n}-{r}.redis").read())
        print(f"| {n} | {r} | {s['requestsPerSec']:.0f} | {p.get('p50', 0)*1000:.3f} | {p.get('p99', 0)*1000:.3f} | {cmds * 1000 / total:.1f} | {codes} |")
PY
