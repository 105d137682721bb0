#!/usr/bin/env python3
"""Regenerate the Python protobuf / gRPC modules from protos/rlrt/v1/*.proto.

    python scripts/gen_protos.py            # writes rlrt_core/proto/
    python scripts/gen_protos.py --out DIR  # writes elsewhere (tests compare byte for byte)

protoc emits `from rlrt.v1 import x_pb2` for cross-file imports, which only works with
protos/ on sys.path; the generated files are rewritten to import from `rlrt_core.proto`
so they work inside the installed package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "rlrt" / "v1"
DEFAULT_OUT = ROOT / "rlrt_core" / "proto"
PACKAGE = "rlrt_core.proto"

_IMPORT_RE = re.compile(r"^from rlrt\.v1 import (\w+)", re.MULTILINE)
_INIT = '"""Generated protobuf / gRPC modules for package rlrt.v1 (see scripts/gen_protos.py)."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) over every proto file into `out_dir`; return the files written."""
    from grpc_tools import protoc  # dev dependency, imported here so the module stays importable

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, protos)]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "rlrt" / "v1").iterdir()):
            text = _IMPORT_RE.sub(rf"from {PACKAGE} import \1", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(_INIT)
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
