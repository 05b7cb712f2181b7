"""`mesh route show`: a service's effective routing (the inventory's policy with the run-time override applied,
as every caller's Envoy routes it) with where each value comes from, and whether the controllers applied the
stored override. Pure: route_view builds it from what was read, show_text and show_json print it.

Origins: `inventory` (mesh_services), `override` (Consul KV, `mesh route set` / `mesh fault set`), `default`
(mesh's behaviour where the inventory says nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from mesh.inventory.model import Mesh
from mesh.inventory.policy import Fault, Retries, RouteMatch, RouteRule, ServicePolicy, apply_override
from mesh.inventory.services import fault_to_json
from mesh.traffic.kv import AppliedTraffic, StoredOverride, usable_problems

Origin = Literal["inventory", "override", "default"]
ENVOY_DEFAULT_TIMEOUT_MS = 15_000  # Envoy's route timeout when none is set (HTTP/1.1 services)
DEFAULT_RETRIES_TEXT = "2 on connect-failure,refused-stream,reset"
_T = TypeVar("_T")


@dataclass(frozen=True)
class RouteLine:
    """One route of the service's outbound route configuration, in order (first match wins)."""

    match: RouteMatch | None
    after_others: bool  # not the first route: a catch-all then takes every other request
    to: tuple[tuple[str, int], ...]  # () = every instance of every version
    to_from: Origin
    timeout_ms: int | None  # None: the protocol's default
    timeout_from: Origin
    retries: Retries | None  # None: mesh's default retries
    retries_from: Origin


@dataclass(frozen=True)
class RouteView:
    service: str
    protocol: str
    versions: tuple[str, ...]
    policy: ServicePolicy  # the effective one
    routes: tuple[RouteLine, ...]
    mirror_from: Origin
    fault_from: Origin
    stored: StoredOverride | None
    problems: tuple[str, ...]  # why the stored override is ignored (empty: it applies)
    applied: AppliedTraffic

    @property
    def revision(self) -> str:
        """The revision the controllers should report once every caller routes as shown ("" = no override)."""
        if self.stored is None or self.problems or self.stored.override is None:
            return ""
        return self.stored.override.revision

    @property
    def controller_revision(self) -> str | None:
        return self.applied.revision(self.service)

    @property
    def is_applied(self) -> bool:
        return self.controller_revision == self.revision


def route_view(mesh: Mesh, service: str, stored: StoredOverride | None, applied: AppliedTraffic) -> RouteView:
    """The effective routing of `service` (which the inventory must have). Pure."""
    workloads = mesh.services[service]
    inventory = mesh.policy(service)
    problems = tuple(usable_problems(stored, mesh)) if stored is not None else ()
    override = stored.override if stored is not None and not problems else None
    policy = apply_override(inventory, override)
    split_overridden = override is not None and override.split is not None
    lines = []
    for position, rule in enumerate(policy.routes):
        overridden = split_overridden and position == len(policy.routes) - 1
        lines.append(_line(rule, policy, "override" if overridden else "inventory", position > 0))
    if not policy.routes or policy.routes[-1].match is not None:  # mesh's catch-all to every instance
        lines.append(_line(RouteRule(to=()), policy, "default", bool(policy.routes)))
    fault_from: Origin = ("override" if override is not None and override.fault is not None
                          else "inventory" if inventory.fault is not None else "default")
    return RouteView(service, workloads[0].protocol, mesh.versions(service), policy, tuple(lines),
                     "inventory" if policy.mirror is not None else "default", fault_from, stored, problems, applied)


def _line(rule: RouteRule, policy: ServicePolicy, to_from: Origin, after_others: bool) -> RouteLine:
    timeout, timeout_from = _origin(rule.timeout_ms, policy.timeout_ms)
    retries, retries_from = _origin(rule.retries, policy.retries)
    return RouteLine(rule.match, after_others, rule.to, to_from, timeout, timeout_from, retries, retries_from)


