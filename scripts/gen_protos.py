"""Generate hpt/_proto from protos/hpt/v1 with the pinned grpcio-tools and mypy-protobuf.

protoc names modules after their proto path (``hpt.v1.common_pb2``); we ship them flat under
``hpt._proto`` so the wire package name stays ``hpt.v1`` while nothing new lands in the import
namespace. The import lines are rewritten accordingly. ``--out DIR`` writes elsewhere (the unit
test regenerates into a temporary directory and diffs against the committed files).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted((PROTO_ROOT / "hpt" / "v1").glob("*.proto"))
_IMPORT = re.compile(r"^from hpt\.v1 import (\w+) as", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency; imported here so the package never needs it

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            # the plugin is a console script of the interpreter running this, venv or not
            f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
            f"--mypy_out={raw}",
            *[str(p) for p in PROTO_FILES],
        ]
        # the plugin sits next to this interpreter (a venv's bin/), which need not be on PATH
        plugin = Path(sys.executable).parent / "protoc-gen-mypy"
        if plugin.exists():
            args.insert(1, f"--plugin=protoc-gen-mypy={plugin}")
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(raw) / "hpt" / "v1").iterdir()):
            text = src.read_text()
            text = _IMPORT.sub(r"from hpt._proto import \1 as", text)
            text = text.replace("import hpt.v1.", "import hpt._proto.").replace(
                "hpt.v1.common_pb2", "hpt._proto.common_pb2"
            )
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text('"""Generated protobuf and gRPC code; see scripts/gen_protos.py."""\n')
        written.append(init)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "hpt" / "_proto")
    args = parser.parse_args(argv)
    if args.out.exists() and args.out == ROOT / "hpt" / "_proto":
        shutil.rmtree(args.out)
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
