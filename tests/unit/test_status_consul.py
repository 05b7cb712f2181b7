"""`mesh status` says when Consul cannot be read, and exits 2, even with no proxy row to carry it."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from mesh.errors import EXIT_HOST_FAILED
from mesh.status import status


def test_an_unreachable_consul_is_unhealthy_without_any_managed_host(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text("all:\n  vars: {mesh_consul_url: 'http://127.0.0.1:1'}\n"
                         "  hosts:\n    consul1: {ansible_host: 127.0.0.1}\n")
    printed = io.StringIO()
    assert status(str(inventory), console=Console(file=printed, width=200)) == EXIT_HOST_FAILED
    assert "Consul: Consul is unreachable at http://127.0.0.1:1" in printed.getvalue()
