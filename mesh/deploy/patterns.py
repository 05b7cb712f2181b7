"""Picks hosts from an Ansible host pattern, for a play's `hosts:` and for `--limit`: `all`, groups, hosts,
wildcards, `~regex`, subscripts (`web[0]`, `web[1:3]`, `web[-1]`), `a:b` (or `a,b`) unions, `a:&b`
intersections, `a:!b` exclusions, and in --limit `@FILE` (a retry file: one pattern per line). It must not
read inventories.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence

from mesh.deploy import retry

# a term: characters other than whitespace, `:` and brackets, or a whole bracketed subscript (`web[1:3]`)
_TERM = re.compile(r"(?:[^\s:\[\]]|\[[^\]]*\])+")
_SUBSCRIPT = re.compile(r"^(.+)\[(?:(-?\d+)|(-?\d+):(-?\d+)?)\]$")
_SPECIAL = (".", "?", "*", "[")


def split_pattern(pattern: str) -> list[str]:
    """The terms of a pattern as Ansible splits them: at `,`, then at `:` outside a `[...]` subscript."""
    return [term for part in pattern.split(",") for term in _TERM.findall(part)]


def match_hosts(pattern: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> tuple[list[str],
                                                                                                 list[str]]:
    """The hosts (in the given order) a pattern selects, and the terms that matched nothing."""
    return match_terms(split_pattern(pattern), hosts, groups)


def limit_hosts(limit: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]],
                read_file: Callable[[str], list[str]] = retry.read_hosts) -> tuple[list[str], list[str]]:
    """What `--limit` selects: a pattern whose `@PATH` terms are replaced by the lines of that file (as
    Ansible's --limit @retry-file); the terms that matched nothing."""
    terms: list[str] = []
    for term in split_pattern(limit):
        if term.startswith("@"):
            terms += [line for line in read_file(term[1:]) if line]
        else:
            terms.append(term)
    if not terms:  # an empty retry file limits to no host (as Ansible), not to all of them
        return [], []
    return match_terms(terms, hosts, groups)


def match_terms(terms: Sequence[str], hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> tuple[
        list[str], list[str]]:
    """Ansible's evaluation: unions first, then `&` intersections, then `!` exclusions; with only `&` and `!`
    terms, they apply to `all`."""
    union: set[str] = set()
    intersections: list[set[str]] = []
    exclusions: set[str] = set()
    unknown: list[str] = []
    plain = [term for term in terms if term[0] not in "&!"]
    for term in plain or ["all"]:
        found = _term(term, hosts, groups)
        if not found:
            unknown.append(term)
        union |= found
    for term in terms:
        if term[0] not in "&!":
            continue
        found = _term(term[1:], hosts, groups)
        if not found:
            unknown.append(term[1:])
        if term[0] == "&":
            intersections.append(found)
        else:
            exclusions |= found
    for other in intersections:
        union &= other
    union -= exclusions
    return [host for host in hosts if host in union], unknown


def _term(name: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> set[str]:
    if name in hosts:
        return {name}
    subscript = _SUBSCRIPT.match(name) if not name.startswith("~") else None
    if subscript is not None:
        found = _matches(subscript.group(1), hosts, groups)
        ordered = [host for host in _group_order(subscript.group(1), hosts, groups) if host in found]
        return set(_subscript(ordered, subscript.group(2), subscript.group(3), subscript.group(4)))
    return _matches(name, hosts, groups)


def _matches(name: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> set[str]:
    """A group's hosts, or hosts and groups matching a wildcard or `~regex` (hosts also when a group matched
    and the name looks like a host name or a pattern, as Ansible does)."""
    if name in ("all", "*"):
        return set(hosts)
    matcher = _matcher(name)
    matching_groups = [group for group in groups if matcher(group)]
    found = {host for group in matching_groups for host in groups[group]} & set(hosts)
    if not matching_groups or name.startswith("~") or any(char in name for char in _SPECIAL):
        found |= {host for host in hosts if matcher(host)}
    return found


def _matcher(name: str) -> Callable[[str], bool]:
    try:
        expression = re.compile(name[1:]) if name.startswith("~") else re.compile(fnmatch.translate(name))
    except re.error:
        return lambda candidate: candidate == name
    return lambda candidate: expression.match(candidate) is not None


def _group_order(name: str, hosts: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """A subscript counts in the group's order (mesh's: the inventory's order of its hosts)."""
    return list(groups[name]) if name in groups else list(hosts)


def _subscript(hosts: list[str], index: str | None, start: str | None, end: str | None) -> list[str]:
    """`[i]` one host, `[a:b]` a to b inclusive, `[a:]` from a on (Ansible's, negative indexes too)."""
    if index is not None:
        position = int(index)
        return [hosts[position]] if -len(hosts) <= position < len(hosts) else []
    first, last = int(start or 0), (int(end) if end is not None else -1)
    if last == -1:
        last = len(hosts) - 1
    return hosts[first:last + 1]
