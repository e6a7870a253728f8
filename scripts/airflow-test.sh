#!/usr/bin/env bash
# Runs deploy/airflow's DAG (quiver_batch) with `airflow dags test` against
# real quiver processes and a real offline store:
#  1. `quiver demo` (in-process Kafka, ingest) archives a few seconds of
#     generated events as Parquet in a local offline store;
#  2. redis-server, `quiver serve` on it, and a Pushgateway start;
#  3. the DAG runs for the data intervals holding those events: `quiver batch
#     run`, then `quiver materialize --start/--end` of each interval into
#     Redis; the REST API then serves the materialized values, an interval
#     before the events writes nothing, and the Pushgateway holds the runs'
#     metrics;
#  4. a failing run (an unknown feature view) is retried, fails, and its
#     failure alert reaches a real Alertmanager.
# Not part of the README's test command: Apache Airflow is a large install
# (about 2-3 minutes) that changes rarely. Installs what is missing:
# apache-airflow 3 in target/airflow-venv (pip), redis-server,
# prometheus-pushgateway and prometheus-alertmanager (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v redis-server >/dev/null || ! command -v prometheus-pushgateway >/dev/null \
  || ! command -v prometheus-alertmanager >/dev/null; then
  echo "== installing redis-server, prometheus-pushgateway and prometheus-alertmanager"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    redis-server prometheus-pushgateway prometheus-alertmanager
fi

VENV="${QUIVER_AIRFLOW_VENV:-target/airflow-venv}"
if [ ! -x "$VENV/bin/airflow" ]; then
  echo "== installing apache-airflow 3 into $VENV"
  python3 -m venv "$VENV"
  # The version of deploy/Dockerfile's airflow stage.
  "$VENV/bin/pip" install -q --disable-pip-version-check "apache-airflow==3.3.2"
fi
AIRFLOW="$ROOT/$VENV/bin/airflow"
[ -x "$AIRFLOW" ] || AIRFLOW="$VENV/bin/airflow"

# QUIVER_BIN: an already built quiver (e.g. target/release/quiver) instead of
# a debug build.
if [ -n "${QUIVER_BIN:-}" ]; then
  QUIVER="$(realpath "$QUIVER_BIN")"
else
  echo "== cargo build -p quiver"
  cargo build -q -p quiver --locked
  QUIVER="$ROOT/target/debug/quiver"
fi

. scripts/lib.sh

echo "== the offline store: quiver demo archives generated events"
DEMO_HTTP=$(free_port)
T0=$(date -u +%s)
"$QUIVER" demo --archive "$WORK/offline" --store-path "$WORK/demo.redb" \
  --grpc-addr "127.0.0.1:$(free_port)" --http-addr "127.0.0.1:$DEMO_HTTP" \
  --users 50 --products 20 --rate 300 --batch-every 0s > "$WORK/demo.log" 2>&1 &
DEMO=$!
PIDS+=($DEMO)
wait_http "http://127.0.0.1:$DEMO_HTTP/ready" "quiver demo"
sleep 8
kill -TERM "$DEMO"
wait "$DEMO" || { cat "$WORK/demo.log"; echo "FAIL: quiver demo did not stop cleanly" >&2; exit 1; }
T1=$(date -u +%s)
FILES=$(find "$WORK/offline" -name '*.parquet' | wc -l)
[ "$FILES" -gt 0 ] || { echo "FAIL: no Parquet files in the offline store" >&2; exit 1; }
echo "   $FILES Parquet files"

echo "== redis-server, quiver serve, a Pushgateway and Alertmanager"
start_redis
start_pushgateway_and_alertmanager
cat > "$WORK/quiver.toml" <<EOF
[online_store]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT"

[archive]
location = "$WORK/offline"

[metrics]
pushgateway_url = "http://127.0.0.1:$PGW_PORT"
EOF
SERVE_HTTP=$(free_port)
"$QUIVER" serve --config "$WORK/quiver.toml" --grpc-addr "127.0.0.1:$(free_port)" \
  --http-addr "127.0.0.1:$SERVE_HTTP" > "$WORK/serve.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SERVE_HTTP/ready" "quiver serve"
wait_http "http://127.0.0.1:$PGW_PORT/-/ready" "the Pushgateway"
wait_http "http://127.0.0.1:$AM_PORT/-/ready" "Alertmanager"

echo "== Airflow: the DAG for the intervals holding the events"
export AIRFLOW_HOME="$WORK/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/deploy/airflow/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export QUIVER_BIN="$QUIVER" QUIVER_CONFIG="$WORK/quiver.toml"
export QUIVER_ALERTMANAGER_URL="http://127.0.0.1:$AM_PORT"
export QUIVER_BATCH_RETRY_DELAY_SECONDS=1
"$AIRFLOW" db migrate > "$WORK/airflow-migrate.log" 2>&1 || { tail -20 "$WORK/airflow-migrate.log"; exit 1; }
if ! "$AIRFLOW" dags list-import-errors --local > "$WORK/import-errors.log" 2>&1 \
  || grep -q "quiver_batch" "$WORK/import-errors.log"; then
  cat "$WORK/import-errors.log"; echo "FAIL: the DAG does not import" >&2; exit 1
