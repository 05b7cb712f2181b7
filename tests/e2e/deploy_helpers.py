"""Helpers of the `mesh deploy` end-to-end tests: run the CLI with a timeout, read its PLAY RECAP, reach lab
nodes over SSH, probe ports and TLS from one node to another, ask Consul, and find private keys. No fixtures
(those are in the test module); every probe returns what it saw, and the tests decide.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lab_helpers import LAB_ARGS, MESH, LabUp, inventory_hosts, machine_state

from mesh.testing.health_endpoint import LeafFiles

T = TypeVar("T")

LOCK = "/tmp/mesh-lab-dev.lock"
SIZE = LAB_ARGS  # the shared lab's size: another would take it down
REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "inventory" / "lab.yaml"
LAB_STATE = Path(os.environ.get("MESH_LAB_STATE") or "/var/lib/mesh-lab")
WAIT = 30.0  # the generous timeout of timed behaviour (issue 12)


# ---- the CLI -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One finished `mesh` command."""

    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return (f"`mesh {' '.join(self.argv)}` exited {self.code}\n--- stdout\n{self.stdout}\n"
                f"--- stderr\n{self.stderr}")

    def recap(self) -> dict[str, dict[str, int]]:
        return parse_recap(self.stdout)


def run_mesh(*args: str, timeout: float = 300) -> Run:
    """`mesh ARGS` with its output captured; a run past `timeout` fails the test, showing what it printed."""
    try:
        done = subprocess.run([MESH, *args], capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        command = " ".join(args)
        raise AssertionError(f"`mesh {command}` still ran after {timeout:.0f} s\n{out}\n{err}") from None
    return Run(tuple(args), done.returncode, done.stdout, done.stderr)


_RECAP_LINE = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")


def parse_recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP's counts per host (`vm1 : ok=3 changed=0 ...`); {} when there is no recap."""
    _, found, tail = stdout.rpartition("PLAY RECAP")
    if not found:
        return {}
    counts: dict[str, dict[str, int]] = {}
    for line in tail.splitlines()[1:]:
        match = _RECAP_LINE.match(line.strip())
        if match:
            counts[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return counts


# ---- waiting -----------------------------------------------------------------------------------------------

def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], what: str, timeout: float = WAIT,
             interval: float = 0.5) -> T:
    """Call probe until ok(its value) holds, and return that value; fail after timeout with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {value!r}")
        time.sleep(interval)


# ---- lab nodes ---------------------------------------------------------------------------------------------

def lab_handle(up_output: str, before: Any) -> LabUp:
    """The lab of inventory/lab.yaml as lab_helpers knows it (its SSH key, known_hosts and addresses)."""
    return LabUp(INVENTORY, LAB_STATE, inventory_hosts(INVENTORY), before, up_output)


@contextmanager
def shared_lab() -> Iterator[LabUp]:
    """The lab at inventory/lab.yaml at the shared size (idempotent: a lab already up, deployed or not, is used
    as it is, as a user re-deploys), under the lock that keeps test runs side by side off each other. For a
    module-scoped fixture only: one process holding the lock across modules would wait on itself. The lab
    stays up, deployed, for whoever uses it next; conftest's session `lab` takes it down at the end."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = machine_state()
        up = run_mesh("lab", "up", *SIZE, "--inventory", str(INVENTORY), timeout=900)
        if up.code != 0 and "does not resize" in up.stderr:
            run_mesh("lab", "down", timeout=300)
            up = run_mesh("lab", "up", *SIZE, "--inventory", str(INVENTORY), timeout=900)
        if up.code != 0:
            raise AssertionError(f"the lab could not start, so `mesh deploy` cannot be tested:\n{up}")
        yield lab_handle(up.stdout, before)


