"""`mesh inventory check`: refuses everything `deploy` would refuse before connecting (reader warnings too)
and summarizes the mesh. It must not connect to hosts; `list` and `host` never call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import InventoryError, InventoryErrors, Origin
from mesh.inventory.data import InventoryData
from mesh.inventory.model import Mesh
from mesh.inventory.policy import (
    NO_POLICY,
    AuthzDefault,
    AuthzRules,
    LoadBalancing,
    OutlierPolicy,
    ServicePolicy,
)
from mesh.inventory.validate import VarsOf, build_mesh


@dataclass(frozen=True)
class CheckReport:
    """A valid inventory's mesh, summarized for people."""

    mesh: Mesh
    inventory_path: str

    def summary_lines(self) -> list[str]:
        mesh = self.mesh
        vms = [host.name for host in mesh.hosts if host.kind == "vm"]
        container_hosts = [host.name for host in mesh.hosts if host.kind == "container_host"]
        kinds = f"{len(vms)} vm, {len(container_hosts)} container_host"
        roles = f"{len(mesh.controllers)} controller(s) among them, {len(mesh.unmanaged_hosts)} other (left alone)"
        lines = [f"inventory {self.inventory_path}: ok", f"hosts: {kinds}, {roles}"]
        if mesh.controllers:
            lines.append("controllers: " + ", ".join(host.name for host in mesh.controllers))
        lines.append(f"delivery: {delivery_brief(mesh)}")
        lines.append(f"services: {len(mesh.services)}")
        for name, instances in mesh.services.items():
            versions = ", ".join(sorted({workload.version for workload in instances}))
            lines.append(f"  {name}: {len(instances)} instance(s), version(s) {versions}")
            if mesh.policy(name) != NO_POLICY:
                lines.append(f"    policy: {policy_brief(mesh.policy(name), mesh.settings.authz_default)}")
        lines.append(f"instances: {len(mesh.workloads)}")
        lines.append(f"tracing: {tracing_brief(mesh)}")
        return lines


def delivery_brief(mesh: Mesh) -> str:
    """`mesh_delivery` of the hosts that run proxies, in words: `files` when all of them use files, else
    `xds: vm1, vm2` (and `; files: ...` for the others)."""
    proxied = [host for host in mesh.hosts if host.workloads]
    xds = [host.name for host in proxied if host.delivery == "xds"]
    if not xds:
        return "files"
    files = [host.name for host in proxied if host.delivery == "files"]
    return f"xds: {', '.join(xds)}" + (f"; files: {', '.join(files)}" if files else "")


def tracing_brief(mesh: Mesh) -> str:
    """`mesh_tracing` in words: off, or the share of requests traced and where their spans go."""
    tracing = mesh.settings.tracing
    if tracing is None:
        return "off (mesh trace rebuilds a request's hops from the access logs)"
    share = f"{tracing.sampling:g} % of requests"
    if tracing.collector == "mesh":
        return f"{share}, spans to mesh's collector on the controllers"
    return f"{share}, spans to the {'Zipkin' if tracing.collector == 'zipkin' else 'OTLP'} collector {tracing.url}"


def policy_brief(policy: ServicePolicy, authz_default: AuthzDefault = "declared") -> str:
    """A service's policy in one line: the fields it sets, the main values of some; its authorization when it
    has rules (with the mesh's default, which applies to what no allow rule names)."""
    parts = []
    if policy.lb != LoadBalancing():
        hash_on = policy.lb.hash_on
        on = "" if hash_on is None else " on source_ip" if hash_on.name is None else f" on {hash_on.kind} {hash_on.name}"
        parts.append(f"lb {policy.lb.policy}{on}")
    if policy.timeout_ms is not None:
        parts.append(f"timeout {_duration(policy.timeout_ms)}")
    if policy.retries is not None:
        parts.append(f"retries {policy.retries.attempts}")
    if policy.circuit_breaker is not None:
        parts.append("circuit_breaker")
    if policy.outlier_detection != OutlierPolicy():
        parts.append("outlier_detection")
    if policy.routes:
        parts.append(f"{len(policy.routes)} route(s)")
    if policy.mirror is not None:
        parts.append(f"mirror {policy.mirror.percent:g}% to {policy.mirror.to}")
    if policy.fault is not None:
        parts.append("fault")
    if policy.rate_limit is not None:
        parts.append(f"rate_limit {policy.rate_limit.requests_per_second}/s per instance")
    if policy.mtls != "strict":
        parts.append(f"mtls {policy.mtls}")
    if policy.authz != AuthzRules():
        parts.append(_authz_brief(policy.authz, authz_default))
    return ", ".join(parts)


def _authz_brief(rules: AuthzRules, authz_default: AuthzDefault) -> str:
    """`authz (default declared; 2 allow, 1 deny, 1 in shadow mode)`."""
    shadow = sum(rule.mode == "shadow" for rule in (*rules.allow, *rules.deny))
    counts = f"{len(rules.allow)} allow, {len(rules.deny)} deny" + (f", {shadow} in shadow mode" if shadow else "")
    return f"authz (default {authz_default}; {counts})"


def _duration(milliseconds: int) -> str:
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def check_inventory(data: InventoryData, inventory_path: str | None = None,
                    vars_of: VarsOf | None = None) -> CheckReport:
    """Refuse the inventory's warnings and every broken rule of INVENTORY.md (InventoryErrors, exit 4);
    else a CheckReport. inventory_path defaults to the first source the reader read."""
    path = inventory_path if inventory_path is not None else (data.sources[0] if data.sources else ".")
    errors: list[InventoryError] = [warning.as_error() for warning in data.warnings]
    try:
        mesh = _build(data, path, vars_of)
    except InventoryErrors as exc:
        # The reader already warned about some of these (ansible_port, ansible_host): say it once.
        warned = {(error.origin, error.key) for error in errors}
        raise InventoryErrors(errors + [e for e in exc.errors if (e.origin, e.key) not in warned]) from None
    if errors:
        raise InventoryErrors(errors)
    return CheckReport(mesh, path)


def _build(data: InventoryData, path: str, vars_of: VarsOf | None) -> Mesh:
    # Templates are bounded (sandbox.py); this is the last guard: exit 4 with the inventory named, never 250.
    try:
        return build_mesh(data, path, vars_of=vars_of)
    except MemoryError:
        raise InventoryErrors([InventoryError(Origin(path), "the inventory needs more memory than mesh has to "
                                              "check it")]) from None
    except RecursionError:
        raise InventoryErrors([InventoryError(Origin(path), "the inventory's values refer to each other too "
                                              "deeply to check")]) from None
