"""`mesh status` says when Consul cannot be read, and exits 2, even with no proxy row to carry it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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


def _mesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    quiet = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "TTY_COMPATIBLE",
                                                                           "MESH_INVENTORY")}
    return subprocess.run([str(Path(sys.executable).parent / "mesh"), *args], capture_output=True, text=True, check=False,
                          env={**quiet, **(env or {})}, stdin=subprocess.DEVNULL, timeout=60)


def test_the_cli_piped_prints_plain_text_and_json(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text("all:\n  vars: {mesh_consul_url: 'http://127.0.0.1:1'}\n"
                         "  hosts:\n    consul1: {ansible_host: 127.0.0.1}\n")
    table = _mesh("status", "-i", str(inventory), env={"COLUMNS": "40"})  # exported for a terminal, not the pipe
    assert table.returncode == EXIT_HOST_FAILED, table.stderr
    assert "\x1b" not in table.stdout and table.stdout.isascii() and "| host " in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) > 40
    as_json = _mesh("status", "--json", env={"MESH_INVENTORY": str(inventory)})
    assert as_json.returncode == EXIT_HOST_FAILED, as_json.stderr
    data = json.loads(as_json.stdout)
    assert (data["healthy"], data["exit_code"], data["hosts"]) == (False, EXIT_HOST_FAILED, [])
    assert data["consul"]["readable"] is False and "unreachable" in data["consul"]["reason"]
