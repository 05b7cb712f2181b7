"""What the mesh.* modules share during one deploy: the mesh, its plan, the CA, Envoy's binary, the controller
wheels, and which proxies owe a restart on each host. It owns that per-run state; it must not reach hosts.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mesh.deploy.errors import ModuleFailure
from mesh.hosts.connection import Connector
from mesh.inventory.model import ManagedHost, Mesh, Workload
from mesh.pki import CertificateAuthority
from mesh.plan.changes import Change
from mesh.plan.model import HostPlan, Plan, ProxyPlan

_GZIP_LOCK = threading.Lock()


@dataclass(frozen=True)
class LocalFile:
    """A file on the machine running mesh that a deploy pushes when the host's copy differs."""

    path: Path
    cache_dir: Path | None = None  # where its gzip copy is kept (by sha256); None: a temp folder per process

    def gzipped(self) -> bytes:
        """The file gzip-compressed (level 6), made once per content and kept in cache_dir."""
        folder = self.cache_dir or Path(tempfile.gettempdir())
        packed = folder / f"{self.path.name}-{self.sha256}.gz"
        with _GZIP_LOCK:  # hosts deployed in parallel threads: one compresses, the others wait and read it
            if not packed.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                partial = packed.with_suffix(f".{os.getpid()}.tmp")
                with self.path.open("rb") as source, gzip.open(partial, "wb", compresslevel=6) as target:
                    shutil.copyfileobj(source, target, 1 << 20)
                os.replace(partial, packed)
        return packed.read_bytes()

    @cached_property
    def sha256(self) -> str:
        """The file's sha256: remembered in cache_dir with its size and mtime (Envoy is 100 MB)."""
        stat = self.path.stat()
        stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        key = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]  # one record per binary's path
        record = self.cache_dir / f"{self.path.name}-{key}.sha256" if self.cache_dir else None
        if record is not None:
            try:
                digest, _, recorded = record.read_text().partition(" ")
                if recorded.strip() == stamp and len(digest) == 64:
                    return digest
            except OSError:
                pass
        digest = self._hash()
        if record is not None:
            try:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(f"{digest} {stamp}\n")
            except OSError:
                pass  # a cache only
        return digest

    def _hash(self) -> str:
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
    """The `shared` object of a deploy's playbook run (one per run: nothing global): the plan the steps take
    their entries from, the changes observed before the run, the CA, and which proxies owe a restart."""

    mesh: Mesh
    ca: CertificateAuthority
    envoy: LocalFile  # the binary pushed to hosts
    plan: Plan
    wheels: ControllerWheels | None = None
    changes: Mapping[str, tuple[Change, ...]] = field(default_factory=dict)  # per host, observed before the run
    connect: Callable[[ManagedHost], Connector] | None = None  # reaches a controller for the health gate's probe
    checker_lock: threading.Lock = field(default_factory=threading.Lock)  # one probe at a time on that connection
    _restarts: dict[str, set[str]] = field(default_factory=dict)
    _changed: dict[str, set[str]] = field(default_factory=dict)
    _baselines: dict[tuple[str, str], Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def host_plan(self, host: str) -> HostPlan:
        try:
            return self.plan.host(host)
        except KeyError:
            raise ModuleFailure(f"{host} is not in this deploy's plan") from None

    def proxy(self, host: str, proxy: str) -> ProxyPlan:
        """The plan of proxy on host; a failure of the task when the plan has no such proxy."""
        try:
            return self.host_plan(host).proxy(proxy)
        except KeyError:
            raise ModuleFailure(f"{host} runs no proxy named {proxy!r} in the plan") from None

    def workload(self, host: str, proxy: str) -> Workload:
        return self.proxy(host, proxy).workload

    def mark_restart(self, host: str, proxy: str) -> None:
        """Remember that a file of this proxy that Envoy does not reload (bootstrap, unit) changed."""
        with self._lock:
            self._restarts.setdefault(host, set()).add(proxy)

    def restarts(self, host: str) -> list[str]:
        with self._lock:
            return sorted(self._restarts.get(host, set()))

    def mark_changed(self, host: str, proxy: str, baseline: Any = None) -> None:
        """Remember that this run changed what the proxy serves (the health gate checks it) and, the first time,
        how healthy it was before (mesh.deploy.steps.gate.Health)."""
        with self._lock:
            self._changed.setdefault(host, set()).add(proxy)
            if baseline is not None:
                self._baselines.setdefault((host, proxy), baseline)

    def changed(self, host: str) -> list[str]:
        with self._lock:
            return sorted(self._changed.get(host, set()))

    def has_baseline(self, host: str, proxy: str) -> bool:
        with self._lock:
            return (host, proxy) in self._baselines

    def baseline(self, host: str, proxy: str) -> Any:
        with self._lock:
            return self._baselines.get((host, proxy))

    def checker_connector(self) -> Connector | None:
        """A connection to the first controller of the mesh (for the gate's probe), or None."""
        if self.connect is None or not self.mesh.controllers:
            return None
        return self.connect(self.mesh.controllers[0])
