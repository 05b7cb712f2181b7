"""Authorization with real Envoys on loopback (no lab): `api` (HTTP, 127.0.0.3) and `db` (TCP, 127.0.0.4) run
mesh's rendered proxies; requests go straight to their inbound ports over mTLS with real certificates from mesh's
CA for several identities (web, which declares both; api; db; other, which declares nothing; mesh's checker) and
in plaintext.

For a table of HTTP requests (methods, paths, query strings, headers) and TCP connections the outcome and the rule
Envoy names (response_code_details / connection_termination_details) equal mesh.config.authz.decide, and each
access line's `authz_shadow` names what the shadow rules would deny while they deny nothing. A rule change (and a
run-time deny) is applied as a deploy applies it: only the inbound route (HTTP) or the ECDS files (TCP) move, the
same Envoys take them and new requests follow the new rules. Strict refuses plaintext; permissive accepts it as
`unauthenticated`, strips a forged x-forwarded-client-cert and marks its line `mtls: false`. The checker gets 403
on the app chain and 200 on the health chain.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import json
import socket
import socketserver
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import compute_proxy_config, health_server_name
from mesh.config.authz import AuthzConfig, AuthzDecision, AuthzRequest, decide, source_id
from mesh.config.compute import HEALTH_PATH
from mesh.inventory.model import (
    Connection,
    Health,
    ManagedHost,
    Mesh,
    MeshSettings,
    Protocol,
    Upstream,
    Workload,
    health_checker_spiffe_id,
)
from mesh.inventory.policy import AuthzOverride, AuthzRule, AuthzRules, PathMatch, ServicePolicy
from mesh.pki import CertificateAuthority
from mesh.render import ProxyFiles, render_proxy_files
from mesh.testing.loopback import (
    Identity,
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    move_into_place,
    proxy_config_in,
    start_proxy,
    stop_envoys,
    write_identity,
)

TRUST_DOMAIN = "loop.mesh"
ADDRESSES = {"web": "127.0.0.2", "api": "127.0.0.3", "db": "127.0.0.4", "other": "127.0.0.5"}
CHECKER = "checker"
WAIT_S = 20.0
DENIED_BODY = b"RBAC: access denied"

# api: web may GET and POST /orders and below; `other` with x-tenant: blue; nobody under /admin/; shadow: web's
# DELETE would be denied, db would be allowed
API_RULES = ServicePolicy(authz=AuthzRules(
    allow=(AuthzRule(sources=("web",), methods=("GET", "POST"), paths=(PathMatch("prefix", "/orders/"),
                                                                         PathMatch("exact", "/orders"))),
           AuthzRule(sources=("spiffe://loop.mesh/svc/other",), headers=(("x-tenant", "blue"),)),
           AuthzRule(sources=("db",), mode="shadow")),
    deny=(AuthzRule(paths=(PathMatch("prefix", "/admin/"),)),
          AuthzRule(sources=("web",), methods=("DELETE",), mode="shadow"))))
# after the change: web's default is back (no allow rule names it), other is denied at run time, PUT never
API_CHANGED = ServicePolicy(authz=AuthzRules(deny=(AuthzRule(methods=("PUT",)),)))
API_DENY = AuthzOverride(("other",), "r1")
DB_RULES = ServicePolicy(authz=AuthzRules(deny=(AuthzRule(sources=("other",)),
                                                AuthzRule(sources=("web",), mode="shadow"))))
DB_CHANGED = ServicePolicy(authz=AuthzRules(deny=(AuthzRule(sources=("api",)),)))

HTTP_TABLE: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("web", "GET", "/orders", ()),
    ("web", "POST", "/orders/42", ()),
    ("web", "GET", "/orders/7?page=2", ()),
    ("web", "PUT", "/orders/7", ()),
    ("web", "DELETE", "/orders/7", ()),
    ("web", "GET", "/admin/users", ()),
    ("web", "GET", "/", ()),
    ("web", "GET", "/orders/../admin/users", ()),  # normalized as the app reads it: deny[0]
    ("web", "GET", "/orders/%2e%2e/admin/users", ()),
    ("web", "GET", "//admin//users", ()),
    ("web", "POST", "/orders/./42", ()),
    ("other", "GET", "/orders", (("x-tenant", "blue"),)),
    ("other", "GET", "/orders", (("x-tenant", "red"),)),
    ("other", "GET", "/admin/x", (("x-tenant", "blue"),)),
    ("db", "GET", "/orders", ()),
    ("api", "GET", "/", ()),
    (CHECKER, "GET", "/", ()),
)
TCP_TABLE = ("web", "api", "other", "db", CHECKER)


# --- the apps: HTTP answers what it received; TCP answers each line ---

@dataclass
class Seen:
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # x-request-id -> what the app received


def http_app(seen: Seen) -> http.server.ThreadingHTTPServer:
    class Answer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            received = {"method": self.command, "path": self.path,
                        "client_cert": self.headers.get("x-forwarded-client-cert")}
            seen.requests[self.headers.get("x-request-id") or ""] = received
            body = json.dumps(received).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    return server


class LineApp(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Echo(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    self.wfile.write(b"echo:" + line)

        super().__init__(("127.0.0.1", 0), Echo)


# --- the mesh, its files, the Envoys ---

@dataclass
class AuthzLoop:
    folder: Path
    workloads: dict[str, Workload]
    certs: dict[str, dict[str, Path]]  # identity -> chain, key, root
    seen: Seen
    policies: dict[str, ServicePolicy] = field(default_factory=dict)
    denies: dict[str, AuthzOverride] = field(default_factory=dict)
    files: dict[str, ProxyFiles] = field(default_factory=dict)
    envoys: dict[str, RunningEnvoy] = field(default_factory=dict)

    def mesh(self) -> Mesh:
        hosts = tuple(ManagedHost(w.host, "vm", Connection(ADDRESSES[name]), (w,)) for name, w in self.workloads.items())
        services = MappingProxyType({w.service: (w,) for w in self.workloads.values()})
        return Mesh(MeshSettings(trust_domain=TRUST_DOMAIN), hosts, (), services,
                    policies=MappingProxyType(dict(self.policies)))

    def render(self) -> dict[str, ProxyFiles]:
        mesh = self.mesh()
        return {name: render_proxy_files(proxy_config_in(
            compute_proxy_config(mesh, self.workloads[name], authz_overrides=MappingProxyType(dict(self.denies))),
            self.folder / name, ADDRESSES[name])) for name in ("api", "db")}

    def apply(self) -> dict[str, list[str]]:
        """Render again and move what changed into place as a deploy does (checked by Envoy, each file waited for
        until the running Envoy took it); the names moved, per proxy."""
        moved = {}
        for name, files in self.render().items():
            moved[name] = [Path(path).name for path in move_into_place(files, self.files[name])] \
                if files != self.files[name] else []
            self.files[name] = files
        return moved

    def authz(self, service: str) -> AuthzConfig:
        mesh = self.mesh()
        cfg = compute_proxy_config(mesh, self.workloads[service], authz_overrides=MappingProxyType(dict(self.denies)))
        return cfg.inbound.authz

    def port(self, service: str) -> int:
        return self.workloads[service].proxy_port


def checker_identity(state: Path) -> Identity:
    """mesh's checker: a leaf for spiffe://<td>/mesh/health from the same CA."""
    authority, _ = CertificateAuthority.ensure(str(state), TRUST_DOMAIN)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "checker")])).sign(key, hashes.SHA256()))
    issued = authority.sign(csr.public_bytes(serialization.Encoding.PEM), health_checker_spiffe_id(TRUST_DOMAIN),
                            datetime.timedelta(hours=1), "h-ctl", "checker")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity(issued.chain_pem, key_pem, authority.root_pem)


