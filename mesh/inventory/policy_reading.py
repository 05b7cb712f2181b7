"""The pieces every reader of a service policy's fields shares (mesh/inventory/services.py for traffic,
mesh/inventory/authz.py for authorization): a value that could not be read, a mapping with known keys, a single
value through a strict reader, a mapping of names to exact values. It places errors; it must not know any field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from mesh.inventory.located import Located, Problems
from mesh.inventory.values import BadValue, describe
from mesh.suggest import did_you_mean

T = TypeVar("T")
MAX_SUGGESTED = 100  # longer words get no did-you-mean (difflib is quadratic)


class Missing:
    """A field that could not be read (its problem is recorded)."""


MISSING = Missing()


def suggest(word: Any, candidates: tuple[str, ...] | list[str]) -> str | None:
    """did_you_mean for a value of any type: None for non-strings and huge strings."""
    if not isinstance(word, str) or len(word) > MAX_SUGGESTED:
        return None
    return did_you_mean(word, candidates)


def mapping(where: Located, known: tuple[str, ...], what: str, problems: Problems, example: str,
            refused: tuple[str, ...] = ()) -> bool:
    """True when where holds a mapping; its unknown keys are recorded (with a did-you-mean). refused: keys
    known but refused elsewhere (not listed as known)."""
    if not isinstance(where.value, dict):
        problems.at(where, f"expected a mapping such as {example} ({what}), got {describe(where.value)}")
        return False
    for name in where.value:
        if name not in known and name not in refused:
            problems.add_error(where, name, f"unknown {what} key; known keys: {', '.join(known)}",
                               suggest(str(name), known + refused))
    return True


def read_value(where: Located, parse: Callable[[Any], T], problems: Problems) -> T | Missing:
    """parse(where.value), or MISSING after recording what was expected."""
    try:
        return parse(where.value)
    except BadValue as exc:
        problems.at(where, str(exc))
        return MISSING


def read_pairs(where: Located, name: Callable[[Any], str], value: Callable[[Any], str], what: str,
               problems: Problems) -> tuple[tuple[str, str], ...] | Missing:
    """A mapping of header (or cookie) names to exact values, such as {x-canary: "1"}, in the order written."""
    if not isinstance(where.value, dict) or not where.value:
        problems.at(where, f"expected {what} and their exact values, such as {{x-canary: '1'}}, got "
                           f"{describe(where.value)}")
        return MISSING
    found: dict[str, str] = {}
    ok = True
    for key in where.value:
        try:
            named = name(key)
        except BadValue as exc:
            problems.add_error(where, key, str(exc))
            ok = False
            continue
        written = read_value(where.child(key), value, problems)
        if named in found:
            problems.add_error(where, key, f"{named!r} is written twice (names are case-insensitive)")
            ok = False
        elif isinstance(written, Missing):
            ok = False
        else:
            found[named] = written
    return tuple(found.items()) if ok else MISSING
