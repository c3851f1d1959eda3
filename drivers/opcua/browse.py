"""Browse an OPC UA server's address space for variables, and print them as a table or
as a `tags:` section ready to paste into a device config.

The connection goes through OpcUaDriver.connect(), so browsing obeys the same security
rules as reading: the same endpoint selection, the same trust check of the server
certificate, the same refusal to send a password in clear text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import yaml
from asyncua import ua
from asyncua.common.node import Node
from asyncua.ua.object_ids import ObjectIds

from drivers.base import Value
from drivers.opcua.config import OpcUaDevice, ScalarTypeName
from drivers.opcua.driver import OpcUaDriver, convert_value, quality_of

_SCALAR_TYPES = set(get_args(ScalarTypeName))


@dataclass(frozen=True, slots=True)
class BrowsedVariable:
    """One variable node found by `browse`."""

    node_id: str
    browse_path: str
    data_type: str
    value: Value | None
    quality: str
    is_array: bool


def _device(endpoint: str, options: dict[str, Any]) -> OpcUaDevice:
    data: dict[str, Any] = {
        "name": "browse",
        "protocol": "opcua",
        "endpoint": endpoint,
        "tags": [{"name": "server_state", "node_id": "i=2259"}],
    }
    data.update({k: v for k, v in options.items() if v is not None})
    return OpcUaDevice.model_validate(data)


async def browse(
    endpoint: str,
    root: str = "i=85",
    depth: int = 3,
    progress: Callable[[int, int], None] | None = None,
    **security: Any,
) -> list[BrowsedVariable]:
    """Every variable below `root` (a node id; default Objects) down to `depth` levels.

    `security` takes the OpcUaDevice fields security_policy, security_mode, username,
    password, cert_dir, server_certificate_thumbprint, application_uri, timeout_s.
    `progress(nodes_seen, variables_found)` is called after each node (a large server
    takes minutes; the CLI shows it on a terminal).
    Raises DriverUnavailable / DriverConfigError like the driver's connect().
    """
    driver = OpcUaDriver(_device(endpoint, security))
    await driver.connect()
    try:
        client = driver._client
        assert client is not None
        start = client.get_node(root)
        path = await start.get_path(as_string=True)
        prefix = [str(p) for p in path if str(p) != "0:Root"]
        out: list[BrowsedVariable] = []
        await _walk(start, prefix, depth, out, set(), progress)
        return out
    finally:
        await driver.close()


async def _walk(
    node: Node,
    path: list[str],
    depth: int,
    out: list[BrowsedVariable],
    seen: set[str],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    if depth <= 0:
        return
    for child in await node.get_children(refs=ObjectIds.HierarchicalReferences):
        key = child.nodeid.to_string()
        if key in seen:
            continue
        seen.add(key)
        if progress is not None:
            progress(len(seen), len(out))
        name = await child.read_browse_name()
        child_path = [*path, f"{name.NamespaceIndex}:{name.Name}"]
        node_class = await child.read_node_class()
        if node_class == ua.NodeClass.Variable:
            out.append(await _variable(child, child_path))
        elif node_class == ua.NodeClass.Object:
            await _walk(child, child_path, depth - 1, out, seen, progress)


async def _variable(node: Node, path: list[str]) -> BrowsedVariable:
    dtype_id = await node.read_data_type()
    dtype: str
    try:
        dtype = str((await Node(node.session, dtype_id).read_browse_name()).Name)
    except Exception:
        dtype = str(dtype_id.to_string())
    dv = await node.read_data_value(raise_on_bad_status=False)
    code = int(dv.StatusCode.value) if dv.StatusCode is not None else 0
    quality, _, _ = quality_of(code)
    raw = dv.Value.Value if dv.Value is not None else None
    try:
        value = convert_value(raw)
    except Exception:
        value = None
    return BrowsedVariable(
        node_id=node.nodeid.to_string(),
        browse_path="/".join(path),
        data_type=str(dtype),
        value=value,
        quality=quality,
        is_array=isinstance(raw, list),
    )


def to_table(found: Sequence[BrowsedVariable]) -> str:
    """A plain text table: node id, browse path, data type, value."""
    rows = [("NODE ID", "BROWSE PATH", "TYPE", "VALUE")]
    for v in found:
        shown = repr(v.value) if v.quality == "good" else f"({v.quality})"
        dtype = f"{v.data_type}[]" if v.is_array else v.data_type
        rows.append((v.node_id, v.browse_path, dtype, shown[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
        for r in rows
    )


def _tag_name(path: str, used: set[str]) -> str:
    parts = [p.split(":", 1)[-1] for p in path.split("/")[-2:]]
    base = re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(parts)).strip("_").lower() or "tag"
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def to_yaml(found: Sequence[BrowsedVariable]) -> str:
    """A `tags:` section (node ids, the browse path as description, the simulator type)."""
    used: set[str] = set()
    tags: list[dict[str, Any]] = []
    for v in found:
        tag: dict[str, Any] = {
            "name": _tag_name(v.browse_path, used),
            "node_id": v.node_id,
            "description": v.browse_path,
        }
        if v.data_type in _SCALAR_TYPES:
            tag["type"] = v.data_type
        if v.is_array and isinstance(v.value, list) and v.value and "type" in tag:
            tag["array_length"] = len(v.value)
        tags.append(tag)
    return yaml.safe_dump({"tags": tags}, sort_keys=False, allow_unicode=True)
