"""Host-wide mesh steps: prerequisites, the system user, Envoy's binary, mesh's nftables table.
Each reads facts and yields only the changes needed; none applies anything itself or knows about proxies.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import Any

from mesh.config import paths
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.modules.builtin import install_checked, parse_mode, unit_check
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.variables import to_bool
from mesh.hosts.facts import file_sha256
from mesh.render import render_firewall, render_firewall_unit

# Non-interactive SSH sessions of non-root users often lack the sbin folders where sshd and nft live.
SBIN_PATH = "PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin"
TOOLS = ("openssl", "sha256sum", "useradd", "systemctl", "sshd")
CONTAINER_HOST_TOOLS = ("docker", "iptables", "iptables-restore", "nsenter")
MIN_CONTROLLER_PYTHON = (3, 10)  # the checker's wheels (structlog, py-consul) need 3.10+
FIREWALL_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{paths.FIREWALL_UNIT}"
FIREWALL_CHECK = f"{paths.NFT_BINARY} -c -f %s"  # nft's own check of a staged ruleset (%s: its path)


def prerequisites_script(controller: bool, container_host: bool = False) -> str:
    """A read-only script printing one name per missing prerequisite (nothing when all are there)."""
    lines = [SBIN_PATH, "[ -d /run/systemd/system ] || echo 'systemd (running as init)'"]
    lines += [f"command -v {tool} >/dev/null 2>&1 || echo {tool}" for tool in TOOLS]
    if container_host:  # sidecars run by Docker; mesh's iptables chains on the host and (nsenter) in app namespaces
        lines += [f"command -v {tool} >/dev/null 2>&1 || echo {tool}" for tool in CONTAINER_HOST_TOOLS]
        lines.append("docker info >/dev/null 2>&1 || echo 'a running Docker engine (docker info failed)'")
    else:
        lines.append("command -v nft >/dev/null 2>&1 || command -v iptables >/dev/null 2>&1 || "
                     "echo 'nft or iptables'")
    if controller:
        major, minor = MIN_CONTROLLER_PYTHON
        lines.append(f"python3 -c 'import sys; sys.exit(sys.version_info < ({major}, {minor}))' 2>/dev/null || "
                     f"echo \"python3 >= {major}.{minor} (found: $(python3 -V 2>&1 || echo none))\"")
    return "; ".join(lines) + "; true"


def prerequisites(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """Fail the host, before anything changes on it, when a prerequisite of INVENTORY.md is missing."""
    script = prerequisites_script(to_bool(args.get("controller", False)), ctx.host.kind == "container_host")
    result = ctx.connector.run(script)
    missing = [line.strip() for line in result.text().splitlines() if line.strip()]
    if missing:
        return Outcome(msg=f"missing prerequisites on {ctx.host.name}: {', '.join(missing)}; "
                           "nothing was changed on this host", data={"missing": missing}, failed=True)
    return Outcome(msg="all prerequisites present")
    yield  # a generator that yields no change


def user(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """ansible.builtin.user, the subset mesh needs: a system user with its own group, no home, a shell."""
    name = str(args.get("name") or "")
    if not name:
        raise ModuleFailure("missing required argument: name")
    if str(args.get("state", "present")) != "present":
        raise ModuleFailure("only state=present is supported by mesh")
    if ctx.connector.run(f"getent passwd {shlex.quote(name)}").ok:
        return Outcome(data={"name": name, "state": "present"})
    words = ["useradd", "--user-group"]
    if to_bool(args.get("system", False)):
        words.append("--system")
    words.append("--create-home" if to_bool(args.get("create_home", True)) else "--no-create-home")
    if args.get("shell"):
        words += ["--shell", str(args["shell"])]
    yield RunCommand(f"{SBIN_PATH}; " + shlex.join([*words, name]), f"create user {name}")
    return Outcome(data={"name": name, "state": "present"})


def envoy_binary(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Envoy's binary at dest, sent (atomically) only when the host's sha256 differs from the local one."""
    dest = str(args.get("dest") or paths.ENVOY_BINARY)
    local = ctx.shared.envoy
    found = file_sha256(ctx.connector, dest)
    if found != local.sha256:
        yield PutFile(dest, local.path.read_bytes(), parse_mode(args.get("mode")) or 0o755, "root", "root",
                      f"send Envoy ({local.sha256[:12]})")
    return Outcome(data={"dest": dest, "checksum": local.sha256, "sent": found != local.sha256})


def firewall(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    """mesh's `inet mesh` table in /etc/mesh/firewall.nft and its boot unit; applied when changed or missing."""
    if not ctx.connector.run(f"test -x {paths.NFT_BINARY}").ok:
        if ctx.connector.run(f"{SBIN_PATH}; command -v iptables").ok:
            raise ModuleFailure(f"{ctx.host.name} has iptables but not nft ({paths.NFT_BINARY}): mesh closes app "
                                "ports with an nftables table of its own; install nftables (the app ports are "
                                "still open to other hosts)")
        raise ModuleFailure(f"{paths.NFT_BINARY} not found: install nftables")
    ruleset = render_firewall(ctx.host).encode()
    unit = render_firewall_unit().encode()
    # Each file is checked on the host by the tool that reads it (`nft -c`, `systemd-analyze verify`) before it
    # replaces the old one: a refused file fails the host and leaves the old one (and the loaded table) alone.
    changed_rules = _differs(ctx, paths.FIREWALL_PATH, ruleset)
    if changed_rules:
        refused = yield from install_checked(paths.FIREWALL_PATH, ruleset, 0o644, "root", "root",
                                             FIREWALL_CHECK)
        if refused is not None:
            return Outcome(msg=f"nft on {ctx.host.name} refused the new {paths.FIREWALL_PATH} (the old one is "
                               f"kept): {refused}", failed=True)
    if _differs(ctx, FIREWALL_UNIT_PATH, unit):
        refused = yield from install_checked(FIREWALL_UNIT_PATH, unit, 0o644, "root", "root",
                                             unit_check(paths.FIREWALL_UNIT))
        if refused is not None:
            return Outcome(msg=f"systemd-analyze on {ctx.host.name} refused the new {FIREWALL_UNIT_PATH} (the "
                               f"old one is kept): {refused}", failed=True)
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    loaded = ctx.connector.run(f"{paths.NFT_BINARY} list table inet mesh >/dev/null 2>&1").ok
    if changed_rules or not loaded:
        yield RunCommand(f"{paths.NFT_BINARY} -f {paths.FIREWALL_PATH}", "apply mesh's nftables table")
    ports = sorted({workload.port for workload in ctx.host.workloads})
    return Outcome(msg=f"app ports closed to other hosts: {ports}", data={"ports": ports})


def _differs(ctx: TaskContext[Any], path: str, data: bytes) -> bool:
    return file_sha256(ctx.connector, path) != hashlib.sha256(data).hexdigest()
