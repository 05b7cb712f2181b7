"""Helpers of the live controller's end-to-end tests (test_controller_lab.py, issue 18): which api instance served
each request of a loop from vm1 through web to api, what web's Envoy and its endpoint file hold, the controllers
(who holds the lock, their units, their metrics), certificate serials as files and as Envoy serves them, and
`ssh` as the controllers' account `mesh-ctl` with a controller's own key. Every probe returns what it saw; the
tests decide.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from deploy_helpers import INVENTORY, LAB_STATE, Run, consul, out, run_mesh, sh
from lab_helpers import LabUp
from rollout_helpers import CONSUL, SIDECARS, VM_UNITS, WEB_TO_API

from mesh.controller.spec import CONTROLLER_UNIT, CTL_USER, DEFAULT_METRICS_PORT, SSH_KEY, lock_key, state_key
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.status.running import normal_serial, served_serials

CONTROLLERS = ("ctl1", "ctl2")
CHECKER_UNIT = "mesh-health-checker.service"
CHECKER_HOME = "/etc/mesh/checker"
PROXIES = "/etc/mesh/proxies"
# The lab's api instances (inventory/lab.yaml): the VM one and the container one, each behind its Envoy's
# inbound listener (the first proxy port of its host, 21000), as web's Envoy on vm1 reaches them.
API_INSTANCES = {"vm2": "10.77.0.12:21000", "dock1": "10.77.0.20:21000"}
WEB_PROXY = ("vm1", "web-8080")
WEB_API_CLUSTER = "upstream-api"
WEB_API_EDS = f"{PROXIES}/web-8080/xds/eds.upstream-api.yaml"
API_APP_UNIT = "mesh-demo-api.service"  # api's demo app on vm2 (mesh.lab.demo_units.unit_name)
# Every identity with a certificate: (host, name) -> its home (tls/cert.pem inside); proxies have an admin socket.
IDENTITIES = {("vm1", "web-8080"): f"{PROXIES}/web-8080", ("vm2", "api-9090"): f"{PROXIES}/api-9090",
              ("vm2", "db-5432"): f"{PROXIES}/db-5432", ("dock1", "api-api-v2-1"): f"{PROXIES}/api-api-v2-1",
              ("ctl1", "checker"): CHECKER_HOME, ("ctl2", "checker"): CHECKER_HOME}
ENVOY_HOSTS = ("vm1", "vm2", "dock1")
KNOWN_HOSTS = LAB_STATE / "known_hosts"


def mesh_id() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.id


def parallel(hosts: Iterable[str], probe: Any) -> dict[str, Any]:
    """probe(host) for every host at once: {host: its value}."""
    names = list(hosts)
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        return dict(zip(names, pool.map(probe, names), strict=True))


# ---- mesh drain --------------------------------------------------------------------------------------------

def drain(service: str, host: str, undo: bool = False) -> Run:
    """`mesh drain -i inventory/lab.yaml SERVICE HOST [--undo]`: it must exit 0."""
    run = run_mesh("drain", "-i", str(INVENTORY), service, host, *(["--undo"] if undo else []), timeout=120)
    assert run.code == 0, str(run)
    return run


# ---- what web's Envoy on vm1 holds -------------------------------------------------------------------------

def admin(lab: LabUp, host: str, proxy: str, path: str) -> str:
    """An admin API answer of proxy's Envoy on host (its unix socket; `` when it does not answer)."""
    done = sh(lab, host, f"curl -sS --max-time 5 --unix-socket {PROXIES}/{proxy}/admin/admin.sock "
                         f"{shlex.quote('http://admin' + path)}", timeout=30)
    return done.stdout if done.returncode == 0 else ""


def cluster_hosts(lab: LabUp, host: str, proxy: str, cluster: str) -> set[str] | str:
    """The address:port of every host of `cluster` in proxy's Envoy (/clusters), or why it could not tell."""
    text = admin(lab, host, proxy, "/clusters")
    if not text:
        return f"{proxy}'s Envoy on {host} did not answer /clusters"
    return {line.split("::")[1] for line in text.splitlines()
            if line.startswith(f"{cluster}::") and line.count("::") >= 3 and line.split("::")[2] == "health_flags"}


