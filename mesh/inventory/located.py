"""A value together with where it was written and how to name it (`mesh_workloads[1].port`), and the list
of problems one validation pass collects. Owns placing errors; it must not decide what is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mesh.errors import InventoryError, Origin
from mesh.inventory.values import BadValue
from mesh.inventory.yamlfile import Marks

T = TypeVar("T")


@dataclass(frozen=True)
class Located:
    """A (rendered) value, the origin of the text it came from, its dotted key and the marks inside it."""

    value: Any
    origin: Origin
    key: str
    marks: Marks | None = None

    def child(self, step: str | int) -> Located:
        """The value at a dict key or list index, placed at its own line when the marks know it."""
        value = self.value[step]
        key = f"{self.key}[{step}]" if isinstance(step, int) else f"{self.key}.{step}"
        sub = sub_marks(self.marks, step)
        return Located(value, sub.origin if sub is not None else self.origin, key, sub)

    def key_origin(self, name: Any) -> Origin:
        """Where a key of this mapping is written (the mapping itself when unknown)."""
        return self.marks.key_origin(name) if self.marks is not None else self.origin


def sub_marks(marks: Marks | None, step: Any) -> Marks | None:
    """The marks of the value at one key or index, or None when unknown."""
    if marks is None:
        return None
    if isinstance(marks.items, dict):
        return marks.items.get(step)
    if isinstance(marks.items, list) and isinstance(step, int) and 0 <= step < len(marks.items):
        return marks.items[step]
    return None


@dataclass
class Problems:
    """Every error of one pass, in the order found, each reported once."""

    errors: list[InventoryError] = field(default_factory=list)

    def add(self, error: InventoryError) -> None:
        if not any(_same(error, known) for known in self.errors):
            self.errors.append(error)

    def at(self, where: Located, message: str, hint: str | None = None) -> None:
        self.add(InventoryError(where.origin, message, key=where.key, hint=hint))

    def add_error(self, where: Located, name: Any, message: str, hint: str | None = None) -> None:
        """An error about a key of the mapping at where, placed at the key's own line."""
        self.add(InventoryError(where.key_origin(name), message, key=f"{where.key}.{name}", hint=hint))

    def read(self, where: Located, reader: Callable[[Any], T]) -> T | None:
        """reader(value), or None after recording what was expected."""
        try:
            return reader(where.value)
        except BadValue as exc:
            self.at(where, str(exc))
            return None


def _same(one: InventoryError, other: InventoryError) -> bool:
    return (one.origin, one.key, one.message) == (other.origin, other.key, other.message)
