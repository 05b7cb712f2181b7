"""Real Envoys on loopback, no lab: a two-service mesh (`web` calls `api`) on 127.0.0.2 and 127.0.0.3 rendered by
mesh's own `compute_proxy_config` + `render_proxy_files` into proxy folders under a temp folder (laid out as a
deploy lays out /etc/mesh/proxies/<proxy>: bootstrap, xds/, ca.pem, the `tls` link), certificates from mesh's own
CA in a throwaway state dir, Envoys started under this process (they get SIGTERM when it exits: PR_SET_PDEATHSIG)
and stopped by PID, and a fast fixed-answer HTTP app. Benchmarks and tests only; never imported by mesh itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import compute_proxy_config, paths
from mesh.config.model import Admin, CertificateSecret, ProxyConfig, Secrets, TrustBundleSecret
from mesh.config.validate import envoy_binary, rewrite_file_paths
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.pki import CertificateAuthority
from mesh.render import (
    INSTALL_WAIT_S,
    ProxyFiles,
    host_validation,
    render_proxy_files,
    stale_paths,
    static_bootstrap,
    transition,
)

T = TypeVar("T")
CLIENT_ADDRESS = "127.0.0.2"  # web's host
SERVER_ADDRESS = "127.0.0.3"  # api's host
APP_BODY = b"ok\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def eventually(probe: Callable[[], T | None], timeout: float, what: str, log: Path | None = None) -> T:
    """probe()'s first truthy result within timeout seconds; else TimeoutError naming `what` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as error:  # noqa: BLE001 (retry until the deadline, then report the last one)
            last = error
        else:
            if result is not None and result is not False:
                return result
            last = result
        time.sleep(0.1)
    raise TimeoutError(f"not within {timeout} s: {what} (last: {last!r})\n{_tail(log) if log else ''}")


# --- the two-service mesh ---

@dataclass(frozen=True)
class TwoServiceMesh:
    """`web` (on CLIENT_ADDRESS) has `api` (on SERVER_ADDRESS) as upstream at 127.0.0.1:web.upstreams[0].local_port."""

    mesh: Mesh
    web: Workload
    api: Workload

    @property
    def outbound_port(self) -> int:
        return self.web.upstreams[0].local_port

    def address(self, workload: Workload) -> str:
        return self.mesh.host(workload.host).connection.address


def two_service_mesh(api_app_port: int, trust_domain: str = "loop.mesh") -> TwoServiceMesh:
    """A mesh of two workloads with free ports; api's app is expected at 127.0.0.1:api_app_port."""
    web = Workload("h-web", 0, "web", free_port(), trust_domain, proxy_port=free_port(CLIENT_ADDRESS),
                   admin_port=free_port(), metrics_port=free_port(CLIENT_ADDRESS),
                   upstreams=(Upstream("api", free_port()),))
    api = Workload("h-api", 0, "api", api_app_port, trust_domain, proxy_port=free_port(SERVER_ADDRESS),
                   admin_port=free_port(), metrics_port=free_port(SERVER_ADDRESS),
                   health=Health("http", "/healthz", datetime.timedelta(seconds=1), datetime.timedelta(seconds=1)))
    hosts = (ManagedHost(web.host, "vm", Connection(CLIENT_ADDRESS), (web,)),
             ManagedHost(api.host, "vm", Connection(SERVER_ADDRESS), (api,)))
    services = MappingProxyType({w.service: (w,) for w in (web, api)})
    return TwoServiceMesh(Mesh(MeshSettings(trust_domain=trust_domain), hosts, (), services), web, api)


# --- certificates from mesh's real CA ---

@dataclass(frozen=True)
class Identity:
    """A workload's files as Envoy reads them: chain (leaf + intermediate), key, and the mesh root."""

    chain: bytes
    key: bytes
    root: bytes


