"""The controller's side of `mesh-ctl`, the forced command on every managed host (templates/host/mesh-ctl.sh).

It owns what travels over the controller's SSH access: the command strings of the five verbs (`state`, `apply`,
`csr NAME`, `install NAME VERSION`, `restart NAME`), the bundle `apply` reads on stdin (a ustar archive), and the parsing of what
the verbs print. Pure: no SSH, no Consul, no files but the packaged script's own text.

What the verbs print (space-separated fields, one record a line):

    state     identity NAME KIND                                   (KIND: vm | container | checker)
              file NAME RELPATH SHA256                             (RELPATH: envoy.yaml or xds/FILE.yaml)
              cert NAME SERIAL NOT_BEFORE_EPOCH NOT_AFTER_EPOCH    (or `cert NAME none`)
              delivery NAME xds|files                              (an xds proxy: the bootstrap its Envoy started
                                                                    with, as its start step wrote it)
              end                                                  (the last line: the output is whole)
    apply     applied NAME                                         (per identity whose files were moved)
    csr NAME  pending VERSION, then the CSR (PEM)
    install   installed NAME SERIAL
    restart   restarted NAME                                       (drained, then its unit or sidecar restarted)

Exit codes: 0 done; 1 well-formed but failed (Envoy refused the files or did not take one, a certificate not for
the pending key or not trusted); 2 refused (unknown verb, identity or version, a malformed archive); the reason
is on stderr, `mesh-ctl: ...`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mesh.config import paths
from mesh.config.xds import DELIVERIES
from mesh.controller.spec import CTL_STAGING_NAME
from mesh.errors import MeshError
from mesh.package_data import templates_dir
from mesh.render import BOOTSTRAP_KINDS, VALIDATE_CONFIG_NAME, ProxyFiles, host_validation

__all__ = ["MAX_BUNDLE_BYTES", "MAX_CHAIN_BYTES", "VERBS", "BundleProxy", "CertState", "CtlProtocolError",
           "HostState", "apply_bundle", "bundle_for", "command", "parse_applied", "parse_installed",
           "parse_pending", "parse_restarted", "parse_state", "relpath_in", "resource_version", "resource_version_of", "script_path",
           "script_text", "serial_hex"]

SCRIPT_TEMPLATE = "host/mesh-ctl.sh"
VERBS = ("state", "apply", "csr", "install", "restart")
MAX_BUNDLE_BYTES = 8 * 1024 * 1024  # what `apply` reads of stdin at most
MAX_CHAIN_BYTES = 64 * 1024  # what `install` reads of stdin at most
REMOVE_NAME = "remove"
RESOURCE_VERSION_DIGITS = 16
KINDS = ("vm", "container", "checker")

# The same patterns as the script's `case` patterns (a name here that the script refuses is a bug on this side).
# Identity names: a proxy name (`<service>-<port>` on a VM, `<service>-<app container>` on a container host,
# Docker allowing [a-zA-Z0-9][a-zA-Z0-9_.-]* there) or `checker`.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
VERSION = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9a-f]{6}\Z")
XDS_FILE = re.compile(r"[a-z0-9][a-z0-9._-]*\.yaml\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
SERIAL = re.compile(r"[0-9a-f]{1,80}\Z")
EPOCH = re.compile(r"-?[0-9]{1,12}\Z")


class CtlProtocolError(MeshError):
    """A request mesh-ctl would refuse, or output of mesh-ctl this side cannot take: names the line or value."""


def script_path() -> Path:
    """The packaged script (what deploy installs as mesh.controller.spec.CTL_SCRIPT)."""
    return templates_dir() / SCRIPT_TEMPLATE


def script_text() -> str:
    return script_path().read_text(encoding="utf-8")


def command(verb: str, *args: str) -> str:
    """The SSH command the controller sends (the script gets it whole as its one argument)."""
    arity = {"state": 0, "apply": 0, "csr": 1, "install": 2, "restart": 1}
    if verb not in arity:
        raise CtlProtocolError(f"mesh-ctl has no verb {verb!r} (it has {', '.join(VERBS)})")
    if len(args) != arity[verb]:
        raise CtlProtocolError(f"mesh-ctl {verb} takes {arity[verb]} argument(s), got {list(args)!r}")
    if args and not NAME.match(args[0]):
        raise CtlProtocolError(f"mesh-ctl {verb}: {args[0]!r} is not an identity name")
    if verb == "install" and not VERSION.match(args[1]):
        raise CtlProtocolError(f"mesh-ctl install: {args[1]!r} is not a key version (YYYYmmddTHHMMSS-hhhhhh)")
    return " ".join((verb, *args))


# --- apply: the bundle ---

@dataclass(frozen=True)
class BundleProxy:
    """One identity's part of an `apply` bundle: the static config Envoy validates, the resource files to move
    into HOME/xds in this order, then the xds files to delete."""

    name: str
    validate_yaml: str = field(repr=False)
    files: tuple[tuple[str, str], ...]  # (relpath like "xds/lds.yaml", content), in move order
    remove: tuple[str, ...] = ()  # relpaths like "xds/eds.old.yaml"

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise CtlProtocolError(f"{self.name!r} is not an identity name mesh-ctl takes")
        seen = set()
        for relpath in (*(relpath for relpath, _content in self.files), *self.remove):
            _check_xds_relpath(self.name, relpath)
        for relpath, _content in self.files:
            if relpath in seen:
                raise CtlProtocolError(f"proxy {self.name}: {relpath} twice in one bundle")
            seen.add(relpath)


def bundle_for(files: ProxyFiles, changed: Sequence[str], stale: Sequence[str] = ()) -> BundleProxy:
    """The bundle part that moves the `changed` files of `files` (absolute paths) into place and deletes `stale`
    (absolute paths), checked first by Envoy against the static equivalent of ALL of `files` (which names the
    live key, certificate and trust bundle: nothing else is needed on the host). Only resource and secret files
    in the proxy's xds folder travel: the bootstrap is the deploy's (a changed one needs a restart)."""
    xds = f"{files.proxy_dir}/{paths.XDS_DIR_NAME}/"
    wanted = set(changed)
    known = {file.path: file for file in files.files}
    for path in wanted:
        if path not in known:
            raise CtlProtocolError(f"proxy {files.proxy}: {path} is not one of its files")
        if known[path].kind in BOOTSTRAP_KINDS or not path.startswith(xds):
            raise CtlProtocolError(f"proxy {files.proxy}: {path} is not a resource file of {xds} (the bootstrap is "
                                   "the deploy's: a new one needs a restart)")
    for path in stale:
        if not path.startswith(xds):
            raise CtlProtocolError(f"proxy {files.proxy}: cannot remove {path}: not in {xds}")
        if path in known:
            raise CtlProtocolError(f"proxy {files.proxy}: {path} is both a file of the proxy and stale")
    steps = tuple(file for file in files.files if file.path in wanted)  # the move order of ProxyFiles
    staging = f"{files.proxy_dir}/{CTL_STAGING_NAME}"
    config = host_validation(files, steps, tuple(stale), staging_dir=staging, user=None).config
    return BundleProxy(name=files.proxy, validate_yaml=config,
                       files=tuple((file.path[len(files.proxy_dir) + 1:], file.content) for file in steps),
                       remove=tuple(path[len(files.proxy_dir) + 1:] for path in stale))


def apply_bundle(proxies: Sequence[BundleProxy]) -> bytes:
    """The archive `apply` reads on stdin: a deterministic ustar archive (owner 0:0, mode 0644, mtime 0) holding
    per identity, in order, NAME/validate.yaml, NAME/xds/FILE.yaml in move order, and NAME/remove (one relpath a
    line) when it deletes files."""
    names = [proxy.name for proxy in proxies]
    if len(set(names)) != len(names):
        raise CtlProtocolError(f"an identity twice in one bundle: {names}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for proxy in proxies:
            members = [(VALIDATE_CONFIG_NAME, proxy.validate_yaml), *proxy.files]
            if proxy.remove:
                members.append((REMOVE_NAME, "".join(f"{relpath}\n" for relpath in proxy.remove)))
            for relpath, content in members:
                data = content.encode()
                info = tarfile.TarInfo(f"{proxy.name}/{relpath}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise CtlProtocolError(f"bundle of {len(data)} bytes for {names}: mesh-ctl takes at most "
                               f"{MAX_BUNDLE_BYTES} (send fewer identities at a time)")
    return data


def parse_applied(stdout: str) -> tuple[str, ...]:
    """The identities an `apply` moved files for (its `applied NAME` lines), in order."""
    applied = []
    for number, line in enumerate(stdout.splitlines(), 1):
        fields = line.split(" ")
        if len(fields) != 2 or fields[0] != "applied" or not NAME.match(fields[1]):
            raise CtlProtocolError(f"mesh-ctl apply, line {number}: expected `applied NAME`, got {line!r}")
        applied.append(fields[1])
    return tuple(applied)


def _check_xds_relpath(name: str, relpath: str) -> None:
    folder, _slash, base = relpath.partition("/")
    if folder != paths.XDS_DIR_NAME or not XDS_FILE.match(base):
        raise CtlProtocolError(f"proxy {name}: {relpath!r} is not a file mesh-ctl moves (xds/FILE.yaml, FILE "
                               "of [a-z0-9._-])")


# --- state ---

@dataclass(frozen=True)
class CertState:
    """The certificate behind an identity's `tls` link."""

    serial: str  # lower-case hex without leading zeros (serial_hex: as mesh.pki writes serials)
    not_before: datetime
    not_after: datetime


