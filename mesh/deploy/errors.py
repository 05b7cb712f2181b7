"""Errors of the playbook runner: a playbook mesh refuses (exit 4), a task that fails on one host (a host mesh
cannot reach is the hosts layer's: mesh.hosts.errors). It owns their messages; it must not decide what a
playbook or a host is.
"""

from __future__ import annotations

from mesh.errors import InventoryError


class PlaybookError(InventoryError):
    """A playbook mesh refuses: file, line, key and what was expected (exit 4, as ansible-playbook)."""


class ModuleFailure(Exception):
    """Raised by a module (or a change it asked for) to fail the task on this host with a message."""

    def __init__(self, message: str, **data: object) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
