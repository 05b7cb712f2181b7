"""The health checker as controllers run it (`python -m mesh.healthcheck`, real processes) against a real
Consul 1.8.7 and local TLS stand-ins for Envoy's health chain: status changes, one leader, takeover; with ACLs
on, the token from its file, a refused token said by name (and retried), the lock scoped by the mesh id.

Tests wait with generous deadlines and assert the outcome, not the time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mesh import catalog, controller_env
from mesh.healthcheck.config import LOCK_KEY, CheckerConfig, checker_config, lock_key
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Workload
from mesh.lab import consul_acl
from mesh.testing.consul_server import ConsulDevServer
from mesh.testing.health_endpoint import HealthEndpoint, LeafFiles, TestCA

TD = "lab.mesh"
DEADLINE = 30.0


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    from mesh.lab.images import ensure_consul_binary

    binary = ensure_consul_binary()  # the real Consul: a failure to get it fails these tests, never skips
    with ConsulDevServer(binary) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LeafFiles]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return {"api": ca.issue(f"spiffe://{TD}/svc/api", "api"),
            "checker": ca.issue(f"spiffe://{TD}/mesh/health", "checker")}


@pytest.fixture
def endpoints(pki: dict[str, LeafFiles]) -> Iterator[list[HealthEndpoint]]:
    servers = [HealthEndpoint(pki["api"], TD).start() for _ in range(2)]
    yield servers
    for server in servers:
        try:
            server.stop()
        except OSError:
            pass


def local_mesh(consul_url: str, endpoints: list[HealthEndpoint]) -> Mesh:
    """Two hosts (both 127.0.0.1), one `api` instance each, on the endpoints' ports."""
    hosts = tuple(ManagedHost(f"h{n}", "vm", Connection("127.0.0.1"),
                              (Workload(f"h{n}", 0, "api", 9090, TD, proxy_port=endpoint.port),))
                  for n, endpoint in enumerate(endpoints, start=1))
    return Mesh(MeshSettings(trust_domain=TD, consul_url=consul_url), hosts)


@dataclass
class Checker:
    process: subprocess.Popen[bytes]
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wrote(self) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == "health_written"]

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=20)


@pytest.fixture
def start_checker(consul: ConsulDevServer, pki: dict[str, LeafFiles], tmp_path: Path,
                  endpoints: list[HealthEndpoint]) -> Iterator[Callable[..., Checker]]:
    started: list[Checker] = []
    mesh = local_mesh(consul.url, endpoints)
    catalog.sync(consul.url, mesh)
    files = pki["checker"]
    config = replace(checker_config(mesh), cert=str(files.cert), key=str(files.key), ca=str(files.ca),
                     interval=0.5, timeout=1.0, lock_key=f"{LOCK_KEY}-{tmp_path.name}")
    config_path = tmp_path / "checker.json"
    config_path.write_text(config.to_json())

    def start(python: str = sys.executable) -> Checker:
        log_path = tmp_path / f"checker-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([python, "-m", "mesh.healthcheck", "--config", str(config_path)],
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                       env={**os.environ, "MESH_LOG_FORMAT": "json"})
        started.append(Checker(process, log_path))
        return started[-1]

    yield start
    for checker in started:
        checker.stop(signal.SIGKILL)
    client = catalog.connect(consul.url)
    for node in ("h1", "h2"):
        client.catalog.deregister(node)


def status_of(url: catalog.Consul, service_id: str) -> tuple[str, str]:
    [health] = [h for h in catalog.service_health(url, "api") if h.service_id == service_id]
    return health.status, health.output


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {deadline:g}s: {what}")


def leader_pid(url: catalog.Consul, key: str) -> int | None:
    entry = catalog.connect(url).kv.get(key)[1]
    if not entry or not entry.get("Session"):
        return None
    return int(json.loads(base64.b64decode(entry["Value"]) if isinstance(entry["Value"], str)
                          else entry["Value"])["holder"].rsplit(":", 1)[1])


