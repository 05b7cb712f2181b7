"""End to end: `mesh deploy inventory/lab.yaml` on the lab's VMs (issue 12's "Done when"), as a user sees it:
requests through Envoy, refused clients, closed ports, key files and where keys are not, Consul's catalog,
unit PIDs, the PLAY RECAP, exit codes and messages.

The lab is shared with other work on this machine: the module holds /tmp/mesh-lab-dev.lock throughout, brings
the lab up at the size below (or uses it as it is), deploys once, and leaves the lab up and deployed. Tests
run in file order: the ones that stop, reboot or break things come last, and each brings back what it broke.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    INVENTORY,
    Run,
    cert_public_fingerprint,
    check_status,
    consul,
    hops,
    host_files,
    inventory_copy,
    keys_in_folders,
    keys_on_node,
    out,
    public_fingerprint,
    run_mesh,
    sh,
    shared_lab,
    tcp_from,
    tls_from,
    unit_pids,
    wait_for,
)
from lab_helpers import LabUp

from mesh.config import paths
from mesh.config.compute import upstream_cluster_name
from mesh.config.telemetry import outbound_stat_name
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.testing.certs import MeshCAProbeIssuer
from mesh.testing.health_endpoint import TestCA

CONSUL = "http://10.77.0.2:8500"
TRUST_DOMAIN = "lab.mesh"
DEPLOY_TIMEOUT = 600.0
# The lab's VM workloads as INVENTORY.md names them.
# Consul ID -> (service, host, proxy, proxy_port, admin_port)
INSTANCES = {
    "web-vm1-8080": ("web", "vm1", "web-8080", 21000, 19000),
    "api-vm2-9090": ("api", "vm2", "api-9090", 21000, 19000),
    "db-vm2-5432": ("db", "vm2", "db-5432", 21001, 19001),
}
ENVOY_UNITS = {"vm1": ["mesh-envoy-web-8080.service"],
               "vm2": ["mesh-envoy-api-9090.service", "mesh-envoy-db-5432.service"]}
CHECKER_UNIT = "mesh-health-checker.service"
APP_PORTS = [("vm1", 8080), ("vm2", 9090), ("vm2", 5432)]
DEPLOYED = ("vm1", "vm2", "dock1", "ctl1")  # hosts with workloads and the controller; consul1 is left alone
API_APP_UNIT = "mesh-demo-api.service"  # mesh.lab.demo_units.unit_name() of vm2's api
DRIFT = "# e2e drift: a later deploy must put the rendered file back"
DRIFTED = "/etc/mesh/proxies/db-5432/envoy.yaml"


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deploy_lab() -> Iterator[LabUp]:
    """The lab at inventory/lab.yaml, brought up at the size these tests need (idempotent: a lab already up,
    deployed or not, is used as it is, as a user re-deploys), under the shared lock for the whole module.

    Not conftest's session `lab`: that one takes the lab down at the end of the session and is shared with
    test_lab.py, which needs a lab nobody deployed to. The lock is module-scoped, not session-scoped:
    test_runner_lab.py flocks the same file through another descriptor and would wait on us forever.
    """
    with shared_lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def first_deploy(deploy_lab: LabUp) -> Run:
    return run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)


@pytest.fixture(scope="module")
def fleet(deploy_lab: LabUp, first_deploy: Run) -> LabUp:
    """The lab after a successful first deploy; every test that examines the mesh needs one."""
    if first_deploy.code != 0:
        pytest.fail(f"the first deploy failed, so there is no mesh to examine:\n{first_deploy}")
    return deploy_lab


@pytest.fixture(scope="module")
def state_dir() -> str:
    """mesh_state_dir of inventory/lab.yaml, where the CA lives."""
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


# ---- what the tests look at --------------------------------------------------------------------------------

# The api instances of the lab: v1 on vm2 (a VM) and v2 in a container on dock1 (deployed too, as a sidecar).
API_INSTANCES = {("vm2", "vm"), ("dock1", "container")}


def _chain_ok(seen: list[dict[str, Any]] | str, api_host: str | None = "vm2") -> bool:
    """web on vm1 reached api (on api_host; any api instance when None) and api reached db, no error hop."""
    if isinstance(seen, str) or any("error" in hop for hop in seen):
        return False
    if [hop.get("service") for hop in seen] != ["web", "api", "db"] or seen[2].get("host") != "vm2":
        return False
    api = (seen[1].get("host"), seen[1].get("kind"))
    return api in API_INSTANCES and (api_host is None or api[0] == api_host)


def _wait_chain(lab: LabUp, what: str) -> list[dict[str, Any]]:
    """Waits for a request that went through the VM api instance on vm2 (web balances over vm2 and dock1)."""
    seen = wait_for(lambda: hops(lab, "vm1", 8080), _chain_ok, what)
    assert not isinstance(seen, str)
    return seen


def _admin(lab: LabUp, host: str, proxy: str, path: str) -> str:
    """GET an Envoy admin path as root over the proxy's admin socket (there is no admin port)."""
    return out(lab, host, f"curl -sS --max-time 5 --unix-socket {paths.admin_socket_path(proxy)} "
                          f"'http://localhost{path}'")


