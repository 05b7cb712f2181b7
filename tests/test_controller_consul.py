"""The controller against a real Consul 1.8.7 (`consul agent -dev`) and the real mesh-ctl script under a temp root
(the local transport runs `sh mesh-ctl.sh VERB` as sshd's forced command would, with MESH_CTL_ROOT), validating
with mesh's real Envoy: a critical instance leaves the caller's EDS file on disk and comes back when it passes,
nothing moves while a deploy holds its lock, the state is published in KV and the metrics served, a traffic
override put in KV reaches the caller's route file and the state's `traffic` (an invalid one and a deleted one give
the inventory's policy back), a run-time deny reaches the service's inbound route file and the state's `authz` (and
a deploy's preflight reads it into the plan), a standby takes over when the leader stops, Consul gone keeps the
endpoints and shows staleness; a due certificate is renewed through `csr`/`install` with the controller's
intermediate and recorded in KV.

Tests wait with generous deadlines and assert the outcome, not the time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh import catalog
from mesh.config import compute_proxy_config
from mesh.config.validate import envoy_binary
from mesh.controller import protocol
from mesh.controller.daemon import Controller, ControllerOptions
from mesh.controller.spec import ControllerSpec, authz_prefix, deploy_lock_key, issued_prefix, traffic_prefix
from mesh.controller.spec_build import inbound_entries, route_files
from mesh.controller.transport import LocalTransport
from mesh.inventory.policy import Abort, AuthzOverride, Fault, TrafficOverride
from mesh.inventory.services import authz_override_to_json, override_to_json
from mesh.pki import CertificateAuthority
from mesh.pki.certs import Issuer, build_intermediate, new_ca_key
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.runtime import read_runtime_overrides
from mesh.render import ProxyFiles, render_proxy_files
from mesh.testing.consul_server import ConsulDevServer, free_ports
from mesh.testing.fake_ctl import MESH_ID, TRUST_DOMAIN, controller_spec, host_spec, proxy_spec
from mesh.testing.loopback import Identity, lay_out_proxy, proxy_config_in, two_service_mesh

pytestmark = pytest.mark.needs_root(reason="mesh-ctl runs as root (runuser, chown)")

DEADLINE = 30.0
EDS = "xds/eds.upstream-api.yaml"


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    from mesh.lab.images import ensure_consul_binary

    binary = ensure_consul_binary()  # the real Consul: a failure to get it fails these tests, never skips
    with ConsulDevServer(binary) as server:
        yield server


@dataclass
class Host:
    """A managed host under a temp root, laid out as a deploy leaves it: mesh's Envoy, the identities file, web's
    proxy (its api endpoints from the plan) with a leaf of mesh's CA."""

    root: Path
    files: ProxyFiles
    ca: CertificateAuthority
    intermediate: tuple[str, str]  # the controllers' intermediate (cert, key), signed by the CA's root
    routes: dict[str, dict[str, object]]  # web's outbound route file -> its RouteInputs JSON (as spec.json has it)
    inbound: dict[str, dict[str, object]]  # web's inbound route file -> {"kind", "inputs"} (as spec.json has it)

    @property
    def eds(self) -> str:
        return Path(self.files.proxy_dir, EDS).read_text()

    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(Path(self.files.proxy_dir, "tls", "cert.pem").read_bytes())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "vm1"
    loop = two_service_mesh(9999, TRUST_DOMAIN)
    ca, _created = CertificateAuthority.ensure(str(tmp_path / "state"), TRUST_DOMAIN)
    home = root / "etc" / "mesh" / "proxies" / "web"
    config = proxy_config_in(compute_proxy_config(loop.mesh, loop.web), home, loop.address(loop.web))
    files = render_proxy_files(config)
    routes = {path: dict(inputs) for path, inputs in route_files(config, files).items()}
    inbound = {path: dict(entry) for path, entry in inbound_entries(config, files).items()}
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])).sign(key, hashes.SHA256()))
    issued = ca.sign(csr.public_bytes(serialization.Encoding.PEM), loop.web.spiffe_id, timedelta(hours=1),
                     "vm1", files.proxy)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    lay_out_proxy(files, Identity(issued.chain_pem, key_pem, ca.root_pem))
    (root / "usr/local/lib/mesh").mkdir(parents=True)
    (root / "usr/local/lib/mesh/envoy").symlink_to(envoy_binary())
    (root / "etc/mesh/ctl").mkdir(parents=True)
    (root / "etc/mesh/ctl/identities").write_text(f"{files.proxy} vm {home} root web {home}/ca.pem -\n")
    return Host(root, files, ca, _controller_intermediate(ca, tmp_path / "controller-ca"), routes, inbound)


