"""YAML inventories read as ansible-inventory 2.19 reads them (expected values measured with it), and the
mistakes mesh refuses with file, line and key where Ansible skips data silently or fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import InventoryError
from mesh.inventory.listing import list_inventory
from mesh.inventory.loader import load_inventory


def _load(tmp_path: Path, text: str, name: str = "inv.yml"):
    path = tmp_path / name
    path.write_text(text)
    return load_inventory(str(path))


def _refused(tmp_path: Path, text: str) -> InventoryError:
    with pytest.raises(InventoryError) as caught:
        _load(tmp_path, text)
    return caught.value


def test_groups_children_and_ungrouped_as_ansible_lists_them(tmp_path: Path) -> None:
    data = _load(tmp_path, "all:\n  hosts:\n    h0:\n  children:\n    web:\n      hosts:\n        h1: {hv: 1}\n"
                 "        h2:\n      children:\n        app:\n          hosts:\n            h1:\n    db:\n"
                 "      hosts:\n        h3:\n    empty:\n")
    listing = list_inventory(data)
    assert listing["all"] == {"children": ["ungrouped", "web", "db", "empty"]}
    assert listing["web"] == {"hosts": ["h1", "h2"], "children": ["app"]}
    assert listing["ungrouped"] == {"hosts": ["h0"]}
    assert "empty" not in listing
    assert listing["_meta"]["hostvars"] == {"h1": {"hv": 1}}
    assert [w.key for w in data.warnings] == ["empty"]  # a child group with nothing in it


def test_ranges_ports_and_addresses(tmp_path: Path) -> None:
    data = _load(tmp_path, 'all:\n  hosts:\n    "h2:2222":\n    web[01:03:2].x:\n    "[a:c]":\n'
                 '    "10.0.0.1:99":\n    "[::1]:99":\n')
    listing = list_inventory(data)
    assert listing["ungrouped"]["hosts"] == ["h2", "web01.x", "web03.x", "a", "b", "c", "10.0.0.1", "::1"]
    assert listing["_meta"]["hostvars"] == {"h2": {"ansible_port": 2222}, "10.0.0.1": {"ansible_port": 99},
                                            "::1": {"ansible_port": 99}}


def test_yaml_1_1_values_as_ansible_prints_them(tmp_path: Path) -> None:
    data = _load(tmp_path, 'all:\n  hosts:\n    h1:\n      ansible_port: 022\n      d: 2024-01-02\n'
                 '      ts: 2024-01-02 10:00:00\n      f: 1.5e3\n      b: yes\n      sexa: 1:30\n'
                 '      s: "{{ inventory_hostname }}"\n      u: !unsafe "{{ x }}"\n      big: 0x1F\n'
                 '      groups: dropped\n      omit: kept\n')
    hostvars = list_inventory(data)["_meta"]["hostvars"]["h1"]
    assert hostvars == {"ansible_port": 18, "d": "2024-01-02", "ts": "2024-01-02T10:00:00", "f": "1.5e3",
                        "b": True, "sexa": 90, "s": "{{ inventory_hostname }}",
                        "u": {"__ansible_unsafe": "{{ x }}"}, "big": 31, "omit": "kept"}
    (warning,) = data.warnings
    assert (warning.key, warning.origin.line) == ("ansible_port", 4)
    assert "022" in warning.message


def test_empty_hosts_is_an_empty_group_with_a_warning(tmp_path: Path) -> None:
    data = _load(tmp_path, "web:\n  hosts:\n")
    assert "web" not in list_inventory(data)  # Ansible lists no empty group
    (warning,) = data.warnings
    assert (warning.key, warning.origin.line) == ("web.hosts", 2)
    assert "empty" in warning.message


def test_hosts_as_a_lone_name_is_read_as_ansible_does(tmp_path: Path) -> None:
    assert list_inventory(_load(tmp_path, "web:\n  hosts: h1\n"))["web"] == {"hosts": ["h1"]}


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ("all:\n  host:\n    h1:\n", 2, "host", "did you mean 'hosts'"),
        ("all:\n  hosts:\n    - h1\n    - h2\n", 3, "all.hosts", "not a list"),
        ("all:\n  children:\n    web:\n      hosts:\n      h1:\n", 5, "h1", "indent"),
        ("a:\n  children:\n    b:\n      children:\n        a:\n", 3, "b", "loop"),
        ("123:\n  hosts:\n    h1:\n", 1, "123", "text"),
        ("web:\n  hosts:\n    123:\n", 3, "123", "text"),
        ("web: 5\n", 1, "web", "mapping"),
        ("web:\n  vars: [1]\n", 2, "web.vars", "mapping"),
        ("a:\n  vars: {ansible_group_priority: abc}\n", 2, "ansible_group_priority", "integer"),
        ("all:\n  hosts:\n\th1:\n", 3, None, "tab"),
        ("- a\n- b\n", 1, None, "mapping of groups"),
    ],
)
def test_refused_with_line_and_key(tmp_path: Path, text: str, line: int, key: str | None, words: str) -> None:
    error = _refused(tmp_path, text)
    assert error.origin.file.endswith("inv.yml")
    assert error.origin.line == line
    assert error.key == key
    assert words in str(error)


def test_empty_file_refused(tmp_path: Path) -> None:
    assert "empty" in str(_refused(tmp_path, ""))
    assert "empty" in str(_refused(tmp_path, "# only a comment\n"))


def test_duplicate_keys_warn_and_last_wins(tmp_path: Path) -> None:
    data = _load(tmp_path, "all:\n  hosts:\n    h1: {x: 1, x: 2}\n")
    assert list_inventory(data)["_meta"]["hostvars"] == {"h1": {"x": 2}}
    assert [(w.key, w.origin.line) for w in data.warnings] == [("x", 3)]


def test_port_and_address_traps_warn(tmp_path: Path) -> None:
    data = _load(tmp_path, "all:\n  hosts:\n    h1: {ansible_port: 70000}\n    h2: {ansible_host: 'a.b:22'}\n")
    assert sorted(w.key for w in data.warnings if w.key) == ["ansible_host", "ansible_port"]


def test_plugin_key_in_json_refused(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="plugin"):
        _load(tmp_path, '{"plugin": "foo"}', name="inv.json")