def _envoy_stat(lab: LabUp, host: str, proxy: str, name: str) -> int:
    text = _admin(lab, host, proxy, f"/stats?filter=^{re.escape(name)}$")
    values = [int(v) for v in re.findall(r":\s*(\d+)\s*$", text, re.MULTILINE)]
    assert values, f"{host}: Envoy of {proxy} has no stat {name}: {text!r}"
    return sum(values)


def _api_endpoint_flags(lab: LabUp) -> str:
    """How web's Envoy on vm1 sees api's instance on vm2: its health_flags in /clusters."""
    address = f"{lab.hosts['vm2']}:21000"
    text = _admin(lab, "vm1", "web-8080", "/clusters")
    prefix = f"{upstream_cluster_name('api')}::{address}::health_flags::"
    flags = [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]
    return flags[0] if flags else f"no endpoint {address} in {upstream_cluster_name('api')}"


def _all_pids(lab: LabUp) -> dict[str, dict[str, str]]:
    pids = {host: unit_pids(lab, host, units) for host, units in ENVOY_UNITS.items()}
    pids["ctl1"] = unit_pids(lab, "ctl1", [CHECKER_UNIT])
    return pids


def _catalog() -> list[tuple[Any, ...]]:
    """Every registration of the lab's services in Consul, with its ModifyIndex."""
    found = []
    for service in ("web", "api", "db"):
        for entry in consul(CONSUL, f"/v1/catalog/service/{service}"):
            found.append((entry["ServiceID"], entry["Node"], entry["ServiceAddress"], entry["ServicePort"],
                          json.dumps(entry["ServiceMeta"], sort_keys=True), entry["ModifyIndex"]))
    return sorted(found)


def _host_state(lab: LabUp, host: str) -> tuple[str, dict[str, str]]:
    units = ENVOY_UNITS.get(host, [CHECKER_UNIT])
    return host_files(lab, host), unit_pids(lab, host, units)


def _drift(lab: LabUp) -> None:
    """Change a rendered file on vm2 behind mesh's back, to see whether a deploy reaches vm2."""
    out(lab, "vm2", f"echo '{DRIFT}' >> {DRIFTED}")


def _drift_repaired(lab: LabUp) -> bool:
    return sh(lab, "vm2", f"grep -qF '{DRIFT}' {DRIFTED}").returncode == 1


def _ssh_logins(lab: LabUp, host: str, since: float, until: float) -> int:
    window = f"--since @{math.floor(since)} --until @{math.ceil(until)}"
    text = out(lab, host, f"journalctl -u ssh.service {window} --no-pager -o cat "
                          "| grep -c 'Accepted publickey' || true")
    return int(text.strip() or 0)


def _assert_other_hosts_deployed(run: Run, lab: LabUp, failing: str) -> None:
    recap = run.recap()
    for host in DEPLOYED:
        if host != failing:
            assert host in recap, f"{host} missing from the PLAY RECAP:\n{run}"
            counts = recap[host]
            assert (counts["failed"], counts["unreachable"]) == (0, 0), f"{host}: {counts}\n{run}"
    assert recap["vm2"]["changed"] > 0 and _drift_repaired(lab), \
        f"vm2 was not deployed next to the failing {failing}: {DRIFTED} still has the drift\n{run}"


# ---- after a deploy ----------------------------------------------------------------------------------------

