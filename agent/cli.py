"""`edge-agent` command line.

Exit codes: 0 ok, 2 configuration error (nothing was started), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.config import Config, ConfigError, load_config
from agent.logs import setup_logging

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

log = structlog.get_logger()


def _load(path: str, *, simulate: bool | None = None) -> Config | None:
    try:
        return load_config(path, simulate=simulate)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"{path}: {n} problem{'s' if n != 1 else ''} found:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    # The same checks as `run` (with or without --simulate) makes before starting.
    config = _load(args.config, simulate=args.simulate)
    if config is None:
        return EXIT_CONFIG
    tags = sum(len(getattr(d, "tags", [])) for d in config.devices)
    print(f"{args.config}: OK ({len(config.devices)} devices, {tags} tags)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime.eventloop import EventLoopUnavailable, loop_factory

    config = _load(args.config, simulate=args.simulate)
    if config is None:
        return EXIT_CONFIG
    try:
        factory, loop_name = loop_factory(args.event_loop)
    except EventLoopUnavailable as exc:
        print(f"edge-agent run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.logging.level, config.logging.format)
    log.info("agent.event_loop", loop=loop_name, choice=args.event_loop)
    return _run_async(
        _run(config, args.config, simulate=args.simulate, grace_s=args.grace_s),
        loop_factory=factory,
    )


async def _run(config: Config, path: str, *, simulate: bool, grace_s: float) -> None:
    from agent.runtime import Agent, run_until_signal
    from agent.simulate import simulators

    if simulate:
        async with simulators(config) as simulated:
            adapt = _keep_simulated_endpoints(config, simulated)
            agent = Agent(
                simulated, grace_s=grace_s, config_path=path, adapt_config=adapt, simulate=True
            )
            await run_until_signal(agent)
    else:
        await run_until_signal(Agent(config, grace_s=grace_s, config_path=path, simulate=False))


def _keep_simulated_endpoints(original: Config, simulated: Config) -> Callable[[Config], Config]:
    """For reloads in simulator mode: the fields simulator mode replaced (endpoints,
    pinned certificates) are replaced the same way in a reloaded config, so a device
    whose entry did not change in the file compares equal and keeps running."""
    before = {d.name: d for d in original.devices}
    replaced: dict[str, dict[str, Any]] = {}
    for dev in simulated.devices:
        old = before[dev.name]
        replaced[dev.name] = {
            k: getattr(dev, k) for k in type(dev).model_fields if getattr(dev, k) != getattr(old, k)
        }

    def adapt(config: Config) -> Config:
        devices = [
            d.model_copy(update=replaced[d.name])
            if replaced.get(d.name) and type(d) is type(before[d.name])
            else d
            for d in config.devices
        ]
        # Shared links the simulator serves (a pty for a serial line): kept as served
        # while the file's link is the one simulated.
        links = {
            name: simulated.links.get(name, link) if original.links.get(name) == link else link
            for name, link in config.links.items()
        }
        return config.model_copy(update={"devices": devices, "links": links})

    return adapt


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.doctor import run

    setup_logging("error")  # the findings are the output; driver warnings would repeat them
    return run(args.config, timeout_s=args.timeout_s)


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _load(args.config, simulate=True)
    if config is None:
        return EXIT_CONFIG
    setup_logging(config.logging.level, config.logging.format)
    return _run_async(_simulate(config))


async def _simulate(config: Config) -> None:
    from agent.runtime import wait_for_signal
    from agent.simulate import simulators
    from drivers.links import link_address

    async with simulators(config) as simulated:
        for device in simulated.devices:
            protocol = getattr(device, "protocol", "?")
            where = device.endpoint_text()
            link = getattr(device, "link", None)
            if isinstance(link, str) and link in simulated.links:
                unit = getattr(device, "unit_id", "?")
                where = f"{link_address(simulated.links[link])} (link {link}, unit {unit})"
            print(f"{device.name}\t{protocol}\t{where}", flush=True)
        await wait_for_signal()


def _run_async(
    coro: Any, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> int:
    code = EXIT_OK
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(coro)
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = EXIT_OK
    except Exception as exc:  # the last line of defence: one clear line, exit 1
        from agent.runtime.supervisor import TaskFailed

        if isinstance(exc, TaskFailed):  # a supervised task kept failing
            log.error("agent.failed", task=exc.task, error=exc.error_text)
        else:
            log.error("agent.failed", error=f"{type(exc).__name__}: {exc}")
        code = EXIT_RUNTIME
    _exit_watchdog(code)
    return code


EXIT_WATCHDOG_S = 10.0


def _exit_watchdog(code: int, limit_s: float = EXIT_WATCHDOG_S) -> None:
    """The agent has stopped and its buffer is closed: the process must now end. If
    anything keeps it alive (a library thread that does not finish, seen once in CI),
    log it with every thread's stack, then exit with `code` anyway, so a service manager
    never waits on a stopped agent."""

    def watchdog() -> None:
        time.sleep(limit_s)
        log.error("agent.exit.stuck", after_s=limit_s, note="thread stacks follow; exiting")
        faulthandler.dump_traceback(file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


def _http_base(path: str) -> str | None:
    """http://host:port of the agent running this config, from its `http:` section.
    Read even from a config that is otherwise invalid (`reload` must reach the agent to
    be told what is wrong with the file)."""
    from agent.config import HttpConfig

    http: HttpConfig | None
    try:
        http = load_config(path).http
    except ConfigError:
        from agent.yamlsafe import YamlProblem, load_yaml

        try:
            data, _, _ = load_yaml(Path(path).read_text(encoding="utf-8"))
            raw = data.get("http") if isinstance(data, dict) else None
            http = HttpConfig.model_validate(raw) if isinstance(raw, dict) else None
        except (OSError, YamlProblem, ValueError):
            http = None
    if http is None:
        print(
            f"{path}: no usable http: section; add one (e.g. `http: {{port: 9108}}`) "
            "so the running agent can be asked",
            file=sys.stderr,
        )
        return None
    if http.port == 0:
        print(f"{path}: http.port is 0 (any free port); set a fixed port", file=sys.stderr)
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.host, http.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{http.port}"


def _http_call(url: str, *, post: bool, timeout_s: float) -> tuple[int, bytes] | None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=b"" if post else None, method="POST" if post else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cannot reach the agent at {url}: {reason} (is it running?)", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    base = _http_base(args.config)
    if base is None:
        return EXIT_CONFIG
    answer = _http_call(f"{base}/api/status", post=False, timeout_s=args.timeout_s)
    if answer is None:
        return EXIT_RUNTIME
    code, body = answer
    if code != 200:
        print(
            f"{base}/api/status answered {code}: {body.decode(errors='replace')}", file=sys.stderr
        )
        return EXIT_RUNTIME
    import orjson

    status = orjson.loads(body)
    sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK if status.get("agent", {}).get("ready") else EXIT_RUNTIME


def cmd_reload(args: argparse.Namespace) -> int:
    if args.pid is not None:
        import os
        import signal

        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"cannot signal process {args.pid}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"sent SIGHUP to {args.pid}; the agent logs config.reloaded or config.reload.failed")
        return EXIT_OK
    base = _http_base(args.config)
    if base is None:
        return EXIT_CONFIG
    answer = _http_call(f"{base}/api/reload", post=True, timeout_s=args.timeout_s)
    if answer is None:
        return EXIT_RUNTIME
    code, body = answer
    import orjson

    try:
        result = orjson.loads(body)
    except orjson.JSONDecodeError:
        print(
            f"{base}/api/reload answered {code}: {body.decode(errors='replace')}", file=sys.stderr
        )
        return EXIT_RUNTIME
    if result.get("ok"):
        for key in ("started", "stopped", "restarted"):
            if result.get(key):
                print(f"{key}: {', '.join(result[key])}")
        print(f"reloaded ({len(result.get('unchanged', []))} devices unchanged)")
        return EXIT_OK
    print("reload refused; the running config stays in effect:", file=sys.stderr)
    for problem in result.get("problems", []):
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.schemas import write_schemas

    out = Path(args.out)
    reference = Path(args.reference) if args.reference else None
    for path in write_schemas(out, reference):
        print(path)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from drivers import registry

    by_protocol: dict[str, list[Any]] = {}
    for device in config.devices:
        by_protocol.setdefault(str(getattr(device, "protocol", "?")), []).append(device)
    for name, devices in by_protocol.items():
        plan = registry.get(name).plan
        if plan is None:
            for device in devices:
                print(f"{device.name}: {name} (no request plan)")
            continue
        try:
            print(plan(devices))
        except ValueError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        # Resources the protocol's devices share (serial lines, gateways): bus time.
        plan_links = registry.get(name).plan_links
        if config.links and plan_links is not None:
            text, warnings = plan_links(dict(config.links), devices)
            if text:
                print(text)
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_protocols(args: argparse.Namespace) -> int:
    from drivers import registry

    for entry in registry.protocols().values():
        caps = ",".join(sorted(entry.capabilities)) or "-"
        print(f"{entry.name}\t{caps}\t{entry.summary}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from agent.publish.watch import watch

    topic = args.topic or _topic_filter(config)
    try:
        return watch(
            config.mqtt,
            topic,
            count=args.count,
            seconds=args.seconds,
            raw=args.raw,
            also=_meta_filters(config),
        )
    except (KeyboardInterrupt, BrokenPipeError):
        return EXIT_OK


def _topic_filter(config: Config) -> str:
    """The filter matching everything this agent publishes (device '+', tag '+')."""
    fields = {
        "agent": config.agent.id,
        "site": config.agent.site,
        "area": config.agent.area,
        "line": config.agent.line,
        "device": "+",
    }
    if config.mqtt.layout == "tag":
        return config.mqtt.topic_tag.format(**fields, tag="+")
    if config.mqtt.layout == "sparkplug" and config.mqtt.sparkplug is not None:
        return f"spBv1.0/{config.mqtt.sparkplug.group_id}/#"
    return config.mqtt.topic.format(**fields)


def _meta_filters(config: Config) -> tuple[str, ...]:
    """Layout compact: the filter of the retained metadata its data needs."""
    if config.mqtt.layout != "compact":
        return ()
    fields = {
        "agent": config.agent.id,
        "site": config.agent.site,
        "area": config.agent.area,
        "line": config.agent.line,
        "device": "+",
        "meta": "+",
    }
    return (config.mqtt.topic_meta.format(**fields),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Reads PLCs over Modbus and OPC UA, buffers on disk, publishes over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="run the agent", description="Run the agent until SIGINT/SIGTERM."
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="also start simulated PLCs serving the configured tags, and poll those",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="on stop, seconds to keep publishing what is buffered (default 10)",
    )
    p.add_argument(
        "--event-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="asyncio",
        help="asyncio (default); uvloop (pip install 'edge-agent[uvloop]'; refused when not "
        "installed); auto: uvloop when installed, else asyncio",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "validate",
        help="check a config file",
        description="Check a config file as `run` does before it starts anything; print "
        "every problem with file:line; exit 0 if valid, 2 if not.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="check it for `run --simulate` (device ports of 0 are then allowed)",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "simulate",
        help="serve only the simulated PLCs of a config",
        description="Start the simulated PLCs of a config (for use with other clients) "
        "and print their endpoints; stop with Ctrl-C.",
    )
    p.add_argument("config", help="YAML config file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "schema",
        help="write the JSON Schemas of the config and the payload",
        description="Write config.schema.json, batch.schema.json and sample.schema.json.",
    )
    p.add_argument("--out", default="schema", help="output folder (default ./schema)")
    p.add_argument("--reference", help="also write the config reference (Markdown) to this file")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "plan",
        help="print the requests each device makes per poll",
        description="Print each device's request plan (for protocols that have one, "
        "e.g. the Modbus block reads made per poll).",
    )
    p.add_argument("config", help="YAML config file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "protocols",
        help="list the protocols this agent speaks",
        description="Print every registered protocol: name<TAB>capabilities<TAB>summary.",
    )
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser(
        "watch",
        help="print what is published to the config's broker",
        description="Subscribe to the config's broker and print arriving messages, one "
        "line per sample.",
    )
    p.add_argument("config", help="YAML config file (its mqtt section is used)")
    p.add_argument("--topic", help="topic filter (default: the agent's topic root + '#')")
    p.add_argument("--count", type=int, default=0, help="stop after N messages")
    p.add_argument("--seconds", type=float, default=0, help="stop after S seconds")
    p.add_argument("--raw", action="store_true", help="print the JSON payloads as they are")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "status",
        help="print the running agent's status (JSON)",
        description="Ask the running agent (through the config's http: endpoint) for its "
        "status and print it as JSON; exit 0 if ready, 1 if not ready or unreachable.",
    )
    p.add_argument("config", help="YAML config file of the running agent")
    p.add_argument("--timeout-s", type=float, default=5.0, help="HTTP timeout (default 5)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "reload",
        help="make the running agent re-read its config",
        description="Make the running agent re-read its config file: only changed devices "
        "restart, the buffer is untouched; an invalid file changes nothing. Goes through "
        "the config's http: endpoint, or sends SIGHUP with --pid.",
    )
    p.add_argument("config", help="YAML config file of the running agent")
    p.add_argument("--pid", type=int, help="send SIGHUP to this process instead of using HTTP")
    p.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout (default 30)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser(
        "doctor",
        help="commissioning check: config, devices, broker and ACL, buffer disk, clock",
        description="Check everything the agent needs from the plant: the config, each "
        "device (connect and one read), the broker (TLS, login, a probe publish on each "
        "topic), the buffer's disk and the clock. One line per check; exit 0 no problem, "
        "1 problems, 2 invalid config.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("--timeout-s", type=float, default=15.0, help="per device and broker (15)")
    p.set_defaults(func=cmd_doctor)

    from agent.deadletter_cli import add_deadletter_commands

    add_deadletter_commands(sub, _load)
    from agent.command.cli import add_write_command

    add_write_command(sub, _load)
    from agent.dataset.cli import add_dataset_commands

    add_dataset_commands(sub, _load)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """The protocols' own commands (`edge-agent opcua browse ...`), from drivers.registry."""
    from drivers import registry

    for entry in registry.protocols().values():
        if entry.add_commands is not None:
            entry.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Logs always go to stderr, so a command's output (browse YAML, plan, status JSON)
    # can be piped; `run` and `simulate` re-apply the config's logging section.
    setup_logging()
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
