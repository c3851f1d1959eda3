"""Prototype measurement: memory and time of loading a large config (10 devices × 1,000
tags, the modbus-wide agent config, 1.3 MB), as the agent does it and alternatives.

    .venv/bin/python -m bench.proto_config_load

Each variant runs in a fresh interpreter (so RSS figures do not mix) and prints the RSS
after importing the agent, after loading, and the peak:
- `load_config`: `agent.config.load_config` (yamlsafe: pure-Python composer keeping a
  line per node, then pydantic);
- `compose-py` / `compose-c`: only `yaml.compose` of the text, with PyYAML's Python
  SafeLoader vs. libyaml's CSafeLoader (what the composing step alone costs);
- `pydantic-only`: the same data parsed as JSON, then `Config.model_validate` (the floor
  any YAML loader adds to).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import gc, sys, time
from pathlib import Path
def rss():
    d = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(line.split()[1]) // 1024
    return d
import agent.cli, agent.runtime, drivers.modbus.driver  # noqa: F401
import orjson, yaml
from agent.config import Config, load_config
path = Path(sys.argv[2])
base = rss()["VmRSS"]
t0 = time.perf_counter()
variant = sys.argv[1]
if variant == "load_config":
    kept = load_config(path)
elif variant == "compose-py":
    kept = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
elif variant == "compose-c":
    kept = yaml.compose(path.read_text(), Loader=yaml.CSafeLoader)
else:
    kept = Config.model_validate(orjson.loads(path.read_bytes()))
elapsed = time.perf_counter() - t0
gc.collect()
r = rss()
print(f"{variant:<13} {elapsed:6.2f} s  RSS {base} -> {r['VmRSS']} MB (peak {r['VmHWM']} MB)")
"""


def main() -> None:
    from bench.scenarios import SCENARIOS, modbus_devices, write_config

    with tempfile.TemporaryDirectory(prefix="bench-proto-config-") as tmp:
        path = Path(tmp) / "wide.yaml"
        write_config(path, modbus_devices(SCENARIOS["modbus-wide"], None), Path(tmp) / "b", 1)
        print(f"config: {path.stat().st_size / 1e6:.1f} MB, 10,000 tags")
        for variant in ("load_config", "compose-py", "compose-c", "pydantic-only"):
            subprocess.run([sys.executable, "-c", CHILD, variant, str(path)], check=True)


if __name__ == "__main__":
    main()
