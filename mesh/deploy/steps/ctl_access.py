"""The controllers' part of a deploy: the `mesh-ctl` account on every managed host (its forced-command keys, its
sudo rule, the script, the identities it may touch) and, on controllers, the controller's own account, files and
service. Files and folders come from the plan (mesh.plan.build), so observe, changes and cleanup treat them like
every other; these steps only write what differs. The controllers' SSH keys are made before the plan
(mesh.deploy.controller_inputs), never here.
"""

from __future__ import annotations

import shlex
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from mesh.config import paths
from mesh.controller import spec as controller_spec
from mesh.controller_env import CONTROLLER_UNIT
from mesh.deploy.controller_inputs import CONTROLLER_COMMENT
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import Change, ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.host import SBIN_PATH
from mesh.deploy.steps.ownership import Owned, folder_changes, ownership_changes
from mesh.deploy.variables import to_bool
from mesh.hosts.connection import CommandResult
from mesh.plan import access
from mesh.plan.build import CONTROLLER_UNIT_PATH
from mesh.plan.model import PlannedFile

# The paths each task of playbooks/deploy.yml writes from the plan, folders before the files in them.
GROUPS: dict[str, tuple[str, ...]] = {
    "access": (paths.MESH_ROOT, "/usr/local/lib/mesh", access.CTL_IDENTITIES_DIR, controller_spec.CTL_HOME,
               access.CTL_SSH_DIR, controller_spec.CTL_SCRIPT, controller_spec.CTL_SUDOERS, access.CTL_AUTHORIZED_KEYS,
               controller_spec.CTL_IDENTITIES),
    "controller": (paths.MESH_ROOT, controller_spec.CONTROLLER_DIR, controller_spec.CA_DIR, controller_spec.ROOT_CERT,
                   controller_spec.INTERMEDIATE_CERT, controller_spec.INTERMEDIATE_KEY, controller_spec.TOKEN_FILE,
                   controller_spec.CONSUL_CA_FILE, CONTROLLER_UNIT_PATH),
    "spec": (controller_spec.KNOWN_HOSTS, controller_spec.SPEC_PATH),
    "start": (paths.ENVOY_START,),  # the start step of xds proxies (mesh_delivery: xds), before their units/sidecars
}


@dataclass(frozen=True)
class RoleUser:
    """A system user a role needs, with its home and shell, and a password field sshd accepts (`*`: no password
    login, yet not locked) where the account logs in with a key."""

    name: str
    home: str
    shell: str
    comment: str
    key_login: bool


ROLE_USERS = {
    controller_spec.CTL_USER: RoleUser(controller_spec.CTL_USER, controller_spec.CTL_HOME, access.CTL_SHELL,
                                       access.CTL_COMMENT, True),
    controller_spec.CONTROLLER_USER: RoleUser(controller_spec.CONTROLLER_USER, controller_spec.CONTROLLER_DIR,
                                              "/usr/sbin/nologin", CONTROLLER_COMMENT, False),
}


