"""Controller steps: the health checker's Python environment from pushed wheels, its checker.json and its
systemd unit. They yield only what differs; building wheels and rendering happen on the machine running mesh.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mesh import controller_env
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.facts import file_sha256
from mesh.deploy.steps.context import DeployContext
from mesh.healthcheck.config import DEFAULT_CONFIG, checker_config

CHECKER_UNIT_PATH = f"/etc/systemd/system/{controller_env.CHECKER_UNIT}"


def checker_env(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """/opt/mesh/venv with exactly the pushed wheels: sent and installed only when the marker differs."""
    wheels = ctx.shared.wheels
    if wheels is None:
        raise ModuleFailure("the controller's wheels were not built for this run")
    installed = ctx.connector.run(controller_env.installed_marker_command()).text()
    if installed == wheels.marker:
        return Outcome(msg="checker environment up to date", data={"marker": wheels.marker})
    yield RunCommand(f"mkdir -p {controller_env.WHEELS_DIR}", f"create {controller_env.WHEELS_DIR}")
    for wheel in wheels.wheels:
        yield PutFile(f"{controller_env.WHEELS_DIR}/{wheel.name}", wheel.read_bytes(), 0o644, "root", "root",
                      f"send {wheel.name}")
    for command in controller_env.install_commands([wheel.name for wheel in wheels.wheels], wheels.marker):
        yield RunCommand(command, "install the checker's environment")
    return Outcome(msg=f"installed {len(wheels.wheels)} wheels", data={"marker": wheels.marker})


def checker_config_file(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """checker.json listing every workload instance of the mesh."""
    data = checker_config(ctx.shared.mesh).to_json().encode()
    if file_sha256(ctx.connector, DEFAULT_CONFIG) != hashlib.sha256(data).hexdigest():
        yield PutFile(DEFAULT_CONFIG, data, 0o644, "root", "root", f"write {DEFAULT_CONFIG}")
    return Outcome(data={"dest": DEFAULT_CONFIG, "instances": len(ctx.shared.mesh.workloads)})


def checker_unit(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """mesh-health-checker.service; systemd re-reads units when it changed."""
    data = controller_env.render_checker_unit().encode()
    if file_sha256(ctx.connector, CHECKER_UNIT_PATH) != hashlib.sha256(data).hexdigest():
        yield PutFile(CHECKER_UNIT_PATH, data, 0o644, "root", "root", f"write {CHECKER_UNIT_PATH}")
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    return Outcome(data={"unit": controller_env.CHECKER_UNIT})
