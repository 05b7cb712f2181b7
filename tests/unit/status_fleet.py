"""A converged fake fleet for the `mesh status` tests: every rendered file, unit, certificate and container in
place on FakeHosts, and Envoy's admin API answering as an Envoy running those files would (its answers kept in
a `RunningEnvoy` a test may change). Nothing here is a test."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import paths
from mesh.containers.sidecar import bootstrap_sidecar
from mesh.healthcheck.config import CERT_FILE as CHECKER_CERT_PATH
from mesh.hosts.connection import CommandResult
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh
from mesh.pki import CertificateAuthority
from mesh.status.expected import ExpectedProxy, expected_proxies
from mesh.testing.fake_batch import answer_batched_reads
from mesh.testing.fake_connector import FakeFleet, FakeHost, FakeUnit

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.77.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.77.0.11
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}]}
        vm2:
          ansible_host: 10.77.0.12
          mesh_workloads:
            - {service: api, port: 9090}
    containers:
      vars: {mesh_host_kind: container_host}
      hosts:
        dock1:
          ansible_host: 10.77.0.20
          mesh_workloads:
            - {service: api, port: 9090, container: api-1}
"""
SIDECAR_IMAGE = "mesh-envoy:1.40.0-abc"
NETNS = "net:[4026532301]"
_ADMIN_TYPES = "type.googleapis.com/envoy.admin.v3."


@dataclass
class RunningEnvoy:
    """What one proxy's admin API answers (a test changes these to make Envoy lag behind its files)."""

    server_info: dict[str, Any]
    config_dump: dict[str, Any]
    certs: dict[str, Any]
    clusters: str = ""
    answers: bool = True

    def stub(self, host: FakeHost, socket: str) -> None:
        for path, attribute in (("server_info", "server_info"), ("config_dump", "config_dump"),
                                ("certs", "certs"), ("clusters", "clusters")):
            host.stub(re.escape(socket) + r"\S* \S*/" + path, self._answer(attribute))

    def _answer(self, attribute: str) -> Any:
        def answer(cmd: str, stdin: bytes | None) -> CommandResult:
            if not self.answers:
                return CommandResult(7, b"", b"")
            value = getattr(self, attribute)
            return CommandResult(0, (value if isinstance(value, str) else json.dumps(value)).encode(), b"")
        return answer


@dataclass
class Fleet:
    mesh: Mesh
    fleet: FakeFleet
    ca_pem: bytes
    serials: dict[str, int] = field(default_factory=dict)  # proxy -> the serial of its leaf on disk
    envoys: dict[str, RunningEnvoy] = field(default_factory=dict)  # proxy -> its admin answers
    docker_inspect: dict[str, str] = field(default_factory=dict)  # host -> what status's docker inspect prints

    def host(self, name: str) -> ManagedHost:
        return next(host for host in self.mesh.hosts if host.name == name)

    def expected(self, host: str) -> tuple[ExpectedProxy, ...]:
        return expected_proxies(self.mesh, self.host(host))


def converged_fleet(tmp_path: Path, xds_hosts: tuple[str, ...] = ()) -> Fleet:
    """vm1 (web -> api), vm2 (api), dock1 (api in container api-1), ctl1 (the checker), all as deploy leaves them,
    every Envoy running its files; the hosts in `xds_hosts` are on `mesh_delivery: xds` and their Envoys run the
    ADS bootstrap (node.metadata mesh_delivery: xds) with resources of the stream's versions."""
    inventory = tmp_path / "hosts.yaml"
    text = INVENTORY
    for name in xds_hosts:
        text = re.sub(rf"(\n( +){name}:\n\2  ansible_host: \S+\n)", r"\1\2  mesh_delivery: xds\n", text)
    assert text.count("mesh_delivery: xds") == len(xds_hosts), text
    inventory.write_text(text)
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    ca, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    fleet = Fleet(mesh, FakeFleet(), ca.root_pem)
    for managed in mesh.hosts:
        host = fleet.fleet.host(managed.name)
        answer_batched_reads(host)
        host.write(paths.CA_PATH, ca.root_pem)
        for expected in fleet.expected(managed.name):
            _lay_out(fleet, ca, managed, host, expected)
        if managed.is_controller:
            host.units["mesh-health-checker.service"] = FakeUnit("active", True)
            host.write(CHECKER_CERT_PATH, _leaf(ca, managed.name, "health-checker").public_bytes(
                serialization.Encoding.PEM))
    return fleet


def leaf_pem(tmp_path: Path, issued_ago: timedelta) -> bytes:
    """A leaf of the fleet's CA issued `issued_ago` (24 h lifetime)."""
    ca, _ = CertificateAuthority.ensure(str(tmp_path / "state"), "lab.mesh")
    return _leaf(ca, "ctl1", "health-checker", datetime.now(UTC) - issued_ago).public_bytes(serialization.Encoding.PEM)


