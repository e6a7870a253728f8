#!/usr/bin/env bash
# Fuzzes the REST gateway from its own OpenAPI description (schemathesis,
# PyPI): every operation, with schema-valid and schema-violating data, against
# a live `quiver demo` (embedded store, in-process Kafka, API keys on).
#
# Checks: every check schemathesis has except positive_data_acceptance, that
# is: no 5xx, responses (status, headers, content type, body) match the
# description, schema-violating requests are refused with 4xx, requests
# without or with a wrong API key get 401. positive_data_acceptance is left
# out because validity also depends on the registry (a schema-valid feature
# reference, join key or id may name nothing, which is a 4xx by design).
#
# Usage: scripts/schemathesis.sh [extra schemathesis args]
#   QUIVER_BIN   quiver binary (default target/debug/quiver, built if missing)
#   QUIVER_TEST_VENV  venv with schemathesis (default target/py-venv; installed if missing)
#   ST_EXAMPLES  examples per operation and phase (default 100)
#   ST_SEED      hypothesis seed (default 1: a failure reproduces; set another to explore)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${QUIVER_TEST_VENV:-target/py-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/schemathesis" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "schemathesis>=4,<5"
fi
BIN="${QUIVER_BIN:-target/debug/quiver}"
if [ ! -x "$BIN" ]; then
  cargo build -p quiver --locked
fi

WORK="$(mktemp -d)"
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

KEY="$("$BIN" auth create-key --name schemathesis --scopes read,write,admin --keys-file "$WORK/keys.toml" 2>/dev/null)"
"$BIN" demo --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 \
  --store-path "$WORK/online.redb" --archive "$WORK/offline" \
  --auth-keys-file "$WORK/keys.toml" --rate 5 --batch-every 0s \
  > "$WORK/demo.out" 2> "$WORK/demo.log" &
PID=$!
HTTP=""
for _ in $(seq 1 300); do
  HTTP="$(sed -n 's/^quiver listening .*http=\([^ ]*\).*/\1/p' "$WORK/demo.out")"
  [ -n "$HTTP" ] && break
  if ! kill -0 "$PID" 2>/dev/null; then cat "$WORK/demo.log" >&2; echo "quiver demo exited" >&2; exit 1; fi
  sleep 0.1
done
[ -n "$HTTP" ] || { cat "$WORK/demo.log" >&2; echo "quiver demo did not listen within 30 s" >&2; exit 1; }

status=0
"$VENV/bin/schemathesis" run "http://$HTTP/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --mode all -n "${ST_EXAMPLES:-100}" --seed "${ST_SEED:-1}" \
  -H "Authorization: Bearer $KEY" --request-timeout 30 \
  --report junit --report-dir "$WORK/report" "$@" || status=$?
if grep -q "panicked" "$WORK/demo.log"; then
  echo "quiver panicked during the run:" >&2
  grep -B2 -A10 "panicked" "$WORK/demo.log" >&2
  status=1
fi
if grep -q "$KEY" "$WORK/demo.log" "$WORK/demo.out"; then
  echo "the API key appears in quiver's output" >&2
  status=1
fi
exit "$status"
