"""Errors of the hosts layer: a host mesh cannot reach (exit 3) and a fact it could not read on a host it
reached. It owns their messages; it must not decide what a deploy does about them.
"""

from __future__ import annotations

from mesh.errors import EXIT_UNREACHABLE, MeshError


class HostUnreachable(MeshError):
    """mesh cannot reach a host: refused, timed out, or an unknown or changed host key (exit 3)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, host: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{host}: {message}", hint)
        self.host = host
        self.detail = message if not hint else f"{message} ({hint})"  # without the host, for `fatal: [host]`


class RemoteError(Exception):
    """A connector operation that reached the host but failed there (a put into a missing folder...)."""


class FactError(RemoteError):
    """A fact mesh could not read on a host it reached (stat or sha256sum failed there)."""
