"""Helpers of the authorization end-to-end tests (test_authz_lab.py): requests sent straight to a proxy's inbound
port with the real certificate of a mesh identity (a workload's, from its proxy folder on its host, or the
checker's, on a controller) or in plaintext, many per SSH session; `mesh authz check` run for every pair; the
inbound access lines of a request; the demo app refreshed on a running lab. Every probe returns what it saw;
the tests decide.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy_helpers import Run, out, run_mesh, sh
from lab_helpers import LabUp

from mesh.config import paths
from mesh.config.compute import HEALTH_PATH, health_server_name
from mesh.healthcheck import config as checker_config
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.lab import demo_units, images
from mesh.lab.topology import TRUST_DOMAIN

CLI_TIMEOUT = 180.0
UNAUTHENTICATED = "unauthenticated"
CHECKER = "checker"
CHECKER_ID = f"spiffe://{TRUST_DOMAIN}/mesh/health"
TLS_ALERT = "\x15\x03"  # a TLS alert record's first bytes (what a TLS server answers to plaintext)
PLAINTEXT_HOST = "consul1"  # a lab node with no proxy and no mesh certificate: a plaintext client


def spiffe(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/svc/{service}"


# ---- the lab's proxies and identities ----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One proxy's inbound port, as the inventory places it."""

    service: str
    host: str
    address: str
    port: int
    protocol: str  # "http" or "tcp"
    instance: str  # the container on a container host, else the host

    @property
    def name(self) -> str:
        return f"{self.service}@{self.instance}"


def targets(inventory: Path) -> list[Target]:
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    return [Target(w.service, host.name, host.connection.address, w.proxy_port, w.protocol, w.container or host.name)
            for host in mesh.hosts for w in host.workloads]


def target(found: list[Target], service: str, instance: str) -> Target:
    for item in found:
        if item.service == service and item.instance == instance:
            return item
    raise AssertionError(f"no {service} proxy for {instance}: {found}")


@dataclass(frozen=True)
class Identity:
    """Where a client's certificate lives: the host a probe runs on and its files there (none: plaintext)."""

    name: str  # a service, CHECKER or UNAUTHENTICATED
    host: str
    cert: str | None
    key: str | None
    ca: str | None  # verifies the server's certificate

    @property
    def cli_source(self) -> str:
        """SRC as `mesh authz check` takes it."""
        return CHECKER_ID if self.name == CHECKER else self.name


def workload_identity(inventory: Path, service: str, host: str) -> Identity:
    """The service's certificate on host: its proxy's key and leaf (root reads them, as an intruder would)."""
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    for managed in mesh.hosts:
        for workload in managed.workloads:
            if managed.name == host and workload.service == service:
                proxy = paths.proxy_name(workload)
                return Identity(service, host, paths.cert_path(proxy), paths.key_path(proxy),
                                paths.proxy_ca_path(proxy))
    raise AssertionError(f"no {service} on {host} in {inventory}")


def checker_identity(host: str = "ctl1") -> Identity:
    return Identity(CHECKER, host, checker_config.CERT_FILE, checker_config.KEY_FILE, checker_config.CA_FILE)


def plaintext_client(host: str = PLAINTEXT_HOST) -> Identity:
    return Identity(UNAUTHENTICATED, host, None, None, None)


# ---- requests ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ask:
    """One request (HTTP) or one line (TCP) on a new connection to a target's inbound port."""

    target: Target
    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    health: bool = False  # the health chain: SNI health.<trust domain>, GET /mesh/health

    def describe(self, identity: Identity) -> str:
        what = "health" if self.health else (
            "line" if self.target.protocol == "tcp" else f"{self.method} {self.path}")
        extra = "".join(f" {k}: {v}" for k, v in self.headers)
        return f"{identity.name} -> {self.target.name} {what}{extra}"


