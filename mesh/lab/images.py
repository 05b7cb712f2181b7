"""The lab's cached artifacts (node rootfs, demo app image tarball, Consul binary), built once, keyed by recipe.

It builds and caches files only: it boots nothing, starts no daemon and touches no network namespace.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from mesh.errors import MeshError
from mesh.lab import debian

Progress = Callable[[str], None]
Builder = Callable[["Recipe", Path, Progress], None]

DEFAULT_CACHE_DIR = Path("/var/cache/mesh-lab")
CACHE_ENV = "MESH_LAB_CACHE"
MARKER = ".complete"
GIB = 1 << 30
MIB = 1 << 20
# debootstrap alternates these per package; report them as one step
SAME_PHASE = {"Validating": "Retrieving"}

NODE_SUITE = "bookworm"
NODE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "ca-certificates", "python3", "curl",
    "openssl", "nftables", "iptables", "procps", "docker.io", "sudo",
)  # fmt: skip
# Docker's units: only the container host enables them, at its first boot. The rest would reach for a
# package mirror (nothing in the lab does) or scrub disks a node does not own.
NODE_DISABLED_UNITS = (
    "docker.service", "docker.socket", "containerd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
)  # fmt: skip
# Bump when the build steps change (not the package list: that is in the key already).
NODE_SCRIPT_VERSION = 2

APP_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
APP_SCRIPT_VERSION = 2
# Not needed to run Python in a container: docs, translations, and glibc's iconv modules (Python has its own codecs).
APP_EXCLUDED_PREFIXES = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/",
                         "usr/share/lintian/", "usr/lib/x86_64-linux-gnu/gconv/")
APP_SCRIPT_PATH = "opt/mesh-demo/demoapp.py"

CONSUL_SUITE = "bullseye"
CONSUL_PACKAGE = "consul"
CONSUL_VERSION_PREFIX = "1.8.7"
CONSUL_SCRIPT_VERSION = 2
# The one build of Debian bullseye's consul package the lab runs, per machine architecture, with the SHA-256
# the repository keeps for it: a mirror serving anything else is refused.
CONSUL_DEBS = {
    "x86_64": ("1.8.7+dfsg1-2+b3", "e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"),
}


def log_progress(message: str) -> None:
    """The default progress reporter: one structlog line per step."""
    structlog.get_logger("mesh.lab.images").info("lab.image", step=message)


@dataclass(frozen=True)
class Recipe:
    """What an artifact is made of; its key (a hash of everything but the space estimate) names its cache dir."""

    name: str
    suite: str
    packages: tuple[str, ...]
    script_version: int
    inputs: tuple[tuple[str, str], ...] = ()  # other things the result depends on, e.g. a file's hash
    min_free_bytes: int = field(default=GIB, compare=False)

    @property
    def key(self) -> str:
        blob = json.dumps(
            {
                "name": self.name,
                "suite": self.suite,
                "packages": sorted(self.packages),
                "script_version": self.script_version,
                "inputs": sorted(self.inputs),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    """The parameter, else $MESH_LAB_CACHE, else /var/cache/mesh-lab."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def artifact_dir(recipe: Recipe, cache_dir: Path) -> Path:
    return cache_dir / f"{recipe.name}-{recipe.key}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_artifact(recipe: Recipe, builder: Builder, cache_dir: Path | None = None,
                    progress: Progress = log_progress) -> Path:
    """Return the artifact's complete cache dir, building it first when it is missing or half-built.

    The builder fills an empty staging dir; the dir gets a marker and is renamed into place, so a crash
    leaves only a staging dir (removed by the next call) and never a dir that looks complete.
    """
    cache = resolve_cache_dir(cache_dir)
    final = artifact_dir(recipe, cache)
    if is_complete(final):
        return final
    _make_cache_dir(cache)
    with _build_lock(cache, recipe.name):
        if is_complete(final):  # another process built it while we waited
            return final
        for leftover in sorted(cache.glob(f".build-{recipe.name}-*")):
            progress(f"{recipe.name}: removing the leftovers of an interrupted build ({leftover.name})")
            remove_tree(leftover)
        if final.exists():
            progress(f"{recipe.name}: {final.name} has no completion marker; rebuilding it")
            remove_tree(final)
        check_free_space(cache, recipe.min_free_bytes)
        staging = cache / f".build-{recipe.name}-{recipe.key}"
        staging.mkdir()
        started = time.monotonic()
        progress(f"{recipe.name}: building {final.name} (once; later runs reuse it)")
        try:
            builder(recipe, staging, progress)
        except BaseException:
            remove_tree(staging)
            raise
        seconds = round(time.monotonic() - started, 1)
        marker = {"recipe": _recipe_data(recipe), "key": recipe.key, "seconds": seconds}
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        os.sync()  # the marker must never reach the disk before the files it vouches for
        os.rename(staging, final)
        progress(f"{recipe.name}: built {final.name} in {seconds} s")
    return final


def _recipe_data(recipe: Recipe) -> dict[str, object]:
    return {"name": recipe.name, "suite": recipe.suite, "packages": list(recipe.packages),
            "script_version": recipe.script_version, "inputs": [list(pair) for pair in recipe.inputs]}


