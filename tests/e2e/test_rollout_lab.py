"""End to end on the lab (issue 17): how changes roll out.

- A cluster change (api's health interval) and a certificate renewal (a shorter mesh_cert_ttl) are moved into
  place under a request loop from vm1 through web's outbound listener to api: no failed request, the same Envoy
  PIDs and sidecar containers.
- An Envoy that refuses every config (MESH_ENVOY) stops the deploy in the plan phase, before any SSH login.
- A failure injected on vm2 mid-deploy: the other hosts finish, vm2 keeps serving its previous config, the retry
  file names it, and `--limit @<retry file>` converges it once the injection is gone (Envoy runs the new files).
- `--serial 1` with a change failing the health gate on the second host: it is restored, the rollout stops, the
  hosts after it are untouched, and a request loop counts no error.
- Reordering a host's workloads changes nothing; a removed workload and a host's last workload leave nothing.

Each test deploys copies of inventory/lab.yaml (the same state dir: the same CA and retry file) and deploys
inventory/lab.yaml back at its end. The module holds the shared lab lock throughout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import consul, hops, inventory_copy, out, sh, shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import (
    CONSUL,
    INVENTORY,
    chain_ok,
    converged,
    deploy,
    deploy_lab_back,
    envoy_processes,
    keys,
    lab_state_dir,
    plan_json,
    proxy_status,
    request_loop,
    retry_file,
    status_json,
)

Variables = dict[str, Any]
LAB_NODES = ("consul1", "ctl1", "vm1", "vm2", "dock1")


# whether inventory/lab.yaml was deployed back after the last test (by `restore`): the module's end then need not
# deploy it again
_BACK = {"deployed": False}


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        deploy_lab_back(up)
        try:
            yield up
        finally:
            if not _BACK["deployed"]:
                deploy_lab_back(up)
            Path(retry_file()).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _changing_the_lab(lab: LabUp) -> None:
    _BACK["deployed"] = False


@pytest.fixture
def restore(lab: LabUp) -> Iterator[LabUp]:
    """The lab; inventory/lab.yaml deployed back after the test, whatever it did."""
    try:
        yield lab
    finally:
        deploy_lab_back(lab)
        _BACK["deployed"] = True


def _copy(tmp_path: Path, name: str, edit: Any = None, **hosts: Any) -> Path:
    return inventory_copy(tmp_path / name, lab_state_dir(), edit=edit, hosts=hosts or None)


def _workload(variables: Variables, service: str) -> Variables:
    found = [w for w in variables["mesh_workloads"] if w["service"] == service]
    assert found, f"no {service} in {variables['mesh_workloads']}"
    return found[0]


def _interval(service: str, seconds: int) -> Any:
    def edit(variables: Variables) -> None:
        _workload(variables, service)["health"]["interval"] = f"{seconds}s"
    return edit


def _envoy_changes(document: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The planned changes on Envoy hosts (vm1, vm2, dock1), sorted."""
    return sorted(key for key in keys(document["changes"]) if key[0] in ("vm1", "vm2", "dock1"))


def _assert_reload_only(document: dict[str, Any], hosts: set[str]) -> None:
    """Every planned change on the Envoy hosts is a resource file (xds/) or a certificate: nothing restarts."""
    changes = _envoy_changes(document)
    assert {host for host, *_ in changes} == hosts, f"changes planned on other hosts than {hosts}: {changes}"
    restarting = [c for c in changes
                  if not ((c[1] == "file" and "/xds/" in c[2]) or c[1] in ("certificate", "consul"))]
    assert not restarting, f"the change is not only resource files and certificates: {restarting}"


def _assert_no_failed_request(loop: Any) -> None:
    assert loop.ok >= 20, f"the request loop hardly ran ({loop.ok} requests): it proves nothing"
    assert loop.failed == 0, f"{loop.failed} of {loop.ok + loop.failed} requests failed: {list(loop.errors)}"


# ---- changes Envoy reloads ---------------------------------------------------------------------------------