fi

# Hourly intervals; a manual run at logical date X covers [X - 1h, X).
hour_end() { echo $(( ($1 / 3600 + 1) * 3600 )); }
iso() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%S+00:00; }
run_dag() { # logical date (epoch s), log file
  "$AIRFLOW" dags test quiver_batch "$(iso "$1")" > "$2" 2>&1
}
WRITTEN=0
for END in $(printf '%s\n' "$(hour_end "$T0")" "$(hour_end "$T1")" | sort -u); do
  LOG="$WORK/dag-$END.log"
  run_dag "$END" "$LOG" || { grep -E "ERROR|error|Output|quiver" "$LOG" | tail -30; echo "FAIL: the DAG run for $(iso "$END") failed" >&2; exit 1; }
  # The data interval, from its lookback (15 minutes) on.
  grep -q "materialize --start $(iso $((END - 3600 - 900))) --end $(iso "$END")" "$LOG" \
    || { grep "Running command" "$LOG"; echo "FAIL: materialize did not get the data interval" >&2; exit 1; }
  N=$(grep -o 'materialize: [0-9]* views, [0-9]* rows written' "$LOG" | awk '{print $4}' | tail -1 || true)
  [ -n "$N" ] || { grep -E "Output|quiver|rows" "$LOG" | tail -20; echo "FAIL: no materialize summary" >&2; exit 1; }
  echo "   [$(iso $((END - 3600))), $(iso "$END")): $N rows materialized"
  WRITTEN=$((WRITTEN + N))
done
[ "$WRITTEN" -gt 0 ] || { echo "FAIL: the intervals holding the events materialized nothing" >&2; exit 1; }

# An interval a day before the events: nothing to write.
EARLY=$(( $(hour_end "$T0") - 86400 ))
run_dag "$EARLY" "$WORK/dag-early.log" || { tail -30 "$WORK/dag-early.log"; exit 1; }
grep -q 'materialize: [0-9]* views, 0 rows written' "$WORK/dag-early.log" \
  || { grep -E "rows written" "$WORK/dag-early.log"; echo "FAIL: an interval without events wrote rows" >&2; exit 1; }
echo "   [$(iso $((EARLY - 3600))), $(iso "$EARLY")): 0 rows, as expected"

# The materialized latest values are served (users 0..49 logged in).
SERVED=0
for u in $(seq 0 49); do
  if curl -fsS "http://127.0.0.1:$SERVE_HTTP/api/v1/features/user/user_$u" \
    | python3 -c 'import json,sys; f=json.load(sys.stdin)["features"]; sys.exit(0 if f["user_last_login__device"]["value"] is not None else 1)' 2>/dev/null; then
    SERVED=$((SERVED + 1))
  fi
done
echo "   $SERVED of 50 users served a materialized user_last_login"
[ "$SERVED" -gt 0 ] || { echo "FAIL: nothing materialized is served" >&2; exit 1; }

# The runs' metrics reached the Pushgateway.
METRICS=$(curl -fsS "http://127.0.0.1:$PGW_PORT/metrics")
for job in quiver_batch quiver_materialize; do
  grep -q "quiver_batch_success{.*job=\"$job\".*} 1" <<<"$METRICS" \
    || { grep quiver_batch_success <<<"$METRICS"; echo "FAIL: no success of $job on the Pushgateway" >&2; exit 1; }
done

echo "== Airflow: a failing run is retried and alerts"
if QUIVER_BATCH_VIEWS=no_such_view QUIVER_BATCH_RETRIES=1 run_dag "$(hour_end "$T1")" "$WORK/dag-fail.log"; then
  echo "FAIL: the run with an unknown view succeeded" >&2; exit 1
fi
TRIES=$(grep -c "Running command: .*batch run --views no_such_view" "$WORK/dag-fail.log" || true)
[ "$TRIES" -eq 2 ] || { echo "FAIL: batch_run ran $TRIES times, expected 2 (one retry)" >&2; exit 1; }
curl -fsS "http://127.0.0.1:$AM_PORT/api/v2/alerts" | python3 -c '
import json, sys
alerts = [a for a in json.load(sys.stdin) if a["labels"].get("alertname") == "QuiverBatchTaskFailed"]
assert alerts, "no QuiverBatchTaskFailed alert in Alertmanager"
a = alerts[0]
assert a["labels"]["task_id"] == "batch_run" and a["labels"]["dag_id"] == "quiver_batch", a["labels"]
assert "2 tries" in a["annotations"]["summary"], a["annotations"]
print("   alert:", a["annotations"]["summary"])
'
echo "== airflow test passed"
