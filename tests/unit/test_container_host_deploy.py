"""playbooks/deploy.yml on a fake container host: the proxies' files owned by the sidecar's uid by number
(so no two steps undo each other), configs validated in the sidecar image, a second run changing nothing, a
missing app container failing only its own workload, and a refused config leaving the running sidecar alone."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_containers import IMAGE, FakeDocker

from mesh.config import paths
from mesh.config.validate import envoy_binary
from mesh.containers.image import SIDECAR_UID
from mesh.containers.reachability import RULES_PATH, WATCHER_UNIT
from mesh.deploy.command import PLAYBOOK, _groups
from mesh.deploy.modules import registry
from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.results import PlayResult
from mesh.deploy.runner import run_playbook
from mesh.deploy.steps import register_mesh_modules
from mesh.deploy.steps.context import DeployContext, LocalFile
from mesh.hosts.connection import CommandResult
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.pki import CertificateAuthority
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.changes import certificate_reason_for
from mesh.plan.fleet import observe_fleet
from mesh.testing.fake_connector import FakeFleet, FakeHost, FakeUnit
from mesh.testing.fake_openssl import stub_openssl

OK = CommandResult(0, b"", b"")
TD = "test.mesh"
UID = str(SIDECAR_UID)


def _mesh(tmp_path: Path) -> Mesh:
    api = Workload("dock1", 0, "api", 9090, TD, container="api-v2-1", upstreams=(Upstream("db", 19102),),
                   proxy_port=21000, admin_port=19000)
    worker = Workload("dock1", 1, "worker", 8000, TD, container="worker-1", proxy_port=21001, admin_port=19001)
    db = Workload("vm2", 0, "db", 5432, TD, protocol="tcp")
    settings = MeshSettings(trust_domain=TD, consul_url="http://127.0.0.1:1", state_dir=str(tmp_path / "state"))
    hosts = (ManagedHost("dock1", "container_host", Connection("10.0.0.20"), (api, worker)),
             ManagedHost("vm2", "vm", Connection("10.0.0.12"), (db,)))
    return Mesh(settings, hosts, services={"api": (api,), "worker": (worker,), "db": (db,)})


def _numeric(owner: str) -> str:
    return {"root": "0"}.get(owner, owner)


def _fake_dock1(host: FakeHost) -> FakeDocker:
    """Stubs for what the steps send to a container host, acting on the fake host's files."""
    stub_openssl(host)

    def stat(cmd: str, stdin: bytes | None) -> CommandResult:  # by number, from the fake files
        found = host.files.get(cmd.split()[-1].strip("'").rstrip("/"))  # `DIR/tls/`: the folder the link names
        if found is None:
            return CommandResult(1, b"", b"stat: cannot stat")
        return CommandResult(0, f"{_numeric(found.owner)}:{_numeric(found.group)}:{found.mode:o}\n".encode(), b"")

    host.stub(r"command -v openssl", OK)  # the prerequisites: all present
    host.stub(r"^stat -c '%u:%g:%a'", stat)  # before FakeDocker's own stub, which answers fixed modes
    host.stub(rf"^{RULES_PATH} ", OK)
    host.units[WATCHER_UNIT] = FakeUnit()
    docker = FakeDocker(host)
    docker.add("api-v2-1", pid=500)
    docker.add("worker-1", pid=600)
    return docker


@dataclass(frozen=True)
class Setup:
    mesh: Mesh
    ca: CertificateAuthority
    envoy: LocalFile  # checks configs here (the real one)
    fleet: FakeFleet
    docker: FakeDocker
    tarball: Path  # the sidecar image (a stand-in: FakeDocker imports it by its tag)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    mesh = _mesh(tmp_path)
    ca, _ = CertificateAuthority.ensure(mesh.settings.state_dir, TD)
    fleet = FakeFleet()
    docker = _fake_dock1(fleet.host("dock1"))
    tarball = tmp_path / "image.tar.gz"
    tarball.write_bytes(b"tarball")
    return Setup(mesh, ca, LocalFile(Path(envoy_binary())), fleet, docker, tarball)


def deploy(setup: Setup) -> tuple[PlayResult, str]:
    """As `mesh deploy --limit dock1` after its preflight: the plan, dock1 observed, the playbook when it differs."""
    mesh, ca, fleet = setup.mesh, setup.ca, setup.fleet
    modules = registry.copy()
    register_mesh_modules(modules)
    dock1 = [mesh.host("dock1")]
    out = io.StringIO()
    plan = build_plan(mesh, PlanInputs(ca.root_pem, ca.root_fingerprint, envoy_sha256="0" * 64, sidecar_image=IMAGE))
    observed = observe_fleet(plan, dock1, fleet.connect, certificate_reason_for(ca, mesh.settings.cert_ttl))
    converged = [name for name, seen in observed.items() if not seen.changes]
    acting = [host for host in dock1 if host.name not in converged]
    context = DeployContext(mesh, ca, setup.envoy, plan, changes={name: seen.changes for name, seen in observed.items()})
    result = run_playbook(load_playbook(PLAYBOOK, modules), acting, fleet.connect,
                          extra_vars={"mesh_ca_pem": ca.root_pem.decode(),
                                      "mesh_sidecar_image": {"src": str(setup.tarball), "tag": IMAGE}},
                          shared=context,
                          host_vars={"dock1": {"mesh_proxies": [proxy.name for proxy in plan.host("dock1").proxies]}},
                          groups=_groups(acting), modules=modules, output=out, color=False, converged=converged)
    return result, out.getvalue()


