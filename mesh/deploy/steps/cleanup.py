"""mesh.cleanup: remove from a host what mesh put there and the plan no longer has (a workload, a host's role
or the whole host left the inventory): units stopped and removed first, then sidecars, mesh's firewall table and
reachability rules, files and folders, and the users last. The removals are the ones observed before the run
(mesh.plan.changes.removals); it decides nothing else.
"""

from __future__ import annotations

import shlex
from typing import Any

from mesh.config import paths
from mesh.containers.reachability import RULES_PATH
from mesh.deploy.modules.api import ModuleRun, Outcome, RunCommand, TaskContext
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.host import SBIN_PATH
from mesh.deploy.steps.rollback import backup_path
from mesh.hosts.observe import ENVOY_SHA_CACHE_SUFFIX, FIREWALL_LOADED
from mesh.plan.changes import ROLE_USERS, Change

ORDER = {"unit": 0, "proxy": 1, "sidecar": 2, "file": 3, "folder": 4, "user": 5}


def cleanup(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Remove what left the plan of this host, as observed before the run."""
    removals = sorted((change for change in ctx.shared.changes.get(ctx.host.name, ())
                       if change.action == "remove"), key=lambda change: ORDER.get(change.kind, 9))
    done = []
    reload_units = False
    for change in removals:
        for command in removal_commands(change):
            yield RunCommand(command, f"remove {change.kind} {change.subject}")
        reload_units = reload_units or change.kind == "unit"
        done.append(f"{change.kind} {change.subject}")
    if reload_units:
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    return Outcome(msg=f"removed: {', '.join(done)}" if done else "", data={"removed": done})


def removal_commands(change: Change) -> list[str]:
    """The commands removing one thing (each harmless when it is already gone)."""
    q = shlex.quote
    subject = change.subject
    if change.kind == "unit":
        return [f"systemctl disable --now {q(subject)} >/dev/null 2>&1 || true",
                f"rm -f {q(paths.SYSTEMD_DIR + '/' + subject)}"]
    if change.kind == "proxy":
        unit = paths.envoy_unit_name(subject)
        return [f"systemctl disable --now {q(unit)} >/dev/null 2>&1 || true",
                f"rm -f {q(paths.envoy_unit_path(subject))} {q(backup_path(subject))}",
                f"rm -rf -- {q(paths.proxy_dir(subject))}"]
    if change.kind == "sidecar":
        return [f"docker rm --force {q(subject)} >/dev/null 2>&1 || true"]
    if change.kind == "user":
        # the controllers' account may still be logged in (a controller's open connection): removed all the same,
        # its keys, sudo rule and script being gone already (files and folders go before users)
        force = "-f " if subject in ROLE_USERS else ""
        return [f"{SBIN_PATH}; if getent passwd {q(subject)} >/dev/null; then userdel {force}{q(subject)}; fi"]
    if change.kind == "folder":
        return [f"rm -rf -- {q(subject)}"]
    if change.kind == "file":
        commands = []
        if subject == paths.FIREWALL_PATH:
            commands.append(f"{paths.NFT_BINARY} delete table inet mesh 2>/dev/null || true")
            commands.append(f"rm -f {FIREWALL_LOADED}")
        if subject == RULES_PATH:
            commands.append(f"[ -x {q(RULES_PATH)} ] && {q(RULES_PATH)} remove || true")
        if subject == paths.ENVOY_BINARY:
            commands.append(f"rm -f {q(subject + ENVOY_SHA_CACHE_SUFFIX)}")
        return [*commands, f"rm -f -- {q(subject)}"]
    return []
