"""The deploy lock on a real Consul (ACLs on, mesh's token with the lab's policy) and in a state dir: a second
deploy is refused naming the holder and the lock, both are given back (also on errors), a lock whose process
died does not block, and a token whose policy may not take the lock is refused with exit 1."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_catalog_consul import consul_binary

from mesh import catalog
from mesh.deploy.lock import ConsulLock, DeployLocked, Holder, LocalLock, consul_key, deploy_lock
from mesh.errors import EXIT_ERROR, MeshError
from mesh.inventory.model import Mesh, MeshSettings
from mesh.lab import consul_acl
from mesh.testing.consul_server import ConsulDevServer

MESH_ID = "lock-test"


@pytest.fixture(scope="module")
def secure() -> Iterator[ConsulDevServer]:
    with ConsulDevServer(consul_binary(), acl=True) as server:
        yield server


def mesh_for(tmp_path: Path, server: ConsulDevServer | None = None, token: str | None = None) -> Mesh:
    token_file = None
    if server is not None:
        token_file = tmp_path / "token"
        token_file.write_text((token or server.mesh_token()) + "\n")
    return Mesh(MeshSettings(trust_domain="lab.mesh", mesh_id=MESH_ID, state_dir=str(tmp_path / "state"),
                             consul_url=server.url if server is not None else None,
                             consul_token_file=str(token_file) if token_file else None))


def someone(pid: int = 4242) -> Holder:
    return Holder("alice", "laptop", pid, "2026-12-06T08:00:00Z", "mesh deploy inventory/lab.yaml")


# ---- the state dir ----------------------------------------------------------------------------------------------


def test_a_second_deploy_is_refused_naming_the_holder_and_the_lock(tmp_path: Path) -> None:
    first, second = LocalLock(tmp_path / "state"), LocalLock(tmp_path / "state")
    first.acquire(someone(), print)
    with pytest.raises(DeployLocked) as caught:
        second.acquire(Holder.me("mesh deploy"), print)
    assert caught.value.exit_code == EXIT_ERROR
    assert str(caught.value).startswith(f"another deploy holds the deploy lock {tmp_path / 'state' / 'deploy.lock'}: "
                                        "alice@laptop, pid 4242, since 2026-12-06T08:00:00Z (mesh deploy inventory")
    first.release()
    second.acquire(Holder.me("mesh deploy"), print)
    second.release()


def test_release_leaves_no_state_dir_the_lock_made(tmp_path: Path) -> None:
    lock = LocalLock(tmp_path / "state")
    lock.acquire(Holder.me(), print)
    assert json.loads((tmp_path / "state" / "deploy.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "state").exists()
    (tmp_path / "kept").mkdir()
    kept = LocalLock(tmp_path / "kept")
    kept.acquire(Holder.me(), print)
    kept.release()
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "deploy.lock").exists()


def test_a_lock_file_left_by_a_dead_deploy_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "deploy.lock").write_text(someone(pid=999999).to_json())  # no process holds its flock
    said: list[str] = []
    lock = LocalLock(tmp_path / "state")
    lock.acquire(Holder.me(), said.append)
    assert "alice@laptop, pid 999999" in said[0] and "ended without releasing" in said[0]
    lock.release()


def test_the_lock_is_given_back_when_the_deploy_fails(tmp_path: Path) -> None:
    mesh = mesh_for(tmp_path)
    with pytest.raises(KeyboardInterrupt), deploy_lock(mesh, print):
        raise KeyboardInterrupt
    with deploy_lock(mesh, print) as holder:
        assert holder.pid == os.getpid()
    assert not (tmp_path / "state").exists()


# ---- Consul ---------------------------------------------------------------------------------------------------


def test_a_second_deploy_is_refused_by_the_consul_lock(secure: ConsulDevServer, tmp_path: Path) -> None:
    mesh = mesh_for(tmp_path, secure)
    other = ConsulLock(catalog.access_for(mesh), MESH_ID)
    other.acquire(someone(), print)  # another machine: its own state dir, the same Consul
    try:
        with pytest.raises(DeployLocked) as caught, deploy_lock(mesh, print):
            pass
        assert caught.value.message == (f"another deploy holds the Consul lock {consul_key(MESH_ID)} at {secure.url}: "
                                         "alice@laptop, pid 4242, since 2026-12-06T08:00:00Z (mesh deploy "
                                         "inventory/lab.yaml)")
        assert not (tmp_path / "state").exists()  # the local lock was given back
    finally:
        other.release(print)
    with deploy_lock(mesh, print):
        client = catalog.connect(catalog.access_for(mesh))
        _, entry = client.kv.get(consul_key(MESH_ID))
        assert json.loads(entry["Value"])["pid"] == os.getpid() and entry["Session"]
    _, entry = client.kv.get(consul_key(MESH_ID))
    assert entry is None  # released: the session's end removed the key


def test_a_lock_whose_process_died_frees_itself_after_the_ttl(secure: ConsulDevServer, tmp_path: Path) -> None:
    mesh = mesh_for(tmp_path, secure)
    dead = ConsulLock(catalog.access_for(mesh), MESH_ID, ttl=10)
    dead.acquire(someone(), print)
    dead._stop.set()  # the process is gone: nothing renews its session any more
    deadline = time.monotonic() + 2 * 10 + 15
    while True:
        try:
            with deploy_lock(mesh, print):
                break
        except DeployLocked:
            assert time.monotonic() < deadline, "the dead deploy's lock outlived twice its TTL"
            time.sleep(1)


def test_a_token_whose_policy_may_not_take_the_lock_is_refused(secure: ConsulDevServer, tmp_path: Path) -> None:
    master = secure.master_token
    assert master is not None
    policy = consul_acl._call(secure.url, master, "PUT", "/v1/acl/policy", {
        "Name": "no-sessions", "Rules": 'key_prefix "mesh/" { policy = "write" }\nnode_prefix "" { policy = "read" }'})
    token = consul_acl.new_token()
    consul_acl._call(secure.url, master, "PUT", "/v1/acl/token",
                     {"SecretID": token, "Policies": [{"ID": policy["ID"]}]})
    with pytest.raises(MeshError) as caught, deploy_lock(mesh_for(tmp_path, secure, token), print):
        pass
    assert caught.value.exit_code == EXIT_ERROR
    assert "refused the deploy lock mesh/lock-test/deploy/lock" in str(caught.value)
    assert 'session_prefix "" write' in str(caught.value.hint)
    assert not (tmp_path / "state").exists()


def test_consul_unreachable_leaves_the_local_lock_alone_holding(tmp_path: Path) -> None:
    mesh = Mesh(MeshSettings(trust_domain="lab.mesh", state_dir=str(tmp_path / "state"),
                             consul_url="http://127.0.0.1:1"))
    said: list[str] = []
    with deploy_lock(mesh, said.append):
        assert (tmp_path / "state" / "deploy.lock").exists()
    assert "only the lock in the state dir holds" in said[0]
