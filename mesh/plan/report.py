"""How a plan's changes are shown: per host the changes with their unified diffs and a summary line (text), or
the change set as JSON (the same for `mesh plan --json` and `mesh deploy --json`), and the saved plan file of
`mesh plan -o FILE`. Pure: it formats what it is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.plan.changes import Change
from mesh.plan.fleet import Observed

PLAN_FILE_VERSION = 1


@dataclass(frozen=True)
class FleetChanges:
    """Every observed host's changes and the Consul catalog's, in host order."""

    hosts: tuple[Observed, ...]
    consul: tuple[Change, ...] = ()

    @property
    def count(self) -> int:
        return sum(len(observed.changes) for observed in self.hosts) + len(self.consul)

    def changed_hosts(self) -> list[str]:
        return [observed.host for observed in self.hosts if observed.changes]

    def converged_hosts(self) -> list[str]:
        return [observed.host for observed in self.hosts if not observed.changes and observed.unreachable is None]

    def unreachable(self) -> dict[str, str]:
        return {observed.host: observed.unreachable for observed in self.hosts if observed.unreachable is not None}


def text_report(fleet: FleetChanges, diffs: bool = True) -> str:
    """Per host its changes (and diffs), then one summary line; `no changes` on a converged fleet."""
    lines: list[str] = []
    for observed in fleet.hosts:
        if observed.unreachable is not None:
            lines.append(f"{observed.host}: UNREACHABLE: {observed.unreachable}")
            continue
        if not observed.changes:
            continue
        lines.append(f"{observed.host}: {len(observed.changes)} change(s)")
        for change in observed.changes:
            lines.append(f"  {change.line()}")
            if diffs and change.diff:
                lines += [f"    {line}" for line in change.diff.rstrip("\n").splitlines()]
    if fleet.consul:
        lines.append(f"Consul: {len(fleet.consul)} change(s)")
        lines += [f"  {change.line()} on node {change.host}" for change in fleet.consul]
    lines.append(summary_line(fleet))
    return "\n".join(lines) + "\n"


def summary_line(fleet: FleetChanges) -> str:
    unreachable = fleet.unreachable()
    tail = f"; {len(unreachable)} host(s) unreachable" if unreachable else ""
    if fleet.count == 0:
        return f"no changes{tail}"
    changed = fleet.changed_hosts()
    removals = sum(1 for observed in fleet.hosts for change in observed.changes if change.action == "remove")
    return (f"Plan: {fleet.count} change(s) on {len(changed)} host(s)"
            f"{' and in Consul' if fleet.consul else ''} ({removals} removal(s)){tail}")


def change_set(fleet: FleetChanges) -> list[dict[str, Any]]:
    """The changes as plain data, in a stable order: what `--json` prints."""
    items = [change.summary() for observed in fleet.hosts for change in observed.changes]
    items += [change.summary() for change in fleet.consul]
    return items


def json_report(fleet: FleetChanges, extra: Mapping[str, Any] | None = None) -> str:
    data: dict[str, Any] = {"changes": change_set(fleet), "summary": summary_line(fleet),
                            "unreachable": fleet.unreachable()}
    data.update(extra or {})
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def saved_plan(fleet: FleetChanges, inventory: str, plan_digest: str) -> str:
    """The file `mesh plan -o FILE` writes: the plan's digest, each host's fingerprint and the change set (no file
    content: `mesh deploy --plan FILE` recomputes the plan and refuses when it or a host differs)."""
    return json.dumps({"version": PLAN_FILE_VERSION, "inventory": inventory, "plan_digest": plan_digest,
                       "hosts": {observed.host: observed.fingerprint for observed in fleet.hosts},
                       "changes": change_set(fleet)}, indent=2, sort_keys=True) + "\n"


def host_fingerprints(saved: Mapping[str, Any]) -> dict[str, str | None]:
    hosts = saved.get("hosts")
    return dict(hosts) if isinstance(hosts, dict) else {}


def consul_changes(register: Sequence[tuple[str, Mapping[str, Any]]], deregister: Sequence[Any]) -> list[Change]:
    """The catalog's pending changes as Changes (host = the Consul node)."""
    changes = [Change(str(body.get("Node", "?")), "consul", service_id, "register") for service_id, body in register]
    changes += [Change(str(getattr(ref, "node", "?")), "consul", str(getattr(ref, "service_id", ref)), "deregister")
                for ref in deregister]
    return changes
