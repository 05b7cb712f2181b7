"""A workload's Envoy sidecar on a container host as data: its name, mounts, limits, labels, and the `docker`
arguments that run or validate it. Pure: it must not run docker or read the host (mesh.containers.modules does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.config import paths
from mesh.containers.image import ENVOY_IN_IMAGE, SIDECAR_UID
from mesh.inventory.model import ManagedHost, Workload
from mesh.render import envoy_start_script

SIDECAR_PREFIX = "mesh-envoy-"
MEMORY_LIMIT = "256m"
PIDS_LIMIT = 1024
LOG_LEVEL = "warn"
LABEL_MANAGED_BY = "mesh.managed-by"
LABEL_PROXY = "mesh.proxy"
LABEL_APP = "mesh.app-container"
LABEL_CONFIG_HASH = "mesh.config-hash"
HASH_DIGITS = 16


class NotAContainerWorkload(ValueError):
    """A sidecar was asked for a workload with no `container` (a VM workload): a caller's bug."""


@dataclass(frozen=True)
class Mount:
    """A bind mount, read-only unless writable: the same path on the host and in the sidecar."""

    path: str
    writable: bool = False


@dataclass(frozen=True)
class SidecarSpec:
    """Everything that decides the sidecar container; `revision` changes whenever any of it does."""

    name: str
    proxy: str
    host: str
    app_container: str
    image: str
    config_path: str
    base_id: int
    config_hash: str  # of the bootstrap (envoy.yaml) and the image: what only a new container takes
    mounts: tuple[Mount, ...]
    user: str = f"{SIDECAR_UID}:{SIDECAR_UID}"
    memory: str = MEMORY_LIMIT
    pids_limit: int = PIDS_LIMIT
    log_level: str = LOG_LEVEL
    start: str | None = None  # mesh_delivery: xds: the start step (paths.ENVOY_START) is the entrypoint

    @property
    def revision(self) -> str:
        """The `mesh.config-hash` label: a hash of config_hash and every other field (what `docker run` gets)."""
        body = "\0".join([self.config_hash, *_run_args(self, label=None)])
        return hashlib.sha256(body.encode()).hexdigest()[:HASH_DIGITS]

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_MANAGED_BY: "mesh", LABEL_PROXY: self.proxy, LABEL_APP: self.app_container,
                LABEL_CONFIG_HASH: self.revision}


def sidecar_name(workload: Workload) -> str:
    """`mesh-envoy-<proxy>`: mesh's own prefix (never a name the user gave) and the proxy name of design12."""
    return SIDECAR_PREFIX + paths.proxy_name(workload)


def sidecar_mounts(proxy: str, start: str | None = None) -> tuple[Mount, ...]:
    """The proxy's folder, whole and read-only: everything Envoy reads is in it (envoy.yaml, xds/, ca.pem, the
    `tls` link), and a folder mount shows the renames that replace them (a single-file mount would keep the old
    inode); the folder of Envoy's admin socket writable (a file socket there is the host's root's to read, out
    of the app container's reach; the start step writes its `delivery` marker there); an xds proxy's start step,
    read-only, at its path on the host."""
    start_mount = (Mount(start),) if start is not None else ()
    return (Mount(paths.proxy_dir(proxy)), Mount(paths.admin_dir(proxy), writable=True), *start_mount)


def files_hash(file_digests: Mapping[str, str], image: str) -> str:
    """The config_hash of a sidecar: the sha256 of each file it reads (path -> hex digest) and its image."""
    digest = hashlib.sha256(image.encode())
    for path, hexdigest in sorted(file_digests.items()):
        digest.update(f"\0{path}\0{hexdigest}".encode())
    return digest.hexdigest()[:HASH_DIGITS]


def file_modes(proxy: str) -> tuple[tuple[str, int, int, int], ...]:
    """(path, uid, gid, mode) the sidecar's user needs on the host: the key 0600 owned by it, the folder and
    config readable by its group, numerically (the host need not know the sidecar's user by name)."""
    uid = SIDECAR_UID
    return ((paths.proxy_dir(proxy), 0, uid, 0o750), (paths.key_path(proxy), uid, uid, 0o600),
            (paths.envoy_config_path(proxy), 0, uid, 0o640))


def hashed_files(proxy: str) -> tuple[str, ...]:
    """The files whose content goes into config_hash: the bootstrap only. Envoy reloads the resource files
    (xds/), the certificate and the trust bundle in place, so a change of those must not replace the container."""
    return (paths.envoy_config_path(proxy),)


