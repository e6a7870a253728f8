"""Build hooks of quiver-client: the gRPC stubs are generated while the package is built.

`build_py` compiles quiver's .proto with grpcio-tools (a build requirement, not a runtime one) into
`quiver_client/v1/`, with mypy-protobuf's `.pyi` beside them, and makes the stubs import each other
inside the package (`quiver_client.v1`), never as a top-level `quiver` package. The .proto is read
from the repository (`../../proto`) or, in an sdist, from the copy `sdist` puts in `proto/`.

The runtime requirements are pinned to what generated the stubs: grpcio-tools N writes code that
refuses a grpcio older than N, and protobuf gencode of version M.m needs a protobuf runtime of
major M at least M.m (https://protobuf.dev/support/cross-version-runtime-guarantee/).
"""

from __future__ import annotations

import atexit
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "quiver/v1/feature_service.proto"
GEN_PACKAGE = "quiver_client/v1"


def proto_root() -> pathlib.Path:
    """Where quiver/v1/feature_service.proto is: the sdist's copy, else the repository's proto/."""
    for root in (HERE / "proto", HERE.parent.parent / "proto"):
        if (root / PROTO_FILE).is_file():
            return root
    raise SystemExit(f"quiver-client build: {PROTO_FILE} not found under {HERE / 'proto'} or {HERE.parent.parent / 'proto'}")


def mypy_plugin() -> str | None:
    """The protoc-gen-mypy executable of mypy-protobuf (a build requirement), or None when a build
    without isolation lacks it: the stubs are then built without their .pyi (and a warning)."""
    for candidate in (shutil.which("protoc-gen-mypy"), str(pathlib.Path(sys.executable).parent / "protoc-gen-mypy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    warnings.warn("quiver-client build: protoc-gen-mypy (PyPI mypy-protobuf) is not installed; no .pyi type stubs")
    return None


_GENERATED: list[pathlib.Path] = []


def stubs() -> pathlib.Path:
    """Generates the stubs of PROTO_FILE once per build (into a temporary folder) and returns the
    folder holding the modules of quiver_client.v1."""
    if _GENERATED:
        return _GENERATED[0]
    import grpc_tools
    from grpc_tools import protoc

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="quiver-client-stubs-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    plugin = mypy_plugin()
    typed = [f"--plugin=protoc-gen-mypy={plugin}", f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}"] if plugin else []
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root()}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            *typed,
            PROTO_FILE,
        ]
    )
    if status != 0:
        raise SystemExit(f"quiver-client build: protoc failed on {PROTO_FILE}")
    out = tmp / "quiver_client_v1"
    out.mkdir()
    for f in sorted((tmp / "quiver" / "v1").iterdir()):
        text = f.read_text()
        # The generated modules name each other by the .proto's package path (`quiver.v1`);
        # in the wheel they live in quiver_client.v1.
        text = re.sub(r"^from quiver\.v1 import ", "from quiver_client.v1 import ", text, flags=re.M)
        text = re.sub(r"\bquiver\.v1\.feature_service_pb2\b", "quiver_client.v1.feature_service_pb2", text)
        (out / f.name).write_text(text)
    _GENERATED.append(out)
    return out


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as the stubs need (see the module doc), read off the
    generated code: the gRPC plugin's GRPC_GENERATED_VERSION and protoc's runtime version check."""
    gen = stubs()
    grpc_code = (gen / "feature_service_pb2_grpc.py").read_text()
    pb_code = (gen / "feature_service_pb2.py").read_text()
    reqs = []
    m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_code)
    reqs.append(f"grpcio>={m.group(1)}" if m else "grpcio>=1.60")
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb_code)
    if m:
        major, minor, patch = (int(x) for x in m.groups())
        reqs.append(f"protobuf>={major}.{minor}.{patch},<{major + 1}")
    else:
        reqs.append("protobuf>=4.25,<6")
    return reqs


class BuildPyWithStubs(build_py):
    """Adds the generated stubs to the build; an editable install (`pip install -e`, which imports
    the source folder) gets them in the source folder instead (git ignores them there)."""

    def _dest(self) -> pathlib.Path:
        root = HERE if getattr(self, "editable_mode", False) else pathlib.Path(self.build_lib)
        return root / GEN_PACKAGE

    def run(self) -> None:
        super().run()
        dest = self._dest()
        dest.mkdir(parents=True, exist_ok=True)
        for f in stubs().iterdir():
            shutil.copyfile(f, dest / f.name)
        (dest / "__init__.py").write_text('"""quiver.v1 protobuf messages and gRPC stubs, generated at build time."""\n')

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        names = ["__init__.py", *sorted(f.name for f in stubs().iterdir())]
        extra = [os.path.join(self.build_lib, GEN_PACKAGE, n) for n in names]
        return list(super().get_outputs(include_bytecode)) + extra


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        src = proto_root() / PROTO_FILE
        dst = pathlib.Path(base_dir) / "proto" / PROTO_FILE
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


setup(
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto},
    install_requires=runtime_requirements(),
)
