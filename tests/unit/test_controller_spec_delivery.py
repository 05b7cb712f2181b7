"""spec.json's side of `mesh_delivery`: each proxy carries its node id and its host's delivery, each proxy
identity its node id (the DNS SAN the controller signs), the checker none; a spec written before these keys
still loads (files, no node id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_controller_spec_build import INVENTORY, KNOWN, plan_of, spec_on

from mesh.controller.spec import SpecError, parse_spec
from mesh.controller.spec_build import build_spec
from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh


@pytest.fixture
def xds_mesh(tmp_path: Path) -> Mesh:
    """vm1's web on xds, the rest on files."""
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY.replace("          ansible_host: 10.0.0.11\n",
                                      "          ansible_host: 10.0.0.11\n          mesh_delivery: xds\n"))
    return check_inventory(load_inventory(str(path)), str(path)).mesh


def test_proxies_carry_their_node_id_and_delivery_as_a_controller_reads_them(xds_mesh: Mesh) -> None:
    spec = spec_on(plan_of(xds_mesh), "ctl1")
    [web] = spec.host("vm1").proxies
    [api_vm] = spec.host("vm2").proxies
    [api_container] = spec.host("dock1").proxies
    assert (web.node_id, web.delivery) == ("web-vm1-8080", "xds")
    assert (api_vm.node_id, api_vm.delivery) == ("api-vm2-9090", "files")
    assert api_container.node_id.startswith("api-dock1-") and api_container.delivery == "files"


def test_proxy_identities_carry_the_node_id_the_checker_none(xds_mesh: Mesh) -> None:
    spec = spec_on(plan_of(xds_mesh), "ctl1")
    assert [(i.name, i.node_id) for i in spec.host("vm1").identities] == [("web-8080", "web-vm1-8080")]
    assert [(i.name, i.kind, i.node_id) for i in spec.host("ctl1").identities] == [("checker", "checker", "")]
    [proxy] = spec.host("dock1").proxies
    assert [i.node_id for i in spec.host("dock1").identities] == [proxy.node_id]


def test_the_spec_round_trips(xds_mesh: Mesh) -> None:
    spec = build_spec(plan_of(xds_mesh), xds_mesh, KNOWN, "d" * 64)
    assert parse_spec(spec.to_json()) == spec


def test_a_spec_written_before_xds_delivery_still_loads(xds_mesh: Mesh) -> None:
    data = json.loads(build_spec(plan_of(xds_mesh), xds_mesh, KNOWN, "d" * 64).to_json())
    for host in data["hosts"]:
        for proxy in host["proxies"]:
            del proxy["node_id"], proxy["delivery"]
        for identity in host["identities"]:
            del identity["node_id"]
    spec = parse_spec(json.dumps(data))
    [web] = spec.host("vm1").proxies
    assert (web.node_id, web.delivery) == ("", "files")
    assert [i.node_id for i in spec.host("vm1").identities] == [""]


def test_an_unknown_delivery_in_the_spec_is_named(xds_mesh: Mesh) -> None:
    data = json.loads(build_spec(plan_of(xds_mesh), xds_mesh, KNOWN, "d" * 64).to_json())
    data["hosts"][[h["name"] for h in data["hosts"]].index("vm1")]["proxies"][0]["delivery"] = "grpc"
    with pytest.raises(SpecError, match=r"proxies\[web-8080\]\.delivery: expected files or xds, got 'grpc'"):
        parse_spec(json.dumps(data), "spec.json")
