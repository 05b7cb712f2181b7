"""What a managed host holds of mesh's, read in one command: every planned file's and folder's kind, mode,
owner and sha256, the proxies, units, users and sidecars mesh left there, the units' states, the hash of the
bootstrap each Envoy runs (its admin API's /server_info), certificates (public parts only), the loaded
firewall, the sidecar image, the checker's environment. It owns the script and its parsing; it changes
nothing (it runs in check mode and for `mesh plan`), and never reads a private key.
"""

from __future__ import annotations

import base64
import binascii
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.hosts.connection import Connector
from mesh.hosts.errors import FactError

ENVOY_SHA_CACHE_SUFFIX = ".sha256"  # beside Envoy's binary: "<sha256> <size> <mtime>", written when it is sent
FIREWALL_LOADED = "/var/lib/mesh/firewall.loaded"  # sha256 of `nft list table inet mesh` right after loading
OBSERVE_TIMEOUT_S = 60
USER_COMMENT = "mesh proxy"  # the GECOS of every user mesh creates for a proxy: how removal finds them
LEGACY_USERS = ("mesh-envoy",)  # the one user every proxy of a VM shared before each got its own
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PathFact:
    """A path on the host: absent, or its kind (file, directory, link, other), mode, owner and group (names
    and ids) and, for a file, its sha256."""

    path: str
    kind: str | None
    mode: int = 0
    owner: str = ""
    group: str = ""
    uid: str = ""
    gid: str = ""
    sha256: str | None = None

    @property
    def exists(self) -> bool:
        return self.kind is not None

    def owned_by(self, owner: str, group: str) -> bool:
        """Names compare with names, digits with ids (the sidecar's uid has no name on the host)."""
        return ((self.uid if owner.isdigit() else self.owner) == owner
                and (self.gid if group.isdigit() else self.group) == group)


@dataclass(frozen=True)
class UnitFact:
    name: str
    enabled: str  # systemctl is-enabled's word ("enabled", "disabled", "not-found", ...)
    active: str  # systemctl is-active's word ("active", "inactive", "failed", ...)


@dataclass(frozen=True)
class CertificateFact:
    """A proxy's (or the checker's) certificate chain and the public key of the key beside it."""

    name: str
    cert_pem: bytes | None
    public_key_pem: bytes | None


@dataclass(frozen=True)
class SidecarFact:
    name: str
    revision: str
    state: str


@dataclass(frozen=True)
class ObserveRequest:
    """What to read: the planned paths, units and users, the proxies whose Envoy to ask, the identities whose
    certificates to read (name -> (certificate path, key path)), and which host-kind extras apply."""

    paths: tuple[str, ...] = ()
    listed: tuple[str, ...] = ()  # folders whose every file is read like a planned path (a proxy's xds/)
    stat_only: tuple[str, ...] = ()  # paths whose kind and owner are read, not their content (Envoy's 100 MB)
    units: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    admin_sockets: tuple[tuple[str, str], ...] = ()  # (proxy, socket path)
    certificates: tuple[tuple[str, str, str], ...] = ()  # (name, cert path, key path)
    envoy_binary: str | None = None
    firewall: bool = False
    container_host: bool = False
    sidecar_image: str | None = None
    rules_check: str | None = None  # a command exiting 0 when the container host's rules are in place
    checker_marker: str | None = None


@dataclass(frozen=True)
class HostFacts:
    """What observe() read from one host."""

    host: str
    paths: dict[str, PathFact] = field(default_factory=dict)
    proxies: tuple[str, ...] = ()  # folders under /etc/mesh/proxies
    unit_files: tuple[str, ...] = ()  # mesh-envoy-*.service (proxies' units) in /etc/systemd/system
    units: dict[str, UnitFact] = field(default_factory=dict)
    users: tuple[str, ...] = ()  # planned users that exist
    mesh_users: tuple[str, ...] = ()  # users mesh created for proxies (by their comment)
    running: dict[str, str] = field(default_factory=dict)  # proxy -> bootstrap sha256 Envoy runs ("" unknown)
    certificates: dict[str, CertificateFact] = field(default_factory=dict)
    envoy_sha256: str | None = None
    firewall_loaded: bool | None = None  # None: not asked
    sidecars: dict[str, SidecarFact] = field(default_factory=dict)
    image_present: bool | None = None
    rules_in_place: bool | None = None
    checker_marker: str | None = None

    def path(self, path: str) -> PathFact:
        return self.paths.get(path) or PathFact(path, None)


