"""Generate the grpcio stubs of quiver.v1 from the repository's proto/ folder.

    python -m quiver_client.generate            # uses ../../proto relative to this package
    python -m quiver_client.generate --proto DIR

The stubs land in quiver_client/_gen/ (not committed); `import quiver_client`
makes them importable as `quiver.v1.feature_service_pb2(_grpc)`.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_PROTO = PACKAGE_DIR.parent.parent.parent / "proto"
GEN_DIR = PACKAGE_DIR / "_gen"


def generate(proto_dir: pathlib.Path = DEFAULT_PROTO) -> pathlib.Path:
    """Compile every .proto under proto_dir into GEN_DIR; returns GEN_DIR."""
    try:
        from grpc_tools import protoc
        import grpc_tools
    except ImportError as e:  # pragma: no cover - message for users
        raise SystemExit("grpcio-tools is required: pip install grpcio-tools") from e
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_dir}")
    GEN_DIR.mkdir(exist_ok=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={GEN_DIR}",
        f"--grpc_python_out={GEN_DIR}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))
    for d in [GEN_DIR, *[p for p in GEN_DIR.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    # The package put GEN_DIR on sys.path at import time, possibly before it
    # existed; drop the cached "nothing here" so the stubs become importable.
    sys.path_importer_cache.pop(str(GEN_DIR), None)
    importlib.invalidate_caches()
    return GEN_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proto", type=pathlib.Path, default=DEFAULT_PROTO)
    out = generate(ap.parse_args().proto)
    print(f"stubs written to {out}")


if __name__ == "__main__":
    sys.exit(main())
