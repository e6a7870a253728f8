#!/usr/bin/env bash
# End-to-end speed layer against a real Kafka-compatible broker: tansu (from
# crates.io, in-memory storage), redis-server, and quiver as three separate
# processes, the way it is deployed:
#   quiver generate --to grpc  ->  quiver serve (PushEvents)  ->  Kafka (tansu)
#   quiver generate --to kafka ----------------------------------^
#   Kafka  ->  quiver ingest  ->  Redis (latest values, aggregation tiles) + Parquet archive
# then checks the features over REST, the ingest totals and the archive;
# finally the monitoring stack: a Pushgateway fed by batch run and
# materialize, and a real Prometheus loaded with deploy/prometheus (its
# config pointed at these processes, its rules as they are), against which
# every Grafana dashboard query and alert signal must return series.
# Installs tansu into target/tools on first use (a few minutes of compiling).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="$PWD/target/tools"
if [ ! -x "$TOOLS/bin/tansu" ]; then
  echo "== installing tansu (cargo install tansu --features dynostore)"
  cargo install --locked tansu --version 0.6.0 --features dynostore --root "$TOOLS"
fi
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install -y redis-server" >&2; exit 1; }
# QUIVER_BIN: a quiver binary already built (scripts/test.sh passes the one
# its test build made); else it is built here.
QUIVER="${QUIVER_BIN:-}"
if [ -z "$QUIVER" ]; then
  echo "== building quiver"
  cargo build -p quiver --locked
  QUIVER="$PWD/target/debug/quiver"
fi
QUIVER="$(command -v "$QUIVER" || true)"
[ -n "$QUIVER" ] && [ -x "$QUIVER" ] || { echo "QUIVER_BIN=${QUIVER_BIN:-} is not an executable quiver binary" >&2; exit 1; }
QUIVER="$(realpath "$QUIVER")"
echo "== quiver binary: $QUIVER"

. scripts/lib.sh

start_kafka_and_redis "$TOOLS/bin/tansu"
echo "== tansu on $BROKERS, redis on $REDIS_PORT"
"$TOOLS/bin/tansu" topic create --broker "tcp://$BROKERS" quiver-events --partitions 3
"$TOOLS/bin/tansu" topic create --broker "tcp://$BROKERS" quiver-events-dlq --partitions 1

cat >"$WORK/quiver.toml" <<EOF
[kafka]
brokers = "$BROKERS"
[online_store]
redis_url = "redis://127.0.0.1:$REDIS_PORT"
timeout = "2s"
[archive]
location = "$WORK/offline"
roll_interval = "2s"
[ingest]
batch_wait = "100ms"
EOF
export QUIVER_CONFIG="$WORK/quiver.toml" QUIVER_LOG=info

echo "== quiver serve"
"$QUIVER" serve --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$WORK/serve.out" 2>"$WORK/serve.log" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q "quiver listening" "$WORK/serve.out" && break; sleep 0.1; done
GRPC=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$WORK/serve.out")
HTTP=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$WORK/serve.out")
[ -n "$GRPC" ] || { cat "$WORK/serve.log"; echo "serve did not start" >&2; exit 1; }

echo "== quiver ingest"
QUIVER_LOG=info,quiver_ingest::consumer=debug "$QUIVER" ingest --metrics-addr 127.0.0.1:0 >"$WORK/ingest.out" 2>"$WORK/ingest.log" &
INGEST=$!
PIDS+=($INGEST)

echo "== quiver generate: 4000 events through PushEvents, 3000 straight to Kafka"
START=$(date -u -d '-30 min' +%Y-%m-%dT%H:%M:%SZ)
"$QUIVER" generate --to grpc --grpc-url "http://$GRPC" --events 4000 --rate 0 --users 50 --products 20 --seed 1 --start "$START"
"$QUIVER" generate --to kafka --events 3000 --rate 0 --users 50 --products 20 --seed 2

echo "== waiting for ingest"
for _ in $(seq 1 300); do
  v=$(curl -sf "http://$HTTP/api/v1/features/user/user_0?features=user_stream:page_views_24h,user_last_login:device" || true)
  case "$v" in *'"status":"PRESENT"'*'"status":"PRESENT"'*) break ;; esac
  sleep 0.2
done
echo "$v"
case "$v" in *'"status":"PRESENT"'*'"status":"PRESENT"'*) ;; *) tail -20 "$WORK/ingest.log"; echo "features did not appear" >&2; exit 1 ;; esac

