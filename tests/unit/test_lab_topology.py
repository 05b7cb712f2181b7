"""The inventory `mesh lab up` writes, read back by mesh: every node in its group, and the metrics scrapers
(the `monitoring` group: consul1) that, with the controllers, are the only sources allowed to reach a metrics
port; the proxies' hosts are not among them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.lab.topology import INVENTORY_HEADER, LabSize, build_topology, render_inventory


def lab_mesh(folder: Path, size: LabSize) -> tuple[str, Mesh]:
    text = render_inventory(build_topology(size), folder / "id_ed25519", folder / "known_hosts",
                            folder / "consul-mesh-token")
    path = folder / "lab.yaml"
    path.write_text(text)
    return text, check_inventory(load_inventory(str(path)), str(path)).mesh


@pytest.mark.parametrize("size", [LabSize(2, 1, 2), LabSize(3, 0, 1), LabSize(4, 2, 3)])
def test_scrapers_are_consul1_and_with_the_controllers_the_only_metrics_sources(tmp_path: Path,
                                                                              size: LabSize) -> None:
    _, mesh = lab_mesh(tmp_path, size)
    controllers = [f"10.77.0.{2 + i}" for i in range(1, size.controllers + 1)]
    assert mesh.metrics_scrapers == ("10.77.0.2",)
    assert mesh.metrics_sources == ("10.77.0.2", *controllers)
    proxy_hosts = {host.connection.address for host in mesh.hosts if host.workloads}
    assert proxy_hosts and not proxy_hosts & set(mesh.metrics_sources)


def test_the_monitoring_group_is_named_in_all_vars(tmp_path: Path) -> None:
    text, _ = lab_mesh(tmp_path, LabSize(2, 1, 2))
    assert text.startswith(INVENTORY_HEADER)
    document = yaml.safe_load(text)
    assert document["all"]["vars"]["mesh_metrics_scrapers"] == ["monitoring"]
    assert document["all"]["vars"]["mesh_tracing"] == {"sampling": 100}  # every request traced, to the controllers
    assert document["all"]["children"]["monitoring"] == {"children": {"consul": None}}
    assert list(document["all"]["children"]["consul"]["hosts"]) == ["consul1"]


def test_every_proxy_has_its_own_metrics_port_on_its_host(tmp_path: Path) -> None:
    _, mesh = lab_mesh(tmp_path, LabSize(2, 2, 1))
    for host in mesh.hosts:
        ports = [workload.metrics_port for workload in host.workloads]
        assert len(ports) == len(set(ports)), (host.name, ports)