def test_first_deploy_exits_0_with_a_play_recap(first_deploy: Run) -> None:
    assert first_deploy.code == 0, str(first_deploy)
    assert "PLAY RECAP" in first_deploy.stdout, str(first_deploy)
    recap = first_deploy.recap()
    for host in DEPLOYED:
        assert host in recap, f"{host} missing from the PLAY RECAP:\n{first_deploy.stdout}"
        assert recap[host]["failed"] == 0 and recap[host]["unreachable"] == 0, f"{host}: {recap[host]}"
    assert "consul1" not in recap, "the deploy touched consul1, which has no workloads and is no controller"


def test_web_reaches_api_on_a_vm_and_db_over_tcp_through_mtls(fleet: LabUp) -> None:
    chain = _wait_chain(fleet, "web on vm1 answering web -> api (vm2) -> db with no error hop")
    # the id Envoy gave it, and the caller's certificate its Envoy named (x-forwarded-client-cert)
    api_hop = {key: value for key, value in chain[1].items() if key not in ("request_id", "client_cert")}
    assert api_hop == {"service": "api", "version": "v1", "host": "vm2", "instance": "vm2", "kind": "vm"}
    assert chain[2] == {"service": "db", "version": "v1", "host": "vm2", "instance": "vm2", "kind": "vm"}
    for _ in range(5):  # not a lucky one: every request goes through
        seen = hops(fleet, "vm1", 8080)
        assert _chain_ok(seen, api_host=None), seen
    # db is a tcp workload: api's Envoy carries a raw line protocol to it (no HTTP in between).
    line = out(fleet, "vm2", "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', 19102), "
                             "timeout=5); s.sendall(b'hop\\n'); print(s.makefile().readline(), end='')\"")
    assert json.loads(line) == chain[2]
    # Both hops between Envoys are TLS (the refusals below show the inbound side demands a mesh certificate).
    # (a cluster's stats carry mesh's stat name, outbound|<caller>|<version>|<upstream>)
    assert _envoy_stat(fleet, "vm1", "web-8080", f"cluster.{outbound_stat_name('web', 'v1', 'api')}.ssl.handshake") > 0
    assert _envoy_stat(fleet, "vm2", "api-9090", f"cluster.{outbound_stat_name('api', 'v1', 'db')}.ssl.handshake") > 0


def test_consul_has_every_vm_instance_and_marks_them_passing(fleet: LabUp) -> None:
    registered: dict[str, dict[str, Any]] = {}
    for service in ("web", "api", "db"):
        for entry in consul(CONSUL, f"/v1/catalog/service/{service}"):
            registered[entry["ServiceID"]] = entry
    for service_id, (service, host, _proxy, proxy_port, _admin) in INSTANCES.items():
        assert service_id in registered, f"{service_id} is not in Consul's catalog: {sorted(registered)}"
        entry = registered[service_id]
        assert (entry["ServiceName"], entry["Node"], entry["ServiceAddress"], entry["ServicePort"]) == \
            (service, host, fleet.hosts[host], proxy_port)
        assert entry["ServiceMeta"] == {"managed-by": "mesh", "kind": "vm", "version": "v1", "host": host,
                                        "mesh-id": TRUST_DOMAIN}  # the mesh id defaults to the trust domain
    # dock1's api is in the inventory too (a container instance: test_deploy_containers.py); nothing else is there.
    assert set(registered) <= {*INSTANCES, "api-dock1-api-v2-1"}, sorted(registered)

    def statuses() -> dict[str, str]:
        return {sid: check_status(CONSUL, service, sid) for sid, (service, *_rest) in INSTANCES.items()}

    wait_for(statuses, lambda seen: set(seen.values()) == {"passing"}, "every VM instance passing in Consul")


