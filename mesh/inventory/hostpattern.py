"""Expands one Ansible host pattern (`web[01:20].example.com:2222`, `[fe80::1]:22`) into host names and a port,
with the same acceptance rules as ansible-core. It owns the pattern's text only; it must not touch inventory data.
"""

# How Ansible reads a pattern (measured against ansible-core 2.19):
# - A port is split off first: `[anything]:PORT`, then `NAME:PORT` where NAME has no ':' outside `[...]`.
# - What is left must look like an IPv4 address, an IPv6 address or a host name, each possibly with ranges;
#   when it does not, the whole pattern (port included) is the host name and there is no port.
# - Any `[` left in the name starts a range `[begin:end]` or `[begin:end:step]`; several ranges multiply.
# - The port is `int()` of the digits (`host:022` is port 22). Ansible sets `ansible_port` from it only when
#   it is not 0 and only when the host is new: callers apply that rule, this module returns the number.
# - A range can expand to no host at all (`web[5:1]`, a negative step); the caller decides how to warn.

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass

from mesh.errors import InventoryError, Origin

# One pattern may not expand to more hosts than this: a typo such as `[0:999999999]` must fail fast.
MAX_HOSTS_PER_PATTERN = 100_000

_DIGITS = "[0-9]+"
_STEP = f"(?::{_DIGITS})?"
_ALNUM_RANGE = rf"\[(?:[a-z]:[a-z]|{_DIGITS}:{_DIGITS}){_STEP}\]"
_HEX_RANGE = rf"\[[0-9a-f]+:[0-9a-f]+{_STEP}\]"

# A label starts with a word character or a range, goes on with word characters, '-' or ranges, and does not
# end in '_' or '-'. Dotted IPv4 addresses (with numeric ranges) are a subset of these names.
_LABEL = rf"(?:\w|{_ALNUM_RANGE})(?:[\w-]|{_ALNUM_RANGE})*(?<![_-])"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*$", re.IGNORECASE)


def _ipv6_regex() -> re.Pattern[str]:
    """IPv6 in full, every '::' form with at most seven groups, and three IPv4-in-IPv6 spellings."""
    group = rf"(?:[0-9a-f]{{1,4}}|{_HEX_RANGE})"
    quad = rf"(?:{group}\.){{3}}{group}"
    forms = [rf"(?:{group}:){{7}}{group}"]
    for left in range(7):
        for right in range(8 - left):
            if right == 7:
                continue
            head = rf"(?:{group}:){{{left}}}" if left else ":"
            tail = rf"(?::{group}){{{right}}}" if right else ":"
            forms.append(head + tail)
    forms += [rf"(?:0:){{6}}{quad}", rf"::(?:ffff:)?{quad}", rf"(?:0:){{5}}ffff:{quad}"]
    return re.compile("(?:" + "|".join(forms) + ")$", re.IGNORECASE)


_IPV6 = _ipv6_regex()
_BRACKETED_PORT = re.compile(rf"\[(.+)\]:({_DIGITS})$")
_NAME_PORT = re.compile(rf"((?:[^:\[\]]|\[[^\]]*\])*):({_DIGITS})$")


@dataclass(frozen=True)
class _Segment:
    """Literal text followed by the values of one range."""

    head: str
    values: list[str]


def expand_host_pattern(pattern: str, origin: Origin) -> tuple[list[str], int | None]:
    """The host names a pattern stands for, in Ansible's order, and its port (None when it has none).

    >>> expand_host_pattern("web[01:03]:2222", Origin("hosts"))
    (['web01', 'web02', 'web03'], 2222)
    """
    name, port = split_port(pattern)
    if "[" not in name:
        return [name], port
    return _expand_ranges(name, pattern, origin), port


def split_port(pattern: str) -> tuple[str, int | None]:
    """The name part and the port of a pattern, or the whole pattern and None when it is not an address."""
    address, port = pattern, None
    try:
        bracketed = _BRACKETED_PORT.match(address)
        if bracketed:
            address, port = bracketed.group(1), int(bracketed.group(2))
        plain = _NAME_PORT.match(address)
        if plain:
            address, port = plain.group(1), int(plain.group(2))
    except ValueError:  # more digits than int() accepts: Ansible then reads the pattern as a bare name
        return pattern, None
    if _HOSTNAME.match(address) or _IPV6.match(address):
        return address, port
    return pattern, None


