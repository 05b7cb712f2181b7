"""`mesh drain` without Consul: which instances a SERVICE HOST names (did-you-mean when none), what it writes
and removes through a fake catalog, and what it prints. The same against a real Consul: tests/test_drain_consul.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
from catalog_samples import make_mesh

from mesh import catalog
from mesh.catalog import DrainState, InstanceRef
from mesh.cli import run
from mesh.drain import apply_drain, drain_output, instances_on
from mesh.errors import EXIT_USAGE, MeshError, UsageError

MESH_ID = "lab.mesh"
AT = datetime(2026, 12, 6, 11, 30, tzinfo=UTC)


class FakeDrains:
    """Consul's registrations of the sample mesh (owned by `owner`), with drain checks kept in a dict."""

    def __init__(self, owner: str | None = MESH_ID, registered: bool = True) -> None:
        self.owner = owner
        self.registered = registered
        self.checks: dict[str, dict[str, str]] = {}
        self.writes: list[tuple[str, str]] = []

    def states(self, service: str) -> Mapping[str, DrainState]:
        if not self.registered:
            return {}
        refs = [InstanceRef(w.host, w.consul_id) for w in make_mesh().workloads if w.service == service]
        return {ref.service_id: DrainState(ref, self.owner, self.checks.get(ref.service_id)) for ref in refs}

    def set(self, ref: InstanceRef, output: str) -> None:
        self.checks[ref.service_id] = catalog.drain_check_body(ref, output)
        self.writes.append(("set", ref.service_id))

    def clear(self, ref: InstanceRef) -> None:
        del self.checks[ref.service_id]
        self.writes.append(("clear", ref.service_id))


def drain(drains: FakeDrains, service: str = "api", host: str = "vm2", undo: bool = False) -> list[str]:
    changes = apply_drain(make_mesh(), service, host, undo, drains, "alice@laptop", lambda: AT)
    return [change.line() for change in changes]


def test_a_service_on_a_host_names_its_consul_instances() -> None:
    assert instances_on(make_mesh(), "api", "vm2") == [InstanceRef("vm2", "api-vm2-9090")]
    assert instances_on(make_mesh(), "api", "dock1") == [InstanceRef("dock1", "api-dock1-api-v2-1")]


@pytest.mark.parametrize(("service", "host", "message", "hint"), [
    ("api", "vm22", "no managed host 'vm22'", "did you mean 'vm2'"),
    ("apii", "vm2", "no service 'apii'", "did you mean 'api'"),
    ("web", "vm2", "service 'web' has no instance on vm2 (it runs on vm1)", None),
    ("zzz", "vm2", "no service 'zzz'", None),
])
def test_an_unknown_service_or_host_is_a_usage_error_with_a_hint(
        service: str, host: str, message: str, hint: str | None) -> None:
    with pytest.raises(UsageError) as caught:
        instances_on(make_mesh(), service, host)
    assert caught.value.exit_code == EXIT_USAGE
    assert message in caught.value.message
    assert caught.value.hint == (None if hint is None else hint + "?")


def test_drain_writes_a_critical_check_of_its_own_naming_who_and_when() -> None:
    drains = FakeDrains()
    assert drain(drains) == [("drained api-vm2-9090 on vm2: check mesh-drain:api-vm2-9090 is critical, "
                             "callers' endpoints drop it")]
    check = drains.checks["api-vm2-9090"]
    assert check == {"Node": "vm2", "CheckID": "mesh-drain:api-vm2-9090", "ServiceID": "api-vm2-9090",
                     "Name": catalog.DRAIN_NAME, "Status": "critical",
                     "Output": "drained by alice@laptop at 2026-12-06T11:30:00Z (mesh drain)"}
    assert check["CheckID"] != catalog.InstanceRef("vm2", "api-vm2-9090").check_id, "never the checker's check"
    assert drains.writes == [("set", "api-vm2-9090")], "the other api instance (dock1) is left alone"


def test_draining_twice_says_so_and_undo_removes_only_the_drain_check() -> None:
    drains = FakeDrains()
    drain(drains)
    assert drain(drains) == [("drained api-vm2-9090 on vm2 (it already was: check mesh-drain:api-vm2-9090 "
                             "rewritten)")]
    assert drain(drains, undo=True) == [("undrained api-vm2-9090 on vm2: check mesh-drain:api-vm2-9090 removed, "
                                        "callers get it back while it passes")]
    assert drains.checks == {}
    assert drain(drains, undo=True) == ["api-vm2-9090 on vm2 was not drained: nothing to undo"]
    assert drains.writes == [("set", "api-vm2-9090"), ("set", "api-vm2-9090"), ("clear", "api-vm2-9090")]


