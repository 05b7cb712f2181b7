"""Facts about containers and images on a Docker host, read through the connector with the docker CLI.
It owns parsing `docker inspect`; it must not change anything on the host (facts are read in check mode too).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from mesh.containers.sidecar import LABEL_CONFIG_HASH
from mesh.deploy.errors import ModuleFailure
from mesh.hosts.connection import Connector

_FORMAT = ("{{.Id}}|{{.State.Status}}|{{.State.Running}}|{{.State.Pid}}|{{.RestartCount}}|"
           f'{{{{index .Config.Labels "{LABEL_CONFIG_HASH}"}}}}'
           # JSON never holds a raw tab, so the port maps can follow the fields above tab-separated.
           "\t{{json .HostConfig.PortBindings}}\t{{json .HostConfig.PublishAllPorts}}"
           "\t{{json .NetworkSettings.Ports}}")
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
    published: tuple[str, ...] = ()  # ports published on the Docker host (published_ports)


def container_state(connector: Connector, name: str) -> ContainerState | None:
    """The container's state, or None when the host has no container of that name."""
    quoted = shlex.quote(name)
    result = connector.run(f"docker container inspect --format {shlex.quote(_FORMAT)} {quoted}")
    if not result.ok:
        if b"No such" in result.stderr or b"no such" in result.stderr:
            return None
        raise ModuleFailure(f"docker container inspect {name} failed: {result.error_text()}")
    fields, *ports = result.text().split("\t")
    cid, status, running, pid, restarts, label = fields.split("|")
    netns = None
    if int(pid) > 0:
        found = connector.run(f"readlink /proc/{int(pid)}/ns/net")
        netns = found.text() if found.ok else None
    return ContainerState(cid, status, running == "true", int(pid), int(restarts),
                          None if label in ("", _NO_VALUE) else label, netns, _published(name, ports))


def published_ports(bindings: Any, publish_all: Any, ports: Any) -> tuple[str, ...]:
    """The container's ports published on the Docker host, as `9090/tcp -> 0.0.0.0:8080` (host address and port
    when Docker has bound them, else `9090/tcp -> :8080` as configured, `:random` for -P): from `docker
    inspect`'s HostConfig.PortBindings (what `-p` asked for, also while stopped), HostConfig.PublishAllPorts
    (`-P`) and NetworkSettings.Ports (what is bound now; an exposed port that is not published maps to null)."""
    found: dict[str, list[str]] = {}
    for port, bound in sorted((ports or {}).items()):
        for binding in bound or []:
            found.setdefault(port, []).append(f"{binding.get('HostIp') or ''}:{binding.get('HostPort') or ''}")
    for port, asked in sorted((bindings or {}).items()):
        if port not in found:
            found[port] = [f"{b.get('HostIp') or ''}:{b.get('HostPort') or 'random'}" for b in asked or [{}]]
    if publish_all is True and not found:
        found["all exposed ports (-P)"] = [":random"]
    return tuple(f"{port} -> {', '.join(sorted(set(hosts)))}" for port, hosts in sorted(found.items()))


def _published(name: str, ports: list[str]) -> tuple[str, ...]:
    if len(ports) != 3:
        raise ModuleFailure(f"docker container inspect {name}: unexpected output (no port maps)")
    try:
        bindings, publish_all, bound = (json.loads(text) for text in ports)
    except ValueError as exc:
        raise ModuleFailure(f"docker container inspect {name}: unreadable port maps ({exc})") from None
    return published_ports(bindings, publish_all, bound)


def image_present(connector: Connector, tag: str) -> bool:
    return connector.run(f"docker image inspect {shlex.quote(tag)} >/dev/null 2>&1").ok


def container_logs(connector: Connector, name: str, lines: int = 5) -> str:
    """The last lines the container printed (for a message), or ''."""
    result = connector.run(f"docker logs --tail {lines} {shlex.quote(name)} 2>&1")
    return " | ".join(line.strip() for line in result.text().splitlines() if line.strip())[-1500:]