def observe_script(request: ObserveRequest, proxies_root: str = "/etc/mesh/proxies",
                   units_dir: str = "/etc/systemd/system") -> str:
    """The read-only shell script printing one tab-separated fact per line (see parse_facts). Few processes:
    one stat and one sha256sum for every path, one systemctl for every unit (a host answers in ~0.1 s)."""
    q = shlex.quote
    listed = " ".join(f"{q(folder)}/*" for folder in request.listed)
    paths = " ".join(q(path) for path in request.paths) + (f" {listed}" if listed else "")
    lines = [
        "PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin",
        f"for d in {q(proxies_root)}/*/; do [ -d \"$d\" ] && printf 'P\\t%s\\n' \"$(basename \"$d\")\"; done",
        (f"for u in {q(units_dir)}/mesh-envoy-*.service; do [ -e \"$u\" ] && printf 'UF\\t%s\\n' "
         "\"$(basename \"$u\")\"; done"),
        "getent passwd | cut -d: -f1,5 | sed 's/^/W\t/'",
    ]
    stat_only = " ".join(q(path) for path in request.stat_only)
    if paths.strip() or stat_only:
        lines.append(f"stat -L -c 'F\t%n\t%F|%a|%U|%G|%u|%g' -- {paths} {stat_only} 2>/dev/null")
    if paths.strip():
        lines.append(f"sha256sum -- {paths} 2>/dev/null | sed 's/^/H\t/'")
    if request.units:
        lines.append("systemctl show -p Id -p UnitFileState -p ActiveState -- "
                     + " ".join(q(unit) for unit in request.units) + " 2>/dev/null | sed 's/^/U\t/'")
    lines += [f"printf 'R\\t%s\\t%s\\n' {q(proxy)} \"$(curl -s --max-time 3 --unix-socket {q(socket)} "
              "http://admin/server_info 2>/dev/null | grep -o '\"mesh_bootstrap_sha256\": *\"[0-9a-f]*\"' "
              "| grep -o '[0-9a-f]\\{64\\}')\"" for proxy, socket in request.admin_sockets]
    lines += [f"printf 'C\\t%s\\t%s\\t%s\\n' {q(name)} \"$(base64 -w0 < {q(cert)} 2>/dev/null)\" "
              f"\"$(openssl pkey -in {q(key)} -pubout 2>/dev/null | base64 -w0)\""
              for name, cert, key in request.certificates]
    if request.envoy_binary:
        binary = q(request.envoy_binary)
        cache = q(request.envoy_binary + ENVOY_SHA_CACHE_SUFFIX)
        lines.append(f"if [ -f {binary} ]; then now=$(stat -c '%s %Y' {binary}); set -- $(cat {cache} "
                     "2>/dev/null); if [ \"$2 $3\" = \"$now\" ]; then h=$1; "
                     f"else h=$(sha256sum < {binary} | cut -c1-64); fi; printf 'B\\t%s\\n' \"$h\"; fi")
    if request.firewall:
        lines.append(f"t=$(nft list table inet mesh 2>/dev/null); l=$(printf '%s\\n' \"$t\" | sha256sum | cut -c1-64); "
                     f"[ -n \"$t\" ] && [ \"$l\" = \"$(cat {FIREWALL_LOADED} 2>/dev/null)\" ] && echo 'N\tloaded' "
                     "|| echo 'N\tdrift'")
    if request.container_host:
        lines.append("docker ps --all --filter label=mesh.managed-by=mesh --format "
                     "'S\t{{.Names}}\t{{.Label \"mesh.config-hash\"}}\t{{.State}}' 2>/dev/null")
    if request.sidecar_image:
        lines.append(f"docker image inspect --format x {q(request.sidecar_image)} >/dev/null 2>&1 "
                     "&& echo 'I\tpresent' || echo 'I\tmissing'")
    if request.rules_check:
        lines.append(f"{request.rules_check} >/dev/null 2>&1 && echo 'K\tok' || echo 'K\tdrift'")
    if request.checker_marker:
        lines.append(f"printf 'M\\t%s\\n' \"$(cat {q(request.checker_marker)} 2>/dev/null)\"")
    lines.append("true")
    return "\n".join(lines) + "\n"


