"""The Vagrant lab: `vagrant validate -p` accepts the Vagrantfile, its addresses match inventory/vagrant.yaml,
the inventory passes `mesh inventory check` and reads as Ansible reads it, and vagrant/demo/ holds what
mesh.lab.demo_units renders for its workloads (rewritten with `pytest --update-goldens`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.cli import run
from mesh.lab.demo_units import DOCKER_NETWORK, DemoInstance, docker_run_args, render_unit, unit_name

REPO = Path(__file__).resolve().parents[1]
VAGRANT = REPO / "vagrant"
INVENTORY = REPO / "inventory" / "vagrant.yaml"
IMAGE = "mesh-demo-app:vagrant"
GROUPS = {"consul", "mesh_controllers", "vms", "containers"}


def inventory_hosts() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(INVENTORY.read_text())
    hosts: dict[str, dict[str, Any]] = {}
    for group in document["all"]["children"].values():
        hosts.update(group["hosts"])
    return hosts


def instances(host: str, variables: dict[str, Any]) -> list[DemoInstance]:
    found = []
    for workload in variables.get("mesh_workloads", []):
        upstreams = tuple((u["service"], "127.0.0.1", u["local_port"]) for u in workload.get("upstreams", []))
        container = workload.get("container")
        found.append(DemoInstance(workload["service"], workload.get("version", "v1"), workload["port"], host,
                                  container or host, "container" if container else "vm", upstreams))
    return found


def containers_script(demo: list[DemoInstance]) -> str:
    lines = ["#!/bin/sh", "# Generated from inventory/vagrant.yaml by tests/test_vagrant.py --update-goldens.",
             "set -eu",
             f"docker network inspect {DOCKER_NETWORK} >/dev/null 2>&1 || docker network create {DOCKER_NETWORK}"]
    for instance in demo:
        lines.append(f"docker container inspect {instance.instance} >/dev/null 2>&1 || "
                     + shlex.join(["docker", *docker_run_args(instance, IMAGE)]))
    return "\n".join(lines) + "\n"


def expected_demo_files() -> dict[Path, str]:
    files = {}
    for host, variables in inventory_hosts().items():
        demo = instances(host, variables)
        if not demo:
            continue
        if demo[0].kind == "container":
            files[VAGRANT / "demo" / host / "containers.sh"] = containers_script(demo)
        else:
            for instance in demo:
                files[VAGRANT / "demo" / host / unit_name(instance)] = render_unit(instance)
    return files


def test_demo_files_are_what_the_renderer_makes(update_goldens: bool) -> None:
    expected = expected_demo_files()
    if update_goldens:
        shutil.rmtree(VAGRANT / "demo", ignore_errors=True)
        for path, text in expected.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    actual = {path: path.read_text() for path in (VAGRANT / "demo").rglob("*") if path.is_file()}
    assert actual == expected, "vagrant/demo/ is stale: run pytest --update-goldens and review the diff"


def test_vagrantfile_addresses_match_the_inventory() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    nodes = dict(re.findall(r'"([a-z0-9]+)" => \{ ip: "([0-9.]+)"', text))
    assert nodes == {host: variables["ansible_host"] for host, variables in inventory_hosts().items()}


def test_vagrant_validate() -> None:
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1")
    result = subprocess.run(["vagrant", "validate", "-p"], cwd=VAGRANT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mesh_inventory_check_accepts_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["inventory", "check", str(INVENTORY)]) == 0


def test_mesh_reads_the_inventory_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    for host, variables in inventory_hosts().items():
        assert run(["inventory", "host", str(INVENTORY), host]) == 0
        seen = json.loads(capsys.readouterr().out)
        assert seen["ansible_host"] == variables["ansible_host"]
        assert seen.get("mesh_workloads", []) == variables.get("mesh_workloads", []), host
        assert seen["mesh_consul_url"] == "http://192.168.56.10:8500"


def test_ansible_inventory_lists_the_same_hosts_and_groups(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ansible_inventory = shutil.which("ansible-inventory")
    assert ansible_inventory, "ansible-core (a test dependency) is not installed"
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="true")
    result = subprocess.run([ansible_inventory, "-i", str(INVENTORY), "--list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    reference = json.loads(result.stdout)
    assert run(["inventory", "list", str(INVENTORY)]) == 0
    ours = json.loads(capsys.readouterr().out)
    groups = {name for name in reference if name not in ("_meta", "all", "ungrouped")}
    assert groups == GROUPS
    for name in groups:
        assert set(ours[name]["hosts"]) == set(reference[name]["hosts"])
    assert set(reference["_meta"]["hostvars"]) == set(inventory_hosts())
    assert ours["_meta"]["hostvars"] == reference["_meta"]["hostvars"]
