"""`mesh plan` and `mesh deploy --json` on fake VMs, as a user runs them: the plan of a new host lists what a
deploy would do and changes nothing; the deploy that follows makes the same changes (the same JSON change set);
after it the plan says `no changes`, and a hand edit shows up with its diff until the next deploy reverts it."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest

from mesh.config import paths
from mesh.deploy.command import DeployOptions, deploy
from mesh.deploy.plan_command import plan
from mesh.hosts.connection import CommandResult
from mesh.testing.fake_connector import FakeFleet, FakeHost
from mesh.testing.fake_openssl import stub_openssl

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: test.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
  children:
    mesh_controllers:
      hosts:
        ctl1: {ansible_host: 10.0.0.3}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {service: web, port: 8080}
"""
OK = CommandResult(0, b"", b"")


def _vm(host: FakeHost) -> None:
    stub_openssl(host)
    host.stub(r"command -v openssl", OK)
    host.stub(r"^runuser -u mesh-web-8080 -- /usr/local/lib/mesh/envoy --mode validate", OK)
    host.stub(r"systemd-analyze verify", OK)
    host.write(paths.NFT_BINARY, b"", 0o755)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeFleet:
    monkeypatch.chdir(tmp_path)  # mesh_state_dir is relative to the inventory's folder; the retry file too
    (tmp_path / "inventory.yml").write_text(textwrap.dedent(INVENTORY))
    made = FakeFleet()
    _vm(made.host("vm1"))
    return made


def run_plan(fleet: FakeFleet, *args: str, **options: object) -> tuple[int, str]:
    out = io.StringIO()
    code = plan("inventory.yml", limit="vm1", output=out, connector_factory=fleet.connect, **options)  # type: ignore[arg-type]
    return code, out.getvalue()


def test_the_plan_of_a_new_host_lists_the_deploy_and_changes_nothing(fleet: FakeFleet, tmp_path: Path) -> None:
    code, out = run_plan(fleet)
    assert code == 0, out
    assert "a deploy would make one" in out and not (tmp_path / "state" / "ca").exists()
    assert "vm1: " in out and "  create user mesh-web-8080" in out
    assert f"  create file {paths.envoy_config_path('web-8080')} (restarts its proxy)" in out
    assert "+++ b/etc/mesh/proxies/web-8080/envoy.yaml" in out  # with its diff
    assert out.rstrip().splitlines()[-1].startswith("Plan: ") and "on 1 host(s) (0 removal(s))" in out
    vm1 = fleet.host("vm1")
    assert vm1.puts == [] and not vm1.users and not vm1.running
    assert all(cmd.startswith(("PATH=", "printf")) for cmd in vm1.commands), vm1.commands  # reads only


def test_plan_json_and_the_deploy_json_list_the_same_changes_then_no_changes(fleet: FakeFleet,
                                                                              tmp_path: Path) -> None:
    _, planned_out = run_plan(fleet, as_json=True)
    planned = planned_out[planned_out.index('{\n  "changes"'):]  # after the transcript (stderr for a user)
    # The CA the deploy makes is another than the plan's stand-in: issue the same certificates all the same.
    out = io.StringIO()
    deploy("inventory.yml", DeployOptions(limit="vm1", json=True), output=out, connector_factory=fleet.connect)
    text = out.getvalue()
    deployed = json.loads(text[text.index('{\n  "changes"'):])
    assert [(c["kind"], c["subject"], c["action"]) for c in json.loads(planned)["changes"]] == \
        [(c["kind"], c["subject"], c["action"]) for c in deployed["changes"]]
    assert deployed["recap"]["vm1"]["failed"] == 0 and deployed["recap"]["vm1"]["changed"] > 0
    code, again = run_plan(fleet)
    assert (code, again.rstrip().splitlines()[-1]) == (0, "no changes"), again


def test_a_hand_edit_shows_in_the_plan_with_its_diff_and_the_next_deploy_reverts_it(fleet: FakeFleet) -> None:
    deploy("inventory.yml", DeployOptions(limit="vm1"), output=io.StringIO(), connector_factory=fleet.connect)
    vm1 = fleet.host("vm1")
    cds = f"{paths.xds_dir('web-8080')}/cds.yaml"
    deployed = vm1.files[cds].data or b""
    vm1.files[cds].data = deployed.replace(b"connect_timeout", b"connect_timeout_edited", 1)
    vm1.units["mesh-firewall.service"].active = "inactive"  # a stopped unit
    code, out = run_plan(fleet)
    assert code == 0
    assert f"  update file {cds} (content, Envoy reloads it)" in out
    assert "    -" in out and "connect_timeout_edited" in out  # the diff shows the edit going away
    assert "  start unit mesh-firewall.service (inactive)" in out
    assert out.rstrip().splitlines()[-1] == "Plan: 2 change(s) on 1 host(s) (0 removal(s))"
    assert vm1.files[cds].data != deployed  # the plan changed nothing
    deploy("inventory.yml", DeployOptions(limit="vm1"), output=io.StringIO(), connector_factory=fleet.connect)
    assert vm1.files[cds].data == deployed and vm1.units["mesh-firewall.service"].active == "active"
    assert run_plan(fleet)[1].rstrip().splitlines()[-1] == "no changes"
