"""A fake of the hosts' mesh-ctl for the controller's unit tests: in-memory files, certificates and the four verbs
with the real script's output formats (mesh.controller.protocol parses them), plus a spec of one web proxy whose
EDS file is filled from Consul's `api`. Only fast tests use it; tests/test_controller_consul.py runs the real script.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mesh.controller import protocol
from mesh.controller.spec import ControllerSpec, EndpointSource, HostSpec, IdentitySpec, ProxySpec, SpecFile
from mesh.controller.transport import CtlResult, CtlSession, TransportError
from mesh.render import ProxyFiles
from mesh.testing.loopback import mesh_proxy_files, two_service_mesh

TRUST_DOMAIN = "loop.mesh"
MESH_ID = "loop.mesh"


@dataclass
class FakeCtlHost:
    """One host as mesh-ctl shows it. `refuse` names identities whose apply Envoy refuses (exit 1)."""

    name: str
    identities: dict[str, str] = field(default_factory=dict)  # name -> kind
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {relpath: content}
    certs: dict[str, protocol.CertState | None] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)  # every command, in order
    applied: list[dict[str, list[str]]] = field(default_factory=list)  # per apply: identity -> relpaths moved
    pending: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    hold: threading.Event | None = None  # when set up, each apply waits for it (a slow host)

    def add_proxy(self, files: ProxyFiles, cert: protocol.CertState | None = None) -> None:
        """A proxy as a deploy left it: every file of `files` (bootstrap too) in place."""
        self.identities[files.proxy] = "vm"
        self.files[files.proxy] = {protocol.relpath_in(files.proxy_dir, file.path): file.content
                                   for file in files.files}
        self.certs[files.proxy] = cert

    def run(self, request: str, stdin: bytes = b"") -> CtlResult:
        self.calls.append(request)
        verb, *args = request.split(" ")
        if verb == "apply" and self.hold is not None:
            self.hold.wait(timeout=30)
        handlers: dict[str, Callable[..., CtlResult]] = {"state": self._state, "apply": self._apply,
                                                         "csr": self._csr, "install": self._install}
        handler = handlers[verb]
        return handler(stdin, *args)

    def _state(self, _stdin: bytes) -> CtlResult:
        lines = []
        for name, kind in self.identities.items():
            lines.append(f"identity {name} {kind}")
            for relpath, content in sorted(self.files.get(name, {}).items()):
                lines.append(f"file {name} {relpath} {hashlib.sha256(content.encode()).hexdigest()}")
            cert = self.certs.get(name)
            lines.append(f"cert {name} none" if cert is None else
                         f"cert {name} {cert.serial} {int(cert.not_before.timestamp())} "
                         f"{int(cert.not_after.timestamp())}")
        return CtlResult(0, "".join(line + "\n" for line in [*lines, "end"]))

    def _apply(self, stdin: bytes) -> CtlResult:
        members: dict[str, list[tuple[str, str]]] = {}
        with tarfile.open(fileobj=io.BytesIO(stdin), mode="r:") as archive:
            for member in archive.getmembers():
                name, _slash, relpath = member.name.partition("/")
                handle = archive.extractfile(member)
                assert handle is not None
                members.setdefault(name, []).append((relpath, handle.read().decode()))
        out: list[str] = []
        moved: dict[str, list[str]] = {}
        for name, items in members.items():
            if name in self.refuse:
                self.applied.append(moved)
                return CtlResult(1, "".join(out), f"[critical] envoy refused {name}\nmesh-ctl: {name}: refused\n")
            files = self.files.setdefault(name, {})
            for relpath, content in items:
                if relpath.startswith("xds/"):
                    files[relpath] = content
                elif relpath == "remove":
                    for gone in content.split():
                        files.pop(gone, None)
            moved[name] = [relpath for relpath, _content in items if relpath.startswith("xds/")]
            out.append(f"applied {name}\n")
        self.applied.append(moved)
        return CtlResult(0, "".join(out))

    def _csr(self, _stdin: bytes, name: str) -> CtlResult:
        key = ec.generate_private_key(ec.SECP256R1())
        version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S-") + secrets.token_hex(3)
        self.pending[version] = key
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .sign(key, hashes.SHA256()))
        return CtlResult(0, f"pending {version}\n" + csr.public_bytes(Encoding.PEM).decode())

    def _install(self, stdin: bytes, name: str, version: str) -> CtlResult:
        key = self.pending.pop(version, None)
        leaf = x509.load_pem_x509_certificates(stdin)[0]
        if key is None or leaf.public_key() != key.public_key():
            return CtlResult(1, "", "mesh-ctl: the certificate is not for the pending key\n")
        serial = protocol.serial_hex(leaf.serial_number)
        self.certs[name] = protocol.CertState(serial, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        return CtlResult(0, f"installed {name} {serial}\n")


class FakeCtlTransport:
    """Opens sessions to FakeCtlHosts; a host named in `down` cannot be reached (nor used while connected)."""

    def __init__(self, hosts: dict[str, FakeCtlHost]) -> None:
        self.hosts = hosts
        self.down: set[str] = set()
        self.opened: list[str] = []

    def open(self, host: HostSpec) -> CtlSession:
        if host.name in self.down:
            raise TransportError(f"{host.name}: connection refused")
        self.opened.append(host.name)
        return _FakeSession(self, self.hosts[host.name])


@dataclass
class _FakeSession:
    transport: FakeCtlTransport
    host: FakeCtlHost

    def run(self, command: str, stdin: bytes = b"", timeout: float = 0) -> CtlResult:
        if self.host.name in self.transport.down:
            raise TransportError(f"{self.host.name}: connection reset")
        return self.host.run(command, stdin)

    def close(self) -> None:
        pass


# --- a spec: one web proxy per host, its api endpoints filled from Consul ---

def web_files(folder: Path) -> ProxyFiles:
    """web's files (its proxy folder at `folder`), with an upstream cluster `upstream-api`."""
    loop = two_service_mesh(9999, TRUST_DOMAIN)
    return mesh_proxy_files(loop, loop.web, folder)


def proxy_spec(files: ProxyFiles, service: str = "api") -> ProxySpec:
    eds = next(file.path for file in files.files if file.path.endswith("/eds.upstream-api.yaml"))
    return ProxySpec(name=files.proxy, service="web", proxy_dir=files.proxy_dir,
                     bootstrap_sha256=files.bootstrap_sha256,
                     files=tuple(SpecFile(file.path, file.kind, file.content)  # type: ignore[arg-type]
                                 for file in files.files),
                     endpoints={eds: EndpointSource(service)})


def host_spec(name: str, proxies: tuple[ProxySpec, ...], address: str = "127.0.0.1", port: int = 22,
              known_hosts: tuple[str, ...] = ()) -> HostSpec:
    identities = tuple(IdentitySpec(proxy.name, "vm", f"spiffe://{TRUST_DOMAIN}/svc/{proxy.service}")
                       for proxy in proxies)
    return HostSpec(name=name, address=address, port=port, known_hosts=known_hosts, identities=identities,
                    proxies=proxies)


def controller_spec(hosts: tuple[HostSpec, ...], cert_ttl_s: int = 3600, debounce_ms: int = 50,
                    plan_digest: str = "d" * 64, consul_url: str = "http://127.0.0.1:8500") -> ControllerSpec:
    return ControllerSpec(mesh_id=MESH_ID, trust_domain=TRUST_DOMAIN, plan_digest=plan_digest,
                          consul_url=consul_url, consul_token_file=None, consul_ca_file=None, cert_ttl_s=cert_ttl_s,
                          hosts=hosts, metrics_port=0, debounce_ms=debounce_ms)