@dataclass
class HostState:
    """What `state` reports of a host: its identities, their files (relpath -> sha256), certificates, and for
    proxies on `mesh_delivery: xds` the bootstrap their Envoy started with."""

    identities: dict[str, str] = field(default_factory=dict)  # name -> kind
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {relpath: sha256}
    certs: dict[str, CertState | None] = field(default_factory=dict)  # name -> its certificate, None when missing
    delivery: dict[str, str] = field(default_factory=dict)  # name -> "xds" | "files" (only proxies that said)

    def resource_version(self, name: str) -> str:
        """The resource version of an identity's xds files as the host has them."""
        return resource_version(self.files.get(name, {}))


def parse_state(text: str) -> HostState:
    """The output of `state`; CtlProtocolError naming the line for anything else (a truncated output too)."""
    state = HostState()
    ended = False
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split(" ")

        def bad(why: str, fields: list[str] = fields, number: int = number, line: str = line) -> CtlProtocolError:
            return CtlProtocolError(f"mesh-ctl state, line {number}: {why}: {line!r}")

        if ended:
            raise bad("after `end`")
        record, args = fields[0], fields[1:]
        if record == "end" and not args:
            ended = True
            continue
        if record not in ("identity", "file", "cert", "delivery") or not args or not NAME.match(args[0]):
            raise bad("not a record of state (identity, file, cert, delivery, end)")
        name = args[0]
        if record == "identity":
            if len(args) != 2 or args[1] not in KINDS:
                raise bad("expected `identity NAME vm|container|checker`")
            if name in state.identities:
                raise bad("identity listed twice")
            state.identities[name] = args[1]
            state.files[name] = {}
            continue
        if name not in state.identities:
            raise bad("names an identity not listed before")
        if record == "file":
            if len(args) != 3 or not _state_relpath(args[1]) or not SHA256.match(args[2]):
                raise bad("expected `file NAME RELPATH SHA256`")
            if args[1] in state.files[name]:
                raise bad("file listed twice")
            state.files[name][args[1]] = args[2]
            continue
        if record == "delivery":
            if len(args) != 2 or args[1] not in DELIVERIES:
                raise bad("expected `delivery NAME xds|files`")
            if name in state.delivery:
                raise bad("delivery listed twice")
            state.delivery[name] = args[1]
            continue
        if name in state.certs:
            raise bad("certificate listed twice")
        if args[1:] == ["none"]:
            state.certs[name] = None
        elif len(args) == 4 and SERIAL.match(args[1]) and EPOCH.match(args[2]) and EPOCH.match(args[3]):
            state.certs[name] = CertState(args[1], datetime.fromtimestamp(int(args[2]), UTC),
                                          datetime.fromtimestamp(int(args[3]), UTC))
        else:
            raise bad("expected `cert NAME SERIAL NOT_BEFORE NOT_AFTER` or `cert NAME none`")
    if not ended:
        raise CtlProtocolError("mesh-ctl state: the output ends without `end` (cut short)")
    missing = sorted(set(state.identities) - set(state.certs))
    if missing:
        raise CtlProtocolError(f"mesh-ctl state: no `cert` line for {', '.join(missing)}")
    return state


