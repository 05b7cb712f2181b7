"""End to end on the lab (issue 18): the live controller, one test per item of the issue's "Done when" list.

- `mesh drain api vm2` under a request loop from vm1 through web to api (api on vm2 and in a container on dock1):
  no request reaches vm2 once web's Envoy dropped it, no request fails, no Envoy restarts; `--undo` brings vm2's
  traffic back.
- api's app stopped on vm2: the checker marks it critical and the controller takes it out of web's endpoint file
  and Envoy; started again: it comes back.
- `mesh_cert_ttl: 1m` deployed (renewed a quarter into its lifetime): under a request loop every proxy's
  certificate (as Envoy serves it) and each controller's checker certificate change three times, no request
  fails, nothing restarts, and no workload key is anywhere but on its own host.
- The active controller killed (its unit kept from restarting): the standby takes the lock and a drain made
  after that reaches web's Envoy. Every controller stopped and vm1 rebooted: vm1 serves with its last config;
  the controllers started again: a new drain reaches it.
- Consul stopped: no endpoint file changes, requests keep succeeding, the controller's staleness metric rises;
  Consul back: a drain flows.
- The controller's own SSH key (copied from ctl1) runs no shell command, forwards no port, and its `apply`
  refuses archives naming paths outside the identity's folder or identities the host does not have; `state`
  works.

The drain test also runs with `mesh_delivery: xds` (issue 23), after every other test of the module: every proxy
is seen running on ADS first, and web's endpoint file (its last-known-good config, which the controllers rewrite
only once the change is quiet) catches up with the drain instead of being written with it.

The module holds the shared lab lock throughout, deploys inventory/lab.yaml first (controllers installed by this
checkout) and leaves the lab as it found it after every test (drain undone, Consul, api's app and the controllers
started, inventory/lab.yaml deployed back after the rotation test).
"""

from __future__ import annotations

import io
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from controller_helpers import (
    API_APP_UNIT,
    API_INSTANCES,
    CONTROLLERS,
    IDENTITIES,
    Leaf,
    controller_key,
    controller_units,
    ctl_argv,
    ctl_ssh,
    drain,
    endpoint_files,
    failures,
    leader,
    leaves,
    metrics,
    parallel,
    processes,
    served_between,
    staleness,
    systemctl,
    traffic,
    web_api_file,
    web_api_hosts,
)
from delivery_helpers import DELIVERIES, Delivery, assert_delivery, delivery_inventory
from deploy_helpers import (
    INVENTORY,
    consul,
    hops,
    inventory_copy,
    keys_in_folders,
    keys_on_node,
    out,
    run_mesh,
    sh,
    shared_lab,
    wait_for,
)
from lab_helpers import LabUp
from rollout_helpers import CONSUL, chain_ok, deploy, deploy_lab_back, lab_state_dir

from mesh.config.xds import FILES_QUIET_S
from mesh.controller.spec import CONTROLLER_UNIT

PUSH_WAIT = 60.0  # a Consul change reaching every caller's Envoy: the goal is under a second; this only bounds the test
BOTH = set(API_INSTANCES.values())
DOCK1_ONLY = {API_INSTANCES["dock1"]}
CONSUL_UNIT = "consul.service"  # the lab's Consul server on consul1 (mesh.lab)
NO_RESTART_DROPIN = f"/run/systemd/system/{CONTROLLER_UNIT}.d/e2e-no-restart.conf"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        deploy_lab_back(up)
        yield up


@dataclass
class OnDelivery:
    """Which delivery the module's lab runs (inventory/lab.yaml, or its copy with mesh_delivery: xds)."""

    lab: LabUp
    xds_inventory: Path
    delivery: Delivery = "files"

    @property
    def inventory(self) -> Path:
        return INVENTORY if self.delivery == "files" else self.xds_inventory


@pytest.fixture(scope="module")
def lab_delivery(lab: LabUp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnDelivery]:
    """The module's lab on either delivery; inventory/lab.yaml deployed back at the module's end if it was not."""
    state = OnDelivery(lab, delivery_inventory(tmp_path_factory.mktemp("controller-xds"), "xds"))
    try:
        yield state
    finally:
        if state.delivery != "files":
            deploy_lab_back(lab)