def test_a_cluster_change_reloads_under_a_request_loop_with_no_failed_request_or_restart(
        restore: LabUp, tmp_path: Path) -> None:
    lab = restore
    changed = _copy(tmp_path, "interval", vm2=_interval("api", 7), dock1=_interval("api", 7))
    planned = plan_json(changed)
    _assert_reload_only(planned, {"vm2", "dock1"})
    assert ("vm2", "file", "/etc/mesh/proxies/api-9090/xds/cds.yaml", "update") in keys(planned["changes"])
    processes = envoy_processes(lab)
    with request_loop(lab) as loop:
        run = deploy(changed)
    assert run.code == 0, str(run)
    _assert_no_failed_request(loop)
    assert envoy_processes(lab) == processes, "an Envoy was restarted or a sidecar replaced"
    converged(changed)  # the change converged
    report = status_json(changed)
    for host, proxy in (("vm2", "api-9090"), ("dock1", "api-api-v2-1")):
        assert proxy_status(report, host, proxy)["config"]["state"] == "applied", proxy_status(report, host, proxy)
    interval = out(lab, "vm2", "curl -s --unix-socket /etc/mesh/proxies/api-9090/admin/admin.sock "
                               "'http://admin/config_dump?resource=dynamic_active_clusters' | grep -c '\"7s\"' || true")
    assert int(interval.strip() or 0) >= 1, "api's Envoy on vm2 does not run the 7 s health interval"


def test_a_new_route_and_listener_reload_under_a_request_loop_with_no_failed_request_or_restart(
        restore: LabUp, tmp_path: Path) -> None:
    """web on vm1 gains db as an upstream: a listener, a route, a cluster and its endpoints added to the Envoy
    whose outbound listener to api the loop goes through; and db's allow filter (vm2) lets web in, since web now
    declares db (mesh_authz_default: declared)."""
    lab = restore

    def web_reaches_db(variables: Variables) -> None:
        _workload(variables, "web")["upstreams"].append({"service": "db", "local_port": 19102})

    changed = _copy(tmp_path, "route", vm1=web_reaches_db)
    planned = plan_json(changed)
    _assert_reload_only(planned, {"vm1", "vm2"})
    assert ("vm1", "file", "/etc/mesh/proxies/web-8080/xds/lds.yaml", "update") in keys(planned["changes"])
    on_vm2 = {change[2] for change in _envoy_changes(planned) if change[0] == "vm2"}
    assert on_vm2 == {"/etc/mesh/proxies/db-5432/xds/ecds.mesh.authz.allow.yaml"}, on_vm2
    processes = envoy_processes(lab)
    with request_loop(lab) as loop:
        run = deploy(changed)
    assert run.code == 0, str(run)
    _assert_no_failed_request(loop)
    assert envoy_processes(lab) == processes, "an Envoy was restarted or a sidecar replaced"
    converged(changed)  # the change converged
    line = out(lab, "vm1", "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', 19102), "
                           "timeout=5); s.sendall(b'hop\\n'); print(s.makefile().readline(), end='')\"")
    assert '"service": "db"' in line, f"web's new listener to db does not reach db: {line!r}"


CERTIFICATES = (("vm1", "web-8080"), ("vm2", "api-9090"), ("vm2", "db-5432"), ("dock1", "api-api-v2-1"))
MIN_TTL = 600  # mesh_cert_ttl's lower bound, 10m


def _certificate_times(lab: LabUp) -> list[tuple[int, int, int]]:
    """(issued, expires, now) of every proxy certificate, in seconds since the epoch."""
    found = []
    for host, proxy in CERTIFICATES:
        dates = out(lab, host, f"openssl x509 -in /etc/mesh/proxies/{proxy}/tls/cert.pem -noout -startdate "
                               "-enddate | cut -d= -f2 | xargs -I{} date -d {} +%s; date +%s")
        issued, expires, now = (int(value) for value in dates.split())
        found.append((issued, expires, now))
    return found


