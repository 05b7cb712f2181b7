"""What makes each sidecar's proxy_port and metrics_port reachable on its container host's own address (the
metrics port from the metrics sources only; nothing else of the containers), what closes each app's port to all
but its sidecar (and its metrics port to all but loopback and the metrics sources), and the watcher that keeps sidecars joined to
restarted apps. Rendering, with every name checked and every script passed through `sh -n` on this machine;
it must not run them on a host.
"""

from __future__ import annotations

import configparser
import re
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.config import paths
from mesh.containers.sidecar import sidecar_name
from mesh.inventory.model import ManagedHost
from mesh.inventory.values import source_family
from mesh.render import TEMPLATES_DIR, template_environment

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

NAT_CHAIN = "MESH-SIDECARS"
FORWARD_CHAIN = "MESH-SIDECARS-FWD"
APP_CHAIN = "MESH-APP"  # filter chain inside each app container's network namespace
RULES_PATH = f"{paths.MESH_ROOT}/sidecar-rules.sh"
LIST_PATH = f"{paths.MESH_ROOT}/sidecars.list"
STATE_PATH = "/run/mesh/sidecar-rules.applied"
APP_STATE_PATH = "/run/mesh/sidecar-app-rules.applied"
LOCK_PATH = "/run/mesh/sidecar-rules.lock"
WATCHER_PATH = "/usr/local/lib/mesh/mesh-sidecars"
WATCHER_UNIT = "mesh-sidecars.service"
WATCHER_UNIT_PATH = f"{paths.SYSTEMD_DIR}/{WATCHER_UNIT}"
# Docker's own rule for container names; the scripts take them unquoted, in single-quoted lists and in awk.
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
SH_CHECK_TIMEOUT_S = 10


class UnsafeScript(ValueError):
    """A rendered script that must not leave this machine: a name it would carry is not a plain container name, a
    port is out of range, a metrics source is not an IP address or plain host name, or `sh -n` refuses the text. The message names the script and the value."""


@dataclass(frozen=True)
class SidecarEntry:
    """One sidecar of a container host: its app container, its own name, the ports forwarded to it."""

    app_container: str
    sidecar: str
    proxy_port: int
    app_port: int
    metrics_port: int


@dataclass(frozen=True)
class AppGuard:
    """An app container whose port(s) only its sidecar may reach, and whose metrics port(s) (its sidecars') only
    loopback and the metrics sources: everything else is dropped in its namespace."""

    app_container: str
    ports: tuple[int, ...]
    metrics_ports: tuple[int, ...]


@dataclass(frozen=True)
class RulesContext:
    """templates/containers/sidecar-rules.sh.j2."""

    entries: tuple[SidecarEntry, ...]
    guards: tuple[AppGuard, ...]
    sources_v4: tuple[str, ...]
    sources_v6: tuple[str, ...]
    source_names: tuple[str, ...]
    nat_chain: str
    forward_chain: str
    app_chain: str
    rules_path: str
    state_path: str
    app_state_path: str
    lock_path: str


@dataclass(frozen=True)
class ListContext:
    """templates/containers/sidecars.list.j2: the watcher's map of app containers to sidecars."""

    entries: tuple[SidecarEntry, ...]
    watcher_path: str


@dataclass(frozen=True)
class WatcherContext:
    """templates/containers/mesh-sidecars.sh.j2."""

    list_path: str
    rules_path: str


@dataclass(frozen=True)
class WatcherUnitContext:
    """templates/containers/mesh-sidecars.service.j2."""

    watcher_path: str


def sidecar_entries(host: ManagedHost) -> tuple[SidecarEntry, ...]:
    """The host's container workloads in inventory order (proxy_port is unique on a container host), each name
    and port checked, since they go into scripts run as root (UnsafeScript otherwise)."""
    entries = tuple(SidecarEntry(workload.container, sidecar_name(workload), workload.proxy_port, workload.port,
                                 workload.metrics_port)
                    for workload in host.workloads if workload.container)
    for entry in entries:
        for name in (entry.app_container, entry.sidecar):
            if not (isinstance(name, str) and _CONTAINER_NAME.fullmatch(name)):
                raise UnsafeScript(f"container name {name!r} on a container host: expected letters, digits, "
                                   "'_', '.' and '-' (starting with a letter or digit)")
        for port in (entry.proxy_port, entry.app_port, entry.metrics_port):
            if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
                raise UnsafeScript(f"port {port!r} of container {entry.app_container}: expected 1-65535")
    return entries