def workloads(api_port: int, db_port: int) -> dict[str, Workload]:
    second = datetime.timedelta(seconds=1)

    def workload(name: str, port: int, protocol: Protocol = "http", upstreams: tuple[str, ...] = (),
                 health: Health | None = None) -> Workload:
        extra = {"health": health} if health else {}
        return Workload(f"h-{name}", 0, name, port, TRUST_DOMAIN, protocol=protocol,
                        proxy_port=free_port(ADDRESSES[name]), admin_port=free_port(),
                        metrics_port=free_port(ADDRESSES[name]),
                        upstreams=tuple(Upstream(up, free_port()) for up in upstreams), **extra)  # type: ignore[arg-type]

    return {"web": workload("web", free_port(), upstreams=("api", "db")),
            "api": workload("api", api_port, upstreams=("db",), health=Health("http", "/healthz", second, second)),
            "db": workload("db", db_port, protocol="tcp", health=Health("tcp", None, second, second)),
            "other": workload("other", free_port())}


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzLoop]:
    folder = tmp_path_factory.mktemp("authz")
    seen = Seen()
    web_app, line_app = http_app(seen), LineApp()
    with contextlib.ExitStack() as stack:
        for app in (web_app, line_app):
            threading.Thread(target=app.serve_forever, daemon=True).start()
            stack.callback(app.server_close)
            stack.callback(app.shutdown)
        found = workloads(web_app.server_address[1], line_app.server_address[1])
        identities = issue_identities(folder / "state", TRUST_DOMAIN, tuple(found.values()))
        identities[CHECKER] = checker_identity(folder / "state")
        certs = {name: write_identity(identity, folder / "certs" / name) for name, identity in identities.items()}
        state = AuthzLoop(folder, found, certs, seen, {"api": API_RULES, "db": DB_RULES})
        state.files = state.render()
        for name, files in state.files.items():
            lay_out_proxy(files, identities[name])
        try:
            for (name, files), base_id in zip(state.files.items(), free_base_ids(2), strict=True):
                state.envoys[name] = start_proxy(name, files, base_id, ("--file-flush-interval-msec", "100"))
            eventually(lambda: health_status(state, "api") == 200 or None, WAIT_S, "api's health chain answers 200",
                       state.envoys["api"].log)
            yield state
        finally:
            stop_envoys(list(state.envoys.values()))


