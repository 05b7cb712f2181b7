"""bench/deploy's view of the files mesh placed on a host: collect them over SSH, describe them as a manifest
the two baselines converge (Ansible and pyinfra), diff two collections, and the script that removes them.

Collected generically (globs, not mesh's own code), so the bench keeps working while mesh changes:
/etc/mesh and /usr/local/lib/mesh (the folders), /etc/mesh/ca.pem, /etc/mesh/firewall.nft, every proxy's
folder under /etc/mesh/proxies/ and the checker's /etc/mesh/checker/ (files, folders and symlinks; private keys
included: they are the lab's test keys, and Envoy needs the key of the certificate it is given), the Envoy
binary (and any other file) under /usr/local/lib/mesh, and the units /etc/systemd/system/mesh-*.service but the
lab's demo app's (mesh-demo-*). Left out: sockets (Envoy's admin socket), mesh's staging folders (.mesh*), the
controller's Python environment in /opt/mesh (never removed, so no engine installs it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

BIG = 1 << 20  # files at least this large (Envoy's binary) are fetched once per content, not once per host
UNIT_DIR = "/etc/systemd/system"
# Folders whose mention in a unit says nothing about which unit a file belongs to.
ROOTS = frozenset({"/", "/etc", "/etc/mesh", "/etc/mesh/proxies", "/usr", "/usr/local", "/usr/local/lib",
                   "/usr/local/lib/mesh", UNIT_DIR})

# One SSH session per host: the small files as a tar on stdout, then a line per big file (mode owner group
# size sha256 path). Paths are relative to / (tar's own), printed without the leading slash.
COLLECT_SCRIPT = r"""set -e
cd /
{
  for d in etc/mesh etc/mesh/proxies usr/local/lib/mesh; do [ -d "$d" ] && echo "$d"; done
  for f in etc/mesh/ca.pem etc/mesh/firewall.nft; do [ -e "$f" ] && echo "$f"; done
  for d in etc/mesh/proxies etc/mesh/checker; do
    [ -d "$d" ] && find "$d" -mindepth 1 \( -name '.mesh*' -o -name '*.mesh-tmp*' \) -prune -o \
      \( -type d -o -type l -o \( -type f -size -1024k \) \) -print
  done
  for u in etc/systemd/system/mesh-*.service; do
    case "$u" in *'/mesh-demo-'*|*'*'*) ;; *) [ -f "$u" ] && echo "$u";; esac
  done
} | sort -u > /tmp/.mesh-bench-list
tar --no-recursion -cf /tmp/.mesh-bench.tar -T /tmp/.mesh-bench-list
rm -f /tmp/.mesh-bench-list
{ find usr/local/lib/mesh -type f ! -name '*.mesh-tmp*' 2>/dev/null || true
  find etc/mesh -type f -size +1023k ! -name '*.mesh-tmp*' 2>/dev/null || true; } | sort | \
  while read -r f; do
    printf '%s %s %s %s %s %s\n' $(stat -c '%a %U %G %s' "$f") $(sha256sum "$f" | cut -d' ' -f1) "/$f"
  done > /tmp/.mesh-bench-big
