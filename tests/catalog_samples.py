"""A small mesh for catalog and health-checker tests: built from the model directly, no inventory files.

Shared by tests/unit/test_catalog.py, tests/unit/test_healthcheck.py and tests/test_catalog_consul.py.
"""

from __future__ import annotations

from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Workload


def make_mesh(drop: str | None = None) -> Mesh:
    """vm1: web; vm2: api + db; dock1 (container host): api v2; ctl1: controller only."""
    td = "lab.mesh"
    hosts = [
        ManagedHost("ctl1", "vm", Connection("10.77.0.3"), is_controller=True),
        ManagedHost("vm1", "vm", Connection("10.77.0.11"), (Workload("vm1", 0, "web", 8080, td),)),
        ManagedHost("vm2", "vm", Connection("10.77.0.12"), (
            Workload("vm2", 0, "api", 9090, td, proxy_port=21000),
            Workload("vm2", 1, "db", 5432, td, protocol="tcp", proxy_port=21001))),
        ManagedHost("dock1", "container_host", Connection("10.77.0.20"), (
            Workload("dock1", 0, "api", 9090, td, version="v2", container="api-v2-1"),)),
    ]
    if drop:
        hosts = [ManagedHost(h.name, h.kind, h.connection,
                             tuple(w for w in h.workloads if w.consul_id != drop), h.is_controller)
                 for h in hosts]
    return Mesh(MeshSettings(trust_domain=td, consul_url="http://127.0.0.1:8500"), tuple(hosts))
