"""Command line of the benchmarks: `python -m bench run [SCENARIO ...] [--quick]`.

Each scenario prints one JSON line on stdout as soon as it finishes (also appended to
bench/out/results.jsonl); a readable table of all of them follows at the end. Progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.harness import machine
from bench.scenarios import SCENARIOS, Options, run

COLUMNS: tuple[tuple[str, str], ...] = (
    ("scenario", "scenario"),
    ("delivered/s", "delivered_per_s"),
    ("expected/s", "expected_per_s"),
    ("%", "delivered_pct"),
    ("agent CPU %", "agent_cpu_pct"),
    ("CPU s/1M", "agent_cpu_s_per_million"),
    ("RSS MB", "agent_rss_peak_mb"),
    ("e2e p50/p99/max ms", "latency_e2e_ms"),
    ("first s", "first_value_s"),
    ("req/poll (min)", "requests_per_poll"),
    ("missing", "missing"),
    ("dup", "duplicates"),
)


def cell(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    if key.startswith("latency"):
        lat = value or {}
        return "/".join("-" if lat.get(k) is None else f"{lat[k]:g}" for k in ("p50", "p99", "max"))
    if key == "requests_per_poll":
        if value is None:
            return "-"
        return f"{value:g} ({result.get('requests_minimum')})"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: Sequence[dict[str, Any]]) -> str:
    rows = [[title for title, _ in COLUMNS]]
    rows += [[cell(r, key) for _, key in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    extra = []
    for r in results:
        if "drain" in r:
            extra.append(f"{r['scenario']}: drain {orjson.dumps(r['drain']).decode()}")
        extra.append(
            f"{r['scenario']}: simulator {r['simulator_cpu_pct']} %, broker "
            f"{r['broker_cpu_pct']} %, meter {r['meter_cpu_pct']} % of a core; agent latency "
            f"(ts_agent → arrival) p50/p99/max {cell(r, 'latency_agent_ms')} ms"
        )
        for p in r.get("profile", [])[:10]:
            extra.append(
                f"  {p['self_pct']:5.1f} % self {p['incl_pct']:5.1f} % incl  {p['function']}"
            )
    return "\n".join([*lines, "", *extra])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run scenarios (all when none is named)")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="short runs (<= 60 s each), for CI")
    p.add_argument("--profile", action="store_true", help="py-spy profile of the agent")
    p.add_argument("--uvloop", action="store_true", help="run the agent on uvloop")
    p.add_argument(
        "--layout",
        choices=["lean", "compact", "device", "tag"],
        default="lean",
        help="the agent's mqtt.layout (default lean, the agent's default)",
    )
    p.add_argument(
        "--forwarder-max-records",
        type=int,
        metavar="N",
        help="experiment: the agent's forwarder takes at most N records per round",
    )
    p.add_argument(
        "--measure-s",
        type=float,
        metavar="S",
        help="length of the measuring window (default: the scenario's, 60 s; quick: 8 s)",
    )
    p.add_argument("--out", default="bench/out", help="profiles and results.jsonl")
    sub.add_parser("list", help="list the scenarios")
    args = parser.parse_args(argv)
    if args.command == "list":
        for s in SCENARIOS.values():
            print(f"{s.name:<16} {s.description}")
        return 0
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    names = args.scenarios or list(SCENARIOS)
    out = Path(args.out)
    agent_args = (
        ["--forwarder-max-records", str(args.forwarder_max_records)]
        if args.forwarder_max_records
        else []
    )
    opt = Options(
        quick=args.quick,
        profile=args.profile,
        uvloop=args.uvloop,
        layout=args.layout,
        agent_args=agent_args,
        out_dir=out,
        measure_s=args.measure_s,
    )
    results = []
    print(f"# {machine()}", file=sys.stderr)
    for name in names:
        result = run(SCENARIOS[name], opt)
        result["machine"] = machine()
        line = orjson.dumps(result).decode()
        print(line, flush=True)
        with (out / "results.jsonl").open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        results.append(result)
    print(table(results))
    return 0
