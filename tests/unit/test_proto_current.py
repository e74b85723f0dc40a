"""The committed generated modules match proto/preft/v1/router.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", "proto/preft/v1/router.proto"],
                   cwd=ROOT, check=True)
    for name in ("router_pb2.py", "router_pb2_grpc.py", "router_pb2.pyi"):
        fresh = (tmp_path / "proto/preft/v1" / name).read_text()
        assert fresh == (ROOT / "proto/preft/v1" / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh")