def _shorter_ttl(lab: LabUp) -> str:
    """A mesh_cert_ttl under which every proxy certificate is renewed at once: shorter than what each has left,
    or each past half its lifetime anyway (an earlier run may have left short-lived ones: lab.yaml's 24 h
    renews those only past half their lifetime). Waits, at most half a lifetime, while one is neither."""
    def ttl_for(times: list[tuple[int, int, int]]) -> int | None:
        ttl = max(MIN_TTL, min(expires - now for _, expires, now in times) // 2 // 60 * 60)
        due = all(expires - now > ttl or expires - now < (expires - issued) / 2 for issued, expires, now in times)
        return ttl if due else None

    times = wait_for(lambda: _certificate_times(lab), lambda seen: ttl_for(seen) is not None,
                     "every certificate renewable by a shorter mesh_cert_ttl", timeout=900, interval=10)
    ttl = ttl_for(times)
    assert ttl is not None
    return f"{ttl // 60}m"


def test_a_certificate_renewal_under_a_request_loop_has_no_failed_request_or_restart(
        restore: LabUp, tmp_path: Path) -> None:
    lab = restore

    ttl = _shorter_ttl(lab)

    def shorter_ttl(document: Variables) -> None:
        document["all"]["vars"]["mesh_cert_ttl"] = ttl

    changed = _copy(tmp_path, "ttl", edit=shorter_ttl)
    planned = plan_json(changed)
    _assert_reload_only(planned, {"vm1", "vm2", "dock1"})
    renewed = {host for host, kind, _subject, action in keys(planned["changes"])
               if kind == "certificate" and action == "renew"}
    assert renewed >= {"vm1", "vm2", "dock1"}, f"no renewal planned on every Envoy host: {planned}"
    serials_before = {(h, p): proxy_status(status_json(), h, p)["certificate"]["serial"]
                      for h, p in (("vm1", "web-8080"), ("vm2", "api-9090"), ("dock1", "api-api-v2-1"))}
    processes = envoy_processes(lab)
    with request_loop(lab) as loop:
        run = deploy(changed)
    assert run.code == 0, str(run)
    _assert_no_failed_request(loop)
    assert envoy_processes(lab) == processes, "an Envoy was restarted or a sidecar replaced"
    converged(changed)  # the renewal converged
    report = status_json(changed)
    for (host, proxy), serial in serials_before.items():
        found = proxy_status(report, host, proxy)
        assert found["certificate"]["serial"] != serial, f"{host} {proxy}: the certificate was not renewed"
        assert found["certificate"]["serial"] in found["certificate"]["served_serials"], \
            f"{host} {proxy}: Envoy does not serve the new certificate: {found['certificate']}"
        assert found["config"]["state"] == "applied", found


# ---- a plan Envoy refuses ----------------------------------------------------------------------------------

FAKE_ENVOY = """#!/bin/sh
echo "fake envoy for the tests: refusing every config ($*)" >&2
exit 1
"""


def _ssh_logins(lab: LabUp, host: str, since: float, until: float) -> int:
    window = f"--since @{math.floor(since)} --until @{math.ceil(until)}"
    text = out(lab, host, f"journalctl -u ssh.service {window} --no-pager -o cat "
                          "| grep -c 'Accepted publickey' || true")
    return int(text.strip() or 0)


def test_an_envoy_refusing_every_config_stops_the_deploy_before_any_ssh_login(
        lab: LabUp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "envoy"
    fake.write_text(FAKE_ENVOY)
    fake.chmod(0o755)
    processes = envoy_processes(lab)
    looked = time.time()
    time.sleep(1.1)  # the journal has second resolution: our own logins stay out of the window
    monkeypatch.setenv("MESH_ENVOY", str(fake))
    started = time.time()
    run = deploy(INVENTORY)
    finished = time.time()
    monkeypatch.delenv("MESH_ENVOY")
    time.sleep(1.1)
    assert run.code == 1, f"a plan refused by Envoy must exit 1:\n{run}"
    assert "refusing every config" in run.text and "Traceback" not in run.text, str(run)
    assert "PLAY RECAP" not in run.stdout, f"plays ran although Envoy refused the plan:\n{run}"
    assert _ssh_logins(lab, "vm1", looked - 60, started) > 0, "the journal shows no login, not even our own"
    logins = {host: _ssh_logins(lab, host, started, finished) for host in LAB_NODES}
    assert logins == dict.fromkeys(LAB_NODES, 0), (
        f"the deploy logged in to hosts before its plan was refused by the local Envoy: {logins} (the local check "
        f"must come before the trust phase reads every host's CA bundle)\n{run}")
    assert envoy_processes(lab) == processes


# ---- a failure injected on one host ------------------------------------------------------------------------

DB_CDS = "/etc/mesh/proxies/db-5432/xds/cds.yaml"


def test_a_failure_on_one_host_leaves_it_serving_and_the_retry_file_converges_it(
        restore: LabUp, tmp_path: Path) -> None:
    lab = restore
    changed = _copy(tmp_path, "failure", vm1=_interval("web", 7), vm2=_interval("db", 7),
                    dock1=_interval("api", 7))
    planned = keys(plan_json(changed)["changes"])
    assert ("vm2", "file", DB_CDS, "update") in planned, sorted(planned)
    retry = Path(retry_file())
    retry.unlink(missing_ok=True)
    old = out(lab, "vm2", f"sha256sum {DB_CDS}")
    out(lab, "vm2", f"chattr +i {DB_CDS}")  # mesh cannot move a new cds.yaml over it
    try:
        run = deploy(changed)
        recap = run.recap()
        assert run.code == 2, str(run)
        assert recap["vm2"]["failed"] == 1, str(run)
        for host in ("vm1", "dock1", "ctl1"):
            assert (recap[host]["failed"], recap[host]["unreachable"]) == (0, 0), f"{host}: {recap[host]}\n{run}"
        for host in ("vm1", "dock1"):
            assert recap[host]["changed"] > 0, f"{host} was not deployed beside the failing vm2:\n{run}"
        assert out(lab, "vm2", f"sha256sum {DB_CDS}") == old, "vm2's db config changed"
        assert retry.read_text() == "vm2\n", f"the retry file does not name vm2 alone: {retry.read_text()!r}"
        assert proxy_status(status_json(changed), "vm2", "db-5432")["config"]["state"] != "files newer than running"
        wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db (on the failed vm2) still served")
    finally:
        sh(lab, "vm2", f"chattr -i {DB_CDS}")
    again = deploy(changed, "--limit", f"@{retry}")
    assert again.code == 0, str(again)
    assert set(again.recap()) == {"vm2"}, f"--limit @{retry} deployed other hosts than vm2:\n{again}"
    assert not retry.exists(), "the retry file is still there after its hosts converged"
    converged(changed)  # vm2 converged
    db = proxy_status(status_json(changed), "vm2", "db-5432")
    assert db["config"]["state"] == "applied", f"db's Envoy does not run the files it owes: {db['config']}"
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db after vm2 converged")


# ---- a serial rollout stopped by the health gate ---------------------------------------------------------------

# dock1's resource files but the upstream endpoints (the controller's: they follow Consul's health at any time)
DOCK1_DEPLOYS_FILES = ("sha256sum $(ls /etc/mesh/proxies/api-api-v2-1/xds/*.yaml | grep -v /eds.upstream-)")


def test_serial_1_stops_at_a_health_gate_failure_on_the_second_host_with_no_failed_request(
        restore: LabUp, tmp_path: Path) -> None:
    """db (a TCP app) gets an HTTP health check: its Envoy then finds the app unhealthy, which it was not
    before, so the gate fails on vm2; vm1 (web's interval) comes first and passes; dock1 comes after."""
    lab = restore

    def db_http_health(variables: Variables) -> None:
        _workload(variables, "db")["health"] = {"http": "/healthz"}

    changed = _copy(tmp_path, "gate", vm1=_interval("web", 7), vm2=db_http_health, dock1=_interval("api", 7))
    planned = keys(plan_json(changed)["changes"])
    assert ("vm2", "file", DB_CDS, "update") in planned and {h for h, *_ in planned} >= {"vm1", "vm2", "dock1"}, \
        sorted(planned)
    old = {path: out(lab, "vm2", f"sha256sum {path}") for path in
           (DB_CDS, "/etc/mesh/proxies/db-5432/envoy.yaml", "/etc/mesh/proxies/db-5432/xds/lds.yaml")}
    dock1_before = out(lab, "dock1", DOCK1_DEPLOYS_FILES)
    with request_loop(lab) as loop:
        run = deploy(changed, "--serial", "1")
    recap = run.recap()
    assert run.code == 2, str(run)
    assert recap.get("vm1", {}).get("failed") == 0 and recap["vm1"]["changed"] > 0, str(run)
    assert recap.get("vm2", {}).get("failed") == 1, str(run)
    assert "health gate failed on vm2" in run.text and "db-5432" in run.text, str(run)
    assert "STOPPED" in run.stdout, f"no STOPPED line: the rollout went on:\n{run}"
    assert {path: out(lab, "vm2", f"sha256sum {path}") for path in old} == old, "vm2's db files were not restored"
    assert out(lab, "dock1", DOCK1_DEPLOYS_FILES) == dock1_before, \
        "dock1, after the failed host, was deployed"
    after = keys(plan_json(changed)["changes"])
    assert not [c for c in after if c[0] == "vm1"], f"vm1 (before the failure) did not converge: {sorted(after)}"
    assert ("vm2", "file", DB_CDS, "update") in after, sorted(after)
    assert any(c[0] == "dock1" for c in after), f"dock1's change is gone from the plan: {sorted(after)}"
    _assert_no_failed_request(loop)
    wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db after the stopped rollout")


# ---- reordering and removal --------------------------------------------------------------------------------

def _vm2_leftovers(lab: LabUp) -> str:
    """Anything of db-5432 on vm2: unit, user, folder, rollback tar, files naming it, firewall ports (/etc's
    `-` backups of passwd and group that userdel keeps are not mesh's)."""
    return out(lab, "vm2", (
        "systemctl list-unit-files --no-legend 'mesh-envoy-db-5432*' | sed 's/^/unit: /'; "
        "getent passwd mesh-db-5432 | sed 's/^/user: /'; "
        "find / -xdev -name '*db-5432*' 2>/dev/null | sed 's/^/path: /'; "
        "grep -rls --exclude='*-' 'db-5432' /etc /var/lib/mesh /usr/local/lib/mesh 2>/dev/null "
        "| sed 's/^/names it: /'; "
        "nft list table inet mesh 2>/dev/null | grep -E '\\b(21001|5432)\\b' | sed 's/^/nft: /'; true"),
        timeout=120)


def _vm1_leftovers(lab: LabUp) -> str:
    """Anything of mesh on vm1 (the lab's demo app, mesh-demo-web, is not mesh's): units, users, files, the
    proxies' folder, the firewall table."""
    return out(lab, "vm1", (
        "systemctl list-unit-files --no-legend 'mesh-*' | grep -v '^mesh-demo-' | sed 's/^/unit: /'; "
        "systemctl list-units --all --no-legend --plain 'mesh-*' | grep -v -e '^mesh-demo-' -e not-found "
        "| sed 's/^/loaded unit: /'; "
        "getent passwd | grep '^mesh-' | sed 's/^/user: /'; "
        "find /etc/mesh /usr/local/lib/mesh /var/lib/mesh \\( -type f -o -type l \\) 2>/dev/null "
        "| sed 's/^/file: /'; "
        "find /etc/systemd/system -name 'mesh-*' ! -name 'mesh-demo-*' | sed 's/^/unit file: /'; "
        "[ -e /etc/mesh/proxies ] && echo 'folder: /etc/mesh/proxies'; "
        "nft list table inet mesh >/dev/null 2>&1 && echo 'nft: table inet mesh'; true"), timeout=120)


def test_reordered_workloads_change_nothing_and_removed_ones_leave_nothing_behind(
        restore: LabUp, tmp_path: Path) -> None:
    lab = restore

    def reversed_workloads(variables: Variables) -> None:
        """vm2's workloads in the other order, each with the proxy and metrics ports it has now (a port left out
        is given by position: 21000 and 20000 for the first), so only the order changes."""
        workloads = variables["mesh_workloads"]
        for index, workload in enumerate(workloads):
            workload.setdefault("proxy_port", 21000 + index)
            workload.setdefault("metrics_port", 20000 + index)
        variables["mesh_workloads"] = list(reversed(workloads))

    reordered = _copy(tmp_path, "reordered", vm2=reversed_workloads)
    converged(reordered)  # reordering vm2's workloads plans no change

    def without_db(variables: Variables) -> None:
        variables["mesh_workloads"] = [w for w in variables["mesh_workloads"] if w["service"] != "db"]
        for workload in variables["mesh_workloads"]:
            workload.pop("upstreams", None)  # api's only upstream is db

    def api_without_db(variables: Variables) -> None:
        _workload(variables, "api").pop("upstreams", None)

    no_db = _copy(tmp_path, "no-db", vm2=without_db, dock1=api_without_db)
    removal = deploy(no_db)
    assert removal.code == 0, str(removal)
    assert _vm2_leftovers(lab) == "", f"db-5432 left things on vm2:\n{_vm2_leftovers(lab)}"
    assert "db-vm2-5432" not in {e["ServiceID"] for e in consul(CONSUL, "/v1/catalog/service/db")}
    converged(no_db)  # the removal converged
    # the demo api app still calls db at its local port, where nothing listens now: an error hop for db only
    wait_for(lambda: hops(lab, "vm1", 8080),
             lambda seen: not isinstance(seen, str) and [h.get("service") for h in seen[:2]] == ["web", "api"]
             and not any("error" in h for h in seen[:2]), "web -> api without db")

    def no_workloads(variables: Variables) -> None:
        variables.pop("mesh_workloads")

    empty_vm1 = _copy(tmp_path, "empty-vm1", vm1=no_workloads, vm2=without_db, dock1=api_without_db)
    retired = deploy(empty_vm1)
    assert retired.code == 0, str(retired)
    assert _vm1_leftovers(lab) == "", f"mesh left things on vm1 after its last workload left:\n{_vm1_leftovers(lab)}"
    assert "web-vm1-8080" not in {e["ServiceID"] for e in consul(CONSUL, "/v1/catalog/service/web")}
    converged(empty_vm1)  # the retired vm1 converged
