"""Errors of config computation and checking: an inconsistent proxy config, an Envoy that refuses one.

They name the proxy; they must not carry key material.
"""

from __future__ import annotations

from mesh.errors import MeshError


class ConfigError(MeshError):
    """A proxy config mesh will not render or push (the deploy fails that host, exit 2)."""

    exit_code = 2

    def __init__(self, proxy: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{proxy}: {message}", hint)
        self.proxy = proxy


class InconsistentConfig(ConfigError):
    """A listener or cluster names a cluster or secret the same config does not have."""


class EnvoyRejectedConfig(ConfigError):
    """`envoy --mode validate` refused the rendered config; the message is Envoy's own."""
