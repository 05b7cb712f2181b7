"""`mesh deploy --plan FILE`: read a plan saved by `mesh plan -o FILE` and refuse it when the plan computed now
differs (inventory, CA, Envoy, templates) or a host holds something else than when it was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.deploy.prepare import Prepared
from mesh.errors import MeshError, UsageError
from mesh.plan.report import PLAN_FILE_VERSION, host_fingerprints


class StalePlan(MeshError):
    """The saved plan is not what would be applied now (exit 1): nothing was touched."""


def read_saved_plan(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the plan file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a plan saved by `mesh plan -o`: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != PLAN_FILE_VERSION or "plan_digest" not in data:
        raise UsageError(f"{path} is not a plan saved by `mesh plan -o` (version {PLAN_FILE_VERSION})")
    return data


def refuse_stale_plan(saved: dict[str, Any], prepared: Prepared, path: Path | None) -> None:
    """Raise StalePlan unless the plan and every host are as they were when the plan was saved."""
    if saved["plan_digest"] != prepared.plan.digest:
        raise StalePlan(f"the plan in {path} is not the plan of the inventory now (its digest "
                        f"{str(saved['plan_digest'])[:12]}, now {prepared.plan.digest[:12]}): the inventory, the CA "
                        "or Envoy changed since", "run `mesh plan -o FILE` again; nothing was touched")
    fingerprints = host_fingerprints(saved)
    changed = [observed.host for observed in prepared.fleet.hosts
               if observed.host not in fingerprints or fingerprints[observed.host] != observed.fingerprint]
    if changed:
        raise StalePlan(f"host(s) changed since the plan in {path} was made: {', '.join(changed)}",
                        "run `mesh plan -o FILE` again; nothing was touched")