@pytest.fixture
def delivery() -> Delivery:
    """The delivery of a test not parametrized by it."""
    return "files"


@pytest.fixture
def delivered(lab_delivery: OnDelivery, delivery: Delivery) -> LabUp:
    """The lab on `delivery` (deployed with it when it runs the other one); on xds, every proxy seen on ADS."""
    lab = lab_delivery.lab
    if lab_delivery.delivery != delivery:
        lab_delivery.delivery = delivery
        if delivery == "files":
            deploy_lab_back(lab)
        else:
            run = deploy(lab_delivery.inventory)
            assert run.code == 0, f"inventory/lab.yaml with mesh_delivery: {delivery} could not be deployed:\n{run}"
            wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, f"web -> api -> db after the {delivery} deploy",
                     timeout=60)
    if delivery == "xds":
        assert_delivery(lab, lab_delivery.inventory, "xds")
    return lab


@pytest.fixture(autouse=True)
def lab_as_found(lab: LabUp) -> Iterator[LabUp]:
    """After each test, whatever it did: Consul, api's app on vm2 and every controller running, the drain undone."""
    try:
        yield lab
    finally:
        sh(lab, "consul1", f"systemctl start {CONSUL_UNIT}")
        sh(lab, "vm2", f"systemctl start {API_APP_UNIT}")
        for host in CONTROLLERS:
            sh(lab, host, f"rm -f {NO_RESTART_DROPIN} && systemctl daemon-reload && "
                          f"systemctl reset-failed {CONTROLLER_UNIT}; systemctl start {CONTROLLER_UNIT}")
        wait_for(_consul_leader, bool, "Consul has a leader again", timeout=60)
        run_mesh("drain", "-i", str(INVENTORY), "api", "vm2", "--undo", timeout=120)


def _consul_leader() -> str:
    try:
        return str(consul(CONSUL, "/v1/status/leader"))
    except OSError:
        return ""


def _both_api_instances_served(lab: LabUp) -> None:
    """The starting point of a traffic test: web's Envoy on vm1 sends to api on vm2 and on dock1."""
    wait_for(lambda: web_api_hosts(lab), lambda seen: seen == BOTH,
             "web's Envoy on vm1 sending to both api instances (vm2, dock1)", timeout=PUSH_WAIT)


def _assert_no_failed_request(requests: list[Any], at_least: int = 50) -> None:
    assert len(requests) >= at_least, f"the request loop hardly ran ({len(requests)} requests): it proves nothing"
    failed = failures(requests)
    assert not failed, f"{len(failed)} of {len(requests)} requests failed: {failed[:20]}"


def _wait_for_api_hosts(lab: LabUp, wanted: set[str], what: str, timeout: float = PUSH_WAIT) -> None:
    wait_for(lambda: web_api_hosts(lab), lambda seen: seen == wanted, what, timeout=timeout)


