"""The package as a new user gets it: `pip install ./clients/python`, a wheel built by
`python -m build` (sdist, then the wheel from the sdist) and an editable install, each into a fresh
venv that has no grpcio-tools, imported and used against the live server; and `mypy --strict` on
the installed package."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import venv

from conftest import ROOT

PACKAGE = ROOT / "clients" / "python"

USE = textwrap.dedent(
    """
    import importlib.util, sys
    assert importlib.util.find_spec("grpc_tools") is None, "grpcio-tools leaked into the runtime venv"
    assert importlib.util.find_spec("quiver") is None, "stubs must not be a top-level quiver package"
    from quiver_client import QuiverClient
    from quiver_client.v1 import feature_service_pb2
    with QuiverClient(sys.argv[1]) as q:
        resp = q.get_online_features({"user_id": ["user_123"]}, feature_service="user_service")
        assert resp.statuses["age"] == ["PRESENT"], resp.statuses
    print("ok", feature_service_pb2.__name__)
    """
)


def _fresh_venv(path: pathlib.Path) -> pathlib.Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def _pip(python: pathlib.Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                   check=True, timeout=600)


def _works(python: pathlib.Path, server, cwd: pathlib.Path) -> None:
    out = subprocess.run([str(python), "-c", USE, server["grpc"]], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok quiver_client.v1.feature_service_pb2"


def test_pip_install_of_the_folder_works_in_a_fresh_venv(server, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, str(PACKAGE))
    _works(python, server, tmp_path)


def test_built_wheel_works_in_a_fresh_venv(server, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(PACKAGE)],
                   check=True, capture_output=True, timeout=600)
    sdists = list(dist.glob("quiver_client-*.tar.gz"))
    wheels = list(dist.glob("quiver_client-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(dist.iterdir())
    import zipfile

    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for f in ("quiver_client/py.typed", "quiver_client/v1/feature_service_pb2.pyi",
              "quiver_client/v1/feature_service_pb2_grpc.pyi", "quiver_client/v1/feature_service_pb2_grpc.py"):
        assert f in names, f
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, str(wheels[0]))
    _works(python, server, tmp_path)


def test_editable_install_has_the_stubs(server, tmp_path):
    """`pip install -e` imports the source folder: the build writes the stubs there (ignored by
    git) and removes nothing else."""
    import shutil

    generated = PACKAGE / "quiver_client" / "v1"
    existed = generated.exists()
    python = _fresh_venv(tmp_path / "venv")
    try:
        _pip(python, "-e", str(PACKAGE))
        _works(python, server, tmp_path)
        assert (generated / "feature_service_pb2.pyi").exists()
    finally:
        if not existed:
            shutil.rmtree(generated, ignore_errors=True)


def test_the_installed_package_passes_mypy_strict(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(PACKAGE / "pyproject.toml"),
         "-p", "quiver_client"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
