"""The controller's authorization part: the run-time denies it reads from Consul KV (`mesh authz deny`), the
inbound files of each proxy they make, and which deny revision every instance of a service runs. Pure.

It owns reading the KV values (an invalid one is ignored: the inventory's rules apply alone) and the published
`authz` map; the files come from mesh.render.render_inbound_file, so the controller writes byte for byte what a
deploy writes for the same rules and deny. It must not talk to Consul or hosts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from mesh.config.authz import InboundInputs
from mesh.controller.applied import OnHosts, Wanted, applied_revisions
from mesh.controller.routes import inventory_policy
from mesh.controller.spec import ControllerSpec, ProxySpec
from mesh.errors import MeshError
from mesh.inventory.policy import NO_POLICY, AuthzOverride, ServicePolicy
from mesh.inventory.services import authz_override_from_json, check_authz_override
from mesh.render import InboundFileKind, RenderedFile, render_inbound_file


@dataclass(frozen=True)
class Denies:
    """What the controller makes of the authorization KV prefix: each served service's valid run-time deny, and
    why the others are ignored (service -> reason; the inventory's rules apply alone)."""

    valid: Mapping[str, AuthzOverride] = field(default_factory=lambda: MappingProxyType({}))
    invalid: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def revision(self, service: str) -> str:
        """The revision the service's instances should run: its valid deny's, "" with none (an invalid one is not
        applied)."""
        override = self.valid.get(service)
        return override.revision if override is not None else ""


@dataclass(frozen=True)
class InboundRules:
    """What a service's inbound files are made of besides their inputs: its inventory policy (`authz`, and the
    rate limit an HTTP inbound route carries) and its valid run-time deny."""

    policy: ServicePolicy = NO_POLICY
    deny: AuthzOverride | None = None


Rules = Mapping[str, InboundRules]  # service -> its rules, for every service some proxy serves with inbound files


def served(spec: ControllerSpec) -> frozenset[str]:
    """Every service some proxy's inbound files are redone for."""
    return frozenset(InboundInputs.from_json(entry["inputs"]).service
                     for host in spec.hosts for proxy in host.proxies for entry in proxy.inbound.values())


def known_sources(spec: ControllerSpec) -> frozenset[str]:
    """Every service of the mesh (each runs some proxy of the spec): the names a deny may give."""
    return frozenset(proxy.service for host in spec.hosts for proxy in host.proxies)


def read_denies(values: Mapping[str, str], spec: ControllerSpec) -> Denies:
    """Each KV value read with authz_override_from_json and checked against the mesh's services and trust domain
    (check_authz_override); a service no proxy serves with inbound files is left out (nothing to apply)."""
    services = served(spec)
    sources = known_sources(spec)
    valid: dict[str, AuthzOverride] = {}
    invalid: dict[str, str] = {}
    for service, text in sorted(values.items()):
        if service not in services:
            continue
        try:
            override = authz_override_from_json(json.loads(text))
        except (MeshError, ValueError, KeyError, TypeError, AttributeError) as exc:
            invalid[service] = f"not a run-time deny: {exc}"
            continue
        problems = check_authz_override(override, sources, spec.trust_domain)
        if problems:
            invalid[service] = "; ".join(problems)
        else:
            valid[service] = override
    return Denies(MappingProxyType(valid), MappingProxyType(invalid))


def inbound_rules(spec: ControllerSpec, denies: Denies) -> dict[str, InboundRules]:
    """service -> its inventory policy and valid deny, for every service some proxy serves with inbound files (a
    deny naming no source is none, as a deploy plans it: mesh.authz.kv)."""
    found = {}
    for service in sorted(served(spec)):
        deny = denies.valid.get(service)
        found[service] = InboundRules(inventory_policy(spec, service), deny if deny and deny.deny_from else None)
    return found


def inbound_file(proxy: ProxySpec, path: str, rules: Rules) -> RenderedFile:
    """The inbound file at `path` of `proxy` under its service's rules (the inventory's alone when not given)."""
    entry = proxy.inbound[path]
    inputs = InboundInputs.from_json(entry["inputs"])
    found = rules.get(inputs.service, InboundRules())
    return _inbound_file(proxy.name, path, entry["kind"], inputs, found.policy, found.deny)


@lru_cache(maxsize=4096)
def _inbound_file(proxy: str, path: str, kind: InboundFileKind, inputs: InboundInputs, policy: ServicePolicy,
                  deny: AuthzOverride | None) -> RenderedFile:
    """Rendered once per distinct request: every endpoint change, and every round, reuse it."""
    return render_inbound_file(proxy, path, kind, inputs, policy, deny)


def applied_authz(spec: ControllerSpec, denies: Denies | None, wanted: Wanted, on_hosts: OnHosts) -> dict[str, str]:
    """The published `authz` map: service -> the revision of its deny every instance's inbound files now reflect,
    for each service some proxy serves with inbound files; a service is left out while one of its instances' files
    is not the wanted one (a push pending or refused, a host not reached). Nothing before the KV was read."""
    if denies is None:
        return {}
    return applied_revisions(spec, lambda proxy: ((path, InboundInputs.from_json(entry["inputs"]).service)
                                                  for path, entry in proxy.inbound.items()),
                             denies.revision, wanted, on_hosts)