# ---- drain ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delivery", DELIVERIES)
def test_drain_moves_every_request_off_vm2_with_no_failure_or_restart_and_undo_brings_them_back(
        delivered: LabUp, delivery: Delivery) -> None:
    lab = delivered
    _both_api_instances_served(lab)
    before = processes(lab)
    with traffic(lab) as trace:
        wait_for(lambda: trace.hosts(60), lambda seen: {"vm2", "dock1"} <= set(seen),
                 "requests answered by api on vm2 and on dock1 before the drain")
        drain("api", "vm2")
        _wait_for_api_hosts(lab, DOCK1_ONLY, "vm2's api out of web's Envoy on vm1 after `mesh drain api vm2`")
        drained_at = time.time() + 1.0  # a request already sent to vm2 ends within this
        time.sleep(6.0)
        if delivery == "xds":  # the last-known-good file follows once the change is quiet
            wait_for(lambda: web_api_file(lab), lambda seen: seen == DOCK1_ONLY,
                     "web's endpoint file on vm1 without vm2's api (the xds proxy's last-known-good config)",
                     timeout=FILES_QUIET_S + PUSH_WAIT)
        undone_at = time.time()
        assert web_api_file(lab) == DOCK1_ONLY, "web's endpoint file on vm1 still names vm2's api"
        drain("api", "vm2", undo=True)
        _wait_for_api_hosts(lab, BOTH, "vm2's api back in web's Envoy on vm1 after `mesh drain api vm2 --undo`")
        wait_for(lambda: trace.hosts(40), lambda seen: "vm2" in seen, "requests answered by vm2 again after --undo")
    requests = trace.requests
    _assert_no_failed_request(requests)
    drained = served_between(requests, drained_at, undone_at)
    assert "vm2" not in drained, f"requests reached vm2 while it was drained: {drained}"
    assert drained.get("dock1", 0) >= 20, f"too few requests while vm2 was drained to tell: {drained}"
    assert processes(lab) == before, "an Envoy or a checker was restarted, or a sidecar replaced"


# ---- an app that stops ---------------------------------------------------------------------------------------

def test_a_stopped_api_app_on_vm2_leaves_web_endpoints_and_comes_back_when_started(lab: LabUp) -> None:
    _both_api_instances_served(lab)
    with traffic(lab) as trace:
        systemctl(lab, "vm2", "stop", API_APP_UNIT)
        try:
            wait_for(lambda: web_api_file(lab), lambda seen: seen == DOCK1_ONLY,
                     "vm2's api out of web's endpoint file on vm1 (the checker's interval, then a push)",
                     timeout=PUSH_WAIT)
            _wait_for_api_hosts(lab, DOCK1_ONLY, "vm2's api out of web's Envoy on vm1")
            gone_at = time.time() + 1.0
            time.sleep(5.0)
            started_at = time.time()
        finally:
            systemctl(lab, "vm2", "start", API_APP_UNIT)
        wait_for(lambda: web_api_file(lab), lambda seen: seen == BOTH,
                 "vm2's api back in web's endpoint file on vm1 once its app started", timeout=PUSH_WAIT)
        _wait_for_api_hosts(lab, BOTH, "vm2's api back in web's Envoy on vm1")
        wait_for(lambda: trace.hosts(40), lambda seen: "vm2" in seen, "requests answered by vm2 again")
    gone = served_between(trace.requests, gone_at, started_at)
    assert "vm2" not in gone, f"requests reached vm2 while its app was stopped: {gone}"
    assert gone.get("dock1", 0) >= 20, f"too few requests while vm2's app was stopped to tell: {gone}"


# ---- certificate rotation ------------------------------------------------------------------------------------

ROTATIONS = 3
TTL_S = 60
# the controller renews a 1m leaf 15 s into its lifetime: the rotations after the first (of the deploy's leaves, which
# the controller sees once it re-reads the hosts' state, up to a minute later) take 15 s each, not 30 s at a half
RENEW_FRACTION = 0.25