def sh(lab: LabUp, host: str, command: str, input: str | bytes | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`command` as root on a lab node over SSH (strict host keys); stdin from input."""
    data = input.encode() if isinstance(input, str) else input
    done = subprocess.run(lab.ssh_argv(host, command), input=data, capture_output=True, timeout=timeout,
                          check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def out(lab: LabUp, host: str, command: str, input: str | bytes | None = None, timeout: float = 60) -> str:
    """stdout of `command` on host, which must succeed."""
    done = sh(lab, host, command, input=input, timeout=timeout)
    assert done.returncode == 0, f"{host}: `{command}` exited {done.returncode}: {done.stderr}{done.stdout}"
    return done.stdout


def hops(lab: LabUp, host: str, port: int, request_id: str | None = None) -> list[dict[str, Any]] | str:
    """What the demo app on host:port answers from inside host (`{"hops": [...]}`), asked with `x-request-id`
    when given, or why it did not answer."""
    header = f"-H {shlex.quote('x-request-id: ' + request_id)} " if request_id else ""
    done = sh(lab, host, f"curl -sS --max-time 10 {header}http://127.0.0.1:{port}/", timeout=20)
    if done.returncode != 0:
        return f"curl exited {done.returncode}: {done.stderr.strip()}"
    try:
        return list(json.loads(done.stdout)["hops"])
    except (ValueError, KeyError, TypeError):
        return f"not a hops answer: {done.stdout[:300]!r}"


def unit_pids(lab: LabUp, host: str, units: Iterable[str]) -> dict[str, str]:
    """MainPID and ActiveState of each unit on host: {'mesh-envoy-web-8080.service': '1234 active'}."""
    names = list(units)
    listed = " ".join(map(shlex.quote, names))
    text = out(lab, host, f"systemctl show -p Id -p MainPID -p ActiveState {listed}")
    found: dict[str, str] = {}
    for block in text.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        found[fields.get("Id", "?")] = f"{fields.get('MainPID')} {fields.get('ActiveState')}"
    return found


_PY_CONNECT = """
import concurrent.futures, json, socket, sys

def probe(target):
    address, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((address, int(port)), timeout=3) as s:
            s.settimeout(1)
            try:
                banner = s.recv(64).decode(errors="replace").strip()
            except OSError:
                banner = ""
            return target, "open " + banner
    except OSError as e:
        return target, "closed " + type(e).__name__

with concurrent.futures.ThreadPoolExecutor(len(sys.argv)) as pool:
    print(json.dumps(dict(pool.map(probe, sys.argv[1:]))))
"""


def tcp_from(lab: LabUp, source: str, targets: Iterable[tuple[str, int]]) -> dict[str, str]:
    """From node `source`, connect to each address:port at once: {'10.77.0.12:9090': 'closed TimeoutError',
    '10.77.0.12:22': 'open SSH-2.0-OpenSSH_9.2p1 ...'}."""
    argv = " ".join(f"{address}:{port}" for address, port in targets)
    return dict(json.loads(out(lab, source, f"python3 - {argv}", input=_PY_CONNECT, timeout=30)))


# ---- TLS probes from another node --------------------------------------------------------------------------

_PY_TLS = r"""
import json, socket, ssl, sys
address, port, mode, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cert, key = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, None)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False          # mesh identities are SPIFFE URIs, not DNS names
ctx.load_verify_locations(ca)       # but the server must still prove a mesh certificate
if cert:
    ctx.load_cert_chain(cert, key)
