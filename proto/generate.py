"""Regenerate the committed gRPC/protobuf modules from the .proto files.

Run `python -m fleetprof.proto.generate` after editing a .proto; a test checks that running
it changes nothing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
# pprof/profile.proto is google/pprof's, unchanged (Apache-2.0): `.pb.gz` exports and imports.
PROTO_FILES = ["ingest/v1/ingest.proto", "control/v1/control.proto", "pprof/profile.proto"]
# Generated modules import each other as fleetprof.proto.<path>: map that virtual path onto
# this folder so protoc writes the right import lines.
VIRTUAL_ROOT = "fleetprof/proto"


def generate(out_root: Path) -> list[Path]:
    """Write the generated modules under out_root (mirroring the proto folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_ROOT}={PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL_ROOT}/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        generated_root = Path(tmp) / VIRTUAL_ROOT
        for src in sorted(generated_root.rglob("*_pb2*.py*")):
            dest = out_root / src.relative_to(generated_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
            written.append(dest)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