@pytest.mark.parametrize("target", ["api-vm2-9090", "db-vm2-5432"])
def test_inbound_listener_refuses_every_client_without_a_mesh_identity(fleet: LabUp, state_dir: str,
                                                                       tmp_path: Path, target: str) -> None:
    service, host, _proxy, proxy_port, _admin = INSTANCES[target]
    mode = "line" if service == "db" else "http"
    mesh_ca = MeshCAProbeIssuer(state_dir)
    root = mesh_ca.root_file

    def probe(client: Any) -> Any:
        return tls_from(fleet, "ctl1", fleet.hosts[host], proxy_port, mode, root, client)

    # The control: a mesh certificate of a declared caller (web calls api, api calls db) gets through, so the
    # refusals below, made for the same caller, are the certificate's fault and not authorization's.
    caller = "web" if service == "api" else "api"
    valid = probe(mesh_ca.issue(f"spiffe://{TRUST_DOMAIN}/svc/{caller}", tmp_path, "valid"))
    if mode == "http":
        assert valid.http_status() == 200, valid
        assert valid.json_body()["hops"][0]["service"] == "api", valid
    else:
        assert json.loads(valid.answer)["service"] == "db", valid
    refused = {
        "no client certificate": probe(None),
        "a certificate from another CA": probe(TestCA(tmp_path / "other", "other CA").issue(
            f"spiffe://{TRUST_DOMAIN}/svc/{caller}", "other-ca")),
        "a mesh-CA certificate of another trust domain": probe(
            mesh_ca.issue(f"spiffe://other.mesh/svc/{caller}", tmp_path, "foreign")),
        "a mesh-CA certificate of a look-alike trust domain": probe(
            mesh_ca.issue(f"spiffe://{TRUST_DOMAIN}.evil/svc/{caller}", tmp_path, "lookalike")),
        "a mesh-CA certificate with no SPIFFE ID in the trust domain": probe(
            mesh_ca.issue(f"https://{TRUST_DOMAIN}/svc/{caller}", tmp_path, "not-spiffe")),
    }
    let_through = {case: seen for case, seen in refused.items() if seen.answer}
    assert not let_through, f"{target}'s inbound listener answered: {let_through}"
    leftovers = out(fleet, "ctl1", "ls -d /root/mesh-e2e-probe-* 2>/dev/null || true").strip()
    assert leftovers == "", f"probe files left on ctl1: {leftovers}"


def test_app_ports_are_closed_to_other_hosts_and_ssh_still_works(fleet: LabUp) -> None:
    app_ports = [(fleet.hosts[host], port) for host, port in APP_PORTS]
    proxy_ports = [(fleet.hosts[host], port) for _s, host, _p, port, _a in INSTANCES.values()]
    ssh_ports = [(fleet.hosts[host], 22) for host in ("vm1", "vm2")]
    for source in ("ctl1", "consul1", "dock1"):
        seen = tcp_from(fleet, source, app_ports + proxy_ports + ssh_ports)
        for address, port in app_ports:
            assert seen[f"{address}:{port}"].startswith("closed"), f"from {source}: {address}:{port} {seen}"
        for address, port in proxy_ports:  # the same probe reaches Envoy: the firewall closes the rest
            assert seen[f"{address}:{port}"].startswith("open"), f"from {source}: {address}:{port} {seen}"
        for address, port in ssh_ports:
            assert seen[f"{address}:{port}"].startswith("open SSH-2.0-"), f"from {source}: {address} {seen}"
    across = tcp_from(fleet, "vm1", [(fleet.hosts["vm2"], 9090), (fleet.hosts["vm2"], 5432)])
    assert all(state.startswith("closed") for state in across.values()), f"from vm1 to vm2: {across}"
    for host in fleet.hosts:  # and SSH from the machine running mesh, with strict host keys, to every node
        assert out(fleet, host, "hostname").strip() == host