def _make_cache_dir(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise MeshError(f"cannot create the lab cache {cache}: permission denied",
                        hint=f"mesh lab runs as root; or set {CACHE_ENV} to a writable folder") from exc


@contextmanager
def _build_lock(cache: Path, name: str) -> Iterator[None]:
    with open(cache / f".lock-{name}", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_free_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise MeshError(
            f"not enough free disk space in {path}: {free / GIB:.1f} GB free, about {needed / GIB:.1f} GB needed",
            hint=f"free some space, or set {CACHE_ENV} to a folder on a larger disk",
        )


def remove_tree(path: Path) -> None:
    """Remove a dir a build may have left, unmounting what a crashed debootstrap left mounted inside first."""
    for mount_point in sorted(_mounts_under(path), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
    remaining = _mounts_under(path)
    if remaining:
        raise MeshError(f"cannot remove {path}: {remaining[0]} is still mounted", hint="unmount it and retry")
    shutil.rmtree(path)


def _mounts_under(path: Path) -> list[Path]:
    root = path.resolve()
    mounts = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            mount_point = Path(_unescape_mount(line.split()[4]))
            if mount_point == root or root in mount_point.parents:
                mounts.append(mount_point)
    return mounts


def _unescape_mount(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise MeshError(f"{what} needs root", hint="run mesh lab as root (sudo)")


def require_tool(command: str, package: str) -> str:
    found = shutil.which(command)
    if found is None:
        raise MeshError(f"`{command}` is not installed", hint=f"apt-get install -y {package}")
    return found


def run_streamed(argv: list[str], progress: Progress, label: str, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
    """Run a long command, reporting each new phase of its `I: ...` lines; fail with its last lines."""
    tail: list[str] = []
    last_phase = ""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            phase = line[3:].split(" ", 1)[0] if line.startswith("I: ") else ""
            phase = SAME_PHASE.get(phase, phase)
            if phase and phase != last_phase:
                last_phase = phase
                progress(f"{label}: {line[3:]}")
    if proc.returncode != 0:
        raise MeshError(f"{label} failed: `{' '.join(argv)}` exited with {proc.returncode}:\n" + "\n".join(tail))


def run_checked(argv: list[str], what: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace", check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise MeshError(f"{what} failed: `{' '.join(argv)}` exited with {result.returncode}: {output}")
    return result.stdout


# ---- the node rootfs -----------------------------------------------------------------------------------


def node_rootfs_recipe() -> Recipe:
    return Recipe("node-rootfs", NODE_SUITE, NODE_PACKAGES, NODE_SCRIPT_VERSION, min_free_bytes=3 * GIB // 2)


def ensure_node_rootfs(cache_dir: Path | None = None, progress: Progress = log_progress,
                       builder: Builder | None = None) -> Path:
    """The shared bookworm rootfs every lab node boots from (read-only: give each node its own layer).

    SSH host keys, /etc/hostname and the machine id are not in it (each node needs its own); docker and
    containerd are installed but disabled.
    """
    recipe = node_rootfs_recipe()
    return ensure_artifact(recipe, builder or build_node_rootfs, cache_dir, progress) / "rootfs"


def build_node_rootfs(recipe: Recipe, staging: Path, progress: Progress) -> None:
    require_root("building the lab's node rootfs (debootstrap)")
    debootstrap = require_tool("debootstrap", "debootstrap")
    mirror = debian.debian_mirror()
    rootfs = staging / "rootfs"
    argv = [debootstrap, "--variant=minbase", f"--include={','.join(recipe.packages)}", recipe.suite,
            str(rootfs), mirror]
    progress(f"node rootfs: debootstrap {recipe.suite} from {mirror} (about a minute)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    run_streamed(argv, progress, "debootstrap", env=env)
    if _mounts_under(rootfs):
        raise MeshError(f"debootstrap left mounts under {rootfs}: {', '.join(map(str, _mounts_under(rootfs)))}")
    strip_per_node_state(rootfs)
    disable_units(rootfs, NODE_DISABLED_UNITS)


def strip_per_node_state(rootfs: Path) -> None:
    """Remove what must differ per node (host keys, identity) and what only the build needed."""
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/machine-id").write_text("")  # empty: systemd sets one at boot
    for path in ("var/lib/dbus/machine-id", "etc/hostname", "var/lib/systemd/random-seed"):
        target = rootfs / path
        if target.is_file() and not target.is_symlink():
            target.unlink()
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)  # the build machine's; nodes reach no resolver
    (rootfs / "etc/resolv.conf").write_text("")
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for leftover in rootfs.glob(pattern):
            leftover.unlink()


def disable_units(rootfs: Path, units: tuple[str, ...]) -> None:
    """What `systemctl disable` does offline: drop the units' links from every *.wants dir."""
    for wants in (rootfs / "etc/systemd/system").glob("*.wants"):
        for unit in units:
            (wants / unit).unlink(missing_ok=True)
    left = [str(p) for unit in units for p in (rootfs / "etc/systemd/system").glob(f"*.wants/{unit}")]
    if left:
        raise MeshError(f"could not disable {', '.join(left)} in the node rootfs")


# ---- the demo app image -------------------------------------------------------------------------------


def demoapp_source() -> Path:
    return Path(__file__).with_name("demoapp.py")


def app_image_recipe(base: Recipe) -> Recipe:
    script_hash = hashlib.sha256(demoapp_source().read_bytes()).hexdigest()
    return Recipe("app-image", base.suite, APP_PACKAGES, APP_SCRIPT_VERSION,
                  inputs=(("base", base.key), ("demoapp.py", script_hash)), min_free_bytes=300 * MIB)


def ensure_app_image_tar(cache_dir: Path | None = None, progress: Progress = log_progress,
                         builder: Builder | None = None) -> Path:
    """A tarball for `docker import`: Python (from the node rootfs) and the demo app at /opt/mesh-demo/.

    The image's tag should be the key (the parent dir's suffix): `mesh-demo-app:<app_image_key()>`.
    """
    recipe = app_image_recipe(node_rootfs_recipe())

    def build(recipe: Recipe, staging: Path, progress: Progress) -> None:
        base_rootfs = ensure_node_rootfs(cache_dir, progress)
        build_app_image(base_rootfs, staging / "app.tar", recipe.packages, progress)

    return ensure_artifact(recipe, builder or build, cache_dir, progress) / "app.tar"


def app_image_key() -> str:
    """The app image's tag: changes with the node rootfs recipe, the app packages and demoapp.py."""
    return app_image_recipe(node_rootfs_recipe()).key


def build_app_image(base_rootfs: Path, tar_path: Path, packages: tuple[str, ...], progress: Progress) -> None:
    require_root("building the demo app image")
    progress(f"app image: copying {', '.join(packages)} and their dependencies from the node rootfs")
    files = debian.package_files(base_rootfs, debian.dependency_closure(base_rootfs, packages))
    files = [name for name in files if not name.startswith(APP_EXCLUDED_PREFIXES)]
    tree = tar_path.parent / "tree"
    debian.copy_files(base_rootfs, tree, files)
    for name in ("etc/passwd", "etc/group", "etc/nsswitch.conf"):
        debian.copy_files(base_rootfs, tree, [name])
    (tree / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    python = tree / "usr/bin/python3"
    if not python.exists():
        python.symlink_to("python3.11")
    script = tree / APP_SCRIPT_PATH
    script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demoapp_source(), script)
    run_checked(["chroot", str(tree), "/usr/bin/python3", "-c",
                 "import http.server, json, socket, argparse, signal, urllib.request"],
                "checking the app image's Python")
    progress("app image: writing the tarball")
    run_checked(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(tar_path), "."], "tar")
    shutil.rmtree(tree)


# ---- Consul ---------------------------------------------------------------------------------------------


def consul_recipe() -> Recipe:
    return Recipe("consul", CONSUL_SUITE, (CONSUL_PACKAGE,), CONSUL_SCRIPT_VERSION,
                  inputs=(("arch", platform.machine()),), min_free_bytes=400 * MIB)


def consul_deb(machine: str) -> tuple[str, str]:
    """(version, sha256) of the consul package for this machine's architecture."""
    if machine not in CONSUL_DEBS:
        raise MeshError(f"the lab's Consul package is pinned for {', '.join(sorted(CONSUL_DEBS))} only, "
                        f"not {machine}", hint="add its version and checksum to CONSUL_DEBS in mesh/lab/images.py")
    return CONSUL_DEBS[machine]


def ensure_consul_binary(cache_dir: Path | None = None, progress: Progress = log_progress,
                         builder: Builder | None = None) -> Path:
    """Consul 1.8.7 from Debian bullseye's package (a private apt configuration), checked against CONSUL_DEBS."""
    return ensure_artifact(consul_recipe(), builder or build_consul, cache_dir, progress) / "consul"


def build_consul(recipe: Recipe, staging: Path, progress: Progress) -> None:
    require_root("fetching Consul")
    require_tool("dpkg", "dpkg")
    version, digest = consul_deb(platform.machine())
    with tempfile.TemporaryDirectory(prefix="mesh-lab-apt-") as work:
        progress(f"consul: fetching the {recipe.suite} package {version} with a private apt configuration")
        deb = debian.download_package(recipe.packages[0], recipe.suite, Path(work), version)
        debian.verify_deb(deb, digest)
        extracted = Path(work) / "x"
        run_checked(["dpkg", "-x", str(deb), str(extracted)], "unpacking the consul package")
        binary = staging / "consul"
        shutil.copy2(extracted / "usr/bin/consul", binary)
        (staging / "source").write_text(f"{deb.name}\n")
    reported = run_checked([str(binary), "version"], "running consul version")
    if f"v{CONSUL_VERSION_PREFIX}" not in reported:
        raise MeshError(f"the consul binary is not {CONSUL_VERSION_PREFIX}: {reported.splitlines()[0]}")