consumed() { sed -n 's/.* batch messages=\([0-9]*\) .*/\1/p' "$WORK/ingest.log" | awk '{s += $1} END {print s + 0}'; }
wait_consumed() {
  for _ in $(seq 1 300); do
    kill -0 "$INGEST" 2>/dev/null || break
    [ "$(consumed)" -ge "$1" ] && break
    sleep 0.2
  done
  [ "$(consumed)" -ge "$1" ] || { tail -20 "$WORK/ingest.log"; echo "ingest consumed $(consumed) of $1 messages" >&2; exit 1; }
}
# Windowed aggregates of a few users and products (24 h and longer
# windows: an hour boundary between two snapshots changes nothing).
snapshot() {
  for u in 0 1 2 3 4 5 6 7; do
    curl -sf "http://$HTTP/api/v1/features/user/user_$u?features=user_stream:page_views_24h,user_stream:carts_24h,user_stream:purchases_7d,user_stream:spend_7d"; echo
  done
  for p in 0 1 2 3; do
    curl -sf "http://$HTTP/api/v1/features/product/product_$p?features=product_stream:views_24h,product_stream:purchases_24h,product_stream:revenue_24h,product_stream:distinct_buyers_24h"; echo
  done
}
wait_consumed 7000
snapshot >"$WORK/before-retries.json"

echo "== a client retries: the first 1000 events through PushEvents again (same ids and times)"
"$QUIVER" generate --to grpc --grpc-url "http://$GRPC" --events 1000 --rate 0 --users 50 --products 20 --seed 1 --start "$START"
wait_consumed 8000
snapshot >"$WORK/after-retries.json"
grep -q '"value":[1-9]' "$WORK/before-retries.json" || { cat "$WORK/before-retries.json"; echo "no counts to compare" >&2; exit 1; }
cmp "$WORK/before-retries.json" "$WORK/after-retries.json" || {
  diff "$WORK/before-retries.json" "$WORK/after-retries.json" | head; echo "retried events were counted again" >&2; exit 1; }