def issue_identities(state_dir: Path, trust_domain: str, workloads: tuple[Workload, ...]) -> dict[str, Identity]:
    """Make a CA in state_dir with mesh.pki (as `mesh ca init` does) and sign a leaf per workload from a CSR
    whose key was made here, as a host would; keyed by the workload's service."""
    authority, _created = CertificateAuthority.ensure(str(state_dir), trust_domain)
    identities = {}
    for workload in workloads:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, workload.service)]))
               .sign(key, hashes.SHA256()))
        issued = authority.sign(csr.public_bytes(serialization.Encoding.PEM), workload.spiffe_id,
                                datetime.timedelta(hours=1), workload.host, workload.consul_id,
                                dns_names=(workload.consul_id,))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        identities[workload.service] = Identity(issued.chain_pem, key_pem, authority.root_pem)
    return identities


def proxy_config_in(cfg: ProxyConfig, folder: Path, inbound_address: str | None = None) -> ProxyConfig:
    """cfg with its proxy folder at `folder` instead of /etc/mesh/proxies/<proxy> (envoy.yaml, xds/, the `tls`
    link, ca.pem, admin/admin.sock there), and its inbound and metrics listeners on inbound_address when given."""
    root = str(folder)
    secrets = Secrets(CertificateSecret(cfg.secrets.certificate.name, f"{root}/tls/cert.pem", f"{root}/tls/key.pem"),
                      TrustBundleSecret(cfg.secrets.trust_bundle.name, f"{root}/{paths.PROXY_CA_NAME}"))
    inbound = replace(cfg.inbound, address=inbound_address) if inbound_address else cfg.inbound
    metrics = replace(cfg.metrics, address=inbound_address) if inbound_address and cfg.metrics else cfg.metrics
    return replace(cfg, config_path=f"{root}/envoy.yaml", admin=Admin(f"{root}/admin/admin.sock", cfg.admin.mode),
                   secrets=secrets, inbound=inbound, metrics=metrics)


def mesh_proxy_files(loop: TwoServiceMesh, workload: Workload, folder: Path) -> ProxyFiles:
    """The files mesh renders for `workload`, its proxy folder at `folder`, its inbound listener on its host's
    127.0.0.x."""
    return render_proxy_files(proxy_config_in(compute_proxy_config(loop.mesh, workload), folder,
                                              loop.address(workload)))


def mesh_envoy_config(loop: TwoServiceMesh, workload: Workload, identity: Identity, folder: Path) -> dict[str, Any]:
    """One static config of what mesh renders for `workload` (the static equivalent of its files: every resource
    inline), with its inbound listener on its host's 127.0.0.x and its certificate files under folder."""
    config = static_bootstrap(mesh_proxy_files(loop, workload, folder / "proxy"), dynamic=False)
    by_role = {"certificate_chain": identity.chain, "private_key": identity.key, "trusted_ca": identity.root}
    rewrite_file_paths(config, folder / "files", lambda _path, role: by_role[role])
    return dict(config)


def lay_out_proxy(files: ProxyFiles, identity: Identity, tls_version: str = "1") -> None:
    """A proxy folder as a deploy leaves it: ca.pem, `tls` -> tls.<version>/ (key and chain), admin/ (0700), then
    every file of `files` moved into place."""
    folder = Path(files.proxy_dir)
    (folder / "admin").mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace_file(folder / paths.PROXY_CA_NAME, identity.root)
    swap_tls(folder, identity, tls_version)
    move_into_place(files)


def move_into_place(files: ProxyFiles, previous: ProxyFiles | None = None, validate: bool = True,
                    wait_s: int = INSTALL_WAIT_S) -> list[str]:
    """Move `files` into place as the deploy does on a host (render.host_validation): the steps of
    render.transition (the files that differ from `previous`, every file when None; cds.yaml twice when
    clusters leave) written into the staging folder, checked by this machine's Envoy (its `command`, unless
    validate=False), then its `install` script run by sh: each file renamed into place, waiting for a running
    Envoy to take it; stale xds files removed. The paths moved, in order; RuntimeError when a script fails."""
    on_host = {file.path: file.sha256 for file in previous.files} if previous else {}
    host_cds = next((file.content for file in previous.files if file.path.endswith("/xds/cds.yaml")), None) \
        if previous else None
    steps = transition(files, on_host, host_cds)
    plan = host_validation(files, steps, stale_paths(files, on_host), user=None, envoy=envoy_binary(), wait_s=wait_s)
    for file in plan.staged:
        Path(file.path).parent.mkdir(parents=True, exist_ok=True)
        Path(file.path).write_text(file.content)
    Path(plan.config_path).write_text(plan.config)
    for script in ([plan.command] if validate else []) + [plan.install]:
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{script[:200]}... failed ({done.returncode}): {done.stderr[-2000:]}")
    return [final for _staged, final in plan.moves]


