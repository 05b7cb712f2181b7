"""The controllers' access as the plan holds it (mesh.plan.build, mesh.plan.access): the mesh-ctl account, its
forced-command keys, sudo rule, script and identities on every managed host, the controller's files on
controllers, and what observe and cleanup make of them (mesh.plan.changes): a controller that leaves loses its
line, a host that leaves loses everything, and a running controller's endpoint files are not the plan's to judge.
Also the deploy's reading of known_hosts, the controller's state, and its wait for the new plan."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from test_controller_spec_build import INVENTORY, KEYS, KNOWN
from test_plan_changes import converged, no_reason

from mesh.controller import spec as controller_spec
from mesh.deploy.command import wait_for_controller
from mesh.deploy.controller_inputs import known_hosts_lines, state_updated_at
from mesh.deploy.display import Display
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh
from mesh.plan import access
from mesh.plan.build import ControllerInputs, PlanInputs, build_plan
from mesh.plan.changes import host_changes
from mesh.plan.model import Plan

SCRIPT = b"#!/bin/sh\n# mesh-ctl\n"
FORCED = 'restrict,command="sudo -n /usr/local/lib/mesh/mesh-ctl \\"$SSH_ORIGINAL_COMMAND\\""'


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def plan_of(mesh: Mesh, hosts: list[ManagedHost] | None = None, **controller: object) -> Plan:
    inputs = replace(ControllerInputs(keys=KEYS, known_hosts=KNOWN, issuer_cert=b"intermediate pem",
                                      issuer_key=b"intermediate key", ctl_script=SCRIPT), **controller)
    return build_plan(mesh, PlanInputs(b"root pem", "00:11", envoy_sha256="e" * 64, sidecar_image="mesh-envoy:abc",
                                       controller=inputs), hosts)


def text(plan: Plan, host: str, path: str) -> str:
    return plan.host(host).file(path).content.decode()


def test_every_managed_host_gets_the_account_with_one_forced_restricted_key_per_controller(mesh: Mesh) -> None:
    plan = plan_of(mesh)
    for host in ("ctl1", "ctl2", "vm1", "vm2", "dock1"):
        planned = plan.host(host)
        assert "mesh-ctl" in planned.users
        keys = [line for line in text(plan, host, access.CTL_AUTHORIZED_KEYS).splitlines() if not line.startswith("#")]
        assert keys == [f"{FORCED} ssh-ed25519 AAAActl1key mesh-controller@ctl1",
                        f"{FORCED} ssh-ed25519 AAAActl2key mesh-controller@ctl2"]
        modes = {f.path: (f.mode, f.owner, f.group) for f in planned.files}
        assert modes[access.CTL_AUTHORIZED_KEYS] == (0o644, "root", "root")
        assert modes[controller_spec.CTL_SCRIPT] == (0o755, "root", "root")
        assert modes[controller_spec.CTL_SUDOERS] == (0o440, "root", "root")
        assert planned.file(controller_spec.CTL_SCRIPT).content == SCRIPT
        folders = {f.path: (f.mode, f.owner) for f in planned.every_folder()}
        assert folders[controller_spec.CTL_HOME] == folders[access.CTL_SSH_DIR] == (0o755, "root")  # not mesh-ctl's
    assert "consul1" not in {host.name for host in plan.hosts}


def test_sudo_allows_the_script_alone_and_visudo_checks_the_rule_before_it_is_moved_in(mesh: Mesh) -> None:
    sudoers = plan_of(mesh).host("vm1").file(controller_spec.CTL_SUDOERS)
    assert "mesh-ctl ALL=(root) NOPASSWD: /usr/local/lib/mesh/mesh-ctl *\n" in sudoers.content.decode()
    assert sudoers.check == "visudo -cf %s"


def test_identities_name_each_proxy_with_its_owner_and_trust_and_the_checker_on_controllers(mesh: Mesh) -> None:
    plan = plan_of(mesh)

    def lines(host: str) -> list[str]:
        return [line for line in text(plan, host, controller_spec.CTL_IDENTITIES).splitlines()
                if not line.startswith("#")]
    assert lines("vm1") == [("web-8080 vm /etc/mesh/proxies/web-8080 mesh-web-8080 web "
                            "/etc/mesh/proxies/web-8080/ca.pem -")]
    sidecar_uid = plan.host("dock1").proxies[0].user
    assert sidecar_uid.isdigit()
    assert lines("dock1") == [(f"api-api-v2-1 container /etc/mesh/proxies/api-api-v2-1 {sidecar_uid} api "
                              "/etc/mesh/proxies/api-api-v2-1/ca.pem mesh-envoy:abc")]
    assert lines("ctl1") == ["checker checker /etc/mesh/checker mesh-checker health /etc/mesh/checker/ca.pem -"]


def test_a_controller_gets_its_intermediate_readable_by_its_user_alone_and_envoy(mesh: Mesh) -> None:
    ctl1 = plan_of(mesh).host("ctl1")
    key = ctl1.file(controller_spec.INTERMEDIATE_KEY)
    assert (key.mode, key.owner, key.secret) == (0o600, "mesh-controller", True)
    assert "intermediate key" not in str(ctl1.summary())  # only its sha256 is ever shown or saved
    folder = {f.path: (f.mode, f.owner, f.group) for f in ctl1.every_folder()}
    assert folder[controller_spec.CONTROLLER_DIR] == (0o750, "root", "mesh-controller")
    assert "mesh-controller" in ctl1.users and "mesh-controller.service" in ctl1.units
    assert ctl1.envoy_sha256 == "e" * 64  # the controller validates bundles with Envoy
    assert ctl1.file(controller_spec.KNOWN_HOSTS).content.decode().splitlines() == \
        [*KNOWN["ctl2"], *KNOWN["vm1"]]
    assert "mesh-controller" not in plan_of(mesh).host("vm1").users


def test_a_controller_that_left_loses_its_line_on_every_host(mesh: Mesh) -> None:
    deployed = plan_of(mesh).host("vm2")
    facts = converged(deployed)
    assert host_changes(deployed, facts, no_reason) == ()
    one_left = plan_of(mesh, keys={"ctl1": KEYS["ctl1"]}).host("vm2")
    changes = [change.line() for change in host_changes(one_left, facts, no_reason)]
    assert changes == [f"update file {access.CTL_AUTHORIZED_KEYS} (content)"]
    assert "ctl2" not in text(plan_of(mesh, keys={"ctl1": KEYS["ctl1"]}), "vm2", access.CTL_AUTHORIZED_KEYS)


def test_a_host_that_left_loses_the_account_its_files_and_folders(mesh: Mesh) -> None:
    deployed = plan_of(mesh).host("vm2")
    facts = converged(deployed)
    facts = replace(facts, users=(*facts.users, "mesh-ctl"))
    retired = ManagedHost("vm2", "vm", deployed.host.connection)  # no workloads, not a controller
    empty = plan_of(mesh, [retired]).host("vm2")
    removed = {(change.kind, change.subject) for change in host_changes(empty, facts, no_reason)
               if change.action == "remove"}
    assert {("user", "mesh-ctl"), ("file", controller_spec.CTL_SUDOERS), ("file", controller_spec.CTL_SCRIPT),
            ("folder", controller_spec.CTL_HOME), ("folder", "/etc/mesh/ctl")} <= removed


def test_a_host_that_stops_being_a_controller_loses_the_service_and_its_files(mesh: Mesh) -> None:
    deployed = plan_of(mesh).host("ctl2")
    facts = converged(deployed)
    demoted = plan_of(mesh, [replace(deployed.host, is_controller=False)]).host("ctl2")
    removed = {(change.kind, change.subject) for change in host_changes(demoted, facts, no_reason)
               if change.action == "remove"}
    assert {("user", "mesh-controller"), ("folder", controller_spec.CONTROLLER_DIR),
            ("unit", "mesh-controller.service")} <= removed


def test_a_running_controller_owns_the_upstream_endpoint_files_and_the_plan_only_creates_them(mesh: Mesh) -> None:
    live = plan_of(mesh, endpoints_live=True).host("vm1")
    upstream = "/etc/mesh/proxies/web-8080/xds/eds.upstream-api.yaml"
    local = "/etc/mesh/proxies/web-8080/xds/eds.local-app.yaml"
    assert live.file(upstream).controller_owned and not live.file(local).controller_owned
    facts = converged(live)
    pushed = {**facts.paths, upstream: replace(facts.paths[upstream], sha256="c" * 64),
              local: replace(facts.paths[local], sha256="c" * 64)}
    changes = [change.line() for change in host_changes(live, replace(facts, paths=pushed), no_reason)]
    assert changes == [f"update file {local} (content, Envoy reloads it)"]  # the controller's file is its own
    missing = {path: fact for path, fact in facts.paths.items() if path != upstream}
    assert [c.line() for c in host_changes(live, replace(facts, paths=missing), no_reason)] == \
        [f"create file {upstream} (Envoy reloads it)"]
    # no controller answering: the deploy judges (and writes) every endpoint file again
    assert not plan_of(mesh).host("vm1").file(upstream).controller_owned


def test_a_controller_key_that_is_not_one_key_line_is_refused() -> None:
    assert access.public_key("ssh-ed25519 AAAAkey mesh-controller@ctl1\n", "ctl1") == "ssh-ed25519 AAAAkey"
    for bad in ("", "not a key", "ssh-ed25519", "ssh-dss AAAA x", 'ssh-ed25519 AAAA",permitopen="*:*',
                "ssh-ed25519 AAAA,no-restrict x", "ssh-ed25519 AAAA\nssh-ed25519 BBBB"):
        with pytest.raises(access.ControllerKeyError, match="ctl1"):
            access.public_key(bad, "ctl1")


def test_known_hosts_lines_are_those_naming_the_host_as_the_deploy_reaches_it(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("10.0.0.11 ssh-ed25519 AAAAvm1\n10.0.0.12 ssh-ed25519 AAAAvm2\n"
                     "[10.0.0.11]:2222 ssh-ed25519 AAAAother\n@revoked 10.0.0.11 ssh-ed25519 AAAAold\n"
                     "@cert-authority * ssh-ed25519 AAAAca\n# 10.0.0.11 comment\n")
    from mesh.inventory.model import Connection
    host = ManagedHost("vm1", "vm", Connection("10.0.0.11", known_hosts=str(known)))
    assert known_hosts_lines(host) == ("10.0.0.11 ssh-ed25519 AAAAvm1", "@revoked 10.0.0.11 ssh-ed25519 AAAAold")
    other_port = ManagedHost("vm1", "vm", Connection("10.0.0.11", 2222, known_hosts=str(known)))
    assert known_hosts_lines(other_port) == ("[10.0.0.11]:2222 ssh-ed25519 AAAAother",)
    assert known_hosts_lines(ManagedHost("x", "vm", Connection("10.0.0.9", known_hosts=str(tmp_path / "no")))) == ()


def test_the_controller_state_time_reads_epoch_or_iso() -> None:
    assert state_updated_at(b'{"updated_at": 1765000000.5}') == 1765000000.5
    assert state_updated_at('{"updated_at": "2026-01-01T00:00:00+00:00"}') == 1767225600.0
    assert state_updated_at(b"{}") is None and state_updated_at(None) is None and state_updated_at(b"x") is None


def test_the_deploy_says_whether_the_controller_took_its_plan(mesh: Mesh) -> None:
    out = io.StringIO()
    states = iter([{"plan_digest": "old", "holder": "ctl1:1"}, {"plan_digest": "new", "holder": "ctl1:1"}])
    assert wait_for_controller(mesh, "new", Display(out), timeout=5, read=lambda _: next(states))
    assert "controller ctl1:1 took this deploy's plan (spec new)" in out.getvalue()
    late = io.StringIO()
    assert not wait_for_controller(mesh, "new", Display(late), timeout=0, read=lambda _: {"plan_digest": "old"})
    assert "no controller took plan new within 0 s (the active one runs old)" in late.getvalue()


def test_controller_unit_golden(update_goldens: bool) -> None:
    from mesh import controller_env

    text = controller_env.render_controller_unit()
    path = Path(__file__).resolve().parents[1] / "golden" / "systemd" / "mesh-controller.service"
    if update_goldens:
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"
    assert "User=mesh-controller\n" in text and "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    assert ("ExecStart=/opt/mesh/venv/bin/python3 -m mesh.controller --config /etc/mesh/controller/spec.json\n"
            in text)


def test_the_controller_venv_is_recorded_only_once_the_checker_and_the_controller_import() -> None:
    from mesh import controller_env

    install = controller_env.install_commands(["mesh-0.1.0-py3-none-any.whl"], "m")[1]
    assert "-c 'import mesh.healthcheck.__main__, mesh.controller.__main__, mesh.traces.decode' && echo m >" \
        in install
    assert {"paramiko", "prometheus-client", "pyyaml", "jinja2", "cryptography", "xds-protos"} \
        <= set(controller_env.CHECKER_RUNTIME)


def test_a_deploy_gives_a_host_the_account_checking_the_sudo_rule_before_moving_it_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_plan_command import INVENTORY as FLEET
    from test_plan_command import _vm

    from mesh.deploy.command import DeployOptions, deploy
    from mesh.hosts.connection import CommandResult
    from mesh.testing.fake_connector import FakeFleet

    monkeypatch.chdir(tmp_path)
    (tmp_path / "inventory.yml").write_text(FLEET)
    fleet = FakeFleet()
    _vm(fleet.host("vm1"))
    fleet.host("ctl1").stub(r"cat /etc/mesh/controller/id_ed25519\.pub",  # ctl1 is not a target: its key is read
                            CommandResult(0, b"ssh-ed25519 AAAAC3ctl1 mesh-controller@ctl1\n", b""))
    deploy("inventory.yml", DeployOptions(limit="vm1"), output=io.StringIO(), connector_factory=fleet.connect)
    vm1 = fleet.host("vm1")
    assert vm1.files[access.CTL_AUTHORIZED_KEYS].data.decode().splitlines()[1:] == [  # type: ignore[union-attr]
        f"{FORCED} ssh-ed25519 AAAAC3ctl1 mesh-controller@ctl1"]
    sudoers = vm1.files[controller_spec.CTL_SUDOERS]
    assert (sudoers.mode, sudoers.owner) == (0o440, "root")
    staged = "/etc/sudoers.d/.mesh-staged/mesh-ctl"
    assert vm1.commands.index(f"visudo -cf {staged}") < vm1.commands.index(
        f"mv -f -- {staged} {controller_spec.CTL_SUDOERS}")
    assert "mesh-ctl" in vm1.users and "usermod -p '*' mesh-ctl" in " ".join(vm1.commands)
    assert not any("ssh-keygen" in command for command in fleet.host("ctl1").commands)  # nothing made off-target
    before = len(vm1.changing_commands())
    deploy("inventory.yml", DeployOptions(limit="vm1"), output=io.StringIO(), connector_factory=fleet.connect)
    assert len(vm1.changing_commands()) == before  # converged: not touched again


def test_the_controllers_intermediate_is_made_once_by_the_root_and_is_not_the_deploys(tmp_path: Path) -> None:
    import os

    from mesh.pki import CertificateAuthority, chains_to

    ca, _ = CertificateAuthority.ensure(str(tmp_path), "spec.mesh")
    assert ca.controller_issuer(create=False) is None  # check mode: nothing made
    issuer = ca.controller_issuer()
    assert issuer is not None and issuer == ca.controller_issuer()  # made once, then read back
    assert chains_to(issuer.cert_pem, ca.root_pem) and issuer.cert_pem != ca.intermediate_pem
    key = tmp_path / "ca" / "controller-intermediate.key"
    assert os.stat(key).st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert "PRIVATE" not in repr(issuer)


def test_a_controller_down_during_a_deploy_keeps_the_key_the_last_deploy_read(tmp_path: Path) -> None:
    from mesh.deploy.controller_inputs import record_keys, recorded_keys, with_recorded

    warnings: list[str] = []
    record_keys(str(tmp_path), {"ctl1": "ssh-ed25519 OLD1", "ctl2": "ssh-ed25519 OLD2", "gone": "ssh-ed25519 X"})
    keys = with_recorded({"ctl1": "ssh-ed25519 NEW1"}, recorded_keys(str(tmp_path)), ["ctl1", "ctl2", "ctl3"],
                         warnings.append)
    assert keys == {"ctl1": "ssh-ed25519 NEW1", "ctl2": "ssh-ed25519 OLD2"}  # a controller that left is not kept
    assert [w.split(":")[0] for w in warnings] == ["controller ctl2", "controller ctl3 has no known SSH key"]
    assert recorded_keys(str(tmp_path / "none")) == {}
    # the record is a file: a key in it that is not one clean key is not put into any authorized_keys
    record_keys(str(tmp_path), {"ctl2": 'ssh-ed25519 AAAA" ssh-ed25519 EVIL'})
    assert with_recorded({}, recorded_keys(str(tmp_path)), ["ctl2"], warnings.append) == {}


def test_the_controllers_account_is_removed_even_while_a_controller_is_logged_in() -> None:
    from mesh.deploy.steps.cleanup import removal_commands
    from mesh.plan.changes import Change

    assert "userdel -f mesh-ctl" in removal_commands(Change("vm2", "user", "mesh-ctl", "remove"))[0]
    assert "userdel mesh-web-8080" in removal_commands(Change("vm2", "user", "mesh-web-8080", "remove"))[0]


def test_reordering_a_hosts_workloads_changes_no_access_file_and_no_spec(tmp_path: Path) -> None:
    # (ports given: their defaults follow the position in the list)
    two = ("            - {service: api, port: 9090, proxy_port: 21000, metrics_port: 20000}\n"
           "            - {service: db, port: 5432, protocol: tcp, proxy_port: 21001, metrics_port: 20001}\n")
    swapped = "".join(reversed(two.splitlines(keepends=True)))
    plans = []
    for name, workloads in (("one", two), ("two", swapped)):
        path = tmp_path / f"{name}.yml"
        path.write_text(INVENTORY.replace("            - {service: api, port: 9090}\n", workloads, 1))
        plans.append(plan_of(check_inventory(load_inventory(str(path)), str(path)).mesh))
    for path in (controller_spec.CTL_IDENTITIES, access.CTL_AUTHORIZED_KEYS):
        assert text(plans[0], "vm2", path) == text(plans[1], "vm2", path)
    assert text(plans[0], "vm2", controller_spec.CTL_IDENTITIES).count(" vm ") == 2
    assert text(plans[0], "ctl1", controller_spec.SPEC_PATH) == text(plans[1], "ctl1", controller_spec.SPEC_PATH)