echo "== ingest's /metrics, /health and /ready"
OPS=$(sed -n 's/^quiver ingest metrics=//p' "$WORK/ingest.out")
[ -n "$OPS" ] || { echo "ingest printed no metrics address" >&2; exit 1; }
metric_sum() { curl -sf "http://$OPS/metrics" | awk -v n="$1" '$1 == n || index($1, n "{") == 1 {s += $NF; f = 1} END {if (f) print s; else print "none"}'; }
[ "$(curl -sf "http://$OPS/health")" = '{"status":"ok"}' ] || { echo "ingest /health is not ok" >&2; exit 1; }
[ "$(curl -sf "http://$OPS/ready")" = '{"status":"ready"}' ] || { echo "ingest /ready is not ready" >&2; exit 1; }
# The counters are exported right after the batch that the log counted.
for _ in $(seq 1 50); do [ "$(metric_sum quiver_ingest_messages_total)" = 8000 ] && break; sleep 0.1; done
[ "$(metric_sum quiver_ingest_events_applied_total)" = 8000 ] || { echo "applied: $(metric_sum quiver_ingest_events_applied_total), want 8000" >&2; exit 1; }
[ "$(metric_sum quiver_ingest_messages_total)" = 8000 ] || { echo "messages: $(metric_sum quiver_ingest_messages_total), want 8000" >&2; exit 1; }
# librdkafka reports lag every 5 s.
for _ in $(seq 1 100); do [ "$(metric_sum quiver_ingest_consumer_lag_messages)" != none ] && break; sleep 0.2; done
[ "$(metric_sum quiver_ingest_consumer_lag_messages)" != none ] || { echo "no consumer lag reported" >&2; exit 1; }
[ "$(metric_sum quiver_feature_freshness_seconds_count)" != none ] || { echo "no freshness observed" >&2; exit 1; }
echo "applied 8000, lag $(metric_sum quiver_ingest_consumer_lag_messages), freshness observations $(metric_sum quiver_feature_freshness_seconds_count)"

# Stop ingest gracefully: it archives what it buffered and commits.
kill -TERM "$INGEST"
wait "$INGEST" || true
grep "ingest stopped" "$WORK/ingest.log" | tail -1
grep -q "ingest stopped.*events: 8000" "$WORK/ingest.log" || { tail -20 "$WORK/ingest.log"; echo "ingest did not apply exactly 8000 events" >&2; exit 1; }
DUP=$(grep "ingest stopped" "$WORK/ingest.log" | tail -1 | sed -n 's/.*events_duplicate: \([0-9]*\).*/\1/p')
[ "${DUP:-0}" -ge 1000 ] || { echo "expected at least 1000 duplicates skipped, got ${DUP:-none}" >&2; exit 1; }
FILES=$(find "$WORK/offline/events" -name '*.parquet' | wc -l)
echo "archive: $FILES parquet files"
[ "$FILES" -gt 0 ] || { echo "no archive files" >&2; exit 1; }
[ -z "$(ls -A "$WORK/offline/_quiver/staging" 2>/dev/null)" ] || { echo "staging files left" >&2; exit 1; }
echo "== the monitoring stack: deploy/prometheus's config and rules on a real Prometheus"
# A second ingest process (it resumes from the committed offsets), a
# generator at a steady rate, the batch layer pushing to a Pushgateway,
# reads over gRPC and REST; then every Grafana query and alert signal must
# return series (deploy/tests/check_queries.py).
VENV="${QUIVER_TEST_VENV:-target/py-venv}"
[ -x "$VENV/bin/python" ] || { echo "no Python venv at $VENV (scripts/test.sh makes it)" >&2; exit 1; }
for bin in prometheus promtool prometheus-pushgateway prometheus-alertmanager; do
  command -v "$bin" >/dev/null || { echo "$bin is missing: apt-get install -y prometheus prometheus-pushgateway prometheus-alertmanager" >&2; exit 1; }
done
"$QUIVER" ingest --metrics-addr 127.0.0.1:0 >"$WORK/ingest2.out" 2>"$WORK/ingest2.log" &
PIDS+=($!)
GEN_RATE=200
"$QUIVER" generate --to kafka --events 0 --rate "$GEN_RATE" --users 50 --products 20 --seed 3 >/dev/null 2>"$WORK/generate.log" &
GEN=$!
PIDS+=($GEN)
PROM_PORT=$(free_port)
start_pushgateway_and_alertmanager
QUIVER_PUSHGATEWAY_URL="http://127.0.0.1:$PGW_PORT" "$QUIVER" batch run
QUIVER_PUSHGATEWAY_URL="http://127.0.0.1:$PGW_PORT" "$QUIVER" materialize
for _ in $(seq 1 100); do grep -q "quiver ingest metrics=" "$WORK/ingest2.out" && break; sleep 0.1; done
OPS2=$(sed -n 's/^quiver ingest metrics=//p' "$WORK/ingest2.out")
[ -n "$OPS2" ] || { tail "$WORK/ingest2.log"; echo "the second ingest printed no metrics address" >&2; exit 1; }
mkdir -p "$WORK/prom"
sed -e "s/serve:8000/$HTTP/" -e "s/ingest:8001/$OPS2/" -e "s/pushgateway:9091/127.0.0.1:$PGW_PORT/" \
  -e "s/alertmanager:9093/127.0.0.1:$AM_PORT/" \
  -e "s/scrape_interval: 15s/scrape_interval: 1s/" -e "s/evaluation_interval: 15s/evaluation_interval: 1s/" \
  deploy/prometheus/prometheus.yml >"$WORK/prom/prometheus.yml"
cp deploy/prometheus/rules.yml "$WORK/prom/"
promtool check config "$WORK/prom/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prom/prometheus.yml" --storage.tsdb.path="$WORK/prom/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_port "$PROM_PORT"
# 25 s of reads over gRPC (the Python client) and REST while Prometheus scrapes.
"$VENV/bin/python" - "$GRPC" "$HTTP" <<'PY'
import sys, time, urllib.request
from quiver_client import QuiverClient
client = QuiverClient(sys.argv[1])
end = time.time() + 25
while time.time() < end:
    client.get_online_features({"user_id": ["user_0", "user_1"]},
                               features=["user_stream:page_views_24h", "user_last_login:device"])
    urllib.request.urlopen(f"http://{sys.argv[2]}/api/v1/features/user/user_2").read()
    time.sleep(0.02)
PY
PROM="http://127.0.0.1:$PROM_PORT"
"$VENV/bin/python" deploy/tests/check_queries.py "$PROM" . || { tail -5 "$WORK/prometheus.log"; exit 1; }
# Prometheus found the Alertmanager of its config (deploy/alertmanager).
curl -sf "$PROM/api/v1/alertmanagers" | grep -q "127.0.0.1:$AM_PORT" \
  || { curl -s "$PROM/api/v1/alertmanagers"; echo "Prometheus has no active Alertmanager" >&2; exit 1; }
# Prometheus's own lint of both processes' exposition (names, units, help).
curl -sf "http://$HTTP/metrics" | promtool check metrics
curl -sf "http://$OPS2/metrics" | promtool check metrics
prom_value() {
  curl -sfG "$PROM/api/v1/query" --data-urlencode "query=$1" | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
assert r, "no series"
print(" ".join("%s=%.3f" % (x["metric"].get("feature_view", ""), float(x["value"][1])) for x in r))'
}
P50=$(prom_value 'histogram_quantile(0.5, sum by (feature_view, le) (rate(quiver_feature_freshness_seconds_bucket[20s])))')
P99=$(prom_value 'histogram_quantile(0.99, sum by (feature_view, le) (rate(quiver_feature_freshness_seconds_bucket[20s])))')
echo "freshness at $GEN_RATE events/s, p50 (s): $P50"
echo "freshness at $GEN_RATE events/s, p99 (s): $P99"
kill "$GEN" 2>/dev/null || true
echo "== e2e passed"
