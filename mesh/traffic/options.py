"""The command-line values of `mesh route`, `mesh fault` and `mesh rollout`, read strictly: a split
(`v1=90 v2=10`), an abort (`50%[:503]`), a delay (`2s[:100%]`), a header (`k=v`), rollout steps
(`10,25,50,100`), percentages and durations.

Each returns its value typed or raises UsageError (exit 5) saying what was expected. Pure: it knows neither the
inventory nor Consul (whether a version exists is checked against the inventory elsewhere).
"""

from __future__ import annotations

import itertools
import re

from mesh.errors import UsageError
from mesh.inventory.policy import Abort, Delay, Fault
from mesh.inventory.policy_values import check_header_name, check_header_value, parse_millis, parse_percent
from mesh.inventory.values import BadValue, check_version

Split = tuple[tuple[str, int], ...]

DEFAULT_ABORT_STATUS = 503
DEFAULT_DELAY_PERCENT = 100.0
_WEIGHT = re.compile(r"0|[1-9]\d{0,2}", re.ASCII)
_STATUS = re.compile(r"[1-9]\d{2}", re.ASCII)
_SECONDS = re.compile(r"\d{1,9}(?:\.\d{1,6})?", re.ASCII)
MAX_TEXT = 200  # what an error message repeats of a value


def _shown(text: str) -> str:
    return repr(text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "...")


def parse_split(words: tuple[str, ...] | list[str]) -> Split:
    """`VERSION=WEIGHT` words, weights whole numbers 0-100, each version once, in the order written. Whether the
    versions exist and the weights sum to 100 is check_override's."""
    if not words:
        raise UsageError("no weights given", "write them as VERSION=WEIGHT, e.g. v1=90 v2=10")
    split: list[tuple[str, int]] = []
    for word in words:
        version, equal, weight = word.partition("=")
        if not equal or not _is_version(version.strip()):
            raise UsageError(f"expected VERSION=WEIGHT (e.g. v1=90), got {_shown(word)}")
        if not _WEIGHT.fullmatch(weight.strip()) or int(weight) > 100:
            raise UsageError(f"{version.strip()}: expected a weight from 0 to 100 (a whole number), got "
                             f"{_shown(weight)}")
        if any(version.strip() == seen for seen, _ in split):
            raise UsageError(f"version {version.strip()!r} is given twice")
        split.append((version.strip(), int(weight)))
    return tuple(split)


def _is_version(text: str) -> bool:
    try:
        check_version(text)
    except BadValue:
        return False
    return True


def split_text(split: Split) -> str:
    """`v1=90 v2=10`: how commands print a split (and how `mesh route set` takes it)."""
    return " ".join(f"{version}={weight}" for version, weight in split)


def parse_percent_option(text: str, option: str) -> float:
    """A percentage 0-100 with an optional '%': `1%`, `0.5`, `12.5%`."""
    try:
        return parse_percent(text)
    except BadValue as exc:
        raise UsageError(f"{option}: {exc}") from None


def parse_duration_ms(text: str, option: str, minimum_ms: int = 1) -> int:
    """A duration with units (`250ms`, `2s`, `1m30s`, `1h`), at most 24h, at least minimum_ms, in ms."""
    try:
        millis = parse_millis(text)
    except BadValue as exc:
        raise UsageError(f"{option}: {exc}") from None
    if millis < minimum_ms:
        raise UsageError(f"{option}: expected at least {minimum_ms} ms, got {_shown(text)}")
    return millis


def parse_seconds(text: str, option: str, maximum: float) -> float:
    """Seconds from 0 to maximum: a number (`60`, `2.5`) or a duration with units (`90s`, `2m`)."""
    stripped = text.strip()
    if _SECONDS.fullmatch(stripped):
        seconds = float(stripped)
    else:
        try:
            seconds = parse_millis(stripped) / 1000
        except BadValue:
            raise UsageError(f"{option}: expected seconds (60, 2.5) or a duration (90s, 2m), got "
                             f"{_shown(text)}") from None
    if seconds > maximum:
        raise UsageError(f"{option}: expected at most {maximum:g} seconds, got {_shown(text)}")
    return seconds


def parse_abort(text: str) -> Abort:
    """`PERCENT%[:STATUS]`: that share of requests answered with STATUS (default 503) by the caller's Envoy."""
    percent, colon, status = text.partition(":")
    if not percent.strip().endswith("%"):
        raise UsageError(f"--abort: expected PERCENT%[:STATUS] such as 50% or 10%:500, got {_shown(text)}")
    share = parse_percent_option(percent, "--abort")
    code = DEFAULT_ABORT_STATUS
    if colon:
        if not _STATUS.fullmatch(status.strip()) or not 200 <= int(status) <= 599:
            raise UsageError(f"--abort: expected an HTTP status from 200 to 599 after ':', got {_shown(status)}")
        code = int(status)
    return Abort(status=code, percent=share)


def parse_delay(text: str) -> Delay:
    """`DURATION[:PERCENT%]`: that share of requests (default all) held DURATION by the caller's Envoy."""
    duration, colon, percent = text.partition(":")
    millis = parse_duration_ms(duration, "--delay")
    share = DEFAULT_DELAY_PERCENT
    if colon:
        if not percent.strip().endswith("%"):
            raise UsageError(f"--delay: expected DURATION[:PERCENT%] such as 2s or 500ms:10%, got {_shown(text)}")
        share = parse_percent_option(percent, "--delay")
    return Delay(duration_ms=millis, percent=share)


def parse_header(text: str) -> tuple[str, str]:
    """`NAME=VALUE`: a header a request must carry (exact value) to be touched by the fault."""
    name, equal, value = text.partition("=")
    if not equal:
        raise UsageError(f"--header: expected NAME=VALUE such as x-test=1, got {_shown(text)}")
    try:
        return check_header_name(name.strip()), check_header_value(value)
    except BadValue as exc:
        raise UsageError(f"--header: {exc}") from None


def parse_fault(abort: str | None, delay: str | None, headers: tuple[str, ...] | list[str]) -> Fault:
    """The fault of `mesh fault set`: an abort, a delay or both, optionally only for requests with the headers."""
    if abort is None and delay is None:
        raise UsageError("give --abort, --delay or both", "e.g. mesh fault set api --abort 50%")
    pairs = [parse_header(header) for header in headers]
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--header: {', '.join(twice)} given twice (a request must carry every header given)")
    return Fault(abort=parse_abort(abort) if abort is not None else None,
                 delay=parse_delay(delay) if delay is not None else None, when_headers=tuple(pairs))


def parse_steps(text: str) -> tuple[int, ...]:
    """`10,25,50,100`: the new version's shares, whole percentages 1-100, increasing, the last 100."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 100 or not all(_WEIGHT.fullmatch(part) for part in parts):
        raise UsageError(f"--steps: expected whole percentages separated by commas, such as 10,25,50,100, got "
                         f"{_shown(text)}")
    steps = tuple(int(part) for part in parts)
    if not all(1 <= step <= 100 for step in steps):
        raise UsageError(f"--steps: every step is a percentage from 1 to 100, got {_shown(text)}")
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        raise UsageError(f"--steps: each step must be larger than the one before, got {_shown(text)}")
    if steps[-1] != 100:
        raise UsageError(f"--steps: the last step must be 100 (the new version takes all traffic), got "
                         f"{_shown(text)}")
    return steps
