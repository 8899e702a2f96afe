#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind, on the peers bench job
# (sidecar/benches/peers.yaml: mTLS, one Allow rule, a per-client quota, keep-alive to an
# nginx upstream returning 1 KiB). Counting instructions is deterministic where timing on a
# shared 2-core machine is not: compare two binaries with it.
#
#   cargo build --profile dist -p apiward-sidecar
#   sidecar/benches/instructions.sh [BINARY ...]      # default target/dist/apiward-sidecar
#
# Needs valgrind, oha, nginx and the peers harness's test PKI (../shared/bench/peers/setup.sh).
# Per binary: start it under callgrind, warm up (handshakes, pools, caches), zero the
# counters, send N requests on C keep-alive connections, dump; instructions / N. The
# handshakes of the measured phase are outside it: the connections are opened in warm-up.
# Knobs: N=4000 C=4 ROUNDS=2.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=$(cd ../shared/bench/peers && pwd)
N=${N:-4000}; C=${C:-4}; ROUNDS=${ROUNDS:-2}
BINARIES=("$@"); [ ${#BINARIES[@]} -eq 0 ] && BINARIES=(target/dist/apiward-sidecar)
for tool in valgrind callgrind_control oha nginx; do
  command -v "$tool" >/dev/null || { echo "instructions.sh needs $tool" >&2; exit 2; }
done
[ -f "$PEERS/certs/client-a.crt" ] || { echo "run ../shared/bench/peers/setup.sh first" >&2; exit 2; }
work=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  [ -f "$work/upstream.pid" ] && kill "$(cat "$work/upstream.pid")" 2>/dev/null || true
}
trap cleanup EXIT
if ss -ltnH 'sport = :18080' | grep -q . || ss -ltnH 'sport = :15006' | grep -q .; then
  echo "ports 18080/15006 are taken (a harness or sidecar still running?)" >&2; exit 2
fi
body=$(head -c 1024 /dev/zero | tr '\0' x)
sed "s#\${BENCH}/run/upstream.pid#$work/upstream.pid#; s#\${BENCH}/logs/upstream.err#$work/upstream.err#; s#\${UPSTREAM_PORT}#18080#; s#\${BODY}#$body#; s#\${BODY_BYTES}#1024#" \
  "$PEERS/conf/upstream-nginx.conf.tmpl" > "$work/upstream.conf"
nginx -p "$work" -c "$work/upstream.conf" -e "$work/upstream.err"
tls=(--cacert "$PEERS/certs/ca.crt" --cert "$PEERS/certs/client-a.crt" --key "$PEERS/certs/client-a.key")
url=https://localhost:15006/api/ping
for round in $(seq 1 "$ROUNDS"); do
  for bin in "${BINARIES[@]}"; do
    out="$work/cg.$round.$(basename "$bin")"
    valgrind --tool=callgrind ${VALGRIND_ARGS:-} --callgrind-out-file="$out.%p" "$bin" run --config sidecar/benches/peers.yaml >"$out.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do ss -ltnH 'sport = :15006' | grep -q . && break; sleep 0.1; done
    oha -n 400 -c "$C" --no-tui "${tls[@]}" "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    oha -n "$N" -c "$C" --no-tui "${tls[@]}" "$url" >"$out.oha"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
    ok=$(grep -o '\[200\] [0-9]*' "$out.oha" | awk '{print $2}')
    # The dump after zeroing holds only the measured phase; its `summary:` is the total Ir.
    ir=$(grep -h '^summary:' $(ls -t "$out".*[0-9].* 2>/dev/null | head -1) | awk '{print $2}')
    echo "$(basename "$bin") round $round: $ir instructions / $N requests (${ok:-0} × 200) = $(( ir / N )) per request"
  done
done
