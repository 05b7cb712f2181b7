"""`mesh status` against a real Envoy serving a TCP service, whose authorization filters Envoy reads by ECDS
(`xds/ecds.mesh.authz.*.yaml`): the versions Envoy took come from the config dump's EcdsConfigDump, so a proxy
running its files is applied, and an ECDS file Envoy has not taken is newer than running."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mesh.hosts.connection import CommandResult, LocalConnector
from mesh.inventory.model import Connection, Health, ManagedHost, Mesh
from mesh.render import EXTENSION_CONFIG_TYPE, ProxyFiles
from mesh.status import reads
from mesh.status.batch import run_batch
from mesh.status.expected import ExpectedProxy
from mesh.status.judge import judge_proxy
from mesh.status.report import ProxyStatus
from mesh.testing.loopback import (
    RunningEnvoy,
    TwoServiceMesh,
    eventually,
    free_base_ids,
    free_port,
    issue_identities,
    lay_out_proxy,
    mesh_proxy_files,
    start_proxy,
    stop_envoys,
    two_service_mesh,
)

WAIT_S = 10.0


def tcp_mesh() -> TwoServiceMesh:
    """web -> api, api a TCP service."""
    loop = two_service_mesh(free_port())
    api = replace(loop.api, protocol="tcp", health=Health("tcp"))
    hosts = tuple(replace(host, workloads=(api,)) if host.name == api.host else host for host in loop.mesh.hosts)
    services = {**loop.mesh.services, "api": (api,)}
    return TwoServiceMesh(Mesh(loop.mesh.settings, hosts, (), services), loop.web, api)


def status(expected: ExpectedProxy, envoy: RunningEnvoy) -> ProxyStatus:
    connector = LocalConnector(Connection("127.0.0.1", local=True))
    readings = run_batch(connector, reads.proxy_commands(expected), timeout=30)
    readings[reads.key(expected, "unit")] = CommandResult(0, b"active\n", b"")
    readings[reads.key(expected, "pid")] = CommandResult(0, f"{envoy.process.pid}\n".encode(), b"")
    readings[reads.HOST_CA] = run_batch(connector, {"ca": reads.sha256(expected.ca_path)}, 30)["ca"]
    host = ManagedHost(expected.workload.host, "vm", Connection("127.0.0.1", local=True), (expected.workload,))
    return judge_proxy(host, expected, readings, None, frozenset(), {}, datetime.now(UTC))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ExpectedProxy, RunningEnvoy, ProxyFiles]]:
    loop = tcp_mesh()
    identities = issue_identities(tmp_path / "state", loop.mesh.settings.trust_domain, (loop.web, loop.api))
    files = mesh_proxy_files(loop, loop.api, tmp_path / "api")
    lay_out_proxy(files, identities["api"])
    (base_id,) = free_base_ids(1)
    envoy = start_proxy("api", files, base_id)
    folder = Path(files.proxy_dir)
    expected = ExpectedProxy(loop.api, files.proxy, files, str(folder / "tls/cert.pem"), str(folder / "ca.pem"),
                             str(envoy.admin_socket), "mesh-envoy-api.service", None, ())
    try:
        yield expected, envoy, files
    finally:
        stop_envoys([envoy])


def test_ecds_files_envoy_took_are_applied_and_a_new_one_is_newer_than_running(
        api: tuple[ExpectedProxy, RunningEnvoy, ProxyFiles]) -> None:
    expected, envoy, files = api
    ecds = [file for file in files.files if "/xds/ecds." in file.path]
    assert len(ecds) == 2, [file.path for file in files.files]  # mesh.authz.deny and mesh.authz.allow
    def applied_status() -> ProxyStatus | None:
        found = status(expected, envoy)
        return found if found.config.state == "applied" else None

    applied = eventually(applied_status, WAIT_S, "the ECDS filters loaded")
    assert applied.config.newer_than_running == ()

    path = ecds[0].path
    document = yaml.safe_load(Path(path).read_text())
    assert document["resources"][0]["@type"] == EXTENSION_CONFIG_TYPE
    document["version_info"] = "refused"
    document["resources"][0]["typed_config"]["no_such_field"] = 1  # Envoy refuses it and keeps the one it took
    staged = Path(path).with_name(".staged")
    staged.write_text(yaml.safe_dump(document))
    os.replace(staged, path)
    drifted = status(expected, envoy)
    assert [drift.what for drift in drifted.config.newer_than_running] == [
        path.removeprefix(files.proxy_dir.rstrip("/") + "/")]
