"""An independent Sparkplug B decoder for tests: bindings compiled from the published
.proto (tests/fixtures/sparkplug_b.proto) with grpcio-tools' protoc."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).resolve().parents[1] / "fixtures" / "sparkplug_b.proto"


def generate_bindings(out_dir: Path) -> ModuleType:
    """Compile the published .proto with grpcio-tools' protoc and import the result."""
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out_dir}", PROTO.name])
    assert rc == 0, "protoc failed"
    path = out_dir / "sparkplug_b_pb2.py"
    name = f"sparkplug_b_pb2_{abs(hash(str(out_dir)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
