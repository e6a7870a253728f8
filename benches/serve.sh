#!/usr/bin/env bash
# Serving benchmark: quiver GetOnlineFeatures on Redis vs raw redis-benchmark
# doing the equivalent lookup, in one run on this machine, and the ratio.
#
#   benches/serve.sh [duration_seconds=10] [concurrency=32]
#
# Starts its own redis-server on a free port and a release quiver server on
# it with benches/registry.toml (one view of 10 double features), seeds
# 10,000 entities, then measures:
#   1 entity x 10 features:   quiver rps vs `redis-benchmark HMGET key _ts f0..f9`
#   100 entities x 10 features: quiver rows/s vs `redis-benchmark -P 100` (pipelined HMGETs)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONC="${2:-32}"
KEYS=10000

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release -q -p quiver -p quiver-bench
WORK=$(mktemp -d)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
trap 'kill $QUIVER_PID $REDIS_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
QUIVER_PID=""
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

QUIVER_LOG=warn ./target/release/quiver serve --registry benches/registry.toml \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$WORK/quiver.out" 2>"$WORK/quiver.err" &
QUIVER_PID=$!
for _ in $(seq 200); do grep -q "quiver listening" "$WORK/quiver.out" 2>/dev/null && break; sleep 0.05; done
GRPC=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$WORK/quiver.out")
[ -n "$GRPC" ] || { cat "$WORK/quiver.err"; exit 1; }

LG=./target/release/quiver-loadgen
$LG --target "http://$GRPC" --seed "$KEYS" --duration 1s --warmup 0s --concurrency 1 --label seed >/dev/null
FIELDS="_ts f0 f1 f2 f3 f4 f5 f6 f7 f8 f9"
KEY='qv1:{entity_id=__rand_int__}:bench'

rb() { # redis-benchmark requests/s for the HMGET lookup, extra args in $@
  redis-benchmark -p "$REDIS_PORT" -c "$CONC" -n "$1" -r "$KEYS" --csv "${@:2}" HMGET "$KEY" $FIELDS \
    | tail -1 | cut -d, -f2 | tr -d '"'
}

echo "machine: $(nproc) cores; concurrency $CONC; ${DURATION}s per quiver run; redis $(redis-server --version | awk '{print $3}')"
echo
echo "| run | entities x view | concurrency | rps | p50 ms | p99 ms | p99.9 ms | errors |"
echo "|---|---|---|---|---|---|---|---|"
Q1=$($LG --target "http://$GRPC" --duration "${DURATION}s" --concurrency "$CONC" --entities 1 --label "quiver 1x10")
echo "$Q1"
Q100=$($LG --target "http://$GRPC" --duration "${DURATION}s" --concurrency "$CONC" --entities 100 --label "quiver 100x10")
echo "$Q100"
R1=$(rb 400000)
R100=$(rb 2000000 -P 100)
echo
echo "raw redis-benchmark, same concurrency: HMGET 1 key x 11 fields: ${R1} rps; pipelined -P 100: ${R100} HMGET/s"
python3 - "$Q1" "$Q100" "$R1" "$R100" <<'PY'
import sys
q1 = float(sys.argv[1].split("|")[4]); q100 = float(sys.argv[2].split("|")[4])
r1 = float(sys.argv[3]); r100 = float(sys.argv[4])
print(f"ratio 1x10:   quiver {q1:.0f} rps / redis {r1:.0f} rps = {q1 / r1:.2f}")
print(f"ratio 100x10: quiver {q100 * 100:.0f} entity lookups/s / redis {r100:.0f} HMGET/s = {q100 * 100 / r100:.2f}")
PY

# Security on vs off, in this run: a second quiver on the same Redis with an
# API key required and TLS on its gRPC listener (a test CA made here with
# openssl), same load. Runs alternate (plain, secure, plain, secure) so that
# drift of the machine hits both alike.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=bench CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=localhost" -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$WORK/ext.cnf"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 1 -extfile "$WORK/ext.cnf" -out "$WORK/server.pem" 2>/dev/null
API_KEY=$(./target/release/quiver auth create-key --name bench --scopes read,write --keys-file "$WORK/keys.toml" 2>/dev/null)
QUIVER_LOG=warn ./target/release/quiver serve --registry benches/registry.toml \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --auth-keys-file "$WORK/keys.toml" --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key" \
  >"$WORK/secure.out" 2>"$WORK/secure.err" &
SECURE_PID=$!
trap 'kill $QUIVER_PID $SECURE_PID $REDIS_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 200); do grep -q "quiver listening" "$WORK/secure.out" 2>/dev/null && break; sleep 0.05; done
SGRPC=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$WORK/secure.out")
[ -n "$SGRPC" ] || { cat "$WORK/secure.err"; exit 1; }
SECURE=(--target "https://$SGRPC" --ca-file "$WORK/ca.pem" --api-key "$API_KEY")
echo
echo "API key + TLS vs plain (same server build and Redis, runs alternated):"
echo
echo "| run | entities x view | concurrency | rps | p50 ms | p99 ms | p99.9 ms | errors |"
echo "|---|---|---|---|---|---|---|---|"
ROWS=()
for round in 1 2; do
  for mode in plain secure; do
    if [ "$mode" = plain ]; then T=(--target "http://$GRPC"); else T=("${SECURE[@]}"); fi
    ROW=$($LG "${T[@]}" --duration "${DURATION}s" --concurrency "$CONC" --entities 1 --label "$mode 1x10 #$round")
    echo "$ROW"
    ROWS+=("$ROW")
  done
done
python3 - "${ROWS[@]}" <<'PY'
import sys
rows = [r.split("|") for r in sys.argv[1:]]
rps = {"plain": [], "secure": []}
p99 = {"plain": [], "secure": []}
for r in rows:
    mode = r[1].split()[0]
    rps[mode].append(float(r[4])); p99[mode].append(float(r[6]))
mean = lambda xs: sum(xs) / len(xs)
print(f"ratio API key + TLS / plain: rps {mean(rps['secure']) / mean(rps['plain']):.2f}, "
      f"p99 {mean(p99['secure']) / mean(p99['plain']):.2f}")
PY