def _controller_intermediate(ca: CertificateAuthority, folder: Path) -> tuple[str, str]:
    root_key = serialization.load_pem_private_key(Path(ca.ca_dir, "root.key").read_bytes(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = new_ca_key()
    cert = build_intermediate(Issuer(ca.root, root_key), key, TRUST_DOMAIN, datetime.now(UTC))
    folder.mkdir()
    (folder / "intermediate.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "intermediate.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "root.pem").write_bytes(ca.root_pem)
    return str(folder / "intermediate.pem"), str(folder / "intermediate.key")


def register(consul: ConsulDevServer, node: str, address: str, port: int, status: str = "passing") -> catalog.InstanceRef:
    registration = catalog.Registration(node=node, address=address, service_id=f"api-{node}", service="api",
                                        port=port, meta={"managed-by": "mesh", "mesh-id": MESH_ID})
    body = catalog.register_body(registration, catalog.check_body(registration.ref, status, "test"))  # type: ignore[arg-type]
    answer = requests.put(f"{consul.url}/v1/catalog/register", data=json.dumps(body), timeout=10)
    assert answer.status_code == 200, answer.text
    return registration.ref


def eventually(probe: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@dataclass
class Running:
    controller: Controller
    thread: threading.Thread


@pytest.fixture
def start(host: Host) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start_controller(spec: ControllerSpec, holder: str = "ctl-test") -> Running:
        cert, key = host.intermediate
        options = ControllerOptions(intermediate_cert=cert, intermediate_key=key,
                                    root_cert=str(Path(cert).parent / "root.pem"), envoy=envoy_binary(),
                                    holder=holder)
        transport = LocalTransport(str(protocol.script_path()), lambda _host: str(host.root),
                                   env={"PATH": "/usr/bin:/bin"})
        controller = Controller(lambda: spec, options, transport=transport)
        thread = threading.Thread(target=controller.run, daemon=True)
        thread.start()
        started.append(Running(controller, thread))
        return started[-1]

    yield start_controller
    for running in started:
        running.controller.stop()
        running.thread.join(timeout=30)


def spec_for(consul: ConsulDevServer, host: Host, **changes: object) -> ControllerSpec:
    spec = controller_spec((host_spec("vm1", (proxy_spec(host.files),)),), consul_url=consul.url)
    return replace(spec, metrics_port=free_ports(1)[0], **changes)  # type: ignore[arg-type]


def kv(consul: ConsulDevServer, key: str) -> str | None:
    answer = requests.get(f"{consul.url}/v1/kv/{key}?raw", timeout=10)
    return answer.text if answer.status_code == 200 else None


def test_a_critical_instance_leaves_the_callers_endpoints_and_comes_back(consul: ConsulDevServer, host: Host,
                                                                       start: Callable[..., Running]
                                                                       ) -> None:
    first = register(consul, "api-a", "127.0.0.11", 21001)
    second = register(consul, "api-b", "127.0.0.12", 21002)
    assert "127.0.0.11" not in host.eds  # the plan's endpoints until the controller runs
    spec = spec_for(consul, host)
    start(spec)

    eventually(lambda: "127.0.0.11" in host.eds and "127.0.0.12" in host.eds, "both instances in web's EDS file")
    catalog.set_health(consul.url, second, "critical", "stopped")
    eventually(lambda: "127.0.0.12" not in host.eds, "the critical instance leaves the file")
    assert "127.0.0.11" in host.eds
    catalog.set_health(consul.url, second, "passing", "ok")
    eventually(lambda: "127.0.0.12" in host.eds, "the passing instance comes back")

    state = json.loads(kv(consul, spec.state_key) or "{}")
    assert state["holder"] == "ctl-test" and state["plan_digest"] == spec.plan_digest
    proxy = state["proxies"][f"vm1/{host.files.proxy}"]
    on_host = protocol.resource_version_of({protocol.relpath_in(host.files.proxy_dir, file.path):
                                            Path(file.path).read_text() for file in host.files.files})
    eventually(lambda: json.loads(kv(consul, spec.state_key) or "{}")["proxies"][f"vm1/{host.files.proxy}"]
               ["host_version"] == on_host, "the published version is the host's")
    assert proxy["pushed_at"] > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{spec.metrics_port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert "mesh_controller_leader 1.0" in metrics
    assert 'mesh_controller_pushes_total{result="ok"}' in metrics

    # a deploy holds its lock: nothing moves; released: the change flows
    session = requests.put(f"{consul.url}/v1/session/create", json={"Name": "deploy", "TTL": "30s"},
                           timeout=10).json()["ID"]
    assert requests.put(f"{consul.url}/v1/kv/{deploy_lock_key(MESH_ID)}?acquire={session}", data="{}",
                        timeout=10).json() is True
    catalog.set_health(consul.url, first, "critical", "stopped")
    time.sleep(2.0)
    assert "127.0.0.11" in host.eds
    requests.put(f"{consul.url}/v1/session/destroy/{session}", timeout=10)
    eventually(lambda: "127.0.0.11" not in host.eds, "the change after the deploy's lock is released")


def test_an_override_in_consul_kv_reaches_the_callers_route_file_and_the_state(consul: ConsulDevServer, host: Host,
                                                                             start: Callable[..., Running]) -> None:
    spec = spec_for(consul, host)
    [vm1] = spec.hosts
    spec = replace(spec, hosts=(replace(vm1, proxies=(replace(vm1.proxies[0], routes=host.routes),)),))
    [rds] = host.routes
    planned = Path(rds).read_text()
    key = traffic_prefix(MESH_ID) + "api"

    def traffic() -> dict[str, str]:
        return dict(json.loads(kv(consul, spec.state_key) or "{}").get("traffic") or {})

    start(spec)
    eventually(lambda: traffic() == {"api": ""}, "the state says every caller runs api's inventory policy")
    fault = TrafficOverride(fault=Fault(abort=Abort(503, 25.0)), revision="r-7")
    requests.put(f"{consul.url}/v1/kv/{key}", data=json.dumps(override_to_json(fault, "test", "now")), timeout=10)
    try:
        eventually(lambda: "http_status: 503" in Path(rds).read_text(), "the fault in web's route file")
        eventually(lambda: traffic() == {"api": "r-7"}, "the state says every caller runs revision r-7")
        requests.put(f"{consul.url}/v1/kv/{key}", data="{not an override", timeout=10)
        eventually(lambda: Path(rds).read_text() == planned, "an invalid override: the inventory's policy")
    finally:
        requests.delete(f"{consul.url}/v1/kv/{key}", timeout=10)
    eventually(lambda: traffic() == {"api": ""}, "the key deleted: the inventory's policy everywhere")
    assert Path(rds).read_text() == planned


def test_a_runtime_deny_in_consul_kv_reaches_the_inbound_route_file_and_the_state(
        consul: ConsulDevServer, host: Host, start: Callable[..., Running]) -> None:
    spec = spec_for(consul, host)
    [vm1] = spec.hosts
    spec = replace(spec, hosts=(replace(vm1, proxies=(replace(vm1.proxies[0], inbound=host.inbound),)),))
    [route] = host.inbound
    planned = Path(route).read_text()
    key = authz_prefix(MESH_ID) + "web"

    def authz() -> dict[str, str]:
        return dict(json.loads(kv(consul, spec.state_key) or "{}").get("authz") or {})

    start(spec)
    eventually(lambda: authz() == {"web": ""}, "the state says every web instance runs the inventory's rules")
    deny = AuthzOverride(deny_from=("web",), revision="a-7")  # the only service this spec has a proxy of
    began = time.monotonic()
    requests.put(f"{consul.url}/v1/kv/{key}", data=json.dumps(authz_override_to_json(deny, "test", "now")),
                 timeout=10)
    try:
        eventually(lambda: "runtime-deny" in Path(route).read_text(), "the deny in web's inbound route file")
        eventually(lambda: authz() == {"web": "a-7"}, "the state says every web instance runs revision a-7")
        print(f"deny stored -> state.authz reports it: {time.monotonic() - began:.2f} s")
        requests.put(f"{consul.url}/v1/kv/{key}", data="{not a deny", timeout=10)
        eventually(lambda: Path(route).read_text() == planned, "an invalid deny: the inventory's rules")
    finally:
        requests.delete(f"{consul.url}/v1/kv/{key}", timeout=10)
    eventually(lambda: authz() == {"web": ""}, "the key deleted: the inventory's rules everywhere")
    assert Path(route).read_text() == planned


def test_a_deploy_plans_with_the_deny_stored_in_consul(consul: ConsulDevServer) -> None:
    loop = two_service_mesh(9999, TRUST_DOMAIN)
    mesh = replace(loop.mesh, settings=replace(loop.mesh.settings, consul_url=consul.url))
    deny = AuthzOverride(deny_from=("web",), revision="p-1")
    key = authz_prefix(MESH_ID) + "api"
    requests.put(f"{consul.url}/v1/kv/{key}", data=json.dumps(authz_override_to_json(deny, "test", "now")),
                 timeout=10)
    try:
        warnings: list[str] = []
        overrides = read_runtime_overrides(mesh, warnings.append)
        assert dict(overrides.authz) == {"api": deny} and dict(overrides.traffic) == {} and warnings == []
        planned = build_plan(mesh, PlanInputs(b"root", "00", authz_overrides=overrides.authz), [mesh.host("h-api")])
        [api] = planned.host("h-api").proxies
        [route] = inbound_entries(api.config, api.rendered)
        assert "runtime-deny" in api.rendered.file(route).content
    finally:
        requests.delete(f"{consul.url}/v1/kv/{key}", timeout=10)


def test_a_due_certificate_is_renewed_on_the_host_and_recorded(consul: ConsulDevServer, host: Host,
                                                               start: Callable[..., Running]) -> None:
    before = host.leaf()
    # a one-hour leaf is past half of a two-hour lifetime: due at once; the new one is not due for an hour
    spec = spec_for(consul, host, cert_ttl_s=7200)
    start(spec)

    eventually(lambda: host.leaf().serial_number != before.serial_number, "a new leaf behind the tls link")
    leaf = host.leaf()
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=2, minutes=5)
    intermediate = x509.load_pem_x509_certificate(Path(host.intermediate[0]).read_bytes())
    assert leaf.issuer == intermediate.subject
    serial = f"{leaf.serial_number:x}"
    eventually(lambda: kv(consul, issued_prefix(MESH_ID) + serial) is not None, "the leaf recorded in KV")
    record = json.loads(kv(consul, issued_prefix(MESH_ID) + serial) or "{}")
    assert (record["host"], record["proxy"]) == ("vm1", host.files.proxy)
    assert record["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/svc/web"
    time.sleep(2.0)
    assert host.leaf().serial_number == leaf.serial_number  # renewed once
    keys = requests.get(f"{consul.url}/v1/kv/{issued_prefix(MESH_ID)}?keys", timeout=10).json()
    assert keys == [issued_prefix(MESH_ID) + serial]


def test_the_service_takes_the_lock_rereads_its_spec_on_sighup_and_releases_the_lock_on_sigterm(
        consul: ConsulDevServer, host: Host, tmp_path: Path) -> None:
    spec = replace(controller_spec((), consul_url=consul.url, plan_digest="1" * 64), metrics_port=0)
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    ca_dir = Path(host.intermediate[0]).parent
    log = (tmp_path / "controller.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "mesh.controller", "--config", str(path), "--ca-dir",
                                str(ca_dir), "--envoy", envoy_binary()], stdout=log, stderr=log)
    try:
        def published() -> str | None:
            assert process.poll() is None, (tmp_path / "controller.log").read_text()
            return json.loads(kv(consul, spec.state_key) or "{}").get("plan_digest")

        eventually(lambda: published() == "1" * 64, "the spec's plan digest published")
        path.write_text(replace(spec, plan_digest="2" * 64).to_json())
        process.send_signal(signal.SIGHUP)
        eventually(lambda: published() == "2" * 64, "the re-read spec's plan digest published")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    lock = requests.get(f"{consul.url}/v1/kv/{spec.lock_key}", timeout=10).json()[0]
    assert "Session" not in lock  # released: a standby takes over at once
    events = [json.loads(line) for line in (tmp_path / "controller.log").read_text().splitlines()
              if line.startswith("{")]
    assert [event["event"] for event in events if event["event"].startswith("controller_")] == [
        "controller_started", "controller_leading", "controller_spec_loaded", "controller_stopped"]


def test_a_standby_takes_over_when_the_leader_stops(consul: ConsulDevServer, host: Host,
                                                    start: Callable[..., Running]) -> None:
    instance = register(consul, "api-c", "127.0.0.13", 21003)
    register(consul, "api-d", "127.0.0.14", 21004)  # stays up: the critical one leaves (no panic)
    spec = replace(spec_for(consul, host), metrics_port=0)
    first = start(spec, "ctl-a")

    def holder() -> str | None:
        return json.loads(kv(consul, spec.state_key) or "{}").get("holder")

    eventually(lambda: holder() == "ctl-a" and "127.0.0.13" in host.eds, "ctl-a leads and pushes")
    second = start(spec, "ctl-b")
    time.sleep(2.0)
    assert first.controller.leading and not second.controller.leading
    assert second.controller.metrics.value("mesh_controller_leader") == 0

    first.controller.stop()
    first.thread.join(timeout=30)
    eventually(lambda: holder() == "ctl-b", "ctl-b takes over")
    catalog.set_health(consul.url, instance, "critical", "stopped")
    eventually(lambda: "127.0.0.13" not in host.eds, "a change after the takeover reaches the host")


def test_consul_gone_keeps_the_endpoints_and_shows_staleness(host: Host, start: Callable[..., Running]) -> None:
    from mesh.lab.images import ensure_consul_binary

    with ConsulDevServer(ensure_consul_binary(), node="consul-outage") as own:
        register(own, "api-e", "127.0.0.15", 21005)
        running = start(replace(spec_for(own, host), metrics_port=0))
        eventually(lambda: "127.0.0.15" in host.eds, "the instance pushed")
        before = host.eds
        assert running.controller.metrics.value("mesh_controller_consul_staleness_seconds") == 0
    time.sleep(1.0)
    eventually(lambda: (running.controller.metrics.value("mesh_controller_consul_staleness_seconds") or 0) >= 2,
               "staleness rises while Consul is gone")
    assert host.eds == before  # never an empty endpoint set