wc -c < /tmp/.mesh-bench-big
cat /tmp/.mesh-bench-big /tmp/.mesh-bench.tar
rm -f /tmp/.mesh-bench.tar /tmp/.mesh-bench-big
"""


@dataclass(frozen=True)
class Entry:
    """One thing mesh placed: a folder, a file or a symlink, with what it must look like."""

    kind: str  # dir | file | link
    path: str
    mode: str = ""  # octal, e.g. "0640"
    owner: str = ""
    group: str = ""
    sha256: str = ""
    src: str = ""  # the local copy the baselines push (files)
    target: str = ""  # links
    units: tuple[str, ...] = ()  # units to restart when this entry changes


@dataclass
class HostFiles:
    """Everything collected from one host, in the order to create it (parents first)."""

    host: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def units(self) -> list[str]:
        return [Path(e.path).name for e in self.entries if e.kind == "file" and _is_unit(e.path)]

    @property
    def users(self) -> list[str]:
        """Owners and groups other than root: system users mesh made (the baselines make sure they exist)."""
        names = {e.owner for e in self.entries if e.owner} | {e.group for e in self.entries if e.group}
        return sorted(n for n in names if n != "root" and not n.isdigit())

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def manifest(self) -> dict[str, object]:
        return {"host": self.host, "users": self.users, "units": self.units,
                "entries": [asdict(e) for e in self.entries]}


def _is_unit(path: str) -> bool:
    return path.startswith(UNIT_DIR + "/") and path.endswith(".service")


class Ssh:
    """Plain OpenSSH with the lab inventory's key and known_hosts (strict), one session per call."""

    def __init__(self, user: str, key: str, common_args: str) -> None:
        self.base = ["ssh", "-i", key, "-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none",
                     "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", *shlex.split(common_args)]
        self.user = user

    def run(self, address: str, script: str, timeout: float = 300, check: bool = True) -> bytes:
        done = subprocess.run([*self.base, f"{self.user}@{address}", "sh", "-c", shlex.quote(script)],
                              capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise SystemExit(f"ssh {address}: exit {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout


def collect(ssh: Ssh, host: str, address: str, into: Path, big_files: dict[str, Path]) -> HostFiles:
    """The files mesh placed on one host, written under into/<host>/ (big files once under into/big/)."""
    raw = ssh.run(address, COLLECT_SCRIPT)
    header_end = raw.index(b"\n")
    big_len = int(raw[:header_end])
    big_text = raw[header_end + 1:header_end + 1 + big_len].decode()
    tar_bytes = raw[header_end + 1 + big_len:]
    root = into / host
    entries: list[Entry] = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            path = "/" + member.name.lstrip("./").lstrip("/")
            mode = f"{member.mode & 0o7777:04o}"
            owner, group = member.uname or str(member.uid), member.gname or str(member.gid)
            if member.isdir():
                entries.append(Entry("dir", path, mode, owner, group))
            elif member.issym():
                entries.append(Entry("link", path=path, target=member.linkname))
            elif member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                local = root / path.lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
                entries.append(Entry("file", path, mode, owner, group, hashlib.sha256(data).hexdigest(), str(local)))
    for line in big_text.splitlines():
        mode, owner, group, _size, digest, path = line.split(" ", 5)
        cached = big_files.get(digest)
        if cached is not None:
            local = cached
        else:
            local = into / "big" / digest
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "wb") as out:
                subprocess.run([*ssh.base, f"{ssh.user}@{address}", "cat", shlex.quote(path)], stdout=out,
                               check=True, stdin=subprocess.DEVNULL)
            if hashlib.sha256(local.read_bytes()).hexdigest() != digest:
                raise SystemExit(f"{host}: {path} changed while it was read")
            big_files[digest] = local
        entries.append(Entry("file", path, f"{int(mode, 8):04o}", owner, group, digest, str(local)))
    entries.sort(key=lambda e: (e.path.count("/"), e.path) if e.kind == "dir" else (99, e.path))
    files = HostFiles(host, entries)
    return attach_units(files)


def attach_units(files: HostFiles) -> HostFiles:
    """Which units each entry restarts: a unit is restarted when a file it names changes, or a file in a folder
    it names (below mesh's shared folders), or a file named by such a file (Envoy's config names ca.pem), or
    its own unit file."""
    texts = {e.path: Path(e.src).read_text(errors="replace") for e in files.entries
             if e.kind == "file" and Path(e.src).stat().st_size < BIG}
    units = {e.path: texts.get(e.path, "") for e in files.entries if e.kind == "file" and _is_unit(e.path)}
    mentions: dict[str, str] = {}
    for unit_path, text in units.items():
        named = [p for p in texts if p != unit_path and _mentions(text, p)]
        mentions[unit_path] = "\n".join([text, *(texts[p] for p in named)])
    updated = []
    for entry in files.entries:
        if entry.kind == "dir":
            updated.append(entry)
            continue
        chosen = tuple(Path(u).name for u, text in mentions.items()
                       if u == entry.path or _mentions(text, entry.path))
        updated.append(replace(entry, units=chosen))
    return HostFiles(files.host, updated)


def _mentions(text: str, path: str) -> bool:
    if re.search(re.escape(path) + r"(?![\w.-])", text):
        return True
    folder = str(Path(path).parent)
    while folder not in ROOTS:
        if folder + "/" in text or re.search(re.escape(folder) + r"(?![\w./-])", text):
            return True
        folder = str(Path(folder).parent)
    return False


def differences(before: HostFiles, after: HostFiles) -> list[str]:
    """Paths whose kind, content, mode, owner or target differ (or that exist on one side only)."""
    a, b = before.by_path(), after.by_path()
    changed = []
    for path in sorted(a.keys() | b.keys()):
        x, y = a.get(path), b.get(path)
        if x is None or y is None or (x.kind, x.mode, x.owner, x.group, x.sha256, x.target) != (
                y.kind, y.mode, y.owner, y.group, y.sha256, y.target):
            changed.append(path)
    return changed


def with_changes(base: HostFiles, changed: HostFiles, paths: Iterable[str]) -> HostFiles:
    """base with the entries at paths taken from changed (the one-file change the baselines push)."""
    wanted = set(paths)
    theirs = changed.by_path()
    entries = [theirs[e.path] if e.path in wanted and e.path in theirs else e for e in base.entries]
    entries += [e for p, e in theirs.items() if p in wanted and p not in base.by_path()]
    return attach_units(HostFiles(base.host, entries))


# Stop and disable mesh's units, drop mesh's nft tables, remove every file mesh placed (folders whole): the host
# as before a first deploy, /var/lib/mesh (mesh's rollback copies) included. By globs on the host, like
# COLLECT_SCRIPT (system users and /opt/mesh stay).
REMOVAL_SCRIPT = r"""set -e
units=$(cd /etc/systemd/system && ls mesh-*.service 2>/dev/null | grep -v '^mesh-demo-' || true)
if [ -n "$units" ]; then
  systemctl disable --now $units >/dev/null 2>&1 || true
  systemctl reset-failed $units >/dev/null 2>&1 || true
fi
tables=$(cat /etc/mesh/*.nft 2>/dev/null | sed -n 's/^table \([a-z0-9]* [A-Za-z0-9_-]*\) *{.*/\1/p' | sort -u)
rm -rf /etc/mesh /usr/local/lib/mesh /var/lib/mesh $(for u in $units; do echo /etc/systemd/system/$u; done)
systemctl daemon-reload
for t in $tables; do nft delete table $t 2>/dev/null || true; done
"""


def write_manifests(hosts: Sequence[HostFiles], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for files in hosts:
        path = folder / f"{files.host}.json"
        path.write_text(json.dumps(files.manifest(), indent=1))
        written[files.host] = path
    return written
