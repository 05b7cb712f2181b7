"""End to end on the lab: `mesh status --json` on the deployed lab lists every proxy (VM units and dock1's
sidecar) running, with the serial of the certificate on its host (read there with openssl) as the one Envoy
serves, and no problem; piped, the table has no escape codes. A bootstrap moved in by hand, nothing restarted,
shows as a file that differs and as files newer than running (a restart owed), exit 2; put back, healthy again,
the same Envoy PID throughout (status restarts nothing). The drift tests of `mesh plan` are elsewhere.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab), deploys, and leaves the lab
deployed with the files it found.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from deploy_helpers import INVENTORY, Run, out, run_mesh, sh, shared_lab
from lab_helpers import LabUp

from mesh.config import paths
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory

DEPLOY_TIMEOUT = 600.0
STATUS_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        yield up


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    run = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    if run.code != 0:
        pytest.fail(f"the deploy failed, so there is no status to read:\n{run}")
    return lab


def _proxies() -> dict[str, list[str]]:
    """host -> its proxies' names, as the inventory makes them."""
    mesh = check_inventory(load_inventory(str(INVENTORY)), str(INVENTORY)).mesh
    return {host.name: [paths.proxy_name(workload) for workload in host.workloads]
            for host in mesh.hosts if host.workloads}


def _status_json() -> tuple[Run, dict[str, Any]]:
    run = run_mesh("status", "--json", str(INVENTORY), timeout=STATUS_TIMEOUT)
    try:
        return run, json.loads(run.stdout)
    except ValueError:
        raise AssertionError(f"`mesh status --json` printed no JSON:\n{run}") from None


def _proxy(data: dict[str, Any], host: str, proxy: str) -> dict[str, Any]:
    found = next(item for item in data["hosts"] if item["host"] == host)
    return next(item for item in found["proxies"] if item["proxy"] == proxy)


def _serial_on_host(lab: LabUp, host: str, proxy: str) -> str:
    text = out(lab, host, f"openssl x509 -noout -serial -in {shlex.quote(paths.cert_path(proxy))}")
    return format(int(text.strip().split("=", 1)[1], 16), "x")


def test_every_proxy_runs_its_files_and_serves_the_certificate_on_its_host(deployed: LabUp) -> None:
    run, data = _status_json()
    assert run.code == 0 and data["healthy"], run
    for host, proxies in _proxies().items():
        for name in proxies:
            proxy = _proxy(data, host, name)
            serial = _serial_on_host(deployed, host, name)
            assert proxy["envoy"]["running"] and proxy["envoy"]["version"], proxy["envoy"]
            assert proxy["config"]["state"] == "applied" and proxy["config"]["running_compared"], proxy["config"]
            assert (proxy["certificate"]["serial"], proxy["certificate"]["served_serials"]) == (serial, [serial])
            assert proxy["problems"] == []
            assert proxy["runs_as"] == ("sidecar" if host == "dock1" else "systemd")
    table = run_mesh("status", str(INVENTORY), timeout=STATUS_TIMEOUT)
    assert table.code == 0, table
    assert "\x1b" not in table.stdout and table.stdout.isascii()


def test_a_bootstrap_moved_in_by_hand_is_newer_than_what_runs_until_put_back(deployed: LabUp) -> None:
    proxy = _proxies()["vm1"][0]
    bootstrap, unit = paths.envoy_config_path(proxy), paths.envoy_unit_name(proxy)
    pid = out(deployed, "vm1", f"systemctl show -p MainPID --value {unit}").strip()
    original = out(deployed, "vm1", f"cat {bootstrap}")
    running_hash = yaml.safe_load(original)["node"]["metadata"]["mesh_bootstrap_sha256"]
    edited = original.replace(running_hash, "f" * 64)
    saved = f"{bootstrap}.status-test"
    out(deployed, "vm1", f"cp -p {bootstrap} {saved} && cat > {bootstrap}.new && chmod --reference={saved} "
                         f"{bootstrap}.new && chown --reference={saved} {bootstrap}.new && mv {bootstrap}.new {bootstrap}",
        input=edited)
    try:
        run, data = _status_json()
        assert run.code == 2 and not data["healthy"], run
        config = _proxy(data, "vm1", proxy)["config"]
        assert config["differing_files"] == [{"path": bootstrap, "reason": "content differs"}]
        assert config["newer_than_running"] == [{"what": "bootstrap", "running": running_hash, "on_disk": "f" * 64,
                                                 "owed": "restart"}]
        assert any(problem.startswith("files newer than running: bootstrap")
                   for problem in _proxy(data, "vm1", proxy)["problems"])
    finally:
        sh(deployed, "vm1", f"mv {saved} {bootstrap}")
    run, data = _status_json()
    assert run.code == 0 and _proxy(data, "vm1", proxy)["config"]["state"] == "applied", run
    assert out(deployed, "vm1", f"systemctl show -p MainPID --value {unit}").strip() == pid
