"""Starts a real `quiver demo` server (embedded store, ephemeral ports) for the tests."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
# The tests use quiver_client as installed (scripts/test.sh runs `pip install ./clients/python`),
# never the source folder, whose stubs exist only in a build.
import quiver_client  # noqa: E402

if (HERE.parent / "quiver_client") == pathlib.Path(quiver_client.__file__).resolve().parent:
    raise RuntimeError("import the installed quiver_client (pip install ./clients/python), not the source folder")


def start_quiver(args, stderr=subprocess.DEVNULL, env=None):
    """Starts the quiver binary with `args` (which bind port 0); returns (process, grpc, http address)
    once it listens."""
    binary = os.environ.get("QUIVER_BIN", str(ROOT / "target" / "debug" / "quiver"))
    if not pathlib.Path(binary).exists():
        pytest.fail(f"quiver binary not found at {binary}: run `cargo build -p quiver` or set QUIVER_BIN")
    proc = subprocess.Popen(
        [binary, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
    )
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("quiver listening") or proc.poll() is not None:
            break
    m = re.search(r"grpc=(\S+) http=(\S+)", line)
    if not m:
        proc.kill()
        pytest.fail(f"quiver did not start (exit code {proc.poll()}, last line {line!r})")
    return proc, m.group(1), m.group(2)


def stop_quiver(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("quiver")
    # Archive rolls every second, so historical retrieval sees events soon.
    config = data / "quiver.toml"
    config.write_text('[archive]\nroll_interval = "1s"\n')
    proc, grpc_addr, http_addr = start_quiver(
        [
            "demo", "--users", "300", "--products", "50", "--config", str(config),
            "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
            "--store-path", str(data / "online.redb"), "--archive", str(data / "offline"),
        ]
    )
    yield {"grpc": grpc_addr, "http": f"http://{http_addr}", "proc": proc}
    stop_quiver(proc)
