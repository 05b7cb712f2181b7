"""The controller's traffic part: the overrides it reads from Consul KV, each service's effective policy, the route
files they make, and which override revision every caller runs. Pure.

It owns reading the KV values (an invalid one is ignored: the inventory policy applies), the effective policy
(the spec's inventory policy with the valid override applied) and the published `traffic` map; Envoy config comes
from mesh.config.traffic (outbound_route) and mesh.render (render_route_file), so the controller writes byte for
byte what a deploy writes for the same policy. It must not talk to Consul or hosts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from mesh.config.traffic import RouteInputs, outbound_route
from mesh.controller.applied import OnHosts, Wanted, applied_revisions
from mesh.controller.spec import ControllerSpec, ProxySpec
from mesh.errors import MeshError
from mesh.inventory.policy import NO_POLICY, ServicePolicy, TrafficOverride, apply_override
from mesh.inventory.services import check_override, override_from_json, policy_from_json
from mesh.render import RenderedFile, render_route_file

RoutePolicies = Mapping[str, ServicePolicy]  # service -> its effective policy (every service a route file names)


@dataclass(frozen=True)
class Overrides:
    """What the controller makes of the traffic KV prefix: each service's valid override, and why the others are
    ignored (service -> reason; their inventory policy applies)."""

    valid: Mapping[str, TrafficOverride] = field(default_factory=lambda: MappingProxyType({}))
    invalid: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def revision(self, service: str) -> str:
        """The revision callers of `service` should run: its valid override's, "" with none (an invalid one is
        not applied)."""
        override = self.valid.get(service)
        return override.revision if override is not None else ""


def route_inputs(spec: ControllerSpec) -> dict[str, RouteInputs]:
    """service -> the route inputs of one of its callers' route files (every caller has the same versions and
    protocol: the inventory's), for every service some route file names."""
    found: dict[str, RouteInputs] = {}
    for host in spec.hosts:
        for proxy in host.proxies:
            for data in proxy.routes.values():
                inputs = RouteInputs.from_json(data)
                found.setdefault(inputs.service, inputs)
    return found


def read_overrides(values: Mapping[str, str], spec: ControllerSpec) -> Overrides:
    """Each KV value read with override_from_json and checked against the service's versions and protocol
    (check_override); a service nobody calls through a route file is left out (nothing to apply)."""
    services = route_inputs(spec)
    valid: dict[str, TrafficOverride] = {}
    invalid: dict[str, str] = {}
    for service, text in sorted(values.items()):
        inputs = services.get(service)
        if inputs is None:
            continue
        try:
            override = override_from_json(json.loads(text))
        except (MeshError, ValueError, KeyError, TypeError, AttributeError) as exc:
            invalid[service] = f"not an override: {exc}"
            continue
        problems = check_override(override, inputs.versions, inputs.protocol, service)
        if problems:
            invalid[service] = "; ".join(problems)
        else:
            valid[service] = override
    return Overrides(MappingProxyType(valid), MappingProxyType(invalid))


def inventory_policy(spec: ControllerSpec, service: str) -> ServicePolicy:
    """The service's policy as the inventory says (the spec's copy; NO_POLICY when it has none)."""
    return _policy(_text(spec.policies.get(service)))


def effective_policies(spec: ControllerSpec, overrides: Overrides) -> dict[str, ServicePolicy]:
    """service -> apply_override(its inventory policy, its valid override), for every service a route file names."""
    return {service: apply_override(inventory_policy(spec, service), overrides.valid.get(service))
            for service in sorted(route_inputs(spec))}


def route_file(proxy: ProxySpec, path: str, policies: RoutePolicies) -> RenderedFile:
    """The route file at `path` of `proxy` under its service's effective policy (NO_POLICY when not given)."""
    inputs = RouteInputs.from_json(proxy.routes[path])
    return _route_file(proxy.name, path, inputs, policies.get(inputs.service, NO_POLICY))


@lru_cache(maxsize=4096)
def _route_file(proxy: str, path: str, inputs: RouteInputs, policy: ServicePolicy) -> RenderedFile:
    """Rendered once per distinct request: a fan-out of callers, and every endpoint change, reuse it."""
    return render_route_file(proxy, path, outbound_route(inputs, policy))


@lru_cache(maxsize=256)
def _policy(text: str | None) -> ServicePolicy:
    return NO_POLICY if text is None else policy_from_json(json.loads(text))


def _text(data: Mapping[str, Any] | None) -> str | None:
    return None if data is None else json.dumps(data, sort_keys=True)


def applied_traffic(spec: ControllerSpec, overrides: Overrides | None, wanted: Wanted,
                    on_hosts: OnHosts) -> dict[str, str]:
    """The published `traffic` map: service -> the revision every caller's route file now reflects, for each
    service some route file names; a service is left out while one of its callers' files is not the wanted one
    (a push pending or refused, a host not reached). Nothing before the KV was read (overrides None).

    wanted: (host, proxy, relpath) -> the sha256 the controller wants there; on_hosts: (host, proxy) -> what the
    host has (relpath -> sha256), None when unknown."""
    if overrides is None:
        return {}
    return applied_revisions(spec, lambda proxy: ((path, RouteInputs.from_json(data).service)
                                                  for path, data in proxy.routes.items()),
                             overrides.revision, wanted, on_hosts)
