"""A fake connector: a dict-backed filesystem, systemd, users, nftables and Envoy per host, plus command stubs,
understanding the commands mesh's builtin modules send and the scripts mesh's steps generate (the observation of
mesh.hosts.observe, the install script of mesh.render.host_validation, the rollback's backup and restore, the
health gate's reads of Envoy's admin API). For unit tests only; the lab tests cover the real SSH connector and
the real shell (tests/unit/test_plan_*.py run the generated scripts with a real `sh`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from mesh.config import paths
from mesh.hosts.connection import CommandResult
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost

Stub = CommandResult | Callable[[str, bytes | None], CommandResult]
_ABSENT = CommandResult(66, b"", b"")
_OK = CommandResult(0, b"", b"")


@dataclass
class FakeFile:
    data: bytes | None  # None: a directory
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"


@dataclass
class FakeUnit:
    active: str = "inactive"
    enabled: bool = False


@dataclass
class FakeHost:
    """One fake host's state and what was done to it (commands run, files put)."""

    name: str
    files: dict[str, FakeFile] = field(default_factory=dict)
    units: dict[str, FakeUnit] = field(default_factory=dict)
    stubs: list[tuple[re.Pattern[str], Stub]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)
    unreachable: str | None = None  # the message, when the host cannot be reached
    users: dict[str, str] = field(default_factory=dict)  # system users: name -> comment (GECOS)
    running: dict[str, str] = field(default_factory=dict)  # proxy -> the bootstrap sha256 its Envoy started with
    firewall_loaded: bool = False  # mesh's nftables table is loaded as mesh loaded it (False: absent or flushed)
    backups: dict[str, dict[str, FakeFile]] = field(default_factory=dict)  # proxy -> its files kept for a rollback

    def stub(self, pattern: str, result: Stub) -> None:
        """Answer commands matching the regex (searched) with result, before the built-in commands."""
        self.stubs.append((re.compile(pattern), result))

    def write(self, path: str, data: bytes | str, mode: int = 0o644, owner: str = "root",
              group: str = "root") -> None:
        self.files[path] = FakeFile(data.encode() if isinstance(data, str) else data, mode, owner, group)

    def changing_commands(self) -> list[str]:
        """Commands that alter state (everything but the facts modules read)."""
        reads = ("stat -c", "sha256sum", "test -e", "systemctl show", "systemctl is-")
        return [cmd for cmd in self.commands if not any(read in cmd for read in reads)]

    def start_envoy(self, proxy: str) -> None:
        """The proxy's Envoy (re)starts: it runs the bootstrap its folder holds now (its node.metadata hash)."""
        found = self.files.get(paths.envoy_config_path(proxy))
        text = (found.data or b"").decode(errors="replace") if found is not None else ""
        match = re.search(r'mesh_bootstrap_sha256: *"?([0-9a-f]{64})', text)
        self.running[proxy] = match.group(1) if match else ""

    def proxy_folders(self) -> list[str]:
        """The folders directly under /etc/mesh/proxies (made by mkdir, or implied by a file below them)."""
        root = f"{paths.MESH_ROOT}/proxies/"
        return sorted({path[len(root):].split("/", 1)[0] for path in self.files
                       if path.startswith(root) and (self.files[path].data is None or "/" in path[len(root):])})


class FakeConnector:
    """The Connector of one FakeHost."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.closed = False

    def _reach(self) -> None:
        if self.host.unreachable is not None:
            raise HostUnreachable(self.host.name, self.host.unreachable)

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        self._reach()
        self.host.commands.append(cmd)
        return self._answer(cmd, stdin)

    def _answer(self, cmd: str, stdin: bytes | None = None) -> CommandResult:
        for pattern, stub in self.host.stubs:
            if pattern.search(cmd):
                return stub if isinstance(stub, CommandResult) else stub(cmd, stdin)
        script = _Scripts(self.host, self._answer).run(cmd)
        return script if script is not None else _Shell(self.host).run(cmd)

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        self._reach()
        self.host.puts.append(path)
        self.host.files[path] = FakeFile(data, mode, owner or "root", group or "root")

    def get(self, path: str) -> bytes | None:
        self._reach()
        found = self.host.files.get(path)
        return found.data if found is not None else None

    def close(self) -> None:
        self.closed = True


class FakeFleet:
    """Fake hosts by name, made on first use; `fleet.connect` is a connector factory for run_playbook."""

    def __init__(self) -> None:
        self.hosts: dict[str, FakeHost] = {}

    def host(self, name: str) -> FakeHost:
        return self.hosts.setdefault(name, FakeHost(name))

    def connect(self, managed: ManagedHost) -> FakeConnector:
        return FakeConnector(self.host(managed.name))


class NoHostMayBeReached:
    """A connector factory for tests of what must be refused before any host is touched: it records every
    host something tried to reach, and fails that attempt."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, host: ManagedHost) -> FakeConnector:
        self.calls.append(host.name)
        raise AssertionError(f"something tried to reach {host.name!r} before the run was refused")


