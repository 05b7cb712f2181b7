"""Variable precedence and reconciliation as ansible-inventory 2.19 computes them (values measured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import UnknownHostError
from mesh.inventory.listing import host_variables, list_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.resolve import group_depth, host_vars


def _load(tmp_path: Path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_inventory(str(tmp_path / "inv.yml"))


def test_group_vars_all_beats_every_groups_inventory_vars(tmp_path: Path) -> None:
    # Measured: all's vars < other groups' inventory vars < group_vars/all < group_vars/<group>.
    data = _load(tmp_path, {
        "inv.yml": "all:\n  vars: {v: all_inv, a_only: 1}\n  children:\n    web:\n      vars: {v: web_inv, w: web_inv}\n"
                   "      hosts:\n        h1:\n      children:\n        app:\n          vars: {v: app_inv, w: app_inv}\n"
                   "          hosts:\n            h1:\n",
        "group_vars/all.yml": "v: all_gv\n",
        "group_vars/web.yml": "w: web_gv\n",
        "host_vars/h1.yml": "hv: hostvars\n",
    })
    assert host_vars(data, "h1") == {"a_only": 1, "v": "all_gv", "w": "web_gv", "hv": "hostvars"}


def test_depth_then_priority_then_name(tmp_path: Path) -> None:
    data = _load(tmp_path, {"inv.yml": (
        "a:\n  vars: {ansible_group_priority: 10, x: a}\n  hosts: {h1: }\n"
        "b:\n  vars: {x: b}\n  hosts: {h1: }\n"
        "c:\n  vars: {ansible_group_priority: '5', x: c}\n  hosts: {h1: }\n"
        "p:\n  vars: {y: p, z: p}\n  children:\n    q:\n      vars: {y: q}\n      hosts: {h2: }\n"
        "r:\n  vars: {z: r}\n  hosts: {h2: }\n")})
    assert host_vars(data, "h1") == {"x": "a"}
    assert host_vars(data, "h2") == {"y": "q", "z": "r"}  # q is deeper; p and r are equal, r > p by name
    assert (group_depth(data, "all"), group_depth(data, "p"), group_depth(data, "q")) == (0, 1, 2)


def test_later_mapping_replaces_not_merges(tmp_path: Path) -> None:
    data = _load(tmp_path, {"inv.yml": "a:\n  vars: {d: {p: 1}}\n  hosts: {h1: {e: {p: 1}}}\n  children:\n"
                                       "    b:\n      hosts: {h1: {e: {q: 2}}}\nc:\n  children:\n    a:\n"
                                       "      vars: {d: {q: 2}}\n"})
    assert host_vars(data, "h1") == {"d": {"q": 2}, "e": {"q": 2}}
    assert list_inventory(data)["all"] == {"children": ["ungrouped", "c"]}


def test_host_in_a_group_leaves_ungrouped(tmp_path: Path) -> None:
    data = _load(tmp_path, {"inv.yml": "ungrouped:\n  hosts: {h1: , h2: }\nweb:\n  hosts: {h1: }\n"})
    listing = list_inventory(data)
    assert listing["ungrouped"] == {"hosts": ["h2"]}
    assert listing["web"] == {"hosts": ["h1"]}


def test_unknown_host_offers_closest(tmp_path: Path) -> None:
    data = _load(tmp_path, {"inv.yml": "all:\n  hosts: {web1: , web2: , db: }\n"})
    with pytest.raises(UnknownHostError) as caught:
        host_variables(data, "wbe1")
    assert caught.value.exit_code == 5
    assert "web1" in str(caught.value)


def test_ten_thousand_hosts_resolve_fast(tmp_path: Path) -> None:
    import time

    lines = ["all:", "  children:"]
    for g in range(20):
        lines += [f"    g{g}:", f"      vars: {{gv: {g}}}", "      hosts:"]
        lines += [f"        h{g}-{h}: {{ansible_host: 10.0.{g}.{h % 250}}}" for h in range(500)]
    data = _load(tmp_path, {"inv.yml": "\n".join(lines) + "\n", "group_vars/all.yml": "a: 1\n"})
    started = time.perf_counter()
    listing = list_inventory(data)
    assert len(listing["_meta"]["hostvars"]) == 10_000
    assert time.perf_counter() - started < 2
