"""Errors a user can cause, each with a message for humans and the exit code of ansible-playbook's table.

Bugs are not here: they still raise as ordinary exceptions and end with exit code 250.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_HOST_FAILED = 2
EXIT_UNREACHABLE = 3
EXIT_PARSE_ERROR = 4
EXIT_USAGE = 5
EXIT_INTERRUPTED = 99
EXIT_UNEXPECTED = 250


class Origin(NamedTuple):
    """Where a value was written: file, 1-based line and column (None when unknown).

    A named tuple rather than a dataclass: an inventory of 10,000 hosts makes hundreds of thousands of them.
    """

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where


class MeshError(Exception):
    """An error the user can fix; the CLI prints it without a traceback and exits with exit_code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MeshError):
    """Bad options or arguments on the command line."""

    exit_code = EXIT_USAGE


class InventoryError(MeshError):
    """An inventory mesh refuses: names the file, line, column and key, and what was expected."""

    exit_code = EXIT_PARSE_ERROR

    def __init__(self, origin: Origin, message: str, key: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.origin = origin
        self.key = key

    def __str__(self) -> str:
        text = f"{self.origin}: "
        if self.key is not None:
            text += f"{self.key}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class UnknownHostError(MeshError):
    """A host name the inventory does not have (exit 5, as ansible-inventory --host exits)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class InventoryWarning:
    """Something Ansible reads, but almost surely not as meant: `list` and `host` warn, `check` refuses."""

    origin: Origin
    message: str
    key: str | None = None

    def __str__(self) -> str:
        text = f"{self.origin}: "
        if self.key is not None:
            text += f"{self.key}: "
        return text + self.message

    def as_error(self) -> InventoryError:
        return InventoryError(self.origin, self.message, key=self.key)


class InventoryErrors(MeshError):
    """Several inventory errors found in one pass; reported together, exit 4."""

    exit_code = EXIT_PARSE_ERROR

    def __init__(self, errors: list[InventoryError]) -> None:
        super().__init__(f"{len(errors)} error(s) in the inventory")
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)
