"""Random inventories (YAML and INI, groups with acyclic children, host ranges, typed and nested vars,
group_vars/host_vars files and folders): `mesh inventory list` must equal `ansible-inventory --list`.

Each example is a batch of inventories so the reference runs four at a time; shrinking is off (one step
would cost seconds), and a failure prints the files of the inventory that differs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from inventory_reference import WORKERS, Sandbox, compare_list

BATCH = 5  # inventories per example: Ansible reads them four at a time while mesh reads them in-process
# BATCH * EXAMPLES inventories in all; MESH_HYPOTHESIS_EXAMPLES=50 for a longer hunt.
EXAMPLES = int(os.environ.get("MESH_HYPOTHESIS_EXAMPLES", "5"))

GROUPS = [f"g{i}" for i in range(6)]
HOSTS = [f"h{i}" for i in range(8)] + ["web[1:3]", "db[01:03]", "r[a:c]x", "n[0:6:3]"]
KEYS = ["v0", "v1", "v2", "port_x", "shared", "deep"]

# Scalars written bare in YAML, so the YAML 1.1 rules decide their type.
YAML_RAW = ["yes", "no", "on", "off", "True", "FALSE", "y", "022", "0x1F", "1_000", "1:20", "2024-01-15",
            "~", "null", "1e3", "1.0e+3", "-7", "+3", "0.5", ".inf", "hello", "a b", "1.10", "0o17"]
# Values written bare in INI, where Ansible's literal rules (host lines) or its :vars rules decide.
INI_RAW = ["1", "-2", "1.5", "True", "false", "yes", "hello", '"a b"', "'x y'", "[1,2]", "[1,'a']",
           "{'k':1}", "022", "0x1F", "None", '""', "1_000", "1e3", "http://x:80/", "a=b", '"42"']

text = st.text(alphabet="abcxyz -_.:/é", min_size=0, max_size=8)
scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
    text,
    st.sampled_from(YAML_RAW).map(lambda raw: Raw(raw)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "c", "1"]), inner, max_size=3),
    ),
    max_leaves=6,
)
var_maps = st.dictionaries(st.sampled_from(KEYS), values, max_size=3)
ini_var_maps = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(INI_RAW), max_size=3)


@dataclass(frozen=True)
class Raw:
    """A scalar written into YAML as it is (unquoted)."""

    text: str


@dataclass
class Inventory:
    fmt: str
    groups: dict[str, dict[str, Any]]
    ungrouped: dict[str, Any]
    all_vars: dict[str, Any]
    inline: bool = False  # YAML: write each group under its first parent instead of under all.children
    group_files: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    host_files: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    fmt = draw(st.sampled_from(["yaml", "ini"]))
    vmaps = ini_var_maps if fmt == "ini" else var_maps
    names = draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=5, unique=True))
    names.sort()
    groups: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        later = names[i + 1:]  # children only point forward: no cycles
        groups[name] = {
            "hosts": draw(st.dictionaries(st.sampled_from(HOSTS), vmaps, max_size=3)),
            "children": draw(st.lists(st.sampled_from(later), unique=True, max_size=2)) if later else [],
            "vars": draw(vmaps),
        }
        priority = draw(st.one_of(st.none(), st.integers(1, 4)))
        if priority is not None:
            groups[name]["vars"]["ansible_group_priority"] = priority if fmt == "yaml" else str(priority)
    ungrouped = draw(st.dictionaries(st.sampled_from(HOSTS), vmaps, max_size=2))
    inv = Inventory(fmt, groups, ungrouped, draw(vmaps), inline=fmt == "yaml" and draw(st.booleans()))
    plain = [h for g in groups.values() for h in g["hosts"] if "[" not in h] + [h for h in ungrouped if "[" not in h]
    kinds = st.sampled_from([".yml", ".yaml", ".json", "", "/"])
    for group in draw(st.lists(st.sampled_from(["all", *names]), unique=True, max_size=2)):
        inv.group_files[group] = (draw(kinds), draw(var_maps))
    if plain:
        for host in draw(st.lists(st.sampled_from(plain), unique=True, max_size=2)):
            inv.host_files[host] = (draw(kinds), draw(var_maps))
    return inv


def yaml_value(value: Any) -> str:
    """Flow-style YAML text of a value; Raw scalars unquoted, strings double-quoted (JSON's quoting)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if "e" in repr(value) and "." in repr(value) else json.dumps(value)
    return json.dumps(value)


def json_value(value: Any) -> Any:
    """The same value with Raw scalars as strings (JSON files have no YAML 1.1 typing)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def yaml_map(mapping: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}{json.dumps(k)}: {yaml_value(v)}" for k, v in mapping.items()]


def render_yaml(inv: Inventory) -> str:
    lines = ["all:"]
    if inv.all_vars:
        lines += ["  vars:", *yaml_map(inv.all_vars, 4)]
    if inv.ungrouped:
        lines.append("  hosts:")
        for host, hvars in inv.ungrouped.items():
            lines += [f"    {host}:", *yaml_map(hvars, 6)]
    parent_of: dict[str, str] = {}
    if inv.inline:
        for name, group in inv.groups.items():
            for child in group["children"]:
                parent_of.setdefault(child, name)

    def group_lines(name: str, indent: int) -> list[str]:
        pad, group = " " * indent, inv.groups[name]
        out = [f"{pad}{name}:"]
        if group["hosts"]:
            out.append(f"{pad}  hosts:")
            for host, hvars in group["hosts"].items():
                out += [f"{pad}    {host}:", *yaml_map(hvars, indent + 6)]
        if group["children"]:
            out.append(f"{pad}  children:")
            for child in group["children"]:
                if parent_of.get(child) == name:
                    out += group_lines(child, indent + 4)
                else:
                    out.append(f"{pad}    {child}:")
        if group["vars"]:
            out += [f"{pad}  vars:", *yaml_map(group["vars"], indent + 4)]
        return out

    lines.append("  children:")
    for name in inv.groups:
        if name not in parent_of:
            lines += group_lines(name, 4)
    return "\n".join(lines) + "\n"


def render_ini(inv: Inventory) -> str:
    def host_line(host: str, hvars: dict[str, str]) -> str:
        return " ".join([host, *(f"{k}={v}" for k, v in hvars.items())])

    lines = [host_line(h, v) for h, v in inv.ungrouped.items()]
    if inv.all_vars:
        lines += ["", "[all:vars]", *(f"{k}={v}" for k, v in inv.all_vars.items())]
    for name, group in inv.groups.items():
        lines += ["", f"[{name}]", *(host_line(h, v) for h, v in group["hosts"].items())]
        if group["children"]:
            lines += ["", f"[{name}:children]", *group["children"]]
        if group["vars"]:
            lines += ["", f"[{name}:vars]", *(f"{k}={v}" for k, v in group["vars"].items())]
    return "\n".join(lines) + "\n"


def write_vars(folder: Path, name: str, kind: str, data: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "/":  # a folder of two files; the second one read wins
        keys = list(data)
        write_vars(folder / name, "10-first", ".yml", {k: data[k] for k in keys[: len(keys) // 2 + 1]})
        write_vars(folder / name, "20-second", ".yaml", {k: data[k] for k in keys[len(keys) // 2:]})
    elif kind == ".json":
        (folder / f"{name}.json").write_text(json.dumps(json_value(data)))
    else:
        body = "\n".join(yaml_map(data, 0)) + "\n" if data else "{}\n"
        (folder / f"{name}{kind}").write_text(body)


def write(inv: Inventory, root: Path) -> Path:
    root.mkdir(parents=True)
    path = root / ("hosts.yaml" if inv.fmt == "yaml" else "hosts.ini")
    path.write_text(render_yaml(inv) if inv.fmt == "yaml" else render_ini(inv))
    for group, (kind, data) in inv.group_files.items():
        write_vars(root / "group_vars", group, kind, data)
    for host, (kind, data) in inv.host_files.items():
        write_vars(root / "host_vars", host, kind, data)
    return path


def show(root: Path) -> str:
    return "\n".join(f"--- {p.relative_to(root)}\n{p.read_text()}" for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(inventories(), min_size=BATCH, max_size=BATCH))
def test_random_inventories_list_like_ansible(sandbox: Sandbox, batch: list[Inventory]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mesh-hyp-"))
    try:
        paths = [write(inv, workdir / f"inv{i}") for i, inv in enumerate(batch)]
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(sandbox.ansible_list, p) for p in paths]
            meshes = [sandbox.mesh_inprocess("inventory", "list", str(p)) for p in paths]
            references = [f.result() for f in futures]
        read = [r.returncode == 0 for r in references]
        assert any(read), "Ansible read none of the batch: the generator makes broken inventories\n" + "\n".join(
            r.stderr[-500:] for r in references
        )
        for i, path in enumerate(paths):
            reference, mesh = references[i], meshes[i]
            if not read[i]:
                continue  # not an inventory Ansible reads; the broken corpus covers refusals
            assert "Traceback" not in mesh.stderr, mesh.describe()
            diff = compare_list(reference, mesh)
            assert not diff, "mesh inventory list differs from ansible-inventory --list:\n" + "\n".join(diff) + (
                f"\n\nthe inventory:\n{show(path.parent)}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