def test_passing_then_critical_on_503_and_on_a_stopped_envoy(
        consul: ConsulDevServer, endpoints: list[HealthEndpoint],
        start_checker: Callable[..., Checker]) -> None:
    checker = start_checker()
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "passing"
             and status_of(consul.url, "api-h2-9090")[0] == "passing", "both instances passing")
    endpoints[0].healthy = False
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "critical", "503 makes api-h1-9090 critical")
    assert "GET /mesh/health: 503" in status_of(consul.url, "api-h1-9090")[1]
    endpoints[1].stop()
    wait_for(lambda: status_of(consul.url, "api-h2-9090")[0] == "critical", "a stopped endpoint is critical")
    assert "refused" in status_of(consul.url, "api-h2-9090")[1]
    endpoints[0].healthy = True
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "passing", "recovery makes it passing again")
    writes = [(event["instance"], event["status"]) for event in checker.wrote()]
    assert writes == [("api-h1-9090", "passing"), ("api-h2-9090", "passing"), ("api-h1-9090", "critical"),
                      ("api-h2-9090", "critical"), ("api-h1-9090", "passing")], "only changes are written"
    checker.stop()
    assert checker.process.returncode == 0
    assert any(event.get("event") == "leadership_released" for event in checker.events())


def test_one_leader_and_a_standby_that_takes_over_after_a_crash(
        consul: ConsulDevServer, endpoints: list[HealthEndpoint], start_checker: Callable[..., Checker],
        tmp_path: Path) -> None:
    key = f"{LOCK_KEY}-{tmp_path.name}"
    first, second = start_checker(), start_checker()
    wait_for(lambda: leader_pid(consul.url, key) is not None, "someone leads")
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "passing", "the leader writes")
    time.sleep(2)  # several rounds of both
    by_pid = {first.process.pid: first, second.process.pid: second}
    pid = leader_pid(consul.url, key)
    assert pid in by_pid
    leader, standby = by_pid[pid], by_pid[next(p for p in by_pid if p != pid)]
    assert leader.wrote() and not standby.wrote(), "the standby writes nothing"

    leader.stop(signal.SIGKILL)  # no release: the session has to expire
    endpoints[0].healthy = False
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "critical", "the standby took over and writes",
             deadline=DEADLINE + 5)
    assert leader_pid(consul.url, key) == standby.process.pid
    assert standby.wrote()


def test_sigterm_releases_the_lock_for_the_standby_at_once(
        consul: ConsulDevServer, start_checker: Callable[..., Checker], tmp_path: Path) -> None:
    key = f"{LOCK_KEY}-{tmp_path.name}"
    first, second = start_checker(), start_checker()
    wait_for(lambda: leader_pid(consul.url, key) is not None, "someone leads")
    by_pid = {first.process.pid: first, second.process.pid: second}
    old = leader_pid(consul.url, key)
    assert old is not None
    by_pid[old].stop(signal.SIGTERM)
    assert by_pid[old].process.returncode == 0
    other = next(p for p in by_pid if p != old)
    wait_for(lambda: leader_pid(consul.url, key) == other, "the standby leads after a clean stop",
             deadline=10)


def test_the_controller_venv_built_from_the_wheels_runs_the_checker(
        consul: ConsulDevServer, start_checker: Callable[..., Checker], tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    wheels = controller_env.build_wheels(tmp_path_factory.getbasetemp() / "wheel-cache")
    root = tmp_path / "opt-mesh"
    (root / "wheels").mkdir(parents=True)
    for wheel in wheels:
        shutil.copy2(wheel, root / "wheels" / wheel.name)
    marker = controller_env.wheel_set_marker(wheels)
    commands = controller_env.install_commands([w.name for w in wheels], marker)
    for _ in range(2):  # the second run changes nothing
        for command in commands:
            local = command.replace(controller_env.MESH_ROOT, str(root))
            subprocess.run(["bash", "-c", local], check=True, capture_output=True, env=os.environ | {
                "PATH": f"{Path(sys.base_exec_prefix) / 'bin'}:{os.environ['PATH']}"})
    assert (root / "venv" / "mesh-wheels.marker").read_text().strip() == marker
    checker = start_checker(python=str(root / "venv" / "bin" / "python3"))
    wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "passing", "the venv's checker writes passing")
    checker.stop()
    assert checker.process.returncode == 0


