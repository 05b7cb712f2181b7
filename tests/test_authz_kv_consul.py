"""Run-time denies against a real Consul 1.8.7 with ACLs on (default deny, mesh's token and policy, as the lab
makes them): `mesh authz deny` and `--undo` through the CLI write and remove `mesh/<mesh_id>/authz/<service>`
with mesh's token, `mesh authz show` and `check` read it, check-and-set refuses a write over a value changed since
it was read, denies written at the same moment by several people all land, and `deny` waits until a controller
holding the lock publishes `state.authz` with the revision it stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from kv_consul import MESH_ID, acl_consul, kv_inventory, master

from mesh import catalog
from mesh.authz import changes
from mesh.authz.kv import ConsulAuthz, authz_key
from mesh.cli import run
from mesh.controller.spec import lock_key, state_key
from mesh.errors import EXIT_OK
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.testing.consul_server import ConsulDevServer


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevServer]:
    yield from acl_consul()


@pytest.fixture
def inventory(tmp_path: Path, consul: ConsulDevServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    yield from kv_inventory(tmp_path, consul, [
        {"service": "api", "port": 9090, "upstreams": [{"service": "db", "local_port": 19102}]},
        {"service": "db", "port": 5432, "protocol": "tcp"},
        {"service": "batch", "port": 7070, "upstreams": [{"service": "api", "local_port": 19103}]}])


def stored(consul: ConsulDevServer, service: str) -> dict[str, object] | None:
    _, entry = master(consul).kv.get(authz_key(MESH_ID, service))
    return None if entry is None else dict(json.loads(entry["Value"]))


def test_deny_and_undo_write_and_remove_the_key_with_mesh_token(
        consul: ConsulDevServer, inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["authz", "deny", "api", "--from", "web", "--no-wait", "-i", str(inventory)]) == EXIT_OK
    value = stored(consul, "api")
    assert value is not None and value["deny_from"] == ["web"] and value["revision"]
    capsys.readouterr()
    assert run(["authz", "check", "web", "api", "GET", "/", "--json", "-i", str(inventory)]) == EXIT_OK
    checked = json.loads(capsys.readouterr().out)
    assert (checked["allowed"], checked["rule"]) == (False, "runtime-deny")
    assert run(["authz", "show", "api", "--json", "-i", str(inventory)]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)["services"][0]
    assert shown["runtime_deny"]["revision"] == value["revision"] and shown["runtime_deny"]["applies"]
    assert shown["controller"]["active"] is False  # nobody holds the lock here
    assert run(["authz", "deny", "api", "--undo", "-i", str(inventory), "--no-wait"]) == EXIT_OK
    assert stored(consul, "api") is None


def test_check_and_set_refuses_a_write_over_a_value_changed_since_it_was_read(
        consul: ConsulDevServer, inventory: Path) -> None:
    store = ConsulAuthz(catalog.ConsulAccess(consul.url, consul.mesh_token()), MESH_ID)
    assert store.write("api", '{"deny_from": ["web"], "revision": "a"}', 0)
    assert not store.write("api", '{"deny_from": ["db"], "revision": "b"}', 0)  # exists already
    first = store.read("api")
    assert first is not None and first.override is not None and first.override.deny_from == ("web",)
    assert store.write("api", '{"deny_from": ["db"], "revision": "c"}', first.index)
    assert not store.delete("api", first.index)  # changed since first was read
    assert sorted(store.read_all()) == ["api"]


def test_denies_written_at_the_same_moment_all_land(consul: ConsulDevServer, inventory: Path) -> None:
    mesh = check_inventory(load_inventory(str(inventory)), str(inventory)).mesh
    sources = ["web", "db", "batch"]
    start = threading.Barrier(len(sources))
    failures: list[BaseException] = []

    def deny(source: str) -> None:
        store = ConsulAuthz.of(mesh)  # each person their own client
        start.wait()
        try:
            changes.update(store, "api", changes.with_denied(mesh, [source]), f"{source}@test",
                           lambda: datetime.now(UTC))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=deny, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    value = stored(consul, "api")
    assert value is not None and value["deny_from"] == sorted(sources)


def _act_as_controller(consul: ConsulDevServer, stop: threading.Event) -> None:
    """Hold the controllers' lock and publish state.authz = {service: revision stored} every 0.2 s."""
    headers = {"X-Consul-Token": str(consul.master_token)}
    session = requests.put(f"{consul.url}/v1/session/create", json={"Name": "controller", "TTL": "30s"},
                           headers=headers, timeout=10).json()["ID"]
    requests.put(f"{consul.url}/v1/kv/{lock_key(MESH_ID)}?acquire={session}", data="ctl1", headers=headers,
                 timeout=10)
    try:
        while not stop.is_set():
            _, entries = master(consul).kv.get(f"mesh/{MESH_ID}/authz/", recurse=True)
            applied = {str(entry["Key"]).rsplit("/", 1)[-1]: json.loads(entry["Value"])["revision"]
                       for entry in entries or []}
            state = {"holder": "ctl1:1", "updated_at": time.time(), "authz": {"api": "", "db": "", **applied}}
            master(consul).kv.put(state_key(MESH_ID), json.dumps(state))
            stop.wait(0.2)
    finally:
        requests.put(f"{consul.url}/v1/session/destroy/{session}", headers=headers, timeout=10)


def test_deny_waits_for_the_controllers_state_authz(
        consul: ConsulDevServer, inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()
    controller = threading.Thread(target=_act_as_controller, args=(consul, stop), daemon=True)
    controller.start()
    try:
        assert run(["authz", "deny", "api", "--from", "web", "--wait", "20", "-i", str(inventory)]) == EXIT_OK
        out = capsys.readouterr().out
        assert "api: applied by every instance (1) in " in out
        assert run(["authz", "show", "api", "-i", str(inventory)]) == EXIT_OK
        revision = (stored(consul, "api") or {}).get("revision")
        assert f"controller: applied: every instance enforces revision {revision}" in capsys.readouterr().out
        assert run(["authz", "deny", "api", "--undo", "--wait", "20", "-i", str(inventory)]) == EXIT_OK
        assert stored(consul, "api") is None
    finally:
        stop.set()
        controller.join(10)