def test_workload_keys_are_private_files_on_their_own_host_and_nowhere_else(fleet: LabUp,
                                                                             state_dir: str) -> None:
    # Where each key must be, with its mode and owner: Envoy's user reads the proxies', root the checker's.
    # A proxy's key is behind its `tls` link (paths.key_path): where it is found, the folder the link names.
    keys = {f"vm1:{paths.key_path('web-8080')}": "600 mesh-web-8080",
            f"vm2:{paths.key_path('api-9090')}": "600 mesh-api-9090",
            f"vm2:{paths.key_path('db-5432')}": "600 mesh-db-5432",
            "ctl1:/etc/mesh/checker/tls/key.pem": "600 mesh-checker"}
    fingerprints: dict[str, str] = {}
    found_at: dict[str, str] = {}
    for where, mode_owner in keys.items():
        host, path = where.split(":", 1)
        assert out(fleet, host, f"stat -c '%a %U' {path}").strip() == mode_owner, where
        found_at[where] = f"{host}:{out(fleet, host, f'readlink -f {path}').strip()}"
        key_fp = public_fingerprint(out(fleet, host, f"cat {path}").encode())
        assert len(key_fp) == 1 and key_fp[0], f"{where} holds no readable private key"
        cert = out(fleet, host, f"cat {Path(path).with_name('cert.pem')}").encode()
        assert cert_public_fingerprint(cert) == key_fp[0], f"{where}: cert.pem is not for this key"
        fingerprints[key_fp[0]] = where

    found = {key for host in fleet.hosts for key in keys_on_node(fleet, host)}
    found |= set(keys_in_folders([Path(state_dir), INVENTORY.parents[1], Path("/tmp"), Path("/var/tmp"),
                                  Path("/dev/shm")]))  # the state dir may be inside the repo: a set
    places = {where: sorted(f"{key.place}:{key.path}" for key in found if key.public == fp)
              for fp, where in fingerprints.items()}
    assert places == {where: [found_at[where]] for where in keys}, "a workload key is somewhere else than its file"

    in_state = sorted(str(Path(key.path).relative_to(state_dir)) for key in found
                      if key.place == "local" and Path(key.path).is_relative_to(state_dir))
    # the controllers' intermediate is the root's too (its key is pushed to controllers only, 0600 their user's)
    assert in_state == ["ca/controller-intermediate.key", "ca/intermediate.key", "ca/root.key"], \
        f"private keys in mesh's state: {in_state}"
    ca_dir = Path(state_dir) / "ca"
    for name in ("root", "intermediate"):
        assert public_fingerprint((ca_dir / f"{name}.key").read_bytes()) == \
            [cert_public_fingerprint((ca_dir / f"{name}.pem").read_bytes())]


def test_status_exits_0_and_shows_every_proxy_when_all_is_healthy(fleet: LabUp) -> None:
    status = wait_for(lambda: run_mesh("status", str(INVENTORY), timeout=120), lambda run: run.code == 0,
                      "`mesh status` exiting 0 on a healthy mesh")
    for service_id, (_service, host, proxy, _port, _admin) in INSTANCES.items():
        assert host in status.stdout and (proxy in status.stdout or service_id in status.stdout), \
            f"{proxy} of {host} not shown:\n{status}"


def test_second_deploy_changes_nothing_and_restarts_no_envoy(fleet: LabUp) -> None:
    before = _all_pids(fleet)
    again = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    assert again.code == 0, str(again)
    recap = again.recap()
    assert set(DEPLOYED) <= set(recap), f"hosts missing from the PLAY RECAP:\n{again.stdout}"
    changed = {host: counts["changed"] for host, counts in recap.items() if counts["changed"] != 0}
    assert changed == {}, f"a deploy with nothing new changed something:\n{again.stdout}"
    assert _all_pids(fleet) == before
    assert all(state.endswith(" active") and not state.startswith("0 ")
               for units in before.values() for state in units.values()), before


# ---- behaviour over time -----------------------------------------------------------------------------------

def test_stopped_api_app_goes_critical_and_out_of_traffic_then_comes_back(fleet: LabUp) -> None:
    _wait_chain(fleet, "the chain working before the api app is stopped")
    envoy_before = unit_pids(fleet, "vm2", ["mesh-envoy-api-9090.service"])
    out(fleet, "vm2", f"systemctl stop {API_APP_UNIT}")
    try:
        wait_for(lambda: check_status(CONSUL, "api", "api-vm2-9090"), lambda s: s == "critical",
                 "Consul marking api-vm2-0 critical once its app stopped")
        # Envoy's own check fails it, or the controller (Consul says critical) already removed it
        wait_for(lambda: _api_endpoint_flags(fleet),
                 lambda flags: "failed_active_hc" in flags or flags.startswith("no endpoint"),
                 "web's Envoy taking api on vm2 out of its endpoints")
        for _ in range(3):
            seen = hops(fleet, "vm1", 8080)
            assert not isinstance(seen, str), seen  # web itself still answers, naming what failed
            assert not any(hop.get("service") == "api" and hop.get("host") == "vm2" for hop in seen), seen
        assert unit_pids(fleet, "vm2", ["mesh-envoy-api-9090.service"]) == envoy_before, "api's Envoy restarted"
        status = run_mesh("status", str(INVENTORY), timeout=120)
        assert status.code == 2, f"`mesh status` with an api app stopped:\n{status}"
        assert "api" in status.stdout, str(status)
    finally:
        out(fleet, "vm2", f"systemctl start {API_APP_UNIT}")
    wait_for(lambda: check_status(CONSUL, "api", "api-vm2-9090"), lambda s: s == "passing",
             "Consul marking api-vm2-0 passing once its app started again")
    wait_for(lambda: _api_endpoint_flags(fleet), lambda flags: flags == "healthy",
             "web's Envoy taking api on vm2 back")
    _wait_chain(fleet, "requests from web reaching api on vm2 again, with no deploy")


