"""Paths as ansible-inventory 2.19 reads them: folders (sorted, ignored names), group_vars/ and host_vars/
in every measured form, no-extension files, dynamic sources (expected values measured with it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.errors import InventoryError, MeshError
from mesh.inventory.listing import list_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.resolve import host_vars


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_vars_folder_forms_and_order(tmp_path: Path) -> None:
    _write(tmp_path, {
        "inv.yml": "web:\n  hosts:\n    h1:\n    h2:\n    h3:\ndb:\n  hosts:\n    h1:\n",
        "group_vars/db": "x: noext\n",
        "group_vars/db.yml": "x: dbyml\ny: dbyml\n",  # shadowed by group_vars/db: Ansible reads one file
        "group_vars/web/a.yml": "a: 1\nord: a\n",
        "group_vars/web/b.yaml": "b: 1\nord: b\n",
        "group_vars/web/c.txt": "c: 1\n",
        "group_vars/web/.h.yml": "h: 1\n",
        "group_vars/web/d~": "tilde: 1\n",
        "group_vars/web/sub/e.yml": "e: 1\nord: sub\n",
        "group_vars/web/sub.d/f.yml": "f: 1\n",
        "group_vars/web/zz": "noext: 1\nord: zz\n",
        "group_vars/web/j.json": '{"j": 1}',
        "host_vars/h1.yml": "",
        "host_vars/h3.yml": "q: 1\n",
    })
    data = load_inventory(str(tmp_path / "inv.yml"))
    web = {"a": 1, "b": 1, "e": 1, "j": 1, "noext": 1, "ord": "zz"}
    assert list_inventory(data)["_meta"]["hostvars"] == {
        "h1": {**web, "x": "noext"}, "h2": web, "h3": {**web, "q": 1}}
    assert any("db.yml" in str(w) for w in data.warnings)


def test_vars_have_file_and_line(tmp_path: Path) -> None:
    from mesh.inventory.resolve import host_vars_with_origins

    _write(tmp_path, {"inv.yml": "all:\n  hosts:\n    h1:\n", "host_vars/h1.yml": "# c\nmesh_x: 1\n"})
    var = host_vars_with_origins(load_inventory(str(tmp_path / "inv.yml")), "h1")["mesh_x"]
    assert var.origin.file.endswith("host_vars/h1.yml") and var.origin.line == 2


def test_list_as_vars_file_refused(tmp_path: Path) -> None:
    _write(tmp_path, {"inv.yml": "all:\n  hosts:\n    h1:\n", "host_vars/h1.yml": "- 1\n"})
    with pytest.raises(InventoryError, match="mapping"):
        load_inventory(str(tmp_path / "inv.yml"))


def test_vars_file_for_no_such_group_warns(tmp_path: Path) -> None:
    _write(tmp_path, {"inv.yml": "web:\n  hosts:\n    h1:\n", "group_vars/webb.yml": "x: 1\n"})
    data = load_inventory(str(tmp_path / "inv.yml"))
    assert host_vars(data, "h1") == {}
    assert any("did you mean 'web'" in str(w) for w in data.warnings)


def test_vault_vars_file_refused(tmp_path: Path) -> None:
    _write(tmp_path, {"inv.yml": "all:\n  hosts:\n    h1:\n",
                      "host_vars/h1.yml": "$ANSIBLE_VAULT;1.1;AES256\n6162\n"})
    with pytest.raises(InventoryError, match="Vault"):
        load_inventory(str(tmp_path / "inv.yml"))


def test_folder_walk_skips_what_ansible_skips(tmp_path: Path) -> None:
    _write(tmp_path, {
        "inv/02.md": "b:\n  hosts: {hb: }\n",
        "inv/05.cfg": "e:\n  hosts: {he: }\n",
        "inv/.04.yml": "d:\n  hosts: {hd: }\n",
        "inv/07": "g:\n  hosts:\n    hg:\n",
        "inv/08.yml": "h:\n  hosts: {hh: }\n",
        "inv/10.retry": "r:\n  hosts: {hr: }\n",
        "inv/sub/x.yml": "s:\n  hosts: {hs: }\n",
        "inv/sub/group_vars/s.yml": "not_read: 1\n",
        "inv/group_vars/s.yml": "k: 1\n",
    })
    listing = list_inventory(load_inventory(str(tmp_path / "inv")))
    assert listing["all"]["children"] == ["ungrouped", "g", "h", "s"]
    assert listing["_meta"]["hostvars"] == {"hs": {"k": 1}}


def test_missing_path_and_empty_folder_refused(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="no such"):
        load_inventory(str(tmp_path / "nope.yml"))
    (tmp_path / "inv").mkdir()
    with pytest.raises(InventoryError, match="no inventory"):
        load_inventory(str(tmp_path / "inv"))


def test_script_read_through_ansible_inventory(tmp_path: Path) -> None:
    script = tmp_path / "dyn.sh"
    script.write_text("#!/bin/sh\necho '{\"web\": {\"hosts\": [\"h1\"], \"vars\": {\"g\": 1, \"x\": \"group\"}}, "
                      "\"_meta\": {\"hostvars\": {\"h1\": {\"x\": 1}}}}'\n")
    script.chmod(0o755)
    _write(tmp_path, {"group_vars/web.yml": "gv: 1\nx: file\n"})
    data = load_inventory(str(script))
    # measured: inventory group vars < group_vars/ < the host's own vars
    assert list_inventory(data)["_meta"]["hostvars"] == {"h1": {"g": 1, "gv": 1, "x": 1}}
    assert list_inventory(data)["web"] == {"hosts": ["h1"]}


def test_no_ansible_for_a_script_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "dyn.sh"
    script.write_text("#!/bin/sh\necho '{}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MeshError, match="ansible-inventory"):
        load_inventory(str(script))


def test_executable_yaml_without_shebang_is_read_as_yaml(tmp_path: Path) -> None:
    _write(tmp_path, {"inv.yml": "web:\n  hosts:\n    h1:\n"})
    os.chmod(tmp_path / "inv.yml", 0o755)
    assert list_inventory(load_inventory(str(tmp_path / "inv.yml")))["web"] == {"hosts": ["h1"]}
