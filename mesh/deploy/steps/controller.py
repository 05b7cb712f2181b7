"""Controller steps: the health checker's Python environment from pushed wheels, its checker.json, its Consul
token and CA (files readable by the checker's user only) and its systemd unit. They yield only what differs;
building wheels, reading the local token file and rendering happen on the machine running mesh.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import Any

from mesh import catalog, controller_env
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked, unit_check
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.ownership import Owned, ownership_changes
from mesh.errors import MeshError
from mesh.healthcheck.config import CHECKER_USER, CONSUL_CA_FILE, DEFAULT_CONFIG, TOKEN_FILE, checker_config
from mesh.hosts.facts import file_sha256

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


def checker_consul_files(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Consul's ACL token (read from mesh_consul_token_file here, 0600 and owned by the checker's user there)
    and the CA bundle of an https Consul; each removed when the inventory no longer names it. The token goes
    over the connection's stdin, never into a command line or the output."""
    settings = ctx.shared.mesh.settings
    token: bytes | None = None
    if settings.consul_token_file:
        try:
            token = catalog.read_token(settings.consul_token_file).encode() + b"\n"
        except MeshError as exc:
            raise ModuleFailure(str(exc)) from None
    bundle: bytes | None = None
    if settings.consul_ca_file:
        try:
            with open(settings.consul_ca_file, "rb") as handle:
                bundle = handle.read()
        except OSError as exc:
            raise ModuleFailure(f"cannot read mesh_consul_ca_file {settings.consul_ca_file}: "
                                f"{exc.strerror or exc}") from None
    yield from _secret_file(ctx, TOKEN_FILE, token, Owned(CHECKER_USER, CHECKER_USER, 0o600), "the Consul token")
    yield from _secret_file(ctx, CONSUL_CA_FILE, bundle, Owned("root", "root", 0o644), "Consul's CA bundle")
    return Outcome(data={"token": token is not None, "consul_ca": bundle is not None})


def _secret_file(ctx: TaskContext[DeployContext], path: str, data: bytes | None, wanted: Owned,
                 what: str) -> ModuleRun:
    found = file_sha256(ctx.connector, path)
    if data is None:
        if found is not None:
            yield RunCommand(f"rm -f {shlex.quote(path)}", f"remove {what} ({path})")
        return None
    if found != hashlib.sha256(data).hexdigest():
        yield PutFile(path, data, wanted.mode, wanted.owner, wanted.group, f"write {what} ({path})")
    else:
        yield from ownership_changes(ctx.connector, path, wanted)
    return None


def checker_unit(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """mesh-health-checker.service, checked by `systemd-analyze verify` on the host before it replaces the old
    one; systemd re-reads units when it changed."""
    data = controller_env.render_checker_unit().encode()
    if file_sha256(ctx.connector, CHECKER_UNIT_PATH) != hashlib.sha256(data).hexdigest():
        refused = yield from install_checked(CHECKER_UNIT_PATH, data, 0o644, "root", "root",
                                             unit_check(controller_env.CHECKER_UNIT))
        if refused is not None:
            return Outcome(msg=f"systemd-analyze on {ctx.host.name} refused the new {controller_env.CHECKER_UNIT} "
                               f"(the old one is kept): {refused}", failed=True)
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    return Outcome(data={"unit": controller_env.CHECKER_UNIT})