def test_a_vm_reboot_brings_its_envoys_and_firewall_back(fleet: LabUp) -> None:
    out(fleet, "vm2", "touch /run/mesh-e2e-this-boot")
    out(fleet, "vm2", "systemctl --no-block reboot")  # queued: SSH returns before the connection drops
    wait_for(lambda: sh(fleet, "vm2", "test -e /run/mesh-e2e-this-boot", timeout=10).returncode,
             lambda rc: rc == 1, "vm2 rebooting", timeout=60, interval=1)
    wait_for(lambda: sh(fleet, "vm2", "systemctl is-system-running", timeout=10).stdout.strip(),
             lambda state: state == "running", "vm2 back up and running", timeout=90, interval=1)
    _wait_chain(fleet, "web -> api (vm2) -> db working again after vm2 rebooted")
    states = unit_pids(fleet, "vm2", ENVOY_UNITS["vm2"])
    assert all(state.endswith(" active") for state in states.values()), states
    assert sh(fleet, "vm2", "nft list table inet mesh").returncode == 0, "mesh's nftables table is gone"
    seen = tcp_from(fleet, "ctl1", [(fleet.hosts["vm2"], 9090), (fleet.hosts["vm2"], 5432),
                                    (fleet.hosts["vm2"], 21000)])
    assert seen[f"{fleet.hosts['vm2']}:9090"].startswith("closed"), seen
    assert seen[f"{fleet.hosts['vm2']}:5432"].startswith("closed"), seen
    assert seen[f"{fleet.hosts['vm2']}:21000"].startswith("open"), seen


# ---- failure modes: a clear message, the right exit code, the others deployed, the failing host as it was

def test_broken_inventory_exits_4_naming_the_key_and_touches_nothing(fleet: LabUp, state_dir: str,
                                                                    tmp_path: Path) -> None:
    def typo(variables: dict[str, Any]) -> None:
        api = variables["mesh_workloads"][0]
        api["upstream"] = api.pop("upstreams")

    broken = inventory_copy(tmp_path / "inventory", state_dir, hosts={"vm2": typo})
    looked = time.time()
    states = {host: _host_state(fleet, host) for host in DEPLOYED}
    catalog = _catalog()
    time.sleep(1.1)  # the journal has second resolution: our own SSH logins stay out of the window
    started = time.time()
    run = run_mesh("deploy", str(broken), timeout=DEPLOY_TIMEOUT)
    finished = time.time()
    time.sleep(1.1)
    assert run.code == 4, str(run)
    assert re.search(rf"{re.escape(str(broken))}:\d+", run.text), f"the message names no file and line:\n{run}"
    assert "upstream" in run.text and "upstreams" in run.text, f"no did-you-mean for the key:\n{run}"
    assert "Traceback" not in run.text, str(run)
    assert "PLAY RECAP" not in run.stdout, str(run)
    assert _ssh_logins(fleet, "vm2", looked, started) > 0, "the journal shows no login, not even our own"
    assert {host: _ssh_logins(fleet, host, started, finished) for host in fleet.hosts} == \
        {host: 0 for host in fleet.hosts}, "the deploy connected to hosts with an inventory it refused"
    assert {host: _host_state(fleet, host) for host in DEPLOYED} == states
    assert _catalog() == catalog, "Consul changed"


