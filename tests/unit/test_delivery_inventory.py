"""`mesh_delivery` as the inventory says it: files by default, xds in all vars, group vars or host vars (the
nearest wins, as for mesh_zone), anything else one error at its file, line and key; xds without a controller is
refused where it is set; `mesh inventory check` says which hosts stream their config."""

from __future__ import annotations

from typing import get_args

import pytest
from meshvars_helpers import Fleet, find

from mesh.config.xds import DELIVERIES, Delivery
from mesh.inventory import delivery
from mesh.inventory.check import check_inventory

CONSUL = "mesh_consul_url: http://10.77.0.2:8500\n"
WEB = "ansible_host: 10.77.0.11\nmesh_workloads:\n  - {service: web, port: 8080}\n"
API = "ansible_host: 10.77.0.12\nmesh_workloads:\n  - {service: api, port: 9090}\n"


def deliveries(fleet: Fleet) -> dict[str, str]:
    return {host.name: host.delivery for host in fleet.build().hosts}


def test_the_inventory_layer_knows_the_same_deliveries_as_the_config() -> None:
    assert delivery.DELIVERIES == DELIVERIES
    assert get_args(delivery.Delivery) == get_args(Delivery) == DELIVERIES


def test_unset_is_files() -> None:
    assert deliveries(Fleet(CONSUL).controller().host("vm1", WEB)) == {"ctl1": "files", "vm1": "files"}


def test_all_vars_group_vars_and_host_vars_nearest_wins() -> None:
    fleet = (Fleet(CONSUL + "mesh_delivery: xds\n").controller()
             .group_vars("edge", "mesh_delivery: files\n")
             .host("vm1", WEB).host("vm2", API, group="edge")
             .host("vm3", API.replace(".12", ".13") + "mesh_delivery: xds\n", group="edge"))
    assert deliveries(fleet) == {"ctl1": "xds", "vm1": "xds", "vm2": "files", "vm3": "xds"}


@pytest.mark.parametrize(("value", "fragment"), [
    ("XDS", "expected files or xds, got 'XDS' (did you mean 'xds'?)"),
    ("file", "expected files or xds, got 'file' (did you mean 'files'?)"),
    ("grpc", "expected files or xds, got 'grpc'"),
    ("true", "expected files or xds, got True (bool)"),
    ("[xds]", "expected files or xds, got ['xds'] (list)"),
    ("null", "expected files or xds, got None (NoneType)"),
    ("''", "expected files or xds, got ''"),
])
def test_anything_else_is_one_error_at_its_line(value: str, fragment: str) -> None:
    errors = Fleet(CONSUL).controller().host("vm1", WEB + f"mesh_delivery: {value}\n").errors()
    find(errors, "host_vars/vm1.yml", 4, "mesh_delivery", fragment)
    assert len(errors) == 1, [str(error) for error in errors]


def test_a_bad_group_value_is_reported_once_at_the_group_file() -> None:
    fleet = (Fleet(CONSUL).controller().group_vars("vms", "mesh_delivery: ads\n")
             .host("vm1", WEB, group="vms").host("vm2", API, group="vms"))
    errors = fleet.errors()
    find(errors, "group_vars/vms.yml", 1, "mesh_delivery", "expected files or xds, got 'ads'")
    assert len(errors) == 1


def test_xds_without_a_controller_is_refused_where_it_is_set() -> None:
    errors = Fleet(CONSUL + "mesh_delivery: xds\n").host("vm1", WEB).host("vm2", API).errors()
    error = find(errors, "group_vars/all.yml", 2, "mesh_delivery",
                 "xds streams the proxies' config from the controllers, but no host is in the group mesh_controllers")
    assert sum(e is error or str(e) == str(error) for e in errors) == 1  # once, though two hosts inherit it


def test_files_without_a_controller_gets_no_delivery_error() -> None:
    errors = Fleet(CONSUL + "mesh_delivery: files\n").host("vm1", WEB).errors()
    assert not [error for error in errors if error.key == "mesh_delivery"]


def test_check_says_which_hosts_stream_their_config() -> None:
    fleet = Fleet(CONSUL).controller().host("vm1", WEB + "mesh_delivery: xds\n").host("vm2", API)
    assert "delivery: xds: vm1; files: vm2" in check_inventory(fleet.data).summary_lines()
    fleet = Fleet(CONSUL + "mesh_delivery: xds\n").controller().host("vm1", WEB).host("vm2", API)
    assert "delivery: xds: vm1, vm2" in check_inventory(fleet.data).summary_lines()
    assert "delivery: files" in check_inventory(Fleet(CONSUL).controller().host("vm1", WEB).data).summary_lines()


def test_a_misspelled_key_is_an_unknown_variable_with_a_hint() -> None:
    errors = Fleet(CONSUL).controller().host("vm1", WEB + "mesh_delivry: xds\n").errors()
    find(errors, "host_vars/vm1.yml", 4, "mesh_delivry", "did you mean 'mesh_delivery'")
