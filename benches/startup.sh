#!/usr/bin/env bash
# Time from process start to ready, for `quiver serve` (Redis online store)
# and `quiver ingest` (a Kafka-compatible broker, tansu, and Redis): the
# time from exec until GET /ready answers 200, polled every 10 ms, over
# RUNS starts of each (default 10); prints the median and the slowest.
#   benches/startup.sh [RUNS]
# QUIVER_BIN picks the binary (default: a release build, made here); tansu
# comes from target/tools (scripts/e2e-tansu.sh installs it) or TANSU_BIN.
set -euo pipefail
# Paths given relative to the caller's directory.
[ -n "${QUIVER_BIN:-}" ] && QUIVER_BIN="$(realpath "$QUIVER_BIN")"
[ -n "${TANSU_BIN:-}" ] && TANSU_BIN="$(realpath "$TANSU_BIN")"
cd "$(dirname "$0")/.."
RUNS="${1:-10}"
if [ -n "${QUIVER_BIN:-}" ]; then
  QUIVER="$QUIVER_BIN"
else
  cargo build -q --release --locked -p quiver
  QUIVER="$PWD/target/release/quiver"
fi
TANSU="${TANSU_BIN:-$PWD/target/tools/bin/tansu}"
[ -x "$TANSU" ] || { echo "no tansu at $TANSU: run scripts/e2e-tansu.sh once, or set TANSU_BIN" >&2; exit 1; }
. scripts/lib.sh

start_kafka_and_redis "$TANSU"
"$TANSU" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" quiver-events --partitions 3 >/dev/null
cat >"$WORK/quiver.toml" <<EOF
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
[online_store]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
[archive]
location = "$WORK/offline"
EOF
export QUIVER_CONFIG="$WORK/quiver.toml"

# Milliseconds from starting "$@" until http://$URL/ready answers 200
# (at most 30 s; then the process is stopped and the script fails).
time_to_ready() {
  local url="$1"; shift
  local start end pid
  start=$(date +%s%N)
  "$@" >"$WORK/run.log" 2>&1 &
  pid=$!
  until curl -fsS -o /dev/null "http://$url/ready" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ $(( ($(date +%s%N) - start) / 1000000000 )) -ge 30 ]; then
      kill "$pid" 2>/dev/null || true
      cat "$WORK/run.log" >&2
      echo "FAIL: $* was not ready at $url within 30 s" >&2
      exit 1
    fi
    sleep 0.01
  done
  end=$(date +%s%N)
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  echo $(( (end - start) / 1000000 ))
}
report() { # name, values...
  local name="$1"; shift
  printf '%s\n' "$@" | sort -n | awk -v n="$name" '{v[NR]=$1} END {printf "%s: median %d ms, slowest %d ms over %d starts\n", n, v[int((NR+1)/2)], v[NR], NR}'
}

SERVE=() INGEST=()
for _ in $(seq 1 "$RUNS"); do
  HTTP_PORT=$(free_port)
  SERVE+=("$(time_to_ready "127.0.0.1:$HTTP_PORT" "$QUIVER" serve --grpc-addr 127.0.0.1:0 --http-addr "127.0.0.1:$HTTP_PORT")")
  OPS_PORT=$(free_port)
  INGEST+=("$(time_to_ready "127.0.0.1:$OPS_PORT" "$QUIVER" ingest --metrics-addr "127.0.0.1:$OPS_PORT")")
done
report "quiver serve (Redis) start to ready" "${SERVE[@]}"
report "quiver ingest (tansu, Redis) start to ready" "${INGEST[@]}"