def parse_facts(host: str, text: str, users: tuple[str, ...] = ()) -> HostFacts:
    """The facts of observe_script's output (`users`: the planned users, reported when they exist); a line it
    cannot read raises FactError."""
    stats: dict[str, str] = {}
    digests: dict[str, str] = {}
    proxies: list[str] = []
    unit_files: list[str] = []
    unit_lines: list[str] = []
    present: list[str] = []
    mesh_users: list[str] = []
    running: dict[str, str] = {}
    certificates: dict[str, CertificateFact] = {}
    sidecars: dict[str, SidecarFact] = {}
    extra: dict[str, str] = {}
    wanted_users = set(users)
    for line in text.splitlines():
        if not line.strip():
            continue
        tag, _, rest = line.partition("\t")
        fields = rest.split("\t")
        try:
            if tag == "F":
                stats[fields[0]] = fields[1]
            elif tag == "H":
                digest, _, path = rest.partition("  ")
                if _SHA.fullmatch(digest):
                    digests[path] = digest
            elif tag == "P":
                proxies.append(fields[0])
            elif tag == "UF":
                unit_files.append(fields[0])
            elif tag == "U":
                unit_lines.append(rest)
            elif tag == "W":
                name, _, comment = rest.partition(":")
                if name in wanted_users:
                    present.append(name)
                if comment.startswith(USER_COMMENT) or name in LEGACY_USERS:
                    mesh_users.append(name)
            elif tag == "R":
                running[fields[0]] = fields[1] if _SHA.fullmatch(fields[1]) else ""
            elif tag == "C":
                certificates[fields[0]] = CertificateFact(fields[0], _b64(fields[1]), _b64(fields[2]))
            elif tag == "S":
                sidecars[fields[0]] = SidecarFact(fields[0], fields[1], fields[2])
            elif tag in ("B", "N", "I", "K", "M"):
                extra[tag] = fields[0] if fields else ""
            else:
                raise FactError(f"{host}: unexpected fact line {line[:200]!r}")
        except (IndexError, ValueError) as exc:
            raise FactError(f"{host}: unreadable fact line {line[:200]!r}: {exc}") from None
    paths: dict[str, PathFact] = {}
    for path, stat in stats.items():
        try:
            paths[path] = _path_fact(path, stat, digests.get(path, "-"))
        except ValueError as exc:  # a stat line of another shape: said like any other unreadable line
            line = f"F\t{path}\t{stat}"
            raise FactError(f"{host}: unreadable fact line {line[:200]!r}: {exc}") from None
    return HostFacts(host, paths, tuple(proxies), tuple(unit_files), _units(unit_lines), tuple(present),
                     tuple(mesh_users), running, certificates,
                     extra.get("B") if _SHA.fullmatch(extra.get("B", "")) else None,
                     None if "N" not in extra else extra["N"] == "loaded", sidecars,
                     None if "I" not in extra else extra["I"] == "present",
                     None if "K" not in extra else extra["K"] == "ok", extra.get("M"))


def _units(lines: list[str]) -> dict[str, UnitFact]:
    """`systemctl show -p Id -p UnitFileState -p ActiveState` blocks (blank-line separated, any order)."""
    units: dict[str, UnitFact] = {}
    block: dict[str, str] = {}
    for line in [*lines, ""]:
        if not line.strip():
            if "Id" in block:
                units[block["Id"]] = UnitFact(block["Id"], block.get("UnitFileState") or "not-found",
                                              block.get("ActiveState") or "unknown")
            block = {}
            continue
        key, _, value = line.partition("=")
        block[key] = value.strip()
    return units


def _path_fact(path: str, stat: str, digest: str) -> PathFact:
    if stat in ("-", ""):
        return PathFact(path, None)
    kind_text, mode, owner, group, uid, gid = stat.split("|")
    kind = {"regular file": "file", "regular empty file": "file", "directory": "directory",
            "symbolic link": "link"}.get(kind_text, "other")
    return PathFact(path, kind, int(mode, 8), owner, group, uid, gid, digest if _SHA.fullmatch(digest) else None)


def _b64(text: str) -> bytes | None:
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def observe(connector: Connector, host: str, request: ObserveRequest) -> HostFacts:
    """Run observe_script on the host (one command) and parse it. Raises FactError when it cannot run;
    HostUnreachable comes from the connector."""
    result = connector.run(observe_script(request), timeout=OBSERVE_TIMEOUT_S)
    if not result.ok:
        raise FactError(f"{host}: reading mesh's state failed: {result.error_text()[:500]}")
    return parse_facts(host, result.stdout.decode(errors="replace"), request.users)


def read_texts(connector: Connector, paths: Iterable[str]) -> dict[str, str | None]:
    """The current text of each path (None when absent or unreadable), in one command: for diffs only. Never
    call it with a private key's path."""
    wanted = list(paths)
    if not wanted:
        return {}
    script = "; ".join(f"printf '%s\\t' {shlex.quote(path)}; (base64 -w0 < {shlex.quote(path)}) 2>/dev/null; echo"
                       for path in wanted)
    result = connector.run(script, timeout=OBSERVE_TIMEOUT_S)
    texts: dict[str, str | None] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        path, _, encoded = line.partition("\t")
        data = _b64(encoded)
        texts[path] = None if data is None else data.decode(errors="replace")
    return texts
