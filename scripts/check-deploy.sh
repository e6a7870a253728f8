#!/usr/bin/env bash
# Checks deploy/ without a Docker daemon or a cluster:
# - deploy/compose.yaml against the Compose specification's JSON schema
#   (check-jsonschema's vendored copy), and every file it mounts exists;
# - deploy/k8s manifests against Kubernetes' OpenAPI schemas, strictly
#   (kubernetes-validate); every kustomization resource and generator file
#   exists; the PrometheusRule's groups are deploy/prometheus/rules.yml's;
# - deploy/Dockerfile builds the binary the way the README says
#   (cargo build --release --locked -p quiver), and its airflow stage
#   carries that binary and the DAG;
# - deploy/alertmanager's config passes amtool check-config, and the
#   Airflow DAG compiles (scripts/airflow-test.sh runs it).
# Installs check-jsonschema, kubernetes-validate and PyYAML into a venv of
# their own (target/deploy-venv, or QUIVER_DEPLOY_VENV); needs promtool and
# amtool (Debian packages prometheus and prometheus-alertmanager).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QUIVER_DEPLOY_VENV:-target/deploy-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "check-jsonschema>=0.29" "kubernetes-validate>=1.31" "pyyaml>=6"

echo "== deploy/compose.yaml against the Compose specification"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "== deploy/alertmanager (amtool) and deploy/airflow (compiles)"
amtool check-config deploy/alertmanager/alertmanager.yml
python3 -c 'import sys; compile(open(sys.argv[1]).read(), sys.argv[1], "exec")' deploy/airflow/dags/quiver_batch.py

echo "== deploy/k8s against the Kubernetes schemas (strict)"
"$VENV/bin/kubernetes-validate" --strict --quiet \
  deploy/k8s/namespace.yaml deploy/k8s/serve.yaml deploy/k8s/ingest.yaml deploy/k8s/batch.yaml

"$VENV/bin/python" - <<'PY'
import pathlib, re, subprocess, tempfile, yaml

root = pathlib.Path(".")
# Files the compose stack mounts or builds from.
compose = yaml.safe_load(open("deploy/compose.yaml"))
for name, svc in compose["services"].items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        assert (root / "deploy" / src).exists(), f"compose service {name} mounts missing {src}"
# Kustomization references.
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
for r in k["resources"]:
    assert (root / "deploy/k8s" / r).exists(), f"kustomization resource {r} is missing"
for g in k.get("configMapGenerator", []):
    for f in g.get("files", []):
        path = f.split("=", 1)[-1]
        assert (root / "deploy/k8s" / path).exists(), f"configMapGenerator file {path} is missing"
# The PrometheusRule carries rules.yml's groups, and promtool accepts them.
docs = list(yaml.safe_load_all(open("deploy/k8s/monitoring.yaml")))
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
rules = yaml.safe_load(open("deploy/prometheus/rules.yml"))
assert rule["spec"]["groups"] == rules["groups"], \
    "deploy/k8s/monitoring.yaml's PrometheusRule differs from deploy/prometheus/rules.yml"
with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
    yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
    f.flush()
    subprocess.run(["promtool", "check", "rules", f.name], check=True, stdout=subprocess.DEVNULL)
# The Dockerfile builds what the README builds.
docker = open("deploy/Dockerfile").read()
readme = open("README.md").read()
build = "cargo build --release --locked -p quiver"
assert build in docker, f"deploy/Dockerfile does not run {build!r}"
assert build in readme, f"README.md does not show {build!r}"
assert re.search(r"^USER 10001", docker, re.M), "the runtime image must run as a non-root user"
assert "HEALTHCHECK" in docker
stages = re.findall(r"^FROM \S+(?: AS (\S+))?", docker, re.M)
assert stages[-1] == "", "the quiver runtime image must be the Dockerfile's last (default) stage"
assert "airflow" in stages, "deploy/Dockerfile has no airflow stage"
airflow = docker.split("AS airflow", 1)[1].split("\nFROM ", 1)[0]
assert "COPY --from=build /out/quiver" in airflow and "deploy/airflow/dags" in airflow, \
    "the airflow stage must carry the built quiver binary and the DAG"
assert compose["services"]["airflow"]["build"]["target"] == "airflow"
print("deploy/: compose mounts, kustomization files, PrometheusRule and Dockerfile agree")
PY