def _origin(own: _T | None, service: _T | None) -> tuple[_T | None, Origin]:
    """A route's value (its own, else the service's, both from the inventory), or None: mesh's default."""
    if own is not None:
        return own, "inventory"
    if service is not None:
        return service, "inventory"
    return None, "default"


# ---- words ------------------------------------------------------------------------------------------------


def duration_text(millis: int) -> str:
    if millis % 3_600_000 == 0:
        return f"{millis // 3_600_000}h"
    if millis % 60_000 == 0:
        return f"{millis // 60_000}m"
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


def percent_text(percent: float) -> str:
    return f"{percent:g}%"


def match_text(match: RouteMatch | None, after_others: bool = False) -> str:
    if match is None:
        return "every other request" if after_others else "every request"
    parts = [f"header {name}={value}" for name, value in match.headers]
    parts += [f"cookie {name}={value}" for name, value in match.cookies]
    if match.path is not None:
        parts.append(f"path {match.path.kind} {match.path.value}")
    if match.method is not None:
        parts.append(f"method {match.method}")
    return ", ".join(parts)


def to_text(to: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(f"{version} {weight}%" for version, weight in to) if to else "every instance"


def retries_text(retries: Retries | None) -> str:
    if retries is None:
        return DEFAULT_RETRIES_TEXT
    text = f"{retries.attempts} on {','.join(retries.on) if retries.on else 'connect-failure,refused-stream,reset'}"
    if retries.per_try_timeout_ms is not None:
        text += f", {duration_text(retries.per_try_timeout_ms)} per try"
    if retries.backoff is not None:
        text += f", backoff {duration_text(retries.backoff.base_ms)}-{duration_text(retries.backoff.max_ms)}"
    return text


def timeout_text(timeout_ms: int | None, protocol: str) -> str:
    if timeout_ms is not None:
        return duration_text(timeout_ms) if timeout_ms else "none"
    return duration_text(ENVOY_DEFAULT_TIMEOUT_MS) if protocol == "http" else "none"


def fault_text(fault: Fault | None) -> str:
    if fault is None or (fault.abort is None and fault.delay is None):
        return "none"
    parts = []
    if fault.abort is not None:
        parts.append(f"abort {fault.abort.status} for {percent_text(fault.abort.percent)}")
    if fault.delay is not None:
        parts.append(f"delay {duration_text(fault.delay.duration_ms)} for {percent_text(fault.delay.percent)}")
    text = ", ".join(parts) + " of requests"
    if fault.when_headers:
        text += " with " + " and ".join(f"header {name}={value}" for name, value in fault.when_headers)
    return text


def applied_text(view: RouteView) -> str:
    """Whether every caller routes as shown, in words."""
    applied = view.applied
    if not applied.active:
        return f"no controller is active ({applied.reason}): callers' routes follow the last deploy or push"
    reported = view.controller_revision
    wanted = f"revision {view.revision}" if view.revision else "no override"
    if reported is None:
        return ("not reported by the controller (no caller of this service, or a push is pending or failed)"
                if view.revision else "no override to apply")
    if reported == view.revision:
        return (f"applied: every caller's routes reflect {wanted}" if view.revision
                else "applied: every caller's routes follow the inventory (no override)")
    shown = f"revision {reported}" if reported else "no override"
    return f"not applied yet: callers' routes reflect {shown}, not {wanted} (a push is pending or failed)"


def show_text(view: RouteView) -> str:
    """The readable report (lines end with '\\n')."""
    lines = [f"service {view.service} ({view.protocol}), versions: {', '.join(view.versions)}"]
    stored = view.stored
    if stored is None:
        lines.append("override: none (routing as the inventory says)")
    else:
        revision = stored.override.revision if stored.override is not None else "?"
        who = f" set by {stored.set_by}" if stored.set_by else ""
        when = f" at {stored.at}" if stored.at else ""
        lines.append(f"override: revision {revision}{who}{when}")
        if view.problems:
            lines.append(f"  IGNORED (the inventory's routing holds): {'; '.join(view.problems)}")
    lines.append(f"controller: {applied_text(view)}")
    lb = view.policy.lb
    hashing = f" on {lb.hash_on.kind}{' ' + lb.hash_on.name if lb.hash_on.name else ''}" if lb.hash_on else ""
    lb_from = "inventory" if view.policy.lb != ServicePolicy().lb else "default"
    lines.append(f"load balancing: {lb.policy}{hashing} ({lb_from})")
    if view.protocol != "tcp":
        rows = [("#", "match", "to", "timeout", "retries")]
        for number, route in enumerate(view.routes, 1):
            rows.append((str(number), match_text(route.match, route.after_others),
                         f"{to_text(route.to)} ({route.to_from})",
                         f"{timeout_text(route.timeout_ms, view.protocol)} ({route.timeout_from})",
                         f"{retries_text(route.retries)} ({route.retries_from})"))
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        lines.append("routes (first match wins):")
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
                  + "  " + row[4] for row in rows]
        mirror = view.policy.mirror
        lines.append(f"mirror: {f'{mirror.to} {percent_text(mirror.percent)}' if mirror else 'none'} "
                     f"({view.mirror_from})")
        lines.append(f"fault: {fault_text(view.policy.fault)} ({view.fault_from})")
    return "\n".join(lines) + "\n"


