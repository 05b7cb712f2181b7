"""End to end on the lab's dock1 (issue 16): the app container's port is closed to everything but its own sidecar,
by mesh's chain inside the app's network namespace (bridge traffic between containers never reaches DOCKER-USER
in the lab: no br_netfilter inside nspawn), also after `docker restart` (the watcher re-applies it); an app
container that publishes a port fails its workload, naming the port, while the other workloads deploy; the
sidecar image is staged in root's /var/lib/mesh/images, never in /var/tmp.

The lab is shared: the module holds /tmp/mesh-lab-dev.lock throughout (shared_lab()), removes every container it
starts, and leaves the lab deployed with inventory/lab.yaml.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    INVENTORY,
    hops,
    inventory_copy,
    out,
    run_mesh,
    sh,
    shared_lab,
    wait_for,
)
from lab_helpers import LabUp

from mesh.containers.modules import STAGING_DIR, register_container_modules
from mesh.containers.reachability import APP_CHAIN, RULES_PATH, WATCHER_UNIT
from mesh.deploy.modules import registry
from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.runner import run_playbook
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.lab.demo_units import DOCKER_NETWORK

DEPLOY_TIMEOUT = 600.0
APP, SIDECAR, APP_PORT, PROXY_PORT = "api-v2-1", "mesh-envoy-api-api-v2-1", 9090, 21000
RUN_ID = f"{os.getpid()}"
PROBE = f"mesh-e2e-isolation-probe-{RUN_ID}"  # a throwaway container on the app's Docker network
PUBLISHED = f"mesh-e2e-published-{RUN_ID}"  # an app container started with -p
PUBLISHED_HOST_PORT = 18090
PUBLISHED_PROXY = f"pubapp-{PUBLISHED}"  # <service>-<container>: a proxy name on a container host
STAGING_TAG = f"mesh-envoy:e2estage{RUN_ID}"[:len("mesh-envoy:") + 12]

_PY_CONNECT = """
import json, socket, sys
seen = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        seen[target] = "open"
    except OSError as e:
        seen[target] = "closed " + type(e).__name__
