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
from mesh.hosts.observe import ENVOY_SHA_CACHE_SUFFIX, FIREWALL_LOADED
from mesh.plan.build import FIREWALL_CHECK, FIREWALL_UNIT_PATH
from mesh.plan.changes import keep_envoy_sha_cache

# Non-interactive SSH sessions of non-root users often lack the sbin folders where sshd and nft live.
SBIN_PATH = "PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin"
TOOLS = ("openssl", "sha256sum", "useradd", "systemctl", "sshd", "sudo", "visudo")  # sudo: the controllers' mesh-ctl
CONTAINER_HOST_TOOLS = ("docker", "iptables", "iptables-restore", "nsenter")
MIN_CONTROLLER_PYTHON = (3, 10)  # the checker's wheels (structlog, py-consul) need 3.10+


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
    if controller:  # the controller's SSH key is made on the controller itself
        lines.append("command -v ssh-keygen >/dev/null 2>&1 || echo ssh-keygen")
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
    state = str(args.get("state", "present"))
    if state not in ("present", "absent"):
        raise ModuleFailure(f"state must be present or absent, got {state!r}")
    exists = ctx.connector.run(f"getent passwd {shlex.quote(name)}").ok
    if state == "absent":
        if exists:
            yield RunCommand(f"{SBIN_PATH}; userdel {shlex.quote(name)}", f"remove user {name}")
        return Outcome(data={"name": name, "state": "absent"})
    if exists:
        return Outcome(data={"name": name, "state": "present"})
    words = ["useradd", "--user-group"]
    if args.get("comment"):
        words += ["--comment", str(args["comment"])]
    if to_bool(args.get("system", False)):
        words.append("--system")
    words.append("--create-home" if to_bool(args.get("create_home", True)) else "--no-create-home")
    if args.get("shell"):
        words += ["--shell", str(args["shell"])]
    yield RunCommand(f"{SBIN_PATH}; " + shlex.join([*words, name]), f"create user {name}")
    return Outcome(data={"name": name, "state": "present"})


def envoy_binary(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Envoy's binary at dest, sent only when the host's sha256 differs from the local one: gzip-compressed on
    the wire (a third of its size), unpacked beside dest and renamed into place; its sha256, size and mtime are
    recorded beside it, so the next run reads them instead of hashing 100 MB again."""
    dest = str(args.get("dest") or paths.ENVOY_BINARY)
    local = ctx.shared.envoy
    found = ctx.connector.run(binary_sha_command(dest)).text() or None
    if found != local.sha256:
        packed = f"{dest}.mesh-gz"
        mode = parse_mode(args.get("mode")) or 0o755
        yield PutFile(packed, local.gzipped(), 0o600, "root", "root", f"send Envoy ({local.sha256[:12]}, gzip)")
        q = shlex.quote
        yield RunCommand(f"set -e; gunzip -c {q(packed)} > {q(dest)}.mesh-tmp; rm -f {q(packed)}; "
                         f"chmod {mode:04o} {q(dest)}.mesh-tmp; mv -f {q(dest)}.mesh-tmp {q(dest)}; "
                         + keep_envoy_sha_cache(dest), f"unpack Envoy into {dest}")
    return Outcome(data={"dest": dest, "checksum": local.sha256, "sent": found != local.sha256})


def binary_sha_command(path: str) -> str:
    """Prints the file's sha256: from the record beside it when its size and mtime still match, else hashed."""
    q = shlex.quote
    cache = q(path + ENVOY_SHA_CACHE_SUFFIX)
    return (f"if [ -f {q(path)} ]; then now=$(stat -c '%s %Y' {q(path)}); set -- $(cat {cache} 2>/dev/null); "
            f"if [ \"$2 $3\" = \"$now\" ]; then echo \"$1\"; else sha256sum < {q(path)} | cut -c1-64; fi; fi")


def firewall(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """mesh's `inet mesh` table (the plan's /etc/mesh/firewall.nft) and its boot unit; loaded when the file
    changed or the loaded table is not the one mesh loaded last (a flushed chain, a deleted table)."""
    if not ctx.connector.run(f"test -x {paths.NFT_BINARY}").ok:
        if ctx.connector.run(f"{SBIN_PATH}; command -v iptables").ok:
            raise ModuleFailure(f"{ctx.host.name} has iptables but not nft ({paths.NFT_BINARY}): mesh closes app "
                                "ports with an nftables table of its own; install nftables (the app ports are "
                                "still open to other hosts)")
        raise ModuleFailure(f"{paths.NFT_BINARY} not found: install nftables")
    plan = ctx.shared.host_plan(ctx.host.name)
    if not any(planned.path == paths.FIREWALL_PATH for planned in plan.files):
        return Outcome(msg=f"no mesh firewall on {ctx.host.name} (no app ports, no ADS port)")
    ruleset, unit = plan.file(paths.FIREWALL_PATH), plan.file(FIREWALL_UNIT_PATH)
    # Each file is checked on the host by the tool that reads it (`nft -c`, `systemd-analyze verify`) before it
    # replaces the old one: a refused file fails the host and leaves the old one (and the loaded table) alone.
    changed_rules = _differs(ctx, ruleset.path, ruleset.content)
    if changed_rules:
        refused = yield from install_checked(ruleset.path, ruleset.content, ruleset.mode, ruleset.owner,
                                             ruleset.group, ruleset.check or FIREWALL_CHECK)
        if refused is not None:
            return Outcome(msg=f"nft on {ctx.host.name} refused the new {ruleset.path} (the old one is "
                               f"kept): {refused}", failed=True)
    if _differs(ctx, unit.path, unit.content):
        refused = yield from install_checked(unit.path, unit.content, unit.mode, unit.owner, unit.group, unit.check or unit_check(paths.FIREWALL_UNIT))
        if refused is not None:
            return Outcome(msg=f"systemd-analyze on {ctx.host.name} refused the new {unit.path} (the "
                               f"old one is kept): {refused}", failed=True)
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    loaded = ctx.connector.run(_LOADED_CHECK).ok
    if changed_rules or not loaded:
        yield RunCommand(f"{paths.NFT_BINARY} -f {paths.FIREWALL_PATH} && {_RECORD_LOADED}",
                         "apply mesh's nftables table")
    ports = sorted({workload.port for workload in ctx.host.workloads})
    if not ports:
        return Outcome(msg="the ADS port open to the mesh's hosts only", data={"ports": ports})
    return Outcome(msg=f"app ports closed to other hosts: {ports}", data={"ports": ports})


_LISTED = f"{paths.NFT_BINARY} list table inet mesh 2>/dev/null | sha256sum | cut -c1-64"
_LOADED_CHECK = (f"[ -n \"$({paths.NFT_BINARY} list table inet mesh 2>/dev/null)\" ] && "
                 f"[ \"$({_LISTED})\" = \"$(cat {FIREWALL_LOADED} 2>/dev/null)\" ]")
_RECORD_LOADED = f"mkdir -p /var/lib/mesh && {_LISTED} > {FIREWALL_LOADED}"


def _differs(ctx: TaskContext[Any], path: str, data: bytes) -> bool:
    return file_sha256(ctx.connector, path) != hashlib.sha256(data).hexdigest()
