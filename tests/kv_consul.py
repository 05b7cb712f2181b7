"""A real Consul with ACLs on and an inventory that reaches it with mesh's token, for the tests of run-time
overrides in Consul KV (traffic, authz). Nothing here is a test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh import catalog
from mesh.testing.consul_server import ConsulDevServer

MESH_ID = "lab.mesh"


def acl_consul() -> Iterator[ConsulDevServer]:
    """A Consul dev server with ACLs (default deny), for a module-scoped fixture."""
    from mesh.lab.images import ensure_consul_binary

    with ConsulDevServer(ensure_consul_binary(), acl=True) as server:  # a failure to get Consul fails, never skips
        yield server


def kv_inventory(tmp_path: Path, consul: ConsulDevServer, vm2_workloads: list[dict[str, Any]]) -> Iterator[Path]:
    """An inventory with mesh's token file: web on vm1 (calling api), `vm2_workloads` on vm2; every key under
    `mesh/<mesh_id>/` is removed afterwards."""
    token = tmp_path / "consul-token"
    token.write_text(consul.mesh_token() + "\n")
    token.chmod(0o600)
    path = tmp_path / "hosts.yaml"
    path.write_text(json.dumps({"all": {
        "vars": {"mesh_trust_domain": MESH_ID, "mesh_consul_url": consul.url, "mesh_consul_token_file": str(token),
                 "mesh_state_dir": str(tmp_path / "state")},
        "children": {"mesh_controllers": {"hosts": {"ctl1": {"ansible_host": "10.77.0.3"}}}, "vms": {"hosts": {
            "vm1": {"ansible_host": "10.77.0.11", "mesh_workloads": [
                {"service": "web", "port": 8080, "upstreams": [{"service": "api", "local_port": 19101}]}]},
            "vm2": {"ansible_host": "10.77.0.12", "mesh_workloads": vm2_workloads}}}}}}))
    yield path
    master(consul).kv.delete(f"mesh/{MESH_ID}/", recurse=True)


def master(consul: ConsulDevServer) -> Any:
    """python-consul's client with the master token."""
    return catalog.connect(catalog.ConsulAccess(consul.url, consul.master_token))