result = {"handshake": False, "answer": "", "error": ""}
data = b""
try:
    with socket.create_connection((address, port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            result["handshake"] = True
            if mode == "http":
                tls.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            else:
                tls.sendall(b"hop\n")
            while not (mode == "line" and data.endswith(b"\n")):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    if not data:
        result["error"] = "closed without an answer"
except (OSError, ssl.SSLError) as e:
    result["error"] = type(e).__name__ + ": " + str(e)
result["answer"] = data.decode(errors="replace")[:3000]
print(json.dumps(result))
"""


@dataclass(frozen=True)
class TlsProbe:
    """What a TLS client on another node saw: the bytes that came back (none when refused), and the error."""

    handshake: bool
    answer: str
    error: str

    def http_status(self) -> int | None:
        head = self.answer.split("\r\n", 1)[0].split()
        return int(head[1]) if len(head) > 1 and head[0].startswith("HTTP/") and head[1].isdigit() else None

    def json_body(self) -> Any:
        body = self.answer.split("\r\n\r\n", 1)[-1]
        try:
            return json.loads(body)
        except ValueError:
            return None


def tls_from(lab: LabUp, source: str, address: str, port: int, mode: str, server_ca: Path,
             client: LeafFiles | None) -> TlsProbe:
    """From node `source`, open TLS to address:port (verifying the server against server_ca), present
    `client`'s certificate when given, and ask: `GET /` (mode http) or one line `hop` (mode line). The PEMs
    are copied to a private folder on `source` for the probe and removed after it."""
    folder = f"/root/mesh-e2e-probe-{os.getpid()}-{time.monotonic_ns()}"
    files = {"ca.pem": server_ca.read_bytes()}
    if client is not None:
        files["client.pem"] = client.cert.read_bytes()
        files["client-key.pem"] = client.key.read_bytes()
    try:
        out(lab, source, f"install -d -m 0700 {folder}")
        for name, data in files.items():
            out(lab, source, f"umask 077 && cat > {folder}/{name}", input=data)
        argv = [address, str(port), mode, f"{folder}/ca.pem"]
        if client is not None:
            argv += [f"{folder}/client.pem", f"{folder}/client-key.pem"]
        seen = json.loads(out(lab, source, "python3 - " + " ".join(argv), input=_PY_TLS, timeout=30))
    finally:
        sh(lab, source, f"rm -rf {folder}")
    return TlsProbe(seen["handshake"], seen["answer"], seen["error"])


# ---- Consul ------------------------------------------------------------------------------------------------

CONSUL_TOKEN_FILE = LAB_STATE / "consul-mesh-token"  # the lab inventory's mesh_consul_token_file


def consul(url: str, path: str, token_file: Path | None = CONSUL_TOKEN_FILE) -> Any:
    """GET Consul's API with the lab's mesh token (its Consul denies anonymous reads, silently: empty lists)."""
    headers = {"X-Consul-Token": token_file.read_text().strip()} if token_file and token_file.exists() else {}
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def check_status(url: str, service: str, service_id: str) -> str:
    """The worst status of the checks Consul holds for one service instance ('missing' when none)."""
    checks = [c for c in consul(url, f"/v1/health/checks/{service}") if c.get("ServiceID") == service_id]
    if not checks:
        return "missing"
    order = {"passing": 0, "warning": 1, "critical": 2}
    return max((c["Status"] for c in checks), key=lambda s: order.get(s, 3))


# ---- private keys ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoundKey:
    """A private key found in a file: where, and the SHA-256 of its public key (None if unreadable)."""

    place: str  # a host name, or "local" for the machine running mesh
    path: str
    public: str | None


_PRIVATE_PEM = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)


def public_fingerprint(pem: bytes) -> list[str | None]:
    """The SHA-256 of the public key of every private key block in pem (None for one that will not load)."""
    found: list[str | None] = []
    for match in _PRIVATE_PEM.finditer(pem):
        text = match.group(0)
        try:
            if match.group(1) == b"OPENSSH ":
                key: Any = serialization.load_ssh_private_key(text, password=None)
            else:
                key = serialization.load_pem_private_key(text, password=None)
            public = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            found.append(hashlib.sha256(public).hexdigest())
        except (ValueError, TypeError):
            found.append(None)
    return found


def cert_public_fingerprint(pem: bytes) -> str:
    """The SHA-256 of the public key of the first certificate in pem."""
    cert = x509.load_pem_x509_certificates(pem)[0]
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


_MARK = "=====mesh-e2e-file "
# Every filesystem a node writes to (/ and its tmpfs mounts, Docker's data); -xdev keeps each to its own.
_FIND_KEYS = (
    "for r in / /tmp /run /dev/shm /var/tmp /var/lib/docker; do [ -d $r ] && "
    "find $r -xdev -type f -size -1024k -print0 2>/dev/null; done | xargs -0 -r grep -lIs -e 'PRIVATE KEY' "
    "| sort -u | while read -r f; do printf '\\n%s%s\\n' '" + _MARK + "' \"$f\"; cat \"$f\"; done"
)


def _split_files(text: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for chunk in text.split("\n" + _MARK)[1:]:
        path, _, body = chunk.partition("\n")
        files[path] = body.encode()
    return files


def keys_on_node(lab: LabUp, host: str) -> list[FoundKey]:
    """Every private key in a file of up to 1 MiB on the node's own filesystems."""
    text = out(lab, host, _FIND_KEYS, timeout=120)
    return [FoundKey(host, path, fp) for path, body in _split_files(text).items()
            for fp in public_fingerprint(body)]


def keys_in_folders(folders: Iterable[Path], skip: Iterable[str] = (".venv", ".git")) -> list[FoundKey]:
    """Every private key in a file of up to 1 MiB under folders on this machine."""
    skipped = set(skip)
    found: list[FoundKey] = []
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d not in skipped]
            for name in names:
                path = os.path.join(root, name)
                try:
                    if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) > 1 << 20:
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue
                if b"PRIVATE KEY" in data:
                    found += [FoundKey("local", path, fp) for fp in public_fingerprint(data)]
    return found


