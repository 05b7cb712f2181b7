"""What makes each sidecar's proxy_port reachable on its container host's own address (and nothing else of the
containers), and the watcher that keeps sidecars joined to restarted apps. Pure rendering: it must not run them.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.config import paths
from mesh.containers.sidecar import sidecar_name
from mesh.inventory.model import ManagedHost
from mesh.render import TEMPLATES_DIR, template_environment

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

NAT_CHAIN = "MESH-SIDECARS"
FORWARD_CHAIN = "MESH-SIDECARS-FWD"
RULES_PATH = f"{paths.MESH_ROOT}/sidecar-rules.sh"
LIST_PATH = f"{paths.MESH_ROOT}/sidecars.list"
STATE_PATH = "/run/mesh/sidecar-rules.applied"
LOCK_PATH = "/run/mesh/sidecar-rules.lock"
WATCHER_PATH = "/usr/local/lib/mesh/mesh-sidecars"
WATCHER_UNIT = "mesh-sidecars.service"
WATCHER_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{WATCHER_UNIT}"


@dataclass(frozen=True)
class SidecarEntry:
    """One sidecar of a container host: its app container, its own name, the port forwarded to it."""

    app_container: str
    sidecar: str
    proxy_port: int


@dataclass(frozen=True)
class RulesContext:
    """templates/containers/sidecar-rules.sh.j2."""

    host: str
    entries: tuple[SidecarEntry, ...]
    nat_chain: str
    forward_chain: str
    rules_path: str
    state_path: str
    lock_path: str


@dataclass(frozen=True)
class ListContext:
    """templates/containers/sidecars.list.j2: the watcher's map of app containers to sidecars."""

    host: str
    entries: tuple[SidecarEntry, ...]
    watcher_path: str


@dataclass(frozen=True)
class WatcherContext:
    """templates/containers/mesh-sidecars.sh.j2."""

    host: str
    list_path: str
    rules_path: str


@dataclass(frozen=True)
class WatcherUnitContext:
    """templates/containers/mesh-sidecars.service.j2."""

    watcher_path: str


def sidecar_entries(host: ManagedHost) -> tuple[SidecarEntry, ...]:
    """The host's container workloads in inventory order (proxy_port is unique on a container host)."""
    return tuple(SidecarEntry(workload.container, sidecar_name(workload), workload.proxy_port)
                 for workload in host.workloads if workload.container)


def render_rules(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The idempotent iptables script (apply | check | remove) of mesh's chains on a container host."""
    context = RulesContext(host.name, sidecar_entries(host), NAT_CHAIN, FORWARD_CHAIN, RULES_PATH, STATE_PATH,
                           LOCK_PATH)
    return _shell(_render(templates_dir, "containers/sidecar-rules.sh.j2", context))


def render_sidecar_list(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """/etc/mesh/sidecars.list: `app_container sidecar proxy_port` per line, read by the watcher."""
    entries = sidecar_entries(host)
    text = _render(templates_dir, "containers/sidecars.list.j2", ListContext(host.name, entries, WATCHER_PATH))
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    if rows != [[e.app_container, e.sidecar, str(e.proxy_port)] for e in entries]:
        raise ValueError(f"rendered sidecar list of {host.name} does not list its sidecars one per line")
    return text


def render_watcher(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The watcher script (shell + docker CLI: no python3 is assumed on container hosts)."""
    context = WatcherContext(host.name, LIST_PATH, RULES_PATH)
    return _shell(_render(templates_dir, "containers/mesh-sidecars.sh.j2", context))


def render_watcher_unit(templates_dir: Path = TEMPLATES_DIR) -> str:
    """`mesh-sidecars.service`: the watcher, after Docker, restarted whenever it stops."""
    text = _render(templates_dir, "containers/mesh-sidecars.service.j2", WatcherUnitContext(WATCHER_PATH))
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.read_string(text)
    missing = {"Unit", "Service", "Install"} - set(parser.sections())
    if missing:
        raise ValueError(f"rendered {WATCHER_UNIT} lacks section(s) {sorted(missing)}")
    return text


def _render(templates_dir: Path, name: str, context: DataclassInstance) -> str:
    names = {field.name: getattr(context, field.name) for field in fields(context)}
    return template_environment(templates_dir).get_template(name).render(names)


def _shell(text: str) -> str:
    if not text.startswith("#!/bin/sh\n"):
        raise ValueError("a rendered script must start with #!/bin/sh")
    return text
