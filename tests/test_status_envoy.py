"""`mesh status`'s reads and judgement against a real Envoy on this machine (no lab): a proxy folder laid out as a
deploy leaves it (mesh.testing.loopback), read with the same batched commands status sends over SSH (here through
the local connector), judged: the files applied and running; a bootstrap whose hash Envoy did not start with (a
restart owed); a cluster file Envoy refused (it keeps the last it took); a changed endpoint file Envoy took (no
drift: endpoints, whose dump carries no version, are compared by address); a new certificate, served once Envoy
reloaded it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mesh.config.compute import upstream_cluster_name
from mesh.hosts.connection import CommandResult, LocalConnector
from mesh.inventory.model import Connection, ManagedHost
from mesh.pki.leaf import load_chain
from mesh.render import ENDPOINT_TYPE, ProxyFiles
from mesh.status import reads
from mesh.status.batch import run_batch
from mesh.status.expected import ExpectedProxy
from mesh.status.judge import judge_proxy
from mesh.status.report import ProxyStatus
from mesh.status.running import loaded_versions
from mesh.testing.loopback import (
    Identity,
    RunningEnvoy,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    mesh_proxy_files,
    start_proxy,
    stop_envoys,
    swap_tls,
    two_service_mesh,
)

WAIT_S = 10.0


@dataclass
class Proxy:
    expected: ExpectedProxy
    envoy: RunningEnvoy
    identities: dict[str, Identity]
    folder: Path

    def status(self) -> ProxyStatus:
        """What `mesh status` says of this proxy: its reads in one batch through the local connector, as over SSH;
        the unit (this Envoy is no unit) and the host's /etc/mesh/ca.pem answered as on a host."""
        connector = LocalConnector(Connection("127.0.0.1", local=True))
        readings = run_batch(connector, reads.proxy_commands(self.expected), timeout=30)
        readings[reads.key(self.expected, "unit")] = CommandResult(0, b"active\n", b"")
        readings[reads.key(self.expected, "pid")] = CommandResult(0, f"{self.envoy.process.pid}\n".encode(), b"")
        readings[reads.HOST_CA] = run_batch(connector, {"ca": reads.sha256(self.expected.ca_path)}, 30)["ca"]
        host = ManagedHost(self.expected.workload.host, "vm", Connection("127.0.0.1", local=True),
                           (self.expected.workload,))
        return judge_proxy(host, self.expected, readings, None, frozenset(), {}, datetime.now(UTC))


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Proxy]:
    loop = two_service_mesh(free_port())
    identities = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web, loop.api))
    files = mesh_proxy_files(loop, loop.web, tmp_path / "web")
    lay_out_proxy(files, identities["web"])
    (base_id,) = free_base_ids(1)
    envoy = start_proxy("web", files, base_id)
    folder = Path(files.proxy_dir)
    expected = ExpectedProxy(loop.web, files.proxy, files, str(folder / "tls/cert.pem"), str(folder / "ca.pem"),
                             str(envoy.admin_socket), "mesh-envoy-web.service", None,
                             tuple((item.service, upstream_cluster_name(item.service)) for item in loop.web.upstreams))
    try:
        yield Proxy(expected, envoy, identities, folder)
    finally:
        stop_envoys([envoy])


def _replace(path: str, text: str) -> None:
    temp = Path(path).with_name(f".{Path(path).name}.new")
    temp.write_text(text)
    os.replace(temp, path)


def _file(files: ProxyFiles, name: str) -> str:
    return next(file.path for file in files.files if file.path.endswith(f"/{name}"))


def test_an_envoy_running_its_files_is_applied(web: Proxy) -> None:
    status = web.status()
    assert status.config.state == "applied" and status.config.running_compared, status.problems
    assert status.config.differing_files == () and status.config.newer_than_running == ()
    assert (status.envoy.version or "").startswith("1.")
    serial = format(load_chain(web.identities["web"].chain)[0].serial_number, "x")
    assert (status.certificate.serial, status.certificate.served_serials) == (serial, (serial,))
    assert [problem for problem in status.problems if "no healthy instance" not in problem] == []  # api is down


def test_a_bootstrap_envoy_did_not_start_with_owes_a_restart(web: Proxy) -> None:
    bootstrap = web.expected.files.bootstrap
    _replace(bootstrap.path, bootstrap.content.replace(web.expected.files.bootstrap_sha256, "e" * 64))
    status = web.status()
    assert [(d.what, d.running, d.on_disk, d.owed) for d in status.config.newer_than_running] == [
        ("bootstrap", web.expected.files.bootstrap_sha256, "e" * 64, "restart")]


def test_a_cluster_file_envoy_refused_is_newer_than_running(web: Proxy) -> None:
    cds = _file(web.expected.files, "cds.yaml")
    running = yaml.safe_load(Path(cds).read_text())["version_info"]
    broken = yaml.safe_load(Path(cds).read_text())
    broken["version_info"] = "refused-version"
    broken["resources"][0]["no_such_field"] = 1  # Envoy refuses an unknown field and keeps what it runs
    _replace(cds, yaml.safe_dump(broken))
    log = web.folder / "envoy.log"
    eventually(lambda: "no_such_field" in log.read_text(errors="replace"), WAIT_S, "Envoy refused cds.yaml", log)
    status = web.status()
    assert [(d.what, d.running, d.on_disk, d.owed) for d in status.config.newer_than_running] == [
        ("xds/cds.yaml", running, "refused-version", "reload")]
    assert status.config.state == "differs"  # and the file is not the inventory's
    assert status.envoy.running


def test_endpoints_envoy_took_are_compared_by_address(web: Proxy) -> None:
    cluster = upstream_cluster_name("api")
    eds = _file(web.expected.files, f"eds.{cluster}.yaml")
    moved = yaml.safe_load(Path(eds).read_text())
    address = moved["resources"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    address["port_value"] = port = free_port()
    moved["version_info"] = "moved"
    _replace(eds, yaml.safe_dump(moved))

    def loaded() -> str:
        return loaded_versions(json.loads(web.envoy.admin("/config_dump?include_eds")))[(ENDPOINT_TYPE, cluster)]

    assert eventually(lambda: loaded().endswith(f":{port}"), WAIT_S, "Envoy took the new endpoints")
    status = web.status()
    assert status.config.newer_than_running == ()
    assert [item.path for item in status.config.differing_files] == [eds]  # not the inventory's, but running


def test_a_new_certificate_is_newer_than_running_until_envoy_serves_it(web: Proxy, tmp_path: Path) -> None:
    renewed = issue_identities(tmp_path / "state", "loop.mesh", (web.expected.workload,))["web"]
    swap_tls(web.folder, replace(renewed, root=web.identities["web"].root), "2")
    serial = format(load_chain(renewed.chain)[0].serial_number, "x")

    def served() -> ProxyStatus | None:
        seen = web.status()
        return seen if seen.certificate.served_serials == (serial,) else None

    status = eventually(served, WAIT_S, "Envoy serves the new certificate")
    assert status.certificate.serial == serial and status.config.newer_than_running == ()