class _Shell:
    """The commands of mesh's facts and builtin modules, on the fake state."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def run(self, cmd: str) -> CommandResult:
        """`if A; then B; fi`, or the last `; ` part of cmd (what comes before sets PATH), its `&&` parts in
        turn."""
        condition = re.fullmatch(r"(?:PATH=\S+; )?if (.+?); then (.+?); fi", cmd)
        if condition is not None:
            return self.run(condition.group(2)) if self.run(condition.group(1)).ok else _OK
        last = cmd.rsplit("; ", 1)[-1]
        result = _OK
        for part in last.split(" && "):
            whatever, _, _ = part.partition(" || true")  # `X || true`: X, then success whatever it did
            words = shlex.split(re.sub(r" [12]?>(/dev/null|&1)", "", whatever))
            if not words:
                continue
            handler = getattr(self, f"_{words[0].replace('-', '_')}", None)
            if handler is None:
                return CommandResult(127, b"", f"fake: no stub for {cmd!r}".encode())
            result = handler(words[1:])
            if whatever != part:
                result = _OK
            if not result.ok:
                return result
        return result

    def _file(self, path: str) -> FakeFile | None:
        return self.host.files.get(path.rstrip("/") if path != "/" else path)

    def _stat(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return _ABSENT
        kind = "directory" if found.data is None else "regular file"
        return CommandResult(0, f"{kind}|{found.mode:o}|{found.owner}|{found.group}\n".encode(), b"")

    def _sha256sum(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None or found.data is None:
            return _ABSENT
        return CommandResult(0, f"{hashlib.sha256(found.data).hexdigest()}  {args[-1]}\n".encode(), b"")

    def _test(self, args: list[str]) -> CommandResult:
        return _OK if self._file(args[-1]) is not None else CommandResult(1, b"", b"")

    def _mkdir(self, args: list[str]) -> CommandResult:
        mode = int(args[args.index("-m") + 1], 8) if "-m" in args else 0o755
        path = args[-1].rstrip("/")
        if "-p" in args:  # its missing parents too
            parts = path.split("/")
            for end in range(2, len(parts)):
                self.host.files.setdefault("/".join(parts[:end]), FakeFile(None, 0o755))
        if path not in self.host.files:
            self.host.files[path] = FakeFile(None, mode)
        return _OK

    def _rm(self, args: list[str]) -> CommandResult:
        path = args[-1]
        for name in [p for p in self.host.files if p == path or p.startswith(path.rstrip("/") + "/")]:
            del self.host.files[name]
        return _OK

    def _mv(self, args: list[str]) -> CommandResult:
        source, dest = args[-2:]
        if source not in self.host.files:
            return CommandResult(1, b"", f"mv: cannot stat '{source}'".encode())
        self.host.files[dest] = self.host.files.pop(source)
        return _OK

    def _touch(self, args: list[str]) -> CommandResult:
        self.host.files.setdefault(args[-1], FakeFile(b""))
        return _OK

    def _chmod(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return CommandResult(1, b"", b"chmod: no such file")
        found.mode = int(args[-2], 8)
        return _OK

    def _chown(self, args: list[str]) -> CommandResult:
        found = self._file(args[-1])
        if found is None:
            return CommandResult(1, b"", b"chown: no such file")
        owner, _, group = args[-2].partition(":")
        below = [path for path in self.host.files if path.startswith(args[-1].rstrip("/") + "/")] if "-R" in args else []
        for path in [args[-1], *below]:
            self.host.files[path].owner = owner or self.host.files[path].owner
            self.host.files[path].group = group or self.host.files[path].group
        return _OK

    def _getent(self, args: list[str]) -> CommandResult:
        name = args[-1]
        if args[0] != "passwd" or name not in self.host.users:
            return CommandResult(2, b"", b"")
        return CommandResult(0, f"{name}:x:999:999:{self.host.users[name]}:/:/usr/sbin/nologin\n".encode(), b"")

    def _id(self, args: list[str]) -> CommandResult:
        return _OK if args[-1] in self.host.users else CommandResult(1, b"", f"id: '{args[-1]}': no such user".encode())

    def _useradd(self, args: list[str]) -> CommandResult:
        name = args[-1]
        if name in self.host.users:
            return CommandResult(9, b"", f"useradd: user '{name}' already exists".encode())
        self.host.users[name] = args[args.index("--comment") + 1] if "--comment" in args else ""
        return _OK

    def _visudo(self, args: list[str]) -> CommandResult:  # `visudo -cf STAGED`: the fake's sudo takes any rule
        return _OK if self._file(args[-1]) is not None else CommandResult(1, b"", b"visudo: no such file")

    def _usermod(self, args: list[str]) -> CommandResult:
        return _OK if args[-1] in self.host.users else CommandResult(6, b"", f"usermod: user '{args[-1]}' does not exist".encode())

    def _userdel(self, args: list[str]) -> CommandResult:
        if self.host.users.pop(args[-1], None) is None:
            return CommandResult(6, b"", f"userdel: user '{args[-1]}' does not exist".encode())
        return _OK

    def _systemctl(self, args: list[str]) -> CommandResult:
        verb, name = args[0], args[-1]
        if verb == "daemon-reload":
            return _OK
        if name not in self.host.units and f"{paths.SYSTEMD_DIR}/{name}" in self.host.files:
            self.host.units[name] = FakeUnit()  # a unit file systemd now knows
        unit = self.host.units.get(name)
        if verb == "disable" and "--now" in args and unit is not None:
            unit.active = "inactive"
            self._envoy(name, start=False)
        if verb == "show":
            return CommandResult(0, b"loaded\n" if unit else b"not-found\n", b"")
        if unit is None:
            return CommandResult(5, b"", f"Unit {name} not found.".encode())
        if verb == "is-active":
            return CommandResult(0 if unit.active == "active" else 3, f"{unit.active}\n".encode(), b"")
        if verb == "is-enabled":
            return CommandResult(0 if unit.enabled else 1, b"enabled\n" if unit.enabled else b"disabled\n", b"")
        if verb in ("enable", "disable"):
            unit.enabled = verb == "enable"
        elif verb in ("start", "restart", "reload"):
            if verb == "restart" or unit.active != "active":
                self._envoy(name, start=True)
            unit.active = "active"
        elif verb == "stop":
            unit.active = "inactive"
            self._envoy(name, start=False)
        return _OK

    def _envoy(self, unit: str, start: bool) -> None:
        """A proxy's unit started or stopped: its Envoy with it."""
        match = re.fullmatch(r"mesh-envoy-(.+)\.service", unit)
        if match is None:
            return
        if start:
            self.host.start_envoy(match.group(1))
        else:
            self.host.running.pop(match.group(1), None)