def swap_tls(folder: Path, identity: Identity, version: str) -> None:
    """Write the key and chain into folder/tls.<version>/ and point the `tls` link at it in one rename (the old
    folder is left: the deploy removes it after the swap)."""
    target = folder / f"{paths.TLS_VERSION_PREFIX}{version}"
    target.mkdir(parents=True)
    (target / "key.pem").touch(mode=0o600)
    (target / "key.pem").write_bytes(identity.key)
    (target / "cert.pem").write_bytes(identity.chain)
    temp = folder / ".tls.new"
    temp.unlink(missing_ok=True)
    temp.symlink_to(target.name)
    os.replace(temp, folder / "tls")


def _replace_file(path: Path, data: bytes | str, staging: Path | None = None) -> None:
    """Write data beside (or in staging) and rename it over path: a watcher sees one whole new file arrive."""
    staging = staging or path.parent
    staging.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = staging / f".{path.name}.new"
    temp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(temp, path)


def write_identity(identity: Identity, folder: Path) -> dict[str, Path]:
    """identity as files under folder (the key 0600): {"chain", "key", "root"} -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"chain": folder / "chain.pem", "key": folder / "key.pem", "root": folder / "root.pem"}
    paths["key"].touch(mode=0o600)
    for name, data in (("chain", identity.chain), ("key", identity.key), ("root", identity.root)):
        paths[name].write_bytes(data)
    return paths


# --- Envoys ---

@dataclass(frozen=True)
class RunningEnvoy:
    name: str
    process: subprocess.Popen[bytes]
    admin_socket: Path  # Envoy's admin is a unix socket (mesh renders no admin port)
    base_id: int
    log: Path

    def admin(self, path: str) -> str:
        connection = _UnixHTTPConnection(str(self.admin_socket))
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        finally:
            connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (what `curl --unix-socket` does)."""

    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def shm_files(base_id: int) -> list[Path]:
    """Envoy's shared memory for base_id: /dev/shm/envoy_shared_memory_<base_id * 10 + epoch slot>."""
    return sorted(Path("/dev/shm").glob(f"envoy_shared_memory_{base_id}?"))


def free_base_ids(count: int, first: int | None = None) -> list[int]:
    """count --base-id values no Envoy of this machine seems to use (no shared memory left for them), taken
    from a range derived from this process's PID so concurrent runs rarely meet."""
    candidate = first if first is not None else 700_000 + (os.getpid() % 40_000) * 8
    chosen: list[int] = []
    while len(chosen) < count:
        if not shm_files(candidate):
            chosen.append(candidate)
        candidate += 1
    return chosen


