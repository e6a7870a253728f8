#!/usr/bin/env bash
# Serving with traces off vs on: GetOnlineFeatures (1 entity x 10
# features) against quiver servers on one Redis, alike but for
# [telemetry], in one run on this machine, and the ratios.
#
#   benches/tracing.sh [duration_seconds=10] [concurrency=32] [rounds=2]
#
# Servers: "off" (no OTLP endpoint: no spans are made), "1%" (spans
# exported over OTLP/gRPC to quiver-otlp-sink, sampling_ratio 0.01) and
# "100%" (every request traced: the worst case). Metrics are on in all of
# them (they always are). The load generator sends no traceparent, so the
# servers' own sampling decides. Runs alternate (off, 1%, 100%, off, ...)
# so that drift of the machine hits every mode alike.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONC="${2:-32}"
ROUNDS="${3:-2}"
KEYS=10000
source scripts/lib.sh

cargo build --release -q -p quiver -p quiver-bench
start_redis
./target/release/quiver-otlp-sink --report 10s >"$WORK/sink.out" 2>"$WORK/sink.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "otlp endpoint=" "$WORK/sink.out" 2>/dev/null && break; sleep 0.05; done
OTLP=$(sed -n 's/^otlp endpoint=//p' "$WORK/sink.out")
[ -n "$OTLP" ] || { cat "$WORK/sink.err"; exit 1; }

# start_server NAME [env...]: a quiver serve on Redis, its gRPC address in $GRPC_<NAME>.
start_server() {
  local name=$1; shift
  env QUIVER_LOG=warn "$@" ./target/release/quiver serve --registry benches/registry.toml \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 200); do grep -q "quiver listening" "$WORK/$name.out" 2>/dev/null && break; sleep 0.05; done
  local addr
  addr=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$WORK/$name.out")
  [ -n "$addr" ] || { cat "$WORK/$name.err"; exit 1; }
  printf -v "GRPC_$name" '%s' "$addr"
}
start_server off
start_server p1 QUIVER_OTLP_ENDPOINT="$OTLP" QUIVER_TRACE_SAMPLING_RATIO=0.01
start_server p100 QUIVER_OTLP_ENDPOINT="$OTLP" QUIVER_TRACE_SAMPLING_RATIO=1

LG=./target/release/quiver-loadgen
$LG --target "http://$GRPC_off" --seed "$KEYS" --duration 1s --warmup 0s --concurrency 1 --label seed >/dev/null

echo "machine: $(nproc) cores; concurrency $CONC; ${DURATION}s per run; $ROUNDS rounds; redis $(redis-server --version | awk '{print $3}')"
echo
echo "| run | entities x view | concurrency | rps | p50 ms | p99 ms | p99.9 ms | errors |"
echo "|---|---|---|---|---|---|---|---|"
ROWS=()
for round in $(seq "$ROUNDS"); do
  for mode in off p1 p100; do
    var="GRPC_$mode"
    ROW=$($LG --target "http://${!var}" --duration "${DURATION}s" --concurrency "$CONC" --entities 1 --label "$mode #$round")
    echo "$ROW"
    ROWS+=("$ROW")
  done
done
sleep 11  # one more report of the sink, after the last export
echo
echo "spans the sink received: $(tail -1 "$WORK/sink.err" | sed 's/^spans received: //')"
python3 - "${ROWS[@]}" <<'PY'
import sys
rows = [r.split("|") for r in sys.argv[1:]]
rps, p99 = {}, {}
for r in rows:
    mode = r[1].split()[0]
    rps.setdefault(mode, []).append(float(r[4]))
    p99.setdefault(mode, []).append(float(r[6]))
mean = lambda xs: sum(xs) / len(xs)
for mode, label in (("p1", "1% sampled"), ("p100", "100% sampled")):
    print(f"ratio {label} / off: rps {mean(rps[mode]) / mean(rps['off']):.2f}, "
          f"p99 {mean(p99[mode]) / mean(p99['off']):.2f}")
PY