def test_an_instance_not_in_consul_or_owned_by_another_mesh_is_not_touched() -> None:
    with pytest.raises(MeshError, match="api-vm2-9090 is not registered in Consul on node vm2") as caught:
        drain(FakeDrains(registered=False))
    assert "mesh deploy" in str(caught.value)
    foreign = FakeDrains(owner="team-b")
    with pytest.raises(MeshError, match="belongs to the mesh id 'team-b'"):
        drain(foreign)
    unmanaged = FakeDrains(owner=None)
    with pytest.raises(MeshError, match="was not registered by mesh"):
        drain(unmanaged)
    assert foreign.writes == [] and unmanaged.writes == []


def test_the_output_is_utc() -> None:
    from datetime import timedelta, timezone

    at = datetime(2026, 12, 6, 13, 0, tzinfo=timezone(timedelta(hours=2)))
    assert drain_output("bob@ci", at) == "drained by bob@ci at 2026-12-06T11:00:00Z (mesh drain)"


def inventory(folder: Path, consul_url: str) -> Path:
    path = folder / "hosts.yaml"
    path.write_text(json.dumps({"all": {
        "vars": {"mesh_trust_domain": MESH_ID, "mesh_consul_url": consul_url,
                 "mesh_state_dir": str(folder / "state")},
        "children": {"mesh_controllers": {"hosts": {"ctl1": {"ansible_host": "192.0.2.3"}}}, "vms": {"hosts": {
            "vm1": {"ansible_host": "192.0.2.11", "mesh_workloads": [{"service": "web", "port": 8080}]},
            "vm2": {"ansible_host": "192.0.2.12", "mesh_workloads": [{"service": "api", "port": 9090}]}}}}}}))
    return path


def test_the_cli_exits_5_on_a_misspelled_host_before_asking_consul(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.testing.health_endpoint import closed_port

    monkeypatch.setenv("MESH_INVENTORY", str(inventory(tmp_path, f"http://127.0.0.1:{closed_port()}")))
    assert run(["drain", "api", "vm3"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no managed host 'vm3'" in err and "did you mean 'vm2' or 'vm1'?" in err
    assert run(["drain", "ap", "vm2"]) == EXIT_USAGE
    assert "did you mean 'api'?" in capsys.readouterr().err


def test_the_cli_says_consul_is_unreachable_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.testing.health_endpoint import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    assert run(["drain", "api", "vm2", "-i", str(inventory(tmp_path, url))]) == 1
    err = capsys.readouterr().err
    assert f"Consul is unreachable at {url}" in err
    assert "Traceback" not in err


def test_drain_warns_when_no_controller_would_act_on_it(tmp_path: Path) -> None:
    from mesh.drain import drain as drain_command

    path = str(inventory(tmp_path, "http://127.0.0.1:1"))
    drains = FakeDrains()
    printed: list[str] = []
    warned: list[str] = []
    assert drain_command(path, "api", "vm2", drains=drains, echo=printed.append, warn=warned.append,
                         controllers=lambda mesh: "nobody holds the controllers' lock") == 0
    assert printed[0].startswith("drained api-vm2-9090 on vm2")
    assert warned == [("[WARNING]: no controller is active (nobody holds the controllers' lock): callers' endpoints "
                      "follow Consul only while one runs (mesh_controllers, deployed by mesh deploy)")]
    warned.clear()
    assert drain_command(path, "api", "vm2", undo=True, drains=drains, echo=printed.append, warn=warned.append,
                         controllers=lambda mesh: None) == 0
    assert printed[-1].startswith("undrained api-vm2-9090 on vm2") and warned == []


def test_every_instance_is_checked_before_any_is_drained() -> None:
    from dataclasses import replace

    from mesh.inventory.model import Workload

    mesh = make_mesh()
    vm2 = mesh.host("vm2")
    second = Workload("vm2", 2, "api", 9091, MESH_ID, proxy_port=21002)
    two = replace(mesh, hosts=tuple(replace(h, workloads=(*h.workloads, second)) if h.name == "vm2" else h
                                    for h in mesh.hosts))
    assert [ref.service_id for ref in instances_on(two, "api", "vm2")] == ["api-vm2-9090", "api-vm2-9091"]
    drains = FakeDrains()  # Consul holds api-vm2-9090 but not api-vm2-9091 (not deployed yet)
    with pytest.raises(MeshError, match="api-vm2-9091 is not registered in Consul"):
        apply_drain(two, "api", "vm2", False, drains, "alice@laptop", lambda: AT)
    assert drains.writes == [], "the first instance was not drained alone"
    assert vm2.workloads[0].consul_id == "api-vm2-9090"
