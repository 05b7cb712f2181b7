"""The run-time overrides a plan takes from Consul KV, read before it: traffic overrides (`mesh route set`,
mesh.traffic.kv) and authorization denies (`mesh authz deny`, mesh.authz.kv), so the route and inbound files a
deploy writes equal the controllers'.

It owns bundling the kinds for the plan (PlanInputs); reading and checking each kind is that kind's module's, and
it must not decide anything about the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.inventory.model import Mesh
from mesh.inventory.policy import AuthzOverride, TrafficOverride


@dataclass(frozen=True)
class RuntimeOverrides:
    """Every kind of run-time override that applies to the inventory, by service (the ones that do not apply
    were named in a warning and left out, as the controllers leave them out)."""

    traffic: Mapping[str, TrafficOverride] = field(default_factory=lambda: MappingProxyType({}))
    authz: Mapping[str, AuthzOverride] = field(default_factory=lambda: MappingProxyType({}))


NO_OVERRIDES = RuntimeOverrides()


def read_runtime_overrides(mesh: Mesh, warn: Callable[[str], None]) -> RuntimeOverrides:
    """Both kinds from the mesh's Consul (nothing without mesh_consul_url; a kind Consul does not give: a warning
    and the inventory's behaviour for it). A token Consul refuses raises catalog.TokenRefused."""
    from mesh.authz.kv import plan_authz_overrides
    from mesh.traffic.kv import plan_overrides

    return RuntimeOverrides(plan_overrides(mesh, warn), plan_authz_overrides(mesh, warn))
