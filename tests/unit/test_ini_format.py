"""INI inventories: value typing and errors measured with ansible-inventory 2.19 (as data), the shlex-equal
splitter, warnings, and one live comparison of tests/inventories/ini_cases against the real tool."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InventoryError
from mesh.inventory.data import InventoryData, UnsafeText
from mesh.inventory.ini_format import ini_value, read_ini, split_host_line

CASES = Path(__file__).parent.parent / "inventories" / "ini_cases"

# value text -> (value on a host line `h x=TEXT`, value in a `[g:vars]` line `x=TEXT`); measured.
TYPING: dict[str, tuple[Any, Any]] = {
    "5": (5, 5),
    "022": ("022", "022"),
    "08": ("08", "08"),
    "0x1F": (31, 31),
    "1_000": (1000, 1000),
    "1__0": ("1__0", "1__0"),
    "-0": (0, 0),
    "+4": (4, 4),
    "1.5": (1.5, 1.5),
    "1e3": (1000.0, 1000.0),
    "inf": ("inf", "inf"),
    "yes": ("yes", "yes"),
    "true": ("true", "true"),
    "True": (True, True),
    "None": (None, None),
    "null": ("null", "null"),
    "[1,2]": ([1, 2], [1, 2]),
    "(1,2)": ([1, 2], [1, 2]),
    '{"a":1}': ("{a:1}", {"a": 1}),
    "'quoted'": ("quoted", "quoted"),
    '"5"': (5, "5"),
    "'022'": ("022", "022"),
    "'it''s'": ("its", "its"),
    '"a b"': ("a b", "a b"),
    "a=b": ("a=b", "a=b"),
    "": ("", ""),
    "ünï": ("ünï", "ünï"),
    "a\\b": ("ab", "a\\b"),
    "'a\\nb'": ("a\\nb", "a\nb"),
    "1j": ("1j", "1j"),
    "...": ("...", "..."),
    "abc#x": ("abc", "abc#x"),
    "5#x": (5, 5),
    "'a'b": ("ab", "'a'b"),
    "{{x}}": ("{{x}}", "{{x}}"),
}
# Only in `[g:vars]`: on a host line these split into several words (Ansible refuses the line).
VARS_ONLY: dict[str, Any] = {
    "[1, 2]": [1, 2],
    "{'a': 1}": {"a": 1},
    "a b": "a b",
    "{{ foo }}": "{{ foo }}",
    "abc # comment": "abc # comment",
    "5 # comment": 5,
    "5 ; comment": "5 ; comment",
    "\"x\" 'y'": "xy",
    "[1, 'a', (2, 3)]": [1, "a", [2, 3]],
    "True if 1 else 0": "True if 1 else 0",
}


def _read(text: str) -> InventoryData:
    data = InventoryData()
    read_ini(text, "inv.ini", data)
    return data


@pytest.mark.parametrize("text", sorted(TYPING))
def test_typing_on_host_lines_and_in_vars(text: str) -> None:
    data = _read(f"[g]\nh x={text}\n[g:vars]\nx={text}\n")
    on_host, in_vars = TYPING[text]
    assert data.hosts["h"].vars["x"].value == on_host
    assert data.groups["g"].vars["x"].value == in_vars


@pytest.mark.parametrize("text", sorted(VARS_ONLY))
def test_typing_in_vars_only(text: str) -> None:
    assert _read(f"[g]\nh\n[g:vars]\nx={text}\n").groups["g"].vars["x"].value == VARS_ONLY[text]


@pytest.mark.parametrize("text", ["abc", "True", "None", "if", "_x1", "0", "7", "123456789012345678",
                                  "1234567890123456789", "00", "0_1", "1" * 5000])
def test_fast_paths_agree_with_literal_eval(text: str) -> None:
    import ast
    try:
        expected = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        expected = text
    assert ini_value(text) == expected


def test_bytes_become_unsafe_text() -> None:
    value = ini_value("[b'x']")
    assert value == ["x"] and isinstance(value[0], UnsafeText)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab =#'\"\\\t;é")), max_size=20))
def test_splitter_equals_shlex(line: str) -> None:
    try:
        expected: list[str] | str = shlex.split(line, comments=True)
    except ValueError as error:
        expected = str(error)
    try:
        got: list[str] | str = [token.text for token in split_host_line(line).tokens]
    except ValueError as error:
        got = str(error)
    assert got == expected


def test_origins_of_groups_hosts_and_vars() -> None:
    data = _read("h0\n[web]\n  web[1:2] ansible_port=2222 x=1\n[web:vars]\n  y = 2\n[top:children]\nweb\n")
    assert data.hosts["h0"].origin.line == 1
    assert data.groups["web"].origin.line == 2
    var = data.hosts["web2"].vars["x"]
    assert (var.origin.line, var.origin.column) == (3, 30)
    assert data.hosts["web1"].vars["ansible_port"].value == 2222
    assert (data.groups["web"].vars["y"].origin.line, data.groups["web"].vars["y"].origin.column) == (5, 3)
    assert data.groups["top"].children == ["web"]
    assert data.groups["ungrouped"].hosts == ["h0"]


def test_pattern_port_only_when_new_and_not_zero() -> None:
    data = _read("[a]\nh1:2222 ansible_port=33\nh1:44\nh2:0\nh3:022\n")
    assert data.hosts["h1"].vars["ansible_port"].value == 33
    assert "ansible_port" not in data.hosts["h2"].vars
    assert data.hosts["h3"].vars["ansible_port"].value == 22
    messages = " ".join(str(warning) for warning in data.warnings)
    assert "ignores this port" in messages and "port 0" in messages and "leading zero" in messages


@pytest.mark.parametrize(("text", "needle"), [
    ("[a]\nh1 ansible_port=022\n", "'022' as text"),
    ("[a]\nh1\n[a:vars]\nansible_port=022\n", "'022' as text"),
    ("[a]\nh1 x=a#b\n", "starts a comment"),
    ("[a]\nh1\n[a:vars]\nx=abc # note\n", "trailing comment is part of the value"),
    ("[a]\nh[3:1]\n", "no host at all"),
    ("[a]\nh1 x=1\u2028y=2\n", "U+2028"),
    ("[a]\nh1 v=1.10\n", "read as the number 1.1"),
    ("[a]\nh1 x=1 x=2\n", "already set"),
    ("[a]\nh1 ansible_host=10.0.0.1:22\n", "should not hold a port"),
    ("[a-b]\nh1\n", "valid variable name"),
    ("[a]\nh1 my-var=1\n", "not a valid variable name"),
])
def test_warnings(text: str, needle: str) -> None:
    data = _read(text)
    assert any(needle in str(warning) for warning in data.warnings), data.warnings


# broken case file -> (line, key) of the InventoryError; Ansible refuses every one of these files.
BROKEN: dict[str, tuple[int, str | None]] = {
    "c2_02_hdr_semicolon.ini": (1, "[a] ; comment"),
    "c2_04_empty_type.ini": (1, "[a:]"),
    "c2_09_comments.ini": (5, ";"),
    "c2_12_child_semicolon.ini": (4, "a ; c"),
    "c2_13_child_two.ini": (4, "a b"),
    "c2_14_bom.ini": (1, None),
    "c2_22_child_vars_only.ini": (2, "b"),
    "c2_23_child_all.ini": (4, "all"),
    "c3_02_prio_bad.ini": (4, "ansible_group_priority"),
    "c3_03_setset.ini": (4, "x"),
    "c3_04_setset_host.ini": (2, "x"),
    "c3_05_unhash.ini": (2, "x"),
    "c3_07_unary.ini": (4, "x"),
    "c3_09_keys.ini": (4, "x"),
    "c3_11_trailing_bs.ini": (2, "h1 x=a\\"),
    "c3_17_vault.ini": (1, None),
    "c4_cyc3.ini": (10, "a"),
    "c4_k5.ini": (4, "x"),
    "c4_k6.ini": (4, "x"),
    "c4_k7.ini": (4, "x"),
    "c_01_undef_child.ini": (5, "c"),
    "c_03_vars_undef.ini": (1, "a"),
    "c_05_cycle.ini": (4, "a"),
    "c_06_self.ini": (2, "a"),
    "c_07_badtype.ini": (1, "[a:foo]"),
    "c_08_space.ini": (1, "[a b]"),
    "c_13_novalue.ini": (4, "x"),
    "c_14_hostnoeq.ini": (2, "foo"),
    "c_17_yaml.ini": (2, "---"),
    "c_18_colon.ini": (2, "h1:"),
    "c_19_unclosed.ini": (2, 'h1 x="unclosed'),
}


def test_every_broken_case_is_listed() -> None:
    assert sorted(path.name for path in (CASES / "broken").glob("*.ini")) == sorted(BROKEN)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_cases_are_refused(name: str) -> None:
    path = CASES / "broken" / name
    with pytest.raises(InventoryError) as caught:
        read_ini(path.read_text(encoding="utf-8"), str(path), InventoryData())
    line, key = BROKEN[name]
    assert (caught.value.origin.line, caught.value.key) == (line, key)
    assert len(str(caught.value)) < 400


def test_undefined_child_offers_a_close_group() -> None:
    with pytest.raises(InventoryError, match="did you mean 'webservers'"):
        _read("[webservers]\nh1\n[prod:children]\nwebserver\n")


def test_many_hosts_read_in_linear_time() -> None:
    lines = "\n".join(f"h{i} x={i} y='v{i}' z=name" for i in range(10_000))
    data = _read(lines + "\n")
    assert len(data.hosts) == 10_000


# Imports ansible once, then forks a fresh child per file: ansible-core keeps state between runs in one process.
_DRIVER = """
import contextlib, io, json, os, sys
os.environ['ANSIBLE_INVENTORY_UNPARSED_FAILED'] = 'true'
from ansible.cli.inventory import InventoryCLI
out = {}
for path in sys.argv[1:]:
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
            cli = InventoryCLI(['ansible-inventory', '-i', path, '--list'])
            cli.parse()
            try:
                cli.run()
            except SystemExit:
                pass
        with os.fdopen(write_end, 'w') as pipe:
            pipe.write(buffer.getvalue())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.wait()
    out[path] = json.loads(text) if text.strip() else None
print(json.dumps(out))
"""


def _ansible_lists(paths: list[str], workdir: Path) -> dict[str, Any]:
    """ansible-inventory --list of every path, in one process (every one must parse)."""
    result = subprocess.run([sys.executable, "-c", _DRIVER, *paths], check=False, cwd=workdir, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="true"))
    assert result.returncode == 0, result.stderr[-2000:]
    lists: dict[str, Any] = json.loads(result.stdout)
    return lists


def test_good_cases_list_as_ansible_does(tmp_path: Path) -> None:
    from mesh.inventory.listing import list_inventory
    from mesh.inventory.loader import load_inventory

    paths = sorted(str(path) for path in (CASES / "good").glob("*.ini"))
    expected = _ansible_lists(paths, tmp_path)
    for path in paths:
        theirs = expected[path]
        ours = json.loads(json.dumps(list_inventory(load_inventory(path))))
        for listing in (theirs, ours):
            listing["_meta"].pop("profile", None)
        assert ours == theirs, path
