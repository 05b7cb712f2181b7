"""The traffic overrides against a real Consul 1.8.7 with ACLs on (default deny, mesh's token and policy, as the
lab makes them): `mesh route set/reset` and `mesh fault set` through the CLI write and remove
`mesh/<mesh_id>/traffic/<service>`, check-and-set refuses a write over a value changed since it was read, the
prefix read sees every service, and the controllers' report is read from the state key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_consul import MESH_ID, acl_consul, kv_inventory

from mesh import catalog
from mesh.cli import run
from mesh.errors import EXIT_ERROR, EXIT_OK
from mesh.testing.consul_server import ConsulDevServer
from mesh.traffic.kv import ConsulTraffic, traffic_key


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    yield from acl_consul()


@pytest.fixture
def inventory(tmp_path: Path, consul: ConsulDevServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    yield from kv_inventory(tmp_path, consul, [{"service": "api", "version": "v1", "port": 9090},
                                               {"service": "api", "version": "v2", "port": 9091}])


def stored(consul: ConsulDevServer, service: str) -> dict[str, object] | None:
    client = catalog.connect(catalog.ConsulAccess(consul.url, consul.master_token))
    _, entry = client.kv.get(traffic_key(MESH_ID, service))
    return None if entry is None else dict(json.loads(entry["Value"]))


def test_set_fault_and_reset_write_and_remove_the_key_with_mesh_token(
        consul: ConsulDevServer, inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["route", "set", "api", "v1=90", "v2=10", "--no-wait", "-i", str(inventory)]) == EXIT_OK
    assert run(["fault", "set", "api", "--delay", "1s:10%", "--no-wait", "-i", str(inventory)]) == EXIT_OK
    value = stored(consul, "api")
    assert value is not None and value["split"] == {"v1": 90, "v2": 10}
    assert value["fault"] == {"delay": {"duration": "1000ms", "percent": 10}}
    capsys.readouterr()
    assert run(["route", "show", "api", "--json", "-i", str(inventory)]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["override"]["revision"] == value["revision"] and shown["routes"][-1]["to"] == {"v1": 90, "v2": 10}
    assert shown["controller"]["active"] is False
    assert run(["route", "reset", "api", "--no-wait", "-i", str(inventory)]) == EXIT_OK
    assert stored(consul, "api") is None


def test_without_a_controller_set_exits_1_and_leaves_the_override_stored(
        consul: ConsulDevServer, inventory: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mesh.runtime_kv.NO_LOCK_GRACE_S", 0.5)
    assert run(["route", "set", "api", "v1=50", "v2=50", "-i", str(inventory)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "no controller is active (nobody holds the controllers' lock)" in err
    assert stored(consul, "api") is not None


def test_check_and_set_refuses_a_write_over_a_value_changed_since_it_was_read(
        consul: ConsulDevServer, inventory: Path) -> None:
    access = catalog.ConsulAccess(consul.url, consul.mesh_token())
    store = ConsulTraffic(access, MESH_ID)
    assert store.write("api", '{"split": {"v1": 100}, "fault": null, "revision": "a"}', 0)
    assert not store.write("api", '{"split": {"v2": 100}, "fault": null, "revision": "b"}', 0)  # exists already
    first = store.read("api")
    assert first is not None and first.override is not None and first.override.revision == "a"
    assert store.write("web", '{"split": null, "fault": null, "revision": "w"}', 0)
    assert sorted(store.read_all()) == ["api", "web"]
    assert store.write("api", '{"split": {"v2": 100}, "fault": null, "revision": "c"}', first.index)
    assert not store.delete("api", first.index)  # changed since first was read
    again = store.read("api")
    assert again is not None and store.delete("api", again.index) and store.read("api") is None


def test_the_controllers_report_is_read_from_the_state_key(consul: ConsulDevServer, inventory: Path) -> None:
    master = catalog.connect(catalog.ConsulAccess(consul.url, consul.master_token))
    master.kv.put(f"mesh/{MESH_ID}/controller/state",
                  json.dumps({"holder": "ctl1:1", "updated_at": time.time(), "traffic": {"api": "r7"}}))
    report = ConsulTraffic(catalog.ConsulAccess(consul.url, consul.mesh_token()), MESH_ID).applied()
    assert not report.active and report.reason == "nobody holds the controllers' lock"  # no session on the lock
    assert report.revisions == {"api": "r7"}
