"""mesh.health_gate: after a host's tasks, every proxy changed in this run must be serving: Envoy ready, its
listeners up and running the planned bootstrap, its local app no less healthy than before the change, its
upstreams no less healthy than before, and a probe through it with the health checker's identity (from a
controller, when its checker is installed) passing. When one is not, within GATE_WAIT_S, that proxy's previous
files are put back (mesh.deploy.steps.rollback) and the host fails, which stops a serial rollout.
It owns the verdict; reading Envoy's admin API is done by the commands here, over the host's connection.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.config import paths
from mesh.config.compute import LOCAL_APP_CLUSTER
from mesh.controller_env import MARKER_FILE, VENV
from mesh.deploy.modules.api import ModuleRun, Outcome, RunCommand, TaskContext
from mesh.deploy.steps.context import DeployContext
from mesh.deploy.steps.rollback import restore_command
from mesh.healthcheck.config import CHECKER_USER, DEFAULT_CONFIG
from mesh.hosts.connection import Connector
from mesh.plan.model import ProxyPlan

GATE_WAIT_S = 30.0  # how long a changed proxy may take to be ready and healthy
POLL_S = 1.0
_HEALTHY = re.compile(r"^([^:\n]+)::[^:\n]+:\d+::health_flags::(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Health:
    """What a proxy's admin API says: ready, its listeners, the bootstrap it runs, healthy hosts per cluster."""

    ready: bool
    listeners: frozenset[str]
    bootstrap: str
    healthy: Mapping[str, int]

    def local_app_healthy(self) -> bool:
        return self.healthy.get(LOCAL_APP_CLUSTER, 0) > 0


def read_health(connector: Connector, proxy: str) -> Health:
    """One command: /ready, /listeners, /server_info's bootstrap hash, /clusters' health flags."""
    socket = shlex.quote(paths.admin_socket_path(proxy))
    get = f"curl -s --max-time 3 --unix-socket {socket} http://admin"
    script = (f"echo \"READY $({get}/ready 2>/dev/null)\"; {get}/listeners 2>/dev/null | sed 's/^/LISTENER /'; "
              f"echo \"BOOT $({get}/server_info 2>/dev/null | grep -o '\"mesh_bootstrap_sha256\": *\"[0-9a-f]*\"' "
              f"| grep -o '[0-9a-f]\\{{64\\}}')\"; {get}/clusters 2>/dev/null | grep '::health_flags::'; true")
    text = connector.run(script).stdout.decode(errors="replace")
    ready = any(line.strip() == "READY LIVE" for line in text.splitlines())
    listeners = frozenset(line.split(" ", 1)[1].split("::", 1)[0] for line in text.splitlines()
                          if line.startswith("LISTENER "))
    bootstrap = next((line[5:].strip() for line in text.splitlines() if line.startswith("BOOT ")), "")
    healthy: dict[str, int] = {}
    for cluster, flags in _HEALTHY.findall(text):
        healthy.setdefault(cluster, 0)
        if flags.strip() == "healthy":
            healthy[cluster] += 1
    return Health(ready, listeners, bootstrap, healthy)


def verdict(planned: ProxyPlan, before: Health | None, after: Health) -> list[str]:
    """Why the proxy is not serving as it should after the change (empty: it is). Pure."""
    problems = []
    if not after.ready:
        problems.append("Envoy is not ready")
    wanted = {planned.config.inbound.name, *(listener.name for listener in planned.config.outbound)}
    if missing := sorted(wanted - after.listeners):
        problems.append(f"listeners not up: {', '.join(missing)}")
    if after.bootstrap != planned.bootstrap_sha256:
        problems.append("Envoy does not run the planned bootstrap")
    if before is not None:
        if before.local_app_healthy() and not after.local_app_healthy():
            problems.append("its app was healthy before the change and is not now")
        # A cluster the plan removed is gone on purpose; one it keeps must not lose healthy hosts, except those the
        # plan itself took out of it (an instance moved to another version leaves that version's cluster).
        planned_sizes = {cluster.name: len(cluster.endpoints) for cluster in planned.config.clusters}
        for cluster, count in before.healthy.items():
            if cluster == LOCAL_APP_CLUSTER or (cluster not in planned_sizes and cluster not in after.healthy):
                continue
            expected = min(count, planned_sizes.get(cluster, count))
            if after.healthy.get(cluster, 0) < expected:
                problems.append(f"{cluster}: {after.healthy.get(cluster, 0)} healthy host(s), {count} before")
    return problems


