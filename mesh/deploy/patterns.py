"""Picks a play's hosts from its `hosts:` pattern, as Ansible does: `all`, groups, hosts, wildcards,
`a:b` (or `a,b`) unions, `a:&b` intersections and `a:!b` exclusions. It must not read inventories.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

_SPLIT = re.compile(r"[:,]")


def match_hosts(pattern: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> tuple[list[str],
                                                                                                 list[str]]:
    """The hosts (in the given order) a pattern selects, and the terms that matched nothing."""
    union: set[str] = set()
    intersections: list[set[str]] = []
    exclusions: set[str] = set()
    unknown: list[str] = []
    for raw in _SPLIT.split(pattern):
        term = raw.strip()
        if not term:
            continue
        kind, name = (term[0], term[1:]) if term[0] in "&!" else ("", term)
        found = _term(name, hosts, groups)
        if not found:
            unknown.append(name)
        if kind == "&":
            intersections.append(found)
        elif kind == "!":
            exclusions |= found
        else:
            union |= found
    for other in intersections:
        union &= other
    union -= exclusions
    return [host for host in hosts if host in union], unknown


def _term(name: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> set[str]:
    if name in ("all", "*"):
        return set(hosts)
    if name in groups:
        return set(groups[name]) & set(hosts)
    if name in hosts:
        return {name}
    if any(char in name for char in "*?["):
        found = {host for host in hosts if fnmatch.fnmatchcase(host, name)}
        for group in groups:
            if fnmatch.fnmatchcase(group, name):
                found |= set(groups[group]) & set(hosts)
        return found
    return set()