print(json.dumps(seen))
"""


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Iterator[LabUp]:
    """The shared lab, deployed with inventory/lab.yaml before the tests and again after them (whatever they
    left), and every container the tests started removed."""
    with shared_lab() as up:
        try:
            yield up
        finally:
            sh(up, "dock1", f"docker rm --force {PROBE} {PUBLISHED} >/dev/null 2>&1; "
                            f"docker image rm {STAGING_TAG} >/dev/null 2>&1; true")
            done = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
            assert done.code == 0, f"the lab is not left deployed with {INVENTORY}:\n{done}"


@pytest.fixture(scope="module")
def deployed(lab: LabUp) -> LabUp:
    done = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    assert done.code == 0, done
    return lab


# ---- what the tests look at --------------------------------------------------------------------------------

def _docker(lab: LabUp, command: str) -> str:
    return out(lab, "dock1", f"docker {command}").strip()


def _inspect(lab: LabUp, name: str, template: str) -> str:
    return _docker(lab, f"container inspect -f '{template}' {name}")


def _app_ip(lab: LabUp) -> str:
    return _inspect(lab, APP, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]


def _app_image(lab: LabUp) -> str:
    return _inspect(lab, APP, "{{.Config.Image}}")


def _from_other_container(lab: LabUp, targets: list[str]) -> dict[str, str]:
    """From a throwaway container of the app's image on the app's Docker network: connect to each host:port."""
    argv = " ".join(targets)
    done = sh(lab, "dock1", f"docker run --rm --name {PROBE} --network {DOCKER_NETWORK} -m 64m -i "
                            f"{_app_image(lab)} python3 - {argv}", input=_PY_CONNECT, timeout=60)
    assert done.returncode == 0, f"the probe container failed: {done.stderr}{done.stdout}"
    return dict(json.loads(done.stdout))


def _app_chain(lab: LabUp) -> str:
    pid = _inspect(lab, APP, "{{.State.Pid}}")
    return out(lab, "dock1", f"nsenter -t {pid} -n iptables -w -S {APP_CHAIN}; "
                             f"nsenter -t {pid} -n iptables -w -S INPUT | grep -c -- '-j {APP_CHAIN}'")


def _isolated(lab: LabUp) -> dict[str, str]:
    """The app's port from the other container (by address and by name), and the sidecar's proxy_port on the same
    address: the control case, showing the network path itself is open."""
    ip = _app_ip(lab)
    return _from_other_container(lab, [f"{ip}:{APP_PORT}", f"{APP}:{APP_PORT}", f"{ip}:{PROXY_PORT}"])


def _closed_but_sidecar_open(seen: dict[str, str]) -> bool:
    app = [state for target, state in seen.items() if target.endswith(f":{APP_PORT}")]
    proxy = [state for target, state in seen.items() if target.endswith(f":{PROXY_PORT}")]
    return all(state.startswith("closed") for state in app) and proxy == ["open"]


def _served_by_the_container(lab: LabUp, what: str) -> None:
    def probe() -> list[Any]:
        return [hops(lab, "vm1", 8080) for _ in range(12)]

    def container_answered(answers: list[Any]) -> bool:
        return any(not isinstance(seen, str) and [hop.get("service") for hop in seen] == ["web", "api", "db"]
                   and seen[1].get("kind") == "container" for seen in answers)
    wait_for(probe, container_answered, what, interval=1)


# ---- the tests, in order -----------------------------------------------------------------------------------

def test_another_container_cannot_reach_the_app_port_but_the_sidecar_can(deployed: LabUp) -> None:
    chain = _app_chain(deployed)
    assert f"-A {APP_CHAIN} -i lo -j RETURN" in chain, chain
    assert f"-A {APP_CHAIN} -p tcp -m tcp --dport {APP_PORT} -j DROP" in chain, chain
    assert chain.strip().endswith("\n1"), f"one jump to {APP_CHAIN} from INPUT: {chain}"
    seen = _isolated(deployed)
    assert _closed_but_sidecar_open(seen), seen
    _served_by_the_container(deployed, "web on vm1 -> api in dock1's container (through its sidecar) -> db")
    assert sh(deployed, "dock1", f"{RULES_PATH} check").returncode == 0


def test_after_docker_restart_the_watcher_closes_the_port_again(deployed: LabUp) -> None:
    before = _inspect(deployed, APP, "{{.State.Pid}}")
    _docker(deployed, f"restart {APP}")
    assert _inspect(deployed, APP, "{{.State.Pid}}") != before  # a new process, a new network namespace
    wait_for(lambda: sh(deployed, "dock1", f"{RULES_PATH} check").returncode, lambda rc: rc == 0,
             "the watcher re-applied the rules in the app's new namespace", interval=1)
    assert out(deployed, "dock1", f"systemctl is-active {WATCHER_UNIT}").strip() == "active"
    assert f"--dport {APP_PORT} -j DROP" in _app_chain(deployed)
    seen = _isolated(deployed)
    assert _closed_but_sidecar_open(seen), seen
    _served_by_the_container(deployed, "api answers from dock1's restarted container through its sidecar")
    second = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)  # the watcher left nothing to do
    assert second.code == 0 and second.recap()["dock1"]["changed"] == 0, second


def test_an_app_container_that_publishes_a_port_fails_its_workload_only(deployed: LabUp, tmp_path: Path) -> None:
    image = _app_image(deployed)
    _docker(deployed, f"run --detach --name {PUBLISHED} --network {DOCKER_NETWORK} -m 64m "
                      f"-p {PUBLISHED_HOST_PORT}:{APP_PORT} {image} python3 -m http.server {APP_PORT}")
    before = _inspect(deployed, PUBLISHED, "{{.Id}} {{.State.StartedAt}} {{json .HostConfig.PortBindings}}")
    try:
        def add_workload(dock1: dict[str, Any]) -> None:
            dock1["mesh_workloads"].append({"service": "pubapp", "version": "v1", "port": APP_PORT,
                                            "container": PUBLISHED, "health": {"tcp": True}})
        copy = inventory_copy(tmp_path / "inventory", _state_dir(), edit=_absolute_files,
                              hosts={"dock1": add_workload})
        done = run_mesh("deploy", str(copy), timeout=DEPLOY_TIMEOUT)
        assert done.code == 2, done
        failed = [line for line in done.stdout.splitlines()
                  if line.startswith(f"failed: [dock1] (item={PUBLISHED_PROXY})")]
        assert len(failed) == 1, done  # its sidecar task, and only that one
        assert PUBLISHED in failed[0] and f"{APP_PORT}/tcp" in failed[0], failed[0]
        assert f":{PUBLISHED_HOST_PORT}" in failed[0] and "publishes port" in failed[0], failed[0]
        recap = done.recap()
        assert recap["dock1"]["failed"] == 1, recap
        assert all(counts["failed"] == 0 and counts["unreachable"] == 0
                   for host, counts in recap.items() if host != "dock1"), recap
        assert any(line.startswith(("ok: [dock1] => (item=api-api-v2-1)", "changed: [dock1] => (item=api-api-v2-1)"))
                   for line in done.stdout.splitlines()), done
        # mesh changed nothing of the app container and started no sidecar for it.
        assert _inspect(deployed, PUBLISHED, "{{.Id}} {{.State.StartedAt}} {{json .HostConfig.PortBindings}}") \
            == before
        assert sh(deployed, "dock1", f"docker container inspect mesh-envoy-{PUBLISHED_PROXY}").returncode != 0
        _served_by_the_container(deployed, "dock1's other workload still serves through its sidecar")
    finally:  # the container, and the files the deploy wrote for its workload
        sh(deployed, "dock1", f"docker rm --force {PUBLISHED}; rm -rf /etc/mesh/proxies/{PUBLISHED_PROXY}")
    normal = run_mesh("deploy", str(INVENTORY), timeout=DEPLOY_TIMEOUT)
    assert normal.code == 0, normal


def test_the_sidecar_image_is_staged_in_a_root_only_folder(deployed: LabUp, tmp_path: Path) -> None:
    """mesh.sidecar_image on the real dock1 with a small tarball under a tag dock1 does not have: sent to
    /var/lib/mesh/images (root's, 0700), imported, removed; nothing in /var/tmp."""
    tarball = tmp_path / "image.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("etc/mesh-e2e")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"e2e"))
    tarball.write_bytes(gzip.compress(raw.getvalue()))
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"hosts": "dock1", "gather_facts": False, "tasks": [
        {"name": "stage and import", "mesh.sidecar_image": {"src": str(tarball), "tag": STAGING_TAG}}]}]))
    modules = registry.copy()
    register_container_modules(modules)
    dock1 = build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).host("dock1")
    output = io.StringIO()
    try:
        result = run_playbook(load_playbook(play, modules), [dock1], modules=modules, output=output, color=False)
        assert exit_code(result) == 0, output.getvalue()
        assert sh(deployed, "dock1", f"docker image inspect {STAGING_TAG}").returncode == 0
        assert out(deployed, "dock1", f"stat -c '%F %U:%G %a' {STAGING_DIR}").strip() == "directory root:root 700"
        assert out(deployed, "dock1", f"ls -A {STAGING_DIR}").strip() == ""  # removed after the import
        assert out(deployed, "dock1", "ls /var/tmp | grep -c mesh-envoy || true").strip() == "0"
    finally:
        sh(deployed, "dock1", f"docker image rm {STAGING_TAG}")


# ---- inventory copies --------------------------------------------------------------------------------------

def _state_dir() -> str:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY)).settings.state_dir


def _absolute_files(document: dict[str, Any]) -> None:
    """Paths in the inventory's vars (a Consul token file, a CA file) stay right in a copy elsewhere."""
    variables = document["all"].setdefault("vars", {})
    for key, value in list(variables.items()):
        if key.endswith("_file") and isinstance(value, str) and not os.path.isabs(value) and "{{" not in value:
            variables[key] = str((INVENTORY.parent / value).resolve())
