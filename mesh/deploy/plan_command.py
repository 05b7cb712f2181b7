"""`mesh plan INVENTORY`: what `mesh deploy` would change, per host with unified diffs, and a summary line
(`no changes` on a converged fleet); `--json` gives the change set, `-o FILE` saves the plan for
`mesh deploy --plan FILE`. It changes nothing: no CA is made (a throwaway one stands in when the state dir
has none), no lock is taken, no host is written.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from mesh.deploy import trust
from mesh.deploy.command import _consul_preflight, _require_controller, _targets, retired_targets
from mesh.deploy.display import Display
from mesh.deploy.hostvars import inventory_vars
from mesh.deploy.prepare import check_here, prepare
from mesh.deploy.runner import ConnectorFactory
from mesh.errors import EXIT_OK, EXIT_UNREACHABLE
from mesh.hosts.connection import connect
from mesh.hosts.pool import ConnectionPool
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.plan.report import json_report, saved_plan, text_report


def plan(inventory_path: str, limit: str | None = None, as_json: bool = False, save_to: Path | None = None,
         forks: int = 20, output: TextIO | None = None, connector_factory: ConnectorFactory = connect) -> int:
    """Print the plan; 0, or 3 when a host could not be read."""
    stdout = output or sys.stdout
    out = Display(sys.stderr if output is None else stdout)
    data = load_inventory(inventory_path)
    mesh = check_inventory(data, inventory_path).mesh
    _require_controller(mesh, inventory_path)
    targets = _targets(mesh, limit, out, inventory_vars(data).groups)
    overrides = _consul_preflight(mesh, out)
    retired = retired_targets(mesh, limit, out)
    targets = targets + retired
    with ExitStack() as stack:
        pool = stack.enter_context(ConnectionPool(connector_factory))
        ca_mesh = mesh
        if trust.state_root(mesh.settings.state_dir) is None:
            throwaway = stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-plan-ca-"))
            ca_mesh = replace(mesh, settings=replace(mesh.settings, state_dir=throwaway))
            out.line(f"no CA in {mesh.settings.state_dir}: a deploy would make one (every certificate is new)")
        check_here(mesh, targets, out, retired=retired, overrides=overrides)  # before any host is reached
        ca, _ = trust.trusted_ca(ca_mesh, pool.connect, forks=forks, warn=out.warning)
        prepared = prepare(ca_mesh, ca, targets, pool.connect, out, forks, diffs=True, consul=True, retired=retired,
                           overrides=overrides)
    fleet = prepared.fleet
    if save_to is not None:
        save_to.write_text(saved_plan(fleet, str(Path(inventory_path).resolve()), prepared.plan.digest))
        out.line(f"plan saved to {save_to}: `mesh deploy --plan {save_to}` applies exactly it")
    stdout.write(json_report(fleet, {"plan_digest": prepared.plan.digest}) if as_json else text_report(fleet))
    return EXIT_UNREACHABLE if fleet.unreachable() else EXIT_OK
