#!/usr/bin/env bash
# Runs every test of quiver: Rust unit and integration tests (real redis-server
# and a 3-node Redis Cluster on ephemeral ports, Kafka through librdkafka's
# in-process mock cluster, an S3-compatible server (moto) on loopback, real
# gRPC/HTTP), then the Python client tests (the client installed with pip,
# its stubs generated from proto/ at build time; pytest against a live server), then schemathesis against the REST
# gateway's generated OpenAPI description (scripts/schemathesis.sh).
# Checks deploy/prometheus with promtool (config, rules, a unit test per alert).
# Installs what is missing: redis-server, redis-cli, prometheus (promtool),
# prometheus-pushgateway (apt-get; batch metrics are pushed to a real one) and
# prometheus-alertmanager (amtool; the e2e's Prometheus sends to it) and a Python
# venv with grpcio, pytest and moto[server] (pip). Finally runs
# scripts/e2e-tansu.sh (serve, ingest and generate as processes against a
# real Kafka-compatible broker, tansu, installed from crates.io on first use;
# QUIVER_SKIP_E2E=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says when it starts (seconds since this script began), so a
# slow CI run shows where its time went.
step() { echo "== $* (at ${SECONDS}s)"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 \
  || ! command -v prometheus-pushgateway >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
  || ! command -v amtool >/dev/null 2>&1; then
  step "installing redis-server, prometheus (promtool), prometheus-pushgateway and prometheus-alertmanager (amtool)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools prometheus prometheus-pushgateway prometheus-alertmanager
fi

step "python venv (grpcio, pytest, moto, pyarrow, pandas, polars, mypy, scikit-learn, nbclient, cryptography, schemathesis) and the client"
VENV="${QUIVER_TEST_VENV:-target/py-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "grpcio>=1.60" "grpcio-reflection>=1.60" "protobuf>=4.25" "pytest>=7" "moto[server]>=5" \
  "pyarrow>=14" "pandas>=2" "polars>=1" "cryptography>=41" "schemathesis>=4,<5" \
  "mypy>=1.10" types-grpcio types-protobuf pandas-stubs "build>=1" \
  "scikit-learn>=1.3" "nbclient>=0.9" "nbformat>=5" "ipykernel>=6" "pyyaml>=6"
# The client as users install it (its stubs are generated while it is built).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
VENV="$(cd "$VENV" && pwd)"
export QUIVER_MOTO_SERVER="$VENV/bin/moto_server"

step "Prometheus config, recording rules and alerts (promtool; a unit test per alert)"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml
"$VENV/bin/python" - <<'PY'
import yaml
rules = yaml.safe_load(open("deploy/prometheus/rules.yml"))
tests = yaml.safe_load(open("deploy/prometheus/rules_test.yml"))
alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
fired = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
missing = sorted(alerts - fired)
assert not missing, f"alerts without a promtool test that fires them: {missing}"
print(f"{len(alerts)} alerts, each fired by a test")
PY

step "deploy/: compose and Kubernetes schemas, PrometheusRule, Dockerfile"
./scripts/check-deploy.sh

step "cargo test --workspace"
cargo test --workspace --locked
# The quiver binary that test build made for cli's tests: the scripts below
# use it rather than `cargo build -p quiver`, whose own feature resolution
# would compile much of the tree again.
export QUIVER_BIN="$PWD/target/debug/quiver"
[ -x "$QUIVER_BIN" ] || { echo "cargo test did not build $QUIVER_BIN" >&2; exit 1; }

step "python client tests"
"$VENV/bin/python" -m pytest -q clients/python/tests

step "REST gateway fuzzed from its OpenAPI description (schemathesis)"
QUIVER_TEST_VENV="$VENV" ./scripts/schemathesis.sh

if [ "${QUIVER_SKIP_E2E:-0}" != 1 ]; then
  step "end to end against a real Kafka-compatible broker (tansu)"
  QUIVER_TEST_VENV="$VENV" ./scripts/e2e-tansu.sh
fi

step "all tests passed"