def web_api_hosts(lab: LabUp) -> set[str] | str:
    """The api instances web's Envoy on vm1 sends to (as address:port)."""
    return cluster_hosts(lab, *WEB_PROXY, WEB_API_CLUSTER)


def eds_endpoints(text: str) -> set[str]:
    """The address:port endpoints of an endpoint file (a DiscoveryResponse of ClusterLoadAssignments)."""
    data = yaml.safe_load(text) or {}
    found: set[str] = set()
    for resource in data.get("resources") or []:
        for locality in resource.get("endpoints") or []:
            for item in locality.get("lb_endpoints") or []:
                address = item["endpoint"]["address"]["socket_address"]
                found.add(f"{address['address']}:{address['port_value']}")
    return found


def web_api_file(lab: LabUp) -> set[str] | str:
    """The endpoints of web's api endpoint file on vm1."""
    done = sh(lab, "vm1", f"cat {WEB_API_EDS}")
    return eds_endpoints(done.stdout) if done.returncode == 0 else f"cannot read {WEB_API_EDS}: {done.stderr}"


def endpoint_files(lab: LabUp) -> dict[str, str]:
    """`sha256  path` of every endpoint file of every proxy, per Envoy host."""
    return parallel(ENVOY_HOSTS, lambda host: out(lab, host, f"sha256sum {PROXIES}/*/xds/eds.*.yaml"))


# ---- a request loop that tells which api instance answered -------------------------------------------------

_TRACE = r"""
import json, os, sys, time, urllib.request
stop, url, trace = sys.argv[1], sys.argv[2], sys.argv[3]
with open(trace, "a", buffering=1) as out:
    while not os.path.exists(stop):
        started = time.time()
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                hops = json.loads(answer.read()).get("hops")
            if not isinstance(hops, list) or not hops or any("error" in hop for hop in hops):
                line = "! " + json.dumps(hops)
            else:
                line = str(hops[0].get("host"))
        except Exception as exc:
            line = f"! {type(exc).__name__}: {exc}"
        out.write(f"{started:.3f} " + line[:300].replace("\n", " ") + "\n")
        time.sleep(0.02)
os.unlink(stop)
"""


@dataclass(frozen=True)
class Request:
    """One request of a loop: when it started (epoch; the lab's nodes share this machine's clock), which api
    host answered (None when it failed), and the failure."""

    at: float
    host: str | None
    error: str = ""


def parse_trace(text: str) -> list[Request]:
    found = []
    for line in text.splitlines():
        at, _, rest = line.partition(" ")
        if not rest:
            continue
        if rest.startswith("! "):
            found.append(Request(float(at), None, rest[2:]))
        else:
            found.append(Request(float(at), rest))
    return found


@dataclass
class Trace:
    """A request loop on a lab node (one new connection per request to web's outbound listener to api) writing
    one line per request to a file there, so a test can read its latest requests while it runs."""

    lab: LabUp
    host: str
    file: str
    stop_file: str
    process: subprocess.Popen[bytes]
    requests: list[Request] = field(default_factory=list)  # filled in when the loop stopped

    def latest(self, count: int = 40) -> list[Request]:
        return parse_trace(out(self.lab, self.host, f"tail -n {count} {self.file}"))

    def hosts(self, count: int = 40) -> list[str | None]:
        """Which api host answered each of the latest requests (None: failed)."""
        return [request.host for request in self.latest(count)]

    def stop(self) -> list[Request]:
        if self.requests:
            return self.requests
        sh(self.lab, self.host, f"touch {self.stop_file}")
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        text = out(self.lab, self.host, f"cat {self.file}; rm -f {self.file} {self.stop_file}", timeout=60)
        self.requests = parse_trace(text)
        return self.requests