# ---- what a deploy may touch on a host ---------------------------------------------------------------------

_FILES = ("for p in /etc/mesh /usr/local/lib/mesh /etc/systemd/system; do [ -e $p ] && "
          "find $p \\( -path '/etc/systemd/system/*' -a ! -name 'mesh-*' \\) -prune -o -type f -print0; done "
          "| sort -z > /run/mesh-e2e-files; xargs -0 -r stat -c '%n %a %U:%G' < /run/mesh-e2e-files; "
          "xargs -0 -r sha256sum < /run/mesh-e2e-files; rm -f /run/mesh-e2e-files")


def host_files(lab: LabUp, host: str) -> str:
    """Path, mode, owner and SHA-256 of every file mesh writes on a host (/etc/mesh, Envoy, the units)."""
    return out(lab, host, _FILES, timeout=120)


# ---- inventory copies --------------------------------------------------------------------------------------

Edit = Callable[[dict[str, Any]], None]


def inventory_copy(folder: Path, state_dir: str, edit: Edit | None = None,
                   hosts: dict[str, Edit] | None = None) -> Path:
    """inventory/lab.yaml (with any group_vars/ and host_vars/ beside it) copied to folder with mesh_state_dir
    pinned to the lab's (same CA), then `edit` applied to the inventory document and hosts[name] to that
    host's variables (its host_vars file when it has one, else its entry in the inventory). Returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("group_vars", "host_vars"):
        if (INVENTORY.parent / sub).is_dir():
            shutil.copytree(INVENTORY.parent / sub, folder / sub)
    document = yaml.safe_load(INVENTORY.read_text())
    document["all"].setdefault("vars", {})["mesh_state_dir"] = state_dir
    if edit is not None:
        edit(document)
    for name, change in (hosts or {}).items():
        host_file = folder / "host_vars" / f"{name}.yml"
        if host_file.exists():
            variables = yaml.safe_load(host_file.read_text())
            change(variables)
            host_file.write_text(yaml.safe_dump(variables, sort_keys=False))
        else:
            entries = [group["hosts"][name] for group in document["all"]["children"].values()
                       if name in (group.get("hosts") or {})]
            assert entries, f"{name} is not in {INVENTORY}"
            change(entries[0])
    copy = folder / INVENTORY.name
    copy.write_text(yaml.safe_dump(document, sort_keys=False))
    return copy