def _state_relpath(relpath: str) -> bool:
    if relpath == "envoy.yaml":
        return True
    folder, _slash, base = relpath.partition("/")
    return folder == paths.XDS_DIR_NAME and bool(XDS_FILE.match(base))


def resource_version(shas: Mapping[str, str]) -> str:
    """A proxy's resource version: the first 16 hex digits of the sha256 over the sorted `RELPATH SHA256` lines
    of its xds files (relpath -> sha256 hex; envoy.yaml and anything outside xds/ are left out)."""
    prefix = f"{paths.XDS_DIR_NAME}/"
    lines = "".join(f"{relpath} {sha}\n" for relpath, sha in sorted(shas.items()) if relpath.startswith(prefix))
    return hashlib.sha256(lines.encode()).hexdigest()[:RESOURCE_VERSION_DIGITS]


def resource_version_of(contents: Mapping[str, str | bytes]) -> str:
    """resource_version of files given by content (relpath -> text or bytes)."""
    return resource_version({relpath: hashlib.sha256(content.encode() if isinstance(content, str) else content)
                             .hexdigest() for relpath, content in contents.items()})


def relpath_in(proxy_dir: str, path: str) -> str:
    """A proxy file's path as `state` names it (relative to the proxy folder): `xds/lds.yaml`."""
    if not path.startswith(proxy_dir.rstrip("/") + "/"):
        raise CtlProtocolError(f"{path} is not in {proxy_dir}")
    return posixpath.relpath(path, proxy_dir)


