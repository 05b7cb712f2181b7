"""What the mesh.* modules share during one deploy: the mesh, the CA, Envoy's binary, the controller wheels,
and which proxies changed on each host. It owns that per-run state; it must not reach hosts.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mesh.config import paths
from mesh.config.compute import compute_proxy_config
from mesh.config.model import ProxyConfig
from mesh.deploy.errors import ModuleFailure
from mesh.inventory.model import Mesh, Workload
from mesh.pki import CertificateAuthority


@dataclass(frozen=True)
class LocalFile:
    """A file on the machine running mesh that a deploy pushes when the host's copy differs."""

    path: Path

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True)
class ControllerWheels:
    """The wheel set controllers install, and the marker their venv records once installed."""

    wheels: tuple[Path, ...]
    marker: str


@dataclass
class DeployContext:
    """The `shared` object of a deploy's playbook run (one per run: nothing global)."""

    mesh: Mesh
    ca: CertificateAuthority
    envoy: LocalFile  # the binary pushed to hosts
    wheels: ControllerWheels | None = None
    local_envoy: str | None = None  # the Envoy that validates configs here first (default: the pushed one)
    _restarts: dict[str, set[str]] = field(default_factory=dict)
    _configs: dict[tuple[str, str], ProxyConfig] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def workload(self, host: str, proxy: str) -> Workload:
        """The workload behind proxy `<service>-<index>` on host; a failure of the task when unknown."""
        for workload in self.mesh.host(host).workloads:
            if paths.proxy_name(workload) == proxy:
                return workload
        raise ModuleFailure(f"{host} runs no proxy named {proxy!r} in the inventory")

    def proxy_config(self, host: str, proxy: str) -> ProxyConfig:
        """compute_proxy_config of that proxy, computed once per run."""
        with self._lock:
            key = (host, proxy)
            if key not in self._configs:
                self._configs[key] = compute_proxy_config(self.mesh, self.workload(host, proxy))
            return self._configs[key]

    def mark_restart(self, host: str, proxy: str) -> None:
        """Remember that a file of this proxy changed: the restart handler restarts it."""
        with self._lock:
            self._restarts.setdefault(host, set()).add(proxy)

    def restarts(self, host: str) -> list[str]:
        with self._lock:
            return sorted(self._restarts.get(host, set()))