def _install_leaf(home: Path, version: str, leaf: LeafFiles) -> None:
    """What a renewal does (mesh-ctl install, or a deploy): a new tls.VERSION folder, the `tls` link swapped."""
    folder = home / f"tls.{version}"
    folder.mkdir()
    shutil.copy(leaf.cert, folder / "cert.pem")
    shutil.copy(leaf.key, folder / "key.pem")
    os.symlink(folder.name, home / "tls.next")
    os.replace(home / "tls.next", home / "tls")


def test_a_certificate_renewed_behind_the_tls_link_is_used_without_a_restart(
        consul: ConsulDevServer, pki: dict[str, LeafFiles], endpoints: list[HealthEndpoint], tmp_path: Path) -> None:
    mesh = local_mesh(consul.url, endpoints)
    catalog.sync(consul.url, mesh)
    home = tmp_path / "checker-home"
    home.mkdir()
    stranger = TestCA(tmp_path / "other", "other CA").issue(f"spiffe://{TD}/mesh/health", "stranger")
    _install_leaf(home, "1", stranger)  # a leaf the instances refuse: critical
    config = replace(checker_config(mesh), cert=str(home / "tls" / "cert.pem"), key=str(home / "tls" / "key.pem"),
                     ca=str(pki["checker"].ca), interval=0.5, timeout=1.0, lock_key=f"{LOCK_KEY}-{tmp_path.name}")
    checker = launch(config, tmp_path, "renewed")
    try:
        wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "critical"
                 and "TLS" in status_of(consul.url, "api-h1-9090")[1], "the refused certificate is critical")
        _install_leaf(home, "2", pki["checker"])
        wait_for(lambda: status_of(consul.url, "api-h1-9090")[0] == "passing", "the renewed certificate passes")
        assert checker.process.poll() is None, "the checker was not restarted"
        assert [e["cert"] for e in checker.events() if e.get("event") == "checker_certificate_reloaded"] == [
            str(home / "tls.2" / "cert.pem")]
    finally:
        checker.stop(signal.SIGKILL)
        catalog.sync(consul.url, replace(mesh, hosts=()))


# ---- with ACLs on: the token from its file, refusals said by name, the lock scoped by the mesh id ----------

@pytest.fixture(scope="module")
def secure() -> Iterator[ConsulDevServer]:
    from mesh.lab.images import ensure_consul_binary

    with ConsulDevServer(ensure_consul_binary(), acl=True) as server:
        yield server


def launch(config: CheckerConfig, folder: Path, name: str) -> Checker:
    """`python -m mesh.healthcheck` with this config, logging JSON to folder/NAME.log."""
    config_path = folder / f"{name}.json"
    config_path.write_text(config.to_json())
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "mesh.healthcheck", "--config", str(config_path)],
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=folder,
                                   env={**os.environ, "MESH_LOG_FORMAT": "json"})
    return Checker(process, log_path)