@contextmanager
def traffic(lab: LabUp, host: str = "vm1", port: int = WEB_TO_API) -> Iterator[Trace]:
    """A request loop from host through web's Envoy to api while the block runs (stopped at its end, even when the
    block fails); the trace's `requests` hold every request afterwards."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    trace_file, stop_file = f"/run/mesh-e2e-trace-{tag}", f"/run/mesh-e2e-trace-{tag}.stop"
    script = f"python3 -c {shlex.quote(_TRACE)} {stop_file} http://127.0.0.1:{port}/ {trace_file}"
    process = subprocess.Popen(lab.ssh_argv(host, script), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    trace = Trace(lab, host, trace_file, stop_file, process)
    time.sleep(2.0)  # the loop runs before the change starts
    try:
        yield trace
    finally:
        time.sleep(2.0)  # and a while after it
        trace.stop()


def failures(requests: list[Request]) -> list[str]:
    return [f"{r.at:.3f}: {r.error}" for r in requests if r.host is None]


def served_between(requests: list[Request], start: float, end: float = float("inf")) -> dict[str, int]:
    """How many requests started in [start, end) each api host answered ('failed' for failures)."""
    counts: dict[str, int] = {}
    for request in requests:
        if start <= request.at < end:
            key = request.host or "failed"
            counts[key] = counts.get(key, 0) + 1
    return counts


# ---- the controllers ---------------------------------------------------------------------------------------

def kv(key: str) -> dict[str, Any] | None:
    """Consul's KV entry (with its Session, and Value decoded), or None when missing."""
    try:
        entries = consul(CONSUL, f"/v1/kv/{key}")
    except OSError as exc:  # urllib's HTTPError 404 is an OSError
        if getattr(exc, "code", None) == 404:
            return None
        raise
    entry = dict(entries[0])
    entry["Value"] = base64.b64decode(entry.get("Value") or b"").decode()
    return entry


def leader() -> str | None:
    """The controller host holding the lock (its KV value `{"holder": "HOST:PID"}` with a live session), or
    None when nobody holds it."""
    entry = kv(lock_key(mesh_id()))
    if not entry or not entry.get("Session"):
        return None
    try:
        holder = str(json.loads(entry["Value"])["holder"])
    except (ValueError, KeyError, TypeError):
        return f"unreadable holder {entry['Value']!r}"
    return holder.rsplit(":", 1)[0]


def controller_state() -> dict[str, Any] | None:
    """What the active controller publishes in Consul KV (mesh/<id>/controller/state)."""
    entry = kv(state_key(mesh_id()))
    return json.loads(entry["Value"]) if entry and entry["Value"] else None


def controller_units(lab: LabUp) -> dict[str, str]:
    """MainPID and ActiveState of mesh-controller.service on each controller."""
    return parallel(CONTROLLERS, lambda host: out(
        lab, host, f"systemctl show -p MainPID -p ActiveState --value {CONTROLLER_UNIT} | paste -sd' '").strip())


def systemctl(lab: LabUp, host: str, *words: str) -> None:
    out(lab, host, "systemctl " + " ".join(map(shlex.quote, words)), timeout=120)


def metrics(lab: LabUp, host: str) -> str:
    """The controller's Prometheus text on host (its loopback port), `` when it does not answer."""
    done = sh(lab, host, f"curl -sS --max-time 5 http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics")
    return done.stdout if done.returncode == 0 else ""


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def staleness(text: str) -> float | None:
    """The controller's Consul staleness in seconds: the sample whose name has both `consul` and `stale`."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and "consul" in match.group(1) and "stale" in match.group(1):
            try:
                return float(match.group(3))
            except ValueError:
                return None
    return None


# ---- processes that must not restart -----------------------------------------------------------------------

def processes(lab: LabUp) -> dict[str, str]:
    """Every Envoy's unit MainPID and state, every sidecar's container id, PID and start time, and each health
    checker's MainPID: what a reload or a renewal must leave as it is."""
    def on(host: str) -> dict[str, str]:
        units = [*VM_UNITS.get(host, []), *([CHECKER_UNIT] if host in CONTROLLERS else [])]
        found: dict[str, str] = {}
        if units:
            text = out(lab, host, f"systemctl show -p Id -p MainPID -p ActiveState {' '.join(units)}")
            for block in text.strip().split("\n\n"):
                fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                found[f"{host}:{fields.get('Id')}"] = f"{fields.get('MainPID')} {fields.get('ActiveState')}"
        for name in SIDECARS.get(host, []):
            found[f"{host}:{name}"] = out(lab, host, "docker container inspect -f "
                                          f"'{{{{.Id}}}} {{{{.State.Pid}}}} {{{{.State.StartedAt}}}}' {name}").strip()
        return found

    merged: dict[str, str] = {}
    for found in parallel(["vm1", "vm2", "dock1", *CONTROLLERS], on).values():
        merged.update(found)
    return merged