_PY_ASK = r"""
import json, socket, ssl, sys
asks = json.loads(sys.argv[1])
seen = []
for a in asks:
    result = {"handshake": False, "status": None, "answer": "", "error": ""}
    data = b""
    try:
        raw = socket.create_connection((a["address"], a["port"]), timeout=5)
        raw.settimeout(5)
        conn = raw
        if a["cert"] is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False          # mesh identities are SPIFFE URIs, not DNS names
            ctx.load_verify_locations(a["ca"])  # the server must still prove a mesh certificate
            ctx.load_cert_chain(a["cert"], a["key"])
            conn = ctx.wrap_socket(raw, server_hostname=a["sni"])
            result["handshake"] = True
        with conn:
            if a["mode"] == "http":
                head = f"{a['method']} {a['path']} HTTP/1.1\r\nHost: {a['host']}\r\nConnection: close\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in a["headers"])
                if a["method"] not in ("GET", "HEAD"):
                    head += "Content-Length: 0\r\n"
                conn.sendall((head + "\r\n").encode())
            else:  # over 5 bytes: a plaintext one is told from TLS at once (Envoy's tls_inspector waits for 5)
                conn.sendall(b"hop-hop-hop\n")
            while not (a["mode"] == "line" and data.endswith(b"\n")):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        if not data:
            result["error"] = "closed without an answer"
    except (OSError, ssl.SSLError) as e:
        result["error"] = type(e).__name__ + ": " + str(e)
    text = data.decode(errors="replace")
    first = text.split("\r\n", 1)[0].split()
    if a["mode"] == "http" and len(first) > 1 and first[0].startswith("HTTP/") and first[1].isdigit():
        result["status"] = int(first[1])
    result["answer"] = text[:3000]
    seen.append(result)
print(json.dumps(seen))
"""


@dataclass(frozen=True)
class Seen:
    """What one request got: an HTTP status (None when no HTTP answer came), or a TCP line, or nothing."""

    handshake: bool
    status: int | None
    answer: str
    error: str

    def body(self) -> Any:
        try:
            return json.loads(self.answer.split("\r\n\r\n", 1)[-1])
        except ValueError:
            return None

    def hops(self) -> list[dict[str, Any]]:
        body = self.body()
        hops = body.get("hops") if isinstance(body, dict) else None
        return list(hops) if isinstance(hops, list) else []

    def line(self) -> Any:
        try:
            return json.loads(self.answer.strip().splitlines()[0]) if self.answer.strip() else None
        except ValueError:
            return None

    def brief(self) -> str:
        return (f"handshake={self.handshake} status={self.status} error={self.error!r} "
                f"answer={self.answer[-300:]!r}")


def outcome(ask: Ask, seen: Seen) -> str:
    """What a user sees, in one word: `allowed` (the destination's app answered), `denied` (Envoy's 403, or
    a TCP connection closed after the handshake), `refused` (no answer at all: no handshake, or a plaintext
    connection closed), or `other: ...`."""
    if ask.target.protocol == "http" or ask.health:
        if seen.status == 200:
            hops = seen.hops()
            if ask.health or (hops and hops[0].get("service") == ask.target.service):
                return "allowed"
            return f"other: 200 without {ask.target.service}'s hop: {seen.answer[-200:]!r}"
        if seen.status == 403:
            return "denied"
        if seen.status is None:
            return "refused" if not seen.handshake or seen.error else f"other: {seen.brief()}"
        return f"other: {seen.status} {seen.answer[-200:]!r}"
    line = seen.line() if seen.answer.startswith("{") else None
    if isinstance(line, dict) and line.get("service") == ask.target.service:
        return "allowed"
    if not seen.handshake and (not seen.answer or seen.answer.startswith(TLS_ALERT)):
        return "refused"  # plaintext to a TLS-only port: nothing, or a TLS alert record
    if seen.handshake and not seen.answer:
        return "denied"
    return f"other: {seen.brief()}"


def ask_all(lab: LabUp, identity: Identity, asks: Iterable[Ask]) -> list[Seen]:
    """Each request on its own new connection from identity's host, with its certificate (or in plaintext)."""
    listed = list(asks)
    payload = []
    for ask in listed:
        mode = "http" if ask.target.protocol == "http" or ask.health else "line"
        payload.append({
            "address": ask.target.address, "port": ask.target.port, "cert": identity.cert, "key": identity.key,
            "ca": identity.ca, "sni": health_server_name(TRUST_DOMAIN) if ask.health else None, "mode": mode,
            "method": "GET" if ask.health else ask.method, "path": HEALTH_PATH if ask.health else ask.path,
            "host": health_server_name(TRUST_DOMAIN) if ask.health else ask.target.service,
            "headers": list(ask.headers),
        })
    if not payload:
        return []
    text = out(lab, identity.host, f"python3 - {shlex.quote(json.dumps(payload))}", input=_PY_ASK,
               timeout=30 + 12 * len(payload))
    return [Seen(s["handshake"], s["status"], s["answer"], s["error"]) for s in json.loads(text)]


