"""The plan's shapes: frozen, hashable, serialisable without secrets. It owns what a plan holds; build.py
fills it and must be pure, changes.py compares it with what hosts hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.catalog import Registration
from mesh.config.model import ProxyConfig
from mesh.containers.sidecar import SidecarSpec
from mesh.inventory.model import ManagedHost, Workload
from mesh.render import ProxyFiles

Effect = Literal["restart", "reload", "none"]
"""What a changed file asks of its proxy: a restart (bootstrap, unit), nothing but the move (Envoy watches the
file and reloads it), or nothing at all (not a proxy's file)."""


@dataclass(frozen=True)
class PlannedFile:
    """A file mesh owns on a host: its content, mode and owner (names, or numeric ids given as digits)."""

    path: str
    content: bytes = field(repr=False)
    mode: int
    owner: str
    group: str
    effect: Effect = "none"
    secret: bool = False  # its content is never printed, diffed or saved: only its sha256
    check: str | None = None  # a command checking the staged file on the host (`%s`: its path), e.g. nft -c -f
    # a running controller keeps it current (an endpoint file): written only when missing, never compared
    controller_owned: bool = False
    sha256: str = field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.content).hexdigest())

    @property
    def text(self) -> str | None:
        """The content as text for a diff; None for a secret or binary content."""
        if self.secret:
            return None
        try:
            return self.content.decode()
        except UnicodeDecodeError:
            return None

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "mode": f"{self.mode:04o}", "owner": self.owner,
                                   "group": self.group, "effect": self.effect, "secret": self.secret}
        if self.controller_owned:
            summary["controller_owned"] = True
        return summary


@dataclass(frozen=True)
class PlannedFolder:
    path: str
    mode: int
    owner: str
    group: str

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "mode": f"{self.mode:04o}", "owner": self.owner, "group": self.group}


@dataclass(frozen=True)
class ProxyPlan:
    """One proxy: its Envoy config, its files in the order they are moved into place, its unit (VMs) or
    sidecar (container hosts), the user its Envoy runs as, and the certificate it must hold."""

    name: str
    workload: Workload
    config: ProxyConfig
    user: str  # a user name on a VM; the sidecar's uid (digits) on a container host
    folders: tuple[PlannedFolder, ...]
    files: tuple[PlannedFile, ...]  # the trust bundle, secrets, resources, the bootstrap last
    unit: PlannedFile | None
    bootstrap_sha256: str  # node.metadata of the bootstrap: what /server_info shows when Envoy runs these files
    rendered: ProxyFiles = field(repr=False)  # Envoy's files as rendered: how they are staged, checked, moved
    sidecar: SidecarSpec | None = None

    @property
    def spiffe_id(self) -> str:
        return self.workload.spiffe_id

    def all_files(self) -> tuple[PlannedFile, ...]:
        return self.files + ((self.unit,) if self.unit is not None else ())

    def file(self, path: str) -> PlannedFile:
        for planned in self.all_files():
            if planned.path == path:
                return planned
        raise KeyError(path)


@dataclass(frozen=True)
class HostPlan:
    """Everything one managed host must hold."""

    host: ManagedHost
    proxies: tuple[ProxyPlan, ...]
    folders: tuple[PlannedFolder, ...]  # host-wide folders, before the files
    files: tuple[PlannedFile, ...]  # host-wide files: trust bundle, firewall, container scripts, checker files
    users: tuple[str, ...]  # system users mesh creates (each proxy's, the checker's)
    units: tuple[str, ...]  # units that must be enabled and active
    envoy_sha256: str | None = None  # VMs: the Envoy binary at paths.ENVOY_BINARY
    sidecar_image: str | None = None  # container hosts: the image tag sidecars run
    checker_identity: str | None = None  # controllers: the checker's SPIFFE id

    @property
    def name(self) -> str:
        return self.host.name

    def proxy(self, name: str) -> ProxyPlan:
        for proxy in self.proxies:
            if proxy.name == name:
                return proxy
        raise KeyError(name)

    def file(self, path: str) -> PlannedFile:
        for planned in self.every_file():
            if planned.path == path:
                return planned
        raise KeyError(path)

    def every_file(self) -> Iterator[PlannedFile]:
        yield from self.files
        for proxy in self.proxies:
            yield from proxy.all_files()

    def every_folder(self) -> Iterator[PlannedFolder]:
        yield from self.folders
        for proxy in self.proxies:
            yield from proxy.folders

    def summary(self) -> dict[str, Any]:
        """The host's plan without file contents (secrets included): what a digest and a saved plan hold."""
        return {"host": self.name, "kind": self.host.kind,
                "proxies": [{"name": proxy.name, "user": proxy.user, "bootstrap_sha256": proxy.bootstrap_sha256,
                             "spiffe_id": proxy.spiffe_id,
                             "sidecar": proxy.sidecar.revision if proxy.sidecar else None}
                            for proxy in self.proxies],
                "folders": [folder.summary() for folder in self.every_folder()],
                "files": [planned.summary() for planned in self.every_file()],
                "users": list(self.users), "units": list(self.units), "envoy_sha256": self.envoy_sha256,
                "sidecar_image": self.sidecar_image, "checker_identity": self.checker_identity}

    @property
    def digest(self) -> str:
        return _digest(self.summary())


@dataclass(frozen=True)
class Plan:
    """The whole fleet's plan: one per deploy, computed before any host is touched."""

    mesh_id: str
    ca_fingerprint: str
    hosts: tuple[HostPlan, ...]
    registrations: tuple[Registration, ...] = ()  # every instance as Consul must list it (catalog.sync's input)
    # the digest of the plan without the controllers' spec.json (which holds it): what a controller running this
    # plan publishes in its state; "" when no controller is planned
    controller_digest: str = ""

    def host(self, name: str) -> HostPlan:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        return {"mesh_id": self.mesh_id, "ca_fingerprint": self.ca_fingerprint,
                "hosts": [host.summary() for host in self.hosts],
                "consul": [{"node": item.node, "address": item.address, **item.service_body()}
                           for item in self.registrations]}

    @property
    def digest(self) -> str:
        """The plan's hash: equal for two plans that would put the same things on the same hosts."""
        return _digest(self.summary())

    @property
    def stable_digest(self) -> str:
        """The hash of what the plan puts where, whatever the order of hosts' workloads in the inventory (a
        reordering changes nothing on hosts), nor whether a controller answered when it was made (which files
        are the controller's is no content): what the controllers' spec.json carries."""
        summary = self.summary()
        for host in summary["hosts"]:
            for planned in host["files"]:
                planned.pop("controller_owned", None)
            for key, field_name in (("proxies", "name"), ("folders", "path"), ("files", "path")):
                host[key] = sorted(host[key], key=lambda item, name=field_name: item[name])  # type: ignore[misc]
            host["users"], host["units"] = sorted(host["users"]), sorted(host["units"])
        summary["hosts"] = sorted(summary["hosts"], key=lambda host: host["host"])
        summary["consul"] = sorted(summary["consul"], key=lambda item: json.dumps(item, sort_keys=True))
        return _digest(summary)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
