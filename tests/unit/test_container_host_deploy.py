"""playbooks/deploy.yml on a fake container host: the proxies' files owned by the sidecar's uid by number
(so no two steps undo each other), configs validated in the sidecar image, a second run changing nothing, a
missing app container failing only its own workload, and a refused config leaving the running sidecar alone."""

from __future__ import annotations

import io
import re
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
        found = host.files.get(cmd.split()[-1].strip("'"))
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


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Mesh, DeployContext, FakeFleet, FakeDocker, Path]:
    mesh = _mesh(tmp_path)
    ca, _ = CertificateAuthority.ensure(mesh.settings.state_dir, TD)
    binary = tmp_path / "envoy"
    binary.write_bytes(b"not really envoy")
    context = DeployContext(mesh, ca, LocalFile(binary), local_envoy=envoy_binary())
    fleet = FakeFleet()
    docker = _fake_dock1(fleet.host("dock1"))
    tarball = tmp_path / "image.tar.gz"
    tarball.write_bytes(b"tarball")
    return mesh, context, fleet, docker, tarball


def deploy(setup: tuple[Mesh, DeployContext, FakeFleet, FakeDocker, Path]) -> tuple[PlayResult, str]:
    mesh, context, fleet, _docker, tarball = setup
    modules = registry.copy()
    register_mesh_modules(modules)
    dock1 = [mesh.host("dock1")]
    out = io.StringIO()
    context = DeployContext(context.mesh, context.ca, context.envoy, local_envoy=context.local_envoy)
    result = run_playbook(load_playbook(PLAYBOOK, modules), dock1, fleet.connect,
                          extra_vars={"mesh_ca_pem": context.ca.root_pem.decode(),
                                      "mesh_sidecar_image": {"src": str(tarball), "tag": IMAGE}},
                          shared=context, host_vars={"dock1": {"mesh_proxies": ["api-0", "worker-1"]}},
                          groups=_groups(dock1), modules=modules, output=out, color=False)
    return result, out.getvalue()


def test_first_deploy_owns_files_by_the_sidecar_uid_and_a_second_changes_nothing(setup: tuple[
        Mesh, DeployContext, FakeFleet, FakeDocker, Path]) -> None:
    _, _, fleet, docker, _ = setup
    result, output = deploy(setup)
    assert exit_code(result) == 0, output
    host = fleet.host("dock1")
    for proxy in ("api-0", "worker-1"):
        folder = host.files[paths.proxy_dir(proxy)]
        key = host.files[paths.key_path(proxy)]
        config = host.files[paths.envoy_config_path(proxy)]
        assert (_numeric(folder.owner), folder.group, folder.mode) == ("0", UID, 0o750)
        assert (key.owner, key.group, key.mode) == (UID, UID, 0o600)
        assert (_numeric(config.owner), config.group, config.mode) == ("0", UID, 0o640)
    validations = [cmd for cmd in host.commands if cmd.startswith("docker run --rm") and ".envoy.new.yaml" in cmd]
    assert len(validations) == 2 and all(f"--user {UID}:{UID}" in cmd and "--network none" in cmd
                                         for cmd in validations)
    assert not any("runuser" in cmd or "/usr/local/lib/mesh/envoy" in cmd for cmd in host.commands)
    assert {"mesh-envoy-api-0", "mesh-envoy-worker-1"} <= set(docker.containers)
    ids = {name: found["id"] for name, found in docker.containers.items()}
    host.commands.clear()
    result, output = deploy(setup)
    assert exit_code(result) == 0 and result.stats["dock1"].changed == 0, output
    assert {name: found["id"] for name, found in docker.containers.items()} == ids
    assert not any(cmd.startswith(("docker run", "docker rm", "docker restart", "chown", "chmod"))
                   for cmd in host.commands)


def test_a_missing_app_container_fails_only_its_workload(setup: tuple[
        Mesh, DeployContext, FakeFleet, FakeDocker, Path]) -> None:
    docker = setup[3]
    del docker.containers["worker-1"]
    result, output = deploy(setup)
    assert exit_code(result) == 2, output
    assert "the app container 'worker-1' does not exist on dock1" in output
    assert "mesh-envoy-api-0" in docker.containers and "mesh-envoy-worker-1" not in docker.containers
    assert re.search(r"ok: \[dock1\] => \(item=api-0\)|changed: \[dock1\] => \(item=api-0\)", output)


def test_a_config_the_sidecar_image_refuses_keeps_the_running_sidecar(setup: tuple[
        Mesh, DeployContext, FakeFleet, FakeDocker, Path]) -> None:
    _, _, fleet, docker, _ = setup
    result, output = deploy(setup)
    assert exit_code(result) == 0, output
    host = fleet.host("dock1")
    running = docker.containers["mesh-envoy-api-0"]["id"]
    old = host.files[paths.envoy_config_path("api-0")].data
    host.write(paths.envoy_config_path("api-0"), b"# an older config", 0o640, "root", UID)
    docker.validate_ok = False
    result, output = deploy(setup)
    assert exit_code(result) == 2 and "refused the new config (the running config is kept)" in output, output
    assert host.files[paths.envoy_config_path("api-0")].data == b"# an older config" != old
    assert docker.containers["mesh-envoy-api-0"]["id"] == running
    assert paths.proxy_dir("api-0") + "/.envoy.new.yaml" not in host.files


def test_an_app_container_that_publishes_ports_fails_only_its_workload(setup: tuple[
        Mesh, DeployContext, FakeFleet, FakeDocker, Path]) -> None:
    docker = setup[3]
    docker.add("worker-1", pid=600, bindings={"8000/tcp": [{"HostIp": "", "HostPort": "8000"}]},
               ports={"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8000"}]})
    worker = docker.containers["worker-1"]
    result, output = deploy(setup)
    assert exit_code(result) == 2, output
    assert re.search(r"failed: \[dock1\] \(item=worker-1\) => .*the app container 'worker-1' on dock1 publishes "
                     r"port\(s\) 8000/tcp -> 0\.0\.0\.0:8000", output), output
    assert "mesh-envoy-api-0" in docker.containers and "mesh-envoy-worker-1" not in docker.containers
    assert docker.containers["worker-1"] == worker  # the app container itself is left as it is
    assert re.search(r"ok: \[dock1\] => \(item=api-0\)|changed: \[dock1\] => \(item=api-0\)", output)
    assert result.stats["dock1"].failed == 1