# ---- the matrix: Envoy against `mesh authz check` -----------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One pair of the matrix: who asks what, and what a user must see (`allowed`, `denied`, `refused`) with
    the rule `mesh authz check` must name (None: not judged, e.g. a connection refused before any rule)."""

    identity: Identity
    ask: Ask
    expect: str
    rule: str | None = None

    def describe(self) -> str:
        return self.ask.describe(self.identity)


@dataclass
class Matrix:
    """What every case got through the real Envoys."""

    seen: dict[Case, Seen] = field(default_factory=dict)

    def outcomes(self) -> dict[str, str]:
        return {case.describe(): outcome(case.ask, seen) for case, seen in self.seen.items()}

    def wrong(self) -> dict[str, str]:
        """The cases whose outcome differs from the expected one: `expected X, saw Y (details)`."""
        found = {}
        for case, seen in self.seen.items():
            got = outcome(case.ask, seen)
            if got != case.expect:
                found[case.describe()] = f"expected {case.expect}, saw {got} ({seen.brief()})"
        return found


def run_matrix(lab: LabUp, cases: Iterable[Case]) -> Matrix:
    """Every case sent from its identity's host, one SSH session per identity, the identities in parallel."""
    by_identity: dict[Identity, list[Case]] = {}
    for case in cases:
        by_identity.setdefault(case.identity, []).append(case)
    matrix = Matrix()
    with ThreadPoolExecutor(max_workers=max(1, len(by_identity))) as pool:
        answers = pool.map(lambda item: (item[1], ask_all(lab, item[0], [c.ask for c in item[1]])),
                           by_identity.items())
        for listed, seen in answers:
            matrix.seen.update(zip(listed, seen, strict=True))
    return matrix


def mesh_cli(inventory: Path, *args: str, timeout: float = CLI_TIMEOUT) -> Run:
    """`mesh ARGS -i inventory`."""
    return run_mesh(*args, "-i", str(inventory), timeout=timeout)


@dataclass(frozen=True)
class Checked:
    """What `mesh authz check --json` answered for one case."""

    run: Run
    document: dict[str, Any] | None

    @property
    def allowed(self) -> bool | None:
        if self.document is None:
            return None
        if isinstance(self.document.get("allowed"), bool):
            return bool(self.document["allowed"])
        decision = self.document.get("decision")
        return {"allowed": True, "denied": False}.get(str(decision)) if decision is not None else None

    @property
    def rule(self) -> str:
        rule = self.document.get("rule") if self.document else None
        if isinstance(rule, dict):
            rule = rule.get("name")
        return str(rule)

    @property
    def would_deny(self) -> list[str]:
        found = (self.document or {}).get("would_deny") or []
        return [str(item.get("rule") if isinstance(item, dict) else item) for item in found]


def authz_check(inventory: Path, source: str, destination: str, method: str | None = None, path: str | None = None,
                headers: Iterable[tuple[str, str]] = ()) -> Checked:
    args = ["authz", "check", source, destination]
    if method is not None:
        args += [method, path or "/"]
    for name, value in headers:
        args += ["--header", f"{name}={value}"]
    run = mesh_cli(inventory, *args, "--json")
    try:
        document = json.loads(run.stdout)
    except ValueError:
        document = None
    return Checked(run, document if isinstance(document, dict) else None)


def check_case(inventory: Path, case: Case) -> Checked:
    ask = case.ask
    if ask.target.protocol == "tcp":
        return authz_check(inventory, case.identity.cli_source, ask.target.service)
    return authz_check(inventory, case.identity.cli_source, ask.target.service, ask.method, ask.path, ask.headers)


