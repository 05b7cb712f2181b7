"""The plan's side of `mesh_delivery`: a proxy on an xds host gets an ADS bootstrap naming every controller
(deduplicated, inventory order) at the ADS port with the controllers' SNI name and SPIFFE ID; a proxy on a files
host gets none."""

from __future__ import annotations

from meshvars_helpers import Fleet

from mesh.config import compute_proxy_config
from mesh.config.xds import XDS_PORT, XdsBootstrap
from mesh.inventory.model import Mesh

CONSUL = "mesh_consul_url: http://10.77.0.2:8500\nmesh_trust_domain: corp.mesh\n"
WEB = "ansible_host: 10.77.0.11\nmesh_workloads:\n  - {service: web, port: 8080}\n"
API = "ansible_host: 10.77.0.12\nmesh_workloads:\n  - {service: api, port: 9090}\n"


def mesh_with(vm1_extra: str = "", all_extra: str = "") -> Mesh:
    return (Fleet(CONSUL + all_extra).controller("ctl1").controller("ctl2", "ansible_host: 10.77.0.4\n")
            .controller("ctl3", "ansible_host: 10.77.0.3\n")
            .host("vm1", WEB + vm1_extra).host("vm2", API).build())


def bootstraps(mesh: Mesh) -> dict[str, XdsBootstrap | None]:
    return {workload.host: compute_proxy_config(mesh, workload).xds for workload in mesh.workloads}


def test_only_proxies_on_xds_hosts_get_an_ads_bootstrap() -> None:
    expected = XdsBootstrap(controllers=("10.77.0.3", "10.77.0.4"), port=XDS_PORT,
                            server_name="controller.corp.mesh",
                            controller_spiffe_id="spiffe://corp.mesh/mesh/controller")
    assert bootstraps(mesh_with("mesh_delivery: xds\n")) == {"vm1": expected, "vm2": None}
    assert bootstraps(mesh_with(all_extra="mesh_delivery: xds\n")) == {"vm1": expected, "vm2": expected}


def test_files_everywhere_means_no_ads_bootstrap() -> None:
    assert bootstraps(mesh_with()) == {"vm1": None, "vm2": None}
    assert bootstraps(mesh_with("mesh_delivery: files\n")) == {"vm1": None, "vm2": None}


def test_the_ads_controllers_are_the_tracers_list() -> None:
    mesh = mesh_with("mesh_delivery: xds\n", all_extra="mesh_tracing: {sampling: 1}\n")
    config = compute_proxy_config(mesh, next(w for w in mesh.workloads if w.host == "vm1"))
    assert config.xds is not None and config.tracer is not None
    assert config.xds.controllers == tuple(dict.fromkeys(e.address for e in config.tracer.endpoints))