def sidecar_spec(host: ManagedHost, workload: Workload, image_tag: str, config_hash: str,
                 xds: bool = False) -> SidecarSpec:
    """The sidecar of `workload` (on container host `host`) running image_tag with the files of config_hash;
    `xds` (mesh_delivery: xds): Envoy runs through the start step, which picks envoy-ads.yaml or envoy.yaml."""
    if not workload.container:
        raise NotAContainerWorkload(f"{workload.consul_id} has no container: it is not a container workload")
    if host.kind != "container_host":
        raise NotAContainerWorkload(f"{host.name} is not a container host (mesh_host_kind: {host.kind})")
    proxy = paths.proxy_name(workload)
    start = paths.ENVOY_START if xds else None
    return SidecarSpec(name=sidecar_name(workload), proxy=proxy, host=host.name, app_container=workload.container,
                       image=image_tag, config_path=paths.envoy_config_path(proxy),
                       base_id=paths.base_id(workload), config_hash=config_hash, mounts=sidecar_mounts(proxy, start),
                       start=start)


def bootstrap_sidecar(host: ManagedHost, workload: Workload, image_tag: str, bootstrap_path: str,
                      bootstrap_sha256: str, xds: bool = False) -> SidecarSpec:
    """The sidecar as the plan wants it: its config_hash is the bootstrap's and the image's only (Envoy reloads
    everything else in place; an xds proxy's envoy.yaml carries the digest of envoy-ads.yaml too), and an xds
    proxy's start step's (a single-file mount keeps the old file when a deploy replaces it: a new container takes
    the new one). The one formula the plan and `mesh status` share."""
    digests = {bootstrap_path: bootstrap_sha256}
    if xds:
        digests[paths.ENVOY_START] = hashlib.sha256(envoy_start_script().encode()).hexdigest()
    return sidecar_spec(host, workload, image_tag, files_hash(digests, image_tag), xds)


def docker_run_args(spec: SidecarSpec) -> list[str]:
    """`docker` arguments (from `run`) that start the sidecar, detached, in the app container's namespace."""
    return _run_args(spec, label=spec.revision)


def validate_args(spec: SidecarSpec, config_path: str | None = None) -> list[str]:
    """`docker` arguments of a throwaway sidecar that runs `envoy --mode validate` on config_path (by default
    the sidecar's config) with the same image, user and mounts, and no network."""
    return ["run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", spec.user, "--memory", spec.memory,
            *_mount_args(spec, with_start=False), spec.image,
            "--mode", "validate", "-c", config_path or spec.config_path, "--disable-hot-restart",
            "--log-level", "error"]  # fmt: skip


def _run_args(spec: SidecarSpec, label: str | None) -> list[str]:
    labels = [LABEL_MANAGED_BY, "mesh", LABEL_PROXY, spec.proxy, LABEL_APP, spec.app_container]
    labels += [LABEL_CONFIG_HASH, label] if label is not None else []
    return [
        "run", "--detach", "--name", spec.name,
        "--network", f"container:{spec.app_container}",
        "--restart", "always",
        "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=16m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--user", spec.user,
        "--memory", spec.memory, "--pids-limit", str(spec.pids_limit),
        "--log-opt", "max-size=10m", "--log-opt", "max-file=3",
        *[word for key, value in zip(labels[::2], labels[1::2], strict=True)
          for word in ("--label", f"{key}={value}")],
        *_mount_args(spec),
        *_entrypoint(spec),
        # no hot restart: its abstract unix sockets would be open to the app sharing the network namespace;
        # a resource file with a field Envoy does not know is refused whole (as the unit on a VM does)
        "--base-id", str(spec.base_id), "--disable-hot-restart",
        "--reject-unknown-dynamic-fields", "--log-level", spec.log_level,
        # access lines are written out every second (Envoy's default is 10 s)
        "--file-flush-interval-msec", "1000",
    ]  # fmt: skip


def _entrypoint(spec: SidecarSpec) -> list[str]:
    """The image and what runs in it: Envoy with the bootstrap, or (xds) the start step choosing one for Envoy."""
    if spec.start is None:
        return [spec.image, "-c", spec.config_path]
    return ["--entrypoint", spec.start, spec.image, paths.proxy_dir(spec.proxy), ENVOY_IN_IMAGE]


def _mount_args(spec: SidecarSpec, with_start: bool = True) -> list[str]:
    """--volume of each mount (the start step's left out of a validating container: it runs Envoy alone)."""
    return [word for mount in spec.mounts if with_start or mount.path != spec.start
            for word in ("--volume", f"{mount.path}:{mount.path}:{'rw' if mount.writable else 'ro'}")]