@pytest.fixture
def secure_checkers(secure: ConsulDevServer, pki: dict[str, LeafFiles], tmp_path: Path,
                    endpoints: list[HealthEndpoint]) -> Iterator[Callable[..., Checker]]:
    """Starts checkers of the endpoints' mesh (h1, h2) against the ACL Consul, with a token file of its own."""
    access = catalog.ConsulAccess(secure.url, secure.mesh_token())
    mesh = local_mesh(secure.url, endpoints)
    catalog.sync(access, mesh)
    started: list[Checker] = []

    def start(mesh_id: str = TD, token: str | None = None) -> Checker:
        token_file = tmp_path / f"token-{len(started)}"
        consul_acl.write_secret(token_file, (token or secure.mesh_token()) + "\n")
        files = pki["checker"]
        config = replace(checker_config(mesh), cert=str(files.cert), key=str(files.key), ca=str(files.ca),
                         interval=0.5, timeout=1.0, lock_key=lock_key(mesh_id),
                         consul_token_file=str(token_file))
        started.append(launch(config, tmp_path, f"checker-{len(started)}"))
        return started[-1]

    yield start
    for checker in started:
        checker.stop(signal.SIGKILL)
    catalog.sync(access, replace(mesh, hosts=()))


def test_with_acls_the_checker_uses_its_token_file_and_writes(
        secure: ConsulDevServer, secure_checkers: Callable[..., Checker]) -> None:
    checker = secure_checkers()
    access = catalog.ConsulAccess(secure.url, secure.mesh_token())
    wait_for(lambda: status_of(access, "api-h1-9090")[0] == "passing"
             and status_of(access, "api-h2-9090")[0] == "passing", "both instances passing")
    assert leader_pid(access, lock_key(TD)) == checker.process.pid
    checker.stop()
    assert checker.process.returncode == 0
    assert secure.mesh_token() not in checker.log_path.read_text()


def test_a_refused_token_is_logged_by_name_and_the_checker_keeps_trying(
        secure: ConsulDevServer, secure_checkers: Callable[..., Checker]) -> None:
    wrong = "3b7ce0a4-0000-4000-8000-00000000dead"
    checker = secure_checkers(token=wrong)
    wait_for(lambda: any(e.get("event") == "consul_token_refused" for e in checker.events()),
             "the checker says Consul refused the token")
    time.sleep(3)  # several more attempts: it retries, it does not exit
    assert checker.process.poll() is None, "the checker must keep running (no silent crash loop)"
    [refused, *_] = [e for e in checker.events() if e.get("event") == "consul_token_refused"]
    assert "Consul refused the token" in refused["error"] and wrong not in checker.log_path.read_text()
    assert not checker.wrote()


def test_the_lock_is_scoped_by_the_mesh_id(secure: ConsulDevServer,
                                           secure_checkers: Callable[..., Checker]) -> None:
    access = catalog.ConsulAccess(secure.url, secure.mesh_token())
    ours, same, other = secure_checkers(TD), secure_checkers(TD), secure_checkers("team-b")
    wait_for(lambda: leader_pid(access, lock_key("team-b")) == other.process.pid, "team-b's checker leads its lock")
    wait_for(lambda: leader_pid(access, lock_key(TD)) in (ours.process.pid, same.process.pid),
             "one of lab.mesh's checkers leads lab.mesh's lock, beside team-b's")
    assert lock_key(TD) == "mesh/lab.mesh/health-checker/leader"
    assert lock_key("team-b") == "mesh/team-b/health-checker/leader"


def test_a_token_deleted_while_the_checker_leads_is_said_by_name(
        secure: ConsulDevServer, secure_checkers: Callable[..., Checker]) -> None:
    token = consul_acl.new_token()
    assert secure.master_token is not None
    consul_acl.ensure_mesh_token(secure.url, secure.master_token, token)
    checker = secure_checkers(token=token)
    wait_for(lambda: any(e.get("event") == "checker_leading" for e in checker.events()), "the checker leads")
    master = catalog.connect(catalog.ConsulAccess(secure.url, secure.master_token))
    master.acl.token.delete(consul_acl.accessor_for(token))
    wait_for(lambda: any(e.get("event") == "consul_token_refused" for e in checker.events()),
             "the checker says Consul refused the token once it is gone")
    assert checker.process.poll() is None
