"""What mesh deployed where (mesh/deploy/record.py): hosts recorded by a deploy and later gone from the
inventory are found again with how to reach them, from the state dir's own record."""

from __future__ import annotations

import os
from pathlib import Path

from mesh.deploy import record
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh

TWO_VMS = """\
all:
  vars: {{mesh_trust_domain: lab.mesh, mesh_state_dir: state, mesh_consul_url: "http://127.0.0.1:1"}}
  children:
    mesh_controllers:
      hosts:
        ctl1: {{ansible_host: 10.77.0.3}}
    vms:
      hosts:
{hosts}
"""
VM1 = "        vm1: {ansible_host: 10.77.0.11, ansible_port: 2222, mesh_workloads: [{service: web, port: 8080}]}\n"
VM2 = "        vm2: {ansible_host: 10.77.0.12, mesh_workloads: [{service: api, port: 9090}]}\n"


def _mesh(tmp_path: Path, hosts: str) -> Mesh:
    path = tmp_path / "inventory.yml"
    path.write_text(TWO_VMS.format(hosts=hosts))
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def test_a_host_that_left_the_inventory_is_found_with_its_connection(tmp_path: Path) -> None:
    before = _mesh(tmp_path, VM1 + VM2)
    warnings: list[str] = []
    record.update(before, before.hosts, [], warnings.append)
    stored = Path(before.settings.state_dir) / record.RECORD_FILE
    assert oct(os.stat(stored).st_mode & 0o777) == "0o600"
    after = _mesh(tmp_path, VM2)
    retired = record.retired_hosts(after, warnings.append)
    assert [(host.name, host.connection.address, host.connection.port, host.workloads) for host in retired] == \
        [("vm1", "10.77.0.11", 2222, ())]
    record.update(after, after.hosts, ["vm1"], warnings.append)  # cleaned: forgotten
    assert record.retired_hosts(after, warnings.append) == []
    # no Consul answers here: its copy is said to be skipped, and nothing else is warned about
    assert warnings and all("in Consul" in warning for warning in warnings), warnings


def test_an_unreadable_entry_is_said_and_not_cleaned(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path, VM2)
    state = Path(mesh.settings.state_dir)
    state.mkdir(parents=True)
    (state / record.RECORD_FILE).write_text('{"version": 1, "hosts": {"old1": {"kind": "vm", "connection": 7}}}')
    warnings: list[str] = []
    assert record.retired_hosts(mesh, warnings.append) == []
    assert any("old1" in warning and "cannot be read" in warning for warning in warnings), warnings