def start_envoy(name: str, config: Mapping[str, Any], folder: Path, base_id: int,
                extra_args: tuple[str, ...] = (), timeout: float = 15.0) -> RunningEnvoy:
    """Write config to folder/envoy.yaml and run Envoy on it (stdout and stderr, access logs included, to
    folder/envoy.log) until its admin /ready says LIVE. The admin socket is moved to folder/admin.sock."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "envoy.yaml"
    admin_socket = folder / "admin.sock"
    config = {**config, "admin": {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}}}
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return _run_envoy(name, config_path, admin_socket, base_id, folder / "envoy.log", extra_args, timeout)


def start_proxy(name: str, files: ProxyFiles, base_id: int, extra_args: tuple[str, ...] = (),
                timeout: float = 15.0, sidecar_mounts: bool = False) -> RunningEnvoy:
    """Run Envoy on the bootstrap of a laid-out proxy folder (lay_out_proxy), as its unit does (refusing resource
    files with unknown fields), until /ready says LIVE; its log is <proxy folder>/envoy.log.

    sidecar_mounts=True (root only) runs it in a mount namespace of its own where the proxy folder is a read-only
    bind mount of itself and its admin/ folder a writable one: what the sidecar's `--volume DIR:DIR:ro` and
    `--volume DIR/admin:DIR/admin:rw` give it."""
    bootstrap = yaml.safe_load(files.bootstrap.content)
    admin_socket = Path(bootstrap["admin"]["address"]["pipe"]["path"])
    wrapper: tuple[str, ...] = ()
    if sidecar_mounts:
        script = ('folder=$1; admin=$2; shift 2; mount --bind "$folder" "$folder" && '
                  'mount -o remount,bind,ro "$folder" && mount --bind "$admin" "$admin" && '
                  'mount -o remount,bind,rw "$admin" && exec "$@"')
        wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", files.proxy_dir,
                   str(admin_socket.parent))
    return _run_envoy(name, Path(files.bootstrap.path), admin_socket, base_id, Path(files.proxy_dir, "envoy.log"),
                      ("--reject-unknown-dynamic-fields", *extra_args), timeout, wrapper)


def _run_envoy(name: str, config_path: Path, admin_socket: Path, base_id: int, log: Path,
               extra_args: tuple[str, ...], timeout: float, wrapper: tuple[str, ...] = ()) -> RunningEnvoy:
    with log.open("wb") as sink:  # the wrapper execs Envoy: the same PID
        process = subprocess.Popen([*wrapper, envoy_binary(), "-c", str(config_path), "--base-id", str(base_id),
                                    "--log-level", "warn", *extra_args],
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    envoy = RunningEnvoy(name, process, admin_socket, base_id, log)
    deadline = time.monotonic() + timeout
    try:
        while not _live(envoy):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}'s Envoy not LIVE within {timeout} s:\n{_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        stop_envoys([envoy])
        raise
    return envoy


def _live(envoy: RunningEnvoy) -> bool:
    if envoy.process.poll() is not None:
        raise RuntimeError(f"{envoy.name}'s Envoy exited with {envoy.process.returncode}:\n{_tail(envoy.log)}")
    try:
        return envoy.admin("/ready").strip() == "LIVE"
    except (OSError, http.client.HTTPException):  # not listening yet
        return False


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def stop_envoys(envoys: list[RunningEnvoy]) -> None:
    """SIGTERM each by PID, SIGKILL after 10 s; then remove only their base ids' shared memory files."""
    for envoy in envoys:
        if envoy.process.poll() is None:
            envoy.process.terminate()
    for envoy in envoys:
        try:
            envoy.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            envoy.process.kill()
            envoy.process.wait()
        for leftover in shm_files(envoy.base_id):
            leftover.unlink(missing_ok=True)


# --- the app: a fixed small answer, HTTP/1.1 keep-alive, as fast as one Python thread goes ---

class _FixedAnswer(asyncio.Protocol):
    """Answers every request (any method and path; bodies by Content-Length skipped) 200 with APP_BODY."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                + str(len(APP_BODY)).encode() + b"\r\n\r\n" + APP_BODY)

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio sets it already; Nagle plus delayed ACK would cost 40 ms a request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17:line_end if line_end >= 0 else None].strip() or 0)
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length:]
            answers += 1
        if answers and self.transport is not None:
            self.transport.write(self.RESPONSE * answers)


async def _serve(host: str, port: int, stop: asyncio.Event) -> None:
    server = await asyncio.get_running_loop().create_server(_FixedAnswer, host, port, backlog=1024,
                                                            reuse_address=True)
    async with server:
        await stop.wait()


def run_app(host: str, port: int) -> None:
    """Serve until stdin closes (so the app never outlives whoever started it with a pipe on stdin)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError):
            while sys.stdin.buffer.read(1):
                pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    loop.run_until_complete(_serve(host, port, stop))


@contextlib.contextmanager
def app_process(port: int, host: str = "127.0.0.1") -> Iterator[subprocess.Popen[bytes]]:
    """The fixed-answer app in its own Python process (not competing for this one's GIL), stopped by PID."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(
        [sys.executable, "-c", f"from mesh.testing.loopback import run_app; run_app({host!r}, {port})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the app did not start (exit code {process.wait()})")
        eventually(lambda: _connects(host, port), 10, f"the app listens on {host}:{port}")
        yield process
    finally:
        if process.stdin:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _connects(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return int(response.status), bytes(response.read())
