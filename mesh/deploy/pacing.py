"""How many hosts a play acts on at once and when a rollout stops, as Ansible's `serial` and
`max_fail_percentage`. It owns reading those values and the arithmetic; it must not run anything.

`serial` is a count (`2`), a percentage of the play's hosts (`"25%"`), or a list of them (`[1, 5, "50%"]`:
batch sizes in order, the last one repeated). 0 or "100%" means every host at once. A percentage is rounded
down, and is at least one host, as in Ansible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_STEP = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


class PacingError(ValueError):
    """A serial or max_fail_percentage value mesh cannot read; the message says what was expected."""


@dataclass(frozen=True)
class Serial:
    """Batch sizes, each a count or a percentage of the play's hosts; the last one repeats."""

    steps: tuple[str, ...]  # "3" or "25%"

    def __str__(self) -> str:
        return ",".join(self.steps)

    @property
    def all_at_once(self) -> bool:
        """0 or 100%: one batch of every host (a play is then paced as if it had no serial)."""
        return all(step in ("0", "100%") for step in self.steps)

    def sizes(self, total: int) -> list[int]:
        """The batch sizes for a play of total hosts (they add up to total)."""
        sizes: list[int] = []
        left, index = total, 0
        while left > 0:
            step = self.steps[min(index, len(self.steps) - 1)]
            size = _size(step, total) or total
            sizes.append(min(size, left))
            left -= sizes[-1]
            index += 1
        return sizes

    def batches(self, hosts: Sequence[T]) -> list[list[T]]:
        """hosts cut into batches, in order."""
        batches, start = [], 0
        for size in self.sizes(len(hosts)):
            batches.append(list(hosts[start:start + size]))
            start += size
        return batches


ALL_AT_ONCE = Serial(("0",))


def _size(step: str, total: int) -> int:
    number, percent = _STEP.match(step).groups()  # type: ignore[union-attr]  # parse_serial checked it
    if not percent:
        return int(number)
    return int(int(number) / 100 * total) or 1


def parse_serial(value: Any) -> Serial:
    """A play's `serial:` (or `--serial`): an int, "N%", a comma-separated list of those, or a YAML list."""
    items: list[Any]
    if isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, str):
        items = [part for part in value.split(",")]
    else:
        items = [value]
    if not items:
        raise PacingError("serial must name at least one batch size")
    steps = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise PacingError(f"serial takes counts and percentages (3, \"25%\"), got {item!r}")
        text = str(item).strip()
        match = _STEP.match(text)
        if match is None:
            raise PacingError(f"serial takes counts and percentages (3, \"25%\"), got {item!r}")
        if match.group(2) and int(match.group(1)) > 100:
            raise PacingError(f"a serial percentage is at most 100%, got {text}")
        steps.append(match.group(1) + match.group(2))
    return Serial(tuple(steps))


def parse_max_fail_percentage(value: Any) -> float:
    """A play's `max_fail_percentage:` (or `--max-fail-percentage`): a number from 0 to 100 ("20%" too)."""
    text = value.strip().removesuffix("%") if isinstance(value, str) else value
    try:
        number = float(text) if not isinstance(text, bool) else -1.0
    except (TypeError, ValueError):
        number = -1.0
    if not 0 <= number <= 100:
        raise PacingError(f"max_fail_percentage is a number from 0 to 100, got {value!r}")
    return number


def exceeds(failed: int, batch_size: int, max_fail_percentage: float | None) -> bool:
    """Whether failed hosts of a batch go over max_fail_percentage (strictly, as Ansible: 0 stops at the first
    failure, 100 never stops)."""
    if max_fail_percentage is None or batch_size == 0:
        return False
    return failed / batch_size * 100 > max_fail_percentage