def test_three_rotations_with_a_one_minute_ttl_fail_no_request_restart_nothing_and_keep_keys_home(
        lab: LabUp, tmp_path: Path) -> None:
    def one_minute(document: dict[str, Any]) -> None:
        document["all"]["vars"]["mesh_cert_ttl"] = f"{TTL_S // 60}m"
        document["all"]["vars"]["mesh_cert_renew_fraction"] = RENEW_FRACTION

    short = inventory_copy(tmp_path / "ttl", lab_state_dir(), edit=one_minute)
    try:
        started = time.monotonic()
        run = deploy(short)
        assert run.code == 0, f"a deploy with mesh_cert_ttl: 1m failed:\n{run}"
        print(f"deploy with mesh_cert_ttl 1m: {time.monotonic() - started:.1f} s")
        deployed_expire = time.monotonic() + TTL_S  # the deploy signed every leaf it issued before it ended
        before = processes(lab)
        history: dict[tuple[str, str], list[Leaf]] = {identity: [] for identity in IDENTITIES}
        problems: list[str] = []
        shown: dict[str, int] = {}

        def look() -> dict[str, int]:
            """Per identity: how many serials it went through (for a proxy, as its Envoy served them)."""
            for identity, leaf in leaves(lab).items():
                if isinstance(leaf, str):
                    problems.append(f"{identity}: {leaf}")
                elif not history[identity] or history[identity][-1] != leaf:
                    history[identity].append(leaf)
            seen = {f"{host}/{name}": _distinct(found) for (host, name), found in history.items()}
            if seen != shown:
                print(f"{time.monotonic() - started:.0f} s after the deploy started: serials seen {seen}")
                shown.update(seen)
            return seen

        with traffic(lab) as trace:
            wait_for(look, lambda seen: min(seen.values()) > ROTATIONS,
                     f"{ROTATIONS} rotations of every certificate (serials seen per identity)", timeout=420,
                     interval=2.0)
        print(f"{ROTATIONS} rotations seen {time.monotonic() - started:.1f} s after the deploy started")
        _assert_no_failed_request(trace.requests, at_least=200)
        assert processes(lab) == before, "an Envoy or a checker was restarted, or a sidecar replaced"
        last = leaves(lab)
        for identity, leaf in last.items():
            assert isinstance(leaf, Leaf), f"{identity}: {leaf}"
            if leaf.served is not None:
                assert leaf.served == (leaf.serial,), f"{identity}: Envoy serves {leaf.served}, the file is {leaf}"
        _assert_workload_keys_stay_home(lab, history)
        # once every certificate the deploy issued has expired, the checker's probes pass with its renewed one
        time.sleep(max(0.0, deployed_expire - time.monotonic()))
        wait_for(_checks_not_passing, lambda found: found == [],
                 "every instance's Consul checks passing (the checker probing with its renewed certificate)")
        print(f"checks passing {time.monotonic() - started:.1f} s after the deploy started")
    finally:
        deploy_lab_back(lab)


def _checks_not_passing() -> list[str]:
    found = []
    for service in ("web", "api", "db"):
        for entry in consul(CONSUL, f"/v1/health/service/{service}"):
            found += [f"{check['ServiceID']} {check['CheckID']}: {check['Status']} {check.get('Output', '')[:200]}"
                      for check in entry["Checks"] if check.get("ServiceID") and check["Status"] != "passing"]
    return found


def _distinct(found: list[Leaf]) -> int:
    """Serials an identity went through: a proxy's as its Envoy served them (one at a time), the checker's file."""
    if found and found[0].served is not None:
        return len({leaf.served for leaf in found if len(leaf.served or ()) == 1})
    return len({leaf.serial for leaf in found})


def _assert_workload_keys_stay_home(lab: LabUp, history: dict[tuple[str, str], list[Leaf]]) -> None:
    """No private key of a certificate seen in the test is on another node than its identity's, nor in the state
    dir (whose keys are the CA's)."""
    home = {leaf.public: host for (host, _name), found in history.items() for leaf in found}
    nodes = ("consul1", *CONTROLLERS, "vm1", "vm2", "dock1")
    found = [key for keys in parallel(nodes, lambda node: keys_on_node(lab, node)).values() for key in keys]
    state_keys = keys_in_folders([Path(lab_state_dir())])
    assert all("/ca/" in key.path for key in state_keys), \
        f"private keys in the state dir besides the CA's: {[key.path for key in state_keys]}"
    found += state_keys
    away = [f"{key.place}:{key.path} (the key of a {home[key.public]} certificate)" for key in found
            if key.public in home and key.place != home[key.public]]
    assert not away, f"workload private keys outside their host: {away}"
    own = {key.public for key in found if key.public in home}
    assert own, "no workload key found on its own host either: the search proves nothing"


# ---- high availability -----------------------------------------------------------------------------------------