# ---- certificates ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One identity's certificate as its host has it (tls/cert.pem), and the serials its Envoy serves."""

    serial: str
    public: str  # SHA-256 of its public key
    served: tuple[str, ...] | None  # None for the checker (no Envoy)


_MARK = "=====mesh-e2e-cert "


def leaves(lab: LabUp) -> dict[tuple[str, str], Leaf | str]:
    """Every identity's certificate (IDENTITIES), or why it could not be read."""
    def on(host: str) -> dict[tuple[str, str], Leaf | str]:
        names = [(name, home) for (where, name), home in IDENTITIES.items() if where == host]
        script = "; ".join(
            f"echo '{_MARK}{name} file'; cat {home}/tls/cert.pem"
            + ("" if name == "checker" else
               f"; echo '{_MARK}{name} certs'; curl -sS --max-time 5 --unix-socket {home}/admin/admin.sock "
               "http://admin/certs")
            for name, home in names)
        done = sh(lab, host, script + "; true", timeout=60)
        parts: dict[tuple[str, str], str] = {}
        for chunk in done.stdout.split(_MARK)[1:]:
            head, _, body = chunk.partition("\n")
            name, kind = head.split()
            parts[(name, kind)] = body
        found: dict[tuple[str, str], Leaf | str] = {}
        for name, _home in names:
            try:
                cert = x509.load_pem_x509_certificates(parts[(name, "file")].encode())[0]
            except (KeyError, ValueError) as exc:
                found[(host, name)] = f"no certificate: {exc} {done.stderr[:300]}"
                continue
            public = hashlib.sha256(cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
            served = None
            if name != "checker":
                try:
                    served = served_serials(json.loads(parts.get((name, "certs")) or "{}"))
                except ValueError:
                    served = ()
            found[(host, name)] = Leaf(normal_serial(format(cert.serial_number, "x")), public, served)
        return found

    merged: dict[tuple[str, str], Leaf | str] = {}
    for found in parallel(sorted({host for host, _ in IDENTITIES}), on).values():
        merged.update(found)
    return merged


# ---- the controller's key ----------------------------------------------------------------------------------

def controller_key(lab: LabUp, host: str, folder: Path) -> Path:
    """A copy of the controller's private key (SSH_KEY on host) in folder, 0600."""
    key = folder / f"{host}-id_ed25519"
    text = out(lab, host, f"cat {SSH_KEY}")
    assert "PRIVATE KEY" in text, f"{host}:{SSH_KEY} holds no private key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return key


def ctl_argv(key: Path, address: str, *ssh_args: str) -> list[str]:
    """ssh as mesh-ctl@address with key, the lab's known_hosts, strict host key checking, no config file."""
    return ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-F", "/dev/null", *ssh_args, f"{CTL_USER}@{address}"]


def ctl_ssh(key: Path, address: str, command: str, input: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """`command` sent as mesh-ctl (the forced command gets it as $SSH_ORIGINAL_COMMAND)."""
    return subprocess.run([*ctl_argv(key, address), command], input=input, capture_output=True, timeout=timeout,
                          check=False, stdin=None if input is not None else subprocess.DEVNULL)
