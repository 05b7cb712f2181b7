"""The lab's spare db on vm1: it runs (its unit binds 127.0.0.1 only) but the generated inventory leaves it out,
so the default lab has one db; an inventory copy that lists it (the TCP balancing test's) has two, and is valid.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.lab import demo_units
from mesh.lab.layers import demo_instance
from mesh.lab.topology import LabSize, build_topology, render_inventory, workload_vars


def _db_hosts(path: Path) -> list[str]:
    mesh = check_inventory(load_inventory(str(path)), str(path)).mesh
    return sorted(host.name for host in mesh.hosts for workload in host.workloads if workload.service == "db")


def test_the_spare_db_runs_on_vm1_but_only_an_inventory_that_lists_it_has_two_dbs(tmp_path: Path) -> None:
    topology = build_topology(LabSize(2, 1, 2))
    vm1 = topology.node("vm1")
    spares = [w for w in vm1.workloads if w.spare]
    assert [(w.service, w.port, w.protocol) for w in spares] == [("db", 5432, "tcp")]
    unit = demo_units.render_unit(demo_instance(vm1, spares[0]))
    assert "--bind 127.0.0.1" in unit and "--service db" in unit and "--host vm1" in unit

    text = render_inventory(topology, tmp_path / "key", tmp_path / "known_hosts")
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    assert _db_hosts(path) == ["vm2"]

    document = yaml.safe_load(text)
    document["all"]["children"]["vms"]["hosts"]["vm1"]["mesh_workloads"].append(workload_vars(spares[0]))
    path.write_text(yaml.safe_dump(document))
    assert _db_hosts(path) == ["vm1", "vm2"]


def test_listed_instances_still_bind_every_address() -> None:
    topology = build_topology(LabSize(2, 1, 2))
    vm2 = topology.node("vm2")
    for workload in vm2.workloads:
        assert "--bind" not in demo_units.render_unit(demo_instance(vm2, workload))
