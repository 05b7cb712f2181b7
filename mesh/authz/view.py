"""How `mesh authz check/matrix/show` print what mesh.authz.explain answered: lines and a table for a person
(colours at a terminal only), JSON for scripts (keys: README, "Authorization"). Pure: it must not read anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mesh.authz.explain import Answer, Cell, ServiceAuthz, default_text, explain
from mesh.config.authz import AuthzRequest
from mesh.inventory.authz import rule_text
from mesh.inventory.policy import UNAUTHENTICATED
from mesh.runtime_kv import AppliedRevisions

CELL_STYLE = {"allow": "green", "deny": "red", "partial": "yellow"}
LEGEND = ("allow: every request is allowed; deny: every request is denied; partial: some are (rules on methods, "
          "paths or headers): `mesh authz check SRC DST METHOD PATH` says which")


@dataclass(frozen=True)
class Checked:
    """One `mesh authz check`: who asked what of which service, and the answer."""

    source: str
    destination: ServiceAuthz
    request: AuthzRequest
    answer: Answer


def request_text(request: AuthzRequest) -> str:
    if request.method is None:
        return "a TCP connection"
    headers = "".join(f" {name}={value}" for name, value in request.headers)
    return f"{request.method} {request.path}{headers}"


def check_lines(checked: Checked) -> list[tuple[str, str | None]]:
    """The lines of the answer, each with its colour (None: plain)."""
    answer = checked.answer
    verdict = "allowed" if answer.allowed else "denied"
    service = checked.destination.service
    lines: list[tuple[str, str | None]] = [
        (f"{checked.source} -> {service} {request_text(checked.request)}: {verdict}",
         "green" if answer.allowed else "red"),
        (f"  rule: {service}: {answer.rule_text}", None)]
    lines += [(f"  shadow: {service}: {text} would deny it", "yellow") for _, text in answer.would_deny]
    return lines


def check_json(checked: Checked) -> dict[str, Any]:
    request = checked.request
    answer = checked.answer
    return {"source": checked.source, "source_id": request.source, "destination": checked.destination.service,
            "request": {"method": request.method, "path": request.path, "headers": dict(request.headers)},
            "allowed": answer.allowed, "rule": answer.decision.rule, "rule_text": answer.rule_text,
            "would_deny": [{"rule": name, "rule_text": text} for name, text in answer.would_deny]}


# ---- matrix -----------------------------------------------------------------------------------------------


def print_matrix(sources: tuple[str, ...], cells: Mapping[tuple[str, str], Cell], destinations: tuple[str, ...],
                 console: Console) -> None:
    """Rows are sources, columns destinations, then the legend."""
    table = Table(title="who may call whom (rows call columns)",
                  box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    table.add_column("source \\ destination")
    for destination in destinations:
        table.add_column(destination)
    for source in sources:
        table.add_row(source, *(Text(cells[source, destination], style=CELL_STYLE[cells[source, destination]])
                                for destination in destinations))
    console.print(table)
    console.print(Text(LEGEND), soft_wrap=True)
    if UNAUTHENTICATED in sources:
        console.print(Text(f"{UNAUTHENTICATED}: a plaintext client (only a permissive service's plaintext chain "
                           "accepts one)"), soft_wrap=True)


def matrix_json(sources: tuple[str, ...], destinations: tuple[str, ...],
                cells: Mapping[tuple[str, str], Cell]) -> dict[str, Any]:
    return {"sources": list(sources), "destinations": list(destinations),
            "matrix": {source: {destination: cells[source, destination] for destination in destinations}
                       for source in sources}}


# ---- show -------------------------------------------------------------------------------------------------


def applied_text(authz: ServiceAuthz, applied: AppliedRevisions) -> str:
    """Whether every instance of the service enforces the run-time deny shown, in words."""
    wanted = authz.override.revision if authz.override is not None else ""
    reported = applied.revision(authz.service)
    if reported is None:
        return "not reported by the controller (a push is pending or failed)" if wanted else "nothing to apply"
    if reported == wanted:
        return f"applied: every instance enforces revision {wanted}" if wanted else \
            "applied: every instance follows the inventory (no run-time deny)"
    shown = f"revision {reported}" if reported else "no run-time deny"
    what = f"revision {wanted}" if wanted else "its removal"
    return f"not applied yet: instances enforce {shown}, not {what} (a push is pending or failed)"


def show_text(authz: ServiceAuthz, applied: AppliedRevisions) -> str:
    """One service's rules (lines end with '\\n')."""
    rules = authz.policy.authz
    named = sorted({source for rule in rules.allow for source in rule.sources})
    excluded = f" (not for {', '.join(named)}: the allow rules naming them decide)" if named else ""
    lines = [f"{authz.service} ({authz.protocol}, mtls {authz.policy.mtls})",
             f"  default: {default_text(authz)}{excluded}"]
    lines += [f"  deny[{index}] {rule_text(rule)}" for index, rule in enumerate(rules.deny)]
    lines += [f"  allow[{index}] {rule_text(rule)}" for index, rule in enumerate(rules.allow)]
    if not rules.deny and not rules.allow:
        lines.append("  no rules in the inventory")
    stored = authz.stored
    if stored is None:
        lines.append("  run-time deny: none")
    else:
        sources = ", ".join(stored.override.deny_from) if stored.override is not None else "?"
        lines.append(f"  {explain(authz, 'runtime-deny')}: from {sources}"
                     + (f", revision {stored.override.revision}" if stored.override is not None else ""))
        if authz.problems:
            lines.append(f"    IGNORED (the inventory's rules hold): {'; '.join(authz.problems)}")
    if applied.active:  # else one line for every service: inactive_text
        lines.append(f"  controller: {applied_text(authz, applied)}")
    return "\n".join(lines) + "\n"


def inactive_text(applied: AppliedRevisions) -> str | None:
    """Said once under the services when no controller is active."""
    if applied.active:
        return None
    return f"controller: none active ({applied.reason}): instances follow the last deploy or push"


def show_json(authz: ServiceAuthz, applied: AppliedRevisions) -> dict[str, Any]:
    rules = authz.policy.authz
    stored = authz.stored
    runtime = None
    if stored is not None:
        runtime = {"deny_from": list(stored.override.deny_from) if stored.override is not None else None,
                   "revision": stored.override.revision if stored.override is not None else None,
                   "set_by": stored.set_by, "at": stored.at, "problems": list(authz.problems),
                   "applies": not authz.problems}
    wanted = authz.override.revision if authz.override is not None else ""
    return {"service": authz.service, "protocol": authz.protocol, "mtls": authz.policy.mtls,
            "default": authz.inputs.authz_default, "callers": list(authz.inputs.callers),
            "deny": [{"rule": f"deny[{index}]", "text": rule_text(rule), "mode": rule.mode}
                     for index, rule in enumerate(rules.deny)],
            "allow": [{"rule": f"allow[{index}]", "text": rule_text(rule), "mode": rule.mode}
                      for index, rule in enumerate(rules.allow)],
            "runtime_deny": runtime,
            "controller": {"active": applied.active, "reason": applied.reason,
                           "revision": applied.revision(authz.service),
                           "applied": applied.revision(authz.service) == wanted}}
