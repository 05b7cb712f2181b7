"""Where mesh keeps certificates on a managed host (trust bundles, proxy and sidecar leaves, the checker's leaf)
and reading those files from every managed host at once through a connector factory. It only reads; it must
not judge what it read (trust.py and mesh/pki/expiry.py do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from mesh.config import paths
from mesh.healthcheck.config import CA_FILE as CHECKER_CA_PATH
from mesh.healthcheck.config import CERT_FILE as CHECKER_CERT_PATH
from mesh.hosts.connection import Connector, RemoteError
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost

CHECKER_NAME = "health-checker"
DEFAULT_FORKS = 20


@dataclass(frozen=True)
class CertFile:
    """One certificate file on a host: a trust bundle (the mesh root), a leaf (with its chain), or a controller's
    intermediate (`issuer`, read by mesh/ca_rotation.py)."""

    host: str
    name: str  # the proxy (`web-0`), `health-checker`, or the bundle's user (`proxies`, `health-checker`)
    path: str
    kind: Literal["bundle", "leaf", "issuer"]


def trust_bundles(host: ManagedHost) -> tuple[CertFile, ...]:
    """The CA bundles a deploy writes on host: the proxies' (with workloads) and the checker's (controllers)."""
    found = []
    if host.workloads:
        found.append(CertFile(host.name, "proxies", paths.CA_PATH, "bundle"))
    if host.is_controller:
        found.append(CertFile(host.name, CHECKER_NAME, CHECKER_CA_PATH, "bundle"))
    return tuple(found)


def leaves(host: ManagedHost) -> tuple[CertFile, ...]:
    """Every leaf a deploy puts on host: one per proxy (VM Envoy or sidecar), and the checker's."""
    found = [CertFile(host.name, paths.proxy_name(workload), paths.cert_path(paths.proxy_name(workload)), "leaf")
             for workload in host.workloads]
    if host.is_controller:
        found.append(CertFile(host.name, CHECKER_NAME, CHECKER_CERT_PATH, "leaf"))
    return tuple(found)


def all_cert_files(host: ManagedHost) -> tuple[CertFile, ...]:
    return trust_bundles(host) + leaves(host)


@dataclass(frozen=True)
class HostFiles:
    """What one host gave back: each file's bytes (None when absent), or why a file or the host was not read."""

    host: str
    files: Mapping[str, bytes | None] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)  # path -> the host's error reading it
    unreachable: str | None = None


def read_host(host: ManagedHost, wanted: Sequence[CertFile], factory: Callable[[ManagedHost], Connector]) -> HostFiles:
    """The files of `wanted` on host, through one connector (closed after)."""
    files: dict[str, bytes | None] = {}
    errors: dict[str, str] = {}
    connector: Connector | None = None
    try:
        connector = factory(host)
        for item in wanted:
            try:
                files[item.path] = connector.get(item.path)
            except RemoteError as exc:
                errors[item.path] = str(exc)
    except HostUnreachable as exc:
        return HostFiles(host.name, unreachable=exc.detail)
    finally:
        if connector is not None:
            connector.close()
    return HostFiles(host.name, files, errors)


def read_hosts(hosts: Sequence[ManagedHost], select: Callable[[ManagedHost], Sequence[CertFile]],
               factory: Callable[[ManagedHost], Connector], forks: int = DEFAULT_FORKS) -> list[HostFiles]:
    """read_host on every host in parallel (at most forks at once), in the order of hosts."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts)))) as pool:
        return list(pool.map(lambda host: read_host(host, select(host), factory), hosts))