# --- csr and install ---

_CSR = re.compile(r"-----BEGIN CERTIFICATE REQUEST-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE REQUEST-----\n?\Z")


def parse_pending(stdout: str) -> tuple[str, bytes]:
    """(VERSION, CSR PEM) from the output of `csr NAME`."""
    first, _newline, rest = stdout.partition("\n")
    fields = first.split(" ")
    if len(fields) != 2 or fields[0] != "pending" or not VERSION.match(fields[1]):
        raise CtlProtocolError(f"mesh-ctl csr, line 1: expected `pending VERSION`, got {first!r}")
    if not _CSR.match(rest):
        raise CtlProtocolError("mesh-ctl csr: no PEM certificate request after the `pending` line")
    return fields[1], rest.encode()


def parse_installed(stdout: str, name: str | None = None) -> str:
    """The serial (lower-case hex) from the output of `install NAME VERSION` (NAME checked when given)."""
    lines = stdout.splitlines()
    fields = lines[0].split(" ") if len(lines) == 1 else []
    if len(fields) != 3 or fields[0] != "installed" or not NAME.match(fields[1]) or not SERIAL.match(fields[2]) \
            or (name is not None and fields[1] != name):
        raise CtlProtocolError(f"mesh-ctl install: expected `installed {name or 'NAME'} SERIAL`, got {stdout!r}")
    return fields[2]


def parse_restarted(stdout: str, name: str) -> None:
    """Checks the output of `restart NAME`: its one line `restarted NAME`."""
    if stdout.splitlines() != [f"restarted {name}"]:
        raise CtlProtocolError(f"mesh-ctl restart: expected `restarted {name}`, got {stdout!r}")


def serial_hex(number: int) -> str:
    """A certificate serial number as `state` and `install` print it: lower-case hex without leading zeros, as
    mesh.pki writes serials (IssuedCertificate.serial, the issued records)."""
    return format(number, "x")
