"""playbooks/deploy.yml with the mesh.* modules on fake VMs: keys made on the host, certificates signed here,
configs validated on the host before they replace the old ones, exactly the changed proxies restarted, a second
run changing nothing, and a missing prerequisite or a refused config failing only that host."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh.config import paths
from mesh.config.validate import envoy_binary
from mesh.deploy.command import PLAYBOOK, _groups
from mesh.deploy.modules import registry
from mesh.deploy.modules.builtin import staged_path
from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.results import PlayResult
from mesh.deploy.runner import run_playbook
from mesh.deploy.steps import gate, register_mesh_modules
from mesh.deploy.steps.context import DeployContext, LocalFile
from mesh.hosts.connection import CommandResult
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.pki import CertificateAuthority, leaf_info
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.changes import certificate_reason_for
from mesh.plan.fleet import observe_fleet
from mesh.testing.fake_connector import FakeFleet, FakeHost
from mesh.testing.fake_openssl import stub_openssl

OK = CommandResult(0, b"", b"")
TD = "test.mesh"


def _mesh(tmp_path: Path) -> Mesh:
    def host(name: str, address: str, *workloads: Workload) -> ManagedHost:
        return ManagedHost(name, "vm", Connection(address), workloads)

    web = Workload("vm1", 0, "web", 8080, TD, upstreams=(Upstream("api", 19101),))
    api = Workload("vm2", 0, "api", 9090, TD, proxy_port=21000, admin_port=19000)
    db = Workload("vm2", 1, "db", 5432, TD, protocol="tcp", proxy_port=21001, admin_port=19001)
    settings = MeshSettings(trust_domain=TD, consul_url="http://127.0.0.1:1", state_dir=str(tmp_path / "state"))
    return Mesh(settings, (host("vm1", "10.0.0.11", web), host("vm2", "10.0.0.12", api, db)),
                services={"web": (web,), "api": (api,), "db": (db,)})


def _fake_vm(host: FakeHost, missing: str = "") -> None:
    """Stubs for the commands the fake host does not model itself (mesh.testing.fake_connector): openssl, the
    prerequisites, Envoy's and systemd's checks of staged files."""
    stub_openssl(host)
    host.stub(r"command -v openssl", CommandResult(0, missing.encode(), b""))
    host.stub(r"^runuser -u mesh-\S+ -- /usr/local/lib/mesh/envoy --mode validate", OK)
    host.stub(r"systemd-analyze verify", OK)
    host.write(paths.NFT_BINARY, b"", 0o755)


@dataclass(frozen=True)
class Setup:
    mesh: Mesh
    ca: CertificateAuthority
    envoy: LocalFile  # the Envoy sent to hosts and checking configs here (the real one)
    fleet: FakeFleet


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> LocalFile:
    return LocalFile(Path(envoy_binary()), tmp_path_factory.mktemp("envoy-gzip"))  # gzip'd once for the module


@pytest.fixture
def setup(tmp_path: Path, envoy: LocalFile) -> Setup:
    mesh = _mesh(tmp_path)
    ca, _ = CertificateAuthority.ensure(mesh.settings.state_dir, TD)
    fleet = FakeFleet()
    for name in ("vm1", "vm2"):
        _fake_vm(fleet.host(name))
    return Setup(mesh, ca, envoy, fleet)


def deploy(setup: Setup) -> tuple[PlayResult, str]:
    """As `mesh deploy` after its preflight: the plan, every host observed, the playbook on the hosts whose
    observation differs from the plan (the others are converged: not touched)."""
    mesh, ca, fleet = setup.mesh, setup.ca, setup.fleet
    modules = registry.copy()
    register_mesh_modules(modules)
    out = io.StringIO()
    plan = build_plan(mesh, PlanInputs(ca.root_pem, ca.root_fingerprint, envoy_sha256=setup.envoy.sha256))
    observed = observe_fleet(plan, list(mesh.hosts), fleet.connect, certificate_reason_for(ca, mesh.settings.cert_ttl))
    converged = [name for name, seen in observed.items() if not seen.changes]
    acting = [host for host in mesh.hosts if host.name not in converged]
    context = DeployContext(mesh, ca, setup.envoy, plan, changes={name: seen.changes for name, seen in observed.items()})
    host_vars = {host.name: {"mesh_proxies": [proxy.name for proxy in plan.host(host.name).proxies],
                             "mesh_proxy_users": [proxy.user for proxy in plan.host(host.name).proxies]}
                 for host in mesh.hosts}
    result = run_playbook(load_playbook(PLAYBOOK, modules), acting, fleet.connect,
                          extra_vars={"mesh_ca_pem": ca.root_pem.decode()}, shared=context,
                          host_vars=host_vars, groups=_groups(acting), modules=modules, output=out,
                          color=False, converged=converged)
    return result, out.getvalue()


def restarts(host: FakeHost) -> list[str]:
    return [cmd for cmd in host.commands if cmd.startswith("systemctl restart")]


def test_first_deploy_makes_keys_on_the_host_and_a_second_changes_nothing(setup: Setup) -> None:
    fleet = setup.fleet
    result, out = deploy(setup)
    assert exit_code(result) == 0, out
    vm2 = fleet.host("vm2")
    key = vm2.files[paths.key_path("api-9090")]
    assert (key.mode, key.owner) == (0o600, paths.envoy_user("api-9090"))
    assert paths.key_path("api-9090") not in vm2.puts  # made on the host, never sent
    chain = vm2.files[paths.cert_path("api-9090")].data
    assert chain is not None and leaf_info(chain).spiffe_id == f"spiffe://{TD}/svc/api"
    assert chain.count(b"BEGIN CERTIFICATE") == 2  # leaf + intermediate
    config = vm2.files[paths.envoy_config_path("db-5432")]
    assert (config.mode, config.group) == (0o640, "mesh-db-5432")
    binary = vm2.files[paths.ENVOY_BINARY].data
    assert binary is not None and hashlib.sha256(binary).hexdigest() == setup.envoy.sha256  # sent gzip'd, unpacked
    unit = vm2.units["mesh-envoy-db-5432.service"]
    assert unit.active == "active" and unit.enabled
    assert b"tcp dport { 5432, 9090 } drop" in (vm2.files[paths.FIREWALL_PATH].data or b"")
    admin = vm2.files[paths.admin_dir("api-9090")]
    assert (admin.data, admin.mode, admin.owner, admin.group) == (None, 0o700, "mesh-api-9090", "mesh-api-9090")
    # Each unit and the ruleset were checked by its own tool, staged, before the rename that installed it.
    for dest, check in ((paths.envoy_unit_path("db-5432"), "systemd-analyze verify --man=no "),
                        ("/etc/systemd/system/mesh-firewall.service", "systemd-analyze verify --man=no "),
                        (paths.FIREWALL_PATH, "/usr/sbin/nft -c -f ")):
        staged = staged_path(dest)
        checked = next(i for i, cmd in enumerate(vm2.commands) if f"{check}{staged}" in cmd)
        moved = vm2.commands.index(f"mv -f -- {staged} {dest}")
        assert vm2.puts.index(staged) >= 0 and checked < moved and dest not in vm2.puts
        assert staged not in vm2.files
    for host in fleet.hosts.values():
        host.commands.clear()
        host.puts.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 0 and all(stats.changed == 0 for stats in result.stats.values()), out
    assert all(not host.puts and not restarts(host) for host in fleet.hosts.values())
    assert all(len(host.commands) == 1 for host in fleet.hosts.values()), "a converged host is only observed"


def test_only_the_proxies_whose_files_changed_restart(setup: Setup) -> None:
    fleet = setup.fleet
    deploy(setup)
    vm2 = fleet.host("vm2")
    for host in fleet.hosts.values():
        host.commands.clear()
    vm2.write(paths.envoy_config_path("db-5432"), "edited by hand", 0o640, "root", "mesh-db-5432")
    result, out = deploy(setup)
    assert exit_code(result) == 0, out
    assert restarts(vm2) == ["systemctl restart mesh-envoy-db-5432.service"]
    assert not restarts(fleet.host("vm1"))


def test_certificates_are_renewed_when_foreign_or_past_half_life(setup: Setup) -> None:
    fleet = setup.fleet
    deploy(setup)
    vm1 = fleet.host("vm1")
    old = vm1.files[paths.cert_path("web-8080")].data
    assert old is not None
    # Another SPIFFE id for the same key: renewed.
    csr = vm1.stubs[[p.pattern for p, _ in vm1.stubs].index("^openssl req -new")][1]
    request = csr(f"openssl req -new -key {paths.key_path('web-8080')}", None).stdout  # type: ignore[operator]
    other = setup.ca.sign(request, f"spiffe://{TD}/svc/other", timedelta(hours=24), "vm1", "web-8080")
    vm1.write(paths.cert_path("web-8080"), other.chain_pem)
    deploy(setup)
    renewed = vm1.files[paths.cert_path("web-8080")].data
    assert renewed is not None and leaf_info(renewed).spiffe_id == f"spiffe://{TD}/svc/web"
    # Past half its lifetime: renewed.
    aged = setup.ca.sign(request, f"spiffe://{TD}/svc/web", timedelta(hours=24), "vm1", "web-8080",
                         now=datetime.now(UTC) - timedelta(hours=13))
    vm1.write(paths.cert_path("web-8080"), aged.chain_pem)
    vm1.commands.clear()
    deploy(setup)
    fresh = vm1.files[paths.cert_path("web-8080")].data
    assert fresh is not None and leaf_info(fresh).not_after > aged.not_after
    assert not restarts(vm1)  # Envoy reloads its certificate (SDS from files): no restart
    # in a new folder with a copy of its key, made current by renaming the `tls` link in the folder Envoy watches
    assert any(cmd.startswith("cp -p ") for cmd in vm1.commands) and any(cmd.startswith("ln -sfn ")
                                                                          for cmd in vm1.commands)
    # Valid for longer than mesh_cert_ttl now allows (the ttl was shortened): renewed at once.
    long_lived = setup.ca.sign(request, f"spiffe://{TD}/svc/web", timedelta(days=30), "vm1", "web-8080")
    vm1.write(paths.cert_path("web-8080"), long_lived.chain_pem)
    deploy(setup)
    shortened = vm1.files[paths.cert_path("web-8080")].data
    assert shortened is not None and leaf_info(shortened).not_after < long_lived.not_after - timedelta(days=28)


def test_a_config_envoy_refuses_fails_that_host_and_keeps_the_old_one(setup: Setup) -> None:
    fleet = setup.fleet
    deploy(setup)
    vm2 = fleet.host("vm2")
    vm2.write(paths.envoy_config_path("api-9090"), "the old config", 0o640, "root", "mesh-api-9090")
    vm2.stubs.insert(0, (re.compile(r"--mode validate"), CommandResult(
        1, b"", b"[critical][main] error initializing configuration: Invalid path: /nope")))
    vm2.commands.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 2 and result.failed_hosts == ["vm2"]
    assert "proxy api-9090: Envoy on vm2 refused the new files (the running ones are kept)" in out
    assert "Invalid path: /nope" in out
    assert vm2.files[paths.envoy_config_path("api-9090")].data == b"the old config"
    assert not any(f"/{paths.STAGING_DIR_NAME}" in path for path in vm2.files)  # the refused files removed
    assert not restarts(vm2)


def test_missing_prerequisites_fail_the_host_before_any_change(setup: Setup) -> None:
    fleet = setup.fleet
    vm1 = FakeHost("vm1")
    _fake_vm(vm1, missing="openssl\nnft or iptables\n")
    fleet.hosts["vm1"] = vm1
    result, out = deploy(setup)
    assert exit_code(result) == 2 and result.failed_hosts == ["vm1"]
    assert "missing prerequisites on vm1: openssl, nft or iptables" in out
    # Only reads ran: the observation of the host (before any host is acted on), then the prerequisites' check.
    assert vm1.puts == [] and len(vm1.commands) == 2 and vm1.commands[0].startswith("PATH=")
    assert "command -v openssl" in vm1.commands[1]
    assert fleet.host("vm2").files[paths.envoy_config_path("api-9090")].data  # the other host is deployed


def test_a_new_key_and_its_certificate_are_swapped_in_together(setup: Setup) -> None:
    """The new key and certificate go into a new folder and one rename of the `tls` link makes them current:
    nothing Envoy reads changes between the key and its certificate."""
    fleet = setup.fleet
    deploy(setup)
    vm1 = fleet.host("vm1")
    first = vm1.files[paths.cert_path("web-8080")].data
    del vm1.files[paths.key_path("web-8080")]  # a lost key: a new one is made
    vm1.commands.clear()
    vm1.puts.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 0, out
    keygen = next(i for i, cmd in enumerate(vm1.commands) if "openssl genpkey" in cmd)
    version = re.search(r'mv -f "\$t" (\S+)/key\.pem$', vm1.commands[keygen])
    assert version is not None and version.group(1).startswith(f"{paths.proxy_dir('web-8080')}/tls.")
    assert vm1.puts == [f"{version.group(1)}/cert.pem"]  # the certificate beside its key, not behind the link
    swap = next(i for i, cmd in enumerate(vm1.commands) if cmd.startswith("ln -sfn "))
    assert keygen < swap and "mv -fT" in vm1.commands[swap]
    assert vm1.commands[swap].split()[2] == version.group(1).rsplit("/", 1)[1]  # a relative link (sidecars)
    assert not any("systemctl restart" in cmd for cmd in vm1.commands[:swap])
    key, cert = vm1.files[paths.key_path("web-8080")], vm1.files[paths.cert_path("web-8080")]
    assert (key.mode, key.owner) == (0o600, paths.envoy_user("web-8080")) and cert.data != first
    assert not restarts(vm1)  # Envoy reads the new pair through the link (SDS from files): no restart


def test_a_ruleset_nft_refuses_fails_the_host_and_keeps_the_old_one(setup: Setup) -> None:
    fleet = setup.fleet
    deploy(setup)
    vm2 = fleet.host("vm2")
    vm2.write(paths.FIREWALL_PATH, "the old ruleset", 0o644)
    vm2.stubs.insert(0, (re.compile(r"^/usr/sbin/nft -c -f "), CommandResult(
        1, b"", b"/etc/mesh/.mesh-staged/firewall.nft:9:3-6: Error: syntax error, unexpected junk")))
    vm2.commands.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 2 and result.failed_hosts == ["vm2"]
    assert "nft on vm2 refused the new /etc/mesh/firewall.nft (the old one is kept)" in out
    assert "syntax error, unexpected junk" in out
    assert vm2.files[paths.FIREWALL_PATH].data == b"the old ruleset"
    assert staged_path(paths.FIREWALL_PATH) not in vm2.files
    assert not any(cmd == f"/usr/sbin/nft -f {paths.FIREWALL_PATH}" for cmd in vm2.commands)


def test_a_unit_systemd_refuses_fails_the_host_and_keeps_the_old_one(setup: Setup) -> None:
    fleet = setup.fleet
    deploy(setup)
    vm1 = fleet.host("vm1")
    unit = paths.envoy_unit_path("web-8080")
    vm1.write(unit, "the old unit", 0o644)
    vm1.stubs.insert(0, (re.compile(r"systemd-analyze verify"), CommandResult(
        1, b"", b"mesh-envoy-web-8080.service: Command /usr/local/lib/mesh/envoy is not executable")))
    vm1.commands.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 2 and result.failed_hosts == ["vm1"]
    assert "systemd-analyze on vm1 refused the new unit (the old one is kept)" in out
    assert "is not executable" in out
    assert vm1.files[unit].data == b"the old unit" and staged_path(unit) not in vm1.files
    assert not restarts(vm1) and "systemctl daemon-reload" not in vm1.commands


def test_a_restart_envoy_still_owes_is_found_from_what_it_runs(setup: Setup) -> None:
    """A failed run may leave new files under an Envoy that runs the old bootstrap: the next deploy sees it in
    /server_info (node.metadata) and restarts exactly that proxy."""
    deploy(setup)
    vm1, vm2 = setup.fleet.host("vm1"), setup.fleet.host("vm2")
    planned = vm1.running["web-8080"]
    vm1.running["web-8080"] = "0" * 64  # Envoy still runs an older bootstrap
    for host in (vm1, vm2):
        host.commands.clear()
    result, out = deploy(setup)
    assert exit_code(result) == 0, out
    assert restarts(vm1) == ["systemctl restart mesh-envoy-web-8080.service"] and vm1.running["web-8080"] == planned
    assert vm2.commands == vm2.commands[:1]  # vm2 was converged: only observed


def test_a_workload_that_left_the_inventory_leaves_nothing_behind(setup: Setup) -> None:
    deploy(setup)
    vm2 = setup.fleet.host("vm2")
    assert paths.envoy_user("db-5432") in vm2.users
    api = setup.mesh.host("vm2").workloads[0]
    hosts = tuple(replace(host, workloads=(api,)) if host.name == "vm2" else host for host in setup.mesh.hosts)
    services = {name: tuple(w for w in found if w.service != "db") for name, found in setup.mesh.services.items()}
    result, out = deploy(replace(setup, mesh=replace(setup.mesh, hosts=hosts, services=services)))
    assert exit_code(result) == 0, out
    assert not [path for path in vm2.files if "db-5432" in path]  # folder, files, unit
    assert vm2.units["mesh-envoy-db-5432.service"].active == "inactive"  # stopped before its files went
    assert paths.envoy_user("db-5432") not in vm2.users and paths.envoy_user("api-9090") in vm2.users
    assert "db-5432" not in vm2.running
    assert vm2.files[paths.envoy_config_path("api-9090")].data


def _with_web_upstreams(mesh: Mesh, *upstreams: Upstream) -> Mesh:
    web = replace(mesh.host("vm1").workloads[0], upstreams=upstreams)
    hosts = tuple(replace(host, workloads=(web,)) if host.name == "vm1" else host for host in mesh.hosts)
    return replace(mesh, hosts=hosts, services={**mesh.services, "web": (web,)})


def test_a_change_that_fails_the_health_gate_is_rolled_back_without_a_restart(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "GATE_WAIT_S", 0.0)
    deploy(setup)
    vm1 = setup.fleet.host("vm1")
    folder = paths.proxy_dir("web-8080") + "/"
    before = {path: found.data for path, found in vm1.files.items() if path.startswith(folder)}
    running = vm1.running["web-8080"]
    # After the change Envoy answers without its listeners (one it could not bind, say).
    vm1.stub(r'^echo "READY', CommandResult(0, f"READY LIVE\nBOOT {running}\n".encode(), b""))
    vm1.commands.clear()
    vm1.puts.clear()
    vm2_puts = len(setup.fleet.host("vm2").puts)
    changed = replace(setup, mesh=_with_web_upstreams(setup.mesh, Upstream("api", 19101), Upstream("db", 19102)))
    result, out = deploy(changed)
    assert exit_code(result) == 2 and result.failed_hosts == ["vm1"], out
    assert "health gate failed on vm1 (web-8080: listeners not up: " in out
    assert "the previous files of web-8080 were restored" in out
    staged = f"{paths.proxy_staging_dir('web-8080')}/xds/eds.upstream-db.yaml"
    assert staged in vm1.puts  # the change was made (a new cluster's endpoints), then undone
    assert {path: found.data for path, found in vm1.files.items() if path.startswith(folder)} == before
    assert not restarts(vm1) and vm1.running["web-8080"] == running  # Envoy reloaded the files it had: no restart
    # vm2 changed db's ALLOW filter file alone (web now declares db as an upstream: the default lets it call db)
    assert "PLAY RECAP" in out and result.stats["vm2"].changed == 1
    assert [path.rsplit("/", 1)[-1] for path in setup.fleet.host("vm2").puts[vm2_puts:] if "/xds/" in path] == [
        "ecds.mesh.authz.allow.yaml"]