def test_the_standby_takes_over_and_vm1_serves_its_last_config_with_every_controller_down(lab: LabUp) -> None:
    _both_api_instances_served(lab)
    active = _active_controller()
    standby = next(host for host in CONTROLLERS if host != active)
    assert controller_units(lab)[standby].endswith(" active"), f"the standby {standby} does not run"
    # the killed controller stays dead (else its restarted unit may take the lock back before the standby)
    out(lab, active, f"mkdir -p {Path(NO_RESTART_DROPIN).parent} && printf '[Service]\\nRestart=no\\n' > "
                     f"{NO_RESTART_DROPIN} && systemctl daemon-reload")
    systemctl(lab, active, "kill", "-s", "KILL", CONTROLLER_UNIT)
    wait_for(leader, lambda holder: holder == standby, f"{standby} taking over from the killed {active}",
             timeout=60, interval=1.0)
    drain("api", "vm2")
    _wait_for_api_hosts(lab, DOCK1_ONLY, f"a drain made after {standby} took over reaching web's Envoy on vm1")
    drain("api", "vm2", undo=True)
    _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")

    # every controller down, vm1 rebooted: it serves with the files it has
    for host in CONTROLLERS:
        sh(lab, host, f"systemctl stop {CONTROLLER_UNIT}")
    assert wait_for(leader, lambda holder: holder is None, "nobody holding the lock", timeout=60) is None
    files = out(lab, "vm1", "sha256sum /etc/mesh/proxies/*/xds/*.yaml")
    boot = out(lab, "vm1", "cat /proc/sys/kernel/random/boot_id").strip()
    sh(lab, "vm1", "systemctl reboot", timeout=30)
    wait_for(lambda: _boot_id(lab, "vm1"), lambda seen: seen not in ("", boot), "vm1 back from its reboot",
             timeout=240, interval=2.0)
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok,
             "web on vm1 serving web -> api -> db after its reboot with every controller down", timeout=120)
    _wait_for_api_hosts(lab, BOTH, "web's Envoy on vm1 with its last endpoints after the reboot", timeout=30)
    assert out(lab, "vm1", "sha256sum /etc/mesh/proxies/*/xds/*.yaml") == files, "vm1's resource files changed"

    # the controllers back: a new change flows
    for host in CONTROLLERS:
        sh(lab, host, f"rm -f {NO_RESTART_DROPIN} && systemctl daemon-reload && "
                      f"systemctl reset-failed {CONTROLLER_UNIT}; true")
        systemctl(lab, host, "start", CONTROLLER_UNIT)
    wait_for(leader, lambda holder: holder in CONTROLLERS, "a controller holding the lock again", timeout=60)
    drain("api", "vm2")
    _wait_for_api_hosts(lab, DOCK1_ONLY, "a drain made once the controllers are back reaching web's Envoy on vm1")
    drain("api", "vm2", undo=True)
    _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")


def _active_controller() -> str:
    holder = wait_for(leader, lambda found: found in CONTROLLERS, "a controller holding the lock", timeout=60)
    assert holder is not None
    return holder


def _boot_id(lab: LabUp, host: str) -> str:
    done = sh(lab, host, "cat /proc/sys/kernel/random/boot_id", timeout=15)
    return done.stdout.strip() if done.returncode == 0 else ""


# ---- Consul stopped ----------------------------------------------------------------------------------------------

def test_with_consul_stopped_no_proxy_loses_endpoints_staleness_rises_and_changes_flow_once_it_is_back(
        lab: LabUp) -> None:
    _both_api_instances_served(lab)
    active = _active_controller()
    files = endpoint_files(lab)
    with traffic(lab) as trace:
        systemctl(lab, "consul1", "stop", CONSUL_UNIT)
        try:
            first = wait_for(lambda: staleness(metrics(lab, active)), lambda value: value is not None and value >= 5,
                             f"the Consul staleness in {active}'s metrics rising", timeout=60)
            assert first is not None
            wait_for(lambda: staleness(metrics(lab, active)), lambda value: value is not None and value >= first + 5,
                     f"the Consul staleness in {active}'s metrics still rising", timeout=60)
            assert web_api_hosts(lab) == BOTH, "web's Envoy on vm1 lost api endpoints with Consul stopped"
            assert endpoint_files(lab) == files, "an endpoint file changed with Consul stopped"
        finally:
            systemctl(lab, "consul1", "start", CONSUL_UNIT)
    _assert_no_failed_request(trace.requests)
    wait_for(_consul_leader, bool, "Consul electing itself leader again", timeout=60)
    wait_for(lambda: _drain_runs(), bool, "`mesh drain api vm2` once Consul is back", timeout=60, interval=2.0)
    _wait_for_api_hosts(lab, DOCK1_ONLY, "a drain made once Consul is back reaching web's Envoy on vm1",
                        timeout=90)
    drain("api", "vm2", undo=True)
    _wait_for_api_hosts(lab, BOTH, "the drain's undo reaching web's Envoy on vm1")


