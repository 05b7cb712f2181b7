"""Facts about containers and images on a Docker host, read through the connector with the docker CLI.
It owns parsing `docker inspect`; it must not change anything on the host (facts are read in check mode too).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from mesh.containers.sidecar import LABEL_CONFIG_HASH
from mesh.deploy.connection import Connector
from mesh.deploy.errors import ModuleFailure

_FORMAT = ("{{.Id}}|{{.State.Status}}|{{.State.Running}}|{{.State.Pid}}|{{.RestartCount}}|"
           f'{{{{index .Config.Labels "{LABEL_CONFIG_HASH}"}}}}')
_NO_VALUE = "<no value>"


@dataclass(frozen=True)
class ContainerState:
    """What `docker container inspect` says of one container, and the network namespace it runs in."""

    id: str
    status: str  # created, running, restarting, exited...
    running: bool
    pid: int
    restart_count: int
    config_hash: str | None
    netns: str | None  # e.g. net:[4026532301]; None when not running


def container_state(connector: Connector, name: str) -> ContainerState | None:
    """The container's state, or None when the host has no container of that name."""
    quoted = shlex.quote(name)
    result = connector.run(f"docker container inspect --format {shlex.quote(_FORMAT)} {quoted}")
    if not result.ok:
        if b"No such" in result.stderr or b"no such" in result.stderr:
            return None
        raise ModuleFailure(f"docker container inspect {name} failed: {result.error_text()}")
    cid, status, running, pid, restarts, label = result.text().split("|")
    netns = None
    if int(pid) > 0:
        found = connector.run(f"readlink /proc/{int(pid)}/ns/net")
        netns = found.text() if found.ok else None
    return ContainerState(cid, status, running == "true", int(pid), int(restarts),
                          None if label in ("", _NO_VALUE) else label, netns)


def image_present(connector: Connector, tag: str) -> bool:
    return connector.run(f"docker image inspect {shlex.quote(tag)} >/dev/null 2>&1").ok


def container_logs(connector: Connector, name: str, lines: int = 5) -> str:
    """The last lines the container printed (for a message), or ''."""
    result = connector.run(f"docker logs --tail {lines} {shlex.quote(name)} 2>&1")
    return " | ".join(line.strip() for line in result.text().splitlines() if line.strip())[-1500:]