def test_changed_host_key_exits_3_naming_the_host_and_the_others_are_deployed(fleet: LabUp, state_dir: str,
                                                                              tmp_path: Path) -> None:
    """Every managed host's trust bundle is read before anything changes: a host that cannot be read (its key
    changed) is not touched and is reported unreachable; the CA exists, so the other hosts are deployed with it
    (a host that cannot be read before the CA exists stops everything: tests/unit/test_trust.py)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")],
                   check=True)
    impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    known_hosts = tmp_path / "known_hosts"
    lines = fleet.known_hosts.read_text().splitlines()
    vm1 = fleet.hosts["vm1"]
    known_hosts.write_text("".join(f"{vm1} {impostor}\n" if line.split()[0] == vm1 else line + "\n"
                                   for line in lines))

    def use_copy(document: dict[str, Any]) -> None:
        document["all"]["vars"]["ansible_ssh_common_args"] = \
            f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"

    inventory = inventory_copy(tmp_path / "inventory", state_dir, edit=use_copy)
    _drift(fleet)
    vm1_before = _host_state(fleet, "vm1")
    run = run_mesh("deploy", str(inventory), timeout=DEPLOY_TIMEOUT)
    assert run.code == 3, str(run)
    assert "vm1" in run.text, str(run)
    assert re.search(r"host key.*changed", run.text, re.IGNORECASE | re.DOTALL), str(run)
    assert str(known_hosts) in run.text, f"the message does not say which known_hosts:\n{run}"
    assert "Traceback" not in run.text, str(run)
    assert run.recap()["vm1"]["unreachable"] == 1, str(run)
    assert _host_state(fleet, "vm1") == vm1_before, "vm1 changed although its host key did not match"
    _assert_other_hosts_deployed(run, fleet, "vm1")
    _wait_chain(fleet, "vm1's Envoy still serving after its deploy was refused")


def test_config_envoy_refuses_stops_in_the_plan_and_no_host_is_touched(fleet: LabUp, state_dir: str,
                                                                        tmp_path: Path) -> None:
    """The trigger: a health interval of 99999999 days. mesh's inventory check accepts it (a duration longer
    than zero); Envoy refuses a protobuf Duration past 10,000 years. Every config is checked by Envoy on this
    machine in the plan phase, so the deploy stops (exit 1) before any host is touched. If mesh's own check
    learns to refuse it (exit 4), this test needs another such value."""
    def endless_interval(variables: dict[str, Any]) -> None:
        variables["mesh_workloads"][0]["health"] = {"http": "/healthz", "interval": "99999999d"}

    inventory = inventory_copy(tmp_path / "inventory", state_dir, hosts={"vm1": endless_interval})
    _drift(fleet)
    states = {host: _host_state(fleet, host) for host in DEPLOYED}
    run = run_mesh("deploy", str(inventory), timeout=DEPLOY_TIMEOUT)
    assert run.code == 1, str(run)
    assert "Envoy refused the config of proxy web-8080 on vm1" in run.stderr, str(run)
    assert "nothing was touched" in run.stderr and "Traceback" not in run.text, str(run)
    assert len(run.stderr) < 3000, f"the refusal is not short enough to read:\n{run}"
    assert "PLAY" not in run.stdout, f"plays ran although Envoy refused a planned config:\n{run}"
    assert not _drift_repaired(fleet), "vm2 was deployed although the plan was refused"
    assert {host: _host_state(fleet, host) for host in DEPLOYED} == states
    _wait_chain(fleet, "vm1's previous Envoy config still serving")


def test_unreachable_host_exits_3_and_the_others_are_deployed(fleet: LabUp, state_dir: str,
                                                                tmp_path: Path) -> None:
    unused = "10.77.0.99"

    def move_vm1(document: dict[str, Any]) -> None:
        document["all"]["children"]["vms"]["hosts"]["vm1"]["ansible_host"] = unused

    inventory = inventory_copy(tmp_path / "inventory", state_dir, edit=move_vm1)
    _drift(fleet)
    vm1_before = _host_state(fleet, "vm1")
    run = run_mesh("deploy", str(inventory), timeout=DEPLOY_TIMEOUT)
    assert run.code == 3, str(run)
    assert "vm1" in run.text and unused in run.text, str(run)
    assert "Traceback" not in run.text, str(run)
    assert run.recap()["vm1"]["unreachable"] == 1, str(run)
    assert _host_state(fleet, "vm1") == vm1_before
    _assert_other_hosts_deployed(run, fleet, "vm1")
    _wait_chain(fleet, "vm1's Envoy still serving while mesh could not reach it")


def test_a_deploy_after_the_failures_brings_everything_back(fleet: LabUp) -> None:
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    assert run.code == 0, str(run)
    entries = {entry["ServiceID"]: entry for entry in consul(CONSUL, "/v1/catalog/service/web")}
    assert entries["web-vm1-8080"]["ServiceAddress"] == fleet.hosts["vm1"]
    wait_for(lambda: check_status(CONSUL, "web", "web-vm1-8080"), lambda s: s == "passing", "web-vm1-0 passing")
    _wait_chain(fleet, "the chain after the last deploy")