def _match_json(match: RouteMatch | None) -> dict[str, Any] | None:
    if match is None:
        return None
    found: dict[str, Any] = {}
    if match.headers:
        found["headers"] = dict(match.headers)
    if match.cookies:
        found["cookies"] = dict(match.cookies)
    if match.path is not None:
        found["path"] = {match.path.kind: match.path.value}
    if match.method is not None:
        found["method"] = match.method
    return found


def _retries_json(retries: Retries | None) -> dict[str, Any] | None:
    if retries is None:
        return None
    return {"attempts": retries.attempts, "per_try_timeout_ms": retries.per_try_timeout_ms, "on": list(retries.on),
            "backoff": None if retries.backoff is None else {"base_ms": retries.backoff.base_ms,
                                                             "max_ms": retries.backoff.max_ms}}


def show_json(view: RouteView) -> dict[str, Any]:
    """The report as JSON (keys documented in the README, "Run-time traffic changes")."""
    stored = view.stored
    override = None
    if stored is not None:
        item = stored.override
        override = {"revision": item.revision if item else None, "set_by": stored.set_by, "at": stored.at,
                    "split": dict(item.split) if item and item.split is not None else None,
                    "fault": fault_to_json(item.fault) if item and item.fault is not None else None, "problems": list(view.problems),
                    "applies": not view.problems}
    lb = view.policy.lb
    mirror = view.policy.mirror
    return {
        "service": view.service, "protocol": view.protocol, "versions": list(view.versions),
        "load_balancing": {"policy": lb.policy,
                           "hash_on": None if lb.hash_on is None else {"kind": lb.hash_on.kind,
                                                                       "name": lb.hash_on.name}},
        "routes": [{"match": _match_json(route.match), "match_text": match_text(route.match, route.after_others),
                    "to": {version: weight for version, weight in route.to}, "to_from": route.to_from,
                    "timeout_ms": route.timeout_ms, "timeout_from": route.timeout_from,
                    "retries": _retries_json(route.retries), "retries_from": route.retries_from}
                   for route in (view.routes if view.protocol != "tcp" else ())],
        "mirror": None if mirror is None else {"to": mirror.to, "percent": mirror.percent, "from": view.mirror_from},
        "fault": None if view.policy.fault is None else {**fault_to_json(view.policy.fault), "from": view.fault_from},
        "override": override,
        "controller": {"active": view.applied.active, "reason": view.applied.reason,
                       "revision": view.controller_revision, "applied": view.is_applied},
    }