def _lay_out(fleet: Fleet, ca: CertificateAuthority, managed: ManagedHost, host: FakeHost,
             expected: ExpectedProxy) -> None:
    for file in expected.files.files:
        host.write(file.path, file.content)
    host.write(expected.ca_path, fleet.ca_pem)
    leaf = _leaf(ca, managed.name, expected.proxy)
    host.write(expected.cert_path, leaf.public_bytes(serialization.Encoding.PEM))
    fleet.serials[expected.proxy] = leaf.serial_number
    envoy = RunningEnvoy(
        server_info={"version": "deadbeef/1.40.0/Clean/RELEASE/BoringSSL", "state": "LIVE",
                     "node": {"id": expected.node_id if expected.delivery == "xds" else expected.proxy,
                              "metadata": {"mesh_bootstrap_sha256": expected.files.bootstrap_sha256,
                                           **({"mesh_delivery": "xds"} if expected.delivery == "xds" else {})}}},
        config_dump=config_dump_of(expected, over_ads=expected.delivery == "xds"),
        certs={"certificates": [{"ca_cert": [], "cert_chain": [
            {"path": expected.cert_path, "serial_number": f"0{leaf.serial_number:x}"}]}]},
        clusters="".join(f"{cluster}::10.77.0.12:{21000}::health_flags::healthy\n"
                         for _, cluster in expected.upstream_clusters))
    envoy.stub(host, expected.admin_socket)
    fleet.envoys[expected.proxy] = envoy
    if expected.unit:
        host.units[expected.unit] = FakeUnit("active", True)
        host.stub(r"systemctl show -p MainPID --value " + re.escape(expected.unit), CommandResult(0, b"4242\n", b""))
    else:
        _sidecar(fleet, managed, host, expected)


def _sidecar(fleet: Fleet, managed: ManagedHost, host: FakeHost, expected: ExpectedProxy) -> None:
    """The sidecar and its app container, as `docker container inspect` with status's format shows them."""
    bootstrap = expected.files.bootstrap  # the revision mesh.plan.build gives a sidecar
    label = bootstrap_sidecar(managed, expected.workload, SIDECAR_IMAGE, bootstrap.path, bootstrap.sha256).revision
    lines = (f"/{expected.sidecar}|{'c' * 64}|running|true|{label}|{SIDECAR_IMAGE}|301|{NETNS}\n"
             f"/{expected.workload.container}|{'a' * 64}|running|true|<no value>|app:1|300|{NETNS}\n")
    fleet.docker_inspect[managed.name] = lines
    host.stub(r"docker container inspect",
              lambda cmd, stdin: CommandResult(0, fleet.docker_inspect[managed.name].encode(), b""))
    host.units["mesh-sidecars.service"] = FakeUnit("active", True)
    host.stub(r"sidecar-rules\S* check", CommandResult(0, b"", b""))


def config_dump_of(expected: ExpectedProxy, over_ads: bool = False) -> dict[str, Any]:
    """/config_dump?include_eds as an Envoy that loaded every resource file of the proxy would answer it; over ADS,
    with the stream's versions (content hashes, not the files' version_info)."""
    listeners: dict[str, Any] = {"@type": _ADMIN_TYPES + "ListenersConfigDump", "dynamic_listeners": []}
    clusters: dict[str, Any] = {"@type": _ADMIN_TYPES + "ClustersConfigDump", "dynamic_active_clusters": []}
    routes: dict[str, Any] = {"@type": _ADMIN_TYPES + "RoutesConfigDump", "dynamic_route_configs": []}
    endpoints: dict[str, Any] = {"@type": _ADMIN_TYPES + "EndpointsConfigDump", "dynamic_endpoint_configs": []}
    secrets: dict[str, Any] = {"@type": _ADMIN_TYPES + "SecretsConfigDump", "dynamic_active_secrets": []}
    for file in expected.files.files:
        response = yaml.safe_load(file.content)
        if not isinstance(response.get("resources"), list):  # a bootstrap (envoy.yaml, envoy-ads.yaml)
            continue
        version = "ads-" + response["version_info"][:8] if over_ads else response["version_info"]
        for resource in response["resources"]:
            kind = resource["@type"].rsplit(".", 1)[-1]
            if kind == "Listener":
                listeners["version_info"] = version
            elif kind == "Cluster":
                clusters["version_info"] = version
            elif kind == "RouteConfiguration":
                routes["dynamic_route_configs"].append({"version_info": version, "route_config": resource})
            elif kind == "ClusterLoadAssignment":
                endpoints["dynamic_endpoint_configs"].append({"endpoint_config": resource})  # no version, as Envoy
            elif kind == "Secret":
                secrets["dynamic_active_secrets"].append({"name": resource["name"], "version_info": version})
    return {"configs": [listeners, clusters, routes, endpoints, secrets]}


def _leaf(ca: CertificateAuthority, host: str, proxy: str, now: datetime | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, proxy)])).sign(key, hashes.SHA256())
    issued = ca.sign(csr.public_bytes(serialization.Encoding.PEM), f"spiffe://lab.mesh/{proxy}", timedelta(hours=24),
                     host, proxy, now=now)
    return x509.load_pem_x509_certificate(issued.chain_pem)