def disagreements(inventory: Path, cases: Iterable[Case]) -> dict[str, str]:
    """The cases where `mesh authz check` does not say what the case expects (allowed or not, and its rule):
    run for each distinct question once, 4 at a time."""
    unique: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], Case] = {}
    for case in cases:
        if case.ask.health:
            continue
        a = case.ask
        key = (case.identity.cli_source, a.target.service, a.method, a.path, a.headers)
        unique.setdefault(key, case)
    with ThreadPoolExecutor(max_workers=4) as pool:
        checked = list(zip(unique.values(), pool.map(lambda c: check_case(inventory, c), unique.values()),
                           strict=True))
    found = {}
    for case, answer in checked:
        expect_allowed = case.expect == "allowed"
        if case.identity.name == CHECKER and answer.run.code == 5 and "health checker" in answer.run.stderr:
            continue  # refused as a source: "mesh's health checker: it reaches only health chains", as Envoy says
        if answer.run.code != 0 or answer.allowed is None:
            found[case.describe()] = f"`mesh {' '.join(answer.run.argv)}` exited {answer.run.code}: {answer.run.text[-400:]}"
        elif answer.allowed != expect_allowed or (case.rule is not None and answer.rule != case.rule):
            found[case.describe()] = (f"Envoy must say {case.expect} ({case.rule}); `mesh authz check` says "
                                      f"{json.dumps(answer.document)}")
    return found


# ---- access lines --------------------------------------------------------------------------------------------

Line = dict[str, Any]


def inbound_lines(inventory: Path, host: str, path_part: str | None = None, since: str = "3m") -> list[Line]:
    """The inbound access lines on host (those whose path contains path_part, when given), read with
    `mesh logs --json`."""
    run = mesh_cli(inventory, "logs", "--host", host, "--since", since, "--json", timeout=120)
    assert run.code == 0, f"`mesh logs --host {host}` failed:\n{run}"
    found = []
    for raw in run.stdout.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("direction") == "inbound" and (
                path_part is None or path_part in str(line.get("path"))):
            found.append(line)
    return found


# ---- the demo app on a running lab ---------------------------------------------------------------------------

_PY_SHA = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def _sha(lab: LabUp, host: str, container: str | None) -> str:
    """The SHA-256 of the demo app on host (in container): with python3, the one tool the app image has."""
    command = f"python3 -c {shlex.quote(_PY_SHA)} {demo_units.SCRIPT_PATH}"
    if container:
        command = f"docker exec {container} {command}"
    return sh(lab, host, command).stdout.strip()


def refresh_demo_app(lab: LabUp, vms: Iterable[str] = ("vm1", "vm2"),
                     containers: Iterable[tuple[str, str]] = (("dock1", "api-v2-1"),)) -> list[str]:
    """A lab brought up before this checkout's demo app changed runs the old one (a node's layer is prepared
    once, and the app image is imported once): copy this checkout's demoapp.py over it and restart the
    instances that differ. Returns what was refreshed (nothing on a lab made from this checkout). A restarted
    app container leaves its sidecar in the old network namespace: the next deploy restarts the sidecar."""
    source = images.demoapp_source().read_bytes()
    wanted = hashlib.sha256(source).hexdigest()
    refreshed = []
    for host in vms:
        if _sha(lab, host, None) != wanted:
            out(lab, host, f"cat > {demo_units.SCRIPT_PATH}.new && mv {demo_units.SCRIPT_PATH}.new "
                           f"{demo_units.SCRIPT_PATH} && systemctl restart 'mesh-demo-*.service'", input=source)
            refreshed.append(host)
    for host, container in containers:
        if _sha(lab, host, container) != wanted:
            staged = f"/run/mesh-e2e-demoapp-{container}.py"
            out(lab, host, f"cat > {staged}", input=source)
            out(lab, host, f"docker cp {staged} {container}:{demo_units.SCRIPT_PATH} && rm -f {staged} && "
                           f"docker restart {container} >/dev/null")
            refreshed.append(f"{host}:{container}")
    return refreshed


def forget_runtime_denies(inventory: Path, service: str, sources: Iterable[str]) -> None:
    """Cleanup (never judged): the run-time deny of `sources` on service removed, not waited for."""
    args = ["authz", "deny", service]
    for source in sources:
        args += ["--from", source]
    mesh_cli(inventory, *args, "--undo", "--no-wait")

