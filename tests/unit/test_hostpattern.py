"""Host patterns: measured cases as data, and a differential check against ansible-core's own expansion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InventoryError, Origin
from mesh.inventory.hostpattern import MAX_HOSTS_PER_PATTERN, expand_host_pattern

ORIGIN = Origin("hosts", 3, 1)

# pattern -> (hosts, port), as ansible-core 2.19 reads them
CASES: dict[str, tuple[list[str], int | None]] = {
    "web1": (["web1"], None),
    "web1:2222": (["web1"], 2222),
    "host:022": (["host"], 22),
    "h:0": (["h"], 0),
    "web[01:03]": (["web01", "web02", "web03"], None),
    "web[1:3].example.com:2222": (["web1.example.com", "web2.example.com", "web3.example.com"], 2222),
    "web[08:10]": (["web08", "web09", "web10"], None),
    "web[1:010]": (["web1", "web2", "web3", "web4", "web5", "web6", "web7", "web8", "web9", "web10"], None),
    "web[:2]": (["web0", "web1", "web2"], None),
    "db[a:c]": (["dba", "dbb", "dbc"], None),
    "db[y:B]": (["dby", "dbz", "dbA", "dbB"], None),
    "db[a:f:2]": (["dba", "dbc", "dbe"], None),
    "n[1:10:3]": (["n1", "n4", "n7", "n10"], None),
    "r[1:2]-[a:b]": (["r1-a", "r1-b", "r2-a", "r2-b"], None),
    "web[5:1]": ([], None),
    "web[1:5:-1]": ([], None),
    "web[5:1]x[bad]": ([], None),
    "10.0.0.[1:3]": (["10.0.0.1", "10.0.0.2", "10.0.0.3"], None),
    "10.0.0.1:22": (["10.0.0.1"], 22),
    "fe80::1": (["fe80::1"], None),
    "[fe80::1]:22": (["fe80::1"], 22),
    "fe80::[a:c]": (["fe80::a", "fe80::b", "fe80::c"], None),
    "[foo:22]:33": (["foo"], 22),
    "foo_:22": (["foo_:22"], None),
    "a]1:3[x": (["a1x", "a2x", "a3x"], None),
    "höst:22": (["höst"], 22),
}


@pytest.mark.parametrize("pattern", sorted(CASES))
def test_measured_cases(pattern: str) -> None:
    assert expand_host_pattern(pattern, ORIGIN) == CASES[pattern]


@pytest.mark.parametrize("pattern", [
    "web[1:3", "web[1]", "web[1:2:3:4]", "web[1:]", "web[01:3]", "web[c:a]", "web[a:3]", "web[1:3:0]",
    "web[1:3:]", "web[1:3]|x", "web[bad]", "[fe80::1]",
])
def test_bad_ranges_are_refused_with_key(pattern: str) -> None:
    with pytest.raises(InventoryError) as caught:
        expand_host_pattern(pattern, ORIGIN)
    assert caught.value.key == pattern
    assert caught.value.origin == ORIGIN


def test_huge_range_is_refused_quickly() -> None:
    with pytest.raises(InventoryError, match=str(MAX_HOSTS_PER_PATTERN)):
        expand_host_pattern("h[0:999][0:999][0:999]", ORIGIN)
    with pytest.raises(InventoryError):
        expand_host_pattern("h[0:999999999999]", ORIGIN)


def _ansible_expand(pattern: str) -> tuple[list[str], int | None] | None:
    """ansible-core's own reading (test-only reference), None where Ansible fails."""
    from ansible.errors import AnsibleError
    from ansible.plugins.inventory import BaseInventoryPlugin

    try:
        hosts, port = BaseInventoryPlugin()._expand_hostpattern(pattern)
    except (AnsibleError, ValueError):
        return None
    return list(hosts), port


def _mesh_expand(pattern: str) -> tuple[list[str], int | None] | None:
    try:
        return expand_host_pattern(pattern, ORIGIN)
    except InventoryError:
        return None


PIECES = st.sampled_from([
    "a", "b", "Z", "0", "1", "01", "9", "10", "f", "fe80", "ffff", ":", "::", ".", "-", "_", "[", "]",
    "[1:3]", "[01:03]", "[a:c]", "[0:2:2]", "[a:f]", "[:2]", "[3:1]", "é", "|", "x", "22", "]:",
])


@settings(max_examples=1500, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=8).map("".join))
def test_same_as_ansible(pattern: str) -> None:
    theirs = _ansible_expand(pattern)
    if theirs is not None and len(theirs[0]) > MAX_HOSTS_PER_PATTERN:
        theirs = None  # mesh refuses what Ansible would expand without bound
    assert _mesh_expand(pattern) == theirs


@pytest.mark.parametrize("pattern", [
    "::", "::1", "1::", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1::8", "::ffff:1.2.3.4",
    "0:0:0:0:0:0:1.2.3.4", "0:0:0:0:0:ffff:1.2.3.4", "[::1]:22", "[1:2:3:4:5:6:7:8]:22", "fe80::[0a:0f]",
    "fe80::[a:f]:22", "[fe80::[1:3]]:22", "1.2.3.256", "256.1.1.1:22", "a..b:22", "-a:22", "a-:22", "_a:22",
    "KELVIN\u212a[a:b]", "x[\u212a:b]", "|:0[", "a|b[1:2", "a[1:2]|", "a]1:2|",
])
def test_addresses_same_as_ansible(pattern: str) -> None:
    assert _mesh_expand(pattern) == _ansible_expand(pattern)