def _drain_runs() -> bool:
    return run_mesh("drain", "-i", str(INVENTORY), "api", "vm2", timeout=120).code == 0


# ---- the controller's key --------------------------------------------------------------------------------------

def _tar(*members: tuple[str, bytes | str]) -> bytes:
    """A ustar archive: (name, content) for a regular file, (name, "->TARGET") for a symbolic link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = int(time.time())
            if isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                archive.addfile(info)
            else:
                data = content.encode() if isinstance(content, str) else content
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CANARY = "/root/mesh-e2e-canary"
PWNED = "mesh-e2e-pwned"
LDS = "resources: []\n"
BAD_ARCHIVES = {
    "a name climbing out to /etc/passwd": _tar(("../../etc/passwd", f"{PWNED}\n")),
    "a proxy's name then ../ to /etc/passwd": _tar(("web-8080/../../../../etc/passwd", f"{PWNED}\n")),
    "an absolute name": _tar((f"/tmp/{PWNED}", f"{PWNED}\n")),
    "xds/../ out of the proxy's folder": _tar((f"web-8080/xds/../../../../../tmp/{PWNED}.yaml", LDS)),
    "a symbolic link to /etc/passwd": _tar(("web-8080/xds/lds.yaml", "->/etc/passwd")),
    "an identity not on this host (vm2's api)": _tar(("api-9090/validate.yaml", LDS), ("api-9090/xds/lds.yaml", LDS)),
    "an identity nowhere": _tar(("nosuch/validate.yaml", LDS), ("nosuch/xds/lds.yaml", LDS)),
    "a remove line climbing out": _tar(("web-8080/validate.yaml", LDS),
                                       ("web-8080/remove", f"xds/../../../../..{CANARY}\n")),
}


def test_the_controllers_key_runs_no_shell_forwards_no_port_and_writes_only_in_meshs_folders(
        lab: LabUp, tmp_path: Path) -> None:
    key = controller_key(lab, "ctl1", tmp_path)
    vm1 = lab.hosts["vm1"]

    for command in ("id", "sh -c id", "state; id", "state && id", "csr web-8080; id", "/bin/sh"):
        done = ctl_ssh(key, vm1, command)
        assert done.returncode != 0 and b"uid=" not in done.stdout, (
            f"`{command}` as mesh-ctl with the controller's key: exit {done.returncode}, {done.stdout[:300]!r}")

    folders = "ls -d /etc/mesh/proxies/*/ /etc/mesh/proxies/*/tls* /etc/tls* 2>/dev/null; true"
    before = out(lab, "vm1", folders)
    for command in ("csr nosuch", "csr api-9090", "csr ../../etc", "install web-8080 20260101T000000-abcdef"):
        done = ctl_ssh(key, vm1, command, input=b"not a certificate\n")
        assert done.returncode != 0, f"`{command}` on vm1 succeeded: {done.stdout[:300]!r}"
    assert out(lab, "vm1", folders) == before, "a refused csr or install left a folder on vm1"

    state = ctl_ssh(key, vm1, "state")
    assert state.returncode == 0, f"`state` with the controller's key failed: {state.stderr!r}"
    records = [line.split() for line in state.stdout.decode().splitlines()]
    assert ["identity", "web-8080", "vm"] in records, f"`state` on vm1 does not name web-8080: {records}"
    on_host = {line.split()[1]: line.split()[0] for line in
               out(lab, "vm1", "cd /etc/mesh/proxies/web-8080 && sha256sum xds/*.yaml envoy.yaml").splitlines()}
    told = {record[2]: record[3] for record in records if record[0] == "file" and record[1] == "web-8080"}
    assert told == on_host, f"`state` does not tell web-8080's files as they are: {told} vs {on_host}"

    _assert_no_forwarding(key, vm1, lab)

    out(lab, "vm1", f"echo canary > {CANARY} && touch /root/mesh-e2e-marker && sleep 1")
    watched = "/etc/passwd /etc/shadow /etc/hostname"
    sums = out(lab, "vm1", f"sha256sum {watched}")
    try:
        for what, archive in BAD_ARCHIVES.items():
            done = ctl_ssh(key, vm1, "apply", input=archive)
            assert done.returncode != 0, f"`apply` with {what} succeeded: {done.stdout!r} {done.stderr!r}"
            assert b"applied" not in done.stdout, f"`apply` with {what}: {done.stdout!r}"
        assert out(lab, "vm1", f"sha256sum {watched}") == sums, "a file of /etc changed"
        assert out(lab, "vm1", f"cat {CANARY}") == "canary\n", "the canary file outside mesh's folders changed"
        # what any login writes (pam_motd's /run/motd.dynamic, the journal, sudo's and mesh-ctl's run files) aside
        left = out(lab, "vm1", (
            "ls -d /etc/mesh/proxies/nosuch /etc/mesh/proxies/api-9090 2>/dev/null; "
            "for r in / /tmp /var/tmp /dev/shm /run; do find $r -xdev -newer /root/mesh-e2e-marker -type f "
            "! -path '/var/log/*' ! -path '/etc/mesh/*' ! -path '/var/lib/systemd/*' ! -path '/run/systemd/*' "
            "! -path '/run/log/*' ! -path '/run/user/*' ! -path '/run/mesh-ctl/*' ! -path '/run/sudo/*' "
            "! -path /run/motd.dynamic 2>/dev/null; "
            "done; true"), timeout=180)
        assert left == "", f"the refused archives left files outside mesh's folders on vm1:\n{left}"
    finally:
        sh(lab, "vm1", f"rm -f {CANARY} /root/mesh-e2e-marker")
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db after the refused archives")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _banner(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
            conn.settimeout(3)
            return conn.recv(64)
    except OSError as exc:
        return f"no answer: {exc}".encode()


def _assert_no_forwarding(key: Path, address: str, lab: LabUp) -> None:
    """-W (stdio forwarding), -L (local) and -R (remote) to vm1's own sshd: none carries a byte of its banner."""
    stdio = subprocess.run([*ctl_argv(key, address, "-W", "127.0.0.1:22")], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30, check=False)
    assert b"SSH-2.0" not in stdio.stdout, f"ssh -W forwarded to vm1's sshd: {stdio.stdout[:200]!r}"

    local = _free_port()
    tunnel = subprocess.Popen([*ctl_argv(key, address, "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:22")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = wait_for(lambda: (tunnel.poll(), _banner(local)),
                        lambda state: state[0] is not None or not state[1].startswith(b"no answer"),
                        "ssh -L listening or gone", timeout=20)
        assert not seen[1].startswith(b"SSH-"), f"ssh -L forwarded to vm1's sshd: {seen[1]!r}"
    finally:
        tunnel.kill()
        tunnel.communicate()

    remote = _free_port()
    try:
        reverse = subprocess.run([*ctl_argv(key, address, "-N", "-o", "ExitOnForwardFailure=yes",
                                            "-R", f"127.0.0.1:{remote}:127.0.0.1:22")],
                                 stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
        assert reverse.returncode != 0, f"ssh -R was accepted: {reverse.stderr!r}"
    except subprocess.TimeoutExpired:
        listening = out(lab, "vm1", f"ss -Htln 'sport = :{remote}'")
        raise AssertionError(f"ssh -R stayed up (a remote forward accepted); on vm1: {listening!r}") from None