# --- clients ---

def tls_context(loop: AuthzLoop, who: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # mesh certificates carry a SPIFFE URI, no DNS name
    context.load_verify_locations(cafile=str(loop.certs[who]["root"]))
    context.load_cert_chain(str(loop.certs[who]["chain"]), str(loop.certs[who]["key"]))
    return context


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    request_id: str


def http_request(loop: AuthzLoop, who: str | None, method: str, path: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    """One request straight to api's inbound port: over mTLS as `who` (no SNI: the app chain), in plaintext when
    None."""
    request_id = str(uuid.uuid4())
    connection: http.client.HTTPConnection
    if who is None:
        connection = http.client.HTTPConnection(ADDRESSES["api"], loop.port("api"), timeout=10)
    else:
        connection = http.client.HTTPSConnection(ADDRESSES["api"], loop.port("api"), timeout=10,
                                                 context=tls_context(loop, who))
    try:
        connection.request(method, path, headers={"x-request-id": request_id, **dict(headers)})
        response = connection.getresponse()
        return Answer(response.status, response.read(), request_id)
    finally:
        connection.close()


def health_status(loop: AuthzLoop, who: str) -> int:
    """GET the health path on api's health chain (SNI health.<td>) as `who`."""
    context = tls_context(loop, who)
    with socket.create_connection((ADDRESSES["api"], loop.port("api")), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=health_server_name(TRUST_DOMAIN)) as tls:
        tls.sendall(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = tls.recv(4096).decode(errors="replace")
    return int(head.split(" ", 2)[1])


def tcp_exchange(loop: AuthzLoop, who: str | None, line: bytes = b"hello db\n") -> tuple[bytes, str]:
    """One connection to db's inbound port: send a line, read until closed or answered; (what came back, our
    source address as Envoy logs it)."""
    raw = socket.create_connection((ADDRESSES["db"], loop.port("db")), timeout=5)
    sock: socket.socket = raw if who is None else tls_context(loop, who).wrap_socket(raw, server_hostname="db")
    source = "{}:{}".format(*sock.getsockname()[:2])
    received = b""
    try:
        sock.sendall(line)
        while not received.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return received, source


def access_lines(envoy: RunningEnvoy) -> list[dict[str, Any]]:
    found = []
    for line in envoy.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and item.get("mesh") == "access":
                found.append(item)
    return found


def line_of(envoy: RunningEnvoy, key: str, value: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        return next((line for line in access_lines(envoy) if line.get(key) == value), None)

    return eventually(probe, WAIT_S, f"{envoy.name}'s access line with {key} {value}", envoy.log)


def source_of(who: str | None) -> str | None:
    if who is None:
        return None
    if who == CHECKER:
        return health_checker_spiffe_id(TRUST_DOMAIN)
    return source_id(TRUST_DOMAIN, who)


def expected_shadow(config: AuthzConfig, decision: AuthzDecision) -> dict[str, str | None]:
    """What `authz_shadow` should say: the DENY filter's shadow entry (Envoy names the smallest matching name), and
    the ALLOW filter's shadow result when it ran (no DENY entry denied) and has shadow rules."""
    denies = sorted(name for name in decision.would_deny if name != "none")
    allow_ran = decision.allowed or decision.rule not in {entry.name for entry in config.deny}
    allow = None
    if config.allow_shadow is not None and allow_ran:
        allow = "denied" if "none" in decision.would_deny else "allowed"
    return {"deny": denies[0] if denies else None, "allow": allow}


def check_http_table(loop: AuthzLoop, table: tuple[tuple[str | None, str, str, tuple[tuple[str, str], ...]], ...]
                     = HTTP_TABLE) -> list[str]:
    """Every request of `table` against api: Envoy's outcome, rule and shadow verdict vs decide's; the
    disagreements (none expected)."""
    config = loop.authz("api")
    wrong = []
    answers = []
    for who, method, path, headers in table:
        decision = decide(config, AuthzRequest(source_of(who), method, path, headers))
        answers.append((who, method, path, decision, http_request(loop, who, method, path, headers)))
    for who, method, path, decision, answer in answers:
        line = line_of(loop.envoys["api"], "request_id", answer.request_id)
        seen: dict[str, Any] = {"allowed": answer.status == 200, "rule": None, "shadow": line["authz_shadow"]}
        want: dict[str, Any] = {"allowed": decision.allowed, "rule": None, "shadow": expected_shadow(config, decision)}
        if not decision.allowed:
            want["rule"] = f"rbac_access_denied_matched_policy[{decision.rule}]"
            seen["rule"] = line["response_code_details"]
            if answer.status != 403 or answer.body != DENIED_BODY:  # Envoy's generic 403: it names no rule
                wrong.append(f"{who} {method} {path}: {answer.status} {answer.body!r}")
        if seen != want:
            wrong.append(f"{who} {method} {path}: Envoy {seen}, decide {want}")
    return wrong


def check_tcp_table(loop: AuthzLoop) -> list[str]:
    config = loop.authz("db")
    wrong = []
    for who in TCP_TABLE:
        decision = decide(config, AuthzRequest(source_of(who)))
        received, source = tcp_exchange(loop, who)
        line = line_of(loop.envoys["db"], "source_address", source)
        seen = {"allowed": received == b"echo:hello db\n", "shadow": line["authz_shadow"],
                "rule": line["connection_termination_details"]}
        want = {"allowed": decision.allowed, "shadow": expected_shadow(config, decision),
                "rule": None if decision.allowed else f"rbac_access_denied_matched_policy[{decision.rule}]"}
        if seen != want:
            wrong.append(f"{who}: Envoy {seen} ({received!r}), decide {want}")
    return wrong


# --- the tests (in order: each leaves the loop as the next expects) ---

def test_http_requests_get_what_decide_says(loop: AuthzLoop) -> None:
    config = loop.authz("api")
    decisions = [decide(config, AuthzRequest(source_of(who), method, path, headers))
                 for who, method, path, headers in HTTP_TABLE]
    # the table reaches every kind of answer: each allow rule, a deny, no match, both kinds of shadow verdict
    assert {d.rule for d in decisions} == {"allow[0]", "allow[1]", "deny[0]", "none"}
    assert {name for d in decisions for name in d.would_deny} == {"deny[1]", "none"}
    assert any(d.allowed for d in decisions) and not all(d.allowed for d in decisions)
    assert check_http_table(loop) == []
    # the shadow rules denied nothing: web's DELETE and db's request reached the app only when enforced rules let
    # them; web's DELETE is denied by `none` (not in allow[0]) and its line names the shadow deny
    delete = http_request(loop, "web", "DELETE", "/orders/1")
    assert line_of(loop.envoys["api"], "request_id", delete.request_id)["authz_shadow"]["deny"] == "deny[1]"
    # the app reads the path the rules met
    dotted = http_request(loop, "web", "POST", "/orders/./42//x")
    assert loop.seen.requests[dotted.request_id]["path"] == "/orders/42/x"


def test_tcp_connections_get_what_decide_says(loop: AuthzLoop) -> None:
    assert check_tcp_table(loop) == []
    received, _ = tcp_exchange(loop, "web")
    assert received == b"echo:hello db\n"  # web's shadow deny[1] denies nothing


def test_the_checker_reaches_the_health_chain_only(loop: AuthzLoop) -> None:
    assert health_status(loop, CHECKER) == 200
    answer = http_request(loop, CHECKER, "GET", "/orders")
    assert answer.status == 403
    assert line_of(loop.envoys["api"], "request_id", answer.request_id)["response_code_details"] == \
        "rbac_access_denied_matched_policy[none]"


def test_strict_refuses_plaintext(loop: AuthzLoop) -> None:
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        http_request(loop, None, "GET", "/orders")
    received, _ = tcp_exchange(loop, None)
    assert received.startswith(b"\x15\x03")  # the app chain expects TLS: Envoy answers a TLS alert and closes


def test_a_rule_change_moves_only_the_inbound_files_and_applies_live(loop: AuthzLoop) -> None:
    pids = {name: envoy.process.pid for name, envoy in loop.envoys.items()}
    loop.policies.update(api=API_CHANGED, db=DB_CHANGED)
    loop.denies["api"] = API_DENY
    assert loop.apply() == {"api": ["rds.inbound.yaml"], "db": ["ecds.mesh.authz.deny.yaml"]}
    assert {name: envoy.process.pid for name, envoy in loop.envoys.items()} == pids
    assert all(envoy.process.poll() is None for envoy in loop.envoys.values())  # no restart
    assert check_http_table(loop) == []
    assert check_tcp_table(loop) == []
    other = http_request(loop, "other", "GET", "/orders", (("x-tenant", "blue"),))
    assert line_of(loop.envoys["api"], "request_id", other.request_id)["response_code_details"] == \
        "rbac_access_denied_matched_policy[runtime-deny]"
    # the run-time deny removed: only the route again
    del loop.denies["api"]
    assert loop.apply() == {"api": ["rds.inbound.yaml"], "db": []}
    assert check_http_table(loop) == []


def test_permissive_takes_plaintext_as_unauthenticated_and_strips_a_forged_client_cert(loop: AuthzLoop) -> None:
    loop.policies.update(api=ServicePolicy(authz=API_CHANGED.authz, mtls="permissive"),
                         db=ServicePolicy(authz=DB_CHANGED.authz, mtls="permissive"))
    moved = loop.apply()
    assert "lds.yaml" in moved["api"] and "lds.yaml" in moved["db"]  # mtls changes the listener
    forged = (("x-forwarded-client-cert", f"By=x;URI={source_id(TRUST_DOMAIN, 'web')}"),)
    answer = eventually(lambda: _plain_ok(loop, forged), WAIT_S, "api answers a plaintext request",
                        loop.envoys["api"].log)
    assert loop.seen.requests[answer.request_id]["client_cert"] is None  # removed, none set
    line = line_of(loop.envoys["api"], "request_id", answer.request_id)
    assert line["mtls"] is False and line["source_identity"] is None
    # mTLS still works beside it, and the table still agrees (plaintext included)
    assert http_request(loop, "web", "GET", "/orders").status == 200
    plaintext = ((None, "GET", "/orders", ()), (None, "PUT", "/orders/1", ()), (None, "GET", "/admin/x", ()))
    assert decide(loop.authz("api"), AuthzRequest(None, "GET", "/orders")).rule == "default"  # the control
    assert check_http_table(loop, HTTP_TABLE + plaintext) == []
    # TCP: a plaintext client is answered (even one whose first write is shorter than TLS's 5-byte record header)
    assert tcp_exchange(loop, None, b"hi\n")[0] == b"echo:hi\n"
    received, source = tcp_exchange(loop, None)
    assert received == b"echo:hello db\n"
    assert line_of(loop.envoys["db"], "source_address", source)["mtls"] is False


def _plain_ok(loop: AuthzLoop, headers: tuple[tuple[str, str], ...]) -> Answer | None:
    with contextlib.suppress(ConnectionError, http.client.HTTPException, OSError):
        answer = http_request(loop, None, "GET", "/orders", headers)
        return answer if answer.status == 200 else None
    return None