def test_first_deploy_owns_files_by_the_sidecar_uid_and_a_second_changes_nothing(setup: Setup) -> None:
    fleet, docker = setup.fleet, setup.docker
    result, output = deploy(setup)
    assert exit_code(result) == 0, output
    host = fleet.host("dock1")
    for proxy in ("api-api-v2-1", "worker-worker-1"):
        folder = host.files[paths.proxy_dir(proxy)]
        key = host.files[paths.key_path(proxy)]
        config = host.files[paths.envoy_config_path(proxy)]
        assert (_numeric(folder.owner), folder.group, folder.mode) == ("0", UID, 0o750)
        assert (key.owner, key.group, key.mode) == (UID, UID, 0o600)
        assert (_numeric(config.owner), config.group, config.mode) == ("0", UID, 0o640)
    validations = [cmd for cmd in host.commands
                   if cmd.startswith("docker run --rm") and f"/{paths.STAGING_DIR_NAME}/validate.yaml" in cmd]
    assert len(validations) == 2 and all(f"--user {UID}:{UID}" in cmd and "--network none" in cmd
                                         for cmd in validations)
    assert not any("runuser" in cmd or f"{paths.ENVOY_BINARY} --mode" in cmd for cmd in host.commands)  # no host Envoy
    assert {"mesh-envoy-api-api-v2-1", "mesh-envoy-worker-worker-1"} <= set(docker.containers)
    ids = {name: found["id"] for name, found in docker.containers.items()}
    host.commands.clear()
    result, output = deploy(setup)
    assert exit_code(result) == 0 and result.stats["dock1"].changed == 0, output
    assert {name: found["id"] for name, found in docker.containers.items()} == ids
    assert not any(cmd.startswith(("docker run", "docker rm", "docker restart", "chown", "chmod"))
                   for cmd in host.commands)
    assert len(host.commands) == 1, "a converged container host is only observed"


def test_a_missing_app_container_fails_only_its_workload(setup: Setup) -> None:
    docker = setup.docker
    del docker.containers["worker-1"]
    result, output = deploy(setup)
    assert exit_code(result) == 2, output
    assert "the app container 'worker-1' does not exist on dock1" in output
    assert "mesh-envoy-api-api-v2-1" in docker.containers and "mesh-envoy-worker-worker-1" not in docker.containers
    assert re.search(r"ok: \[dock1\] => \(item=api-api-v2-1\)|changed: \[dock1\] => \(item=api-api-v2-1\)", output)


def test_a_config_the_sidecar_image_refuses_keeps_the_running_sidecar(setup: Setup) -> None:
    fleet, docker = setup.fleet, setup.docker
    result, output = deploy(setup)
    assert exit_code(result) == 0, output
    host = fleet.host("dock1")
    running = docker.containers["mesh-envoy-api-api-v2-1"]["id"]
    old = host.files[paths.envoy_config_path("api-api-v2-1")].data
    host.write(paths.envoy_config_path("api-api-v2-1"), b"# an older config", 0o640, "root", UID)
    docker.validate_ok = False
    result, output = deploy(setup)
    assert exit_code(result) == 2, output
    assert "proxy api-api-v2-1: Envoy on dock1 refused the new files (the running ones are kept)" in output
    assert host.files[paths.envoy_config_path("api-api-v2-1")].data == b"# an older config" != old
    assert docker.containers["mesh-envoy-api-api-v2-1"]["id"] == running
    assert not any(f"/{paths.STAGING_DIR_NAME}" in path for path in host.files)  # the refused files removed


def test_an_app_container_that_publishes_ports_fails_only_its_workload(setup: Setup) -> None:
    docker = setup.docker
    docker.add("worker-1", pid=600, bindings={"8000/tcp": [{"HostIp": "", "HostPort": "8000"}]},
               ports={"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8000"}]})
    worker = docker.containers["worker-1"]
    result, output = deploy(setup)
    assert exit_code(result) == 2, output
    assert re.search(r"failed: \[dock1\] \(item=worker-worker-1\) => .*the app container 'worker-1' on dock1 publishes "
                     r"port\(s\) 8000/tcp -> 0\.0\.0\.0:8000", output), output
    assert "mesh-envoy-api-api-v2-1" in docker.containers and "mesh-envoy-worker-worker-1" not in docker.containers
    assert docker.containers["worker-1"] == worker  # the app container itself is left as it is
    assert re.search(r"ok: \[dock1\] => \(item=api-api-v2-1\)|changed: \[dock1\] => \(item=api-api-v2-1\)", output)
    assert result.stats["dock1"].failed == 1
