"""End to end on the lab (issue 17): `mesh plan` says `no changes` on a deployed lab; drift made by hand on vm1
(a resource file edited, its Envoy unit stopped, mesh's nft chain flushed) and on dock1 (a sidecar removed)
shows in the plan, which changes nothing; `plan --json` lists the same changes as the following
`deploy --json`, and after that deploy the plan says `no changes` again and requests go through.

The module holds the shared lab lock throughout and leaves inventory/lab.yaml deployed.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import pytest
from deploy_helpers import hops, host_files, out, sh, shared_lab, wait_for
from lab_helpers import LabUp
from rollout_helpers import (
    CHECKER_INSTALL,
    INVENTORY,
    chain_ok,
    converged,
    deploy_json,
    deploy_lab_back,
    keys,
    plan,
    plan_json,
)

WEB_PROXY = "web-8080"
WEB_UNIT = "mesh-envoy-web-8080.service"
EDITED = f"/etc/mesh/proxies/{WEB_PROXY}/xds/cds.yaml"
SIDECAR = "mesh-envoy-api-api-v2-1"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    with shared_lab() as up:
        deploy_lab_back(up)
        try:
            yield up
        finally:
            deploy_lab_back(up)


def _deploys_files(lab: LabUp, host: str) -> str:
    """host_files without the upstream endpoint files: the controller rewrites those whenever Consul's health
    changes (a removed sidecar makes its instance critical), plan or no plan."""
    return "\n".join(line for line in host_files(lab, host).splitlines() if "/xds/eds.upstream-" not in line)


def _vm1_state(lab: LabUp) -> dict[str, str]:
    """What the plan must not change on vm1: every mesh file's hash, mode and owner (the controller's endpoint
    files aside), the units, the nft table."""
    return {
        "files": _deploys_files(lab, "vm1"),
        "units": out(lab, "vm1", f"systemctl show -p MainPID -p ActiveState -p SubState -p UnitFileState {WEB_UNIT} "
                                 "mesh-firewall.service"),
        "nft": sh(lab, "vm1", "nft list table inet mesh").stdout,
    }


def _dock1_state(lab: LabUp) -> dict[str, str]:
    return {
        "files": _deploys_files(lab, "dock1"),
        "containers": out(lab, "dock1", "docker ps -a --no-trunc --format '{{.ID}} {{.Names}} {{.Status}}' | sort "
                                        "| sed 's/ Up .*/ Up/'"),
    }


def test_a_deployed_lab_plans_no_changes(lab: LabUp) -> None:
    run = plan(INVENTORY)
    assert run.code == 0, str(run)
    document = plan_json(INVENTORY)
    assert document["unreachable"] == {}, document
    assert keys(document["changes"]) <= {CHECKER_INSTALL}, f"a converged lab plans changes:\n{run}"
    if not document["changes"]:  # (the sources did not change since the deploy)
        assert run.stdout.strip().splitlines()[-1:] == ["no changes"], f"no `no changes`:\n{run}"
        assert document["summary"] == "no changes", document


def test_drift_shows_in_a_plan_that_changes_nothing_and_the_deploy_lists_the_same_changes(lab: LabUp) -> None:
    before_drift = {"file": out(lab, "vm1", f"sha256sum {EDITED}"), "nft": out(lab, "vm1", "nft list table inet mesh")}
    assert "connect_timeout: 1s" in out(lab, "vm1", f"cat {EDITED}"), "the lab's cds.yaml has no 1 s connect timeout"
    try:
        # the drift: an edited resource file, a stopped Envoy, a flushed chain, a removed sidecar
        out(lab, "vm1", f"sed -i 's/connect_timeout: 1s/connect_timeout: 3s/' {EDITED}")
        out(lab, "vm1", f"systemctl stop {WEB_UNIT}")
        out(lab, "vm1", "nft flush chain inet mesh input")
        out(lab, "dock1", f"docker rm -f {SIDECAR}")
        vm1, dock1 = _vm1_state(lab), _dock1_state(lab)

        text = plan(INVENTORY)
        document = plan_json(INVENTORY)

        # the plan changed nothing
        assert _vm1_state(lab) == vm1, "`mesh plan` changed vm1"
        assert _dock1_state(lab) == dock1, "`mesh plan` changed dock1"
        # it shows each change, the edit as a diff
        assert text.code == 0, str(text)
        for line in (f"update file {EDITED}", f"start unit {WEB_UNIT}", "load firewall inet mesh",
                     f"create sidecar {SIDECAR}"):
            assert line in text.stdout, f"the plan does not show `{line}`:\n{text}"
        assert "-  connect_timeout: 3s" in text.stdout and "+  connect_timeout: 1s" in text.stdout, \
            f"no diff of the edited file:\n{text}"
        planned = keys(document["changes"])
        expected = {("vm1", "file", EDITED, "update"), ("vm1", "unit", WEB_UNIT, "start"),
                    ("vm1", "firewall", "inet mesh", "load"), ("dock1", "sidecar", SIDECAR, "create")}
        assert expected <= planned, f"missing from `plan --json`: {expected - planned}\n{document}"
        assert {host for host, *_ in planned - {CHECKER_INSTALL}} == {"vm1", "dock1"}, \
            f"the plan has changes on hosts nobody touched: {sorted(planned)}"

        # the deploy lists the same changes and puts everything back
        run, deployed = deploy_json(INVENTORY)
        assert run.code == 0, str(run)
        assert keys(deployed["changes"]) - {CHECKER_INSTALL} == planned - {CHECKER_INSTALL}, (
            f"`deploy --json` and `plan --json` differ:\nonly planned: {sorted(planned - keys(deployed['changes']))}\n"
            f"only deployed: {sorted(keys(deployed['changes']) - planned)}")
        assert deployed["exit_code"] == 0 and set(deployed["recap"]) >= {"vm1", "dock1"}, deployed

        converged(INVENTORY)  # the deploy converged the drift
        assert out(lab, "vm1", f"sha256sum {EDITED}") == before_drift["file"]
        assert out(lab, "vm1", "nft list table inet mesh") == before_drift["nft"], "the chain was not loaded again"
        assert out(lab, "vm1", f"systemctl is-active {WEB_UNIT}").strip() == "active"
        assert out(lab, "dock1", f"docker container inspect -f '{{{{.State.Status}}}}' {SIDECAR}").strip() == "running"
        wait_for(lambda: hops(lab, "vm1", 8080), chain_ok, "web -> api -> db through the mesh after the deploy",
                 timeout=60)
    finally:
        sh(lab, "vm1", f"systemctl start {WEB_UNIT}")
        sh(lab, "vm1", f"grep -q 'connect_timeout: 3s' {shlex.quote(EDITED)} && "
                       f"sed -i 's/connect_timeout: 3s/connect_timeout: 1s/' {shlex.quote(EDITED)}")