def role_user(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The role's system user (`name`: mesh-ctl or mesh-controller) as the plan wants it: created when missing,
    its home and shell set, and for mesh-ctl the password field `*` (no password, yet not locked for sshd)."""
    name = str(args.get("name") or "")
    user = ROLE_USERS.get(name)
    if user is None:
        raise ModuleFailure(f"name must be one of {', '.join(sorted(ROLE_USERS))}; got {name!r}")
    if name not in ctx.shared.host_plan(ctx.host.name).users:
        return Outcome(msg=f"{name} is not planned on this host")
    q = shlex.quote
    found = ctx.connector.run(f"getent passwd {q(name)}")
    fields = found.text().split(":")
    if not found.ok or len(fields) < 7:
        yield RunCommand(f"{SBIN_PATH}; useradd --system --user-group --no-create-home --home-dir {q(user.home)} "
                         f"--shell {q(user.shell)} --comment {q(user.comment)} {q(name)}", f"create user {name}")
    elif fields[5] != user.home or fields[6].strip() != user.shell:
        yield RunCommand(f"{SBIN_PATH}; usermod --home {q(user.home)} --shell {q(user.shell)} {q(name)}",
                         f"user {name}: home {user.home}, shell {user.shell}")
    if user.key_login and ctx.connector.run(f"getent shadow {q(name)} | cut -d: -f2").text() != "*":
        yield RunCommand(f"{SBIN_PATH}; usermod -p '*' {q(name)}", f"user {name}: no password, not locked")
    return Outcome(data={"name": name, "state": "present"})


def planned_files(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """The plan's folders and files of one group (GROUPS: access, controller, spec) on this host: folders made
    and owned, files written only when their sha256 differs (a file with a check, such as the sudoers rule, is
    checked on the host before it replaces the old one), ownership fixed otherwise; a file of the group the plan
    no longer has is removed. Systemd re-reads units when one changed."""
    group = str(args.get("group") or "")
    if group not in GROUPS:
        raise ModuleFailure(f"group must be one of {', '.join(GROUPS)}; got {group!r}")
    plan = ctx.shared.host_plan(ctx.host.name)
    folders = {folder.path: folder for folder in plan.every_folder()}
    files = {planned.path: planned for planned in plan.every_file()}
    wanted = [path for path in GROUPS[group] if path in files]
    sums = _file_sums(ctx, [path for path in GROUPS[group] if path not in folders])
    written: list[str] = []
    for path in GROUPS[group]:
        if path in folders:
            folder = folders[path]
            yield from folder_changes(ctx.connector, path, Owned(folder.owner, folder.group, folder.mode))
        elif path in files:
            changed = yield from _file(ctx, files[path], sums.get(path))
            if changed:
                written.append(path)
        elif path in sums:
            yield RunCommand(f"rm -f -- {shlex.quote(path)}", f"remove {path} (no longer planned)")
            written.append(path)
    if any(path.startswith(paths.SYSTEMD_DIR + "/") for path in written):
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    return Outcome(msg=f"written: {', '.join(written)}" if written else "",
                   data={"group": group, "written": written, "planned": wanted})


def _file(ctx: TaskContext[DeployContext], planned: PlannedFile,
          found: str | None) -> Generator[Change, CommandResult | None, bool]:
    if found == planned.sha256:
        yield from ownership_changes(ctx.connector, planned.path, Owned(planned.owner, planned.group, planned.mode))
        return False
    if planned.check:
        refused = yield from install_checked(planned.path, planned.content, planned.mode, planned.owner,
                                             planned.group, planned.check)
        if refused is not None:
            raise ModuleFailure(f"{planned.check.split()[0]} on {ctx.host.name} refused the new {planned.path} "
                                f"(the old one is kept): {refused}")
    else:
        what = "secret " if planned.secret else ""
        yield PutFile(planned.path, planned.content, planned.mode, planned.owner, planned.group,
                      f"write {what}{planned.path}")
    return True


def _file_sums(ctx: TaskContext[DeployContext], wanted: list[str]) -> dict[str, str]:
    """sha256 of each wanted path that is a regular file, in one command."""
    if not wanted:
        return {}
    script = ("for p in " + " ".join(shlex.quote(path) for path in wanted) + "; do "
              "[ -f \"$p\" ] && printf '%s\\t%s\\n' \"$p\" \"$(sha256sum < \"$p\" | cut -c1-64)\"; done; true")
    sums: dict[str, str] = {}
    for line in ctx.connector.run(script).text().splitlines():
        path, _, digest = line.partition("\t")
        if len(digest) == 64:
            sums[path] = digest
    return sums


def controller_service(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """mesh-controller.service enabled and running this deploy's files: started when it is not running, else
    restarted when its environment, unit, CA, token or Consul CA changed (`restart`), else reloaded (SIGHUP:
    spec.json re-read, connections kept) when only spec.json or known_hosts changed (`reload`)."""
    unit = CONTROLLER_UNIT
    if unit not in ctx.shared.host_plan(ctx.host.name).units:
        return Outcome(msg="no controller planned on this host")
    state = ctx.connector.run(f"systemctl is-enabled {unit}; systemctl is-active {unit}").text().split()
    enabled, active = (state + ["", ""])[:2]
    if enabled != "enabled":
        yield RunCommand(f"systemctl enable {unit}", f"enable {unit}")
    if active not in ("active", "activating", "reloading"):
        yield RunCommand(f"systemctl start {unit}", f"start {unit}")
        return Outcome(msg="started", data={"action": "start"})
    if to_bool(args.get("restart", False)):
        yield RunCommand(f"systemctl restart {unit}", f"restart {unit}")
        return Outcome(msg="restarted", data={"action": "restart"})
    if to_bool(args.get("reload", False)):
        yield RunCommand(f"systemctl reload {unit}", f"reload {unit} (spec.json re-read)")
        return Outcome(msg="reloaded", data={"action": "reload"})
    return Outcome(data={"action": "none"})