def health_gate(ctx: TaskContext[DeployContext], args: dict[str, Any]) -> ModuleRun:
    """Check every proxy changed in this run; restore the previous files of those that fail and fail the host."""
    shared = ctx.shared
    changed = [shared.proxy(ctx.host.name, name) for name in shared.changed(ctx.host.name)]
    if ctx.check_mode or not changed:
        return Outcome(msg="no proxy changed" if not changed else "check mode")
    failing: dict[str, list[str]] = {}
    deadline = time.monotonic() + float(args.get("wait", GATE_WAIT_S))
    pending = list(changed)
    while pending:
        still = []
        for planned in pending:
            problems = verdict(planned, shared.baseline(ctx.host.name, planned.name),
                               read_health(ctx.connector, planned.name))
            if not problems:
                problems = _probe(ctx, planned)
            if problems:
                failing[planned.name] = problems
                still.append(planned)
            else:
                failing.pop(planned.name, None)
        pending = still
        if pending and time.monotonic() < deadline:
            time.sleep(POLL_S)
            continue
        break
    if not failing:
        return Outcome(msg=f"serving: {', '.join(planned.name for planned in changed)}")
    for name in sorted(failing):
        planned = shared.proxy(ctx.host.name, name)
        restored = yield RunCommand(restore_command(planned), f"restore the previous files of {name}",
                                    check_exit=False)
        if restored is not None and restored.ok:
            yield from _restart_if_needed(ctx, planned)
    reasons = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in sorted(failing.items()))
    return Outcome(msg=f"health gate failed on {ctx.host.name} ({reasons}); the previous files of "
                       f"{', '.join(sorted(failing))} were restored", data={"failed": sorted(failing)}, failed=True)


def _restart_if_needed(ctx: TaskContext[DeployContext], planned: ProxyPlan) -> ModuleRun:
    """After a restore: the restored bootstrap needs a restart when Envoy runs another one."""
    on_disk = ctx.connector.run(f"grep -o 'mesh_bootstrap_sha256: *[0-9a-f]*' {shlex.quote(planned.config.config_path)}"
                                " | grep -o '[0-9a-f]\\{64\\}'").text()
    if on_disk and on_disk != read_health(ctx.connector, planned.name).bootstrap:
        if planned.sidecar is not None:
            yield RunCommand(f"docker restart --time 5 {shlex.quote(planned.sidecar.name)}",
                             f"restart {planned.sidecar.name} on its previous files")
        else:
            yield RunCommand(f"systemctl restart {paths.envoy_unit_name(planned.name)}",
                             f"restart {planned.name} on its previous files")
    return None


def _probe(ctx: TaskContext[DeployContext], planned: ProxyPlan) -> list[str]:
    """A probe through the proxy's inbound listener with the checker's identity, from a controller whose checker
    is installed (none yet on a first deploy: skipped); a problem only when the app was healthy before."""
    before = ctx.shared.baseline(ctx.host.name, planned.name)
    controller = ctx.shared.checker_connector()
    if controller is None or (before is not None and not before.local_app_healthy()):
        return []
    target = f"{planned.workload.service}@{ctx.host.connection.address}:{planned.workload.proxy_port}"
    python = f"{VENV}/bin/python"
    # A checker of another wheel set (an older mesh, one this run's controller play has not updated yet) may not
    # know --probe: the probe is skipped then, as before a first install.
    current = (f"grep -qxF {shlex.quote(ctx.shared.wheels.marker)} {MARKER_FILE} || exit 0; "
               if ctx.shared.wheels is not None else "")
    command = (f"[ -x {python} ] && [ -f {DEFAULT_CONFIG} ] || exit 0; {current}runuser -u {CHECKER_USER} -- "
               f"{python} -m mesh.healthcheck --config {DEFAULT_CONFIG} --probe {shlex.quote(target)}")
    with ctx.shared.checker_lock:
        result = controller.run(command, timeout=30)
    if result.code != 1:  # 0 passing; anything else is the checker's own trouble, no verdict on this proxy
        return []
    return [f"probe with the checker's identity: {result.text()[:300] or result.error_text()[:300]}"]
