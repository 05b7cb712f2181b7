"""The health checker without Consul: config parsing, the write rules, the probe against a local TLS stand-in
for Envoy's health chain, the import closure controllers rely on, and the controller environment's pure parts.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_samples import make_mesh

from mesh import controller_env
from mesh.healthcheck.checker import HealthChecker
from mesh.healthcheck.config import (
    CheckerConfig,
    CheckerConfigError,
    Instance,
    checker_config,
    load_config,
    parse_config,
)
from mesh.healthcheck.probe import ProbeResult, client_context, probe
from mesh.testing.health_endpoint import HealthEndpoint, LeafFiles, TestCA, closed_port

TD = "lab.mesh"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def config_data(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "consul_url": "http://127.0.0.1:8500", "trust_domain": TD, "cert": "/c.pem", "key": "/k.pem",
        "ca": "/ca.pem", "interval": 2,
        "instances": [{"id": "api-vm2-0", "service": "api", "host": "vm2", "address": "10.77.0.12",
                       "proxy_port": 21000}]}
    data.update(changes)
    return data


# --- config -----------------------------------------------------------------------------------------------

def test_config_parses_with_defaults() -> None:
    config = parse_config(config_data())
    assert config.instances == (Instance("api-vm2-0", "api", "vm2", "10.77.0.12", 21000),)
    assert (config.interval, config.timeout, config.session_ttl) == (2.0, 2.0, 10)
    assert config.lock_key == "mesh/mesh.local/health-checker/leader" and config.sni == "health.lab.mesh"
    assert config.consul_token_file is None and config.consul_ca is None


@pytest.mark.parametrize(("changes", "message"), [
    ({"intervall": 3}, "intervall: unknown key"),
    ({"consul_url": ""}, "consul_url: expected a non-empty string"),
    ({"interval": 0}, "interval: expected a positive number"),
    ({"session_ttl": 5}, "session_ttl: expected whole seconds from 10"),
    ({"instances": {}}, "instances: expected a list"),
    ({"instances": [{"id": "x"}]}, r"instances\[0\]: expected exactly the keys"),
    ({"instances": [{"id": "x", "service": "a", "host": "h", "address": "a", "proxy_port": "21000"}]},
     r"instances\[0\].proxy_port: expected an integer"),
])
def test_config_refusals_name_the_key(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CheckerConfigError, match=message):
        parse_config(config_data(**changes), "checker.json")


def test_config_requires_the_trust_domain() -> None:
    data = config_data()
    del data["trust_domain"]
    with pytest.raises(CheckerConfigError, match="trust_domain: required"):
        parse_config(data)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckerConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckerConfigError, match="bad.json: not JSON"):
        load_config(tmp_path / "bad.json")


def test_the_command_exits_5_on_usage_and_1_on_a_bad_config(tmp_path: Path) -> None:
    from mesh.healthcheck.__main__ import main

    assert main(["--bogus"]) == 5
    assert main(["--config", str(tmp_path / "missing.json")]) == 1
    (tmp_path / "checker.json").write_text(json.dumps(config_data(cert=str(tmp_path / "none.pem"))))
    assert main(["--config", str(tmp_path / "checker.json")]) == 1  # names the files, runs nothing


def test_checker_config_from_the_mesh_round_trips(tmp_path: Path) -> None:
    config = checker_config(make_mesh())
    assert [i.id for i in config.instances] == ["web-vm1-8080", "api-vm2-9090", "db-vm2-5432", "api-dock1-api-v2-1"]
    assert config.key == "/etc/mesh/checker/tls/key.pem" and config.instances[2].proxy_port == 21001
    assert config.lock_key == "mesh/lab.mesh/health-checker/leader"  # the mesh id defaults to the trust domain
    (tmp_path / "checker.json").write_text(config.to_json())
    assert load_config(tmp_path / "checker.json") == config


def test_checker_config_names_the_token_file_never_the_token(tmp_path: Path) -> None:
    mesh = make_mesh()
    settings = dataclasses.replace(mesh.settings, mesh_id="team-b", consul_token_file=str(tmp_path / "token"),
                                   consul_ca_file=str(tmp_path / "ca.pem"), consul_url="https://consul:8501")
    (tmp_path / "token").write_text("s3cret-token\n")
    config = checker_config(dataclasses.replace(mesh, settings=settings))
    assert config.lock_key == "mesh/team-b/health-checker/leader"
    assert (config.consul_token_file, config.consul_ca) == ("/etc/mesh/checker/consul-token",
                                                            "/etc/mesh/checker/consul-ca.pem")
    assert "s3cret" not in config.to_json()
    assert parse_config(json.loads(config.to_json())) == config


def test_the_checker_reads_its_token_from_the_file(tmp_path: Path) -> None:
    from mesh.healthcheck.__main__ import consul_access

    (tmp_path / "token").write_text("s3cret-token\n")
    config = parse_config(config_data(consul_token_file=str(tmp_path / "token"), consul_ca="/ca.pem"))
    access = consul_access(config)
    assert (access.token, access.ca_file, access.url) == ("s3cret-token", "/ca.pem", "http://127.0.0.1:8500")
    assert consul_access(parse_config(config_data())).token is None


# --- the write rules ----------------------------------------------------------------------------------------

class FakeLock:
    def __init__(self, leading: bool = True) -> None:
        self.leading = leading
        self.released = False

    def step(self) -> bool:
        return self.leading

    def holds(self) -> bool:
        return self.leading

    def release(self) -> None:
        self.released = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def two_instances() -> CheckerConfig:
    base = parse_config(config_data(refresh=60))
    return dataclasses.replace(base, instances=(
        base.instances[0], Instance("db-vm2-1", "db", "vm2", "10.77.0.12", 21001)))


def test_writes_only_changes_and_refreshes_after_a_while() -> None:
    writes: list[tuple[str, str]] = []
    clock = Clock()
    checker = HealthChecker(two_instances(), FakeLock(), lambda i: ProbeResult("passing", "ok"),
                            lambda i, r: writes.append((i.id, r.status)), clock=clock)
    ok, bad = ProbeResult("passing", "ok"), ProbeResult("critical", "503")
    assert checker.round([ok, ok]) == 2
    assert checker.round([ok, ok]) == 0
    assert checker.round([ok, bad]) == 1 and writes[-1] == ("db-vm2-1", "critical")
    clock.now = 61
    assert checker.round([ok, bad]) == 2


def test_a_checker_that_lost_the_lock_stops_writing() -> None:
    writes: list[str] = []
    lock = FakeLock()

    def write(instance: Instance, result: ProbeResult) -> None:
        writes.append(instance.id)
        lock.leading = False  # the session is lost right after the first write

    checker = HealthChecker(two_instances(), lock, lambda i: ProbeResult("passing", "ok"), write)
    checker.round([ProbeResult("passing", "ok")] * 2)
    assert writes == ["api-vm2-0"]


def test_a_standby_never_probes_or_writes_and_releases_on_stop() -> None:
    probed: list[str] = []
    lock = FakeLock(leading=False)
    config = dataclasses.replace(two_instances(), interval=0.05)

    def prober(instance: Instance) -> ProbeResult:
        probed.append(instance.id)
        return ProbeResult("passing", "")

    checker = HealthChecker(config, lock, prober, lambda i, r: pytest.fail("a standby wrote"))
    stop = threading.Event()
    runner = threading.Thread(target=checker.run, args=(stop,))
    runner.start()
    threading.Event().wait(0.3)
    stop.set()
    runner.join(timeout=5)
    assert not probed and lock.released


# --- the probe ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LeafFiles]:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(directory), TestCA(directory / "other", "other CA")
    return {"api": ca.issue(f"spiffe://{TD}/svc/api", "api"),
            "checker": ca.issue(f"spiffe://{TD}/mesh/health", "checker"),
            "foreign": other.issue(f"spiffe://{TD}/mesh/health", "foreign")}


@pytest.fixture
def endpoint(pki: dict[str, LeafFiles]) -> Iterator[HealthEndpoint]:
    with HealthEndpoint(pki["api"], TD) as server:
        yield server


def run_probe(files: LeafFiles, port: int, service: str = "api", trust_domain: str = TD,
              timeout: float = 2.0) -> ProbeResult:
    config = dataclasses.replace(parse_config(config_data()), trust_domain=trust_domain, timeout=timeout)
    context = client_context(str(files.cert), str(files.key), str(files.ca))
    return probe(context, Instance(f"{service}-h-0", service, "h", "127.0.0.1", port), config)


def test_probe_passes_on_200_and_fails_on_503(endpoint: HealthEndpoint, pki: dict[str, LeafFiles]) -> None:
    assert run_probe(pki["checker"], endpoint.port) == ProbeResult(
        "passing", f"127.0.0.1:{endpoint.port}: GET /mesh/health: 200 OK")
    endpoint.healthy = False
    result = run_probe(pki["checker"], endpoint.port)
    assert result.status == "critical" and "503" in result.output


def test_probe_checks_the_servers_spiffe_id(endpoint: HealthEndpoint, pki: dict[str, LeafFiles]) -> None:
    result = run_probe(pki["checker"], endpoint.port, service="db")
    assert result.status == "critical" and f"expected spiffe://{TD}/svc/db" in result.output
    assert endpoint.requests == 0  # nothing sent to a server that is not the instance


def test_probe_sends_the_health_sni(endpoint: HealthEndpoint, pki: dict[str, LeafFiles]) -> None:
    result = run_probe(pki["checker"], endpoint.port, trust_domain="other.mesh")
    assert result.status == "critical" and "TLS" in result.output


def test_a_client_from_another_ca_is_refused(endpoint: HealthEndpoint, pki: dict[str, LeafFiles]) -> None:
    foreign = dataclasses.replace(pki["foreign"], ca=pki["checker"].ca)
    assert run_probe(foreign, endpoint.port).status == "critical"


def test_a_server_from_another_ca_is_refused(endpoint: HealthEndpoint, pki: dict[str, LeafFiles]) -> None:
    untrusting = dataclasses.replace(pki["checker"], ca=pki["foreign"].ca)
    result = run_probe(untrusting, endpoint.port)
    assert result.status == "critical" and "CERTIFICATE_VERIFY_FAILED" in result.output


def test_refused_and_silent_ports_are_critical(pki: dict[str, LeafFiles]) -> None:
    assert "refused" in run_probe(pki["checker"], closed_port()).output
    with socket.socket() as silent:  # accepts (backlog) but never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        result = run_probe(pki["checker"], silent.getsockname()[1], timeout=0.3)
    assert result.status == "critical" and "timed out after 0.3s" in result.output


# --- what controllers need ----------------------------------------------------------------------------------

def test_the_checker_imports_nothing_heavy() -> None:
    code = "import sys, mesh.healthcheck.__main__; print('\\n'.join(sorted(sys.modules)))"
    modules = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.split())
    # rich shows up here only because structlog uses it when installed; the controller venv has none
    heavy = {"yaml", "jinja2", "fabric", "paramiko", "grpc", "cryptography", "click", "mesh.inventory"}
    assert not heavy & modules
    assert {"consul", "structlog", "mesh.catalog"} <= modules


def test_runtime_pins_cover_the_checkers_imports() -> None:
    names = {pin.split("==")[0] for pin in controller_env.runtime_pins()}
    assert {"py-consul", "structlog", "requests", "urllib3", "idna", "certifi", "charset-normalizer"} <= names


def test_install_commands_are_guarded_and_skipped_when_installed() -> None:
    names = ["structlog-26.1.0-py3-none-any.whl", "mesh-0.1.0-py3-none-any.whl"]
    commands = controller_env.install_commands(names, "abc123")
    assert commands[0] == "test -x /opt/mesh/venv/bin/python3 || python3 -m venv /opt/mesh/venv"
    assert "--no-index --no-deps --force-reinstall --find-links /opt/mesh/wheels" in commands[1]
    assert "/opt/mesh/wheels/mesh-0.1.0-py3-none-any.whl /opt/mesh/wheels/structlog" in commands[1]
    assert commands[1].startswith('test "$(cat /opt/mesh/venv/mesh-wheels.marker 2>/dev/null)" = abc123 ||')
    assert "! -name mesh-0.1.0-py3-none-any.whl" in commands[2]
    assert controller_env.install_commands(names, "abc123", installed="abc123\n") == []


def test_checker_unit_golden(update_goldens: bool) -> None:
    text = controller_env.render_checker_unit()
    path = GOLDEN / "systemd" / "mesh-health-checker.service"
    if update_goldens:
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"
    command = "/opt/mesh/venv/bin/python3 -m mesh.healthcheck --config /etc/mesh/checker/checker.json"
    assert f"ExecStart={command}" in text


def test_config_json_is_what_the_checker_reads(tmp_path: Path) -> None:
    text = checker_config(make_mesh()).to_json()
    assert json.loads(text)["consul_url"] == "http://127.0.0.1:8500"


# --- the controller's Consul files (deploy step) ----------------------------------------------------------------

def _run_step(mesh: object, host: object) -> list[str]:
    """mesh.checker_consul_files on a fake controller; returns the descriptions of the changes applied."""
    from mesh.deploy.execute import apply_change
    from mesh.deploy.modules.api import PutFile, TaskContext
    from mesh.deploy.steps.controller import checker_consul_files
    from mesh.testing.fake_connector import FakeConnector

    connector = FakeConnector(host)  # type: ignore[arg-type]
    shared = type("Shared", (), {"mesh": mesh})()
    ctx: TaskContext[object] = TaskContext(make_mesh().hosts[0], connector, {}, False, shared, Path("."),
                                           Path("."))
    steps, done = checker_consul_files(ctx, {}), []  # type: ignore[arg-type]
    try:
        change = next(steps)
        while True:
            done.append(change.description or (change.path if isinstance(change, PutFile) else change.cmd))
            change = steps.send(apply_change(change, connector))
    except StopIteration:
        return done


def test_the_token_goes_to_the_controller_0600_for_the_checker_never_in_a_command(tmp_path: Path) -> None:
    from mesh.testing.fake_connector import FakeHost

    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "ca.pem").write_text("CA BUNDLE\n")
    mesh = make_mesh()
    settings = dataclasses.replace(mesh.settings, consul_token_file=str(tmp_path / "token"),
                                   consul_ca_file=str(tmp_path / "ca.pem"))
    host = FakeHost("ctl1")
    assert len(_run_step(dataclasses.replace(mesh, settings=settings), host)) == 2
    token = host.files["/etc/mesh/checker/consul-token"]
    assert (token.data, token.mode, token.owner, token.group) == (b"s3cret-token\n", 0o600, "mesh-checker",
                                                                  "mesh-checker")
    assert host.files["/etc/mesh/checker/consul-ca.pem"].data == b"CA BUNDLE\n"
    assert not any("s3cret" in command for command in host.commands)
    assert _run_step(dataclasses.replace(mesh, settings=settings), host) == []  # a second run changes nothing
    host.files["/etc/mesh/checker/consul-token"].mode = 0o644
    assert _run_step(dataclasses.replace(mesh, settings=settings), host) != []  # the mode is put back
    assert host.files["/etc/mesh/checker/consul-token"].mode == 0o600
    removed = _run_step(mesh, host)  # the inventory no longer names them: removed
    assert len(removed) == 2 and "/etc/mesh/checker/consul-token" not in host.files


def test_the_checkers_new_key_is_swapped_in_with_its_certificate(tmp_path: Path) -> None:
    """As a proxy's: a new key and its certificate are written into a new folder, then one rename of the
    `tls` link makes both current, so a checker (re)started in between still reads a matching pair."""
    from mesh.deploy.execute import apply_change
    from mesh.deploy.modules.api import PutFile, RunCommand, TaskContext
    from mesh.deploy.steps.proxy import certificate
    from mesh.healthcheck.config import CERT_FILE, KEY_FILE
    from mesh.pki import CertificateAuthority, leaf_info
    from mesh.testing.fake_connector import FakeConnector, FakeHost
    from mesh.testing.fake_openssl import stub_openssl

    mesh = make_mesh()
    ca, _ = CertificateAuthority.ensure(str(tmp_path / "state"), mesh.settings.trust_domain)
    host = FakeHost("ctl1")
    stub_openssl(host)
    host.write("/etc/mesh/checker/key.pem", b"the key of mesh before the tls link", 0o600)
    shared = type("Shared", (), {"mesh": mesh, "ca": ca})()
    ctx: TaskContext[object] = TaskContext(mesh.hosts[0], FakeConnector(host), {}, False, shared, Path("."),
                                           Path("."))
    steps, done = certificate(ctx, {"checker": True}), []  # type: ignore[arg-type]
    try:
        change = next(steps)
        while True:
            done.append(change)
            change = steps.send(apply_change(change, ctx.connector))
    except StopIteration:
        pass
    commands = [change.cmd for change in done if isinstance(change, RunCommand)]
    keygen = next(i for i, cmd in enumerate(commands) if "openssl genpkey" in cmd)
    swap = next(i for i, cmd in enumerate(commands) if cmd.startswith("ln -sfn "))
    puts = [change.path for change in done if isinstance(change, PutFile)]
    assert keygen < swap and puts and all("/etc/mesh/checker/tls." in path for path in puts)
    key, cert = host.files[KEY_FILE], host.files[CERT_FILE]
    assert (key.mode, key.owner) == (0o600, "mesh-checker")
    assert cert.data is not None and leaf_info(cert.data).spiffe_id == "spiffe://lab.mesh/mesh/health"
    assert "/etc/mesh/checker/key.pem" not in host.files, "the key of the layout before the link is removed"