_OBSERVE_START = "PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin\nfor d in "  # observe_script's first lines
_INSTALL_START = "set -u\nadmin="
_ADMIN_GET = re.compile(r"curl -s\S* --max-time \d+ --unix-socket (\S+) \"?http://(?:admin|envoy)(/[a-z_]+)")


class _Scripts:
    """The scripts mesh's steps generate, answered from the fake host's state; None for any other command.
    `answer` runs one command as the fake host would (its stubs first), for the parts a script delegates (docker,
    openssl, the reachability rules' check)."""

    def __init__(self, host: FakeHost, answer: Callable[[str], CommandResult]) -> None:
        self.host = host
        self.answer = answer

    def run(self, cmd: str) -> CommandResult | None:
        if cmd.startswith(_OBSERVE_START):
            return CommandResult(0, "".join(self._observed(line) for line in cmd.splitlines()).encode(), b"")
        if cmd.startswith(_INSTALL_START):
            return self._install(cmd)
        if cmd.startswith('echo "READY $(curl'):
            return self._health(cmd)
        if cmd.startswith("for p in ") and "sha256sum" in cmd:
            return self._sums(cmd)
        if cmd.startswith("printf '%s\\t' ") and "(base64 -w0 < " in cmd:  # the texts of files to diff
            return self._texts(cmd)
        if cmd.startswith("if [ -f ") and "sha256sum <" in cmd:  # Envoy's binary, by its sha256
            found = self.host.files.get(shlex.split(cmd)[3].rstrip(";"))
            digest = hashlib.sha256(found.data).hexdigest() if found is not None and found.data is not None else ""
            return CommandResult(0, f"{digest}\n".encode() if digest else b"", b"")
        if "gunzip -c " in cmd:
            return self._unpack(cmd)
        if cmd.startswith(f"mkdir -p -m 0700 {_rollback_dir()} "):
            return self._backup(cmd)
        if cmd.startswith("[ -f ") and f"{_rollback_dir()}/" in cmd.split(";", 1)[0]:
            return self._restore(cmd)
        if cmd.startswith(f"{paths.NFT_BINARY} -f "):
            self.host.firewall_loaded = True
            return _OK
        if cmd.startswith(f"{paths.NFT_BINARY} -c -f "):
            return _OK
        if cmd.startswith(f"[ -n \"$({paths.NFT_BINARY} list table inet mesh"):
            return _OK if self.host.firewall_loaded else CommandResult(1, b"", b"")
        if cmd.startswith(f"{paths.NFT_BINARY} delete table inet mesh"):
            self.host.firewall_loaded = False
            return _OK
        if cmd.startswith("grep -o 'mesh_bootstrap_sha256"):
            found = self.host.files.get(shlex.split(cmd.split(" | ")[0])[-1])
            match = re.search(r"[0-9a-f]{64}", (found.data or b"").decode(errors="replace") if found else "")
            return CommandResult(0 if match else 1, f"{match.group(0)}\n".encode() if match else b"", b"")
        guarded = re.fullmatch(r"\[ -x (\S+) \] && \[ -f (\S+) \] \|\| exit 0; (.+)", cmd, re.DOTALL)
        if guarded is not None:  # run only where installed (the health gate's probe from a controller)
            installed = all(self.host.files.get(path) is not None for path in guarded.group(1, 2))
            return self.answer(guarded.group(3)) if installed else _OK
        admin = _ADMIN_GET.match(cmd)
        if admin is not None:
            return self._admin(admin.group(1), admin.group(2))
        return None

    # ---- mesh.hosts.observe ---------------------------------------------------------------------------------

    def _observed(self, line: str) -> str:
        host = self.host
        if line.startswith(("PATH=", "true")):
            return ""
        if line.startswith("for d in "):
            return "".join(f"P\t{proxy}\n" for proxy in host.proxy_folders())
        if line.startswith("for u in "):
            folder = shlex.split(line)[3].rsplit("/", 1)[0]
            names = [path.rsplit("/", 1)[1] for path in host.files if path.startswith(folder + "/mesh-envoy-")
                     and path.endswith(".service") and path.count("/") == folder.count("/") + 1]
            return "".join(f"UF\t{name}\n" for name in sorted(names))
        if line.startswith("getent passwd"):
            return "".join(f"W\t{name}:{comment}\n" for name, comment in {"root": "root", **host.users}.items())
        if line.startswith("stat -L -c 'F"):
            return "".join(self._path_fact(path) for path in self._operands(line))
        if line.startswith("sha256sum -- "):
            return "".join(f"H\t{hashlib.sha256(found.data).hexdigest()}  {path}\n"
                           for path in self._operands(line)
                           if (found := host.files.get(path.rstrip("/"))) is not None and found.data is not None)
        if line.startswith("systemctl show "):
            blocks = []
            for name in self._operands(line):
                unit = host.units.get(name)
                enabled = ("enabled" if unit.enabled else "disabled") if unit else ""
                blocks.append(f"U\tId={name}\nU\tUnitFileState={enabled}\n"
                              f"U\tActiveState={unit.active if unit else 'inactive'}\nU\t\n")
            return "".join(blocks)
        words = shlex.split(line.split("\"$(")[0])
        if line.startswith("printf 'R"):
            return f"R\t{words[2]}\t{host.running.get(words[2], '')}\n"
        if line.startswith("printf 'C"):
            cert_path, key_path = re.findall(r"(?:<|-in) (\S+)", line)[:2]
            cert = host.files.get(cert_path)
            public = self.answer(f"openssl pkey -in {key_path} -pubout") if key_path in host.files else _ABSENT
            return (f"C\t{words[2]}\t{base64.b64encode(cert.data).decode() if cert and cert.data else ''}\t"
                    f"{base64.b64encode(public.stdout).decode() if public.ok else ''}\n")
        if line.startswith("if [ -f "):  # Envoy's binary
            found = host.files.get(shlex.split(line)[3])
            return f"B\t{hashlib.sha256(found.data).hexdigest()}\n" if found and found.data is not None else ""
        if line.startswith(("t=$(nft list table inet mesh", "l=$(nft list table inet mesh")):
            return "N\tloaded\n" if host.firewall_loaded else "N\tdrift\n"
        if line.startswith("docker ps "):
            listed = self.answer(line.split(" 2>/dev/null")[0])
            return listed.text() + "\n" if listed.ok and listed.text() else ""
        if line.startswith("docker image inspect "):
            return "I\tpresent\n" if self.answer(line.split(" >/dev/null")[0]).ok else "I\tmissing\n"
        if line.startswith("printf 'M"):
            marker = host.files.get(shlex.split(line.split("$(cat ")[1].split(" 2>")[0])[0])
            return f"M\t{(marker.data or b'').decode().strip() if marker else ''}\n"
        if " check >/dev/null 2>&1 && echo 'K" in line:  # the reachability rules in place
            return "K\tok\n" if self.answer(line.split(" >/dev/null")[0]).ok else "K\tdrift\n"
        raise AssertionError(f"the fake host does not know this observation line: {line!r}")

    def _operands(self, line: str) -> list[str]:
        """The operands after `--` of one command of the observation, its `DIR/*` globs expanded as sh would."""
        words = shlex.split(line.split(" 2>/dev/null")[0])
        found: list[str] = []
        for word in words[words.index("--") + 1:]:
            if word.endswith("/*"):
                folder = word[:-2]
                found += sorted(path for path in self.host.files
                                if path.startswith(folder + "/") and "/" not in path[len(folder) + 1:])
            else:
                found.append(word)
        return found

    def _path_fact(self, path: str) -> str:
        """stat's line for path (nothing when it is missing: stat's error goes to /dev/null)."""
        found = self.host.files.get(path.rstrip("/") if path != "/" else path)
        if found is None:
            return ""
        kind = "directory" if found.data is None else "regular file"
        return (f"F\t{path}\t{kind}|{found.mode:o}|{found.owner}|{found.group}|{_numeric(found.owner)}|"
                f"{_numeric(found.group)}\n")

    # ---- the proxy's files: sums, the install script, the rollback ------------------------------------------

    def _sums(self, cmd: str) -> CommandResult:
        listed = shlex.split(cmd[len("for p in "):cmd.index("; do")])
        found = []
        for item in listed:
            if item.endswith("/*"):
                folder = item[:-2]
                found += sorted(path for path in self.host.files if path.startswith(folder + "/")
                                and "/" not in path[len(folder) + 1:])
            else:
                found.append(item)
        lines = [f"{path}\t{hashlib.sha256(data).hexdigest()}\n" for path in dict.fromkeys(found)
                 if (data := getattr(self.host.files.get(path), "data", None)) is not None]
        return CommandResult(0, "".join(lines).encode(), b"")

    def _texts(self, cmd: str) -> CommandResult:
        lines = []
        for part in cmd.split("; echo")[:-1]:
            path = shlex.split(part.split("printf '%s\\t' ", 1)[1].split("; (base64")[0])[0]
            found = self.host.files.get(path)
            data = base64.b64encode(found.data).decode() if found is not None and found.data is not None else ""
            lines.append(f"{path}\t{data}\n")
        return CommandResult(0, "".join(lines).encode(), b"")

    def _install(self, cmd: str) -> CommandResult:
        """mv, mkdir and rm lines in order (the fake Envoy takes each file at once: no wait)."""
        files = self.host.files
        for line in cmd.splitlines():
            words = shlex.split(line.split(" || ")[0]) if line.startswith(("mv ", "rm ", "[ -d ")) else []
            if words[:2] == ["mv", "-f"]:
                if words[2] not in files:
                    return CommandResult(1, b"", f"mv: cannot stat '{words[2]}'".encode())
                files[words[3]] = files.pop(words[2])
            elif words[:1] == ["rm"]:
                for path in [p for p in files if p == words[-1] or p.startswith(words[-1].rstrip("/") + "/")]:
                    del files[path]
            elif words[:1] == ["["] and words[2] not in files:
                files[words[2]] = FakeFile(None, 0o755)
        return _OK

    def _backup(self, cmd: str) -> CommandResult:
        proxy = re.search(rf"{re.escape(_rollback_dir())}/(\S+)\.tar\.tmp", cmd)
        if proxy is None:
            raise AssertionError(f"the fake host does not know this backup: {cmd}")
        folder = paths.proxy_dir(proxy.group(1))
        kept = (f"{folder}/{paths.XDS_DIR_NAME}/", f"{folder}/{paths.PROXY_CA_NAME}", f"{folder}/envoy.yaml")
        self.host.backups[proxy.group(1)] = {path: FakeFile(found.data, found.mode, found.owner, found.group)
                                             for path, found in self.host.files.items()
                                             if path.startswith(kept[0]) or path in kept[1:]}
        return _OK

    def _restore(self, cmd: str) -> CommandResult:
        proxy = re.search(rf"{re.escape(_rollback_dir())}/(\S+)\.tar", cmd)
        if proxy is None or proxy.group(1) not in self.host.backups:
            return CommandResult(3, b"", b"")
        kept = self.host.backups[proxy.group(1)]
        xds = paths.xds_dir(proxy.group(1)) + "/"
        for path in [p for p in self.host.files if p.startswith(xds) and p not in kept]:
            del self.host.files[path]
        self.host.files.update({path: FakeFile(found.data, found.mode, found.owner, found.group)
                                for path, found in kept.items()})
        return _OK

    def _unpack(self, cmd: str) -> CommandResult:
        packed, dest = re.search(r"gunzip -c (\S+) > (\S+)\.mesh-tmp", cmd).groups()  # type: ignore[union-attr]
        found = self.host.files.pop(packed, None)
        if found is None or found.data is None:
            return CommandResult(1, b"", f"gunzip: {packed}: No such file".encode())
        self.host.files[dest] = FakeFile(gzip.decompress(found.data), 0o755)
        return _OK

    # ---- Envoy's admin API -------------------------------------------------------------------------------

    def _admin(self, socket: str, endpoint: str) -> CommandResult:
        proxy = next((name for name in self.host.running if paths.admin_socket_path(name) == socket), None)
        if proxy is None:
            return CommandResult(7, b"", b"curl: (7) Couldn't connect to server")
        if endpoint == "/server_info":
            info = {"state": "LIVE", "node": {"metadata": {"mesh_bootstrap_sha256": self.host.running[proxy]}}}
            return CommandResult(0, json.dumps(info, indent=1).encode(), b"")
        if endpoint == "/ready":
            return CommandResult(0, b"LIVE\n", b"")
        if endpoint == "/listeners":
            return CommandResult(0, "".join(f"{name}::0.0.0.0:0\n" for name in self._names(proxy, "lds")).encode(),
                                 b"")
        if endpoint == "/clusters":
            return CommandResult(0, "".join(f"{name}::127.0.0.1:1::health_flags::healthy\n"
                                            for name in self._names(proxy, "cds")).encode(), b"")
        return CommandResult(0, b"", b"")

    def _names(self, proxy: str, kind: str) -> list[str]:
        found = self.host.files.get(f"{paths.xds_dir(proxy)}/{kind}.yaml")
        data = yaml.safe_load(found.data or b"") if found is not None else None
        return [str(item.get("name")) for item in (data or {}).get("resources", []) if isinstance(item, dict)]

    def _health(self, cmd: str) -> CommandResult:
        socket = _ADMIN_GET.search(cmd)
        if socket is None:
            raise AssertionError(f"the fake host does not know this health read: {cmd}")
        ready = self._admin(socket.group(1), "/ready")
        if not ready.ok:
            return CommandResult(0, b"READY \nBOOT \n", b"")
        proxy = next(name for name in self.host.running if paths.admin_socket_path(name) == socket.group(1))
        lines = ["READY LIVE", *(f"LISTENER {line}" for line in self._admin(socket.group(1), "/listeners").text()
                                 .splitlines()), f"BOOT {self.host.running[proxy]}",
                 *self._admin(socket.group(1), "/clusters").text().splitlines()]
        return CommandResult(0, ("\n".join(lines) + "\n").encode(), b"")


def _numeric(name: str) -> str:
    return name if name.isdigit() else {"root": "0"}.get(name, "999")


def _rollback_dir() -> str:
    from mesh.deploy.steps.rollback import ROLLBACK_DIR  # the deploy's; imported late (it imports the plan)

    return ROLLBACK_DIR
