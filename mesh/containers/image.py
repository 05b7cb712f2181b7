"""The sidecar image with no base image and no registry: Envoy's binary, the libraries `ldd` lists, an
unprivileged user, as a deterministic tarball for `docker import`; for a mesh with xds sidecars also the start
step's shell and tools (bash as /bin/sh and /bin/bash, coreutils' timeout). It must not reach a host.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh.config.validate import envoy_binary
from mesh.errors import MeshError

IMAGE_REPOSITORY = "mesh-envoy"
ENVOY_IN_IMAGE = "/usr/local/bin/envoy"
# The sidecar's uid and gid, and the owner of the files it reads on the host: an id no Debian package or
# adduser assigns (system ids stop at 999, users at 59999), so no other account on the host can read the keys.
SIDECAR_UID = 64101
SIDECAR_USER = "envoy"
# Bump when the image's layout changes, so cached tarballs of the old layout are not reused.
RECIPE = "mesh-envoy-image/2"
TAG_DIGITS = 12
# What the start step (templates/host/envoy-start) runs in a sidecar: its interpreter, bash's /dev/tcp probe, timeout.
START_STEP_TOOLS = {"/bin/sh": "bash", "/bin/bash": "bash", "/usr/bin/timeout": "timeout"}
_LDD_PATH = re.compile(r"(/\S+)\s+\(0x[0-9a-f]+\)")


@dataclass(frozen=True)
class SidecarImage:
    """A built sidecar tarball (gzip) and the tag it is imported as: `mesh-envoy:<sha256 prefix>`."""

    path: Path
    tag: str

    @property
    def digest(self) -> str:
        return self.tag.rsplit(":", 1)[1]


@dataclass(frozen=True)
class ImageFile:
    """One regular file of the image: where it goes, its bytes' source on this machine, its mode."""

    path: str  # absolute, in the image
    source: Path
    mode: int


def shared_libraries(binary: Path) -> tuple[str, ...]:
    """Every library path (and the dynamic loader) `ldd` lists for binary, sorted; vdso has no path."""
    listed = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return tuple(sorted({match.group(1) for match in _LDD_PATH.finditer(listed)}))


def image_files(envoy: Path, libraries: tuple[str, ...],
                tools: tuple[tuple[str, Path], ...] = ()) -> tuple[ImageFile, ...]:
    """The image's regular files: Envoy, `tools` ((path in the image, binary here)) and their libraries (symlinks
    resolved: the image holds real files)."""
    files = [ImageFile(ENVOY_IN_IMAGE, envoy, 0o755)]
    files += [ImageFile(path, source, 0o755) for path, source in tools]
    files += [ImageFile(library, Path(library).resolve(), 0o755) for library in libraries]
    return tuple(sorted(files, key=lambda item: item.path))


def start_step_tools() -> tuple[tuple[str, Path], ...]:
    """START_STEP_TOOLS as (path in the image, this machine's binary); MeshError naming a missing one."""
    tools = []
    for path, name in START_STEP_TOOLS.items():
        found = shutil.which(name)
        if found is None:
            raise MeshError(f"{name} is not on this machine's PATH: the image of xds sidecars needs it",
                            hint="install bash and coreutils here (mesh builds the sidecar image on this machine)")
        tools.append((path, Path(found).resolve()))
    return tuple(tools)


def etc_files() -> dict[str, bytes]:
    """/etc entries for the unprivileged user the sidecar runs as (and root, which some tools expect)."""
    uid = SIDECAR_UID
    return {
        "/etc/passwd": (f"root:x:0:0:root:/:/sbin/nologin\n"
                        f"{SIDECAR_USER}:x:{uid}:{uid}:envoy:/nonexistent:/sbin/nologin\n").encode(),
        "/etc/group": f"root:x:0:\n{SIDECAR_USER}:x:{uid}:\n".encode(),
    }


def write_image_tar(out: io.BufferedIOBase, files: tuple[ImageFile, ...], extra: dict[str, bytes]) -> None:
    """A gzip'd tar of files and extra (path -> bytes), with parent folders and /tmp: sorted entries, mtime 0,
    owner 0:0, and no file name in the gzip header, so equal content gives equal bytes."""
    folders = {"/tmp"}
    for path in [item.path for item in files] + list(extra):
        parent = os.path.dirname(path)
        while parent != "/":
            folders.add(parent)
            parent = os.path.dirname(parent)
    entries: list[tuple[str, ImageFile | bytes | None]] = [(folder, None) for folder in folders]
    entries += [(item.path, item) for item in files] + list(extra.items())
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0, compresslevel=6) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for path, content in sorted(entries, key=lambda entry: entry[0]):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if path == "/tmp" else 0o755
                tar.addfile(info)
            elif isinstance(content, bytes):
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size, info.mode = content.source.stat().st_size, content.mode
                with content.source.open("rb") as handle:
                    tar.addfile(info, handle)


def build_sidecar_image_tar(cache_dir: Path, envoy: Path | None = None, start_step: bool = False) -> SidecarImage:
    """The sidecar tarball for this machine's Envoy, built once per content into cache_dir (safe to call from
    several threads or processes at once) and tagged by the sha256 of its bytes. `start_step`: with the tools
    the start step of xds sidecars runs (a mesh without them keeps the image it had)."""
    binary = Path(envoy or envoy_binary()).resolve()
    tools = start_step_tools() if start_step else ()
    libraries = tuple(sorted({library for program in (binary, *(source for _path, source in tools))
                              for library in shared_libraries(program)}))
    files = image_files(binary, libraries, tools)
    extra = etc_files()
    key = _cache_key(files, extra)
    folder = Path(cache_dir) / "sidecar-image"
    folder.mkdir(parents=True, exist_ok=True)
    tar_path, tag_path = folder / f"{key}.tar.gz", folder / f"{key}.tag"
    with _locked(folder / ".lock"):
        if not (tar_path.is_file() and tag_path.is_file()):
            temp = folder / f".{key}.{os.getpid()}.tmp"
            with temp.open("wb") as handle:
                write_image_tar(handle, files, extra)
            tag_path.write_text(f"{IMAGE_REPOSITORY}:{_sha256_file(temp)[:TAG_DIGITS]}\n")
            temp.replace(tar_path)
    return SidecarImage(tar_path, tag_path.read_text().strip())


def _cache_key(files: tuple[ImageFile, ...], extra: dict[str, bytes]) -> str:
    digest = hashlib.sha256(RECIPE.encode())
    for item in files:
        digest.update(f"\0{item.path}\0{item.mode:o}\0{_sha256_file(item.source)}".encode())
    for path, data in sorted(extra.items()):
        digest.update(f"\0{path}\0{hashlib.sha256(data).hexdigest()}".encode())
    return digest.hexdigest()[:32]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
