"""The controllers as `mesh status` sees them: their Consul lock and the state the active one publishes
(mesh.controller.spec.state_key: holder, updated_at, consul_stale_s, per proxy the resource version it pushed),
each proxy's resource version on its host against that one, and the ADS streams every controller publishes
(mesh.controller.spec.xds_status_prefix, merged by mesh.xds.status.merged). Reading is `read_controllers` (three
KV reads); the rest is pure. It must not read hosts or print.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from mesh import catalog
from mesh.controller.protocol import resource_version
from mesh.controller.spec import lock_key, state_key, xds_status_prefix
from mesh.errors import MeshError
from mesh.inventory.model import Mesh
from mesh.status.report import ControllerStatus, ResourcesStatus
from mesh.xds.status import StreamStatus, merged, parse_publication

ACTIVE_WITHIN_S = 60.0  # a published state older than this is a controller that no longer answers (as deploy says)


@dataclass(frozen=True)
class PushedVersion:
    version: str
    pushed_at: datetime | None


@dataclass(frozen=True)
class ControllerView:
    """The controllers' status, the versions the active one pushed by `HOST/PROXY` (empty when none is), and the
    ADS streams of every controller (active or not: each serves ADS) by node id (xds_read False: not read)."""

    status: ControllerStatus
    versions: Mapping[str, PushedVersion] = field(default_factory=lambda: MappingProxyType({}))
    xds: Mapping[str, StreamStatus] = field(default_factory=lambda: MappingProxyType({}))
    xds_read: bool = False

    def pushed(self, host: str, proxy: str) -> PushedVersion | None:
        return self.versions.get(f"{host}/{proxy}") if self.status.active else None

    def stream(self, node_id: str) -> StreamStatus | None:
        return self.xds.get(node_id)


def judge_controllers(lock_session: str | None, state_value: bytes | str | None, now: datetime,
                      xds_values: Iterable[bytes | str | None] | None = None) -> ControllerView:
    """The view from the lock's session (None: nobody holds it), the published state's text and the texts of the
    controllers' ADS stream publications (None: not read). Pure."""
    state = _document(state_value)
    updated = _time(state.get("updated_at")) if state else None
    reason = None
    if lock_session is None:
        reason = "nobody holds the controllers' lock"
    elif state is None:
        reason = "the lock is held but no state was published"
    elif updated is None or (now - updated).total_seconds() > ACTIVE_WITHIN_S:
        reason = f"its state is older than {ACTIVE_WITHIN_S:g}s"
    stale = state.get("consul_stale_s") if state else None
    behind = state.get("hosts_behind") if state else None
    status = ControllerStatus(
        active=reason is None, holder=str(state["holder"]) if state and state.get("holder") else None,
        lock_held=lock_session is not None, updated_at=updated,
        consul_stale_s=float(stale) if isinstance(stale, int | float) else None,
        plan_digest=str(state["plan_digest"]) if state and state.get("plan_digest") else None,
        hosts_behind=tuple(str(item) for item in behind) if isinstance(behind, list) else (), reason=reason)
    versions = {}
    proxies = state.get("proxies") if state else None
    for name, item in (proxies.items() if isinstance(proxies, dict) else ()):
        if isinstance(item, dict) and item.get("version"):
            versions[str(name)] = PushedVersion(str(item["version"]), _time(item.get("pushed_at")))
    streams = merged((parse_publication(value) for value in xds_values if value is not None), now.timestamp()) \
        if xds_values is not None else {}
    return ControllerView(status, MappingProxyType(versions), MappingProxyType(streams), xds_values is not None)


def read_controllers(mesh: Mesh, now: datetime | None = None) -> ControllerView:
    """The controllers' lock, state and ADS streams from Consul; a Consul that cannot be read is the reason none
    is active (and no stream is known)."""
    when = now or datetime.now(UTC)
    try:
        with catalog.client_for(catalog.access_for(mesh)) as client:
            _, lock = client.kv.get(lock_key(mesh.settings.id))
            _, state = client.kv.get(state_key(mesh.settings.id))
            _, published = client.kv.get(xds_status_prefix(mesh.settings.id), recurse=True)
    except MeshError as exc:
        return ControllerView(ControllerStatus(False, None, False, None, None, None, (), f"not read: {exc}"))
    session = (lock or {}).get("Session")
    return judge_controllers(str(session) if session else None, (state or {}).get("Value"), when,
                             [item.get("Value") for item in published or () if isinstance(item, dict)])


def resources_status(proxy_dir: str, files: Mapping[str, bytes], pushed: PushedVersion | None) -> ResourcesStatus:
    """A proxy's resource version from its files on the host (absolute path -> content; only xds/ files count)
    against the controller's. Pure."""
    prefix = proxy_dir.rstrip("/") + "/"
    shas = {path.removeprefix(prefix): hashlib.sha256(content).hexdigest() for path, content in files.items()
            if path.startswith(prefix)}
    host_version = resource_version(shas) if shas else None
    return ResourcesStatus(host_version, pushed.version if pushed else None, pushed.pushed_at if pushed else None)


def _document(value: bytes | str | None) -> dict[str, Any] | None:
    try:
        data = json.loads(value or b"")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _time(value: object) -> datetime | None:
    """Epoch seconds (what the controller writes) or ISO 8601."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None