def app_guards(entries: tuple[SidecarEntry, ...]) -> tuple[AppGuard, ...]:
    """Per app container (first seen first), the sorted app ports and metrics ports of its workloads."""
    ports: dict[str, set[int]] = {}
    metrics: dict[str, set[int]] = {}
    for entry in entries:
        ports.setdefault(entry.app_container, set()).add(entry.app_port)
        metrics.setdefault(entry.app_container, set()).add(entry.metrics_port)
    return tuple(AppGuard(app, tuple(sorted(found)), tuple(sorted(metrics[app]))) for app, found in ports.items())


def metrics_source_families(sources: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The metrics sources split into IPv4 addresses, IPv6 addresses and host names, order kept; UnsafeScript
    for anything else (they go into a script run as root)."""
    split: dict[str, list[str]] = {"ipv4": [], "ipv6": [], "name": []}
    for source in sources:
        family = source_family(source) if isinstance(source, str) else None
        if family is None:
            raise UnsafeScript(f"metrics source {source!r}: expected an IPv4 or IPv6 address or a host name of "
                               "letters, digits, '-' and '.'")
        split[family].append(source)
    return tuple(split["ipv4"]), tuple(split["ipv6"]), tuple(split["name"])


def render_rules(host: ManagedHost, metrics_sources: tuple[str, ...], templates_dir: Path = TEMPLATES_DIR) -> str:
    """The idempotent iptables script (apply | check | remove) of mesh's chains on a container host and in its
    app containers' network namespaces; metrics_sources (Mesh.metrics_sources) alone may reach the metrics
    ports."""
    entries = sidecar_entries(host)
    context = RulesContext(entries, app_guards(entries), *metrics_source_families(metrics_sources), NAT_CHAIN,
                           FORWARD_CHAIN, APP_CHAIN, RULES_PATH, STATE_PATH, APP_STATE_PATH, LOCK_PATH)
    return checked_script("sidecar-rules.sh", _render(templates_dir, "containers/sidecar-rules.sh.j2", context))


def render_sidecar_list(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """/etc/mesh/sidecars.list: `app_container sidecar proxy_port` per line, read by the watcher."""
    entries = sidecar_entries(host)
    text = _render(templates_dir, "containers/sidecars.list.j2", ListContext(entries, WATCHER_PATH))
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    if rows != [[e.app_container, e.sidecar, str(e.proxy_port)] for e in entries]:
        raise ValueError(f"rendered sidecar list of {host.name} does not list its sidecars one per line")
    return text


def render_watcher(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The watcher script (shell + docker CLI: no python3 is assumed on container hosts)."""
    context = WatcherContext(LIST_PATH, RULES_PATH)
    return checked_script("mesh-sidecars", _render(templates_dir, "containers/mesh-sidecars.sh.j2", context))


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


def checked_script(name: str, text: str) -> str:
    """text, a rendered script, once `/bin/sh -n` on this machine (the hosts run it with /bin/sh) has parsed it
    without error; UnsafeScript otherwise, naming the script and the shell's complaint."""
    if not text.startswith("#!/bin/sh\n"):
        raise UnsafeScript(f"the rendered {name} does not start with #!/bin/sh")
    if "\0" in text or "\r" in text:
        raise UnsafeScript(f"the rendered {name} holds a NUL or carriage return")
    try:
        parsed = subprocess.run(["/bin/sh", "-n"], input=text.encode(), capture_output=True, check=False,
                                timeout=SH_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UnsafeScript(f"`sh -n` did not finish parsing the rendered {name}") from None
    if parsed.returncode != 0:
        complaint = parsed.stderr.decode(errors="replace").strip()[:500]
        raise UnsafeScript(f"the rendered {name} is not valid shell (`sh -n`: {complaint}); nothing was sent")
    return text
