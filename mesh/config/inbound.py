"""What a proxy's inbound side is computed from and what a controller may redo of it alone: the inputs of its
authorization (InboundInputs), the inbound app route (rate limit, per-caller stats, the RBAC filters' per-route
config) and the names of its RBAC filters. Pure.

The deploy (compute.py) and the controller (mesh.render.render_inbound_file) both go through `inbound_route` and
`compile_authz`, so they write the same bytes; it must not render text.
"""

from __future__ import annotations

from mesh.config import telemetry, traffic
from mesh.config.authz import AuthzConfig, InboundInputs, compile_authz
from mesh.config.model import Caller, InboundRoute
from mesh.config.telemetry import AUTHZ_FILTERS
from mesh.inventory.model import Mesh, Workload, spiffe_id
from mesh.inventory.policy import AuthzOverride, ServicePolicy

INBOUND_LISTENER = "inbound"  # also the name of the app chain's route configuration
LOCAL_APP_CLUSTER = "local-app"
RATE_LIMIT_STAT_PREFIX = "inbound_rate_limit"

__all__ = ["AUTHZ_FILTERS", "INBOUND_LISTENER", "LOCAL_APP_CLUSTER", "inbound_authz", "inbound_inputs",
           "inbound_route"]


def inbound_inputs(mesh: Mesh, workload: Workload) -> InboundInputs:
    """The inputs of `workload`'s inbound authorization: who it is, its protocol, the mesh's default, and the
    services that declare its service as an upstream (sorted)."""
    callers = sorted({caller.service for caller in mesh.workloads
                      if any(upstream.service == workload.service for upstream in caller.upstreams)})
    return InboundInputs(service=workload.service, version=workload.version, protocol=workload.protocol,
                         trust_domain=mesh.settings.trust_domain, authz_default=mesh.settings.authz_default,
                         callers=tuple(callers))


def inbound_authz(inputs: InboundInputs, policy: ServicePolicy, override: AuthzOverride | None) -> AuthzConfig:
    """The entries of the two RBAC filters (mesh.config.authz.compile_authz: one meaning for Envoy and
    `mesh authz check`)."""
    return compile_authz(inputs, policy, override)


def inbound_route(inputs: InboundInputs, policy: ServicePolicy, override: AuthzOverride | None) -> InboundRoute:
    """The inbound app route of an HTTP service: to the local app, with the callee's own rate limit, its callers'
    virtual clusters and its authorization."""
    return InboundRoute(
        name=INBOUND_LISTENER,
        virtual_host=telemetry.inbound_stat_name(inputs.service, inputs.version),
        cluster=LOCAL_APP_CLUSTER,
        protocol=inputs.protocol,
        authz=inbound_authz(inputs, policy, override),
        authz_filters=AUTHZ_FILTERS,
        callers=tuple(Caller(service, telemetry.CLIENT_CERT_HEADER, f";URI={spiffe_id(inputs.trust_domain, service)}")
                      for service in inputs.callers),
        rate_limit=traffic.local_rate_limit(policy.rate_limit),
        rate_limit_stat_prefix=RATE_LIMIT_STAT_PREFIX,
    )
