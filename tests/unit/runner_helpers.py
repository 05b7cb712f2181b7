"""Helpers of the runner's unit tests: write a playbook, run it on fake hosts, read the transcript."""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.results import PlayResult
from mesh.deploy.runner import run_playbook
from mesh.inventory.model import Connection, ManagedHost
from mesh.testing.fake_connector import FakeFleet


def managed(*names: str) -> list[ManagedHost]:
    return [ManagedHost(name, "vm", Connection(f"10.0.0.{i + 1}")) for i, name in enumerate(names)]


@dataclass
class Run:
    result: PlayResult
    output: str

    @property
    def code(self) -> int:
        return exit_code(self.result)

    def counts(self, host: str) -> dict[str, int]:
        stats = self.result.stats[host]
        return {"ok": stats.ok, "changed": stats.changed, "unreachable": stats.unreachable,
                "failed": stats.failed, "skipped": stats.skipped, "ignored": stats.ignored}


def write_playbook(folder: Path, text: str, name: str = "play.yml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def run(folder: Path, text: str, fleet: FakeFleet, hosts: list[ManagedHost] | None = None,
        **options: Any) -> Run:
    playbook = load_playbook(write_playbook(folder, text), options.get("modules"))
    out = io.StringIO()
    result = run_playbook(playbook, hosts or managed("vm1", "vm2"), fleet.connect, output=out, color=False,
                          **options)
    return Run(result, out.getvalue())
