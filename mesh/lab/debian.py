"""Debian plumbing for the lab's cached artifacts: the machine's mirror, private apt fetches, dpkg databases.

It reads the machine's apt configuration and never changes it; caching and keys belong to mesh.lab.images.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from mesh.errors import MeshError

MIRROR_ENV = "MESH_LAB_MIRROR"
DEB822_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
ONE_LINE_SOURCES = Path("/etc/apt/sources.list")
MERGED_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def debian_mirror(deb822: Path = DEB822_SOURCES, one_line: Path = ONE_LINE_SOURCES) -> str:
    """The Debian archive URI this machine's apt uses ($MESH_LAB_MIRROR wins); security archives are skipped."""
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override
    for uri in [*_deb822_uris(deb822), *_one_line_uris(one_line)]:
        if "security" not in uri and uri.startswith(("http://", "https://")):
            return uri
    raise MeshError(f"no Debian mirror found in {deb822} or {one_line}",
                    hint=f"set {MIRROR_ENV}, e.g. {MIRROR_ENV}=http://deb.debian.org/debian")


def _deb822_uris(path: Path) -> list[str]:
    if not path.is_file():
        return []
    uris = []
    for stanza in re.split(r"\n\s*\n", path.read_text()):
        fields = dict(_deb822_fields(stanza))
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            uris.extend(fields.get("uris", "").split())
    return uris


def _deb822_fields(stanza: str) -> Iterable[tuple[str, str]]:
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        name, value = line.split(":", 1)
        yield name.strip().lower(), value.strip()


def _one_line_uris(path: Path) -> list[str]:
    if not path.is_file():
        return []
    uris = []
    for line in path.read_text().splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            uris.append(words[1])
    return uris


def download_package(package: str, suite: str, work: Path, version: str | None = None) -> Path:
    """Fetch one .deb of `suite` (at `version` when given) into `work` through a private apt configuration
    (lists and cache in work)."""
    mirror = debian_mirror()
    sources = work / "sources.list"
    sources.write_text(f"deb {mirror} {suite} main\n")
    empty = work / "empty.d"
    for folder in (empty, work / "lists" / "partial", work / "cache" / "archives" / "partial", work / "debs"):
        folder.mkdir(parents=True, exist_ok=True)
    options = [
        "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "Dir::Etc::Preferences=/dev/null", "-o", f"Dir::Etc::PreferencesParts={empty}",
        "-o", "Acquire::Languages=none", "-o", "APT::Sandbox::User=root", "-qq",
    ]
    _run(["apt-get", *options, "update"], f"apt-get update for {suite}")
    wanted = f"{package}={version}" if version else package
    _run(["apt-get", *options, "download", wanted], f"apt-get download {wanted}", cwd=work / "debs")
    debs = sorted((work / "debs").glob(f"{package}_*.deb"))
    if not debs:
        raise MeshError(f"apt-get download {package} from {suite} produced no .deb")
    return debs[0]


def verify_deb(deb: Path, expected_sha256: str) -> Path:
    """`deb` after checking its SHA-256 against the digest the repository keeps for it."""
    actual = hashlib.sha256(deb.read_bytes()).hexdigest()
    if actual != expected_sha256:
        raise MeshError(f"{deb.name} does not match the checksum mesh keeps for it: sha256 {actual}, "
                        f"expected {expected_sha256}",
                        hint="the mirror served another build of the package; refusing to run it")
    return deb


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace", check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-1500:]
        raise MeshError(f"{what} failed (exit {result.returncode}): {output}")


# ---- reading a rootfs's dpkg database --------------------------------------------------------------------


def installed_packages(rootfs: Path) -> dict[str, dict[str, str]]:
    """Installed packages of a rootfs by name, each with its status fields (lower-case names)."""
    packages = {}
    for stanza in (rootfs / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(_deb822_fields(stanza))
        if fields.get("status", "").endswith(" installed") and "package" in fields:
            packages[fields["package"]] = fields
    return packages


def dependency_closure(rootfs: Path, roots: Iterable[str]) -> list[str]:
    """The installed packages `roots` need (Depends and Pre-Depends, first installed alternative)."""
    packages = installed_packages(rootfs)
    provides: dict[str, str] = {}
    for name, fields in packages.items():
        for provided in _names(fields.get("provides", "")):
            provides.setdefault(provided[0], name)
    wanted: list[str] = []
    todo = list(roots)
    while todo:
        name = todo.pop()
        name = name if name in packages else provides.get(name, "")
        if not name:
            continue
        if name in wanted:
            continue
        wanted.append(name)
        fields = packages[name]
        for alternatives in _names(fields.get("depends", "") + "," + fields.get("pre-depends", "")):
            chosen = next((alt for alt in alternatives if alt in packages or alt in provides), None)
            if chosen is not None:
                todo.append(chosen)
    missing = [root for root in roots if root not in packages]
    if missing:
        raise MeshError(f"{', '.join(missing)} not installed in {rootfs}")
    return sorted(wanted)


def _names(relation: str) -> list[list[str]]:
    groups = []
    for group in relation.split(","):
        names = [re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":")[0] for alt in group.split("|")]
        names = [name for name in names if name]
        if names:
            groups.append(names)
    return groups


def package_files(rootfs: Path, packages: Iterable[str]) -> list[str]:
    """Paths (relative, with merged-/usr names) of the files and links the packages ship, plus their .pyc."""
    info = rootfs / "var/lib/dpkg/info"
    found: set[str] = set()
    for package in packages:
        lists = [info / f"{package}.list", *info.glob(f"{package}:*.list")]
        for listing in (path for path in lists if path.is_file()):
            for line in listing.read_text().splitlines():
                relative = _merged(rootfs, line.strip().lstrip("/"))
                path = rootfs / relative
                if relative and (path.is_symlink() or path.is_file()):
                    found.add(relative)
                    if relative.endswith(".py"):
                        found.update(_compiled(rootfs, relative))
    return sorted(found)


def _merged(rootfs: Path, relative: str) -> str:
    first, _, rest = relative.partition("/")
    if first in MERGED_DIRS and (rootfs / first).is_symlink() and rest:
        return f"usr/{first}/{rest}"
    return relative


def _compiled(rootfs: Path, relative: str) -> list[str]:
    source = Path(relative)
    cache = rootfs / source.parent / "__pycache__"
    return [str(p.relative_to(rootfs)) for p in cache.glob(f"{source.stem}.*.pyc")] if cache.is_dir() else []


def copy_files(rootfs: Path, tree: Path, files: Iterable[str]) -> None:
    """Copy files and symlinks of a rootfs into `tree`, keeping modes and merged-/usr top-level links."""
    for name in MERGED_DIRS:
        link = rootfs / name
        if link.is_symlink() and not (tree / name).is_symlink():
            tree.mkdir(parents=True, exist_ok=True)
            (tree / name).symlink_to(os.readlink(link))
    for relative in files:
        source, target = rootfs / relative, tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            continue
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
