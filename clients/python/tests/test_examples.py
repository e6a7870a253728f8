"""The worked example (examples/), run as a user would: the notebook executed with nbclient against
a live `quiver demo` (traffic, labels from the archive, point-in-time training set, a model that
must beat a constant baseline), then the model server it feeds under a short load test, its LLM
context endpoint, and `mypy --strict` on the example code, the notebook's included."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, start_quiver, stop_quiver

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quiver demo without generated traffic, and the notebook executed against it."""
    import nbformat
    from nbclient import NotebookClient

    data = tmp_path_factory.mktemp("example")
    config = data / "quiver.toml"
    config.write_text(f'[archive]\nroll_interval = "1s"\n[registry]\npath = "{ROOT / "registry"}"\n')
    proc, grpc_addr, _ = start_quiver([
        "demo", "--rate", "0", "--users", "20", "--products", "50", "--config", str(config),
        "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
        "--store-path", str(data / "online.redb"), "--archive", str(data / "offline"),
    ])
    model_dir = data / "model"
    env = {"QUIVER_GRPC": grpc_addr, "QUIVER_ARCHIVE": str(data / "offline"), "QUIVER_MODEL_DIR": str(model_dir)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        nb = nbformat.read(EXAMPLES / "purchase_propensity.ipynb", as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(data)}}).execute()
    except BaseException:
        proc.kill()  # a failed notebook must not leave the server running
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield {"grpc": grpc_addr, "model_dir": model_dir, "notebook": nb}
    stop_quiver(proc)


def test_notebook_trains_a_model_that_beats_the_baseline(trained):
    metrics = json.loads((trained["model_dir"] / "metrics.json").read_text())
    assert metrics["train_rows"] > 1000 and metrics["test_rows"] > 500
    assert 0.05 < metrics["test_positive_rate"] < 0.95
    assert metrics["auc"] > metrics["baseline_auc"] + 0.1, metrics
    assert metrics["log_loss"] < metrics["baseline_log_loss"], metrics
    errors = [o for c in trained["notebook"].cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_model_server_under_load_and_its_llm_context(trained):
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "model_server.py"), "--model", str(trained["model_dir"] / "model.pkl"),
         "--quiver", trained["grpc"], "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)

        spec = importlib.util.spec_from_file_location("load_test", EXAMPLES / "load_test.py")
        load_test = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(load_test)
        users = json.loads((trained["model_dir"] / "users.json").read_text())
        assert len(users) == 250 and all(u.startswith("shopper_") for u in users)
        report = load_test.run(url, users=users, requests=300, concurrency=4)
        print(json.dumps(report, indent=2))
        assert report["ok"] == 300 and report["errors"] == 0, report
        assert 0 < report["feature_share_of_client_latency"] < report["feature_share"] < 1, report
        assert report["feature_p50_ms"] > 0 and report["client_p99_ms"] >= report["client_p50_ms"]

        with urllib.request.urlopen(f"{url}/context/{urllib.parse.quote(users[7])}") as r:
            text = r.read().decode()
        assert text.startswith(f"user_id={users[7]}, as of "), text
        assert re.search(r"- hours_since_login: [0-9.]+ hours \(computed at request time\)", text), text
        assert re.search(r"- spend_7d: [0-9.]+ USD \(", text), text

        req = urllib.request.Request(f"{url}/predict", data=b'{"user": 1}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_example_code_passes_mypy_strict(tmp_path):
    """The model server, the load test and the notebook's code (its cells, in order, as one module)."""
    import nbformat

    nb = nbformat.read(EXAMPLES / "purchase_propensity.ipynb", as_version=4)
    notebook = tmp_path / "purchase_propensity.py"
    notebook.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code") + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "clients" / "python" / "pyproject.toml"),
         str(EXAMPLES / "model_server.py"), str(EXAMPLES / "load_test.py"), str(notebook)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