def _expand_ranges(name: str, pattern: str, origin: Origin) -> list[str]:
    segments: list[_Segment] = []
    rest = name
    total = 1
    while "[" in rest:
        head, body, rest = _cut_range(rest, pattern, origin)
        values = _range_values(body, pattern, origin)
        if not values:
            # Ansible stops here: the text after an empty range is never looked at.
            return []
        total *= len(values)
        _check_size(total, pattern, origin)
        segments.append(_Segment(head, values))
    heads = [segment.head for segment in segments]
    return [
        "".join(itertools.chain.from_iterable(zip(heads, combo))) + rest
        for combo in itertools.product(*(segment.values for segment in segments))
    ]


def _cut_range(text: str, pattern: str, origin: Origin) -> tuple[str, str, str]:
    """Head, range body and tail, cut where Ansible cuts: at the first '[', the first ']' and any '|'."""
    # Ansible turns the first '[' and the first ']' into '|' and splits on '|': a '|' in a name acts as a
    # bracket, and anything but exactly three parts is an error.
    parts = text.replace("[", "|", 1).replace("]", "|", 1).split("|")
    if len(parts) != 3:
        problem = "is not closed with ']'" if "]" not in text else "cannot be read next to a '|' in the name"
        raise InventoryError(origin, f"a host range {problem}", key=pattern,
                             hint="write it as [begin:end] or [begin:end:step]")
    return parts[0], parts[1], parts[2]


def _range_values(body: str, pattern: str, origin: Origin) -> list[str]:
    """The texts a range `begin:end[:step]` stands for: letters or (zero-padded) numbers."""
    bounds = body.split(":")
    if len(bounds) not in (2, 3):
        raise _range_error(f"host range [{body}] must be begin:end or begin:end:step", pattern, origin)
    begin, end = bounds[0] or "0", bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not end:
        raise _range_error(f"host range [{body}] has no end value", pattern, origin)
    width = len(begin) if begin[0] == "0" and len(begin) > 1 else 0
    if width and len(end) != width:
        raise _range_error(
            f"host range [{body}] starts with a zero, so begin and end must have the same number of digits",
            pattern, origin)
    letters = _letter_values(begin, end, step_text, body, pattern, origin)
    if letters is not None:
        return letters
    try:
        numbers = range(int(begin), int(end) + 1, int(step_text))
    except ValueError:
        raise _range_error(f"host range [{body}] needs numbers or single letters, with a non-zero step",
                           pattern, origin) from None
    _check_size(len(numbers), pattern, origin)
    return [str(number).zfill(width) for number in numbers]


def _letter_values(begin: str, end: str, step_text: str, body: str, pattern: str,
                   origin: Origin) -> list[str] | None:
    """Letters from begin to end, or None when this is not a letter range (Ansible then tries numbers)."""
    # Ansible looks the bounds up as substrings of a-zA-Z, so 'y:B' runs y z A B.
    first = string.ascii_letters.find(begin)
    last = string.ascii_letters.find(end)
    if first < 0 or last < 0:
        return None
    if first > last:
        raise _range_error(f"host range [{body}] must have begin <= end", pattern, origin)
    try:
        step = int(step_text)
        return list(string.ascii_letters[first:last + 1:step])
    except ValueError:
        return None


def _check_size(count: int, pattern: str, origin: Origin) -> None:
    if count > MAX_HOSTS_PER_PATTERN:
        raise InventoryError(origin, f"the host pattern expands to more than {MAX_HOSTS_PER_PATTERN} hosts",
                             key=pattern, hint="check the range bounds")


def _range_error(message: str, pattern: str, origin: Origin) -> InventoryError:
    return InventoryError(origin, message, key=pattern, hint="write a range as [01:20], [a:f] or [1:10:3]")
