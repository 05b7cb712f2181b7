"""Errors of the playbook runner: a playbook mesh refuses (exit 4), a host it cannot reach (exit 3), a task
that fails on one host. It owns their messages; it must not decide what a playbook or a host is.
"""

from __future__ import annotations

from mesh.errors import EXIT_UNREACHABLE, InventoryError, MeshError


class PlaybookError(InventoryError):
    """A playbook mesh refuses: file, line, key and what was expected (exit 4, as ansible-playbook)."""


class HostUnreachable(MeshError):
    """mesh cannot reach a host: refused, timed out, or an unknown or changed host key (exit 3)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, host: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{host}: {message}", hint)
        self.host = host
        self.detail = message if not hint else f"{message} ({hint})"  # without the host, for `fatal: [host]`


class ModuleFailure(Exception):
    """Raised by a module (or a change it asked for) to fail the task on this host with a message."""

    def __init__(self, message: str, **data: object) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
